// The codec against docs/PROTOCOL.md: every hex example there, field by
// field, and every frame line of its code blocks decoded and re-encoded
// byte for byte; then the malformed inputs the document lists.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

import {
  decode,
  encode,
  putVarint,
  errorName,
  DecodeError,
  DEFAULT_LIMITS,
} from "../dist/index.js";

const PROTOCOL = readFileSync(
  fileURLToPath(new URL("../../../docs/PROTOCOL.md", import.meta.url)),
  "utf8",
);

const hex = (s) => Uint8Array.from(s.trim().split(/\s+/).map((b) => parseInt(b, 16)));
const toHex = (u8) => [...u8].map((b) => b.toString(16).padStart(2, "0")).join(" ");
const text = (s) => new TextEncoder().encode(s);

// [hex as printed in PROTOCOL.md, the frame it is]
const EXAMPLES = [
  [
    "16 01 01 76 31 2e 34 32 2e 31 37 36 37 32 32 35 36 30 30 2e 4d 41 43",
    { type: "login", version: 1, token: text("v1.42.1767225600.MAC") },
  ],
  ["08 02 80 d0 ea b6 b7 33 03", { type: "login_ok", serverTimeMs: 1767225600000n, offlineCount: 3n }],
  ["09 03 08 65 78 70 69 72 65 64", { type: "login_err", code: 8, text: "expired" }],
  ["09 03 14 64 65 76 69 63 65 73", { type: "login_err", code: 20, text: "devices" }],
  ["08 04 07 2a 68 65 6c 6c 6f", { type: "send", clientId: 7n, to: 42n, body: text("hello") }],
  [
    "1b 04 e8 07 95 9a ef 3a 74 77 65 6e 74 79 20 62 79 74 65 73 20 6f 66 20 74 65 78 74",
    { type: "send", clientId: 1000n, to: 123456789n, body: text("twenty bytes of text") },
  ],
  [
    "0a 05 07 e9 07 fb d0 ea b6 b7 33",
    { type: "ack", clientId: 7n, serverId: 1001n, serverTimeMs: 1767225600123n },
  ],
  [
    "0f 06 e9 07 11 fb d0 ea b6 b7 33 68 65 6c 6c 6f",
    {
      type: "deliver",
      serverId: 1001n,
      from: 17n,
      serverTimeMs: 1767225600123n,
      clientId: null,
      body: text("hello"),
    },
  ],
  [
    "10 0e e9 07 11 fb d0 ea b6 b7 33 07 68 65 6c 6c 6f",
    {
      type: "deliver",
      serverId: 1001n,
      from: 17n,
      serverTimeMs: 1767225600123n,
      clientId: 7n,
      body: text("hello"),
    },
  ],
  ["03 07 e9 07", { type: "delivered", serverId: 1001n }],
  ["04 08 e9 07 11", { type: "read", serverId: 1001n, from: 17n }],
  ["05 09 02 e9 07 2a", { type: "receipt", kind: 2, serverId: 1001n, peer: 42n }],
  ["03 0a ac 02", { type: "ping", nonce: 300n }],
  ["03 0b ac 02", { type: "pong", nonce: 300n }],
  [
    "0d 0c 05 07 71 75 65 75 65 20 66 75 6c 6c",
    { type: "error", code: 5, clientId: 7n, text: "queue full" },
  ],
  ["09 0c 15 02 64 65 76 69 63 65", { type: "error", code: 21, clientId: 2n, text: "device" }],
  ["02 0d 04", { type: "bye", reason: 4 }],
  ["02 0d 08", { type: "bye", reason: 8 }],
  ["0e 0f 31 30 2e 30 2e 30 2e 32 3a 37 33 33 33", { type: "redirect", addr: "10.0.0.2:7333" }],
  ["02 10 02", { type: "device_remove", device: 2n }],
  ["03 11 ac 02", { type: "device_removed", device: 300n }],
  [
    "0d 12 81 08 07 80 d0 ea b6 b7 33 05 68 69",
    {
      type: "sent",
      serverId: 1025n,
      to: 7n,
      serverTimeMs: 1767225600000n,
      clientId: 5n,
      body: text("hi"),
    },
  ],
  ["02 18 2a", { type: "subscribe", user: 42n }],
  ["02 19 2a", { type: "unsubscribe", user: 42n }],
  ["09 1a 2a 02 80 d0 ea b6 b7 33", { type: "presence", user: 42n, state: 2, lastSeenMs: 1767225600000n }],
  ["02 1b 01", { type: "privacy", hidden: true }],
  ["02 1c 2a", { type: "typing", user: 42n }],
  // Groups.
  ["02 20 01", { type: "group_create", req: 1n }],
  ["04 26 01 81 08", { type: "group_ok", req: 1n, group: 1025n }],
  ["05 21 02 81 08 2a", { type: "group_add", req: 2n, group: 1025n, user: 42n }],
  ["05 22 03 81 08 2a", { type: "group_remove", req: 3n, group: 1025n, user: 42n }],
  ["04 23 04 81 08", { type: "group_leave", req: 4n, group: 1025n }],
  ["06 24 05 81 08 2a 01", { type: "group_admin", req: 5n, group: 1025n, user: 42n, admin: true }],
  ["04 25 06 81 08", { type: "group_members", req: 6n, group: 1025n }],
  [
    "09 27 06 81 08 00 11 01 2a 00",
    {
      type: "group_list",
      req: 6n,
      group: 1025n,
      left: 0n,
      entries: [
        { user: 17n, admin: true },
        { user: 42n, admin: false },
      ],
    },
  ],
  [
    "09 28 07 81 08 68 65 6c 6c 6f",
    { type: "group_send", clientId: 7n, group: 1025n, body: text("hello") },
  ],
  [
    "14 29 81 10 81 08 81 18 11 fb d0 ea b6 b7 33 07 68 65 6c 6c 6f",
    {
      type: "group_deliver",
      serverId: 2049n,
      group: 1025n,
      msg: 3073n,
      from: 17n,
      serverTimeMs: 1767225600123n,
      clientId: 7n,
      body: text("hello"),
    },
  ],
  [
    "10 2a 81 10 81 08 81 18 11 fb d0 ea b6 b7 33 02 2a",
    {
      type: "group_event",
      serverId: 2049n,
      group: 1025n,
      msg: 3073n,
      actor: 17n,
      serverTimeMs: 1767225600123n,
      event: 2,
      subject: 42n,
    },
  ],
  ["06 2b 81 08 81 18 11", { type: "group_read", group: 1025n, msg: 3073n, from: 17n }],
  [
    "0a 2c 02 81 08 81 18 2a 2b ac 02",
    { type: "group_receipt", kind: 2, group: 1025n, msg: 3073n, members: [42n, 43n, 300n] },
  ],
  ["08 0c 2a 02 61 64 6d 69 6e", { type: "error", code: 42, clientId: 2n, text: "admin" }],
];

test("every example encodes to the bytes PROTOCOL.md prints, and decodes back", () => {
  for (const [bytes, frame] of EXAMPLES) {
    assert.ok(PROTOCOL.includes(bytes), `PROTOCOL.md no longer shows ${bytes}`);
    assert.equal(toHex(encode(frame)), bytes, `encoding ${frame.type}`);
    const got = decode(hex(bytes));
    assert.notEqual(got, null);
    assert.equal(got.used, hex(bytes).length);
    assert.deepEqual(got.frame, frame);
  }
});

test("every frame line in PROTOCOL.md's code blocks round-trips byte for byte", () => {
  let inBlock = false;
  let checked = 0;
  for (const line of PROTOCOL.split("\n")) {
    if (line.trim().startsWith("```")) {
      inBlock = !inBlock;
      continue;
    }
    // Frame lines only: WebSocket captures are labelled "client:"/"server:".
    if (!inBlock || !/^([0-9a-f]{2} )*[0-9a-f]{2}$/.test(line.trim())) continue;
    const bytes = hex(line);
    const got = decode(bytes);
    assert.notEqual(got, null, line);
    assert.equal(got.used, bytes.length, line);
    assert.equal(toHex(encode(got.frame)), line.trim(), line);
    checked += 1;
  }
  // All examples but one, BYE(device_removed), which is inline text.
  assert.ok(checked >= EXAMPLES.length - 1, `only ${checked} frame lines found`);
});

test("varints match the table", () => {
  const table = [
    [0n, "00"],
    [127n, "7f"],
    [128n, "80 01"],
    [300n, "ac 02"],
    [16384n, "80 80 01"],
    [70000n, "f0 a2 04"],
    [(1n << 64n) - 1n, "ff ff ff ff ff ff ff ff ff 01"],
  ];
  for (const [value, bytes] of table) {
    assert.ok(PROTOCOL.includes("`" + bytes + "`"), bytes);
    const out = [];
    putVarint(out, value);
    assert.equal(toHex(Uint8Array.from(out)), bytes);
    // As a PING nonce, so the decoder reads it too.
    const frame = decode(encode({ type: "ping", nonce: value })).frame;
    assert.equal(frame.nonce, value);
  }
  assert.throws(() => putVarint([], 1n << 64n), RangeError);
  assert.throws(() => putVarint([], -1n), RangeError);
});

function refused(bytes, code, limits = DEFAULT_LIMITS) {
  assert.throws(
    () => decode(typeof bytes === "string" ? hex(bytes) : bytes, limits),
    (e) => e instanceof DecodeError && e.code === code,
    `${typeof bytes === "string" ? bytes : "input"} should be ${code}`,
  );
}

test("partial frames wait for more bytes", () => {
  assert.equal(decode(hex("80")), null);
  assert.equal(decode(new Uint8Array(0)), null);
  const whole = hex("08 04 07 2a 68 65 6c 6c 6f");
  for (let n = 0; n < whole.length; n++) assert.equal(decode(whole.subarray(0, n)), null);
  // Two frames back to back: the first is returned, the rest left alone.
  const two = new Uint8Array([...whole, ...hex("03 0a ac 02")]);
  assert.equal(decode(two).used, whole.length);
});

test("malformed input is refused with the code the document gives", () => {
  refused("00", "malformed"); // empty frame
  refused("80 00", "malformed"); // non-minimal prefix
  refused("03 0a 81 00", "malformed"); // non-minimal field
  refused("0b 0a ff ff ff ff ff ff ff ff ff 02", "malformed"); // overflows u64
  refused("0b 0a ff ff ff ff ff ff ff ff ff 81", "malformed"); // longer than 10 bytes
  refused("01 01", "malformed"); // LOGIN without the version byte
  refused("03 0a ac 02".replace("03", "04") + " 00", "malformed"); // trailing bytes
  refused("02 05 07", "malformed"); // ACK ends inside its fields
  refused("03 03 63 41", "malformed"); // unknown error code 99
  refused("04 09 03 01 02", "malformed"); // unknown receipt kind
  refused("02 0d 09", "malformed"); // unknown bye reason 9
  refused("04 1a 2a 04 00", "malformed"); // unknown presence state
  refused("02 1b 02", "malformed"); // privacy neither 0 nor 1
  refused("04 0c 01 00 ff", "malformed"); // invalid UTF-8 text
  for (const t of [0x00, 0x13, 0x17, 0x1d, 0x2d, 0x2f, 0xff]) {
    refused(Uint8Array.of(1, t), "unknown_type");
  }
});

test("malformed group frames are refused as the Groups section says", () => {
  refused("06 24 05 81 08 2a 02", "malformed"); // admin neither 0 nor 1
  refused("09 27 06 81 08 00 11 02 2a 00", "malformed"); // member role 2
  refused("08 27 06 81 08 00 11 01 2a", "malformed"); // entry without its role
  refused("09 27 06 81 08 00 11 01 2a 80", "malformed"); // list ends inside a varint
  refused("10 2a 81 10 81 08 81 18 11 fb d0 ea b6 b7 33 07 2a", "malformed"); // event 7
  refused("10 2a 81 10 81 08 81 18 11 fb d0 ea b6 b7 33 00 2a", "malformed"); // event 0
  refused("0a 2c 03 81 08 81 18 2a 2b ac 02", "malformed"); // receipt kind 3
  refused("06 2c 02 81 08 81 18", "malformed"); // no members
  refused("09 2c 02 81 08 81 18 2a 2b ac", "malformed"); // member cut short
  refused("03 23 04 81", "malformed"); // GROUP_LEAVE ends inside its group
  refused("05 23 04 81 08 00", "malformed"); // trailing bytes
  // Every error code 40..46 decodes by name; 47 is reserved, so unknown.
  const names = ["unknown_group", "not_member", "not_admin", "group_full"];
  names.push("too_many_groups", "no_such_member", "last_admin");
  names.forEach((name, i) => {
    assert.ok(PROTOCOL.includes("| " + (40 + i) + "   | `" + name + "`"), name);
    const f = decode(encode({ type: "error", code: 40 + i, clientId: 1n, text: "" })).frame;
    assert.equal(errorName(f.code), name);
  });
  refused("03 0c 2f 01", "malformed");
});

test("a group body leaves room for GROUP_DELIVER's two extra varints", () => {
  const small = { frameBytesMax: 200, bodyBytesMax: 100 };
  const send = (n) =>
    encode({ type: "group_send", clientId: 1n, group: 2n, body: new Uint8Array(n) });
  assert.equal(decode(send(80), small).frame.body.length, 80);
  refused(send(81), "too_large", small);
  const deliver = (n) =>
    encode({
      type: "group_deliver",
      serverId: 1n,
      group: 2n,
      msg: 3n,
      from: 4n,
      serverTimeMs: 5n,
      clientId: 6n,
      body: new Uint8Array(n),
    });
  assert.equal(decode(deliver(100), small).frame.body.length, 100);
  refused(deliver(101), "too_large", small);
});

test("too large is refused from the length prefix alone", () => {
  refused("f0 a2 04", "too_large"); // 70000 > 65536
  refused("80 80 80", "too_large"); // can only end at 2^21 or more
  const small = { frameBytesMax: 64, bodyBytesMax: 16 };
  refused("41", "too_large", small);
  assert.equal(decode(hex("40"), small), null); // 64 is allowed: wait for it
  const body = encode({ type: "send", clientId: 1n, to: 2n, body: new Uint8Array(17) });
  refused(body, "too_large", small);
});
