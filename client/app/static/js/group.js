// Group chats: the list entry, the conversation header and its note, the counter's sheet,
// "who can read this", the create and join dialogs, and the members screen (admin actions).
// A group is addressed by its ref `group:<hex>` wherever a 1:1 chat uses an address.
import { enc } from "./api.js";
import { confirmDialog, openDialog } from "./dialog.js";
import { h, mount } from "./dom.js";
import { shortWhen, t } from "./i18n.js";
import { qrCanvas } from "./qr.js";
import { emit, go, on, putChat, store } from "./store.js";
import { busy, copyButton, field, showError } from "./util.js";

/** Whether a chat id is a group's ref. */
export function isGroup(ref) {
  return typeof ref === "string" && ref.startsWith("group:");
}

/** Store a Group (from an answer or a `group` event) and tell the page. */
export function putGroup(g) {
  if (!g || !g.ref) return;
  store.groups.set(g.ref, g);
  emit("group", g);
}

/** The Group for `ref`, fetched when not known yet. */
export async function loadGroup(ref) {
  const g = await store.api.get(`/api/groups/${enc(ref)}`);
  putGroup(g);
  return g;
}

function memberName(m) {
  if (m.me) return t("group.you");
  return m.name || m.address;
}

function lastPreview(chat) {
  const last = chat.last;
  if (!last) return t("group.no_messages");
  const text = last.kind === "file" && last.file ? t("chats.file", { name: last.text || last.file.name }) : last.text || "";
  if (last.outgoing) return t("chats.you_prefix", { text });
  return t("group.sender_prefix", { name: last.sender_name || last.sender, text });
}

/** The chat-list entry of a group: a group icon, its name, member count and last message. */
export function groupItem(chat, active) {
  const name = chat.display_name || t("group.unnamed");
  const unread = active && document.visibilityState === "visible" ? 0 : chat.unread || 0;
  return h(
    "li",
    { class: "chat-row" },
    h(
      "button",
      {
        type: "button",
        class: `chat-item group-item${active ? " active" : ""}${unread ? " has-unread" : ""}${chat.active === false ? " left" : ""}`,
        "data-testid": "chat-item",
        "data-kind": "group",
        "data-address": chat.address,
        "aria-current": active ? "true" : null,
        "aria-label": unread ? t("group.item_label_unread", { name, count: unread, members: chat.member_count }) : t("group.item_label", { name, members: chat.member_count }),
        onclick: () => go("chat", chat.address),
      },
      h("span", { class: "avatar group-avatar", "aria-hidden": "true" }),
      h(
        "span",
        { class: "chat-main" },
        h("span", { class: "chat-name", dir: "auto" }, h("span", { "data-testid": "group-name", text: name }), h("span", { class: "member-count", "data-testid": "member-count", text: ` ${chat.member_count}` })),
        h("span", { class: "chat-last", dir: "auto", text: chat.active === false ? t("group.not_member") : lastPreview(chat) }),
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

/** The header of a group conversation: name, member count, members and "who can read this". */
export function groupHeader(ref) {
  const chat = store.chats.get(ref) || { address: ref, display_name: "", member_count: 0 };
  return h(
    "header",
    { class: "conv-head" },
    h("button", { type: "button", class: "back", "data-testid": "back", "aria-label": t("action.back"), text: "←", onclick: () => go("home") }),
    h(
      "div",
      { class: "conv-title" },
      h("h2", { "data-testid": "chat-title", dir: "auto", text: chat.display_name || t("group.unnamed") }),
      h("p", { class: "addr", "data-testid": "group-member-count", text: t("group.members_count", { count: chat.member_count || 0 }) }),
    ),
    h(
      "div",
      { class: "conv-tools" },
      h("button", { type: "button", "data-testid": "group-readers", text: t("group.who_can_read"), onclick: () => groupReaders(ref) }),
      h("button", { type: "button", "data-testid": "group-open-members", text: t("group.members"), onclick: () => go("group", ref) }),
    ),
  );
}

/** The note shown at the top of every group conversation. */
export function groupNote(ref) {
  const chat = store.chats.get(ref);
  return h(
    "p",
    { class: "group-note", "data-testid": "group-history-note", role: "note" },
    chat && chat.active === false ? t("group.left_note") : t("group.history_note"),
  );
}

/** The sheet behind a message's counter: who has not read it, and how many hide receipts. */
export async function unreadSheet(m) {
  const names = m.unread_members.map((a, i) => (m.unread_names && m.unread_names[i]) || a);
  await openDialog({
    title: t("group.unread_title", { count: m.unread_by }),
    testid: "unread-dialog",
    body: [
      h("ul", { class: "unread-list", "data-testid": "unread-list" }, names.map((n, i) => h("li", { "data-testid": "unread-member", "data-address": m.unread_members[i], dir: "auto", text: n }))),
      m.receipts_hidden ? h("p", { class: "hint", "data-testid": "receipts-hidden", text: t("group.receipts_hidden", { count: m.receipts_hidden }) }) : null,
      h("p", { class: "hint", text: t("group.receipts_explain") }),
    ],
    actions: [{ label: t("action.close"), testid: "dialog-cancel", primary: true }],
  });
}

/** "Who can read this": every member device group messages are encrypted to. */
export async function groupReaders(ref) {
  const list = h("ul", { class: "readers", "data-testid": "readers-list" }, h("li", { text: t("common.loading") }));
  const warn = h("p", { class: "warning slim", role: "alert", "data-testid": "readers-changed", hidden: true, text: t("group.readers_changed") });
  const shown = openDialog({
    title: t("message.readers"),
    body: [h("p", { class: "hint", text: t("group.readers_explain") }), warn, list],
    testid: "readers-dialog",
    actions: [{ label: t("action.close"), testid: "dialog-cancel", primary: true }],
  });
  try {
    const { devices } = await store.api.get(`/api/groups/${enc(ref)}/readers`);
    warn.hidden = !devices.some((d) => d.changed);
    mount(
      list,
      devices.map((d) =>
        h(
          "li",
          { "data-testid": "reader", "data-verified": d.verified ? "yes" : "no", "data-changed": d.changed ? "yes" : "no" },
          h("span", { class: "reader-name", dir: "auto", text: d.name || d.id }),
          h("span", { class: "reader-addr", text: d.address }),
          h("span", {
            class: d.changed ? "badge warn" : d.verified ? "badge ok" : "badge warn",
            text: d.changed ? t("group.reader_changed") : d.verified ? t("readers.verified") : t("readers.unverified"),
          }),
        ),
      ),
    );
  } catch (err) {
    mount(list, h("li", { text: t("common.failed") }));
    showError(err);
  }
  await shown;
}

function splitAddresses(text) {
  return text
    .split(/[\s,;]+/)
    .map((s) => s.trim())
    .filter(Boolean);
}

/** The create-group dialog: a name, members picked from contacts and/or typed addresses. */
export async function createGroupDialog() {
  const name = h("input", { type: "text", "data-testid": "group-create-name", maxlength: "64", autocomplete: "off" });
  const nameField = field(t("group.name_label"), name);
  const picks = h("fieldset", { class: "member-picks", "data-testid": "group-create-contacts" }, h("legend", { text: t("group.pick_contacts") }), h("p", { text: t("common.loading") }));
  const typed = h("textarea", { "data-testid": "group-create-addresses", rows: "2", spellcheck: "false", placeholder: t("chats.new_placeholder") });
  const typedField = field(t("group.type_addresses"), typed, t("group.type_addresses_hint"));
  store.api.get("/api/contacts").then(
    (all) =>
      mount(
        picks,
        h("legend", { text: t("group.pick_contacts") }),
        all.length
          ? all.map((c) =>
              h(
                "label",
                { class: "pick" },
                h("input", { type: "checkbox", value: c.address, "data-testid": "group-create-contact", "data-address": c.address }),
                h("span", { dir: "auto", text: ` ${c.nickname || c.display_name || c.address}` }),
                h("span", { class: "addr", text: ` ${c.address}` }),
              ),
            )
          : h("p", { class: "hint", text: t("contacts.empty") }),
      ),
    () => {},
  );
  await openDialog({
    title: t("group.create_title"),
    testid: "group-create-dialog",
    body: [nameField.wrap, picks, typedField.wrap],
    actions: [
      { label: t("action.cancel"), testid: "dialog-cancel" },
      {
        label: t("group.create"),
        testid: "group-create-submit",
        primary: true,
        onClick: async () => {
          const members = [...picks.querySelectorAll("input[type=checkbox]:checked")].map((i) => i.value);
          members.push(...splitAddresses(typed.value));
          if (!name.value.trim()) {
            name.focus();
            return false;
          }
          try {
            const g = await store.api.post("/api/groups", { name: name.value.trim(), members });
            putGroup(g);
            if (!store.chats.has(g.ref)) {
              const chat = (await store.api.get("/api/chats")).find((c) => c.address === g.ref);
              if (chat) putChat(chat);
            }
            go("chat", g.ref);
            return true;
          } catch (err) {
            showError(err);
            return false;
          }
        },
      },
    ],
  });
}

/** The join dialog: paste a group invite code; the admin's device adds us. */
export async function joinGroupDialog() {
  const code = h("input", { type: "text", "data-testid": "group-join-code", autocomplete: "off", spellcheck: "false", placeholder: "haven:group:…" });
  const f = field(t("group.join_label"), code);
  const status = h("p", { class: "hint", "data-testid": "group-join-status", role: "status" });
  await openDialog({
    title: t("group.join_title"),
    testid: "group-join-dialog",
    body: [f.wrap, status],
    actions: [
      { label: t("action.close"), testid: "dialog-cancel" },
      {
        label: t("group.join"),
        testid: "group-join-submit",
        primary: true,
        onClick: async () => {
          if (!code.value.trim()) return false;
          try {
            const res = await store.api.post("/api/groups/join", { code: code.value.trim() });
            status.textContent = t("group.join_requested", { name: res.name || "" });
          } catch (err) {
            showError(err);
          }
          return false;
        },
      },
    ],
  });
}

async function change(ref, method, path, body) {
  const g = await store.api.call(method, `/api/groups/${enc(ref)}${path}`, body);
  putGroup(g);
  return g;
}

function memberRow(g, m) {
  const tools = [];
  if (g.am_admin && !m.me) {
    tools.push(
      h("button", {
        type: "button",
        "data-testid": m.admin ? "member-demote" : "member-promote",
        text: m.admin ? t("group.demote") : t("group.promote"),
        onclick: (ev) => busy(ev.currentTarget, () => change(g.ref, "PUT", `/admins/${enc(m.address)}`, { on: !m.admin })),
      }),
      h("button", {
        type: "button",
        class: "danger",
        "data-testid": "member-remove",
        text: t("group.remove"),
        onclick: async (ev) => {
          const btn = ev.currentTarget;
          if (!(await confirmDialog(t("group.remove"), t("group.remove_confirm", { name: memberName(m) }), t("group.remove")))) return;
          await busy(btn, () => change(g.ref, "DELETE", `/members/${enc(m.address)}`));
        },
      }),
    );
  }
  return h(
    "li",
    { class: "member", "data-testid": "member", "data-address": m.address, "data-admin": m.admin ? "yes" : "no" },
    h("span", { class: "member-name", dir: "auto", text: memberName(m) }),
    m.me || m.name ? h("span", { class: "addr", text: m.address }) : null,
    m.admin ? h("span", { class: "badge ok", "data-testid": "member-admin", text: t("group.admin") }) : null,
    h("span", { class: "member-tools" }, tools),
  );
}

function adminTools(g) {
  const rename = h("input", { type: "text", "data-testid": "group-rename-input", maxlength: "64", value: g.name });
  const renameBtn = h("button", { type: "submit", "data-testid": "group-rename-save", text: t("group.rename") });
  const renameForm = h("form", { class: "inline-form" }, field(t("group.name_label"), rename).wrap, renameBtn);
  renameForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (rename.value.trim()) busy(renameBtn, () => change(g.ref, "PUT", "/name", { name: rename.value.trim() }));
  });
  const add = h("input", { type: "text", "data-testid": "group-add-address", autocomplete: "off", spellcheck: "false", placeholder: t("chats.new_placeholder") });
  const addBtn = h("button", { type: "submit", "data-testid": "group-add-submit", text: t("group.add") });
  const addForm = h("form", { class: "inline-form" }, field(t("group.add_label"), add).wrap, addBtn);
  addForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const address = add.value.trim();
    if (!address) return;
    busy(addBtn, async () => {
      await change(g.ref, "POST", "/members", { address });
      add.value = "";
    });
  });
  const inviteOut = h("div", { class: "invite", "data-testid": "group-invite-out" });
  const inviteBtn = h("button", {
    type: "button",
    "data-testid": "group-invite",
    text: t("group.invite"),
    onclick: () =>
      busy(inviteBtn, async () => {
        const { code, qr } = await store.api.post(`/api/groups/${enc(g.ref)}/invite`, { uses: 1 });
        mount(
          inviteOut,
          h("p", { class: "hint", text: t("group.invite_hint") }),
          h("code", { class: "code", "data-testid": "group-invite-code", text: code }),
          copyButton(() => code, "group-invite-copy"),
          qrCanvas(qr, t("group.invite_qr"), "group-invite-qr"),
        );
      }),
  });
  return h("div", { class: "admin-tools" }, renameForm, addForm, inviteBtn, inviteOut);
}

/** The members screen of a group; returns {el, dispose}. */
export function groupScreen(ref) {
  const body = h("div", { class: "group-body" }, h("p", { text: t("common.loading") }));
  const title = h("h2", { id: "group-title", dir: "auto", "data-testid": "group-title", text: store.chats.get(ref)?.display_name || "" });
  const render = (g) => {
    if (!g || g.ref !== ref) return;
    if (body.contains(document.activeElement) && document.activeElement.tagName === "INPUT") {
      // don't yank a field being typed in: refresh only the list
      const list = body.querySelector("[data-testid=members]");
      if (list) mount(list, g.members.map((m) => memberRow(g, m)));
      title.textContent = g.name;
      return;
    }
    title.textContent = g.name;
    mount(
      body,
      g.active ? null : h("p", { class: "warning slim", text: t("group.not_member") }),
      h("p", { class: "group-note", "data-testid": "group-history-note", text: t("group.history_note") }),
      h("h3", { text: t("group.members_count", { count: g.members.length }) }),
      h("ul", { class: "members", "data-testid": "members" }, g.members.map((m) => memberRow(g, m))),
      g.superseded && g.superseded.length
        ? h("p", { class: "hint", "data-testid": "group-superseded", text: t("group.superseded", { count: g.superseded.length }) })
        : null,
      g.am_admin ? adminTools(g) : null,
      g.active
        ? h("button", {
            type: "button",
            class: "danger",
            "data-testid": "group-leave",
            text: t("group.leave"),
            onclick: async (ev) => {
              const btn = ev.currentTarget;
              if (!(await confirmDialog(t("group.leave"), t("group.leave_confirm"), t("group.leave")))) return;
              await busy(btn, () => change(ref, "POST", "/leave", {}));
            },
          })
        : null,
    );
  };
  loadGroup(ref).catch(showError);
  if (store.groups.has(ref)) render(store.groups.get(ref));
  const unsubs = [on("group", render), on("resync", () => loadGroup(ref).catch(showError))];
  const el = h(
    "section",
    { class: "screen group-screen", "aria-labelledby": "group-title", "data-testid": "group-screen" },
    h("header", { class: "screen-head" }, h("button", { type: "button", class: "back", "data-testid": "back", "aria-label": t("action.back"), text: "←", onclick: () => go("chat", ref) }), title),
    body,
  );
  return { el, dispose: () => unsubs.forEach((u) => u()) };
}
