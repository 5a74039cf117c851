// The WebSocket driver: connects, logs in with protocol version 2, resends
// what the server has not ACKed, filters duplicates, keeps the connection
// alive and reconnects with jittered exponential backoff. The bookkeeping
// itself is in state.ts; the bytes in codec.ts.

import {
  ByeReason,
  byeName,
  DecodeError,
  DEFAULT_LIMITS,
  decode,
  encode,
  ErrorCode,
  errorName,
  type Frame,
  GROUP_BODY_ROOM_BYTES,
  type GroupMember,
  groupEventName,
  type Limits,
  VERSION_2,
} from "./codec.js";
import { SessionState } from "./state.js";

/** The part of the standard WebSocket API the client uses. */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
}

/** A WebSocket constructor (the browser's, Node's, or the `ws` package's). */
export type WebSocketCtor = new (url: string) => WebSocketLike;

/** How a client is set up. Only `url` and `token` are required. */
export interface ClientOptions {
  /** The server's `ws_listen` address, e.g. `ws://127.0.0.1:5280/`. */
  url: string;
  /** The login token, or a function giving one (called for every login, so
   * it may fetch a fresh token). */
  token: string | (() => string | Promise<string>);
  /** WebSocket constructor; default `globalThis.WebSocket`. */
  WebSocket?: WebSocketCtor;
  /** First reconnect delay bound, ms (default 250); doubles per failure. */
  backoffMinMs?: number;
  /** Largest reconnect delay bound, ms (default 30000). */
  backoffMaxMs?: number;
  /** PING when nothing was sent for this long, ms (default 30000); a PING
   * unanswered for as long again closes the connection (it is dead). */
  keepaliveMs?: number;
  /** A connection not logged in this long after the dial is given up and
   * dialed again, ms (default 10000). */
  loginTimeoutMs?: number;
  /** Messages the duplicate filter remembers (default 4096). */
  dedupeWindow?: number;
  /** The server's frame and body limits (default the server's defaults). */
  limits?: Limits;
  /** Random numbers in [0, 1) for the backoff jitter (default Math.random). */
  random?: () => number;
  /** Where to follow a cluster's REDIRECT: the WebSocket URL of the node
   * named by `addr` (its `public_addr`, `host:port`), given the URL that
   * answered; null to not follow it (then the client redials `url` after a
   * backoff). Default {@link sameWsPort}: that host, this URL's scheme,
   * port and path (nodes serve WebSocket on the same port). */
  redirectUrl?: (addr: string, url: string) => string | null;
}

/**
 * The default REDIRECT mapping: `url` with its host replaced by the host of
 * `addr` (`host:port` or `[v6]:port`; its port is the node's TCP port and is
 * not used). Null when `addr` has no host.
 */
export function sameWsPort(addr: string, url: string): string | null {
  const colon = addr.lastIndexOf(":");
  const host = colon < 0 ? addr : addr.slice(0, colon);
  if (host === "") return null;
  const u = new URL(url);
  u.hostname = host;
  return u.toString();
}

/** What the client reports, as `{ type, ... }` objects to `on` listeners. */
export type ClientEvent =
  /** Logged in at `url` (the configured one, or a node a REDIRECT named);
   * `offlineCount` messages follow as `message` events. */
  | { type: "connected"; serverTimeMs: bigint; offlineCount: bigint; url: string }
  /** The connection ended; `retryInMs` is null when the client stopped. */
  | { type: "disconnected"; reason: string; retryInMs: number | null }
  /** The server took a message (one tick). For a group message (`group`
   * true, `to` the group) `serverId` is its `msg` in the group. */
  | {
      type: "ack";
      clientId: bigint;
      serverId: bigint;
      serverTimeMs: bigint;
      to: bigint;
      group: boolean;
    }
  /** A new message (duplicates filtered); call `accept` once stored. */
  | {
      type: "message";
      serverId: bigint;
      from: bigint;
      serverTimeMs: bigint;
      clientId: bigint;
      body: Uint8Array;
    }
  /** Delivered (two ticks) or read (blue ticks) by `peer`. */
  | { type: "receipt"; kind: "delivered" | "read"; serverId: bigint; peer: bigint }
  /** Another device of this user sent a message. */
  | {
      type: "sent";
      serverId: bigint;
      to: bigint;
      serverTimeMs: bigint;
      clientId: bigint;
      body: Uint8Array;
    }
  /** A watched user's presence (`state`: online, offline or hidden). */
  | { type: "presence"; user: bigint; state: "online" | "offline" | "hidden"; lastSeenMs: bigint }
  /** `user` is typing to us. */
  | { type: "typing"; user: bigint }
  /** A device of this user was removed. */
  | { type: "device_removed"; device: bigint }
  /** A new group message (duplicates filtered; the sender's own too): call
   * `accept(serverId)` once stored. `msg` orders it in the group. */
  | {
      type: "group_message";
      serverId: bigint;
      group: bigint;
      msg: bigint;
      from: bigint;
      serverTimeMs: bigint;
      clientId: bigint;
      body: Uint8Array;
    }
  /** A membership change in the group's order: `actor` did `event` to
   * `subject`. Call `accept(serverId)` once stored, as for a message. */
  | {
      type: "group_event";
      serverId: bigint;
      group: bigint;
      msg: bigint;
      actor: bigint;
      serverTimeMs: bigint;
      event: "created" | "added" | "removed" | "left" | "admin" | "unadmin";
      subject: bigint;
    }
  /** Group `members` got (delivered) or read our group message `msg`. */
  | {
      type: "group_receipt";
      kind: "delivered" | "read";
      group: bigint;
      msg: bigint;
      members: bigint[];
    }
  /** A message was refused for good (it left the outbox). */
  | { type: "refused"; clientId: bigint; code: string; text: string }
  /** A message was refused for now; it is sent again after a backoff. */
  | { type: "retrying"; clientId: bigint; code: string }
  /** Any other ERROR or LOGIN_ERR from the server. */
  | { type: "error"; code: string; clientId: bigint; text: string };

type Listener = (event: ClientEvent) => void;

/** A group event's name (the decoder admits only these). */
type GroupEventName = Extract<ClientEvent, { type: "group_event" }>["event"];

/** A group request the server refused (ERROR naming it), or one that got
 * no answer because the connection was not there or ended. */
export class GroupRequestError extends Error {
  /** The error code's name (`"not_admin"`), or `"disconnected"`. */
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.name = "GroupRequestError";
    this.code = code;
  }
}

/** A group request waiting for its GROUP_OK (or GROUP_LISTs). */
interface GroupRequest {
  resolve: (answer: { group: bigint; entries: GroupMember[] }) => void;
  reject: (e: GroupRequestError) => void;
  /** GROUP_LIST entries so far. */
  entries: GroupMember[];
}

/** WebSocket readyState OPEN. */
const OPEN = 1;

/** REDIRECTs followed in a row at most: while a partition changes owner,
 * two nodes can briefly name each other (docs/PROTOCOL.md, REDIRECT). */
const REDIRECTS_MAX = 3;

/** Redial attempts counted for the backoff stop growing here (2^16 × min). */
const ATTEMPTS_MAX = 16;

const NAMES_PRESENCE = ["", "online", "offline", "hidden"] as const;

/** Bye reasons after which reconnecting would be wrong: another login of
 * this device took over, or the device was removed. */
const BYE_FINAL = new Set<number>([ByeReason.replaced, ByeReason.device_removed]);
/** Login refusals that a retry cannot fix (with a fixed token). */
const LOGIN_FINAL = new Set<number>([ErrorCode.banned, ErrorCode.bad_version]);
/** Login refusals that a fresh token can fix. */
const LOGIN_TOKEN = new Set<number>([ErrorCode.bad_token, ErrorCode.token_expired]);

/**
 * One user's device on a Tern server over WebSocket, protocol version 2.
 *
 * ```js
 * const c = new Client({ url: "ws://127.0.0.1:5280/", token });
 * c.on((e) => { if (e.type === "message") c.accept(e.serverId); });
 * c.start();
 * c.send(42n, "hello");
 * ```
 */
export class Client {
  private readonly opts: Required<Omit<ClientOptions, "WebSocket">> & { WebSocket: WebSocketCtor };
  /** The URL of the connection now (or last dialed). */
  private url: string;
  /** A REDIRECT's URL, dialed next instead of `opts.url`. */
  private redirectTo: string | null = null;
  /** REDIRECTs followed since the last login or ordinary redial. */
  private redirects = 0;
  private readonly state: SessionState;
  private readonly listeners: Listener[] = [];
  private readonly subscriptions = new Set<bigint>();
  /** Group requests in flight on this connection, by request id. */
  private readonly requests = new Map<bigint, GroupRequest>();
  private ws: WebSocketLike | null = null;
  private loggedIn = false;
  private stopped = true;
  private attempts = 0;
  private inbuf: Uint8Array = new Uint8Array(0);
  private redialTimer: ReturnType<typeof setTimeout> | null = null;
  private keepaliveTimer: ReturnType<typeof setInterval> | null = null;
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private loginTimer: ReturnType<typeof setTimeout> | null = null;
  private lastSentMs = 0;
  /** The nonce of the PING in flight, and when it went. */
  private pingOut: { nonce: bigint; atMs: number } | null = null;
  private nonce = 0n;
  private readonly encoder = new TextEncoder();

  /** A client, not connected yet: call `start`. */
  constructor(options: ClientOptions) {
    const ctor = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketCtor }).WebSocket;
    if (ctor === undefined) {
      throw new Error("no WebSocket: pass options.WebSocket (Node 20: --experimental-websocket or the ws package)");
    }
    this.opts = {
      url: options.url,
      token: options.token,
      WebSocket: ctor,
      backoffMinMs: options.backoffMinMs ?? 250,
      backoffMaxMs: options.backoffMaxMs ?? 30000,
      keepaliveMs: options.keepaliveMs ?? 30000,
      loginTimeoutMs: options.loginTimeoutMs ?? 10000,
      dedupeWindow: options.dedupeWindow ?? 4096,
      limits: options.limits ?? DEFAULT_LIMITS,
      random: options.random ?? Math.random,
      redirectUrl: options.redirectUrl ?? sameWsPort,
    };
    this.url = options.url;
    this.state = new SessionState(this.opts.dedupeWindow);
  }

  /** Adds a listener for every event; returns a function that removes it. */
  on(listener: Listener): () => void {
    this.listeners.push(listener);
    return () => {
      const i = this.listeners.indexOf(listener);
      if (i >= 0) this.listeners.splice(i, 1);
    };
  }

  /** True between LOGIN_OK and the end of that connection. */
  get connected(): boolean {
    return this.loggedIn;
  }

  /** Connects, and keeps reconnecting until `stop`. */
  start(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.attempts = 0;
    this.redirects = 0;
    this.redirectTo = null;
    this.dial();
  }

  /** Closes the connection and stops reconnecting. The outbox is kept: a
   * later `start` sends it. */
  stop(): void {
    this.stopped = true;
    this.clearTimers();
    const ws = this.ws;
    this.ws = null;
    this.loggedIn = false;
    if (ws !== null) {
      ws.onclose = null;
      ws.onmessage = null;
      ws.close(1000);
      this.emit({ type: "disconnected", reason: "stopped", retryInMs: null });
    }
  }

  /**
   * Sends `body` (bytes, or text as UTF-8) to user `to`. The message stays in
   * the outbox, and is sent again with the same client id after every
   * reconnect, until the server ACKs it: exactly once with protocol v2.
   * Returns its client id.
   */
  send(to: bigint, body: Uint8Array | string): bigint {
    const bytes = typeof body === "string" ? this.encoder.encode(body) : body;
    if (bytes.length > this.opts.limits.bodyBytesMax) {
      throw new RangeError(`body of ${bytes.length} bytes exceeds ${this.opts.limits.bodyBytesMax}`);
    }
    const msg = this.state.send(to, bytes);
    if (this.loggedIn) this.write({ type: "send", clientId: msg.clientId, to, body: bytes });
    return msg.clientId;
  }

  /**
   * Sends `body` to every member of `group` (the sender's devices too), with
   * the outbox and client id of `send`. A GROUP_SEND sent again after a lost
   * ACK may be taken twice; members' clients drop the copy by (group,
   * sender, client id). Returns its client id.
   */
  sendToGroup(group: bigint, body: Uint8Array | string): bigint {
    const bytes = typeof body === "string" ? this.encoder.encode(body) : body;
    const max = this.opts.limits.bodyBytesMax - GROUP_BODY_ROOM_BYTES;
    if (bytes.length > max) {
      throw new RangeError(`group body of ${bytes.length} bytes exceeds ${max}`);
    }
    const msg = this.state.send(group, bytes, true);
    if (this.loggedIn) this.write({ type: "group_send", clientId: msg.clientId, group, body: bytes });
    return msg.clientId;
  }

  /** Messages handed to `send` or `sendToGroup` and not ACKed yet, oldest first. */
  pending(): { clientId: bigint; to: bigint; group: boolean; body: Uint8Array }[] {
    return this.state.pending();
  }

  /** Creates a group whose only member and admin is this user; resolves to its id. */
  async createGroup(): Promise<bigint> {
    return (await this.request((req) => ({ type: "group_create", req }))).group;
  }

  /** Adds `user` to `group` (admins only; adding a member again is fine). */
  async addMember(group: bigint, user: bigint): Promise<void> {
    await this.request((req) => ({ type: "group_add", req, group, user }));
  }

  /** Removes `user` from `group` (admins only). */
  async removeMember(group: bigint, user: bigint): Promise<void> {
    await this.request((req) => ({ type: "group_remove", req, group, user }));
  }

  /** Leaves `group` (the last member leaving deletes it). */
  async leaveGroup(group: bigint): Promise<void> {
    await this.request((req) => ({ type: "group_leave", req, group }));
  }

  /** Makes `user` an admin of `group`, or (`admin` false) revokes it. */
  async setAdmin(group: bigint, user: bigint, admin: boolean): Promise<void> {
    await this.request((req) => ({ type: "group_admin", req, group, user, admin }));
  }

  /** `group`'s members (members only), however many GROUP_LIST frames it takes. */
  async members(group: bigint): Promise<GroupMember[]> {
    return (await this.request((req) => ({ type: "group_members", req, group }))).entries;
  }

  /** The user read group message `msg` from `from` (GROUP_READ). */
  readGroup(group: bigint, msg: bigint, from: bigint): void {
    this.write({ type: "group_read", group, msg, from });
  }

  /** The app stored message `serverId`: tell the server (DELIVERED). */
  accept(serverId: bigint): void {
    if (this.state.accept(serverId)) this.write({ type: "delivered", serverId });
  }

  /** The user read message `serverId` from `from` (READ: blue ticks there). */
  read(serverId: bigint, from: bigint): void {
    this.write({ type: "read", serverId, from });
  }

  /** Watches `user`'s presence (renewed after every reconnect). */
  subscribe(user: bigint): void {
    this.subscriptions.add(user);
    this.write({ type: "subscribe", user });
  }

  /** Stops watching `user`. */
  unsubscribe(user: bigint): void {
    this.subscriptions.delete(user);
    this.write({ type: "unsubscribe", user });
  }

  /** "I am typing to `user`" (repeat it every few seconds while typing). */
  typing(user: bigint): void {
    this.write({ type: "typing", user });
  }

  /** Hides (true) or shows this user's presence to subscribers. */
  setHidden(hidden: boolean): void {
    this.write({ type: "privacy", hidden });
  }

  /** Removes a device of this user (DEVICE_REMOVED confirms it). */
  removeDevice(device: bigint): void {
    this.write({ type: "device_remove", device });
  }

  private emit(event: ClientEvent): void {
    for (const l of [...this.listeners]) {
      try {
        l(event);
      } catch (e) {
        // A listener's bug must not break the connection's bookkeeping.
        console.error("tern-client listener threw", e);
      }
    }
  }

  /**
   * Sends a group request; resolves on its GROUP_OK (or last GROUP_LIST),
   * rejects with a GroupRequestError on its ERROR or if the connection is
   * not there or ends first (not resent: a change may have been made).
   */
  private request(make: (req: bigint) => Frame): Promise<{ group: bigint; entries: GroupMember[] }> {
    return new Promise((resolve, reject) => {
      const req = this.state.nextId();
      if (!this.write(make(req))) {
        reject(new GroupRequestError("disconnected", "not connected"));
        return;
      }
      this.requests.set(req, { resolve, reject, entries: [] });
    });
  }

  /** Writes a frame if logged in; false (dropped) otherwise. */
  private write(frame: Frame): boolean {
    if (!this.loggedIn || this.ws === null || this.ws.readyState !== OPEN) return false;
    this.ws.send(encode(frame));
    this.lastSentMs = Date.now();
    return true;
  }

  private clearTimers(): void {
    if (this.redialTimer !== null) clearTimeout(this.redialTimer);
    if (this.keepaliveTimer !== null) clearInterval(this.keepaliveTimer);
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    if (this.loginTimer !== null) clearTimeout(this.loginTimer);
    this.loginTimer = null;
    this.redialTimer = null;
    this.keepaliveTimer = null;
    this.retryTimer = null;
  }

  /** Full jitter: uniform in [0, min(max, min × 2^attempts)). */
  private backoffMs(): number {
    const n = Math.min(this.attempts, ATTEMPTS_MAX);
    const bound = Math.min(this.opts.backoffMaxMs, this.opts.backoffMinMs * 2 ** n);
    return Math.floor(this.opts.random() * bound);
  }

  private dial(): void {
    this.redialTimer = null;
    if (this.stopped) return;
    let ws: WebSocketLike;
    try {
      this.url = this.redirectTo ?? this.opts.url;
      this.redirectTo = null;
      ws = new this.opts.WebSocket(this.url);
    } catch (e) {
      this.lost(`connect failed: ${String(e)}`);
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    // Also covers a dial that never ends: some WebSocket implementations
    // (Node 20's) report no close for a connection reset during the upgrade.
    this.loginTimer = setTimeout(() => {
      this.loginTimer = null;
      if (this.ws === ws) this.lost("no login answer in time");
    }, this.opts.loginTimeoutMs);
    this.inbuf = new Uint8Array(0);
    ws.onopen = () => {
      void this.login(ws);
    };
    ws.onmessage = (ev) => {
      if (this.ws === ws) this.received(ev.data);
    };
    ws.onerror = () => {
      // The close event follows and carries the decision.
    };
    ws.onclose = (ev) => {
      if (this.ws === ws) this.lost(`closed (${ev.code}${ev.reason ? " " + ev.reason : ""})`);
    };
  }

  private async login(ws: WebSocketLike): Promise<void> {
    let token: string;
    try {
      token = typeof this.opts.token === "string" ? this.opts.token : await this.opts.token();
    } catch (e) {
      if (this.ws === ws) {
        this.ws = null;
        ws.close(1000);
        this.lost(`no token: ${String(e)}`);
      }
      return;
    }
    if (this.ws !== ws || ws.readyState !== OPEN) return;
    ws.send(encode({ type: "login", version: VERSION_2, token: this.encoder.encode(token) }));
  }

  /** The connection is gone: schedule the next dial unless stopped; with
   * `redirect`, dial that URL at once. */
  private lost(reason: string, final = false, redirect: string | null = null): void {
    const ws = this.ws;
    this.ws = null;
    const was = this.loggedIn;
    this.loggedIn = false;
    this.pingOut = null;
    this.clearTimers();
    if (ws !== null) {
      ws.onclose = null;
      ws.onmessage = null;
      try {
        ws.close(1000);
      } catch {
        // Already closed.
      }
    }
    if (was) this.attempts = 0;
    const requests = [...this.requests.values()];
    this.requests.clear();
    for (const r of requests) r.reject(new GroupRequestError("disconnected", reason));
    if (final || this.stopped) {
      this.stopped = true;
      this.emit({ type: "disconnected", reason, retryInMs: null });
      return;
    }
    if (redirect !== null) {
      this.redirectTo = redirect;
      this.emit({ type: "disconnected", reason, retryInMs: 0 });
      this.redialTimer = setTimeout(() => this.dial(), 0);
      return;
    }
    this.redirects = 0;
    const delay = this.backoffMs();
    this.attempts += 1;
    this.emit({ type: "disconnected", reason, retryInMs: delay });
    this.redialTimer = setTimeout(() => this.dial(), delay);
  }

  private received(data: unknown): void {
    if (!(data instanceof ArrayBuffer)) {
      this.lost("the server sent a text message");
      return;
    }
    const chunk = new Uint8Array(data);
    if (this.inbuf.length === 0) {
      this.inbuf = chunk;
    } else {
      const joined = new Uint8Array(this.inbuf.length + chunk.length);
      joined.set(this.inbuf);
      joined.set(chunk, this.inbuf.length);
      this.inbuf = joined;
    }
    let at = 0;
    // Bounded: every pass consumes at least one frame or leaves.
    while (at < this.inbuf.length && this.ws !== null) {
      let got;
      try {
        got = decode(this.inbuf.subarray(at), this.opts.limits);
      } catch (e) {
        const why = e instanceof DecodeError ? `${e.code}: ${e.message}` : String(e);
        this.lost(`bad frame from the server (${why})`);
        return;
      }
      if (got === null) break;
      at += got.used;
      this.handle(got.frame);
    }
    this.inbuf = this.inbuf.slice(at);
  }

  private handle(f: Frame): void {
    switch (f.type) {
      case "login_ok":
        if (this.loginTimer !== null) clearTimeout(this.loginTimer);
        this.loginTimer = null;
        this.loggedIn = true;
        this.attempts = 0;
        this.redirects = 0;
        this.emit({
          type: "connected",
          serverTimeMs: f.serverTimeMs,
          offlineCount: f.offlineCount,
          url: this.url,
        });
        // Subscriptions belong to the connection: renew them.
        for (const user of this.subscriptions) this.write({ type: "subscribe", user });
        for (const frame of this.state.resend()) this.write(frame);
        this.startKeepalive();
        return;
      case "login_err": {
        const code = errorName(f.code);
        this.emit({ type: "error", code, clientId: 0n, text: f.text });
        const final =
          LOGIN_FINAL.has(f.code) || (LOGIN_TOKEN.has(f.code) && typeof this.opts.token === "string");
        this.lost(`login refused: ${code}`, final);
        return;
      }
      case "ack": {
        const msg = this.state.get(f.clientId);
        if (this.state.onAck(f.clientId) && msg !== undefined) {
          this.emit({
            type: "ack",
            clientId: f.clientId,
            serverId: f.serverId,
            serverTimeMs: f.serverTimeMs,
            to: msg.to,
            group: msg.group,
          });
        }
        return;
      }
      case "deliver": {
        const clientId = f.clientId ?? 0n;
        switch (this.state.onDeliver(f.serverId, f.from, f.clientId)) {
          case "show":
            this.emit({
              type: "message",
              serverId: f.serverId,
              from: f.from,
              serverTimeMs: f.serverTimeMs,
              clientId,
              body: f.body,
            });
            return;
          case "answer_delivered":
            this.write({ type: "delivered", serverId: f.serverId });
            return;
          case "ignore":
            return;
        }
        return;
      }
      case "receipt":
        this.emit({
          type: "receipt",
          kind: f.kind === 1 ? "delivered" : "read",
          serverId: f.serverId,
          peer: f.peer,
        });
        return;
      case "sent":
        if (this.state.onSent(f.serverId)) {
          this.emit({
            type: "sent",
            serverId: f.serverId,
            to: f.to,
            serverTimeMs: f.serverTimeMs,
            clientId: f.clientId,
            body: f.body,
          });
        }
        return;
      case "error": {
        const code = errorName(f.code);
        const request = this.requests.get(f.clientId);
        if (request !== undefined) {
          this.requests.delete(f.clientId);
          request.reject(new GroupRequestError(code, f.text));
          return;
        }
        switch (this.state.onRefused(f.clientId, f.code)) {
          case "retry":
            this.emit({ type: "retrying", clientId: f.clientId, code });
            this.scheduleRetry();
            return;
          case "final":
            this.emit({ type: "refused", clientId: f.clientId, code, text: f.text });
            return;
          case "none":
            this.emit({ type: "error", code, clientId: f.clientId, text: f.text });
            return;
        }
        return;
      }
      case "bye":
        this.lost(`bye: ${byeName(f.reason)}`, BYE_FINAL.has(f.reason));
        return;
      case "ping":
        this.write({ type: "pong", nonce: f.nonce });
        return;
      case "pong":
        if (this.pingOut !== null && this.pingOut.nonce === f.nonce) this.pingOut = null;
        return;
      case "presence":
        this.emit({
          type: "presence",
          user: f.user,
          state: NAMES_PRESENCE[f.state] as "online" | "offline" | "hidden",
          lastSeenMs: f.lastSeenMs,
        });
        return;
      case "typing":
        this.emit({ type: "typing", user: f.user });
        return;
      case "device_removed":
        this.emit({ type: "device_removed", device: f.device });
        return;
      case "group_ok": {
        const request = this.requests.get(f.req);
        this.requests.delete(f.req);
        request?.resolve({ group: f.group, entries: [] });
        return;
      }
      case "group_list": {
        const request = this.requests.get(f.req);
        if (request === undefined) return;
        request.entries.push(...f.entries);
        if (f.left === 0n) {
          this.requests.delete(f.req);
          request.resolve({ group: f.group, entries: request.entries });
        }
        return;
      }
      case "group_deliver":
      case "group_event": {
        const clientId = f.type === "group_deliver" ? f.clientId : null;
        const from = f.type === "group_deliver" ? f.from : f.actor;
        switch (this.state.onGroupDeliver(f.serverId, f.group, f.msg, from, clientId)) {
          case "show":
            if (f.type === "group_deliver") {
              this.emit({
                type: "group_message",
                serverId: f.serverId,
                group: f.group,
                msg: f.msg,
                from: f.from,
                serverTimeMs: f.serverTimeMs,
                clientId: f.clientId,
                body: f.body,
              });
            } else {
              this.emit({
                type: "group_event",
                serverId: f.serverId,
                group: f.group,
                msg: f.msg,
                actor: f.actor,
                serverTimeMs: f.serverTimeMs,
                event: groupEventName(f.event) as GroupEventName,
                subject: f.subject,
              });
            }
            return;
          case "answer_delivered":
            this.write({ type: "delivered", serverId: f.serverId });
            return;
          case "ignore":
            return;
        }
        return;
      }
      case "group_receipt":
        this.emit({
          type: "group_receipt",
          kind: f.kind === 1 ? "delivered" : "read",
          group: f.group,
          msg: f.msg,
          members: f.members,
        });
        return;
      case "redirect": {
        // Another node serves this user: log in there (the server closes).
        let to: string | null = null;
        if (this.redirects < REDIRECTS_MAX) {
          try {
            to = this.opts.redirectUrl(f.addr, this.url);
          } catch {
            to = null; // a bad address or URL: not followed
          }
        }
        if (to === null) {
          this.lost(`redirected to ${f.addr} (not followed)`);
          return;
        }
        this.redirects += 1;
        this.lost(`redirected to ${f.addr} (${to})`, false, to);
        return;
      }
      default:
        // Client-to-server frames never come from a server.
        this.lost(`unexpected ${f.type} frame from the server`);
        return;
    }
  }

  /** Sends the outbox again after a backoff (a SEND refused for now). */
  private scheduleRetry(): void {
    if (this.retryTimer !== null) return;
    const delay = Math.max(1, this.backoffMs());
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      for (const frame of this.state.resend()) this.write(frame);
    }, delay);
  }

  private startKeepalive(): void {
    this.lastSentMs = Date.now();
    const every = this.opts.keepaliveMs;
    // Checked 4 times per period: a PING goes within 1.25 periods of quiet.
    this.keepaliveTimer = setInterval(() => this.keepalive(), Math.max(1, Math.floor(every / 4)));
  }

  private keepalive(): void {
    const now = Date.now();
    if (this.pingOut !== null) {
      if (now - this.pingOut.atMs >= this.opts.keepaliveMs) this.lost("no answer to PING");
      return;
    }
    if (now - this.lastSentMs >= this.opts.keepaliveMs) {
      this.nonce += 1n;
      this.pingOut = { nonce: this.nonce, atMs: now };
      this.write({ type: "ping", nonce: this.nonce });
    }
  }
}
