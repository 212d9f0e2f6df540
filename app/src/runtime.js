// LiteRT.js wrapper: one runtime, compiled models cached per (url, accelerator),
// runs serialised (one at a time) and timed. Model files are downloaded here
// (through the service worker, which keeps them), with progress reported to
// onDownload listeners. An ensemble (app.json entry with "members") runs its
// members' files and averages them as its Keras graph does.
import { loadLiteRt, loadAndCompile, Tensor } from "@litertjs/core";
import { resizeAntialias } from "./preprocess.js";

let liteRtPromise = null;
const compiled = new Map(); // key -> Promise<CompiledModel>
const runCounts = new Map(); // key -> number of runs done
let queue = Promise.resolve();

/** Resolve a bundle-relative path ("models/x.tflite") against the page. */
export function bundleUrl(path) {
  return new URL(String(path).replace(/^\/+/, ""), document.baseURI).href;
}

export function ensureLiteRt() {
  if (!liteRtPromise) {
    liteRtPromise = loadLiteRt(bundleUrl("./wasm/")).catch((e) => {
      liteRtPromise = null;
      throw e;
    });
  }
  return liteRtPromise;
}

export function webGpuAvailable() {
  return typeof navigator !== "undefined" && !!navigator.gpu;
}

const downloadListeners = new Set();
const downloads = new Map(); // path -> Promise<Uint8Array>

/** fn({path, label, loaded, total, done, error}) on each chunk of a model download. */
export function onDownload(fn) {
  downloadListeners.add(fn);
  return () => downloadListeners.delete(fn);
}

function report(info) {
  for (const fn of downloadListeners) {
    try {
      fn(info);
    } catch (e) {
      console.warn(e);
    }
  }
}

/** A bundle file's bytes, streamed so that its progress can be shown; `total` is the size app.json gives. */
export function downloadModel(path, { label = path, total = 0 } = {}) {
  if (!downloads.has(path)) {
    const p = (async () => {
      let res;
      try {
        res = await fetch(bundleUrl(path));
      } catch (e) {
        // Offline, and the service worker does not keep this file yet (never picked while online).
        throw new Error(`${label} is not on this device yet and the network is unreachable; connect once to download it (${(total / 1e6).toFixed(1)} MB), it is then kept for offline use`);
      }
      if (!res.ok) throw new Error(`${path}: HTTP ${res.status}`);
      const size = +res.headers.get("content-length") || +total || 0;
      if (!res.body || !res.body.getReader) return new Uint8Array(await res.arrayBuffer());
      const reader = res.body.getReader();
      const chunks = [];
      let loaded = 0;
      report({ path, label, loaded, total: size, done: false });
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        chunks.push(value);
        loaded += value.length;
        report({ path, label, loaded, total: size, done: false });
      }
      const bytes = new Uint8Array(loaded);
      let at = 0;
      for (const c of chunks) {
        bytes.set(c, at);
        at += c.length;
      }
      report({ path, label, loaded, total: size || loaded, done: true });
      return bytes;
    })();
    downloads.set(path, p);
    p.catch((e) => {
      downloads.delete(path);
      report({ path, label, loaded: 0, total: 0, done: true, error: String((e && e.message) || e) });
    });
  }
  return downloads.get(path);
}

/** Load + compile lazily; cached. Rejections are not cached (retry possible). */
export function getModel(path, accelerator = "wasm", info = {}) {
  const key = `${accelerator}|${path}`;
  if (!compiled.has(key)) {
    const p = (async () => {
      const [bytes] = await Promise.all([downloadModel(path, info), ensureLiteRt()]);
      downloads.delete(path); // compiled now: the bytes need not stay in memory
      return loadAndCompile(bytes, { accelerator });
    })();
    compiled.set(key, p);
    p.catch(() => compiled.delete(key));
  }
  return compiled.get(key);
}

function serial(fn) {
  const next = queue.then(fn, fn);
  queue = next.catch(() => {});
  return next;
}

/**
 * Run a model on a float32 NHWC input. Returns {output: Float32Array, ms, first}.
 * ms covers the model run and reading the output back, not preprocessing.
 */
export function runModel(path, accelerator, input, shape, info = {}) {
  return serial(async () => {
    const model = await getModel(path, accelerator, info);
    const key = `${accelerator}|${path}`;
    const first = !runCounts.get(key);
    let inTensor = null;
    let outs = null;
    try {
      inTensor = new Tensor(input, shape);
      const t0 = performance.now();
      outs = await model.run(inTensor);
      let out = outs[0];
      if (out.accelerator !== "wasm") {
        const moved = await out.moveTo("wasm");
        outs[0] = moved;
        out = moved;
      }
      const output = Float32Array.from(out.toTypedArray());
      const ms = performance.now() - t0;
      runCounts.set(key, (runCounts.get(key) || 0) + 1);
      return { output, ms, first };
    } finally {
      if (inTensor && !inTensor.deleted) inTensor.delete();
      if (outs) for (const t of outs) if (t && !t.deleted) t.delete();
    }
  });
}

const EPS = 1e-7; // as the Python side clips probabilities before a temperature

/** The files a model entry needs: its own, or its members' for an ensemble. */
export function modelParts(m) {
  if (Array.isArray(m.members) && m.members.length) {
    return m.members.map((x) => ({ file: x.file, size: Math.round(+x.input_size), bytes: x.bytes, label: `${m.name}: ${x.name}` }));
  }
  return [{ file: m.file, size: Math.round(+m.input_size), bytes: m.bytes, label: m.name }];
}

/** Download and compile every file of a model entry (warm-up). */
export function prepareEntry(m, accelerator = "wasm") {
  return Promise.all(modelParts(m).map((p) => getModel(p.file, accelerator, { label: p.label, total: p.bytes })));
}

/**
 * Run a model entry on a float32 NHWC input of its own size. An ensemble: each
 * member on the input resized to its size (antialiased bilinear, unrounded, as
 * the Keras graph's fixed resize matrices), the mean of their probabilities,
 * then the ensemble's temperature: softmax(log(clip(p, 1e-7, 1)) / T).
 * Returns {output, ms, first} (ms: the model runs only).
 */
export async function runEntry(m, accelerator, input, shape) {
  const parts = modelParts(m);
  if (!(Array.isArray(m.members) && m.members.length)) {
    return runModel(m.file, accelerator, input, shape, { label: m.name, total: m.bytes });
  }
  const [, size, , channels] = shape;
  let sum = null;
  let ms = 0;
  let first = false;
  for (const p of parts) {
    const x = p.size === size ? input : resizeAntialias(input, size, size, channels, p.size, p.size);
    const r = await runModel(p.file, accelerator, x, [1, p.size, p.size, channels], { label: p.label, total: p.bytes });
    if (!sum) sum = new Float64Array(r.output.length);
    if (r.output.length !== sum.length) throw new Error(`ensemble member ${p.file} returned ${r.output.length} values`);
    for (let i = 0; i < sum.length; i++) sum[i] += r.output[i];
    ms += r.ms;
    first = first || r.first;
  }
  let p = Array.from(sum, (v) => v / parts.length);
  const t = +m.temperature;
  if (Number.isFinite(t) && t > 0 && Math.abs(t - 1) > 1e-9) {
    const z = p.map((v) => Math.log(Math.min(1, Math.max(EPS, v))) / t);
    const top = Math.max(...z);
    const e = z.map((v) => Math.exp(v - top));
    const total = e.reduce((a, b) => a + b, 0);
    p = e.map((v) => v / total);
  }
  return { output: Float32Array.from(p), ms, first };
}
