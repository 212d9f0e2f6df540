// The result card: the selected model's prediction, "Compare all models" and
// the "Why this class?" occlusion heat map, all on the current pick.
import { occlusionMap } from "../occlusion.js";
import { preprocess } from "../preprocess.js";
import { AppError } from "../image.js";
import { runEntry } from "../runtime.js";
import { $, el, pct, label } from "../ui/format.js";
import { drawHeatmap } from "../ui/heatmap.js";
import { safe, showError, clearError, setStatus } from "../ui/status.js";
import { state, timings, modelByName, modelShape, className } from "../state.js";

// ---------------------------------------------------------------- clearing

export function clearResults() {
  const r = $("results");
  r.hidden = true;
  delete r.dataset.state;
  delete r.dataset.model;
  delete r.dataset.inferMs;
  $("prob-rows").replaceChildren();
  $("predicted").textContent = "";
  delete $("predicted").dataset.predicted;
  $("result-meta").textContent = "";
  state.last = null;
  $("explain").disabled = true;
  clearHeatmap();
}

function clearHeatmap() {
  const c = $("heatmap");
  delete c.dataset.state;
  delete c.dataset.grid;
  delete c.dataset.model;
  c.width = 0;
  c.height = 0;
  $("heatmap-status").textContent = "";
  $("heatmap-wrap").hidden = true;
}

export function clearCompare() {
  const t = $("compare-table");
  delete t.dataset.state;
  t.tHead.replaceChildren();
  t.tBodies[0].replaceChildren();
  $("compare-wrap").hidden = true;
}

// -------------------------------------------------------------- prediction

function inputFor(pick, m) {
  const { size, channels } = modelShape(m);
  const key = `${size}x${channels}`;
  if (!pick.inputs.has(key)) pick.inputs.set(key, preprocess(pick.rgba, pick.width, pick.height, size, channels));
  return { input: pick.inputs.get(key), size, channels };
}

async function infer(m, input, size, channels) {
  let r;
  try {
    r = await runEntry(m, state.accelerator, input, [1, size, size, channels]);
  } catch (e) {
    console.error(e);
    throw new AppError("model", `The model “${m.name}” could not be loaded or run on this device (${e && e.message ? e.message : e}).`);
  }
  const n = state.classes.length;
  if (n && r.output.length !== n) {
    throw new AppError("model", `The model “${m.name}” returned ${r.output.length} values, expected ${n} classes.`);
  }
  return r;
}

export async function predict(opts = {}) {
  const pick = state.pick;
  const m = modelByName(state.selected);
  if (!pick || !pick.allowed || !m) return;
  const seq = ++state.predictSeq;
  clearResults();
  clearError();
  const r0 = $("results");
  r0.dataset.state = "running";
  setStatus(`Running ${m.name} on this device…`);
  const { input, size, channels } = inputFor(pick, m);
  let r;
  try {
    r = await infer(m, input, size, channels);
  } catch (e) {
    if (seq === state.predictSeq && pick === state.pick) {
      delete r0.dataset.state;
      setStatus("The model could not run.");
    }
    throw e;
  }
  if (seq !== state.predictSeq || pick !== state.pick) return;
  timings.push({ model: m.name, ms: r.ms, first: r.first, at: Date.now() }); // at: when the result is drawn
  renderResults(m, r.output, r.ms);
  state.last = { model: m.name, probs: r.output, input, size, channels, classIndex: argmax(r.output) };
  $("explain").disabled = false;
  setStatus("");
  if (opts.scroll && window.matchMedia("(max-width: 700px)").matches) {
    $("result-card").scrollIntoView({ behavior: "smooth", block: "start" });
  }
}

function argmax(a) {
  let k = 0;
  for (let i = 1; i < a.length; i++) if (a[i] > a[k]) k = i;
  return k;
}

function renderResults(m, probs, ms) {
  const r = $("results");
  const rows = $("prob-rows");
  rows.replaceChildren();
  const k = argmax(probs);
  for (let i = 0; i < probs.length; i++) {
    const p = probs[i];
    const width = Math.max(0, Math.min(100, p * 100));
    rows.append(
      el(
        "div",
        { class: `prob-row${i === k ? " top" : ""}`, "data-class": className(i), "data-prob": String(p) },
        el("span", { class: "prob-label" }, label(className(i))),
        el(
          "span",
          { class: "bar", role: "meter", "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": width.toFixed(1), "aria-label": `${className(i)} probability` },
          el("span", { class: "fill", style: `width:${width.toFixed(2)}%` }),
        ),
        el("span", { class: "prob-value", text: pct(p) }),
      ),
    );
  }
  const pred = $("predicted");
  pred.dataset.predicted = className(k);
  pred.replaceChildren(el("span", { class: "muted", text: "Model output: " }), el("strong", {}, label(className(k))), ` (${pct(probs[k])})`);
  $("result-meta").textContent = `${m.name} · ${Math.round(ms)} ms on this device (${state.accelerator === "webgpu" ? "GPU" : "CPU"})`;
  r.dataset.model = m.name;
  r.dataset.inferMs = String(ms);
  r.dataset.state = "done";
  r.hidden = false;
}

// ----------------------------------------------------------------- compare

async function compareAll() {
  const pick = state.pick;
  if (!pick || !pick.allowed) return;
  clearCompare();
  const t = $("compare-table");
  t.dataset.state = "running";
  $("compare-wrap").hidden = false;
  t.tHead.append(el("tr", {}, el("th", { scope: "col", text: "Model" }), ...state.classes.map((c) => el("th", { scope: "col" }, label(c)))));
  const body = t.tBodies[0];
  const btn = $("compare-all");
  btn.disabled = true;
  let failed = [];
  try {
    for (const m of state.models) {
      if (pick !== state.pick) return;
      const row = el("tr", { "data-model": m.name }, el("th", { scope: "row" }, m.name, m.champion ? el("span", { class: "champion-star", title: "champion", "aria-label": "champion", text: " ★" }) : null));
      const cells = state.classes.map((c) => el("td", { "data-class": c, text: "…" }));
      row.append(...cells);
      body.append(row);
      setStatus(`Comparing: running ${m.name}…`);
      try {
        const { input, size, channels } = inputFor(pick, m);
        const r = await infer(m, input, size, channels);
        if (pick !== state.pick) return;
        timings.push({ model: m.name, ms: r.ms, first: r.first });
        const k = argmax(r.output);
        cells.forEach((td, i) => {
          td.dataset.prob = String(r.output[i]);
          td.textContent = pct(r.output[i]);
          if (i === k) td.classList.add("top");
        });
        row.dataset.inferMs = String(r.ms);
      } catch (e) {
        console.error(e);
        failed.push(m.name);
        row.classList.add("failed");
        cells.forEach((td) => (td.textContent = "failed"));
      }
    }
    if (pick !== state.pick) return;
    t.dataset.state = "done";
    if (failed.length) {
      showError("model", `These models could not be loaded or run on this device: ${failed.join(", ")}.`);
      setStatus("Comparison done, with errors.");
    } else {
      setStatus("Comparison done: all models ran on this device.");
    }
  } finally {
    btn.disabled = !state.pick || !state.pick.allowed;
  }
}

// ----------------------------------------------------------------- heatmap

async function explain() {
  const last = state.last;
  const pick = state.pick;
  if (!last || !pick) return;
  const m = modelByName(last.model);
  if (!m) return;
  clearHeatmap();
  const canvas = $("heatmap");
  const wrap = $("heatmap-wrap");
  const status = $("heatmap-status");
  wrap.hidden = false;
  canvas.dataset.state = "running";
  canvas.dataset.model = m.name;
  const grid = Math.max(1, Math.min(32, Math.round(+(state.app.heatmap && state.app.heatmap.grid)) || 8));
  const btn = $("explain");
  btn.disabled = true;
  const stale = () => state.last !== last || state.pick !== pick;
  status.textContent = `Computing: 0 / ${grid * grid} passes…`;
  try {
    const heat = await occlusionMap(
      last.input,
      async (x) => (await runEntry(m, state.accelerator, x, [1, last.size, last.size, last.channels])).output,
      {
        size: last.size,
        channels: last.channels,
        grid,
        classIndex: last.classIndex,
        baseProb: last.probs[last.classIndex],
        isCancelled: stale,
        onProgress: (done, total) => {
          if (!stale()) status.textContent = `Computing: ${done} / ${total} passes…`;
        },
      },
    );
    if (stale()) return;
    drawHeatmap(canvas, pick.canvas, pick.width, pick.height, heat, grid);
    canvas.dataset.grid = JSON.stringify(heat);
    canvas.dataset.state = "done";
    status.textContent = `Areas that most support “${className(last.classIndex)}” for ${m.name} (${grid}×${grid} occlusion, computed on this device).`;
  } catch (e) {
    if (stale()) return;
    console.error(e);
    canvas.dataset.state = "error";
    status.textContent = `The heat map could not be computed for ${m.name} on this device (${e && e.message ? e.message : e}). Nothing was uploaded.`;
  } finally {
    btn.disabled = !state.last;
  }
}

export function wireResults() {
  $("compare-all").addEventListener("click", safe(compareAll));
  $("explain").addEventListener("click", safe(explain));
}
