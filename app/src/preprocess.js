// Pure preprocessing that reproduces the Python pipeline bit for bit:
//   tf.io.decode_image(bytes, channels=C)
//   -> tf.image.resize((S, S), method="bilinear", antialias=True)
//   -> tf.round (half to even) -> clip 0..255 -> float32 [1, S, S, C]
// The resize is TF's ScaleAndTranslate with the triangle kernel and antialias
// (tensorflow/core/kernels/image/scale_and_translate_op.cc), done in float32.
// TF gathers rows (vertical pass) first into a float intermediate, then
// columns; that order was checked to match TF exactly (max diff 0.0).
// No DOM here: everything works on plain typed arrays.

const f = Math.fround;

/**
 * Span weights for one axis: input length n -> output length s.
 * @returns {{starts: Int32Array, ends: Int32Array, weights: Float32Array[]}}
 */
export function computeSpans(n, s) {
  const scale = f(f(s) / f(n));
  const invScale = f(1 / scale);
  const kernelScale = f(Math.max(invScale, 1));
  const oneOverKernelScale = f(1 / kernelScale);
  const starts = new Int32Array(s);
  const ends = new Int32Array(s);
  const weights = [];
  for (let x = 0; x < s; x++) {
    const sample = f(f(x + 0.5) * invScale);
    let start = Math.ceil(f(f(sample - kernelScale) - 0.5));
    let end = Math.floor(f(f(sample + kernelScale) - 0.5));
    start = Math.min(Math.max(start, 0), n - 1);
    end = Math.min(Math.max(end, 0), n - 1) + 1;
    const w = new Float32Array(end - start);
    let total = 0;
    for (let j = start; j < end; j++) {
      const pos = f(f(j + 0.5) - sample);
      const a = Math.abs(f(pos * oneOverKernelScale));
      const k = a < 1 ? f(1 - a) : 0;
      w[j - start] = k;
      total = f(total + k);
    }
    if (Math.abs(total) >= 1000 * 1.1754943508222875e-38) {
      const inv = f(1 / total);
      for (let i = 0; i < w.length; i++) w[i] = f(w[i] * inv);
    }
    starts[x] = start;
    ends[x] = end;
    weights.push(w);
  }
  return { starts, ends, weights };
}

/** Round half to even (tf.round / numpy.round). */
export function roundHalfEven(v) {
  const fl = Math.floor(v);
  const d = v - fl;
  if (d < 0.5) return fl;
  if (d > 0.5) return fl + 1;
  return fl % 2 === 0 ? fl : fl + 1;
}

/**
 * RGBA bytes -> planar-free interleaved channels (Float32Array, h*w*channels)
 * channels 1: round(0.299 R + 0.587 G + 0.114 B) (== R for gray images); 3: RGB.
 */
export function toChannels(rgba, width, height, channels) {
  const n = width * height;
  const out = new Float32Array(n * channels);
  if (channels === 1) {
    for (let i = 0; i < n; i++) {
      const r = rgba[4 * i], g = rgba[4 * i + 1], b = rgba[4 * i + 2];
      out[i] = r === g && g === b ? r : Math.min(255, roundHalfEven(0.299 * r + 0.587 * g + 0.114 * b));
    }
  } else if (channels === 3) {
    for (let i = 0; i < n; i++) {
      out[3 * i] = rgba[4 * i];
      out[3 * i + 1] = rgba[4 * i + 1];
      out[3 * i + 2] = rgba[4 * i + 2];
    }
  } else {
    throw new Error(`unsupported channel count ${channels}`);
  }
  return out;
}

/**
 * Antialiased bilinear (triangle kernel) resize of an interleaved float image,
 * rows first then columns, all float32. Returns unrounded float32 values.
 */
export function resizeAntialias(src, width, height, channels, outW, outH) {
  const rows = computeSpans(height, outH);
  const cols = computeSpans(width, outW);
  // Vertical pass: [outH, width, C]
  const rowLen = width * channels;
  const mid = new Float32Array(outH * rowLen);
  for (let y = 0; y < outH; y++) {
    const w = rows.weights[y];
    const base = y * rowLen;
    for (let k = 0; k < w.length; k++) {
      const wk = w[k];
      const inBase = (rows.starts[y] + k) * rowLen;
      for (let i = 0; i < rowLen; i++) {
        mid[base + i] = f(mid[base + i] + f(wk * src[inBase + i]));
      }
    }
  }
  // Horizontal pass: [outH, outW, C]
  const out = new Float32Array(outH * outW * channels);
  for (let y = 0; y < outH; y++) {
    const inRow = y * rowLen;
    for (let x = 0; x < outW; x++) {
      const w = cols.weights[x];
      const s0 = cols.starts[x];
      const o = (y * outW + x) * channels;
      for (let c = 0; c < channels; c++) {
        let acc = 0;
        for (let k = 0; k < w.length; k++) {
          acc = f(acc + f(w[k] * mid[inRow + (s0 + k) * channels + c]));
        }
        out[o + c] = acc;
      }
    }
  }
  return out;
}

/**
 * Full pipeline. rgba: Uint8ClampedArray/Uint8Array (width*height*4).
 * @returns {Float32Array} size*size*channels values in 0..255 (integers), NHWC with N=1.
 */
export function preprocess(rgba, width, height, size, channels = 1) {
  if (!(width > 0 && height > 0)) throw new Error("empty image");
  if (rgba.length < width * height * 4) throw new Error("pixel buffer too short");
  size = Math.round(size);
  channels = Math.round(channels);
  const src = toChannels(rgba, width, height, channels);
  const resized =
    width === size && height === size ? src : resizeAntialias(src, width, height, channels, size, size);
  for (let i = 0; i < resized.length; i++) {
    const v = roundHalfEven(resized[i]);
    resized[i] = v < 0 ? 0 : v > 255 ? 255 : v;
  }
  return resized;
}

/** Mean over pixels of (max(R,G,B) - min(R,G,B)) / 255 on RGBA bytes. */
export function colourfulness(rgba, width, height) {
  const n = width * height;
  if (!n) return 0;
  let sum = 0;
  for (let i = 0; i < n; i++) {
    const r = rgba[4 * i], g = rgba[4 * i + 1], b = rgba[4 * i + 2];
    sum += Math.max(r, g, b) - Math.min(r, g, b);
  }
  return sum / n / 255;
}
