// Small DOM + formatting helpers.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "html") node.innerHTML = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export const isNum = (x) => typeof x === "number" && Number.isFinite(x);

export function pct(x, digits = 1) {
  return isNum(x) ? `${(x * 100).toFixed(digits)}%` : "—";
}

export function ci(c, digits = 1) {
  if (!Array.isArray(c) || c.length < 2 || !isNum(c[0]) || !isNum(c[1])) return "";
  return `${(c[0] * 100).toFixed(digits)}–${pct(c[1], digits)}`;
}

/** "89.6% (95% CI 86.0–92.1%)" or "89.6%" */
export function pctCi(x, c) {
  const s = ci(c);
  return s ? `${pct(x)} (95% CI ${s})` : pct(x);
}

export function num(x, digits = 3) {
  return isNum(x) ? x.toFixed(digits) : "—";
}

export function mb(bytes) {
  return isNum(bytes) && bytes > 0 ? `${(bytes / 1e6).toFixed(1)} MB` : "size unknown";
}

export function str(x, fallback = "") {
  return typeof x === "string" && x.trim() ? x : fallback;
}

/**
 * A class name as shown: the dataset's exact name ("Lung_Opacity"), with a
 * line-break opportunity after each underscore so narrow tables can wrap it.
 */
export function label(name) {
  const parts = String(name).split("_");
  const frag = document.createDocumentFragment();
  parts.forEach((p, i) => {
    if (i > 0) frag.append("_", document.createElement("wbr"));
    frag.append(p);
  });
  return frag;
}

export const $ = (id) => document.getElementById(id);

/** A guard score or threshold: a few significant digits whatever its scale. */
export function fmtScore(x) {
  if (!isNum(x)) return "n/a";
  return Math.abs(x) >= 100 ? x.toFixed(1) : Math.abs(x) >= 1 ? x.toFixed(2) : x.toPrecision(3);
}
