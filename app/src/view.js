// The view check (covid_app/view.py, line for line): does the guard's 128 px grey
// input look like a frontal (PA or AP) chest film? 4x4 block sums, then two cues
// computed in integers and divided once, so the page and Python agree bit for bit:
//   asymmetry = sum |B[i][j] - B[i][31-j]| / S   (a frontal film is mirror-symmetric)
//   midline   = 32 * (contrast(columns) - contrast(rows)) / (nC * nL * S)
//     contrast = nL * centre band - nC * lateral bands (a bright spine between dark lungs,
//     and not the same across the rows, as in a turned film).
// No DOM here.

export const VIEW_VERSION = 1;
const SIZE = 128;
const BLOCK = 4;
const GRID = SIZE / BLOCK;
const CENTRE = [14, 18];
const LATERAL = [
  [5, 11],
  [21, 27],
];

/** GRID*GRID block sums (row-major) of a SIZE*SIZE single-channel input (integer values). */
export function blockSums(input) {
  if (!input || input.length !== SIZE * SIZE) throw new Error(`the view check needs a ${SIZE}x${SIZE} grey input`);
  const b = new Array(GRID * GRID).fill(0);
  for (let y = 0; y < SIZE; y++) {
    const row = ((y / BLOCK) | 0) * GRID;
    for (let x = 0; x < SIZE; x++) b[row + ((x / BLOCK) | 0)] += Math.round(input[y * SIZE + x]);
  }
  return b;
}

// Sum of the band lo..hi-1 across columns (byRows false) or across rows (byRows true).
function band(b, lo, hi, byRows) {
  let s = 0;
  for (let i = 0; i < GRID; i++) for (let j = lo; j < hi; j++) s += byRows ? b[j * GRID + i] : b[i * GRID + j];
  return s;
}

/**
 * @param {ArrayLike<number>} input SIZE*SIZE grey values (the guard's input, integers 0..255)
 * @returns {{asymmetry: number, midline: number}}
 */
export function viewCues(input) {
  const b = blockSums(input);
  let s = 0;
  let diff = 0;
  for (let i = 0; i < GRID; i++) {
    for (let j = 0; j < GRID; j++) {
      s += b[i * GRID + j];
      diff += Math.abs(b[i * GRID + j] - b[i * GRID + GRID - 1 - j]);
    }
  }
  if (s === 0) return { asymmetry: Infinity, midline: -Infinity }; // all black: no cues, flagged
  const nC = CENTRE[1] - CENTRE[0];
  const nL = LATERAL.reduce((a, [lo, hi]) => a + hi - lo, 0);
  const contrast = (byRows) =>
    nL * band(b, CENTRE[0], CENTRE[1], byRows) - nC * LATERAL.reduce((a, [lo, hi]) => a + band(b, lo, hi, byRows), 0);
  const num = GRID * (contrast(false) - contrast(true));
  return { asymmetry: diff / s, midline: num / (nC * nL * s) };
}

/**
 * The guard's "view" entry (app.json) applied to cues. A missing or unknown-version
 * entry gives null (no view check); a NaN cue counts as flagged.
 * @returns {{flagged: boolean, asymmetryThreshold: number, midlineThreshold: number}|null}
 */
export function viewFlag(cues, view) {
  if (!view || typeof view !== "object" || +view.version !== VIEW_VERSION) return null;
  const a = +view.asymmetry_threshold;
  const m = +view.midline_threshold;
  if (!Number.isFinite(a) || !Number.isFinite(m)) return null;
  const flagged = !(cues.asymmetry <= a) || !(cues.midline >= m);
  return { flagged, asymmetryThreshold: a, midlineThreshold: m };
}
