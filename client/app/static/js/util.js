// Small shared pieces: the error banner, copy-to-clipboard, the field helper.
import { h } from "./dom.js";
import { errorText, t } from "./i18n.js";

let bannerTimer = null;

/** Show an API error (by code) in the page's alert banner. */
export function showError(err) {
  const code = err && err.code ? err.code : "internal";
  const banner = document.getElementById("banner");
  if (!banner) return;
  banner.textContent = errorText(code);
  banner.dataset.code = code;
  banner.hidden = false;
  clearTimeout(bannerTimer);
  bannerTimer = setTimeout(() => {
    banner.hidden = true;
  }, 8000);
}

/** A button that copies `value()` to the clipboard and says so. */
export function copyButton(value, testid) {
  const btn = h("button", {
    type: "button",
    class: "copy",
    "data-testid": testid,
    "aria-label": t("action.copy"),
    text: t("action.copy"),
    onclick: async () => {
      try {
        await navigator.clipboard.writeText(value());
        btn.textContent = t("action.copied");
      } catch {
        btn.textContent = t("action.copy_failed");
      }
      setTimeout(() => {
        btn.textContent = t("action.copy");
      }, 2000);
    },
  });
  return btn;
}

let fieldSeq = 0;

/** A labelled form field: returns {wrap, input}. */
export function field(labelText, input, hint) {
  const id = input.id || `f${++fieldSeq}`;
  input.id = id;
  const hintEl = hint ? h("p", { class: "hint", id: `${id}-hint`, text: hint }) : null;
  if (hintEl) input.setAttribute("aria-describedby", hintEl.id);
  return { wrap: h("div", { class: "field" }, h("label", { for: id, text: labelText }), input, hintEl), input };
}

/** Run an async action with `button` disabled meanwhile; errors go to the banner. */
export async function busy(button, fn) {
  if (button) button.disabled = true;
  try {
    return await fn();
  } catch (err) {
    showError(err);
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}
