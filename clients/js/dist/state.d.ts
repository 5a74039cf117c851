import { type Frame } from "./codec.js";
/** A message handed to `send` (or `sendToGroup`) and not yet ACKed. */
export interface Outgoing {
    clientId: bigint;
    /** The recipient: a user, or a group when `group` is true. */
    to: bigint;
    /** True for a group message (GROUP_SEND). */
    group: boolean;
    body: Uint8Array;
}
/** What to do with an incoming DELIVER. */
export type Incoming = 
/** New: show it to the app, which calls `accept` once it stored it. */
"show"
/** Already accepted (a re-delivery): answer DELIVERED again, show nothing. */
 | "answer_delivered"
/** Shown and not yet accepted: the app's `accept` will answer it. */
 | "ignore";
/** True when an ERROR with this code and a client id answers a SEND or GROUP_SEND. */
export declare function isSendRefusal(code: number): boolean;
/** True when a refused SEND may be sent again later with the same client id. */
export declare function isRetryable(code: number): boolean;
/** Outbox, client ids and duplicate filter of one device's session. */
export declare class SessionState {
    private readonly outbox;
    private lastClientId;
    /** By server id: messages shown to the app (the last `dedupeWindow`). */
    private readonly byServerId;
    /** By "from/clientId" (or a group copy's keys): the server id it was shown under. */
    private readonly byPair;
    /** SENT copies already reported, by server id. */
    private readonly sentSeen;
    /**
     * @param dedupeWindow how many recent messages the duplicate filter
     *   remembers (default 4096).
     * @param nowUs the clock in microseconds: the first client id is above it,
     *   so ids keep increasing across restarts of the app, as version 2 needs.
     */
    constructor(dedupeWindow?: number, nowUs?: () => bigint);
    private readonly nowUs;
    /** Keeps a new message (to a group if `group`) until ACKed; returns it
     * with its client id. */
    send(to: bigint, body: Uint8Array, group?: boolean): Outgoing;
    /** A fresh id, above every earlier one: client ids, and group request
     * ids (so an ERROR's `client_id` field names one or the other, never both). */
    nextId(): bigint;
    /** The SEND frames to write after a login: the whole outbox, in order. */
    resend(): Frame[];
    /** Messages not yet ACKed, oldest first. */
    pending(): Outgoing[];
    /** The message with this client id, if it is still waiting. */
    get(clientId: bigint): Outgoing | undefined;
    /** An ACK: the message leaves the outbox. False if it was not in it. */
    onAck(clientId: bigint): boolean;
    /**
     * An ERROR naming `clientId`: "retry" keeps the message (send it again
     * later), "final" drops it, "none" means it was not ours.
     */
    onRefused(clientId: bigint, code: number): "retry" | "final" | "none";
    /** Classifies a DELIVER (see {@link Incoming}). */
    onDeliver(serverId: bigint, from: bigint, clientId: bigint | null): Incoming;
    /**
     * Classifies a GROUP_DELIVER (`clientId` set) or GROUP_EVENT (null). A copy
     * is known by (group, msg), which a home shard's restart repeats, and a
     * message also by (group, sender, client id), which a GROUP_SEND sent
     * again after a lost ACK repeats under a new `msg`.
     */
    onGroupDeliver(serverId: bigint, group: bigint, msg: bigint, from: bigint, clientId: bigint | null): Incoming;
    /** Seen under this server id, or under another one with one of `keys`? */
    private classify;
    /** The app stored a shown message; true if it was one (answer DELIVERED). */
    accept(serverId: bigint): boolean;
    /** A SENT copy: true the first time this server id is seen. */
    onSent(serverId: bigint): boolean;
}
/** The SEND (or GROUP_SEND) frame of an outgoing message. */
export declare function sendFrame(m: Outgoing): Frame;
