// The about page (#/about): this release, the data, the guard, the heat map.
import { $, el, pct, str, isNum, label, fmtScore } from "../ui/format.js";
import { renderInline } from "../ui/markdown.js";
import { state, disclaimer, guardUnavailable } from "../state.js";
import { viewFlag } from "../view.js";
import { lungsEntry } from "../ui/outline.js";

export function renderAbout() {
  const app = state.app || {};
  const ds = (app.dataset && typeof app.dataset === "object" && app.dataset) || {};
  const root = $("about-page");
  const counts = ds.counts && typeof ds.counts === "object" ? ds.counts : null;
  const guard = app.guard && typeof app.guard === "object" ? app.guard : null;
  const limits = Array.isArray(app.limits) ? app.limits.filter((x) => str(x)) : [];
  let countsTable = null;
  if (counts) {
    const splits = Object.keys(counts);
    const classes = state.classes.length ? state.classes : Object.keys(counts[splits[0]] || {});
    countsTable = el(
      "div",
      { class: "table-scroll", tabindex: "0" },
      el(
        "table",
        { class: "metric-table" },
        el("caption", { text: "Images per split" }),
        el("thead", {}, el("tr", {}, el("th", { scope: "col" }, el("span", { class: "visually-hidden", text: "Class" })), ...splits.map((s) => el("th", { scope: "col", text: s })))),
        el(
          "tbody",
          {},
          ...classes.map((c) =>
            el("tr", {}, el("th", { scope: "row" }, label(c)), ...splits.map((s) => el("td", { text: String((counts[s] || {})[c] ?? "—") }))),
          ),
        ),
      ),
    );
  }
  root.replaceChildren(
    el("h2", { text: "About this app" }),
    el("p", { class: "disclaimer", text: disclaimer() }),
    el(
      "p",
      {},
      "This app runs chest X-ray classifiers (COVID, Lung opacity, Normal, Viral pneumonia) trained in a research pipeline. ",
      "The models run entirely in your browser with LiteRT.js (TensorFlow Lite in WebAssembly). ",
      el("strong", { text: "Your image never leaves this device." }),
      " After the first visit the app also works offline.",
    ),
    el("h3", { text: "This release" }),
    el(
      "dl",
      { class: "facts" },
      el("dt", { text: "Run" }), el("dd", { text: str(app.run_id, "—") }),
      el("dt", { text: "Created" }), el("dd", { text: str(app.created, "—") }),
      el("dt", { text: "Dataset version" }), el("dd", { text: str(ds.version, "—") }),
      el("dt", { text: "Split" }), el("dd", { text: str(ds.split_hash, "—") }),
      el("dt", { text: "Models" }), el("dd", { text: String(state.models.length) }),
    ),
    countsTable,
    el("h3", { text: "Out-of-distribution guard" }),
    guard
      ? el(
          "div",
          {},
          el("p", { text: str(guard.method, "A guard model scores how unlike the training X-rays a picture is.") }),
          el(
            "p",
            { class: "muted" },
            `Score threshold ${fmtScore(+guard.threshold)}; colour threshold ${fmtScore(+guard.colour_threshold)}`,
            isNum(guard.val_false_alarm) ? `; false alarms on validation X-rays: ${pct(guard.val_false_alarm)}` : "",
            ".",
          ),
          viewAbout(guard.view),
        )
      : el("p", { class: "guard-unavailable", text: guardUnavailable(app) }),
    lungsAbout(lungsEntry(app)),
    el("h3", { text: "“Why this class?”" }),
    el("p", {
      text: "The heat map is occlusion sensitivity: the image is split into a grid; each cell in turn is covered with the average gray and the model is run again. Cells whose covering lowers the predicted class the most are brightest. It shows what the model relies on, which is not necessarily disease (it can be markers, text or borders).",
    }),
    limits.length ? el("h3", { text: "Known limits of the data" }) : null,
    limits.length ? el("ul", {}, ...limits.map((l) => el("li", { html: renderInline(l) }))) : null,
  );
}

// The lung outline: what draws it and how well it did on masks it never saw.
function lungsAbout(l) {
  if (!l) return null;
  const h = l.heldout || {};
  const fig = (name) =>
    isNum(h[name]) ? `${name === "dice" ? "Dice" : "IoU"} ${(+h[name]).toFixed(3)}${Array.isArray(h[`${name}_ci95`]) ? ` (95% CI ${(+h[`${name}_ci95`][0]).toFixed(3)}–${(+h[`${name}_ci95`][1]).toFixed(3)})` : ""}` : null;
  const figures = [fig("dice"), fig("iou")].filter(Boolean);
  return el(
    "div",
    { class: "lungs-about" },
    el("h3", { text: "Lung outline" }),
    el("p", {
      text:
        `After a result, a small lung segmenter (a U-Net, ${l.size} px grey input) outlines the lungs over your picture, on this device. ` +
        "It is there for your eye: the models classify the whole picture, not only the lungs, and a model that looks outside the lungs may be reading markers, text or borders.",
    }),
    el(
      "p",
      { class: "muted" },
      `Trained on ${isNum(l.masks) ? `${l.masks} ` : ""}lung masks of ${str(l.trained_on, "the run's mask source")}`,
      figures.length ? `; on ${isNum(h.images) ? h.images : "the"} held-out masks: ${figures.join(", ")}` : "",
      ". On other hospitals' X-rays it may outline less well.",
    ),
  );
}

// The view check's part of the guard: its method and thresholds, only the figures the release has.
function viewAbout(view) {
  // The pick screen's own test (viewFlag): a view entry it cannot use is reported as missing, as it acts.
  if (viewFlag({ asymmetry: 0, midline: 0 }, view) === null) {
    return el("p", { class: "muted", text: "This release's guard has no view check this app can use: every picture waits for your confirmation." });
  }
  const rates = [
    isNum(view.trainval_false_alarm) ? `false alarms on training and validation X-rays ${pct(view.trainval_false_alarm)}` : null,
    isNum(view.test_false_alarm) ? `on test X-rays ${pct(view.test_false_alarm)}` : null,
  ].filter(Boolean);
  return el(
    "div",
    { class: "view-check" },
    el("h4", { text: "Frontal view check" }),
    el("p", { text: str(view.method, "A frontal (PA or AP) chest X-ray is expected; lateral and other views are flagged.") }),
    el(
      "p",
      { class: "muted" },
      `Asymmetry limit ${fmtScore(+view.asymmetry_threshold)}; midline limit ${fmtScore(+view.midline_threshold)}`,
      rates.length ? `; ${rates.join(", ")}` : "",
      ".",
    ),
  );
}
