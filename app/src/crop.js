// Pure edits of a picked image before it is classified: quarter turns, a small
// straightening rotation and a crop. Each takes and returns {rgba, width, height}
// (RGBA bytes, row-major); nothing here touches the DOM. The edited pixels are the
// ones the guard and the models see.

/** Rotate by quarter turns, clockwise (1 = 90 degrees clockwise, -1 = counter-clockwise). */
export function rotateQuarter(img, turns) {
  const t = ((Math.round(turns) % 4) + 4) % 4;
  const { rgba, width: w, height: h } = img;
  if (t === 0) return { rgba: new Uint8ClampedArray(rgba), width: w, height: h };
  const W = t === 2 ? w : h;
  const H = t === 2 ? h : w;
  const out = new Uint8ClampedArray(W * H * 4);
  for (let y = 0; y < H; y++) {
    for (let x = 0; x < W; x++) {
      // Source pixel of output (x, y).
      let sx;
      let sy;
      if (t === 1) {
        sx = y;
        sy = h - 1 - x;
      } else if (t === 2) {
        sx = w - 1 - x;
        sy = h - 1 - y;
      } else {
        sx = w - 1 - y;
        sy = x;
      }
      const s = (sy * w + sx) * 4;
      const o = (y * W + x) * 4;
      out[o] = rgba[s];
      out[o + 1] = rgba[s + 1];
      out[o + 2] = rgba[s + 2];
      out[o + 3] = rgba[s + 3];
    }
  }
  return { rgba: out, width: W, height: H };
}

/** Crop to the rectangle {x, y, w, h} in pixels (rounded, clamped to the image, at least 1 px);
 * `crop` in the result is the rectangle actually kept. */
export function cropRect(img, rect) {
  const { rgba, width, height } = img;
  const x0 = Math.min(Math.max(Math.round(rect.x), 0), width - 1);
  const y0 = Math.min(Math.max(Math.round(rect.y), 0), height - 1);
  const x1 = Math.min(Math.max(Math.round(rect.x + rect.w), x0 + 1), width);
  const y1 = Math.min(Math.max(Math.round(rect.y + rect.h), y0 + 1), height);
  const W = x1 - x0;
  const H = y1 - y0;
  const out = new Uint8ClampedArray(W * H * 4);
  for (let y = 0; y < H; y++) {
    const s = ((y0 + y) * width + x0) * 4;
    out.set(rgba.subarray(s, s + W * 4), y * W * 4);
  }
  return { rgba: out, width: W, height: H, crop: { x: x0, y: y0, w: W, h: H } };
}

/**
 * Straighten: rotate by `degrees` (clockwise, a tilted photo of a film) about the centre, bilinear,
 * the same size; corners that fall outside the picture are black. Crop them off afterwards.
 */
export function straighten(img, degrees) {
  const { rgba, width: w, height: h } = img;
  const out = new Uint8ClampedArray(w * h * 4);
  const a = (degrees * Math.PI) / 180;
  const cos = Math.cos(a);
  const sin = Math.sin(a);
  const cx = (w - 1) / 2;
  const cy = (h - 1) / 2;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      // Inverse mapping: the source point that lands on (x, y).
      const dx = x - cx;
      const dy = y - cy;
      const sx = cos * dx + sin * dy + cx;
      const sy = -sin * dx + cos * dy + cy;
      const o = (y * w + x) * 4;
      out[o + 3] = 255;
      if (sx < 0 || sy < 0 || sx > w - 1 || sy > h - 1) continue;
      const x0 = Math.floor(sx);
      const y0 = Math.floor(sy);
      const x1 = Math.min(x0 + 1, w - 1);
      const y1 = Math.min(y0 + 1, h - 1);
      const fx = sx - x0;
      const fy = sy - y0;
      for (let c = 0; c < 3; c++) {
        const p00 = rgba[(y0 * w + x0) * 4 + c];
        const p10 = rgba[(y0 * w + x1) * 4 + c];
        const p01 = rgba[(y1 * w + x0) * 4 + c];
        const p11 = rgba[(y1 * w + x1) * 4 + c];
        out[o + c] = (p00 * (1 - fx) + p10 * fx) * (1 - fy) + (p01 * (1 - fx) + p11 * fx) * fy;
      }
    }
  }
  return { rgba: out, width: w, height: h };
}
