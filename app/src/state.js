// The app's shared state: loaded app.json, models, selection and the current
// pick. One object that every screen reads and writes (and tests inspect as
// window.covidApp.state), so no screen keeps its own copy that could go stale.
import { str, isNum } from "./ui/format.js";
import { bundleUrl } from "./runtime.js";

const DEFAULT_DISCLAIMER = "Research software, not a medical device: this is not a diagnosis.";

export const state = {
  app: null,
  models: [],
  classes: [],
  selected: null, // model name
  accelerator: "wasm",
  pickSeq: 0,
  predictSeq: 0,
  pick: null, // {seq, rgba, width, height, canvas, guard, allowed, inputs: Map}
  last: null, // {seq, model, probs, input, size, channels, classIndex}
};

// One entry per prediction and compare run, exposed to benchmarks.
export const timings = [];

export function modelByName(name) {
  return state.models.find((m) => m.name === name) || null;
}

export function modelShape(m) {
  const size = Math.round(+m.input_size) || 224;
  const channels = Math.round(+m.channels) === 3 ? 3 : 1;
  return { size, channels };
}

export function className(i) {
  return state.classes[i] ?? `class ${i}`;
}

export function disclaimer() {
  return str(state.app && state.app.disclaimer, DEFAULT_DISCLAIMER);
}

export async function loadApp() {
  const res = await fetch(bundleUrl("./data/app.json"), { cache: "no-cache" });
  if (!res.ok) throw new Error(`data/app.json: HTTP ${res.status}`);
  const app = await res.json();
  if (!app || typeof app !== "object") throw new Error("data/app.json is not an object");
  return app;
}

/** An ensemble's entry: no file of its own, members that each name a file and an input size. */
function validMembers(m) {
  return (
    Array.isArray(m.members) &&
    m.members.length > 0 &&
    m.members.every((x) => x && typeof x === "object" && str(x.file) && Number.isFinite(+x.input_size))
  );
}

export function normaliseModels(app) {
  const list = Array.isArray(app.models) ? app.models : [];
  const models = list
    .filter((m) => m && typeof m === "object" && str(m.name) && (str(m.file) || validMembers(m)))
    .map((m) => ({ ...m }));
  models.sort((a, b) => (isNum(a.rank) ? a.rank : 1e9) - (isNum(b.rank) ? b.rank : 1e9));
  return models;
}

/** What the about and model pages say when the release has no guard (it fails closed). */
export function guardUnavailable(app) {
  const why = str(app && app.guard_note, "this release has no guard model");
  return `The X-ray check is unavailable in this release (${why}). Every picture waits for your confirmation that it is a frontal chest X-ray before any result is shown.`;
}
