// Daemon events (WebSocket) into the store, plus the side effects a person notices:
// desktop notifications while the page is hidden and the live-region announcement.
import { announce } from "./dom.js";
import { t } from "./i18n.js";
import { applyState } from "./state.js";
import { emit, nameOf, putChat, store, upsertMessage } from "./store.js";

function notify(m) {
  const who = nameOf(store.chats.get(m.chat), m.chat);
  announce(t("notify.new_message", { name: who }));
  if (!document.hidden || !("Notification" in window) || Notification.permission !== "granted") return;
  try {
    const n = new Notification(t("notify.title", { name: who }), { body: m.text, tag: m.chat });
    n.onclick = () => window.focus();
  } catch {
    /* notifications unavailable in this context */
  }
}

const handlers = {
  hello(ev) {
    applyState(ev.state, true);
    emit("resync");
  },
  state(ev) {
    applyState(ev.state, true);
  },
  message(ev) {
    const m = ev.message;
    if (!store.messages.has(m.chat) && store.view.chat === m.chat) store.messages.set(m.chat, new Map());
    const known = store.messages.get(m.chat)?.has(m.id);
    upsertMessage(m);
    if (!store.chats.has(m.chat)) emit("unknown-chat", m.chat);
    if (known) emit("update", m);
    else {
      emit("message", m);
      if (!m.outgoing) notify(m);
    }
  },
  update(ev) {
    upsertMessage(ev.message);
    emit("update", ev.message);
  },
  delete(ev) {
    store.deleted.add(ev.id);
    store.messages.get(ev.chat)?.delete(ev.id);
    emit("delete", { chat: ev.chat, id: ev.id });
  },
  chat(ev) {
    putChat(ev.chat);
  },
  contact(ev) {
    const c = ev.contact;
    const chat = c && store.chats.get(c.address);
    if (chat) putChat({ ...chat, display_name: c.display_name, nickname: c.nickname, verified: c.verified });
    emit("contact", c);
  },
  group(ev) {
    if (ev.group && ev.group.ref) {
      store.groups.set(ev.group.ref, ev.group);
      emit("group", ev.group);
    }
  },
  link(ev) {
    emit("link", ev);
  },
  progress(ev) {
    emit("progress", ev);
  },
};

/** Dispatch one event frame from the daemon. */
export function handleEvent(ev) {
  const fn = handlers[ev && ev.type];
  if (fn) fn(ev);
}
