// Modal dialogs on the native <dialog>: focus is trapped, Esc closes, focus returns to the opener.
import { h } from "./dom.js";
import { t } from "./i18n.js";

/**
 * Show a dialog. `actions`: [{label, testid, primary, onClick}] — onClick may return false
 * (or a promise of false) to keep the dialog open. Resolves with the action's value when closed.
 */
export function openDialog({ title, body = [], actions = [], testid = "dialog" }) {
  const opener = document.activeElement;
  return new Promise((resolve) => {
    let result = null;
    const titleId = `dlg-${Math.random().toString(36).slice(2)}`;
    const buttons = actions.map((a) =>
      h("button", {
        type: "button",
        class: a.primary ? "primary" : a.danger ? "danger" : "",
        "data-testid": a.testid || null,
        text: a.label,
        onclick: async () => {
          const keep = a.onClick ? await a.onClick() : undefined;
          if (keep === false) return;
          result = a.value ?? true;
          dlg.close();
        },
      }),
    );
    const dlg = h(
      "dialog",
      { class: "dialog", "aria-labelledby": titleId, "data-testid": testid },
      h("h2", { id: titleId, text: title }),
      h("div", { class: "dialog-body" }, body),
      h("div", { class: "dialog-actions" }, buttons),
    );
    dlg.addEventListener("close", () => {
      dlg.remove();
      if (opener && opener.focus) opener.focus();
      resolve(result);
    });
    document.body.appendChild(dlg);
    dlg.showModal();
  });
}

/** Ask a yes/no question; resolves true if confirmed. */
export async function confirmDialog(title, text, okLabel) {
  const ok = await openDialog({
    title,
    body: [h("p", { text })],
    testid: "confirm-dialog",
    actions: [
      { label: t("action.cancel"), testid: "dialog-cancel", value: false },
      { label: okLabel, testid: "dialog-confirm", danger: true, value: true },
    ],
  });
  return ok === true;
}
