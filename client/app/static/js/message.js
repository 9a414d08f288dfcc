// One message in a conversation. Message kinds are a registry: attachments or group notices
// later add a renderer here (`messageRenderers[kind]`), nothing else changes.
import { h } from "./dom.js";
import { renderFile } from "./file.js";
import { errorText, formatDateTime, formatDuration, formatTime, t } from "./i18n.js";

/** kind → function(message) returning the element that shows its content. */
export const messageRenderers = {
  text: (m) => h("p", { class: "msg-text", "data-testid": "message-text", dir: "auto", text: m.text }),
  file: (m) => (m.file ? renderFile(m) : messageRenderers.text(m)),
};

const STATUS_KEYS = {
  pending: "status.pending",
  sent: "status.sent",
  delivered: "status.delivered",
  read: "status.read",
};
const TICKS = { pending: "◷", sent: "✓", delivered: "✓✓", read: "✓✓" };

function ticks(status) {
  const label = t(STATUS_KEYS[status] || "status.pending");
  return h("span", { class: `ticks ticks-${status}`, "data-testid": "ticks", role: "img", "aria-label": label, title: label, text: TICKS[status] || "" });
}

/**
 * A group message's counter (KakaoTalk's "1"): how many members have not read it; hidden at 0.
 * Its button opens the sheet listing them (`actions.unread(m)`).
 */
export function unreadCounter(m, actions) {
  if (!m.group || !m.unread_by) return null;
  const label = t("group.unread_label", { count: m.unread_by });
  const hidden = m.receipts_hidden ? ` · ${t("group.receipts_hidden", { count: m.receipts_hidden })}` : "";
  return h("button", {
    type: "button",
    class: "unread-count",
    "data-testid": "unread-count",
    "aria-label": label,
    title: label + hidden,
    text: String(m.unread_by),
    onclick: () => actions.unread && actions.unread(m),
  });
}

/**
 * The element for `m`. `actions` = {edit(m), remove(m), readers(m), unread(m)}, called from
 * its buttons. A group message also shows its sender (incoming) and its counter.
 */
export function renderMessage(m, actions) {
  const render = messageRenderers[m.kind || "text"] || messageRenderers.text;
  const meta = h(
    "div",
    { class: "msg-meta" },
    m.edited ? h("span", { class: "edited", text: t("message.edited") }) : null,
    m.expire_at ? h("span", { class: "expires", title: formatDateTime(m.expire_at), "aria-label": t("message.disappears"), text: "◔" }) : null,
    unreadCounter(m, actions),
    h("time", { datetime: new Date(m.sent_at).toISOString(), title: formatDateTime(m.sent_at), text: formatTime(m.sent_at) }),
    m.outgoing ? ticks(m.status || "pending") : null,
  );
  const notDelivered = m.outgoing && m.not_delivered
    ? h("p", { class: "not-delivered", "data-testid": "not-delivered", role: "status", text: t("message.not_delivered") })
    : null;
  const tools = h(
    "div",
    { class: "msg-tools" },
    h("button", { type: "button", class: "tool", "data-testid": "message-readers", "aria-label": t("message.readers"), title: t("message.readers"), text: "ⓘ", onclick: () => actions.readers(m) }),
    m.outgoing && !m.group && m.kind !== "file" ? h("button", { type: "button", class: "tool", "data-testid": "message-edit", "aria-label": t("message.edit"), title: t("message.edit"), text: "✎", onclick: () => actions.edit(m) }) : null,
    m.outgoing && !m.group ? h("button", { type: "button", class: "tool", "data-testid": "message-delete", "aria-label": t("message.delete"), title: t("message.delete"), text: "✕", onclick: () => actions.remove(m) }) : null,
  );
  return h(
    "article",
    {
      class: `msg ${m.outgoing ? "out" : "in"}${m.not_delivered ? " failed" : ""}`,
      "data-testid": "message",
      "data-id": m.id,
      "data-status": m.outgoing ? m.status || "pending" : null,
      "data-unread": m.group ? String(m.unread_by || 0) : null,
      "data-receipts-hidden": m.group ? String(m.receipts_hidden || 0) : null,
      "aria-label": m.outgoing ? t("message.from_me") : t("message.from_them"),
      tabindex: "-1",
    },
    h(
      "div",
      { class: "bubble" },
      m.group && !m.outgoing ? h("p", { class: "msg-sender", "data-testid": "message-sender", dir: "auto", text: m.sender_name || m.sender }) : null,
      render(m),
      meta,
      notDelivered,
      m.outgoing && m.error ? h("p", { class: "not-delivered", "data-testid": "message-error", role: "status", text: errorText(m.error) }) : null,
    ),
    tools,
  );
}

/** Timer choices for the chat header (ms; 0 = off). */
export const TIMER_CHOICES = [0, 30000, 300000, 3600000, 86400000, 604800000];

export function timerLabel(ms) {
  return ms ? formatDuration(ms) : t("timer.off");
}
