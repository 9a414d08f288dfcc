// The only way this UI builds DOM: elements, attributes and text nodes. Never HTML parsing:
// message texts, display names and nicknames are hostile input (docs/app.md, security).

/**
 * Create an element. `attrs` keys: `class`, `text` (textContent), `on<Event>` (listener),
 * `hidden`/`disabled`/`checked`/`selected` (booleans), `value`, anything else via setAttribute.
 * Children: nodes, strings (as text nodes), null/false (skipped) or arrays of those.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") el.textContent = String(value);
    else if (name === "class") el.className = value;
    else if (name.startsWith("on")) {
      // listeners only ever as functions: an inline handler attribute is never written
      if (typeof value === "function") el.addEventListener(name.slice(2).toLowerCase(), value);
    } else if (["hidden", "disabled", "checked", "selected", "required", "autofocus"].includes(name)) {
      el[name] = Boolean(value);
    } else if (name === "value") el.value = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else if (c instanceof Node) el.appendChild(c);
    else el.appendChild(document.createTextNode(String(c)));
  }
}

/** Replace all children of `el` with `children`. */
export function mount(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** Announce a short text in the page's polite live region (screen readers). */
export function announce(text) {
  const live = document.getElementById("live");
  if (!live) return;
  const line = h("p", { text });
  live.appendChild(line);
  while (live.childNodes.length > 5) live.firstChild.remove();
}
