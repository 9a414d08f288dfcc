// A message with a file (docs/app.md "Attachments"): its name (always as text), size, an image
// preview, a download or save button, transfer progress, and why it is unavailable.
//
// Previews are `blob:` URLs made from bytes fetched with the page's key, and only for the
// image types the daemon marks `preview` (png, jpeg, gif, webp): SVG, HTML and everything
// else is offered as a download only, never rendered in this origin.
import { h } from "./dom.js";
import { currentLanguage, errorText, t } from "./i18n.js";
import { store } from "./store.js";
import { showError } from "./util.js";

const PREVIEW_TYPES = new Set(["image/png", "image/jpeg", "image/gif", "image/webp"]);
// message id → {kind: "thumb"|"full", url}: a re-rendered message keeps its preview
const previews = new Map();
// message ids this page asked the daemon to download on its own (auto-download)
const asked = new Set();
// message id → {done, total} while a download runs (from `progress` events)
export const transfers = new Map();

/** A byte count for people: 1.2 MB, 340 kB. */
export function formatSize(n) {
  const units = ["B", "kB", "MB", "GB"];
  let v = n;
  let i = 0;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i += 1;
  }
  const digits = i === 0 || v >= 100 ? 0 : 1;
  return `${new Intl.NumberFormat(currentLanguage(), { maximumFractionDigits: digits }).format(v)} ${units[i]}`;
}

/** A progress bar (`data-testid` given) for `done` of `total` bytes. */
export function progressBar(testid, done, total, label) {
  return h("progress", { "data-testid": testid, max: String(Math.max(total, 1)), value: String(Math.min(done, total)), "aria-label": label });
}

async function loadPreview(m, img) {
  const f = m.file;
  const kind = f.downloaded ? "full" : "thumb";
  const have = previews.get(m.id);
  if (have && (have.kind === kind || kind === "thumb")) {
    img.src = have.url;
    return;
  }
  try {
    const type = kind === "full" ? f.mime : "image/jpeg";
    if (!PREVIEW_TYPES.has(type)) return;
    const blob = await store.api.blob(`/api/messages/${m.id}/${kind === "full" ? "file" : "thumb"}`, type);
    const now = previews.get(m.id);
    if (now && (now.kind === "full" || kind === "thumb")) {
      img.src = now.url; // a better (or the same) one arrived meanwhile
      return;
    }
    const url = URL.createObjectURL(blob);
    previews.set(m.id, { kind, url });
    if (now) URL.revokeObjectURL(now.url);
    img.src = url;
  } catch {
    /* no preview: the name and the buttons still show */
  }
}

/** Our own image just sent from this page: preview it from the local bytes (the daemon keeps
 * no copy of a file sent from the page, only its thumbnail). */
export function rememberPreview(m, file) {
  if (!m.file || !m.file.preview || !PREVIEW_TYPES.has(m.file.mime) || previews.has(m.id)) return;
  previews.set(m.id, { kind: "full", url: URL.createObjectURL(new Blob([file], { type: m.file.mime })) });
}

async function download(m, button) {
  button.disabled = true;
  try {
    await store.api.post(`/api/messages/${m.id}/download`);
  } catch (err) {
    if (err.code !== "not_found") showError(err); // gone: the message's own note says why
  } finally {
    button.disabled = false;
  }
}

/** Save the daemon's copy through the browser (always as a download, never opened here). */
async function save(m) {
  try {
    const blob = await store.api.blob(`/api/messages/${m.id}/file`);
    const url = URL.createObjectURL(blob);
    const a = h("a", { href: url, download: m.file.name, hidden: true });
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (err) {
    showError(err);
  }
}

/** A received file up to the auto-download size (State.auto_download) that is not here
 * yet: ask the daemon for it once, as soon as it is shown. */
function autoDownload(m) {
  const f = m.file;
  const limit = store.state?.auto_download ?? 0;
  if (m.outgoing || f.downloaded || f.state !== "pending" || f.error || f.size > limit || asked.has(m.id)) return;
  asked.add(m.id);
  store.api.post(`/api/messages/${m.id}/download`).catch(() => {}); // its `update` event shows how it went
}

/** The content of a `file` message. */
export function renderFile(m) {
  const f = m.file;
  autoDownload(m);
  const canPreview = f.preview && PREVIEW_TYPES.has(f.mime) && (f.thumb || f.downloaded);
  let img = null;
  if (canPreview) {
    img = h("img", { class: "file-preview", "data-testid": "file-preview", alt: t("file.preview", { name: f.name }) });
    loadPreview(m, img);
  }
  const running = transfers.get(m.id);
  const unavailable = f.state === "failed" && f.error === "not_found";
  let button = null;
  if (!f.downloaded && !m.outgoing && !unavailable && !running) {
    button = h("button", { type: "button", class: "file-button", "data-testid": "file-download", text: t("file.download") });
    button.addEventListener("click", () => download(m, button));
  } else if (f.downloaded) {
    button = h("button", { type: "button", class: "file-button", "data-testid": "file-save", text: t("file.save") });
    button.addEventListener("click", () => save(m));
  }
  return h(
    "div",
    { class: "file", "data-testid": "file", "data-state": f.state, "data-mime": f.mime, "data-downloaded": f.downloaded ? "yes" : "no" },
    img,
    h(
      "div",
      { class: "file-row" },
      h("span", { class: "file-name", "data-testid": "file-name", dir: "auto", text: f.name }),
      h("span", { class: "file-size", "data-testid": "file-size", text: formatSize(f.size) }),
      button,
    ),
    running ? progressBar("file-progress", running.done, running.total, t("file.downloading", { name: f.name })) : null,
    unavailable ? h("p", { class: "file-note", "data-testid": "file-unavailable", role: "status", text: t("file.unavailable") }) : null,
    f.error && !unavailable ? h("p", { class: "file-note", "data-testid": "file-error", role: "status", text: errorText(f.error) }) : null,
    m.text ? h("p", { class: "msg-text", "data-testid": "message-text", dir: "auto", text: m.text }) : null,
  );
}

/** A `progress` event for a download: remember it; whether it changed what shows. */
export function noteProgress(ev) {
  if (!ev.id) return false;
  if (ev.phase === "download" && ev.done < ev.total) {
    transfers.set(ev.id, { done: ev.done, total: ev.total });
    return true;
  }
  return transfers.delete(ev.id);
}
