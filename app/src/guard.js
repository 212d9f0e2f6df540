// Out-of-distribution guard: a colour check on the decoded pixels, the guard
// model's score, then the view check (frontal or not) on the same input.
// Pure decision logic here; the model run is injected.
import { colourfulness, preprocess } from "./preprocess.js";
import { viewCues, viewFlag } from "./view.js";

/**
 * @param {{rgba: Uint8ClampedArray, width: number, height: number}} img
 * @param {object|null} guard app.json "guard" entry
 * @param {(input: Float32Array, shape: number[]) => Promise<ArrayLike<number>>} runGuard
 * @returns {Promise<{available: boolean, ood: boolean, reason: string|null, score: number|null,
 *           threshold: number|null, colour: number, colourThreshold: number|null,
 *           view: {asymmetry: number, midline: number, asymmetryThreshold: number,
 *                  midlineThreshold: number, flagged: boolean}|null}>}
 *   reason: "colour", "score" or "view" (in that order); view null when the entry has no view check
 *   this page can run (the caller treats that as a guard that could not run: it fails closed).
 */
export async function checkGuard(img, guard, runGuard) {
  const colour = colourfulness(img.rgba, img.width, img.height);
  if (!guard || !guard.file) {
    return { available: false, ood: false, reason: null, score: null, threshold: null, colour, colourThreshold: null, view: null };
  }
  const colourThreshold = Number.isFinite(+guard.colour_threshold) ? +guard.colour_threshold : null;
  const threshold = Number.isFinite(+guard.threshold) ? +guard.threshold : null;
  const size = Math.round(+guard.input_size) || 128;
  const channels = Math.round(+guard.channels) || 1;
  const input = preprocess(img.rgba, img.width, img.height, size, channels);
  const out = await runGuard(input, [1, size, size, channels]);
  const score = out && out.length ? Number(out[0]) : NaN;
  let view = null;
  if (channels === 1 && size === 128) {
    const cues = viewCues(input);
    const flag = viewFlag(cues, guard.view);
    if (flag) view = { ...cues, ...flag };
  }
  let reason = null;
  if (colourThreshold !== null && colour > colourThreshold) reason = "colour";
  else if (threshold !== null && !(score <= threshold)) reason = "score"; // NaN counts as out of distribution
  else if (view && view.flagged) reason = "view";
  return { available: true, ood: reason !== null, reason, score, threshold, colour, colourThreshold, view };
}
