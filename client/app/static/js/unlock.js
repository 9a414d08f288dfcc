// The unlock screen: the passphrase opens the device's keys for as long as the app runs.
import { h } from "./dom.js";
import { t } from "./i18n.js";
import { applyState } from "./state.js";
import { store } from "./store.js";
import { busy, field } from "./util.js";

/** The unlock screen; returns {el, dispose}. */
export function unlock() {
  const input = h("input", { type: "password", autocomplete: "current-password", "data-testid": "unlock-passphrase", required: true });
  const f = field(t("unlock.passphrase"), input);
  const button = h("button", { type: "submit", class: "primary", "data-testid": "unlock-submit", text: t("unlock.submit") });
  const form = h("form", { class: "stack" }, f.wrap, button);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(button, async () => {
      const state = await store.api.post("/api/unlock", { passphrase: input.value });
      input.value = "";
      applyState(state);
    }).then(() => input.focus());
  });
  setTimeout(() => input.focus(), 0);
  const el = h("section", { class: "screen center", "aria-labelledby": "unlock-title" }, h("h2", { id: "unlock-title", text: t("unlock.title") }), h("p", { class: "hint", text: t("unlock.explain") }), form);
  return { el, dispose() {} };
}
