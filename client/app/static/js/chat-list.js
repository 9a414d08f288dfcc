// The chat list: one item per conversation (name, last message, time, unread badge) and the
// "new chat by address" form, "new group" and "join a group". Each conversation kind (direct,
// group) registers an item renderer.
import { h, mount } from "./dom.js";
import { createGroupDialog, groupItem, joinGroupDialog } from "./group.js";
import { shortWhen, t } from "./i18n.js";
import { changedSince, go, nameOf, on, putChat, store } from "./store.js";
import { busy, field, showError } from "./util.js";

/** kind → function(chat, active) returning the list item. */
export const chatRenderers = {
  direct: directItem,
  group: groupItem,
};

function preview(chat) {
  const last = chat.last;
  if (!last) return t("chats.no_messages");
  const text = last.kind === "file" && last.file ? t("chats.file", { name: last.text || last.file.name }) : last.text || "";
  return last.outgoing ? t("chats.you_prefix", { text }) : text;
}

function directItem(chat, active) {
  const name = nameOf(chat, chat.address);
  // the open chat is being read (its read receipts are on their way): no badge there
  const unread = active && document.visibilityState === "visible" ? 0 : chat.unread || 0;
  return h(
    "li",
    { class: "chat-row" },
    h(
      "button",
      {
        type: "button",
        class: `chat-item${active ? " active" : ""}${unread ? " has-unread" : ""}`,
        "data-testid": "chat-item",
        "data-address": chat.address,
        "aria-current": active ? "true" : null,
        "aria-label": unread ? t("chats.item_label_unread", { name, count: unread }) : t("chats.item_label", { name }),
        onclick: () => go("chat", chat.address),
      },
      h("span", { class: "avatar", "aria-hidden": "true", text: Array.from(name)[0] || "?" }),
      h(
        "span",
        { class: "chat-main" },
        h("span", { class: "chat-name", dir: "auto", text: name }, chat.verified ? h("span", { class: "verified-mark", title: t("verify.verified_short"), text: " ✔" }) : null),
        h("span", { class: "chat-last", dir: "auto", text: preview(chat) }),
      ),
      h(
        "span",
        { class: "chat-side" },
        chat.last ? h("time", { class: "chat-time", text: shortWhen(chat.last.sent_at) }) : null,
        unread ? h("span", { class: "badge unread", "data-testid": "unread-badge", text: String(unread) }) : null,
      ),
    ),
  );
}

function sortedChats() {
  return [...store.chats.values()].sort((a, b) => (b.last?.sent_at || 0) - (a.last?.sent_at || 0));
}

/** Fetch every chat summary from the daemon into the store. */
export async function loadChats() {
  const since = store.seq;
  const chats = await store.api.get("/api/chats");
  const fresh = new Map();
  for (const c of chats) fresh.set(c.address, changedSince(c.address, since) ? store.chats.get(c.address) : c);
  for (const [address, c] of store.chats) if (!fresh.has(address) && changedSince(address, since)) fresh.set(address, c);
  store.chats = fresh;
}

function newChatForm() {
  const input = h("input", {
    type: "text",
    "data-testid": "new-chat-address",
    placeholder: t("chats.new_placeholder"),
    autocomplete: "off",
    spellcheck: "false",
  });
  const f = field(t("chats.new_label"), input);
  const button = h("button", { type: "submit", "data-testid": "new-chat-submit", text: t("chats.new_start") });
  const form = h("form", { class: "new-chat" }, f.wrap, button);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const address = input.value.trim();
    if (!address) return;
    busy(button, async () => {
      const chat = await store.api.post("/api/chats", { address });
      putChat(chat);
      input.value = "";
      go("chat", chat.address);
    });
  });
  return form;
}

/** The chat list pane; returns {el, dispose}. */
export function chatList() {
  const list = h("ul", { class: "chat-list", "data-testid": "chat-list", "aria-label": t("chats.title") });
  const render = () => {
    const active = store.view.screen === "chat" ? store.view.chat : null;
    const items = sortedChats().map((c) => (chatRenderers[c.kind || "direct"] || directItem)(c, c.address === active));
    mount(list, items.length ? items : h("li", { class: "empty", text: t("chats.empty") }));
  };
  render();
  const unsubs = [on("chats", render), on("view", render)];
  const groupTools = h(
    "div",
    { class: "group-tools" },
    h("button", { type: "button", "data-testid": "group-new", text: t("group.new"), onclick: () => createGroupDialog() }),
    h("button", { type: "button", "data-testid": "group-join-open", text: t("group.join_open"), onclick: () => joinGroupDialog() }),
  );
  const el = h("nav", { class: "chats-pane", "aria-label": t("chats.title") }, h("h2", { class: "pane-title", text: t("chats.title") }), newChatForm(), groupTools, list);
  return {
    el,
    dispose() {
      for (const u of unsubs) u();
    },
  };
}

/** Ensure a chat exists for `address` (used by contacts): opens it. */
export async function openChat(address) {
  try {
    if (!store.chats.has(address)) putChat(await store.api.post("/api/chats", { address }));
    go("chat", address);
  } catch (err) {
    showError(err);
  }
}
