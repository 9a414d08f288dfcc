// Message catalogs (i18n/en.json, i18n/ko.json: identical key sets) and locale formatting.

export const LANGUAGES = ["en", "ko"];
const catalogs = {};
let lang = "en";
const listeners = new Set();

/** The language the browser prefers: ko* → Korean, anything else → English. */
export function browserLanguage() {
  const prefs = navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language || "en"];
  for (const p of prefs) {
    const base = String(p).toLowerCase().split("-")[0];
    if (base === "ko") return "ko";
    if (base === "en") return "en";
  }
  return "en";
}

/** Load both catalogs (they are small) so switching language is instant. */
export async function loadCatalogs() {
  await Promise.all(
    LANGUAGES.map(async (code) => {
      const res = await fetch(`/static/i18n/${code}.json`);
      catalogs[code] = await res.json();
    }),
  );
}

export function currentLanguage() {
  return lang;
}

/** Switch the UI language ("" = the browser's); updates `<html lang>` and notifies listeners. */
export function setLanguage(code) {
  const next = LANGUAGES.includes(code) ? code : browserLanguage();
  const changed = next !== lang;
  lang = next;
  document.documentElement.lang = lang;
  document.title = t("app.title");
  if (changed) for (const fn of listeners) fn(lang);
  return changed;
}

export function onLanguageChange(fn) {
  listeners.add(fn);
}

/** The catalog text for `key`, with `{name}` placeholders filled from `vars` (as plain text). */
export function t(key, vars = {}) {
  const cat = catalogs[lang] || {};
  let text = cat[key] ?? catalogs.en?.[key] ?? key;
  for (const [name, value] of Object.entries(vars)) text = text.split(`{${name}}`).join(String(value));
  return text;
}

/** The translated text for an API error code, with a generic fallback naming the code. */
export function errorText(code) {
  const key = `error.${code}`;
  const cat = catalogs[lang] || {};
  if (key in cat) return cat[key];
  return t("error.generic", { code: code || "internal" });
}

function startOfDay(ms) {
  const d = new Date(ms);
  d.setHours(0, 0, 0, 0);
  return d.getTime();
}

/** Days between `ms` and today (0 = today, 1 = yesterday), by local calendar days. */
function daysAgo(ms, now = Date.now()) {
  return Math.round((startOfDay(now) - startOfDay(ms)) / 86400000);
}

/** Clock time of a message, per locale (e.g. "3:04 PM" / "오후 3:04"). */
export function formatTime(ms) {
  return new Intl.DateTimeFormat(lang, { hour: "numeric", minute: "2-digit" }).format(new Date(ms));
}

/** Full date and time (tooltips). */
export function formatDateTime(ms) {
  return new Intl.DateTimeFormat(lang, { dateStyle: "medium", timeStyle: "short" }).format(new Date(ms));
}

/** A day label for separators: today / yesterday, weekday within a week, else the date. */
export function dayLabel(ms) {
  const ago = daysAgo(ms);
  if (ago === 0) return t("day.today");
  if (ago === 1) return t("day.yesterday");
  if (ago > 1 && ago < 7) return new Intl.DateTimeFormat(lang, { weekday: "long" }).format(new Date(ms));
  return new Intl.DateTimeFormat(lang, { dateStyle: "long" }).format(new Date(ms));
}

/** A compact time for the chat list: the clock today, else a short day label. */
export function shortWhen(ms) {
  const ago = daysAgo(ms);
  if (ago === 0) return formatTime(ms);
  if (ago === 1) return t("day.yesterday");
  if (ago > 1 && ago < 7) return new Intl.DateTimeFormat(lang, { weekday: "short" }).format(new Date(ms));
  return new Intl.DateTimeFormat(lang, { month: "short", day: "numeric" }).format(new Date(ms));
}

/** A duration in ms as a human label ("5 minutes" / "5분"), using Intl where it can. */
export function formatDuration(ms) {
  const units = [
    ["week", 604800000],
    ["day", 86400000],
    ["hour", 3600000],
    ["minute", 60000],
    ["second", 1000],
  ];
  for (const [unit, size] of units) {
    if (ms >= size && ms % size === 0) {
      return new Intl.NumberFormat(lang, { style: "unit", unit, unitDisplay: "long" }).format(ms / size);
    }
  }
  return new Intl.NumberFormat(lang, { style: "unit", unit: "second", unitDisplay: "long" }).format(Math.round(ms / 1000));
}
