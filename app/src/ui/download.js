// Download progress of model files: a bar under the status line while a model
// the service worker does not keep yet is fetched (when the user picks it, or
// the default model on the first visit). Hooks: #model-download[data-state]
// ("loading" | "done" | "error"), [data-path]; its <progress> has value/max in bytes.
import { onDownload } from "../runtime.js";
import { $, el, mb } from "./format.js";

export function wireDownloads() {
  const anchor = $("status");
  if (!anchor) return;
  const label = el("span", { class: "download-label" });
  const bar = el("progress", { max: "1", value: "0" });
  const box = el("div", { id: "model-download", class: "model-download", role: "status", hidden: true }, label, bar);
  anchor.after(box);
  bar.setAttribute("aria-label", "Model download");
  let hideTimer = null;
  onDownload(({ path, label: name, loaded, total, done, error }) => {
    clearTimeout(hideTimer);
    box.hidden = false;
    box.dataset.path = path;
    if (error) {
      box.dataset.state = "error";
      label.textContent = `Could not download ${name}: ${error}`;
      return;
    }
    box.dataset.state = done ? "done" : "loading";
    if (total > 0) {
      bar.max = total;
      bar.value = Math.min(loaded, total);
    } else {
      bar.removeAttribute("value"); // indeterminate
    }
    label.textContent = done
      ? `Downloaded ${name} (${mb(loaded)}); kept for offline use.`
      : `Downloading ${name}: ${mb(loaded)}${total > 0 ? ` of ${mb(total)}` : ""}…`;
    if (done) hideTimer = setTimeout(() => (box.hidden = true), 4000);
  });
}
