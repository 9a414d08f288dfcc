// Applying a State from the daemon: store it, follow its language setting, tell the page.
import { browserLanguage, setLanguage } from "./i18n.js";
import { emit, store } from "./store.js";

/**
 * Store `state` (docs/app.md State) and emit "state" with the previous one. Only the WebSocket
 * (`live`) says how the node connection is: a State in an HTTP answer may be older than the
 * last event, so it keeps the connection the events reported.
 */
export function applyState(state, live = false) {
  if (!state || typeof state !== "object") return;
  const prev = store.state;
  store.state = !live && prev && store.wsUp ? { ...state, connection: prev.connection } : state;
  const wanted = state.settings?.language || "";
  const langChanged = setLanguage(wanted || browserLanguage());
  emit("state", { prev, state, langChanged });
}
