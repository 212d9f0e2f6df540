// COVID X-ray research app: entry point. Plain DOM, no framework. Wires the
// screens (screens/*), the router and the shared state, then loads app.json.
import { preprocess, colourfulness } from "./preprocess.js";
import { occlusionMap } from "./occlusion.js";
import { ensureLiteRt, getModel, prepareEntry } from "./runtime.js";
import { wireDownloads } from "./ui/download.js";
import { wireLungs } from "./ui/outline.js";
import { $, el, str } from "./ui/format.js";
import { showError } from "./ui/status.js";
import { state, timings, disclaimer, loadApp, normaliseModels } from "./state.js";
import { route } from "./router.js";
import { wirePick } from "./screens/pick.js";
import { wireResults } from "./screens/results.js";
import { renderModelList, wireModels } from "./screens/models.js";

window.covidApp = {
  preprocess: (rgba, width, height, size, channels = 1) => preprocess(rgba, width, height, size, channels),
  colourfulness,
  occlusionMap,
  timings,
  state,
};

// Registered once the first visit's warm-up has downloaded the runtime, the guard
// and the default model: the worker's install then revalidates those files
// (HTTP cache, ETag) instead of downloading them a second time.
function registerServiceWorker() {
  if (!("serviceWorker" in navigator)) return;
  navigator.serviceWorker
    .register("./sw.js", { scope: "./" })
    .catch((e) => console.warn("service worker registration failed", e));
  navigator.serviceWorker.ready.then(() => {
    document.body.dataset.offline = "ready";
  });
}

async function start() {
  route();
  window.addEventListener("hashchange", route);
  wirePick();
  wireResults();
  wireModels();
  wireDownloads();
  wireLungs();

  try {
    state.app = await loadApp();
  } catch (e) {
    console.error(e);
    $("model-list").replaceChildren(el("p", { class: "muted", text: "Could not load the model list." }));
    showError("data", `The app data could not be loaded (${e.message}). Reload the page to try again.`);
    document.body.dataset.ready = "error";
    return;
  }
  const app = state.app;
  state.classes = Array.isArray(app.classes) ? app.classes.map(String) : [];
  state.models = normaliseModels(app);
  const champ = state.models.find((m) => m.champion === true) || state.models.find((m) => m.rank === 1) || state.models[0];
  state.selected = champ ? champ.name : null;
  $("disclaimer").textContent = disclaimer();
  $("footer-text").textContent = `${disclaimer()}${str(app.run_id) ? ` · run ${app.run_id}` : ""}`;
  renderModelList();
  route();
  document.body.dataset.ready = "true";
  if (navigator.serviceWorker && navigator.serviceWorker.controller) registerServiceWorker(); // a later visit

  // Warm up the runtime, the guard and the default model in the background
  // (then kept by the service worker); failures surface when the user picks an image.
  const guard = app.guard && typeof app.guard === "object" && str(app.guard.file) ? app.guard : null;
  const warm = () => {
    Promise.all([
      ensureLiteRt(),
      guard ? getModel(guard.file, "wasm", { label: "the X-ray check" }) : null,
      champ ? prepareEntry(champ, state.accelerator) : null,
    ])
      .catch((e) => console.warn("warm-up failed", e))
      .finally(() => {
        if (!(navigator.serviceWorker && navigator.serviceWorker.controller)) registerServiceWorker();
      });
  };
  if ("requestIdleCallback" in window) requestIdleCallback(warm, { timeout: 2000 });
  else setTimeout(warm, 500);
}

start().catch((e) => {
  console.error(e);
  showError("internal", `The app failed to start: ${e && e.message ? e.message : e}`);
});
