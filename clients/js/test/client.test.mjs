// The Client driver over a scripted WebSocket (no server): the LOGIN it
// sends, the outbox resent after a reconnect, keepalive PINGs and a dead
// connection noticed by its unanswered PING, the backoff bounds, and the
// BYE reasons after which it must not reconnect.

import { test } from "node:test";
import assert from "node:assert/strict";

import { Client, decode, encode } from "../dist/index.js";
import { until } from "./helpers.mjs";

/** Every socket the client opened, newest last. */
const sockets = [];

class FakeWebSocket {
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.closed = false;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    sockets.push(this);
  }
  send(bytes) {
    this.sent.push(decode(bytes).frame);
  }
  close() {
    this.closed = true;
    this.readyState = 3;
  }
  // Test side:
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  deliver(frame) {
    const b = encode(frame);
    this.onmessage?.({ data: b.buffer.slice(b.byteOffset, b.byteOffset + b.length) });
  }
  drop() {
    this.readyState = 3;
    this.onclose?.({ code: 1006, reason: "" });
  }
}

function newClient(opts = {}) {
  sockets.length = 0;
  const c = new Client({
    url: "ws://test/",
    token: "tok",
    WebSocket: FakeWebSocket,
    backoffMinMs: 5,
    backoffMaxMs: 40,
    random: () => 0.5,
    ...opts,
  });
  const events = [];
  c.on((e) => events.push(e));
  c.start();
  return { c, events };
}

async function loggedIn(ws) {
  ws.open();
  await until(() => ws.sent.length > 0, "LOGIN sent");
  ws.deliver({ type: "login_ok", serverTimeMs: 1n, offlineCount: 0n });
}

test("logs in with version 2 and the token, then resends the outbox after a reconnect", async () => {
  const { c, events } = newClient();
  const first = sockets[0];
  await loggedIn(first);
  assert.deepEqual(first.sent[0], { type: "login", version: 2, token: new TextEncoder().encode("tok") });
  const id1 = c.send(7n, "one");
  const id2 = c.send(7n, "two");
  assert.ok(id2 > id1);
  first.deliver({ type: "ack", clientId: id1, serverId: 100n, serverTimeMs: 5n });
  first.drop();
  await until(() => sockets.length === 2, "redial");
  const second = sockets[1];
  await loggedIn(second);
  const sends = second.sent.filter((f) => f.type === "send");
  assert.deepEqual(sends.map((f) => f.clientId), [id2], "only the unACKed one, same client id");
  assert.equal(events.filter((e) => e.type === "connected").length, 2);
  c.stop();
});

test("PINGs when quiet, and a PING left unanswered ends the connection", async () => {
  const { c, events } = newClient({ keepaliveMs: 40 });
  const ws = sockets[0];
  await loggedIn(ws);
  await until(() => ws.sent.some((f) => f.type === "ping"), "PING");
  const ping = ws.sent.find((f) => f.type === "ping");
  ws.deliver({ type: "pong", nonce: ping.nonce });
  // Answered: the connection stays and later PINGs follow.
  await until(() => ws.sent.filter((f) => f.type === "ping").length >= 2, "second PING");
  // Not answered: given up, dialed again.
  await until(() => sockets.length === 2, "redial after a dead PING");
  assert.ok(ws.closed);
  assert.ok(events.some((e) => e.type === "disconnected" && /PING/.test(e.reason)));
  c.stop();
});

test("answers the server's PING with its nonce", async () => {
  const { c } = newClient();
  const ws = sockets[0];
  await loggedIn(ws);
  ws.deliver({ type: "ping", nonce: 300n });
  assert.deepEqual(ws.sent.at(-1), { type: "pong", nonce: 300n });
  c.stop();
});

test("backoff delays stay within full jitter of the doubling bound", async () => {
  const draws = [0.999, 0.999, 0.999, 0.999, 0.999, 0];
  let i = 0;
  const { c, events } = newClient({ random: () => draws[i++ % draws.length] });
  for (let n = 0; n < 6; n++) {
    await until(() => sockets.length === n + 1, `dial ${n + 1}`);
    sockets[n].drop();
  }
  const delays = events.filter((e) => e.type === "disconnected").map((e) => e.retryInMs);
  // min 5 ms doubling: 5, 10, 20, 40, then the 40 ms cap; a draw of 0 gives 0.
  assert.deepEqual(delays, [4, 9, 19, 39, 39, 0]);
  c.stop();
});

test("BYE replaced or device_removed stops it; BYE shutdown reconnects", async () => {
  for (const [reason, final] of [[2, true], [8, true], [1, false], [13, false]]) {
    const { c, events } = newClient();
    await loggedIn(sockets[0]);
    sockets[0].deliver({ type: "bye", reason });
    const end = events.find((e) => e.type === "disconnected");
    assert.equal(end.retryInMs === null, final, `reason ${reason}`);
    if (!final) await until(() => sockets.length === 2, "redial");
    c.stop();
  }
});

test("a bad frame from the server ends the connection, not the client", async () => {
  const { c, events } = newClient();
  const ws = sockets[0];
  await loggedIn(ws);
  ws.onmessage({ data: new Uint8Array([0x01, 0x13]).buffer }); // unknown type
  const end = events.find((e) => e.type === "disconnected");
  assert.match(end.reason, /unknown_type/);
  assert.notEqual(end.retryInMs, null);
  await until(() => sockets.length === 2, "redial");
  c.stop();
});

test("REDIRECT: followed to the named host on this URL's port, at most 3 in a row, then back to the configured URL", async () => {
  const { c, events } = newClient({ url: "wss://lb.example:8443/tern" });
  // Each node sends the client on to another: the 4th REDIRECT in a row is
  // not followed, and the redial after the backoff goes to the configured URL.
  const hosts = ["10.0.0.2", "10.0.0.3", "[::1]", "10.0.0.4"];
  for (const [i, host] of hosts.entries()) {
    await until(() => sockets.length === i + 1, `dial ${i + 1}`);
    const ws = sockets[i];
    ws.open();
    await until(() => ws.sent.length > 0, "LOGIN sent");
    ws.deliver({ type: "redirect", addr: `${host}:5222` });
  }
  assert.deepEqual(
    sockets.map((s) => s.url),
    ["wss://lb.example:8443/tern", "wss://10.0.0.2:8443/tern", "wss://10.0.0.3:8443/tern", "wss://[::1]:8443/tern"],
  );
  const ends = events.filter((e) => e.type === "disconnected");
  assert.deepEqual(
    ends.map((e) => [e.reason, e.retryInMs]),
    [
      ["redirected to 10.0.0.2:5222 (wss://10.0.0.2:8443/tern)", 0],
      ["redirected to 10.0.0.3:5222 (wss://10.0.0.3:8443/tern)", 0],
      ["redirected to [::1]:5222 (wss://[::1]:8443/tern)", 0],
      ["redirected to 10.0.0.4:5222 (not followed)", 2],
    ],
  );
  await until(() => sockets.length === 5, "redial after the backoff");
  assert.equal(sockets[4].url, "wss://lb.example:8443/tern");
  // A login resets the count: the next REDIRECT is followed again, and the
  // connected event names the URL logged in at.
  sockets[4].open();
  await until(() => sockets[4].sent.length > 0, "LOGIN sent");
  sockets[4].deliver({ type: "redirect", addr: "10.0.0.9:5222" });
  await until(() => sockets.length === 6, "follows again");
  await loggedIn(sockets[5]);
  const up = events.find((e) => e.type === "connected");
  assert.equal(up.url, "wss://10.0.0.9:8443/tern");
  c.stop();
});
