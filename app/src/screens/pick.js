// The pick card: reading a chosen or photographed image, the out-of-distribution
// guard and its warning, then handing over to the prediction.
import { checkGuard } from "../guard.js";
import { cropRect, rotateQuarter, straighten } from "../crop.js";
import { AppError, inspectBytes, pngBlob, readPicked } from "../image.js";
import { runModel } from "../runtime.js";
import { $, fmtScore, str } from "../ui/format.js";
import { clearLungs, showLungs } from "../ui/outline.js";
import { safe, clearError, setStatus } from "../ui/status.js";
import { state } from "../state.js";
import { clearResults, clearCompare, predict } from "./results.js";

// ---------------------------------------------------------------- clearing

function clearOod() {
  const w = $("ood-warning");
  w.hidden = true;
  delete w.dataset.score;
  delete w.dataset.reason;
  delete w.dataset.asymmetry;
  delete w.dataset.midline;
  $("ood-text").textContent = "";
}

function clearPreview() {
  const img = $("preview");
  if (img.src && img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.removeAttribute("src");
  $("preview-wrap").hidden = true;
}

function clearAll() {
  clearEdits();
  clearError();
  clearResults();
  clearCompare();
  clearOod();
  clearLungs();
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
  resetEdits({ rgba, width, height });
  await analyse(seq, { rgba, width, height }, blob);
}

// The guard and the prediction on a picked (or edited) image: its pixels are the ones classified.
async function analyse(seq, { rgba, width, height }, blob) {
  const img = $("preview");
  if (img.src && img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  if (blob) img.src = URL.createObjectURL(blob);
  $("preview-wrap").hidden = false;
  $("edit-bar").hidden = false;
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
      else if (!g.ood && !g.view) why = "this release's guard has no view check this page can run (frontal or not)";
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
  notice.textContent =
    `X-ray guard: score ${fmtScore(g.score)} (threshold ${fmtScore(g.threshold)}), colour ${g.colour.toFixed(3)} (threshold ${fmtScore(g.colourThreshold)}), ` +
    `view: asymmetry ${fmtScore(g.view.asymmetry)} (limit ${fmtScore(g.view.asymmetryThreshold)}), midline ${fmtScore(g.view.midline)} (limit ${fmtScore(g.view.midlineThreshold)}): looks like a frontal chest X-ray.`;
  notice.hidden = false;
  state.pick.allowed = true;
  $("compare-all").disabled = false;
  await predict({ scroll: true });
  await showLungs(state.pick); // after the first result: its file is not needed before
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
    if (g.view) {
      w.dataset.asymmetry = String(g.view.asymmetry);
      w.dataset.midline = String(g.view.midline);
    }
    $("ood-title").textContent =
      g.reason === "view"
        ? "This looks like a lateral or other view, not a frontal chest X-ray."
        : "This does not look like a frontal chest X-ray.";
    $("ood-text").textContent = `${oodWhat(g)} Guard score ${fmtScore(g.score)}, threshold ${fmtScore(g.threshold)}.`;
  }
  w.hidden = false;
}

function oodWhat(g) {
  if (g.reason === "colour") return `It is in colour (colourfulness ${g.colour.toFixed(3)}, limit ${fmtScore(g.colourThreshold)}), and X-rays are grayscale.`;
  if (g.reason === "view") {
    const v = g.view;
    // Say which cue failed (either may, or both); NaN cues fail too, as in checkGuard.
    const why = [];
    if (!(v.asymmetry <= v.asymmetryThreshold)) {
      why.push(`its left and right halves differ more than a frontal film's do (asymmetry ${fmtScore(v.asymmetry)}, at most ${fmtScore(v.asymmetryThreshold)})`);
    }
    if (!(v.midline >= v.midlineThreshold)) {
      why.push(`it lacks a frontal film's bright midline (spine and heart) between two darker lung fields (midline ${fmtScore(v.midline)}, at least ${fmtScore(v.midlineThreshold)})`);
    }
    return `The app expects a frontal (PA or AP) chest X-ray, and this looks like a lateral or other view: ${why.join("; and ") || "its view check failed"}.`;
  }
  return `Its guard score is ${fmtScore(g.score)}, above the threshold of ${fmtScore(g.threshold)} (higher means less like the training X-rays).`;
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
  await showLungs(state.pick);
}

// ------------------------------------------------------------ crop and rotate
// A photo of a film or a screen has borders and a tilt: quarter turns, a
// straightening angle and a crop, each undoable, before the picture is checked
// and classified again. Edits work on the decoded pixels (src/crop.js).

const edits = { original: null, current: null, undo: [] };
let cropDrag = null;

function resetEdits(image) {
  edits.original = image;
  edits.current = image;
  edits.undo = [];
  $("straighten").value = "0";
  updateEditButtons();
}

function clearEdits() {
  edits.original = edits.current = null;
  edits.undo = [];
  endCrop();
  $("edit-bar").hidden = true;
}

function updateEditButtons() {
  const editing = edits.current !== null;
  $("edit-undo").disabled = !editing || edits.undo.length === 0;
  $("edit-reset").disabled = !editing || edits.undo.length === 0;
  $("edit-bar").dataset.edits = String(edits.undo.length);
  if (edits.current) $("edit-bar").dataset.size = `${edits.current.width}x${edits.current.height}`;
}

async function show(image, what) {
  const seq = ++state.pickSeq;
  clearError();
  clearResults();
  clearCompare();
  clearOod();
  clearLungs();
  $("compare-all").disabled = true;
  $("guard-notice").hidden = true;
  edits.current = image;
  updateEditButtons();
  if (image.crop) $("edit-bar").dataset.crop = JSON.stringify(image.crop);
  setStatus(`${what}: checking the picture again…`);
  const blob = await pngBlob(image.rgba, image.width, image.height);
  if (seq !== state.pickSeq) return;
  await analyse(seq, image, blob);
}

async function applyEdit(what, fn) {
  if (!edits.current) return;
  endCrop();
  edits.undo.push(edits.current);
  await show(fn(edits.current), what);
}

async function undoEdit() {
  if (!edits.undo.length) return;
  endCrop();
  await show(edits.undo.pop(), "Undone");
}

async function resetEdit() {
  if (!edits.original || !edits.undo.length) return;
  endCrop();
  edits.undo = [];
  $("straighten").value = "0";
  await show(edits.original, "Back to the picked image");
}

// Crop: drag a rectangle on the preview, then "Apply crop".
function imagePoint(ev) {
  const img = $("preview");
  const r = img.getBoundingClientRect();
  const sx = edits.current.width / r.width;
  const sy = edits.current.height / r.height;
  return {
    x: Math.min(Math.max((ev.clientX - r.left) * sx, 0), edits.current.width),
    y: Math.min(Math.max((ev.clientY - r.top) * sy, 0), edits.current.height),
  };
}

function drawCropBox() {
  const box = $("crop-box");
  const img = $("preview");
  if (!cropDrag || !cropDrag.rect) {
    box.hidden = true;
    return;
  }
  const r = img.getBoundingClientRect();
  const wrap = $("preview-wrap").getBoundingClientRect();
  const k = r.width / edits.current.width;
  const { x, y, w, h } = cropDrag.rect;
  Object.assign(box.style, {
    left: `${r.left - wrap.left + x * k}px`,
    top: `${r.top - wrap.top + y * k}px`,
    width: `${w * k}px`,
    height: `${h * k}px`,
  });
  box.hidden = false;
}

function startCrop() {
  if (!edits.current) return;
  cropDrag = { rect: null, from: null };
  $("preview-wrap").classList.add("cropping");
  $("crop-start").setAttribute("aria-pressed", "true");
  $("crop-apply").hidden = false;
  $("crop-apply").disabled = true;
  setStatus("Drag across the picture to choose what to keep, then apply the crop.");
}

function endCrop() {
  cropDrag = null;
  $("crop-box").hidden = true;
  $("preview-wrap").classList.remove("cropping");
  $("crop-start").setAttribute("aria-pressed", "false");
  $("crop-apply").hidden = true;
}

/** For tests and keyboard-free use: set the crop rectangle in image pixels. */
export function setCropRect(rect) {
  if (!cropDrag) startCrop();
  cropDrag.rect = rect;
  $("crop-apply").disabled = !(rect.w >= 8 && rect.h >= 8);
  drawCropBox();
}

function wireEdits() {
  $("rotate-left").addEventListener("click", safe(() => applyEdit("Rotated", (im) => rotateQuarter(im, -1))));
  $("rotate-right").addEventListener("click", safe(() => applyEdit("Rotated", (im) => rotateQuarter(im, 1))));
  $("straighten").addEventListener(
    "change",
    safe(() => {
      const deg = Number($("straighten").value);
      if (!deg) return undefined;
      $("straighten").value = "0";
      return applyEdit(`Straightened by ${deg} degrees`, (im) => straighten(im, deg));
    }),
  );
  $("crop-start").addEventListener("click", () => (cropDrag ? endCrop() : startCrop()));
  $("crop-apply").addEventListener(
    "click",
    safe(() => {
      const rect = cropDrag && cropDrag.rect;
      if (!rect) return undefined;
      return applyEdit("Cropped", (im) => cropRect(im, rect));
    }),
  );
  $("edit-undo").addEventListener("click", safe(undoEdit));
  $("edit-reset").addEventListener("click", safe(resetEdit));
  const img = $("preview");
  img.addEventListener("pointerdown", (ev) => {
    if (!cropDrag) return;
    ev.preventDefault();
    img.setPointerCapture(ev.pointerId);
    cropDrag.from = imagePoint(ev);
    cropDrag.rect = null;
  });
  img.addEventListener("pointermove", (ev) => {
    if (!cropDrag || !cropDrag.from) return;
    const p = imagePoint(ev);
    const f = cropDrag.from;
    setCropRect({ x: Math.min(f.x, p.x), y: Math.min(f.y, p.y), w: Math.abs(p.x - f.x), h: Math.abs(p.y - f.y) });
  });
  img.addEventListener("pointerup", () => {
    if (cropDrag) cropDrag.from = null;
  });
}

export function wirePick() {
  wireEdits();
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
