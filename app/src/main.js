// COVID X-ray research app: entry point. Plain DOM, no framework.
import { preprocess, colourfulness } from "./preprocess.js";
import { occlusionMap } from "./occlusion.js";
import { checkGuard } from "./guard.js";
import { AppError, inspectBytes, decodeToRgba } from "./image.js";
import { ensureLiteRt, getModel, runModel, bundleUrl, webGpuAvailable } from "./runtime.js";
import { el, pct, pctCi, mb, str, isNum, label } from "./ui/format.js";
import { renderModelPage } from "./ui/modelPage.js";
import { renderInline } from "./ui/markdown.js";
import { drawHeatmap } from "./ui/heatmap.js";

const $ = (id) => document.getElementById(id);

const DEFAULT_DISCLAIMER = "Research software, not a medical device: this is not a diagnosis.";

const state = {
  app: null,
  models: [],
  classes: [],
  selected: null, // model name
  accelerator: "wasm",
  pickSeq: 0,
  predictSeq: 0,
  pick: null, // {seq, rgba, width, height, canvas, guard, allowed, inputs: Map}
  last: null, // {seq, model, probs, input, size, channels, classIndex}
};

const timings = [];

window.covidApp = {
  preprocess: (rgba, width, height, size, channels = 1) => preprocess(rgba, width, height, size, channels),
  colourfulness,
  occlusionMap,
  timings,
  state,
};

// ---------------------------------------------------------------- helpers

function safe(fn) {
  return async (...args) => {
    try {
      await fn(...args);
    } catch (e) {
      console.error(e);
      if (e instanceof AppError) showError(e.kind, e.message);
      else showError("internal", `Something went wrong: ${e && e.message ? e.message : e}`);
    }
  };
}

function showError(kind, message) {
  const box = $("error");
  box.dataset.kind = kind;
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  const box = $("error");
  box.hidden = true;
  box.textContent = "";
  delete box.dataset.kind;
}

function setStatus(text) {
  $("status").textContent = text;
}

function modelByName(name) {
  return state.models.find((m) => m.name === name) || null;
}

function modelShape(m) {
  const size = Math.round(+m.input_size) || 224;
  const channels = Math.round(+m.channels) === 3 ? 3 : 1;
  return { size, channels };
}

function disclaimer() {
  return str(state.app && state.app.disclaimer, DEFAULT_DISCLAIMER);
}

// --------------------------------------------------------------- clearing

function clearResults() {
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

function clearCompare() {
  const t = $("compare-table");
  delete t.dataset.state;
  t.tHead.replaceChildren();
  t.tBodies[0].replaceChildren();
  $("compare-wrap").hidden = true;
}

function clearOod() {
  const w = $("ood-warning");
  w.hidden = true;
  delete w.dataset.score;
  delete w.dataset.reason;
  $("ood-text").textContent = "";
}

function clearPreview() {
  const img = $("preview");
  if (img.src && img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.removeAttribute("src");
  $("preview-wrap").hidden = true;
}

function clearAll() {
  clearError();
  clearResults();
  clearCompare();
  clearOod();
  clearPreview();
  $("compare-all").disabled = true;
  $("guard-notice").hidden = true;
  state.pick = null;
}

// ------------------------------------------------------------ model list

function renderModelList() {
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

// -------------------------------------------------------------- picking

function previewCanvas(rgba, width, height) {
  const c = document.createElement("canvas");
  c.width = width;
  c.height = height;
  c.getContext("2d").putImageData(new ImageData(new Uint8ClampedArray(rgba), width, height), 0, 0);
  return c;
}

async function handleFile(file) {
  const seq = ++state.pickSeq;
  clearAll();
  if (!file) {
    setStatus("Pick an image to see what each model says.");
    return;
  }
  setStatus("Reading the image…");
  let bytes;
  try {
    bytes = new Uint8Array(await file.arrayBuffer());
  } catch {
    throw new AppError("decode", "The file could not be read.");
  }
  if (seq !== state.pickSeq) return;
  try {
    inspectBytes(bytes); // throws empty / not-image / too-large before any decoding
  } catch (e) {
    setStatus("Pick another image.");
    throw e;
  }
  const type = bytes[0] === 0x89 ? "image/png" : "image/jpeg";
  const blob = new Blob([bytes], { type });
  let decoded;
  try {
    decoded = await decodeToRgba(blob);
  } catch (e) {
    setStatus("Pick another image.");
    throw e;
  }
  if (seq !== state.pickSeq) return;
  const { rgba, width, height } = decoded;
  const img = $("preview");
  img.src = URL.createObjectURL(blob);
  $("preview-wrap").hidden = false;
  state.pick = { seq, rgba, width, height, canvas: previewCanvas(rgba, width, height), guard: null, allowed: false, inputs: new Map() };

  // Out-of-distribution guard
  const guardCfg = state.app && state.app.guard && typeof state.app.guard === "object" ? state.app.guard : null;
  const notice = $("guard-notice");
  if (!guardCfg) {
    notice.textContent = "No out-of-distribution guard is available for this run: the models will classify any picture, even one that is not a chest X-ray.";
    notice.hidden = false;
    state.pick.allowed = true;
  } else {
    setStatus("Checking that this looks like a chest X-ray…");
    let g = null;
    try {
      g = await checkGuard({ rgba, width, height }, guardCfg, async (input, shape) => {
        const r = await runModel(guardCfg.file, "wasm", input, shape);
        return r.output;
      });
    } catch (e) {
      console.error("guard failed", e);
      g = null;
    }
    if (seq !== state.pickSeq) return;
    state.pick.guard = g;
    if (!g) {
      notice.textContent = "The X-ray guard could not run on this device, so this picture was not checked: make sure it is a frontal chest X-ray.";
      notice.hidden = false;
      state.pick.allowed = true;
    } else if (g.ood) {
      showOod(g);
      setStatus("Not classified: see the warning below.");
      $("compare-all").disabled = true;
      return;
    } else {
      notice.textContent = `X-ray guard: score ${fmtScore(g.score)} (threshold ${fmtScore(g.threshold)}), colour ${g.colour.toFixed(3)} (threshold ${fmtScore(g.colourThreshold)}): looks like a chest X-ray.`;
      notice.hidden = false;
      state.pick.allowed = true;
    }
  }
  $("compare-all").disabled = false;
  await predict({ scroll: true });
}

function fmtScore(x) {
  if (!isNum(x)) return "n/a";
  return Math.abs(x) >= 100 ? x.toFixed(1) : Math.abs(x) >= 1 ? x.toFixed(2) : x.toPrecision(3);
}

function showOod(g) {
  const w = $("ood-warning");
  w.dataset.score = String(g.score);
  w.dataset.reason = g.reason;
  const why =
    g.reason === "colour"
      ? `It is in colour (colourfulness ${g.colour.toFixed(3)}, limit ${fmtScore(g.colourThreshold)}), and X-rays are grayscale.`
      : `Its guard score is ${fmtScore(g.score)}, above the threshold of ${fmtScore(g.threshold)} (higher means less like the training X-rays).`;
  $("ood-text").textContent = `${why} Guard score ${fmtScore(g.score)}, threshold ${fmtScore(g.threshold)}.`;
  w.hidden = false;
}

async function classifyAnyway() {
  if (!state.pick) return;
  state.pick.allowed = true;
  clearOod();
  $("compare-all").disabled = false;
  const n = $("guard-notice");
  n.textContent = "Classified although the guard flagged this picture: treat the output with extra caution.";
  n.hidden = false;
  await predict();
}

// ------------------------------------------------------------ prediction

function inputFor(pick, m) {
  const { size, channels } = modelShape(m);
  const key = `${size}x${channels}`;
  if (!pick.inputs.has(key)) pick.inputs.set(key, preprocess(pick.rgba, pick.width, pick.height, size, channels));
  return { input: pick.inputs.get(key), size, channels };
}

async function infer(m, input, size, channels) {
  let r;
  try {
    r = await runModel(m.file, state.accelerator, input, [1, size, size, channels]);
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

async function predict(opts = {}) {
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
  timings.push({ model: m.name, ms: r.ms, first: r.first });
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

function className(i) {
  return state.classes[i] ?? `class ${i}`;
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

// --------------------------------------------------------------- compare

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

// --------------------------------------------------------------- heatmap

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
      async (x) => (await runModel(m.file, state.accelerator, x, [1, last.size, last.size, last.channels])).output,
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

// ---------------------------------------------------------------- routing

function route() {
  const h = location.hash || "#/";
  const views = { main: $("view-main"), model: $("view-model"), about: $("view-about") };
  let which = "main";
  if (h.startsWith("#/model/")) which = "model";
  else if (h.startsWith("#/about")) which = "about";
  for (const [k, v] of Object.entries(views)) v.hidden = k !== which;
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === which) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (!state.app) return;
  if (which === "model") {
    let name = "";
    try {
      name = decodeURIComponent(h.slice("#/model/".length));
    } catch {
      name = "";
    }
    renderModelPage($("model-page"), modelByName(name), state.app, bundleUrl);
    document.title = `${name} · COVID X-ray research app`;
    window.scrollTo(0, 0);
  } else if (which === "about") {
    renderAbout();
    document.title = "About · COVID X-ray research app";
    window.scrollTo(0, 0);
  } else {
    document.title = "COVID X-ray research app";
  }
}

function renderAbout() {
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
      { class: "table-scroll" },
      el(
        "table",
        { class: "metric-table" },
        el("caption", { text: "Images per split" }),
        el("thead", {}, el("tr", {}, el("th", { text: "" }), ...splits.map((s) => el("th", { scope: "col", text: s })))),
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
        )
      : el("p", { text: "No guard is available for this run: the models classify any picture, even one that is not a chest X-ray." }),
    el("h3", { text: "“Why this class?”" }),
    el("p", {
      text: "The heat map is occlusion sensitivity: the image is split into a grid; each cell in turn is covered with the average gray and the model is run again. Cells whose covering lowers the predicted class the most are brightest. It shows what the model relies on, which is not necessarily disease (it can be markers, text or borders).",
    }),
    limits.length ? el("h3", { text: "Known limits of the data" }) : null,
    limits.length ? el("ul", {}, ...limits.map((l) => el("li", { html: renderInline(l) }))) : null,
  );
}

// ---------------------------------------------------------------- startup

async function loadApp() {
  const res = await fetch(bundleUrl("./data/app.json"), { cache: "no-cache" });
  if (!res.ok) throw new Error(`data/app.json: HTTP ${res.status}`);
  const app = await res.json();
  if (!app || typeof app !== "object") throw new Error("data/app.json is not an object");
  return app;
}

function normaliseModels(app) {
  const list = Array.isArray(app.models) ? app.models : [];
  const models = list
    .filter((m) => m && typeof m === "object" && str(m.name) && str(m.file))
    .map((m) => ({ ...m }));
  models.sort((a, b) => (isNum(a.rank) ? a.rank : 1e9) - (isNum(b.rank) ? b.rank : 1e9));
  return models;
}

function registerServiceWorker() {
  if (!("serviceWorker" in navigator)) return;
  navigator.serviceWorker
    .register("./sw.js", { scope: "./" })
    .catch((e) => console.warn("service worker registration failed", e));
  navigator.serviceWorker.ready.then(() => {
    document.body.dataset.offline = "ready";
  });
}

async function start() {
  route();
  window.addEventListener("hashchange", route);
  for (const id of ["file-input", "camera-input"]) {
    const input = $(id);
    input.addEventListener(
      "change",
      safe(async () => {
        const file = input.files && input.files[0];
        try {
          await handleFile(file);
        } finally {
          input.value = ""; // picking the same file again fires "change"
        }
      }),
    );
  }
  $("classify-anyway").addEventListener("click", safe(classifyAnyway));
  $("compare-all").addEventListener("click", safe(compareAll));
  $("explain").addEventListener("click", safe(explain));
  if (webGpuAvailable()) {
    // Offer the GPU only when an adapter really exists (headless browsers expose
    // navigator.gpu without one). WASM stays the default: its results are exact.
    navigator.gpu
      .requestAdapter()
      .then((a) => {
        if (a) $("webgpu-toggle").hidden = false;
      })
      .catch(() => {});
    $("use-webgpu").addEventListener(
      "change",
      safe(async (ev) => {
        state.accelerator = ev.target.checked ? "webgpu" : "wasm";
        if (state.pick && state.pick.allowed) await predict();
      }),
    );
  }
  registerServiceWorker();

  try {
    state.app = await loadApp();
  } catch (e) {
    console.error(e);
    $("model-list").replaceChildren(el("p", { class: "muted", text: "Could not load the model list." }));
    showError("data", `The app data could not be loaded (${e.message}). Reload the page to try again.`);
    document.body.dataset.ready = "error";
    return;
  }
  const app = state.app;
  state.classes = Array.isArray(app.classes) ? app.classes.map(String) : [];
  state.models = normaliseModels(app);
  const champ = state.models.find((m) => m.champion === true) || state.models.find((m) => m.rank === 1) || state.models[0];
  state.selected = champ ? champ.name : null;
  $("disclaimer").textContent = disclaimer();
  $("footer-text").textContent = `${disclaimer()}${str(app.run_id) ? ` · run ${app.run_id}` : ""}`;
  renderModelList();
  route();
  document.body.dataset.ready = "true";

  // Warm up the runtime and the default model in the background (it is cached
  // by the service worker too); failures surface when the user picks an image.
  const warm = () => {
    ensureLiteRt()
      .then(() => champ && getModel(champ.file, state.accelerator))
      .catch((e) => console.warn("warm-up failed", e));
  };
  if ("requestIdleCallback" in window) requestIdleCallback(warm, { timeout: 2000 });
  else setTimeout(warm, 500);
}

start().catch((e) => {
  console.error(e);
  showError("internal", `The app failed to start: ${e && e.message ? e.message : e}`);
});
