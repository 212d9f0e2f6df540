// The model page (#/model/<name>): metrics, model card, figures, limits.
import { el, pct, ci, num, mb, str, isNum, label } from "../ui/format.js";
import { renderMarkdown, renderInline } from "../ui/markdown.js";
import { externalSection } from "../ui/external.js";
import { guardUnavailable } from "../state.js";

function metricRows(m, top, split) {
  if (!m) return [];
  const accCi = m.accuracy_ci95 || top[`${split}_accuracy_ci95`];
  return [
    ["Accuracy", pct(isNum(m.accuracy) ? m.accuracy : top[`${split}_accuracy`]), ci(accCi)],
    ["COVID sensitivity", pct(m.covid_sensitivity), ci(m.covid_sensitivity_ci95)],
    ["COVID specificity", pct(m.covid_specificity), ci(m.covid_specificity_ci95)],
    ["Macro-F1", num(m.macro_f1)],
    ["Balanced accuracy", pct(m.balanced_accuracy)],
    ["ROC AUC (macro)", num(m.roc_auc_macro)],
    ["ECE (calibration error)", num(m.ece)],
    ["Images (n)", isNum(m.n) ? String(m.n) : "—"],
  ];
}

function perClassTable(m, classes) {
  const pc = (m && m.per_class) || {};
  const names = classes.length ? classes : Object.keys(pc);
  if (!names.length) return null;
  return el(
    "table",
    { class: "metric-table per-class" },
    el("thead", {}, el("tr", {}, ...["Class", "Precision", "Recall", "F1", "n"].map((h) => el("th", { scope: "col", text: h })))),
    el(
      "tbody",
      {},
      ...names.map((c) => {
        const r = pc[c] || {};
        return el(
          "tr",
          { "data-class": c },
          el("th", { scope: "row" }, label(c)),
          el("td", { text: pct(r.precision) }),
          el("td", { text: pct(r.recall) }),
          el("td", { text: num(r.f1) }),
          el("td", { text: isNum(r.support) ? String(r.support) : "—" }),
        );
      }),
    ),
  );
}

function confusionTable(cm, classes) {
  if (!Array.isArray(cm) || !cm.length) return null;
  const names = classes.length === cm.length ? classes : cm.map((_, i) => `class ${i}`);
  return el(
    "div",
    { class: "table-scroll", tabindex: "0" },
    el(
      "table",
      { class: "metric-table confusion" },
      el("caption", { text: "Confusion matrix (rows: true class, columns: predicted)" }),
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, el("span", { class: "visually-hidden", text: "True class" })), ...names.map((n) => el("th", { scope: "col" }, label(n))))),
      el(
        "tbody",
        {},
        ...cm.map((row, i) =>
          el(
            "tr",
            {},
            el("th", { scope: "row" }, label(names[i])),
            ...(Array.isArray(row) ? row : []).map((v, j) => el("td", { class: i === j ? "diag" : "", text: String(v) })),
          ),
        ),
      ),
    ),
  );
}

function figure(src, caption, resolve) {
  if (!str(src)) return null;
  return el(
    "figure",
    { class: "figure" },
    el("img", { src: resolve(src), alt: caption, loading: "lazy", decoding: "async" }),
    el("figcaption", { text: caption }),
  );
}

// "Where the model looks": the run's Grad-CAM gallery (PNG overlays computed by the pipeline) and the
// shortcut score, the share of the Grad-CAM heat outside the lungs (lung masks) or in the border band.
function shortcutParts(sc) {
  if (!sc || typeof sc !== "object" || !isNum(sc.score)) return null;
  const where =
    sc.method === "lung masks"
      ? "outside the lung masks"
      : sc.method === "segmenter lung masks"
        ? "outside the lungs as the run's lung segmenter outlines them"
        : "in the outer border band of the image, where text markers and collimation edges sit";
  const base = isNum(sc.baseline) ? sc.baseline : null;
  const verdict =
    base === null
      ? ""
      : sc.score < 0.5 * base
        ? " This model's score is well below that: it looks mostly at the lungs."
        : " This model's score is near or above that: it may rely on shortcuts such as markers and edges rather than the lungs; look at the pictures.";
  return {
    value: `${sc.score.toFixed(2)}${base === null ? "" : ` (uniform map: ${base.toFixed(2)})`}`,
    meaning: `The share of the model's attention (Grad-CAM heat) ${where}: lower is better. A map spread evenly over the image scores the uniform-map value.${verdict}`,
  };
}

function gradcamSection(model, imgs, resolve) {
  const list = Array.isArray(imgs.gradcam) ? imgs.gradcam : [];
  const items = list
    .map((g) => (typeof g === "string" ? { src: g, caption: "" } : g && typeof g === "object" ? { src: g.src || g.path, caption: str(g.caption) } : null))
    .filter((g) => g && str(g.src));
  const sc = shortcutParts(model.shortcut);
  if (!items.length && !sc) return null;
  const sec = el("section", { class: "gradcam" }, el("h3", { text: "Where the model looks" }));
  if (sc) {
    sec.append(
      el(
        "dl",
        { class: "facts shortcut" },
        el("dt", { text: "Shortcut score" }), el("dd", { class: "shortcut-score", text: sc.value }),
        el("dt", { text: "Measured with" }), el("dd", { text: str(model.shortcut.method, "—") }),
      ),
      el("p", { class: "shortcut-meaning", text: sc.meaning }),
    );
  }
  if (items.length) {
    sec.append(
      el("p", {
        class: "table-note",
        text: "Grad-CAM on fixed test images, right and wrong predictions per class: red is where the predicted class's evidence is strongest. Each picture's title gives the true class, the predicted one and its probability.",
      }),
      el(
        "div",
        { class: "gradcam-grid" },
        ...items.map((g) =>
          el(
            "figure",
            { class: "figure gradcam-item" },
            el("img", { src: resolve(g.src), alt: g.caption || `Grad-CAM of ${model.name}`, loading: "lazy", decoding: "async" }),
            g.caption ? el("figcaption", { text: g.caption }) : null,
          ),
        ),
      ),
    );
  }
  return sec;
}

export function renderModelPage(root, model, app, resolve) {
  root.replaceChildren();
  if (!model) {
    root.removeAttribute("data-model");
    root.append(el("h2", { text: "Model not found" }), el("p", {}, el("a", { href: "#/", text: "Back to the classifier" })));
    return;
  }
  const classes = Array.isArray(app.classes) ? app.classes : [];
  const metrics = (model.metrics && typeof model.metrics === "object" && model.metrics) || {};
  const imgs = (model.images && typeof model.images === "object" && model.images) || {};
  root.dataset.model = model.name;
  root.append(
    el("p", { class: "back" }, el("a", { href: "#/", text: "← Back to the classifier" })),
    el(
      "h2",
      { class: "model-title" },
      model.name,
      model.champion ? el("span", { class: "champion-badge", text: "champion" }) : null,
    ),
    el(
      "dl",
      { class: "facts" },
      el("dt", { text: "Rank" }), el("dd", { text: isNum(model.rank) ? `#${model.rank}` : "—" }),
      el("dt", { text: "Weights" }), el("dd", { text: str(model.weights, "—") }),
      el("dt", { text: "Training" }), el("dd", { text: str(model.training, "—") }),
      el("dt", { text: "Input" }),
      el("dd", { text: `${isNum(model.input_size) ? `${model.input_size}×${model.input_size}` : "?"} px, ${model.channels === 3 ? "RGB" : "grayscale"}` }),
      el("dt", { text: "Download size" }), el("dd", { text: mb(model.bytes) }),
    ),
  );

  if (!app.guard || typeof app.guard !== "object") root.append(el("p", { class: "notice guard-unavailable", text: guardUnavailable(app) }));

  const splits = ["test", "val"].filter((s) => metrics[s] && typeof metrics[s] === "object");
  if (splits.length || isNum(model.test_accuracy) || isNum(model.val_accuracy)) {
    const sec = el("section", { class: "metrics" }, el("h3", { text: "Metrics" }));
    const labels = { test: "Test set", val: "Validation set" };
    const useSplits = splits.length ? splits : ["test", "val"];
    const rows = metricRows.bind(null);
    const table = el(
      "table",
      { class: "metric-table summary" },
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, el("span", { class: "visually-hidden", text: "Metric" })), ...useSplits.map((s) => el("th", { scope: "col", text: labels[s] })))),
    );
    const perSplit = useSplits.map((s) => rows(metrics[s] || { accuracy: model[`${s}_accuracy`] }, model, s));
    const tbody = el("tbody");
    perSplit[0].forEach(([rowLabel], i) => {
      tbody.append(
        el(
          "tr",
          {},
          el("th", { scope: "row", text: rowLabel }),
          ...perSplit.map((r) => el("td", {}, r[i][1], r[i][2] ? el("span", { class: "ci", text: r[i][2] }) : null)),
        ),
      );
    });
    table.append(tbody);
    sec.append(el("div", { class: "table-scroll", tabindex: "0" }, table));
    if (perSplit.some((r) => r.some((row) => row[2]))) sec.append(el("p", { class: "table-note", text: "Small print under a value: its 95% confidence interval." }));
    for (const s of splits) {
      const t = perClassTable(metrics[s], classes);
      if (t) sec.append(el("h4", { text: `Per class — ${labels[s].toLowerCase()}` }), el("div", { class: "table-scroll", tabindex: "0" }, t));
    }
    if (metrics.test) {
      const cm = confusionTable(metrics.test.confusion_matrix, classes);
      if (cm) sec.append(el("h4", { text: "Confusion matrix — test set" }), cm);
    }
    root.append(sec);
  }
  const external = externalSection(model); // beside the test metrics: the same model on other X-rays
  if (external) root.append(external);

  const figs = [
    figure(imgs.confusion_test, "Confusion matrix, test set", resolve),
    figure(imgs.confusion_val, "Confusion matrix, validation set", resolve),
    figure(imgs.curves, "Training curves (loss and accuracy per epoch)", resolve),
  ].filter(Boolean);
  if (figs.length) root.append(el("section", { class: "figures" }, el("h3", { text: "Figures" }), ...figs));
  const looks = gradcamSection(model, imgs, resolve);
  if (looks) root.append(looks);

  if (str(model.card_markdown)) {
    root.append(el("section", { class: "card-md" }, el("h3", { text: "Model card" }), el("div", { class: "markdown", html: renderMarkdown(model.card_markdown) })));
  }
  const limits = Array.isArray(app.limits) ? app.limits.filter((x) => str(x)) : [];
  if (limits.length) {
    root.append(
      el("section", { class: "limits" }, el("h3", { text: "Known limits of the data" }), el("ul", {}, ...limits.map((l) => el("li", { html: renderInline(l) })))),
    );
  }
  if (str(app.disclaimer)) root.append(el("p", { class: "disclaimer", text: app.disclaimer }));
}
