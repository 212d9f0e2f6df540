// The model card: one button per model (selecting one re-runs the current
// pick) and the opt-in WebGPU toggle.
import { webGpuAvailable } from "../runtime.js";
import { $, el, pctCi, mb, str, isNum } from "../ui/format.js";
import { safe } from "../ui/status.js";
import { state, modelByName } from "../state.js";
import { predict } from "./results.js";
import { falseAlarmStats } from "../ui/external.js";

export function renderModelList() {
  const list = $("model-list");
  list.replaceChildren();
  if (!state.models.length) {
    list.append(el("p", { class: "muted", text: "No models in this bundle." }));
    return;
  }
  for (const m of state.models) {
    const sens = pctCi(m.covid_sensitivity, m.covid_sensitivity_ci95);
    const item = el(
      "div",
      { class: "model-item" },
      el(
        "button",
        {
          type: "button",
          class: "model-btn",
          "data-model": m.name,
          "aria-pressed": m.name === state.selected ? "true" : "false",
          onclick: safe(() => selectModel(m.name)),
        },
        el(
          "span",
          { class: "model-head" },
          el("span", { class: "model-rank", text: isNum(m.rank) ? `#${m.rank}` : "" }),
          el("span", { class: "model-name", text: m.name }),
          m.champion ? el("span", { class: "champion-badge", text: "champion" }) : null,
          el("span", { class: "model-size", text: mb(m.bytes) }),
        ),
        el("span", { class: "model-desc", text: [str(m.weights), str(m.training)].filter(Boolean).join(" · ") || "—" }),
        el(
          "span",
          { class: "model-stats" },
          el("span", {}, "Val acc ", el("b", { text: pctCi(m.val_accuracy, m.val_accuracy_ci95) })),
          el("span", {}, "Test acc ", el("b", { text: pctCi(m.test_accuracy, m.test_accuracy_ci95) })),
          el("span", {}, "COVID sensitivity ", el("b", { text: sens })),
          ...falseAlarmStats(m),
        ),
      ),
      el("a", { class: "model-link", href: `#/model/${encodeURIComponent(m.name)}`, "aria-label": `Details for ${m.name}`, text: "Details ›" }),
    );
    list.append(item);
  }
}

function updatePressed() {
  for (const b of document.querySelectorAll("#model-list [data-model]")) {
    b.setAttribute("aria-pressed", b.dataset.model === state.selected ? "true" : "false");
  }
}

async function selectModel(name) {
  if (!modelByName(name)) return;
  state.selected = name;
  updatePressed();
  if (state.pick && state.pick.allowed) {
    await predict();
  }
}

export function wireModels() {
  $("use-webgpu").addEventListener(
    "change",
    safe(async (ev) => {
      state.accelerator = ev.target.checked ? "webgpu" : "wasm";
      if (state.pick && state.pick.allowed) await predict();
    }),
  );
  // Offer the GPU only when the worker, where the models run, gets a WebGPU adapter (headless browsers
  // expose navigator.gpu without one; a page can have WebGPU where its workers do not). WASM stays the
  // default: its results are exact.
  // Asked once the page is idle: the worker (and, with WebGPU, the GPU process) never delays the first paint.
  const ask = () =>
    webGpuAvailable().then((ok) => {
      $("webgpu-toggle").dataset.webgpu = ok ? "available" : "unavailable";
      if (ok) $("webgpu-toggle").hidden = false;
    });
  if (window.requestIdleCallback) window.requestIdleCallback(ask, { timeout: 3000 });
  else setTimeout(ask, 500);
}
