// Verify a contact: the safety number (groups of 5 digits) and its QR, and — when the
// contact's key changed — the NEW number, shown before the user accepts it.
import { enc } from "./api.js";
import { confirmDialog } from "./dialog.js";
import { h, mount } from "./dom.js";
import { t } from "./i18n.js";
import { qrCanvas } from "./qr.js";
import { go, nameOf, store } from "./store.js";
import { busy, showError } from "./util.js";

/** The number as groups of five digits (spans, separated by spaces for copy/paste). */
function digits(number, testid) {
  const plain = String(number || "").replace(/\D/g, "");
  const groups = plain.match(/.{1,5}/g) || [];
  const el = h("p", { class: "safety-number", "data-testid": testid, "aria-label": t("verify.number_label") });
  groups.forEach((g, i) => {
    if (i) el.appendChild(document.createTextNode(" "));
    el.appendChild(h("span", { class: "group", text: g }));
  });
  return el;
}

function body(address, v, refresh) {
  const who = nameOf(store.chats.get(address), address);
  const parts = [
    h("p", { class: "hint", text: t("verify.explain", { name: who }) }),
    digits(v.safety_number, "safety-number"),
    v.qr && v.qr.length ? qrCanvas(v.qr, t("verify.qr_label"), "verify-qr") : null,
    h("p", { class: v.verified ? "badge ok" : "badge", "data-testid": "verify-status", text: v.verified ? t("verify.is_verified") : t("verify.not_verified") }),
  ];
  if (v.key_changed) {
    const accept = h("button", {
      type: "button",
      class: "danger",
      "data-testid": "accept-new-key",
      text: t("verify.accept_new"),
      onclick: async () => {
        if (!(await confirmDialog(t("verify.accept_new"), t("verify.accept_confirm"), t("verify.accept_new")))) return;
        busy(accept, async () => refresh(await store.api.post(`/api/contacts/${enc(address)}/verify`, { accept_new_key: true })));
      },
    });
    parts.push(
      h(
        "div",
        { class: "warning", role: "alert", "data-testid": "key-changed" },
        h("h3", { text: t("verify.key_changed_title") }),
        h("p", { text: t("verify.key_changed_text", { name: who }) }),
        h("p", { class: "label", text: t("verify.new_number") }),
        digits(v.new_safety_number, "new-safety-number"),
        accept,
      ),
    );
  } else if (!v.verified) {
    const confirm = h("button", {
      type: "button",
      class: "primary",
      "data-testid": "verify-confirm",
      text: t("verify.confirm"),
      onclick: () => busy(confirm, async () => refresh(await store.api.post(`/api/contacts/${enc(address)}/verify`, { confirm: true }))),
    });
    parts.push(h("p", { class: "hint", text: t("verify.confirm_hint") }), confirm);
  }
  return parts;
}

/** The verify screen for `address`; returns {el, dispose}. */
export function verify(address) {
  const content = h("div", { class: "verify-body" }, h("p", { text: t("common.loading") }));
  const refresh = (v) => mount(content, body(address, v, refresh));
  store.api.get(`/api/contacts/${enc(address)}/verify`).then(refresh, (err) => {
    mount(content, h("p", { text: t("common.failed") }));
    showError(err);
  });
  const el = h(
    "section",
    { class: "screen verify", "aria-labelledby": "verify-title" },
    h(
      "header",
      { class: "screen-head" },
      h("button", { type: "button", class: "back", "data-testid": "back", "aria-label": t("action.back"), text: "←", onclick: () => go(store.chats.has(address) ? "chat" : "contacts", address) }),
      h("h2", { id: "verify-title", text: t("verify.title") }),
    ),
    h("p", { class: "addr", text: address }),
    content,
  );
  return { el, dispose() {} };
}
