// The Tern wire codec (docs/PROTOCOL.md), byte for byte the same as the
// server's src/proto.rs. Pure: bytes in, frames out, no I/O. Integers are
// bigint because the protocol's ids are u64 (a JS number holds 53 bits).
/** Protocol version 1 (LOGIN version byte). */
export const VERSION_1 = 1;
/** Protocol version 2: idempotent SEND, DELIVER with client id, presence, devices, groups. */
export const VERSION_2 = 2;
/** Longest varint (a u64) and so longest length prefix, in bytes. */
export const VARINT_BYTES_MAX = 10;
const U64_MAX = (1n << 64n) - 1n;
/** The frame type bytes. */
export const Type = {
    LOGIN: 0x01,
    LOGIN_OK: 0x02,
    LOGIN_ERR: 0x03,
    SEND: 0x04,
    ACK: 0x05,
    DELIVER: 0x06,
    DELIVERED: 0x07,
    READ: 0x08,
    RECEIPT: 0x09,
    PING: 0x0a,
    PONG: 0x0b,
    ERROR: 0x0c,
    BYE: 0x0d,
    DELIVER_V2: 0x0e,
    REDIRECT: 0x0f,
    DEVICE_REMOVE: 0x10,
    DEVICE_REMOVED: 0x11,
    SENT: 0x12,
    SUBSCRIBE: 0x18,
    UNSUBSCRIBE: 0x19,
    PRESENCE: 0x1a,
    PRIVACY: 0x1b,
    TYPING: 0x1c,
    GROUP_CREATE: 0x20,
    GROUP_ADD: 0x21,
    GROUP_REMOVE: 0x22,
    GROUP_LEAVE: 0x23,
    GROUP_ADMIN: 0x24,
    GROUP_MEMBERS: 0x25,
    GROUP_OK: 0x26,
    GROUP_LIST: 0x27,
    GROUP_SEND: 0x28,
    GROUP_DELIVER: 0x29,
    GROUP_EVENT: 0x2a,
    GROUP_READ: 0x2b,
    GROUP_RECEIPT: 0x2c,
};
/** Error codes (LOGIN_ERR and ERROR), by name; the numbers never change. */
export const ErrorCode = {
    malformed: 1,
    unknown_type: 2,
    too_large: 3,
    not_logged_in: 4,
    queue_full: 5,
    bad_version: 6,
    bad_token: 7,
    token_expired: 8,
    rate_limited: 9,
    internal: 10,
    already_logged_in: 11,
    bad_recipient: 12,
    server_full: 13,
    bad_state: 14,
    storage_full: 15,
    unavailable: 16,
    unknown_message: 17,
    stale_client_id: 18,
    other_node: 19,
    too_many_devices: 20,
    unknown_device: 21,
    presence_subs_full: 25,
    banned: 30,
    unknown_group: 40,
    not_member: 41,
    not_admin: 42,
    group_full: 43,
    too_many_groups: 44,
    no_such_member: 45,
    last_admin: 46,
};
/** Receipt kinds. */
export const ReceiptKind = { delivered: 1, read: 2 };
/** Bye reasons. */
export const ByeReason = {
    shutdown: 1,
    replaced: 2,
    slow: 3,
    idle: 4,
    error: 5,
    rate_limited: 6,
    moved: 7,
    device_removed: 8,
    kicked: 10,
    moving: 11,
    upgrade: 13,
};
/** Presence states. */
export const PresenceState = { online: 1, offline: 2, hidden: 3 };
/** Group events (GROUP_EVENT's `event`): what `actor` did to `subject`. */
export const GroupEvent = {
    created: 1,
    added: 2,
    removed: 3,
    left: 4,
    admin: 5,
    unadmin: 6,
};
/** How much smaller than `bodyBytesMax` a GROUP_SEND body must be: room for
 * the two varints GROUP_DELIVER carries beyond a DELIVER (group, msg). */
export const GROUP_BODY_ROOM_BYTES = 2 * VARINT_BYTES_MAX;
function invert(table) {
    return new Map(Object.entries(table).map(([name, n]) => [n, name]));
}
const ERROR_NAMES = invert(ErrorCode);
const RECEIPT_NAMES = invert(ReceiptKind);
const BYE_NAMES = invert(ByeReason);
const PRESENCE_NAMES = invert(PresenceState);
const GROUP_EVENT_NAMES = invert(GroupEvent);
/** The name of an error code (`"queue_full"`), or `"code N"` if unknown. */
export function errorName(code) {
    return ERROR_NAMES.get(code) ?? `code ${code}`;
}
/** The name of a group event (`"added"`), or `"event N"` if unknown. */
export function groupEventName(event) {
    return GROUP_EVENT_NAMES.get(event) ?? `event ${event}`;
}
/** The name of a bye reason (`"replaced"`), or `"reason N"` if unknown. */
export function byeName(reason) {
    return BYE_NAMES.get(reason) ?? `reason ${reason}`;
}
/** The server's default limits. */
export const DEFAULT_LIMITS = { frameBytesMax: 65536, bodyBytesMax: 65000 };
/** Why bytes could not be decoded; fatal for the connection. */
export class DecodeError extends Error {
    /** The error code a peer would report: malformed, too_large or unknown_type. */
    code;
    constructor(code, message) {
        super(message);
        this.name = "DecodeError";
        this.code = code;
    }
}
const utf8 = new TextEncoder();
const utf8Strict = new TextDecoder("utf-8", { fatal: true });
/** Appends `v` (0..2^64-1) as an unsigned LEB128 varint. */
export function putVarint(out, v) {
    if (v < 0n || v > U64_MAX) {
        throw new RangeError(`varint out of u64 range: ${v}`);
    }
    while (v >= 0x80n) {
        out.push(Number(v & 0x7fn) | 0x80);
        v >>= 7n;
    }
    out.push(Number(v));
}
function putVarints(out, ...vs) {
    for (const v of vs)
        putVarint(out, v);
}
/** Reads a minimal varint at `at`, rejecting values above `max` as early as
 * the bytes seen allow (as src/proto.rs does for the length prefix). */
function readVarint(buf, at, max) {
    let value = 0n;
    for (let i = 0; i < VARINT_BYTES_MAX; i++) {
        if (at + i >= buf.length) {
            return { kind: "incomplete" };
        }
        const byte = buf[at + i];
        const more = (byte & 0x80) !== 0;
        const bits = BigInt(byte & 0x7f);
        if (i === VARINT_BYTES_MAX - 1) {
            // The tenth byte holds bit 63 only.
            if (more)
                break;
            if (bits > 1n)
                throw new DecodeError("malformed", "varint overflows u64");
        }
        value |= bits << BigInt(7 * i);
        if (!more) {
            if (byte === 0 && i > 0)
                throw new DecodeError("malformed", "non-minimal varint");
            if (value > max)
                return { kind: "too_large", valueMin: value };
            return { kind: "done", value, len: i + 1 };
        }
        // A minimal encoding ends in a non-zero byte: at least this much.
        const valueMin = value + (1n << BigInt(7 * (i + 1)));
        if (valueMin > max)
            return { kind: "too_large", valueMin };
    }
    throw new DecodeError("malformed", "varint longer than 10 bytes");
}
/** Encodes one frame with its length prefix. */
export function encode(frame) {
    const p = [];
    let rest = null;
    switch (frame.type) {
        case "login":
            p.push(Type.LOGIN, frame.version & 0xff);
            rest = frame.token;
            break;
        case "login_ok":
            p.push(Type.LOGIN_OK);
            putVarint(p, frame.serverTimeMs);
            putVarint(p, frame.offlineCount);
            break;
        case "login_err":
            p.push(Type.LOGIN_ERR);
            putVarint(p, BigInt(frame.code));
            rest = utf8.encode(frame.text);
            break;
        case "send":
            p.push(Type.SEND);
            putVarint(p, frame.clientId);
            putVarint(p, frame.to);
            rest = frame.body;
            break;
        case "ack":
            p.push(Type.ACK);
            putVarint(p, frame.clientId);
            putVarint(p, frame.serverId);
            putVarint(p, frame.serverTimeMs);
            break;
        case "deliver":
            p.push(frame.clientId === null ? Type.DELIVER : Type.DELIVER_V2);
            putVarint(p, frame.serverId);
            putVarint(p, frame.from);
            putVarint(p, frame.serverTimeMs);
            if (frame.clientId !== null)
                putVarint(p, frame.clientId);
            rest = frame.body;
            break;
        case "delivered":
            p.push(Type.DELIVERED);
            putVarint(p, frame.serverId);
            break;
        case "read":
            p.push(Type.READ);
            putVarint(p, frame.serverId);
            putVarint(p, frame.from);
            break;
        case "receipt":
            p.push(Type.RECEIPT);
            putVarint(p, BigInt(frame.kind));
            putVarint(p, frame.serverId);
            putVarint(p, frame.peer);
            break;
        case "ping":
        case "pong":
            p.push(frame.type === "ping" ? Type.PING : Type.PONG);
            putVarint(p, frame.nonce);
            break;
        case "error":
            p.push(Type.ERROR);
            putVarint(p, BigInt(frame.code));
            putVarint(p, frame.clientId);
            rest = utf8.encode(frame.text);
            break;
        case "bye":
            p.push(Type.BYE);
            putVarint(p, BigInt(frame.reason));
            break;
        case "redirect":
            p.push(Type.REDIRECT);
            rest = utf8.encode(frame.addr);
            break;
        case "device_remove":
        case "device_removed":
            p.push(frame.type === "device_remove" ? Type.DEVICE_REMOVE : Type.DEVICE_REMOVED);
            putVarint(p, frame.device);
            break;
        case "sent":
            p.push(Type.SENT);
            putVarint(p, frame.serverId);
            putVarint(p, frame.to);
            putVarint(p, frame.serverTimeMs);
            putVarint(p, frame.clientId);
            rest = frame.body;
            break;
        case "subscribe":
        case "unsubscribe":
        case "typing":
            p.push(frame.type === "subscribe"
                ? Type.SUBSCRIBE
                : frame.type === "unsubscribe"
                    ? Type.UNSUBSCRIBE
                    : Type.TYPING);
            putVarint(p, frame.user);
            break;
        case "presence":
            p.push(Type.PRESENCE);
            putVarint(p, frame.user);
            putVarint(p, BigInt(frame.state));
            putVarint(p, frame.lastSeenMs);
            break;
        case "privacy":
            p.push(Type.PRIVACY, frame.hidden ? 1 : 0);
            break;
        case "group_create":
            p.push(Type.GROUP_CREATE);
            putVarint(p, frame.req);
            break;
        case "group_add":
        case "group_remove":
            p.push(frame.type === "group_add" ? Type.GROUP_ADD : Type.GROUP_REMOVE);
            putVarints(p, frame.req, frame.group, frame.user);
            break;
        case "group_leave":
        case "group_members":
        case "group_ok":
            p.push(frame.type === "group_leave"
                ? Type.GROUP_LEAVE
                : frame.type === "group_members"
                    ? Type.GROUP_MEMBERS
                    : Type.GROUP_OK);
            putVarints(p, frame.req, frame.group);
            break;
        case "group_admin":
            p.push(Type.GROUP_ADMIN);
            putVarints(p, frame.req, frame.group, frame.user, frame.admin ? 1n : 0n);
            break;
        case "group_list":
            p.push(Type.GROUP_LIST);
            putVarints(p, frame.req, frame.group, frame.left);
            for (const e of frame.entries)
                putVarints(p, e.user, e.admin ? 1n : 0n);
            break;
        case "group_send":
            p.push(Type.GROUP_SEND);
            putVarints(p, frame.clientId, frame.group);
            rest = frame.body;
            break;
        case "group_deliver":
            p.push(Type.GROUP_DELIVER);
            putVarints(p, frame.serverId, frame.group, frame.msg, frame.from, frame.serverTimeMs);
            putVarint(p, frame.clientId);
            rest = frame.body;
            break;
        case "group_event":
            p.push(Type.GROUP_EVENT);
            putVarints(p, frame.serverId, frame.group, frame.msg, frame.actor, frame.serverTimeMs, BigInt(frame.event), frame.subject);
            break;
        case "group_read":
            p.push(Type.GROUP_READ);
            putVarints(p, frame.group, frame.msg, frame.from);
            break;
        case "group_receipt":
            p.push(Type.GROUP_RECEIPT);
            putVarints(p, BigInt(frame.kind), frame.group, frame.msg, ...frame.members);
            break;
    }
    const restLen = rest === null ? 0 : rest.length;
    const prefix = [];
    putVarint(prefix, BigInt(p.length + restLen));
    const out = new Uint8Array(prefix.length + p.length + restLen);
    out.set(prefix, 0);
    out.set(p, prefix.length);
    if (rest !== null)
        out.set(rest, prefix.length + p.length);
    return out;
}
/** Cursor over one complete payload: running out is malformed, not incomplete. */
class Fields {
    buf;
    end;
    at;
    constructor(buf, at, end) {
        this.buf = buf;
        this.end = end;
        this.at = at;
    }
    byte(what) {
        if (this.at >= this.end)
            throw new DecodeError("malformed", what);
        return this.buf[this.at++];
    }
    varint() {
        const r = readVarint(this.buf.subarray(0, this.end), this.at, U64_MAX);
        if (r.kind !== "done")
            throw new DecodeError("malformed", "truncated field");
        this.at += r.len;
        return r.value;
    }
    /** A varint that must name one of `names`' numbers. */
    known(names, what) {
        const v = this.varint();
        if (v > 0xffffn || !names.has(Number(v)))
            throw new DecodeError("malformed", what);
        return Number(v);
    }
    rest() {
        const r = this.buf.slice(this.at, this.end);
        this.at = this.end;
        return r;
    }
    text() {
        try {
            return utf8Strict.decode(this.rest());
        }
        catch {
            throw new DecodeError("malformed", "invalid utf-8");
        }
    }
    body(limits) {
        const b = this.rest();
        if (b.length > limits.bodyBytesMax) {
            throw new DecodeError("too_large", `message body of ${b.length} bytes exceeds body_bytes_max`);
        }
        return b;
    }
    /** A varint that must be 0 or 1. */
    flag(what) {
        const v = this.varint();
        if (v > 1n)
            throw new DecodeError("malformed", what);
        return v === 1n;
    }
    /** Varints up to the end of the frame; one cut short is malformed. */
    list() {
        const out = [];
        while (this.at < this.end) {
            const r = readVarint(this.buf.subarray(0, this.end), this.at, U64_MAX);
            if (r.kind !== "done")
                throw new DecodeError("malformed", "truncated list");
            this.at += r.len;
            out.push(r.value);
        }
        return out;
    }
    done() {
        return this.at === this.end;
    }
}
/**
 * Decodes the first frame in `buf`: null while `buf` holds only part of one
 * (nothing consumed), else the frame and the bytes it used. Throws
 * DecodeError when the stream is bad; the length prefix is checked against
 * `limits.frameBytesMax` byte by byte, before the frame's bytes arrive.
 */
export function decode(buf, limits = DEFAULT_LIMITS) {
    const prefix = readVarint(buf, 0, BigInt(limits.frameBytesMax));
    if (prefix.kind === "incomplete")
        return null;
    if (prefix.kind === "too_large") {
        throw new DecodeError("too_large", `frame of ${prefix.valueMin} bytes exceeds frame_bytes_max`);
    }
    if (prefix.value === 0n)
        throw new DecodeError("malformed", "empty frame");
    const len = Number(prefix.value);
    const start = prefix.len;
    if (buf.length - start < len)
        return null;
    const end = start + len;
    const r = new Fields(buf, start + 1, end);
    const t = buf[start];
    let frame;
    switch (t) {
        case Type.LOGIN:
            frame = { type: "login", version: r.byte("missing version byte"), token: r.rest() };
            break;
        case Type.LOGIN_OK:
            frame = { type: "login_ok", serverTimeMs: r.varint(), offlineCount: r.varint() };
            break;
        case Type.LOGIN_ERR:
            frame = { type: "login_err", code: r.known(ERROR_NAMES, "unknown error code"), text: r.text() };
            break;
        case Type.SEND:
            frame = { type: "send", clientId: r.varint(), to: r.varint(), body: r.body(limits) };
            break;
        case Type.ACK:
            frame = { type: "ack", clientId: r.varint(), serverId: r.varint(), serverTimeMs: r.varint() };
            break;
        case Type.DELIVER:
        case Type.DELIVER_V2:
            frame = {
                type: "deliver",
                serverId: r.varint(),
                from: r.varint(),
                serverTimeMs: r.varint(),
                clientId: t === Type.DELIVER_V2 ? r.varint() : null,
                body: r.body(limits),
            };
            break;
        case Type.SENT:
            frame = {
                type: "sent",
                serverId: r.varint(),
                to: r.varint(),
                serverTimeMs: r.varint(),
                clientId: r.varint(),
                body: r.body(limits),
            };
            break;
        case Type.DELIVERED:
            frame = { type: "delivered", serverId: r.varint() };
            break;
        case Type.READ:
            frame = { type: "read", serverId: r.varint(), from: r.varint() };
            break;
        case Type.RECEIPT:
            frame = {
                type: "receipt",
                kind: r.known(RECEIPT_NAMES, "unknown receipt kind"),
                serverId: r.varint(),
                peer: r.varint(),
            };
            break;
        case Type.PING:
            frame = { type: "ping", nonce: r.varint() };
            break;
        case Type.PONG:
            frame = { type: "pong", nonce: r.varint() };
            break;
        case Type.ERROR:
            frame = {
                type: "error",
                code: r.known(ERROR_NAMES, "unknown error code"),
                clientId: r.varint(),
                text: r.text(),
            };
            break;
        case Type.BYE:
            frame = { type: "bye", reason: r.known(BYE_NAMES, "unknown bye reason") };
            break;
        case Type.REDIRECT:
            frame = { type: "redirect", addr: r.text() };
            break;
        case Type.SUBSCRIBE:
            frame = { type: "subscribe", user: r.varint() };
            break;
        case Type.UNSUBSCRIBE:
            frame = { type: "unsubscribe", user: r.varint() };
            break;
        case Type.PRESENCE:
            frame = {
                type: "presence",
                user: r.varint(),
                state: r.known(PRESENCE_NAMES, "unknown presence state"),
                lastSeenMs: r.varint(),
            };
            break;
        case Type.PRIVACY: {
            const hidden = r.varint();
            if (hidden > 1n)
                throw new DecodeError("malformed", "unknown privacy mode");
            frame = { type: "privacy", hidden: hidden === 1n };
            break;
        }
        case Type.TYPING:
            frame = { type: "typing", user: r.varint() };
            break;
        case Type.DEVICE_REMOVE:
            frame = { type: "device_remove", device: r.varint() };
            break;
        case Type.DEVICE_REMOVED:
            frame = { type: "device_removed", device: r.varint() };
            break;
        case Type.GROUP_CREATE:
            frame = { type: "group_create", req: r.varint() };
            break;
        case Type.GROUP_ADD:
        case Type.GROUP_REMOVE:
            frame = {
                type: t === Type.GROUP_ADD ? "group_add" : "group_remove",
                req: r.varint(),
                group: r.varint(),
                user: r.varint(),
            };
            break;
        case Type.GROUP_LEAVE:
            frame = { type: "group_leave", req: r.varint(), group: r.varint() };
            break;
        case Type.GROUP_ADMIN:
            frame = {
                type: "group_admin",
                req: r.varint(),
                group: r.varint(),
                user: r.varint(),
                admin: r.flag("unknown admin flag"),
            };
            break;
        case Type.GROUP_MEMBERS:
            frame = { type: "group_members", req: r.varint(), group: r.varint() };
            break;
        case Type.GROUP_OK:
            frame = { type: "group_ok", req: r.varint(), group: r.varint() };
            break;
        case Type.GROUP_LIST: {
            const req = r.varint();
            const group = r.varint();
            const left = r.varint();
            const flat = r.list();
            if (flat.length % 2 !== 0)
                throw new DecodeError("malformed", "truncated list");
            const entries = [];
            for (let i = 0; i < flat.length; i += 2) {
                if (flat[i + 1] > 1n)
                    throw new DecodeError("malformed", "unknown member role");
                entries.push({ user: flat[i], admin: flat[i + 1] === 1n });
            }
            frame = { type: "group_list", req, group, left, entries };
            break;
        }
        case Type.GROUP_SEND: {
            const clientId = r.varint();
            const group = r.varint();
            const body = r.rest();
            const max = limits.bodyBytesMax - GROUP_BODY_ROOM_BYTES;
            if (body.length > max) {
                throw new DecodeError("too_large", `group body of ${body.length} bytes exceeds ${max}`);
            }
            frame = { type: "group_send", clientId, group, body };
            break;
        }
        case Type.GROUP_DELIVER:
            frame = {
                type: "group_deliver",
                serverId: r.varint(),
                group: r.varint(),
                msg: r.varint(),
                from: r.varint(),
                serverTimeMs: r.varint(),
                clientId: r.varint(),
                body: r.body(limits),
            };
            break;
        case Type.GROUP_EVENT:
            frame = {
                type: "group_event",
                serverId: r.varint(),
                group: r.varint(),
                msg: r.varint(),
                actor: r.varint(),
                serverTimeMs: r.varint(),
                event: r.known(GROUP_EVENT_NAMES, "unknown group event"),
                subject: r.varint(),
            };
            break;
        case Type.GROUP_READ:
            frame = { type: "group_read", group: r.varint(), msg: r.varint(), from: r.varint() };
            break;
        case Type.GROUP_RECEIPT: {
            const kind = r.known(RECEIPT_NAMES, "unknown receipt kind");
            const group = r.varint();
            const msg = r.varint();
            const members = r.list();
            if (members.length === 0)
                throw new DecodeError("malformed", "empty member list");
            frame = { type: "group_receipt", kind, group, msg, members };
            break;
        }
        default:
            throw new DecodeError("unknown_type", `unknown frame type 0x${t.toString(16).padStart(2, "0")}`);
    }
    if (!r.done())
        throw new DecodeError("malformed", "trailing bytes");
    return { frame, used: end };
}
