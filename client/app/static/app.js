// Boot and the page shell: the secret from the URL fragment, the catalogs, the root screen
// (unlock / onboarding / main), the header (connection state, language, navigation).
import { Api, takeKey } from "./js/api.js";
import { chatList, loadChats } from "./js/chat-list.js";
import { contacts } from "./js/contacts.js";
import { conversation } from "./js/conversation.js";
import { devices } from "./js/devices.js";
import { groupScreen } from "./js/group.js";
import { h, mount } from "./js/dom.js";
import { handleEvent } from "./js/events.js";
import { browserLanguage, currentLanguage, errorText, loadCatalogs, onLanguageChange, setLanguage, t } from "./js/i18n.js";
import { onboarding, welcome } from "./js/onboarding.js";
import { settings } from "./js/settings.js";
import { applyState } from "./js/state.js";
import { connectionState, emit, go, on, store } from "./js/store.js";
import { unlock } from "./js/unlock.js";
import { showError } from "./js/util.js";
import { verify } from "./js/verify.js";

const CONNECTION_KEYS = { online: "connection.online", connecting: "connection.connecting", offline: "connection.offline" };

function connectionIndicator() {
  const el = h("p", { class: "connection", "data-testid": "connection-state", role: "status" });
  const render = () => {
    const s = connectionState();
    el.dataset.state = s;
    el.textContent = t(CONNECTION_KEYS[s]);
  };
  render();
  disposers.push(on("state", render), on("ws", render));
  return el;
}

function langSwitch() {
  const select = h(
    "select",
    { "data-testid": "lang-switch", "aria-label": t("settings.language_label"), class: "lang-switch" },
    h("option", { value: "en", selected: currentLanguage() === "en", text: "English" }),
    h("option", { value: "ko", selected: currentLanguage() === "ko", text: "한국어" }),
  );
  select.addEventListener("change", async () => {
    setLanguage(select.value);
    if (store.state && !store.state.locked && store.state.joined) {
      try {
        applyState(await store.api.put("/api/settings", { language: select.value }));
      } catch (err) {
        showError(err);
      }
    }
  });
  return select;
}

const NAV = [
  ["home", "nav.chats"],
  ["contacts", "nav.contacts"],
  ["devices", "nav.devices"],
  ["settings", "nav.settings"],
];

function header(withNav) {
  const nav = withNav
    ? h(
        "nav",
        { class: "main-nav", "aria-label": t("nav.label") },
        NAV.map(([screen, key]) =>
          h("button", {
            type: "button",
            "data-testid": `nav-${screen === "home" ? "chats" : screen}`,
            "aria-current": store.view.screen === screen ? "page" : null,
            text: t(key),
            onclick: () => go(screen),
          }),
        ),
      )
    : null;
  return h("header", { class: "top" }, h("h1", { class: "brand", text: t("app.title") }), nav, h("div", { class: "top-tools" }, connectionIndicator(), langSwitch()));
}

const SCREENS = {
  chat: (v) => conversation(v.chat),
  group: (v) => groupScreen(v.chat),
  contacts: () => contacts(),
  devices: () => devices(),
  settings: () => settings(),
  verify: (v) => verify(v.chat),
  welcome: () => welcome(),
};

let disposers = [];
let mode = null;

function dispose() {
  for (const d of disposers) d();
  disposers = [];
}

function rootMode() {
  if (store.authFailed) return "noauth";
  if (!store.state) return "loading";
  if (store.state.locked) return "locked";
  if (!store.state.joined) return "onboarding";
  return "main";
}

function renderMain(app) {
  const side = chatList();
  const main = h("main", { class: "main-pane", id: "main" });
  let current = null;
  const show = () => {
    if (current) current.dispose();
    const v = store.view;
    const make = SCREENS[v.screen];
    current = make ? make(v) : { el: h("div", { class: "placeholder" }, h("p", { text: t("chats.pick") })), dispose() {} };
    mount(main, current.el);
    app.classList.toggle("pane-main", Boolean(make));
  };
  show();
  const offView = on("view", () => {
    app.querySelectorAll(".main-nav [aria-current]").forEach((b) => b.removeAttribute("aria-current"));
    const screen = store.view.screen === "chat" || store.view.screen === "group" ? "home" : store.view.screen;
    app.querySelector(`.main-nav [data-testid=nav-${screen === "home" ? "chats" : screen}]`)?.setAttribute("aria-current", "page");
    show();
  });
  disposers.push(() => current && current.dispose(), offView, side.dispose);
  return h("div", { class: "layout" }, side.el, main);
}

function render() {
  const app = document.getElementById("app");
  dispose();
  mode = rootMode();
  app.classList.remove("pane-main"); // renderMain sets it again for an open screen
  let body;
  if (mode === "noauth") body = h("section", { class: "screen center" }, h("h2", { text: t("app.title") }), h("p", { role: "alert", "data-testid": "no-key", text: errorText("unauthorized") }));
  else if (mode === "loading") body = h("p", { class: "screen center", text: t("common.loading") });
  else if (mode === "locked") body = unlock().el;
  else if (mode === "onboarding") body = onboarding().el;
  else {
    if (store.welcome) {
      store.welcome = false;
      store.view = { screen: "welcome", chat: null };
    }
    body = renderMain(app);
  }
  mount(app, header(mode === "main"), h("p", { id: "banner", class: "banner", role: "alert", "data-testid": "error", hidden: true }), body);
}

async function resync() {
  if (rootMode() !== "main") return;
  try {
    await loadChats();
    emit("chats");
  } catch (err) {
    showError(err);
  }
}

async function boot() {
  await loadCatalogs();
  setLanguage(browserLanguage());
  const key = takeKey();
  store.api = new Api(key);
  if (!key) {
    store.authFailed = true;
    render();
    return;
  }
  render();
  on("state", ({ prev }) => {
    if (rootMode() === mode && prev) return;
    if (rootMode() === "main") resync().then(render);
    else render();
  });
  onLanguageChange(() => render());
  on("resync", resync);
  on("unknown-chat", resync);
  try {
    applyState(await store.api.get("/api/state"));
  } catch (err) {
    if (err.code === "unauthorized") {
      store.authFailed = true;
      render();
      return;
    }
    showError(err);
  }
  store.api.connect(handleEvent, (up, reason) => {
    store.wsUp = up;
    if (reason === "unauthorized") {
      store.authFailed = true;
      render();
    }
    emit("ws", up);
  });
}

boot();
