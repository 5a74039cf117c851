// The bookkeeping of a protocol version 2 session, without I/O (like the
// Rust client's session_state): the outbox of messages not yet ACKed, the
// client id counter, and the duplicate filter for what arrives. The driver
// (client.ts) feeds it events and writes the frames it returns.
import { ErrorCode } from "./codec.js";
/** SEND refusals that take nothing and may succeed later with the same client id. */
const RETRYABLE = new Set([
    ErrorCode.queue_full,
    ErrorCode.storage_full,
    ErrorCode.unavailable,
    ErrorCode.rate_limited,
    ErrorCode.internal,
]);
/** SEND and GROUP_SEND refusals that are final for that message. */
const FINAL = new Set([
    ErrorCode.bad_recipient,
    ErrorCode.stale_client_id,
    ErrorCode.unknown_group,
    ErrorCode.not_member,
]);
/** True when an ERROR with this code and a client id answers a SEND or GROUP_SEND. */
export function isSendRefusal(code) {
    return RETRYABLE.has(code) || FINAL.has(code);
}
/** True when a refused SEND may be sent again later with the same client id. */
export function isRetryable(code) {
    return RETRYABLE.has(code);
}
/**
 * A bounded set of recent keys, oldest evicted first. Holds at most
 * `capacity` keys.
 */
class Recent {
    capacity;
    map = new Map();
    constructor(capacity) {
        this.capacity = capacity;
    }
    get(key) {
        return this.map.get(key);
    }
    set(key, value) {
        if (this.capacity === 0)
            return;
        if (!this.map.has(key) && this.map.size >= this.capacity) {
            // Maps iterate in insertion order: the first key is the oldest.
            const oldest = this.map.keys().next().value;
            this.map.delete(oldest);
        }
        this.map.set(key, value);
    }
    get size() {
        return this.map.size;
    }
}
/** Outbox, client ids and duplicate filter of one device's session. */
export class SessionState {
    outbox = new Map();
    lastClientId;
    /** By server id: messages shown to the app (the last `dedupeWindow`). */
    byServerId;
    /** By "from/clientId" (or a group copy's keys): the server id it was shown under. */
    byPair;
    /** SENT copies already reported, by server id. */
    sentSeen;
    /**
     * @param dedupeWindow how many recent messages the duplicate filter
     *   remembers (default 4096).
     * @param nowUs the clock in microseconds: the first client id is above it,
     *   so ids keep increasing across restarts of the app, as version 2 needs.
     */
    constructor(dedupeWindow = 4096, nowUs = () => BigInt(Date.now()) * 1000n) {
        this.byServerId = new Recent(dedupeWindow);
        this.byPair = new Recent(dedupeWindow);
        this.sentSeen = new Recent(dedupeWindow);
        this.nowUs = nowUs;
        this.lastClientId = 0n;
    }
    nowUs;
    /** Keeps a new message (to a group if `group`) until ACKed; returns it
     * with its client id. */
    send(to, body, group = false) {
        const msg = { clientId: this.nextId(), to, group, body };
        this.outbox.set(msg.clientId, msg);
        return msg;
    }
    /** A fresh id, above every earlier one: client ids, and group request
     * ids (so an ERROR's `client_id` field names one or the other, never both). */
    nextId() {
        const now = this.nowUs();
        this.lastClientId = now > this.lastClientId ? now : this.lastClientId + 1n;
        return this.lastClientId;
    }
    /** The SEND frames to write after a login: the whole outbox, in order. */
    resend() {
        return this.pending().map((m) => sendFrame(m));
    }
    /** Messages not yet ACKed, oldest first. */
    pending() {
        return [...this.outbox.values()].sort((a, b) => a.clientId < b.clientId ? -1 : a.clientId > b.clientId ? 1 : 0);
    }
    /** The message with this client id, if it is still waiting. */
    get(clientId) {
        return this.outbox.get(clientId);
    }
    /** An ACK: the message leaves the outbox. False if it was not in it. */
    onAck(clientId) {
        return this.outbox.delete(clientId);
    }
    /**
     * An ERROR naming `clientId`: "retry" keeps the message (send it again
     * later), "final" drops it, "none" means it was not ours.
     */
    onRefused(clientId, code) {
        if (!this.outbox.has(clientId) || !isSendRefusal(code))
            return "none";
        if (isRetryable(code))
            return "retry";
        this.outbox.delete(clientId);
        return "final";
    }
    /** Classifies a DELIVER (see {@link Incoming}). */
    onDeliver(serverId, from, clientId) {
        // Client id 0 (a v1 sender) names nothing.
        const keys = clientId !== null && clientId !== 0n ? [`${from}/${clientId}`] : [];
        return this.classify(serverId, keys);
    }
    /**
     * Classifies a GROUP_DELIVER (`clientId` set) or GROUP_EVENT (null). A copy
     * is known by (group, msg), which a home shard's restart repeats, and a
     * message also by (group, sender, client id), which a GROUP_SEND sent
     * again after a lost ACK repeats under a new `msg`.
     */
    onGroupDeliver(serverId, group, msg, from, clientId) {
        const keys = [`g${group}/${msg}`];
        if (clientId !== null && clientId !== 0n)
            keys.push(`g${group}/${from}/${clientId}`);
        return this.classify(serverId, keys);
    }
    /** Seen under this server id, or under another one with one of `keys`? */
    classify(serverId, keys) {
        const seen = this.byServerId.get(serverId.toString());
        if (seen !== undefined)
            return seen.accepted ? "answer_delivered" : "ignore";
        for (const key of keys) {
            const earlier = this.byPair.get(key);
            if (earlier !== undefined && earlier !== serverId) {
                // The same message under another server id: a copy, stored already
                // (or about to be, with the first one).
                this.byServerId.set(serverId.toString(), { accepted: true });
                return "answer_delivered";
            }
        }
        for (const key of keys)
            this.byPair.set(key, serverId);
        this.byServerId.set(serverId.toString(), { accepted: false });
        return "show";
    }
    /** The app stored a shown message; true if it was one (answer DELIVERED). */
    accept(serverId) {
        const seen = this.byServerId.get(serverId.toString());
        if (seen === undefined)
            return false;
        seen.accepted = true;
        return true;
    }
    /** A SENT copy: true the first time this server id is seen. */
    onSent(serverId) {
        const key = serverId.toString();
        if (this.sentSeen.get(key) !== undefined)
            return false;
        this.sentSeen.set(key, true);
        return true;
    }
}
/** The SEND (or GROUP_SEND) frame of an outgoing message. */
export function sendFrame(m) {
    return m.group
        ? { type: "group_send", clientId: m.clientId, group: m.to, body: m.body }
        : { type: "send", clientId: m.clientId, to: m.to, body: m.body };
}
