// The one store of the page: what the daemon told us, and which screen is open. Components
// subscribe to topics and re-render their own part; nothing else holds state.

export const store = {
  api: null, // the Api of this page (js/api.js)
  state: null, // State (docs/app.md)
  wsUp: false, // the WebSocket to the daemon is authenticated and open
  authFailed: false,
  chats: new Map(), // address → Chat
  messages: new Map(), // address → Map(id → Message), for chats whose history was loaded
  groups: new Map(), // group ref → Group (members, admins), for groups whose details were loaded
  view: { screen: "home", chat: null },
  welcome: false, // just joined: show the address screen first
  seq: 0, // counts live changes, so a snapshot fetched earlier never overwrites a newer event
  changedAt: new Map(), // message id or chat address → seq of its last live change
  deleted: new Set(), // ids deleted (for everyone, or disappeared) while this page is open
};

/** Record a live change of `key` (a message id or a chat address). */
export function touch(key) {
  store.changedAt.set(key, ++store.seq);
}

/** Whether `key` changed live after the snapshot that started at `since`. */
export function changedSince(key, since) {
  return (store.changedAt.get(key) || 0) > since;
}

const topics = new Map();

/** Subscribe to a topic; returns the function that unsubscribes. */
export function on(topic, fn) {
  if (!topics.has(topic)) topics.set(topic, new Set());
  topics.get(topic).add(fn);
  return () => topics.get(topic)?.delete(fn);
}

export function emit(topic, payload) {
  for (const fn of [...(topics.get(topic) || [])]) fn(payload);
}

/** The honest connection state: the WebSocket down means offline whatever the daemon said. */
export function connectionState() {
  if (!store.wsUp) return "offline";
  return store.state?.connection || "offline";
}

/** Open a screen: `screen` one of home, chat, group, contacts, devices, settings, verify, welcome. */
export function go(screen, chat = null) {
  store.view = { screen, chat };
  emit("view", store.view);
}

/** Insert or replace a message in the loaded history of its chat. */
export function upsertMessage(m) {
  const map = store.messages.get(m.chat);
  touch(m.id);
  if (!map) return false;
  map.set(m.id, m);
  return true;
}

/** Who a chat or contact is, for display: the local nickname, else the display name, else the address. */
export function nameOf(entry, address) {
  if (entry && entry.nickname) return entry.nickname;
  if (entry && entry.display_name) return entry.display_name;
  return address;
}

/** Merge a chat summary into the store. */
export function putChat(chat) {
  touch(chat.address);
  store.chats.set(chat.address, chat);
  emit("chats");
}
