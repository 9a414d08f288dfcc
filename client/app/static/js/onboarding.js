// Onboarding on an empty device home: paste (or scan) an invite or a device-link code, choose
// a display name (any Unicode), optionally a passphrase; then see one's own address.
import { h } from "./dom.js";
import { t } from "./i18n.js";
import { openDialog } from "./dialog.js";
import { applyState } from "./state.js";
import { go, store } from "./store.js";
import { busy, copyButton, field } from "./util.js";

/** Scan a QR code with the camera when the browser has BarcodeDetector; resolves to its text. */
async function scan() {
  const video = h("video", { class: "scanner", autoplay: true, muted: true, playsinline: true, "aria-label": t("onboarding.scan_video") });
  let stream = null;
  let found = null;
  let stop = false;
  const done = openDialog({ title: t("onboarding.scan"), body: [video], testid: "scan-dialog", actions: [{ label: t("action.cancel"), testid: "dialog-cancel" }] });
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" } });
    video.srcObject = stream;
    const detector = new window.BarcodeDetector({ formats: ["qr_code"] });
    const tick = async () => {
      if (stop) return;
      try {
        const codes = await detector.detect(video);
        if (codes.length) {
          found = codes[0].rawValue;
          video.closest("dialog")?.close();
          return;
        }
      } catch {
        /* the frame was not ready yet */
      }
      setTimeout(tick, 250);
    };
    tick();
  } catch {
    video.closest("dialog")?.close();
  }
  await done;
  stop = true;
  if (stream) for (const track of stream.getTracks()) track.stop();
  return found;
}

/** The onboarding screen; returns {el, dispose}. */
export function onboarding() {
  const code = h("textarea", { rows: "3", "data-testid": "join-code", required: true, spellcheck: "false", autocomplete: "off" });
  const codeField = field(t("onboarding.code"), code, t("onboarding.code_hint"));
  const name = h("input", { type: "text", maxlength: "64", "data-testid": "join-name", dir: "auto", required: true, autocomplete: "nickname" });
  const nameField = field(t("onboarding.name"), name, t("onboarding.name_hint"));
  const pass = h("input", { type: "password", autocomplete: "new-password", "data-testid": "join-passphrase" });
  const passField = field(t("onboarding.passphrase"), pass, t("onboarding.passphrase_hint"));
  const canScan = "BarcodeDetector" in window && navigator.mediaDevices && navigator.mediaDevices.getUserMedia;
  const scanButton = canScan
    ? h("button", {
        type: "button",
        "data-testid": "join-scan",
        text: t("onboarding.scan"),
        onclick: async () => {
          const text = await scan();
          if (text) code.value = text;
        },
      })
    : null;
  const button = h("button", { type: "submit", class: "primary", "data-testid": "join-submit", text: t("onboarding.join") });
  const form = h("form", { class: "stack" }, codeField.wrap, scanButton, nameField.wrap, passField.wrap, button);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = code.value.trim();
    const body = { display_name: name.value.trim() };
    // a device-link code from `haven device link` adds this device to an existing account
    if (value.startsWith("haven:link:")) body.link = value;
    else body.invite = value;
    if (pass.value) body.passphrase = pass.value;
    // set before the request: the WebSocket's state event may announce the join first
    store.welcome = true;
    busy(button, async () => {
      applyState(await store.api.post("/api/join", body));
    }).then(() => {
      if (!store.state?.joined) store.welcome = false;
    });
  });
  setTimeout(() => code.focus(), 0);
  const el = h(
    "section",
    { class: "screen center", "aria-labelledby": "onboarding-title" },
    h("h2", { id: "onboarding-title", text: t("onboarding.title") }),
    h("p", { class: "hint", text: t("onboarding.explain") }),
    form,
  );
  return { el, dispose() {} };
}

/** After joining: one's own address, with a copy button, and the way on. */
export function welcome() {
  const me = store.state?.me || {};
  const addr = h("input", { type: "text", readonly: "readonly", value: me.address || "", "data-testid": "my-address" });
  const el = h(
    "section",
    { class: "screen center", "aria-labelledby": "welcome-title" },
    h("h2", { id: "welcome-title", text: t("welcome.title", { name: me.display_name || "" }) }),
    h("p", { class: "hint", text: t("welcome.explain") }),
    h("div", { class: "copy-row" }, field(t("settings.my_address"), addr).wrap, copyButton(() => me.address || "", "my-address-copy")),
    h("button", { type: "button", class: "primary", "data-testid": "welcome-continue", text: t("welcome.continue"), onclick: () => go("home") }),
  );
  return { el, dispose() {} };
}


