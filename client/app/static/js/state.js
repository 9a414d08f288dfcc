// Applying a State from the daemon: store it, follow its language setting, tell the page.
import { browserLanguage, setLanguage } from "./i18n.js";
import { emit, store } from "./store.js";

/** Store `state` (docs/app.md State) and emit "state" with the previous one. */
export function applyState(state) {
  if (!state || typeof state !== "object") return;
  const prev = store.state;
  store.state = state;
  const wanted = state.settings?.language || "";
  const langChanged = setLanguage(wanted || browserLanguage());
  emit("state", { prev, state, langChanged });
}
