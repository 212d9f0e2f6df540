// Hash routes: #/ classify, #/model/<name>, #/about. Shows one view, marks the
// nav link, and renders the page from state (once app.json is loaded).
import { bundleUrl } from "./runtime.js";
import { $ } from "./ui/format.js";
import { state, modelByName } from "./state.js";
import { renderModelPage } from "./screens/model-page.js";
import { renderAbout } from "./screens/about.js";

export function route() {
  const h = location.hash || "#/";
  const views = { main: $("view-main"), model: $("view-model"), about: $("view-about") };
  let which = "main";
  if (h.startsWith("#/model/")) which = "model";
  else if (h.startsWith("#/about")) which = "about";
  for (const [k, v] of Object.entries(views)) v.hidden = k !== which;
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === which) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (!state.app) return;
  if (which === "model") {
    let name = "";
    try {
      name = decodeURIComponent(h.slice("#/model/".length));
    } catch {
      name = "";
    }
    renderModelPage($("model-page"), modelByName(name), state.app, bundleUrl);
    document.title = `${name} · COVID X-ray research app`;
    window.scrollTo(0, 0);
  } else if (which === "about") {
    renderAbout();
    document.title = "About · COVID X-ray research app";
    window.scrollTo(0, 0);
  } else {
    document.title = "COVID X-ray research app";
  }
}
