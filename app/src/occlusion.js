// Occlusion sensitivity, computed on the device (no gradients).
// For each of the G x G cells of the preprocessed input, fill the cell with the
// mean value of the input, re-run the model and record
//   heat = max(0, p_cls(original) - p_cls(occluded)).
// Pure: the model is passed in as an async function (Float32Array -> probs).

/** Cell bounds along an axis of length size split in grid parts: [start, end). */
export function cellBounds(size, grid, i) {
  return [Math.floor((i * size) / grid), Math.floor(((i + 1) * size) / grid)];
}

/** Mean of all values of the input (all pixels and channels). */
export function meanValue(input) {
  let s = 0;
  for (let i = 0; i < input.length; i++) s += input[i];
  return input.length ? s / input.length : 0;
}

/** A copy of input (size x size x channels) with cell (row, col) filled with value. */
export function occludeCell(input, size, channels, grid, row, col, value) {
  const out = new Float32Array(input);
  const [y0, y1] = cellBounds(size, grid, row);
  const [x0, x1] = cellBounds(size, grid, col);
  for (let y = y0; y < y1; y++) {
    for (let x = x0; x < x1; x++) {
      const o = (y * size + x) * channels;
      for (let c = 0; c < channels; c++) out[o + c] = value;
    }
  }
  return out;
}

/**
 * @param {Float32Array} input preprocessed input, size*size*channels
 * @param {(x: Float32Array) => Promise<ArrayLike<number>>} predict
 * @param {{size:number, channels:number, grid?:number, classIndex:number, baseProb:number,
 *          onProgress?: (done:number, total:number) => void, isCancelled?: () => boolean}} opts
 * @returns {Promise<number[]>} grid*grid heat values, row-major
 */
export async function occlusionMap(input, predict, opts) {
  const { size, channels, classIndex, baseProb } = opts;
  const grid = Math.max(1, Math.min(size, Math.round(opts.grid || 8)));
  const fill = meanValue(input);
  const heat = new Array(grid * grid).fill(0);
  const total = grid * grid;
  for (let r = 0; r < grid; r++) {
    for (let c = 0; c < grid; c++) {
      if (opts.isCancelled && opts.isCancelled()) throw new Error("cancelled");
      const occluded = occludeCell(input, size, channels, grid, r, c, fill);
      const p = await predict(occluded);
      heat[r * grid + c] = Math.max(0, baseProb - p[classIndex]);
      if (opts.onProgress) opts.onProgress(r * grid + c + 1, total);
    }
  }
  return heat;
}
