// Out-of-distribution guard: a colour check on the decoded pixels plus the
// guard model's score. Pure decision logic here; the model run is injected.
import { colourfulness, preprocess } from "./preprocess.js";

/**
 * @param {{rgba: Uint8ClampedArray, width: number, height: number}} img
 * @param {object|null} guard app.json "guard" entry
 * @param {(input: Float32Array, shape: number[]) => Promise<ArrayLike<number>>} runGuard
 * @returns {Promise<{available: boolean, ood: boolean, reason: string|null, score: number|null,
 *           threshold: number|null, colour: number, colourThreshold: number|null}>}
 */
export async function checkGuard(img, guard, runGuard) {
  const colour = colourfulness(img.rgba, img.width, img.height);
  if (!guard || !guard.file) {
    return { available: false, ood: false, reason: null, score: null, threshold: null, colour, colourThreshold: null };
  }
  const colourThreshold = Number.isFinite(+guard.colour_threshold) ? +guard.colour_threshold : null;
  const threshold = Number.isFinite(+guard.threshold) ? +guard.threshold : null;
  const size = Math.round(+guard.input_size) || 128;
  const channels = Math.round(+guard.channels) || 1;
  const input = preprocess(img.rgba, img.width, img.height, size, channels);
  const out = await runGuard(input, [1, size, size, channels]);
  const score = out && out.length ? Number(out[0]) : NaN;
  let reason = null;
  if (colourThreshold !== null && colour > colourThreshold) reason = "colour";
  else if (threshold !== null && !(score <= threshold)) reason = "score"; // NaN counts as out of distribution
  return { available: true, ood: reason !== null, reason, score, threshold, colour, colourThreshold };
}
