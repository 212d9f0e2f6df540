// The lung outline over the picked image: the run's lung segmenter (app.json "lungs") runs after
// the first result (its file is fetched then, so it costs nothing before that result), and its
// contour is drawn over the preview, in the segmenter's grid stretched over the picture as the
// model's input is. It is for the eye only: the models classify the whole picture.
import { lungRings, lungStats, ringArea, ringsPath } from "../lungs.js";
import { preprocess } from "../preprocess.js";
import { runModel } from "../runtime.js";
import { $, str } from "./format.js";
import { state, timings } from "../state.js";

// Below these shares of the image, the segmenter found (almost) no lung field on that side.
const MIN_SIDE_SHARE = 0.02;

/** The app.json "lungs" entry when it names a file and a square grey input, else null. */
export function lungsEntry(app) {
  const l = app && app.lungs;
  if (!l || typeof l !== "object" || !str(l.file)) return null;
  const size = Math.round(+l.input_size);
  return size > 0 ? { ...l, size, threshold: Number.isFinite(+l.threshold) ? +l.threshold : 0.5 } : null;
}

function place() {
  const img = $("preview");
  const svg = $("lung-outline");
  svg.style.left = `${img.offsetLeft}px`;
  svg.style.top = `${img.offsetTop}px`;
  svg.style.width = `${img.offsetWidth}px`;
  svg.style.height = `${img.offsetHeight}px`;
}

export function clearLungs() {
  const svg = $("lung-outline");
  svg.toggleAttribute("hidden", true); // an SVG element has no .hidden property
  for (const k of ["state", "rings", "share", "left", "right", "ms"]) delete svg.dataset[k];
  $("lung-path").setAttribute("d", "");
  $("lung-status").textContent = "";
  $("lung-bar").hidden = true;
  if (state.pick) delete state.pick.lungs;
}

function describe(l) {
  const h = l.heldout || {};
  const ci = Array.isArray(h.dice_ci95) ? `, 95% CI ${(+h.dice_ci95[0]).toFixed(3)}–${(+h.dice_ci95[1]).toFixed(3)}` : "";
  const dice = Number.isFinite(+h.dice) ? ` (held-out Dice ${(+h.dice).toFixed(3)}${ci})` : "";
  const src = str(l.trained_on) ? `, trained on ${Number.isFinite(+l.masks) ? `${l.masks} ` : ""}lung masks of ${l.trained_on}` : "";
  return `Lung outline by the run's lung segmenter${src}${dice}.`;
}

/** Run the segmenter on the current pick and draw its outline (nothing when the release has none). */
export async function showLungs(pick) {
  const l = lungsEntry(state.app);
  if (!l || !pick || pick !== state.pick) return;
  const svg = $("lung-outline");
  const status = $("lung-status");
  $("lung-bar").hidden = false;
  svg.dataset.state = "running";
  status.textContent = "Outlining the lungs…";
  const key = `${l.size}x1`;
  if (!pick.inputs.has(key)) pick.inputs.set(key, preprocess(pick.rgba, pick.width, pick.height, l.size, 1));
  let r;
  try {
    r = await runModel(l.file, "wasm", pick.inputs.get(key), [1, l.size, l.size, 1], { label: "the lung outline", total: l.bytes });
  } catch (e) {
    if (pick !== state.pick) return;
    console.error(e);
    svg.dataset.state = "error";
    status.textContent = `The lung outline could not be computed on this device (${(e && e.message) || e}).`;
    return;
  }
  if (pick !== state.pick) return;
  if (r.output.length !== l.size * l.size) {
    svg.dataset.state = "error";
    status.textContent = `The lung segmenter returned ${r.output.length} values, expected ${l.size * l.size}.`;
    return;
  }
  timings.push({ model: "lung segmenter", ms: r.ms, first: r.first });
  const rings = lungRings(r.output, l.size, l.threshold);
  const stats = lungStats(r.output, l.size, l.threshold);
  pick.lungs = { prob: r.output, size: l.size, rings, stats };
  svg.setAttribute("viewBox", `0 0 ${l.size} ${l.size}`);
  $("lung-path").setAttribute("d", ringsPath(rings));
  Object.assign(svg.dataset, {
    rings: JSON.stringify(rings.map(ringArea)),
    share: String(stats.share),
    left: String(stats.left),
    right: String(stats.right),
    ms: String(r.ms),
    state: "done",
  });
  place();
  svg.toggleAttribute("hidden", !$("show-lungs").checked);
  const found = [stats.left >= MIN_SIDE_SHARE, stats.right >= MIN_SIDE_SHARE].filter(Boolean).length;
  const what = `${describe(l)} The models classify the whole picture, not only the lungs.`;
  status.textContent =
    found === 2
      ? what
      : `${what} It found ${found ? "only one lung field" : "no lung field"} here: a picture it cannot outline (another view, a cropped film, or not a chest X-ray) calls for extra caution.`;
}

export function wireLungs() {
  $("show-lungs").addEventListener("change", () => {
    const svg = $("lung-outline");
    if (svg.dataset.state === "done") svg.toggleAttribute("hidden", !$("show-lungs").checked);
  });
  // The picture's box changes with the window and the picture: the outline follows it.
  if ("ResizeObserver" in window) {
    new ResizeObserver(place).observe($("preview"));
  }
  $("preview").addEventListener("load", place);
}
