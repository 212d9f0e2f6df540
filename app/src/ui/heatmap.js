// Draw an occlusion heat grid as a semi-transparent overlay over the image.

// A short "inferno"-like ramp: transparent dark purple -> red -> yellow.
const STOPS = [
  [0.0, [20, 11, 52]],
  [0.35, [120, 28, 109]],
  [0.6, [214, 66, 54]],
  [0.8, [250, 150, 20]],
  [1.0, [252, 255, 164]],
];

export function colourFor(t) {
  t = Math.min(1, Math.max(0, t));
  for (let i = 1; i < STOPS.length; i++) {
    if (t <= STOPS[i][0]) {
      const [t0, c0] = STOPS[i - 1];
      const [t1, c1] = STOPS[i];
      const u = (t - t0) / (t1 - t0 || 1);
      return c0.map((v, k) => Math.round(v + (c1[k] - v) * u));
    }
  }
  return STOPS[STOPS.length - 1][1];
}

/**
 * @param {HTMLCanvasElement} canvas
 * @param {CanvasImageSource} image the picked image (drawn as the background)
 * @param {number[]} heat grid*grid values
 * @param {number} grid
 */
export function drawHeatmap(canvas, image, imgW, imgH, heat, grid) {
  const maxSide = 512;
  const k = Math.min(1, maxSide / Math.max(imgW, imgH));
  const w = Math.max(1, Math.round(imgW * k));
  const h = Math.max(1, Math.round(imgH * k));
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(image, 0, 0, w, h);
  const max = Math.max(...heat, 0);
  const small = document.createElement("canvas");
  small.width = grid;
  small.height = grid;
  const sctx = small.getContext("2d");
  const img = sctx.createImageData(grid, grid);
  for (let i = 0; i < grid * grid; i++) {
    const t = max > 0 ? heat[i] / max : 0;
    const [r, g, b] = colourFor(t);
    img.data[4 * i] = r;
    img.data[4 * i + 1] = g;
    img.data[4 * i + 2] = b;
    img.data[4 * i + 3] = Math.round(40 + 160 * t); // more opaque where it matters
  }
  sctx.putImageData(img, 0, 0);
  // Bilinear upscale: sample at cell centres (crop half a cell on each edge of the source).
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "low"; // plain bilinear
  ctx.drawImage(small, 0, 0, grid, grid, 0, 0, w, h);
  return max;
}
