// The local API of the daemon (docs/app.md "Local API"): JSON over fetch with the per-launch
// secret in `X-Haven-Key`, and one WebSocket (auth frame first) that reconnects with backoff.

const KEY_NAME = "haven.key";

/** Move the secret from `#k=…` into sessionStorage and clear it from the address bar. */
export function takeKey() {
  const match = /(?:^#|&)k=([^&]+)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(KEY_NAME, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(KEY_NAME) || "";
}

/** An API failure: `code` is the stable error code, shown translated (never `message` as HTML). */
export class ApiError extends Error {
  constructor(code, status) {
    super(code);
    this.code = code;
    this.status = status;
  }
}

export class Api {
  constructor(key) {
    this.key = key;
    this.ws = null;
    this.wsUp = false;
    this.onEvent = () => {};
    this.onLink = () => {};
    this.retry = 250;
    this.timer = null;
    this.stopped = false;
  }

  /** One JSON request; resolves to the parsed answer or throws ApiError(code). */
  async call(method, path, body) {
    const init = { method, headers: { "X-Haven-Key": this.key }, cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch {
      throw new ApiError("app_unreachable", 0);
    }
    let data = null;
    try {
      data = await res.json();
    } catch {
      data = null;
    }
    if (!res.ok) {
      const code = data && typeof data.error === "string" ? data.error : "internal";
      throw new ApiError(code, res.status);
    }
    return data;
  }

  /** Upload `file` (a File or Blob) as the raw body of a POST; resolves to the JSON answer. */
  async upload(path, file) {
    const init = {
      method: "POST",
      headers: { "X-Haven-Key": this.key, "Content-Type": file.type || "application/octet-stream" },
      body: file,
      cache: "no-store",
    };
    let res;
    try {
      res = await fetch(path, init);
    } catch {
      throw new ApiError("app_unreachable", 0);
    }
    let data = null;
    try {
      data = await res.json();
    } catch {
      data = null;
    }
    if (!res.ok) throw new ApiError(data && typeof data.error === "string" ? data.error : "internal", res.status);
    return data;
  }

  /** GET `path` as bytes; resolves to a Blob (typed `type`, whatever the answer said). */
  async blob(path, type = "application/octet-stream") {
    let res;
    try {
      res = await fetch(path, { headers: { "X-Haven-Key": this.key }, cache: "no-store" });
    } catch {
      throw new ApiError("app_unreachable", 0);
    }
    if (!res.ok) {
      let code = "internal";
      try {
        const data = await res.json();
        if (data && typeof data.error === "string") code = data.error;
      } catch {
        /* not JSON */
      }
      throw new ApiError(code, res.status);
    }
    return new Blob([await res.arrayBuffer()], { type });
  }

  get(path) {
    return this.call("GET", path);
  }
  post(path, body = {}) {
    return this.call("POST", path, body);
  }
  put(path, body) {
    return this.call("PUT", path, body);
  }
  patch(path, body) {
    return this.call("PATCH", path, body);
  }
  del(path) {
    return this.call("DELETE", path);
  }

  /**
   * Keep one authenticated WebSocket open. `onEvent(event)` gets every event (hello included);
   * `onLink(up, reason)` is told whenever the socket comes up or goes down.
   */
  connect(onEvent, onLink) {
    this.onEvent = onEvent;
    this.onLink = onLink;
    this.open();
  }

  open() {
    if (this.stopped) return;
    const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/ws`);
    this.ws = ws;
    ws.addEventListener("open", () => ws.send(JSON.stringify({ type: "auth", key: this.key })));
    ws.addEventListener("message", (ev) => {
      let event;
      try {
        event = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (event.type === "hello") {
        this.wsUp = true;
        this.retry = 250;
        this.onLink(true, "");
      }
      this.onEvent(event);
    });
    ws.addEventListener("close", (ev) => {
      if (this.ws !== ws) return;
      const wasUp = this.wsUp;
      this.wsUp = false;
      this.ws = null;
      if (ev.code === 4401) {
        this.stopped = true;
        this.onLink(false, "unauthorized");
        return;
      }
      this.onLink(false, wasUp ? "lost" : "failed");
      this.schedule();
    });
  }

  schedule() {
    clearTimeout(this.timer);
    const delay = this.retry * (0.75 + Math.random() * 0.5);
    this.retry = Math.min(this.retry * 2, 5000);
    this.timer = setTimeout(() => this.open(), delay);
  }
}

/** Path segment for an address (`alice@host:port`). */
export function enc(s) {
  return encodeURIComponent(s);
}
