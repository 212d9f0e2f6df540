// A model's figures on X-rays from elsewhere (the bundle's `external` list per model): a negative
// set's COVID false-alarm rate (every image is known not to be COVID, so every COVID call is a
// false alarm), per finding folder too, and a labelled set's accuracy; each with its 95% interval
// and the model's own test figure beside it.
import { el, pct, ci, pctCi, str, isNum } from "./format.js";

const sets = (model) => (Array.isArray(model && model.external) ? model.external.filter((e) => e && typeof e === "object") : []);
const isNegative = (e) => e.set_kind === "negative";

/** One line per negative set for the model list: "COVID false alarms on <set>: 2.1% (95% CI …)". */
export function falseAlarmStats(model) {
  return sets(model)
    .filter(isNegative)
    .map((e) =>
      el(
        "span",
        { class: "false-alarm", title: str(e.about) },
        `COVID false alarms on ${str(e.name, "a negative set")} `,
        el("b", { text: pctCi(e.false_alarm_rate, e.false_alarm_ci95) }),
      ),
    );
}

function findingTable(perFinding) {
  const names = Object.keys(perFinding || {});
  if (!names.length) return null;
  const head = ["Finding folder", "Images", "Called COVID", "95% CI"];
  return el(
    "div",
    { class: "table-scroll", tabindex: "0" },
    el(
      "table",
      { class: "metric-table per-finding" },
      el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { scope: "col", text: h })))),
      el(
        "tbody",
        {},
        ...names.map((f) => {
          const r = perFinding[f] || {};
          return el(
            "tr",
            { "data-finding": f },
            el("th", { scope: "row", text: f }),
            el("td", { text: isNum(r.n) ? String(r.n) : "—" }),
            el("td", { text: pct(r.false_alarm_rate) }),
            el("td", { text: ci(r.false_alarm_ci95) || "—" }),
          );
        }),
      ),
    ),
  );
}

function negativeFacts(e) {
  const called = isNum(e.covid_predicted) && isNum(e.n) ? `${e.covid_predicted} of ${e.n} images called COVID` : "";
  return [
    el("dt", { text: "COVID false alarms" }),
    el("dd", { class: "false-alarm-rate", text: [pctCi(e.false_alarm_rate, e.false_alarm_ci95), called].filter(Boolean).join(" — ") }),
    el("dt", { text: "On its own test split" }),
    el("dd", { text: `${pctCi(e.test_false_alarm_rate, e.test_false_alarm_ci95)} of the non-COVID images called COVID` }),
  ];
}

function labelledFacts(e) {
  return [
    el("dt", { text: "Accuracy" }),
    el("dd", { text: pctCi(e.accuracy, e.accuracy_ci95) }),
    el("dt", { text: "COVID sensitivity" }),
    el("dd", { text: pctCi(e.covid_sensitivity, e.covid_sensitivity_ci95) }),
    el("dt", { text: "Images (n)" }),
    el("dd", { text: isNum(e.n) ? String(e.n) : "—" }),
  ];
}

/** The model page's "On X-rays from elsewhere" section, or null when the run scored no external set. */
export function externalSection(model) {
  const list = sets(model);
  if (!list.length) return null;
  const sec = el("section", { class: "external" }, el("h3", { text: "On X-rays from elsewhere" }));
  for (const e of list) {
    sec.append(
      el("h4", { text: str(e.name, "External set") }),
      str(e.about) ? el("p", { class: "external-about", text: e.about }) : null,
      el("dl", { class: "facts" }, ...(isNegative(e) ? negativeFacts(e) : labelledFacts(e))),
    );
    if (isNegative(e)) {
      const t = findingTable(e.per_finding);
      if (t) sec.append(t);
    }
  }
  sec.append(el("p", { class: "table-note", text: "A negative set holds only X-rays known not to be COVID: the share the model calls COVID is its false-alarm rate there. Ranges are 95% confidence intervals." }));
  return sec;
}
