// Draw a QR matrix (rows of 0/1 from the API) on a <canvas>, with the standard quiet zone.
import { h } from "./dom.js";

/** A canvas showing `matrix`; `label` is its accessible name. */
export function qrCanvas(matrix, label, testid = "qr") {
  const n = matrix.length || 1;
  const quiet = 4;
  const scale = Math.max(2, Math.floor(240 / (n + 2 * quiet)));
  const size = (n + 2 * quiet) * scale;
  const canvas = h("canvas", { width: size, height: size, role: "img", "aria-label": label, "data-testid": testid, class: "qr" });
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, size, size);
  ctx.fillStyle = "#000";
  matrix.forEach((row, y) =>
    row.forEach((cell, x) => {
      if (cell) ctx.fillRect((x + quiet) * scale, (y + quiet) * scale, scale, scale);
    }),
  );
  return canvas;
}
