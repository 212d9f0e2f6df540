// LiteRT.js, run in a worker (inference-worker.js) so that downloading, compiling
// and running a model never blocks the page: one runtime, compiled models cached
// per (url, accelerator), runs serialised (one at a time) and timed. The worker
// downloads model files (through the service worker, which keeps them) and reports
// their progress, passed on to onDownload listeners here. An ensemble
// (app.json entry with "members") runs its members' files and averages them as its
// Keras graph does.
import { resizeAntialias } from "./preprocess.js";

let liteRtPromise = null;
const compiled = new Map(); // key -> Promise<key>, once the worker has compiled it
const runCounts = new Map(); // key -> number of runs done
let queue = Promise.resolve();

/** Resolve a bundle-relative path ("models/x.tflite") against the page. */
export function bundleUrl(path) {
  return new URL(String(path).replace(/^\/+/, ""), document.baseURI).href;
}

let worker = null;
let nextId = 1;
const pending = new Map(); // request id -> {resolve, reject}

function inferenceWorker() {
  if (!worker) {
    worker = new Worker(bundleUrl("./inference-worker.js"));
    worker.onmessage = (event) => {
      const { id, result, error, progress } = event.data || {};
      if (progress) return report(progress);
      const p = pending.get(id);
      if (!p) return;
      pending.delete(id);
      if (error !== undefined) p.reject(new Error(error));
      else p.resolve(result);
    };
    worker.onerror = (event) => {
      // The worker's script did not load, or an error escaped it (its runtime's state is then unknown):
      // it is ended, every request fails with the reason, and the next one starts a new worker.
      event.preventDefault();
      resetWorker(`the model runner stopped: ${event.message || "inference-worker.js could not be loaded"}`);
    };
    worker.onmessageerror = () => resetWorker("the model runner sent a message the page could not read");
  }
  return worker;
}

function resetWorker(why) {
  if (worker) worker.terminate(); // its runtime, models and GPU device go with it
  worker = null;
  const e = new Error(why);
  for (const p of pending.values()) p.reject(e);
  pending.clear();
  liteRtPromise = null;
  compiled.clear();
  runCounts.clear();
}

function call(type, msg = {}) {
  return new Promise((resolve, reject) => {
    const id = nextId++;
    pending.set(id, { resolve, reject });
    try {
      inferenceWorker().postMessage({ id, type, ...msg });
    } catch (e) {
      pending.delete(id); // no worker here (or the message cannot be sent)
      reject(e);
    }
  });
}

export function ensureLiteRt() {
  if (!liteRtPromise) {
    const p = call("init", { wasm: bundleUrl("./wasm/") }).catch((e) => {
      if (liteRtPromise === p) liteRtPromise = null;
      throw e;
    });
    liteRtPromise = p;
  }
  return liteRtPromise;
}

/** Resolves true when the worker that runs the models gets a WebGPU adapter; false otherwise, never rejects. */
export function webGpuAvailable() {
  return call("webgpu").then(Boolean, () => false);
}

const downloadListeners = new Set();

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

/**
 * Download (with progress, through the service worker, which keeps the file) and compile lazily, both in
 * the worker: the page's main thread never handles a model's bytes. Cached; rejections are not cached
 * (retry possible). `info`: {label, total}, what the progress bar and the offline message say.
 */
export function getModel(path, accelerator = "wasm", info = {}) {
  const key = `${accelerator}|${path}`;
  if (!compiled.has(key)) {
    const { label = path, total = 0 } = info;
    // The worker loads its runtime while the file downloads.
    const msg = { key, path, url: bundleUrl(path), label, total, accelerator, wasm: bundleUrl("./wasm/") };
    const p = call("compile", msg).then(() => key);
    compiled.set(key, p);
    p.catch(() => {
      if (compiled.get(key) === p) compiled.delete(key); // not a newer attempt's
    });
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
    const key = await getModel(path, accelerator, info);
    const first = !runCounts.get(key);
    const { output, ms } = await call("run", { key, input, shape });
    runCounts.set(key, (runCounts.get(key) || 0) + 1);
    return { output, ms, first };
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
