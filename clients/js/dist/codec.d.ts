/** Protocol version 1 (LOGIN version byte). */
export declare const VERSION_1 = 1;
/** Protocol version 2: idempotent SEND, DELIVER with client id, presence, devices, groups. */
export declare const VERSION_2 = 2;
/** Longest varint (a u64) and so longest length prefix, in bytes. */
export declare const VARINT_BYTES_MAX = 10;
/** The frame type bytes. */
export declare const Type: {
    readonly LOGIN: 1;
    readonly LOGIN_OK: 2;
    readonly LOGIN_ERR: 3;
    readonly SEND: 4;
    readonly ACK: 5;
    readonly DELIVER: 6;
    readonly DELIVERED: 7;
    readonly READ: 8;
    readonly RECEIPT: 9;
    readonly PING: 10;
    readonly PONG: 11;
    readonly ERROR: 12;
    readonly BYE: 13;
    readonly DELIVER_V2: 14;
    readonly REDIRECT: 15;
    readonly DEVICE_REMOVE: 16;
    readonly DEVICE_REMOVED: 17;
    readonly SENT: 18;
    readonly SUBSCRIBE: 24;
    readonly UNSUBSCRIBE: 25;
    readonly PRESENCE: 26;
    readonly PRIVACY: 27;
    readonly TYPING: 28;
    readonly GROUP_CREATE: 32;
    readonly GROUP_ADD: 33;
    readonly GROUP_REMOVE: 34;
    readonly GROUP_LEAVE: 35;
    readonly GROUP_ADMIN: 36;
    readonly GROUP_MEMBERS: 37;
    readonly GROUP_OK: 38;
    readonly GROUP_LIST: 39;
    readonly GROUP_SEND: 40;
    readonly GROUP_DELIVER: 41;
    readonly GROUP_EVENT: 42;
    readonly GROUP_READ: 43;
    readonly GROUP_RECEIPT: 44;
};
/** Error codes (LOGIN_ERR and ERROR), by name; the numbers never change. */
export declare const ErrorCode: {
    readonly malformed: 1;
    readonly unknown_type: 2;
    readonly too_large: 3;
    readonly not_logged_in: 4;
    readonly queue_full: 5;
    readonly bad_version: 6;
    readonly bad_token: 7;
    readonly token_expired: 8;
    readonly rate_limited: 9;
    readonly internal: 10;
    readonly already_logged_in: 11;
    readonly bad_recipient: 12;
    readonly server_full: 13;
    readonly bad_state: 14;
    readonly storage_full: 15;
    readonly unavailable: 16;
    readonly unknown_message: 17;
    readonly stale_client_id: 18;
    readonly other_node: 19;
    readonly too_many_devices: 20;
    readonly unknown_device: 21;
    readonly presence_subs_full: 25;
    readonly banned: 30;
    readonly unknown_group: 40;
    readonly not_member: 41;
    readonly not_admin: 42;
    readonly group_full: 43;
    readonly too_many_groups: 44;
    readonly no_such_member: 45;
    readonly last_admin: 46;
};
/** Receipt kinds. */
export declare const ReceiptKind: {
    readonly delivered: 1;
    readonly read: 2;
};
/** Bye reasons. */
export declare const ByeReason: {
    readonly shutdown: 1;
    readonly replaced: 2;
    readonly slow: 3;
    readonly idle: 4;
    readonly error: 5;
    readonly rate_limited: 6;
    readonly moved: 7;
    readonly device_removed: 8;
    readonly kicked: 10;
    readonly moving: 11;
    readonly upgrade: 13;
};
/** Presence states. */
export declare const PresenceState: {
    readonly online: 1;
    readonly offline: 2;
    readonly hidden: 3;
};
/** Group events (GROUP_EVENT's `event`): what `actor` did to `subject`. */
export declare const GroupEvent: {
    readonly created: 1;
    readonly added: 2;
    readonly removed: 3;
    readonly left: 4;
    readonly admin: 5;
    readonly unadmin: 6;
};
/** How much smaller than `bodyBytesMax` a GROUP_SEND body must be: room for
 * the two varints GROUP_DELIVER carries beyond a DELIVER (group, msg). */
export declare const GROUP_BODY_ROOM_BYTES: number;
/** The name of an error code (`"queue_full"`), or `"code N"` if unknown. */
export declare function errorName(code: number): string;
/** The name of a group event (`"added"`), or `"event N"` if unknown. */
export declare function groupEventName(event: number): string;
/** The name of a bye reason (`"replaced"`), or `"reason N"` if unknown. */
export declare function byeName(reason: number): string;
/** One frame, either direction. Ids, users and times are u64 as bigint. */
export type Frame = {
    type: "login";
    version: number;
    token: Uint8Array;
} | {
    type: "login_ok";
    serverTimeMs: bigint;
    offlineCount: bigint;
} | {
    type: "login_err";
    code: number;
    text: string;
} | {
    type: "send";
    clientId: bigint;
    to: bigint;
    body: Uint8Array;
} | {
    type: "ack";
    clientId: bigint;
    serverId: bigint;
    serverTimeMs: bigint;
}
/** `clientId` is null for the version 1 DELIVER (0x06), set for 0x0E. */
 | {
    type: "deliver";
    serverId: bigint;
    from: bigint;
    serverTimeMs: bigint;
    clientId: bigint | null;
    body: Uint8Array;
} | {
    type: "delivered";
    serverId: bigint;
} | {
    type: "read";
    serverId: bigint;
    from: bigint;
} | {
    type: "receipt";
    kind: number;
    serverId: bigint;
    peer: bigint;
} | {
    type: "ping";
    nonce: bigint;
} | {
    type: "pong";
    nonce: bigint;
} | {
    type: "error";
    code: number;
    clientId: bigint;
    text: string;
} | {
    type: "bye";
    reason: number;
} | {
    type: "redirect";
    addr: string;
} | {
    type: "device_remove";
    device: bigint;
} | {
    type: "device_removed";
    device: bigint;
} | {
    type: "sent";
    serverId: bigint;
    to: bigint;
    serverTimeMs: bigint;
    clientId: bigint;
    body: Uint8Array;
} | {
    type: "subscribe";
    user: bigint;
} | {
    type: "unsubscribe";
    user: bigint;
} | {
    type: "presence";
    user: bigint;
    state: number;
    lastSeenMs: bigint;
} | {
    type: "privacy";
    hidden: boolean;
} | {
    type: "typing";
    user: bigint;
} | {
    type: "group_create";
    req: bigint;
} | {
    type: "group_add";
    req: bigint;
    group: bigint;
    user: bigint;
} | {
    type: "group_remove";
    req: bigint;
    group: bigint;
    user: bigint;
} | {
    type: "group_leave";
    req: bigint;
    group: bigint;
} | {
    type: "group_admin";
    req: bigint;
    group: bigint;
    user: bigint;
    admin: boolean;
} | {
    type: "group_members";
    req: bigint;
    group: bigint;
} | {
    type: "group_ok";
    req: bigint;
    group: bigint;
}
/** Part of a member list; `left` entries follow in later frames (0: last). */
 | {
    type: "group_list";
    req: bigint;
    group: bigint;
    left: bigint;
    entries: GroupMember[];
} | {
    type: "group_send";
    clientId: bigint;
    group: bigint;
    body: Uint8Array;
}
/** `serverId` is this member's copy in its queue (what DELIVERED names);
 * `msg` the group's id for the message, the same at every member. */
 | {
    type: "group_deliver";
    serverId: bigint;
    group: bigint;
    msg: bigint;
    from: bigint;
    serverTimeMs: bigint;
    clientId: bigint;
    body: Uint8Array;
} | {
    type: "group_event";
    serverId: bigint;
    group: bigint;
    msg: bigint;
    actor: bigint;
    serverTimeMs: bigint;
    event: number;
    subject: bigint;
} | {
    type: "group_read";
    group: bigint;
    msg: bigint;
    from: bigint;
}
/** Members (at least one) who got (`kind` delivered) or read message `msg`. */
 | {
    type: "group_receipt";
    kind: number;
    group: bigint;
    msg: bigint;
    members: bigint[];
};
/** One GROUP_LIST entry. */
export interface GroupMember {
    user: bigint;
    admin: boolean;
}
/** Size limits the decoder enforces (the server's defaults). */
export interface Limits {
    /** Largest `L` (type byte plus fields) accepted. */
    frameBytesMax: number;
    /** Largest SEND, DELIVER or SENT body accepted. */
    bodyBytesMax: number;
}
/** The server's default limits. */
export declare const DEFAULT_LIMITS: Limits;
/** Why bytes could not be decoded; fatal for the connection. */
export declare class DecodeError extends Error {
    /** The error code a peer would report: malformed, too_large or unknown_type. */
    readonly code: "malformed" | "too_large" | "unknown_type";
    constructor(code: "malformed" | "too_large" | "unknown_type", message: string);
}
/** Appends `v` (0..2^64-1) as an unsigned LEB128 varint. */
export declare function putVarint(out: number[], v: bigint): void;
/** Encodes one frame with its length prefix. */
export declare function encode(frame: Frame): Uint8Array;
/**
 * Decodes the first frame in `buf`: null while `buf` holds only part of one
 * (nothing consumed), else the frame and the bytes it used. Throws
 * DecodeError when the stream is bad; the length prefix is checked against
 * `limits.frameBytesMax` byte by byte, before the frame's bytes arrive.
 */
export declare function decode(buf: Uint8Array, limits?: Limits): {
    frame: Frame;
    used: number;
} | null;
