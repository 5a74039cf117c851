import { type GroupMember, type Limits } from "./codec.js";
/** The part of the standard WebSocket API the client uses. */
export interface WebSocketLike {
    binaryType: string;
    readonly readyState: number;
    onopen: ((ev: unknown) => void) | null;
    onmessage: ((ev: {
        data: unknown;
    }) => void) | null;
    onclose: ((ev: {
        code: number;
        reason: string;
    }) => void) | null;
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
export declare function sameWsPort(addr: string, url: string): string | null;
/** What the client reports, as `{ type, ... }` objects to `on` listeners. */
export type ClientEvent = 
/** Logged in at `url` (the configured one, or a node a REDIRECT named);
 * `offlineCount` messages follow as `message` events. */
{
    type: "connected";
    serverTimeMs: bigint;
    offlineCount: bigint;
    url: string;
}
/** The connection ended; `retryInMs` is null when the client stopped. */
 | {
    type: "disconnected";
    reason: string;
    retryInMs: number | null;
}
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
 | {
    type: "receipt";
    kind: "delivered" | "read";
    serverId: bigint;
    peer: bigint;
}
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
 | {
    type: "presence";
    user: bigint;
    state: "online" | "offline" | "hidden";
    lastSeenMs: bigint;
}
/** `user` is typing to us. */
 | {
    type: "typing";
    user: bigint;
}
/** A device of this user was removed. */
 | {
    type: "device_removed";
    device: bigint;
}
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
 | {
    type: "refused";
    clientId: bigint;
    code: string;
    text: string;
}
/** A message was refused for now; it is sent again after a backoff. */
 | {
    type: "retrying";
    clientId: bigint;
    code: string;
}
/** Any other ERROR or LOGIN_ERR from the server. */
 | {
    type: "error";
    code: string;
    clientId: bigint;
    text: string;
};
type Listener = (event: ClientEvent) => void;
/** A group request the server refused (ERROR naming it), or one that got
 * no answer because the connection was not there or ended. */
export declare class GroupRequestError extends Error {
    /** The error code's name (`"not_admin"`), or `"disconnected"`. */
    readonly code: string;
    constructor(code: string, message: string);
}
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
export declare class Client {
    private readonly opts;
    /** The URL of the connection now (or last dialed). */
    private url;
    /** A REDIRECT's URL, dialed next instead of `opts.url`. */
    private redirectTo;
    /** REDIRECTs followed since the last login or ordinary redial. */
    private redirects;
    private readonly state;
    private readonly listeners;
    private readonly subscriptions;
    /** Group requests in flight on this connection, by request id. */
    private readonly requests;
    private ws;
    private loggedIn;
    private stopped;
    private attempts;
    private inbuf;
    private redialTimer;
    private keepaliveTimer;
    private retryTimer;
    private loginTimer;
    private lastSentMs;
    /** The nonce of the PING in flight, and when it went. */
    private pingOut;
    private nonce;
    private readonly encoder;
    /** A client, not connected yet: call `start`. */
    constructor(options: ClientOptions);
    /** Adds a listener for every event; returns a function that removes it. */
    on(listener: Listener): () => void;
    /** True between LOGIN_OK and the end of that connection. */
    get connected(): boolean;
    /** Connects, and keeps reconnecting until `stop`. */
    start(): void;
    /** Closes the connection and stops reconnecting. The outbox is kept: a
     * later `start` sends it. */
    stop(): void;
    /**
     * Sends `body` (bytes, or text as UTF-8) to user `to`. The message stays in
     * the outbox, and is sent again with the same client id after every
     * reconnect, until the server ACKs it: exactly once with protocol v2.
     * Returns its client id.
     */
    send(to: bigint, body: Uint8Array | string): bigint;
    /**
     * Sends `body` to every member of `group` (the sender's devices too), with
     * the outbox and client id of `send`. A GROUP_SEND sent again after a lost
     * ACK may be taken twice; members' clients drop the copy by (group,
     * sender, client id). Returns its client id.
     */
    sendToGroup(group: bigint, body: Uint8Array | string): bigint;
    /** Messages handed to `send` or `sendToGroup` and not ACKed yet, oldest first. */
    pending(): {
        clientId: bigint;
        to: bigint;
        group: boolean;
        body: Uint8Array;
    }[];
    /** Creates a group whose only member and admin is this user; resolves to its id. */
    createGroup(): Promise<bigint>;
    /** Adds `user` to `group` (admins only; adding a member again is fine). */
    addMember(group: bigint, user: bigint): Promise<void>;
    /** Removes `user` from `group` (admins only). */
    removeMember(group: bigint, user: bigint): Promise<void>;
    /** Leaves `group` (the last member leaving deletes it). */
    leaveGroup(group: bigint): Promise<void>;
    /** Makes `user` an admin of `group`, or (`admin` false) revokes it. */
    setAdmin(group: bigint, user: bigint, admin: boolean): Promise<void>;
    /** `group`'s members (members only), however many GROUP_LIST frames it takes. */
    members(group: bigint): Promise<GroupMember[]>;
    /** The user read group message `msg` from `from` (GROUP_READ). */
    readGroup(group: bigint, msg: bigint, from: bigint): void;
    /** The app stored message `serverId`: tell the server (DELIVERED). */
    accept(serverId: bigint): void;
    /** The user read message `serverId` from `from` (READ: blue ticks there). */
    read(serverId: bigint, from: bigint): void;
    /** Watches `user`'s presence (renewed after every reconnect). */
    subscribe(user: bigint): void;
    /** Stops watching `user`. */
    unsubscribe(user: bigint): void;
    /** "I am typing to `user`" (repeat it every few seconds while typing). */
    typing(user: bigint): void;
    /** Hides (true) or shows this user's presence to subscribers. */
    setHidden(hidden: boolean): void;
    /** Removes a device of this user (DEVICE_REMOVED confirms it). */
    removeDevice(device: bigint): void;
    private emit;
    /**
     * Sends a group request; resolves on its GROUP_OK (or last GROUP_LIST),
     * rejects with a GroupRequestError on its ERROR or if the connection is
     * not there or ends first (not resent: a change may have been made).
     */
    private request;
    /** Writes a frame if logged in; false (dropped) otherwise. */
    private write;
    private clearTimers;
    /** Full jitter: uniform in [0, min(max, min × 2^attempts)). */
    private backoffMs;
    private dial;
    private login;
    /** The connection is gone: schedule the next dial unless stopped; with
     * `redirect`, dial that URL at once. */
    private lost;
    private received;
    private handle;
    /** Sends the outbox again after a backoff (a SEND refused for now). */
    private scheduleRetry;
    private startKeepalive;
    private keepalive;
}
export {};
