// Contacts: display names (from the contacts themselves, end to end) and local nicknames.
import { enc } from "./api.js";
import { h, mount } from "./dom.js";
import { t } from "./i18n.js";
import { openChat } from "./chat-list.js";
import { go, on, store } from "./store.js";
import { busy, showError } from "./util.js";

function item(c) {
  const nick = h("input", {
    type: "text",
    value: c.nickname || "",
    maxlength: "64",
    "data-testid": "nickname-input",
    "aria-label": t("contacts.nickname_label", { name: c.display_name || c.address }),
    placeholder: t("contacts.nickname_placeholder"),
  });
  const save = h("button", { type: "submit", "data-testid": "nickname-save", text: t("action.save") });
  const form = h("form", { class: "nickname" }, nick, save);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(save, async () => {
      await store.api.put(`/api/contacts/${enc(c.address)}/nickname`, { nickname: nick.value.trim() });
      save.textContent = t("action.saved");
    });
  });
  return h(
    "li",
    { class: "contact", "data-testid": "contact-item", "data-address": c.address },
    h(
      "div",
      { class: "contact-main" },
      h("span", { class: "contact-name", dir: "auto", text: c.nickname || c.display_name || c.address }),
      c.nickname && c.display_name ? h("span", { class: "contact-real", dir: "auto", text: t("contacts.calls_self", { name: c.display_name }) }) : null,
      h("span", { class: "addr", text: c.address }),
      c.key_changed ? h("span", { class: "badge warn", text: t("contacts.key_changed") }) : c.verified ? h("span", { class: "badge ok", text: t("verify.verified_short") }) : null,
    ),
    form,
    h(
      "div",
      { class: "contact-actions" },
      h("button", { type: "button", "data-testid": "contact-chat", text: t("contacts.message"), onclick: () => openChat(c.address) }),
      h("button", { type: "button", "data-testid": "contact-verify", text: t("verify.open"), onclick: () => go("verify", c.address) }),
    ),
  );
}

/** The contacts screen; returns {el, dispose}. */
export function contacts() {
  const list = h("ul", { class: "contacts", "data-testid": "contacts" }, h("li", { text: t("common.loading") }));
  const load = async () => {
    try {
      const all = await store.api.get("/api/contacts");
      if (list.contains(document.activeElement)) return; // don't yank a field being edited
      mount(list, all.length ? all.map(item) : h("li", { class: "empty", text: t("contacts.empty") }));
    } catch (err) {
      showError(err);
    }
  };
  load();
  const unsubs = [on("contact", load), on("resync", load)];
  const el = h(
    "section",
    { class: "screen", "aria-labelledby": "contacts-title" },
    h("header", { class: "screen-head" }, h("button", { type: "button", class: "back", "data-testid": "back", "aria-label": t("action.back"), text: "←", onclick: () => go("home") }), h("h2", { id: "contacts-title", text: t("contacts.title") })),
    list,
  );
  return { el, dispose: () => unsubs.forEach((u) => u()) };
}
