// The open conversation: header (name, timer, verify), live message list, composer.
import { enc } from "./api.js";
import { confirmDialog, openDialog } from "./dialog.js";
import { announce, h, mount } from "./dom.js";
import { noteProgress, progressBar, rememberPreview } from "./file.js";
import { groupHeader, groupNote, groupReaders, isGroup, unreadSheet } from "./group.js";
import { dayLabel, t } from "./i18n.js";
import { renderMessage, TIMER_CHOICES, timerLabel } from "./message.js";
import { changedSince, emit, go, nameOf, on, putChat, store, upsertMessage } from "./store.js";
import { busy, field, showError } from "./util.js";

function sorted(map) {
  return [...map.values()].sort((a, b) => a.sent_at - b.sent_at);
}

function dayKey(ms) {
  const d = new Date(ms);
  return `${d.getFullYear()}-${d.getMonth()}-${d.getDate()}`;
}

const reading = new Map(); // address → {again}: one read request in flight per chat

/** Mark the chat read when the page is visible (read receipts go out from the daemon).
 * Bursts coalesce: while one request is in flight, later calls make exactly one more. */
async function markRead(address) {
  if (document.visibilityState !== "visible") return;
  const chat = store.chats.get(address);
  const map = store.messages.get(address);
  const unreadHere = map && [...map.values()].some((m) => !m.outgoing && !m.read);
  if (!(chat && chat.unread > 0) && !unreadHere) return;
  if (reading.has(address)) {
    reading.get(address).again = true;
    return;
  }
  const slot = { again: false };
  reading.set(address, slot);
  const since = store.seq;
  try {
    await store.api.post(`/api/chats/${enc(address)}/read`);
    if (map) for (const m of map.values()) if (!m.outgoing && !changedSince(m.id, since)) m.read = true;
    const c = store.chats.get(address);
    if (c && c.unread && !changedSince(address, since)) putChat({ ...c, unread: 0 });
  } catch (err) {
    showError(err);
  } finally {
    reading.delete(address);
  }
  if (slot.again) markRead(address);
}

const actions = {
  async edit(m) {
    const input = h("textarea", { "data-testid": "edit-text", rows: "3", value: m.text });
    const f = field(t("message.edit_label"), input);
    await openDialog({
      title: t("message.edit"),
      body: [f.wrap],
      testid: "edit-dialog",
      actions: [
        { label: t("action.cancel"), testid: "dialog-cancel" },
        {
          label: t("action.save"),
          testid: "edit-save",
          primary: true,
          onClick: async () => {
            const text = input.value.trim();
            if (!text) return false;
            try {
              const updated = await store.api.patch(`/api/messages/${m.id}`, { text });
              if (upsertMessage(updated)) emit("update", updated);
            } catch (err) {
              showError(err);
            }
            return true;
          },
        },
      ],
    });
  },
  async remove(m) {
    if (!(await confirmDialog(t("message.delete"), t("message.delete_confirm"), t("message.delete_everyone")))) return;
    try {
      await store.api.del(`/api/messages/${m.id}`);
      store.deleted.add(m.id);
      store.messages.get(m.chat)?.delete(m.id);
      emit("delete", { chat: m.chat, id: m.id });
    } catch (err) {
      showError(err);
    }
  },
  unread(m) {
    return unreadSheet(m);
  },
  async readers(m) {
    if (m.group) return groupReaders(m.chat);
    const list = h("ul", { class: "readers", "data-testid": "readers-list" }, h("li", { text: t("common.loading") }));
    const shown = openDialog({
      title: t("message.readers"),
      body: [h("p", { class: "hint", text: t("readers.explain") }), list],
      testid: "readers-dialog",
      actions: [{ label: t("action.close"), testid: "dialog-cancel", primary: true }],
    });
    try {
      const { devices } = await store.api.get(`/api/messages/${m.id}/readers`);
      mount(
        list,
        devices.map((d) =>
          h(
            "li",
            { "data-testid": "reader", "data-verified": d.verified ? "yes" : "no" },
            h("span", { class: "reader-name", text: d.name || d.id }),
            h("span", { class: "reader-addr", text: d.address }),
            h("span", { class: d.verified ? "badge ok" : "badge warn", text: d.verified ? t("readers.verified") : t("readers.unverified") }),
          ),
        ),
      );
    } catch (err) {
      mount(list, h("li", { text: t("common.failed") }));
      showError(err);
    }
    await shown;
  },
};

function header(address) {
  if (isGroup(address)) return groupHeader(address);
  const chat = store.chats.get(address) || { address, timer_ms: 0, verified: false };
  const select = h("select", {
    "data-testid": "timer-select",
    "aria-label": t("timer.label"),
    onchange: async () => {
      const timer_ms = Number(select.value);
      await busy(select, async () => putChat(await store.api.put(`/api/chats/${enc(address)}/timer`, { timer_ms })));
    },
  });
  const choices = TIMER_CHOICES.includes(chat.timer_ms) ? TIMER_CHOICES : [...TIMER_CHOICES, chat.timer_ms].sort((a, b) => a - b);
  for (const ms of choices) select.appendChild(h("option", { value: String(ms), selected: ms === chat.timer_ms, text: timerLabel(ms) }));
  return h(
    "header",
    { class: "conv-head" },
    h("button", { type: "button", class: "back", "data-testid": "back", "aria-label": t("action.back"), text: "←", onclick: () => go("home") }),
    h(
      "div",
      { class: "conv-title" },
      h("h2", { "data-testid": "chat-title", dir: "auto", text: nameOf(chat, address) }),
      h("p", { class: "addr", text: address }),
    ),
    h(
      "div",
      { class: "conv-tools" },
      h("span", { class: "timer-icon", "aria-hidden": "true", text: "◔" }),
      select,
      h("button", {
        type: "button",
        "data-testid": "verify-open",
        class: chat.verified ? "verified" : "",
        text: chat.verified ? t("verify.verified_short") : t("verify.open"),
        onclick: () => go("verify", address),
      }),
    ),
  );
}

/** The conversation screen for `address`; returns {el, dispose}. */
export function conversation(address) {
  const head = h("div", { class: "conv-head-wrap" }, header(address));
  const warning = h("div", { class: "warning slim", role: "alert", "data-testid": "chat-key-changed", hidden: true });
  const showContact = (c) => {
    if (!c || c.address !== address) return;
    mount(
      warning,
      h("span", { text: t("verify.key_changed_text", { name: nameOf(c, address) }) }),
      " ",
      h("button", { type: "button", text: t("verify.open"), onclick: () => go("verify", address) }),
    );
    warning.hidden = !c.key_changed;
  };
  const group = isGroup(address);
  if (!group) store.api.get("/api/contacts").then((all) => showContact(all.find((c) => c.address === address)), () => {});
  const note = h("div", { class: "group-note-wrap" }, group ? groupNote(address) : null);
  const list = h("div", { class: "messages", role: "log", "aria-live": "polite", "aria-label": t("conversation.messages"), "data-testid": "messages" });
  const composer = h("textarea", {
    "data-testid": "composer",
    rows: "1",
    dir: "auto",
    placeholder: t("composer.placeholder"),
    "aria-label": t("composer.label"),
    maxlength: "4000",
  });
  const send = h("button", { type: "submit", class: "primary", "data-testid": "send", "aria-label": t("composer.send"), text: t("composer.send") });
  const picker = h("input", { type: "file", multiple: true, class: "visually-hidden", "data-testid": "attach-input", "aria-label": t("file.attach"), tabindex: "-1" });
  const attach = h("button", { type: "button", class: "attach", "data-testid": "attach", "aria-label": t("file.attach"), title: t("file.attach") });
  attach.addEventListener("click", () => picker.click());
  picker.addEventListener("change", () => {
    const files = [...picker.files];
    picker.value = "";
    for (const f of files) sendFile(f);
  });
  const uploads = h("div", { class: "uploads", "data-testid": "uploads", "aria-live": "polite" });
  const form = h("form", { class: "composer" }, group ? null : attach, group ? null : picker, composer, send);
  // a group we left or were removed from: its history stays readable, nothing can be sent
  const syncComposer = () => {
    form.hidden = group && store.chats.get(address)?.active === false;
  };
  syncComposer();
  const elements = new Map();
  let lastDay = null;

  const scrollDown = () => {
    list.scrollTop = list.scrollHeight;
  };
  // a preview in the newest message grows it after its bytes arrive: keep the end in view
  list.addEventListener(
    "load",
    (ev) => {
      const msg = ev.target.closest?.("[data-testid=message]");
      if (msg && !msg.nextElementSibling) scrollDown();
    },
    true,
  );
  const nearBottom = () => list.scrollHeight - list.scrollTop - list.clientHeight < 80;

  function renderAll() {
    elements.clear();
    lastDay = null;
    const map = store.messages.get(address) || new Map();
    const nodes = [];
    for (const m of sorted(map)) {
      const day = dayKey(m.sent_at);
      if (day !== lastDay) nodes.push(h("p", { class: "day", role: "separator", text: dayLabel(m.sent_at) }));
      lastDay = day;
      const el = renderMessage(m, actions);
      elements.set(m.id, el);
      nodes.push(el);
    }
    if (!nodes.length) nodes.push(h("p", { class: "empty", text: t("conversation.empty") }));
    mount(list, nodes);
    scrollDown();
  }

  function add(m) {
    const map = store.messages.get(address);
    if (!map) return;
    const last = sorted(map).at(-1);
    if (elements.has(m.id)) return replace(m);
    if (last && last.id !== m.id) return renderAll(); // arrived out of order: rebuild
    const stick = nearBottom() || m.outgoing;
    list.querySelector(".empty")?.remove();
    const day = dayKey(m.sent_at);
    if (day !== lastDay) list.appendChild(h("p", { class: "day", role: "separator", text: dayLabel(m.sent_at) }));
    lastDay = day;
    const el = renderMessage(m, actions);
    elements.set(m.id, el);
    list.appendChild(el);
    if (stick) scrollDown();
  }

  function replace(m) {
    const old = elements.get(m.id);
    if (!old) return add(m);
    const el = renderMessage(m, actions);
    elements.set(m.id, el);
    old.replaceWith(el);
  }

  async function load() {
    mount(list, h("p", { class: "empty", text: t("common.loading") }));
    try {
      const since = store.seq;
      const msgs = await store.api.get(`/api/chats/${enc(address)}/messages`);
      const old = store.messages.get(address) || new Map();
      const map = new Map();
      // what the WebSocket told us while we were loading is newer than this snapshot
      for (const m of msgs) if (!store.deleted.has(m.id)) map.set(m.id, changedSince(m.id, since) && old.has(m.id) ? old.get(m.id) : m);
      for (const m of old.values()) if (!map.has(m.id) && changedSince(m.id, since)) map.set(m.id, m);
      store.messages.set(address, map);
      renderAll();
      markRead(address);
    } catch (err) {
      showError(err);
    }
  }

  async function submit(ev) {
    ev.preventDefault();
    const text = composer.value.trim();
    if (!text) return;
    composer.value = "";
    try {
      const m = await store.api.post(`/api/chats/${enc(address)}/messages`, { text });
      if (!store.messages.has(address)) store.messages.set(address, new Map());
      const known = store.messages.get(address).get(m.id);
      if (!known) {
        store.messages.get(address).set(m.id, m);
        add(m);
      }
    } catch (err) {
      if (!composer.value) composer.value = text;
      showError(err);
    }
    composer.focus();
  }

  // uploads from this page: handle → {row, bar}, updated by `progress` events
  const running = new Map();
  async function sendFile(file) {
    const handle = Math.random().toString(36).slice(2, 12);
    const bar = progressBar("upload-progress", 0, file.size || 1, t("file.uploading", { name: file.name }));
    const row = h("div", { class: "upload", "data-testid": "upload", "data-upload": handle }, h("span", { class: "file-name", dir: "auto", text: file.name }), bar);
    running.set(handle, { row, bar });
    uploads.appendChild(row);
    const caption = composer.value.trim();
    composer.value = "";
    const q = new URLSearchParams({ name: file.name || "file", upload: handle });
    if (caption) q.set("text", caption);
    try {
      const m = await store.api.upload(`/api/chats/${enc(address)}/files?${q}`, file);
      rememberPreview(m, file);
      if (elements.has(m.id)) replace(m); // shown already (its event came first): use it
      if (!store.messages.has(address)) store.messages.set(address, new Map());
      if (!store.messages.get(address).has(m.id)) {
        store.messages.get(address).set(m.id, m);
        add(m);
      }
    } catch (err) {
      if (caption && !composer.value) composer.value = caption;
      showError(err);
    } finally {
      running.delete(handle);
      row.remove();
    }
  }

  form.addEventListener("submit", submit);
  composer.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });

  const onVisible = () => markRead(address);
  document.addEventListener("visibilitychange", onVisible);
  const unsubs = [
    on("message", (m) => {
      if (m.chat !== address) return;
      add(m);
      if (!m.outgoing) markRead(address);
    }),
    on("update", (m) => {
      if (m.chat === address) replace(m);
    }),
    on("delete", ({ chat, id }) => {
      if (chat !== address) return;
      const el = elements.get(id);
      if (el) {
        elements.delete(id);
        el.remove();
        announce(t("message.deleted"));
      }
    }),
    on("chats", () => {
      const chat = store.chats.get(address);
      if (chat && chat.unread > 0) markRead(address);
      const focusInHead = head.contains(document.activeElement);
      if (!focusInHead) mount(head, header(address));
      if (group) {
        mount(note, groupNote(address));
        syncComposer();
      }
    }),
    on("resync", load),
    on("progress", (ev) => {
      const up = ev.upload && running.get(ev.upload);
      if (up) {
        up.bar.max = Math.max(ev.total, 1);
        up.bar.value = Math.min(ev.done, ev.total);
        up.bar.dataset.phase = ev.phase;
        return;
      }
      if (ev.id && noteProgress(ev)) {
        const m = store.messages.get(address)?.get(ev.id);
        if (m) replace(m);
      }
    }),
    on("contact", showContact),
  ];

  const el = h("section", { class: "conversation", "aria-label": t("conversation.label") }, head, warning, note, list, uploads, form);
  // drag and drop onto the conversation: each dropped file is sent like an attached one
  el.addEventListener("dragover", (ev) => {
    if (group) return; // files are not sent to groups (yet)
    if (![...(ev.dataTransfer?.types || [])].includes("Files")) return;
    ev.preventDefault();
    el.classList.add("dropping");
  });
  el.addEventListener("dragleave", (ev) => {
    if (!el.contains(ev.relatedTarget)) el.classList.remove("dropping");
  });
  el.addEventListener("drop", (ev) => {
    ev.preventDefault();
    if (group) return;
    el.classList.remove("dropping");
    for (const f of ev.dataTransfer?.files || []) sendFile(f);
  });
  if (store.messages.has(address)) {
    queueMicrotask(() => {
      renderAll();
      markRead(address);
    });
  }
  load();
  setTimeout(() => composer.focus(), 0);
  return {
    el,
    dispose() {
      document.removeEventListener("visibilitychange", onVisible);
      for (const u of unsubs) u();
    },
  };
}
