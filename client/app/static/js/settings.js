// Settings: profile (display name, own address), receipts, language, notifications, passphrase.
import { h } from "./dom.js";
import { t } from "./i18n.js";
import { go, store } from "./store.js";
import { busy, copyButton, field } from "./util.js";
import { applyState } from "./state.js";

const NOTIFY_KEYS = {
  default: "settings.notify_ask",
  granted: "settings.notify_granted",
  denied: "settings.notify_denied",
  unsupported: "settings.notify_unsupported",
};
const PROTECTION_KEYS = {
  passphrase: "settings.protection_passphrase",
  keyring: "settings.protection_keyring",
  none: "settings.protection_none",
};

function section(title, ...children) {
  return h("section", { class: "card" }, h("h3", { text: title }), children);
}

function toggle(name, testid, labelKey) {
  const on = store.state?.settings?.[name] !== "off";
  const box = h("input", {
    type: "checkbox",
    checked: on,
    "data-testid": testid,
    onchange: () =>
      busy(box, async () => {
        applyState(await store.api.put("/api/settings", { [name]: box.checked ? "on" : "off" }));
      }),
  });
  return h("label", { class: "toggle" }, box, h("span", { text: t(labelKey) }));
}

function profile() {
  const me = store.state?.me || {};
  const name = h("input", { type: "text", maxlength: "64", value: me.display_name || "", "data-testid": "profile-name", dir: "auto" });
  const f = field(t("settings.display_name"), name, t("settings.display_name_hint"));
  const save = h("button", { type: "submit", "data-testid": "profile-save", text: t("action.save") });
  const form = h("form", { class: "row-form" }, f.wrap, save);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(save, async () => {
      applyState(await store.api.put("/api/profile", { display_name: name.value.trim() }));
      save.textContent = t("action.saved");
    });
  });
  const addr = h("input", { type: "text", readonly: "readonly", value: me.address || "", "data-testid": "my-address" });
  const a = field(t("settings.my_address"), addr, t("settings.my_address_hint"));
  return section(t("settings.profile"), form, h("div", { class: "copy-row" }, a.wrap, copyButton(() => me.address || "", "my-address-copy")));
}

function language() {
  const current = store.state?.settings?.language || "";
  const select = h(
    "select",
    {
      "data-testid": "setting-language",
      onchange: () => busy(select, async () => applyState(await store.api.put("/api/settings", { language: select.value }))),
    },
    h("option", { value: "", selected: current === "", text: t("settings.language_auto") }),
    h("option", { value: "en", selected: current === "en", text: "English" }),
    h("option", { value: "ko", selected: current === "ko", text: "한국어" }),
  );
  return section(t("settings.language"), field(t("settings.language_label"), select).wrap);
}

function notifications() {
  const supported = "Notification" in window;
  const status = h("p", { class: "hint", "data-testid": "notify-status" });
  const show = () => {
    const p = supported ? Notification.permission : "unsupported";
    status.textContent = t(NOTIFY_KEYS[p] || "settings.notify_ask");
  };
  show();
  const button = h("button", {
    type: "button",
    "data-testid": "notify-enable",
    disabled: !supported || Notification.permission !== "default",
    text: t("settings.notify_button"),
    onclick: async () => {
      await Notification.requestPermission();
      show();
      button.disabled = Notification.permission !== "default";
    },
  });
  return section(t("settings.notifications"), status, button);
}

function passphrase() {
  const has = store.state?.protection === "passphrase";
  const first = h("input", { type: "password", autocomplete: "new-password", "data-testid": "passphrase-new" });
  const again = h("input", { type: "password", autocomplete: "new-password", "data-testid": "passphrase-again" });
  const msg = h("p", { class: "hint", role: "status", "data-testid": "passphrase-status" });
  const save = h("button", { type: "submit", "data-testid": "passphrase-submit", text: has ? t("settings.passphrase_change") : t("settings.passphrase_set") });
  const form = h(
    "form",
    { class: "stack" },
    h("p", { class: "hint", text: t(PROTECTION_KEYS[store.state?.protection] || "settings.protection_none") }),
    field(t("settings.passphrase_new"), first).wrap,
    field(t("settings.passphrase_again"), again).wrap,
    save,
    has
      ? h("button", {
          type: "button",
          class: "danger",
          "data-testid": "passphrase-remove",
          text: t("settings.passphrase_remove"),
          onclick: (ev) => busy(ev.currentTarget, async () => {
            applyState(await store.api.post("/api/passphrase", { new: "" }));
            msg.textContent = t("settings.passphrase_removed");
          }),
        })
      : null,
    msg,
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (!first.value) return;
    if (first.value !== again.value) {
      msg.textContent = t("settings.passphrase_mismatch");
      return;
    }
    busy(save, async () => {
      applyState(await store.api.post("/api/passphrase", { new: first.value }));
      first.value = again.value = "";
      msg.textContent = t("settings.passphrase_saved");
    });
  });
  return section(t("settings.passphrase"), form);
}

/** The settings screen; returns {el, dispose}. */
export function settings() {
  const el = h(
    "section",
    { class: "screen settings", "aria-labelledby": "settings-title" },
    h("header", { class: "screen-head" }, h("button", { type: "button", class: "back", "data-testid": "back", "aria-label": t("action.back"), text: "←", onclick: () => go("home") }), h("h2", { id: "settings-title", text: t("settings.title") })),
    profile(),
    section(t("settings.receipts"), h("p", { class: "hint", text: t("settings.receipts_hint") }), toggle("read_receipts", "setting-read-receipts", "settings.read_receipts"), toggle("delivery_receipts", "setting-delivery-receipts", "settings.delivery_receipts")),
    language(),
    notifications(),
    passphrase(),
    h("p", { class: "version", text: t("settings.version", { version: store.state?.version || "" }) }),
  );
  return { el, dispose() {} };
}
