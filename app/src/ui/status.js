// The status line and the error box (#error), shared by every screen, and the
// wrapper that turns a failed handler into a message there instead of a silent
// unhandled rejection.
import { AppError } from "../image.js";
import { $ } from "./format.js";

export function safe(fn) {
  return async (...args) => {
    try {
      await fn(...args);
    } catch (e) {
      console.error(e);
      if (e instanceof AppError) showError(e.kind, e.message);
      else showError("internal", `Something went wrong: ${e && e.message ? e.message : e}`);
    }
  };
}

export function showError(kind, message) {
  const box = $("error");
  box.dataset.kind = kind;
  box.textContent = message;
  box.hidden = false;
}

export function clearError() {
  const box = $("error");
  box.hidden = true;
  box.textContent = "";
  delete box.dataset.kind;
}

export function setStatus(text) {
  $("status").textContent = text;
}
