// The pick card: reading a chosen or photographed image, the out-of-distribution
// guard and its warning, then handing over to the prediction.
import { checkGuard } from "../guard.js";
import { AppError, inspectBytes, readPicked } from "../image.js";
import { runModel } from "../runtime.js";
import { $, fmtScore, str } from "../ui/format.js";
import { safe, clearError, setStatus } from "../ui/status.js";
import { state } from "../state.js";
import { clearResults, clearCompare, predict } from "./results.js";

// ---------------------------------------------------------------- clearing

function clearOod() {
  const w = $("ood-warning");
  w.hidden = true;
  delete w.dataset.score;
  delete w.dataset.reason;
  $("ood-text").textContent = "";
}

function clearPreview() {
  const img = $("preview");
  if (img.src && img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.removeAttribute("src");
  $("preview-wrap").hidden = true;
}

function clearAll() {
  clearError();
  clearResults();
  clearCompare();
  clearOod();
  clearPreview();
  $("compare-all").disabled = true;
  $("guard-notice").hidden = true;
  state.pick = null;
}

// ----------------------------------------------------------------- picking

function previewCanvas(rgba, width, height) {
  const c = document.createElement("canvas");
  c.width = width;
  c.height = height;
  c.getContext("2d").putImageData(new ImageData(new Uint8ClampedArray(rgba), width, height), 0, 0);
  return c;
}

async function handleFile(file) {
  const seq = ++state.pickSeq;
  clearAll();
  if (!file) {
    setStatus("Pick an image to see what each model says.");
    return;
  }
  setStatus("Reading the image…");
  let bytes;
  try {
    bytes = new Uint8Array(await file.arrayBuffer());
  } catch {
    throw new AppError("decode", "The file could not be read.");
  }
  if (seq !== state.pickSeq) return;
  let checked;
  try {
    checked = inspectBytes(bytes); // throws empty / not-image / too-large before any decoding
  } catch (e) {
    setStatus("Pick another image.");
    throw e;
  }
  let decoded;
  try {
    decoded = await readPicked(bytes, checked); // PNG/JPEG (EXIF upright) or DICOM, to RGBA
  } catch (e) {
    setStatus("Pick another image.");
    throw e;
  }
  if (seq !== state.pickSeq) return;
  const { rgba, width, height, blob } = decoded;
  const img = $("preview");
  if (blob) img.src = URL.createObjectURL(blob);
  $("preview-wrap").hidden = false;
  state.pick = { seq, rgba, width, height, canvas: previewCanvas(rgba, width, height), guard: null, guardError: null, allowed: false, inputs: new Map() };

  // Out-of-distribution guard. It fails closed: a picture the guard could not
  // check waits for the user's confirmation, exactly as a flagged one does.
  const guardCfg = state.app && state.app.guard && typeof state.app.guard === "object" ? state.app.guard : null;
  let g = null;
  let why = null;
  if (!guardCfg) {
    why = str(state.app && state.app.guard_note, "this release has no guard model");
  } else {
    setStatus("Checking that this looks like a chest X-ray…");
    try {
      g = await checkGuard({ rgba, width, height }, guardCfg, async (input, shape) => {
        const r = await runModel(guardCfg.file, "wasm", input, shape);
        return r.output;
      });
      if (!g.available) why = "this release's guard entry names no guard file";
    } catch (e) {
      console.error("guard failed", e);
      why = `the guard model failed on this device (${(e && e.message) || e})`;
    }
    if (seq !== state.pickSeq) return;
  }
  state.pick.guard = g;
  state.pick.guardError = why;
  if (why !== null || g.ood) {
    showOod(g, why);
    setStatus("Not classified yet: see the warning below.");
    $("compare-all").disabled = true;
    return;
  }
  const notice = $("guard-notice");
  notice.textContent = `X-ray guard: score ${fmtScore(g.score)} (threshold ${fmtScore(g.threshold)}), colour ${g.colour.toFixed(3)} (threshold ${fmtScore(g.colourThreshold)}): looks like a chest X-ray.`;
  notice.hidden = false;
  state.pick.allowed = true;
  $("compare-all").disabled = false;
  await predict({ scroll: true });
}

function showOod(g, why) {
  const w = $("ood-warning");
  if (why !== null) {
    // The check could not run: say so and why; the same confirmation is asked.
    w.dataset.reason = "unavailable";
    $("ood-title").textContent = "The X-ray check could not run, so this picture was not checked.";
    $("ood-text").textContent = `Why: ${why}. Only go on if this is a frontal chest X-ray.`;
  } else {
    w.dataset.score = String(g.score);
    w.dataset.reason = g.reason;
    const what =
      g.reason === "colour"
        ? `It is in colour (colourfulness ${g.colour.toFixed(3)}, limit ${fmtScore(g.colourThreshold)}), and X-rays are grayscale.`
        : `Its guard score is ${fmtScore(g.score)}, above the threshold of ${fmtScore(g.threshold)} (higher means less like the training X-rays).`;
    $("ood-title").textContent = "This does not look like a frontal chest X-ray.";
    $("ood-text").textContent = `${what} Guard score ${fmtScore(g.score)}, threshold ${fmtScore(g.threshold)}.`;
  }
  w.hidden = false;
}

async function classifyAnyway() {
  if (!state.pick) return;
  state.pick.allowed = true;
  clearOod();
  $("compare-all").disabled = false;
  const n = $("guard-notice");
  n.textContent = state.pick.guardError
    ? `Classified without the X-ray check (${state.pick.guardError}): treat the output with extra caution.`
    : "Classified although the guard flagged this picture: treat the output with extra caution.";
  n.hidden = false;
  await predict();
}

export function wirePick() {
  for (const id of ["file-input", "camera-input"]) {
    const input = $(id);
    input.addEventListener(
      "change",
      safe(async () => {
        const file = input.files && input.files[0];
        try {
          await handleFile(file);
        } finally {
          input.value = ""; // picking the same file again fires "change"
        }
      }),
    );
  }
  $("classify-anyway").addEventListener("click", safe(classifyAnyway));
}
