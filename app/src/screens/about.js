// The about page (#/about): this release, the data, the guard, the heat map.
import { $, el, pct, str, isNum, label, fmtScore } from "../ui/format.js";
import { renderInline } from "../ui/markdown.js";
import { state, disclaimer, guardUnavailable } from "../state.js";
import { viewFlag } from "../view.js";

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
    el("h3", { text: "“Why this class?”" }),
    el("p", {
      text: "The heat map is occlusion sensitivity: the image is split into a grid; each cell in turn is covered with the average gray and the model is run again. Cells whose covering lowers the predicted class the most are brightest. It shows what the model relies on, which is not necessarily disease (it can be markers, text or borders).",
    }),
    limits.length ? el("h3", { text: "Known limits of the data" }) : null,
    limits.length ? el("ul", {}, ...limits.map((l) => el("li", { html: renderInline(l) }))) : null,
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
