// LiteRT.js wrapper: one runtime, compiled models cached per (url, accelerator),
// runs serialised (one at a time) and timed.
import { loadLiteRt, loadAndCompile, Tensor } from "@litertjs/core";

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

/** Load + compile lazily; cached. Rejections are not cached (retry possible). */
export function getModel(path, accelerator = "wasm") {
  const key = `${accelerator}|${path}`;
  if (!compiled.has(key)) {
    const p = (async () => {
      await ensureLiteRt();
      return loadAndCompile(bundleUrl(path), { accelerator });
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
export function runModel(path, accelerator, input, shape) {
  return serial(async () => {
    const model = await getModel(path, accelerator);
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
