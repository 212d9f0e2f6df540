// The models run here, in a worker, off the page's main thread: compiling LiteRT.js'
// WebAssembly runtime and a model, and each run, take hundreds of milliseconds on a
// phone, and on the main thread they would freeze taps, scrolling and the download
// progress bar; so would receiving a model file's megabytes. A classic worker (bundled
// as an IIFE): LiteRT.js loads its WASM glue with importScripts there.
//
// Messages in: {id, type: "init", wasm}
//              | {id, type: "compile", key, path, url, label, total, accelerator, wasm}
//              | {id, type: "run", key, input, shape}
//              | {id, type: "webgpu"} (result: whether a WebGPU adapter exists in this worker)
// Messages out: {id, result} or {id, error} (a message string), and
//               {progress: {path, label, loaded, total, done, error?}} while a file downloads.
import { loadLiteRt, loadAndCompile, Tensor } from "@litertjs/core";

let liteRt = null;
const models = new Map(); // key -> Promise<CompiledModel>

function ensureLiteRt(wasm) {
  if (!liteRt) {
    // In a worker, Emscripten looks for the .wasm file beside the worker's script rather than
    // beside its own glue script (wasm/): LiteRT.js hands self.Module to the glue's factory, so
    // its locateFile points it at the folder the page gave.
    // Its C++ logs go to stderr, which Emscripten writes with console.error: routed by level, so
    // that "INFO:" lines are not reported as errors.
    self.Module = {
      locateFile: (file) => new URL(file, wasm).href,
      printErr: (text) => (/^INFO:/.test(text) ? console.debug : /^WARNING:/.test(text) ? console.warn : console.error)(text),
    };
    liteRt = loadLiteRt(wasm).catch((e) => {
      liteRt = null;
      throw e;
    });
  }
  return liteRt;
}

const downloads = new Map(); // path -> Promise<Uint8Array>, until compiled

function progress(info) {
  self.postMessage({ progress: info });
}

/** A bundle file's bytes, streamed so that its progress can be shown; `total` is the size app.json gives. */
function download(path, url, label, total) {
  if (!downloads.has(path)) {
    const p = (async () => {
      let res;
      try {
        res = await fetch(url);
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
      let shown = 0;
      progress({ path, label, loaded, total: size, done: false });
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        chunks.push(value);
        loaded += value.length;
        if (loaded - shown >= size / 100) {
          // at most a hundred updates of the bar
          shown = loaded;
          progress({ path, label, loaded, total: size, done: false });
        }
      }
      const bytes = new Uint8Array(loaded);
      let at = 0;
      for (const c of chunks) {
        bytes.set(c, at);
        at += c.length;
      }
      progress({ path, label, loaded, total: size || loaded, done: true });
      return bytes;
    })();
    downloads.set(path, p);
    p.catch((e) => {
      downloads.delete(path);
      progress({ path, label, loaded: 0, total: 0, done: true, error: String((e && e.message) || e) });
    });
  }
  return downloads.get(path);
}

async function compile({ key, path, url, label, total, accelerator, wasm }) {
  try {
    const [bytes] = await Promise.all([download(path, url, label, total), ensureLiteRt(wasm)]);
    const p = loadAndCompile(bytes, { accelerator });
    models.set(key, p);
    p.catch(() => {
      if (models.get(key) === p) models.delete(key);
    });
    await p;
    return null;
  } finally {
    // Compiled, or failed: either way the bytes need not stay (a retry downloads them again).
    downloads.delete(path);
  }
}

// One model run on a float32 NHWC input: {output, ms}; ms covers the run and reading
// the output back.
async function run({ key, input, shape }) {
  const model = await models.get(key);
  if (!model) throw new Error(`model ${key} is not compiled`);
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
    return { output, ms: performance.now() - t0 };
  } finally {
    if (inTensor && !inTensor.deleted) inTensor.delete();
    if (outs) for (const t of outs) if (t && !t.deleted) t.delete();
  }
}

/** Whether a model could run on the GPU here, in the worker (its navigator, not the page's). */
async function webgpu() {
  if (!self.navigator || !self.navigator.gpu) return false;
  try {
    return !!(await self.navigator.gpu.requestAdapter());
  } catch (e) {
    return false;
  }
}

const handlers = { init: ({ wasm }) => ensureLiteRt(wasm).then(() => null), compile, run, webgpu };

self.onmessage = async (event) => {
  const { id, type, ...msg } = event.data || {};
  try {
    if (!handlers[type]) throw new Error(`unknown request ${type}`);
    const result = await handlers[type](msg);
    self.postMessage({ id, result }, result && result.output ? [result.output.buffer] : []);
  } catch (e) {
    const name = e && e.name && e.name !== "Error" ? `${e.name}: ` : "";
    self.postMessage({ id, error: `${name}${String((e && e.message) || e)}` });
  }
};
