// Devices of this account: list, link a new one (code + QR), remove with confirmation.
import { confirmDialog } from "./dialog.js";
import { h, mount } from "./dom.js";
import { errorText, t } from "./i18n.js";
import { qrCanvas } from "./qr.js";
import { go, on, store } from "./store.js";
import { busy, copyButton, showError } from "./util.js";

function deviceItem(d, reload) {
  const remove = d.this_device
    ? null
    : h("button", {
        type: "button",
        class: "danger",
        "data-testid": "device-remove",
        "aria-label": t("devices.remove_label", { name: d.name || d.id }),
        text: t("devices.remove"),
        onclick: async () => {
          if (!(await confirmDialog(t("devices.remove"), t("devices.remove_confirm", { name: d.name || d.id }), t("devices.remove")))) return;
          busy(remove, async () => {
            await store.api.del(`/api/devices/${encodeURIComponent(d.id)}`);
            reload();
          });
        },
      });
  return h(
    "li",
    { class: "device", "data-testid": "device-item", "data-id": d.id },
    h("span", { class: "device-name", dir: "auto", text: d.name || t("devices.unnamed") }),
    h("code", { class: "device-id", text: d.id }),
    d.this_device ? h("span", { class: "badge ok", text: t("devices.this_device") }) : null,
    remove,
  );
}

/** The devices screen; returns {el, dispose}. */
export function devices() {
  const list = h("ul", { class: "devices", "data-testid": "devices" }, h("li", { text: t("common.loading") }));
  const linkArea = h("div", { class: "link-area", "aria-live": "polite" });
  const reload = async () => {
    try {
      const all = await store.api.get("/api/devices");
      mount(list, all.map((d) => deviceItem(d, reload)));
    } catch (err) {
      showError(err);
    }
  };
  const linkButton = h("button", {
    type: "button",
    class: "primary",
    "data-testid": "link-device",
    text: t("devices.link"),
    onclick: () =>
      busy(linkButton, async () => {
        const { code, qr } = await store.api.post("/api/devices/link");
        const codeField = h("input", { type: "text", readonly: "readonly", value: code, "data-testid": "link-code", "aria-label": t("devices.link_code") });
        mount(
          linkArea,
          h("p", { class: "hint", text: t("devices.link_explain") }),
          qr && qr.length ? qrCanvas(qr, t("devices.link_qr"), "link-qr") : null,
          h("div", { class: "copy-row" }, codeField, copyButton(() => code, "link-copy")),
          h("p", { class: "status", "data-testid": "link-status", text: t("devices.link_waiting") }),
        );
      }),
  });
  reload();
  const unsubs = [
    on("link", (ev) => {
      const status = linkArea.querySelector("[data-testid=link-status]");
      const text = ev.ok ? t("devices.link_done", { name: ev.device?.name || ev.device?.id || "" }) : errorText(ev.error || "internal");
      if (status) status.textContent = text;
      else mount(linkArea, h("p", { class: "status", "data-testid": "link-status", text }));
      reload();
    }),
    on("resync", reload),
  ];
  const el = h(
    "section",
    { class: "screen", "aria-labelledby": "devices-title" },
    h("header", { class: "screen-head" }, h("button", { type: "button", class: "back", "data-testid": "back", "aria-label": t("action.back"), text: "←", onclick: () => go("home") }), h("h2", { id: "devices-title", text: t("devices.title") })),
    list,
    linkButton,
    linkArea,
  );
  return { el, dispose: () => unsubs.forEach((u) => u()) };
}
