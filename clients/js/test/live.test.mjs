// The client against a real Tern server over real WebSockets: the chat and
// its ticks, the lost-ACK retry (exactly once), reconnecting with backoff,
// re-delivery of what was not accepted, presence, typing, devices, refusals.
// Each test uses its own users, so the files can share one server.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";

import { Client } from "../dist/index.js";
import { recorder, startProxy as newProxy, startServer, token, until } from "./helpers.mjs";

let server;
const clients = [];
const proxies = [];

/** A proxy in front of the server, closed after the tests even if one fails. */
async function startProxy(target) {
  const proxy = await newProxy(target);
  proxies.push(proxy);
  return proxy;
}

before(async () => {
  server = await startServer();
});

after(async () => {
  for (const c of clients) c.stop();
  for (const p of proxies) await p.close();
  await server.stop();
});

/** A started client for `user` (device `device`) and its event recorder. */
function client(user, { device = 0, url = server.url, ...opts } = {}) {
  const c = new Client({
    url,
    token: token(server.secret, user, device),
    backoffMinMs: 20,
    backoffMaxMs: 200,
    ...opts,
  });
  const r = recorder(c);
  clients.push(c);
  c.start();
  return { c, r };
}

const connected = (r, from = 0) => r.wait((e) => e.type === "connected", "connected", from);
const text = (b) => new TextDecoder().decode(b);

test("two clients chat: ACK, message, delivered and read receipts", async () => {
  const a = client(1101n);
  const b = client(1102n);
  await Promise.all([connected(a.r), connected(b.r)]);
  const cid = a.c.send(1102n, "hello over websocket");
  const ack = await a.r.wait((e) => e.type === "ack" && e.clientId === cid, "ack");
  assert.equal(ack.to, 1102n);
  const msg = await b.r.wait((e) => e.type === "message", "message");
  assert.equal(text(msg.body), "hello over websocket");
  assert.equal(msg.from, 1101n);
  assert.equal(msg.serverId, ack.serverId);
  assert.equal(msg.clientId, cid);
  assert.equal(msg.serverTimeMs, ack.serverTimeMs);
  b.c.accept(msg.serverId);
  const delivered = await a.r.wait((e) => e.type === "receipt" && e.kind === "delivered", "delivered");
  assert.equal(delivered.serverId, ack.serverId);
  assert.equal(delivered.peer, 1102n);
  b.c.read(msg.serverId, msg.from);
  const read = await a.r.wait((e) => e.type === "receipt" && e.kind === "read", "read");
  assert.equal(read.serverId, ack.serverId);
  assert.deepEqual(a.c.pending(), []);
});

test("an ACK lost with the connection: the resend gets the same server id, the peer sees it once", async () => {
  const proxy = await startProxy(server.url);
  const a = client(1201n, { url: proxy.url });
  const b = client(1202n);
  await Promise.all([connected(a.r), connected(b.r)]);
  // The SEND reaches the server; its ACK is dropped on the way back.
  proxy.blackhole(true);
  const cid = a.c.send(1202n, "once");
  const first = await b.r.wait((e) => e.type === "message", "message");
  assert.equal(a.r.count((e) => e.type === "ack"), 0);
  assert.equal(a.c.pending().length, 1);
  const before = a.r.events.length;
  proxy.blackhole(false);
  proxy.cut();
  // Reconnected, the outbox goes again with the same client id (protocol v2):
  // the server answers with the original ACK and stores nothing new.
  const ack = await a.r.wait((e) => e.type === "ack", "ack after reconnect", before);
  assert.equal(ack.clientId, cid);
  assert.equal(ack.serverId, first.serverId);
  assert.ok(a.r.count((e) => e.type === "connected") >= 2);
  // A later message arrives after it: the server did not queue a copy.
  a.c.send(1202n, "next");
  const next = await b.r.wait((e) => e.type === "message" && text(e.body) === "next", "next");
  assert.notEqual(next.serverId, first.serverId);
  assert.equal(b.r.count((e) => e.type === "message" && text(e.body) === "once"), 1);
  await proxy.close();
});

test("while the server is unreachable, sends wait; after the reconnect they go in order", async () => {
  const proxy = await startProxy(server.url);
  // Node 20's WebSocket reports nothing when a dial is reset: the client's
  // login timeout notices.
  const a = client(1301n, { url: proxy.url, loginTimeoutMs: 300 });
  const b = client(1302n);
  await Promise.all([connected(a.r), connected(b.r)]);
  proxy.refuse(true);
  proxy.cut();
  await a.r.wait((e) => e.type === "disconnected" && e.retryInMs !== null, "disconnected");
  const sent = [];
  for (let i = 0; i < 5; i++) sent.push(a.c.send(1302n, `m${i}`));
  // Redials are refused: the backoff keeps trying.
  const dialsBefore = a.r.count((e) => e.type === "disconnected");
  await until(() => a.r.count((e) => e.type === "disconnected") >= dialsBefore + 3, "redials");
  assert.equal(a.c.pending().length, 5);
  for (const e of a.r.events.filter((e) => e.type === "disconnected")) {
    assert.ok(e.retryInMs >= 0 && e.retryInMs < 200, `jittered delay within the bound: ${e.retryInMs}`);
  }
  proxy.refuse(false);
  for (let i = 0; i < 5; i++) {
    await b.r.wait((e) => e.type === "message" && text(e.body) === `m${i}`, `m${i}`);
  }
  const bodies = b.r.events.filter((e) => e.type === "message").map((e) => text(e.body));
  assert.deepEqual(bodies, ["m0", "m1", "m2", "m3", "m4"]);
  await until(() => a.c.pending().length === 0, "all ACKed");
  assert.deepEqual(
    a.r.events.filter((e) => e.type === "ack").map((e) => e.clientId),
    sent,
  );
  await proxy.close();
});

test("a message not accepted comes again after a reconnect, is shown once, and accept answers it", async () => {
  const proxy = await startProxy(server.url);
  const a = client(1401n);
  const b = client(1402n, { url: proxy.url });
  await Promise.all([connected(a.r), connected(b.r)]);
  a.c.send(1402n, "store me");
  const msg = await b.r.wait((e) => e.type === "message", "message");
  const before = b.r.events.length;
  proxy.cut(); // before the app accepted it: the server sends it again
  const again = await b.r.wait((e) => e.type === "connected", "reconnected", before);
  assert.equal(again.offlineCount, 1n);
  b.c.accept(msg.serverId);
  const receipt = await a.r.wait((e) => e.type === "receipt" && e.kind === "delivered", "delivered");
  assert.equal(receipt.serverId, msg.serverId);
  assert.equal(b.r.count((e) => e.type === "message"), 1);
  await proxy.close();
});

test("presence and typing between version 2 clients", async () => {
  const a = client(1501n);
  await connected(a.r);
  a.c.subscribe(1502n);
  const offline = await a.r.wait((e) => e.type === "presence", "presence");
  assert.equal(offline.user, 1502n);
  assert.equal(offline.state, "offline");
  const b = client(1502n);
  await connected(b.r);
  await a.r.wait((e) => e.type === "presence" && e.state === "online", "online");
  b.c.typing(1501n);
  const typing = await a.r.wait((e) => e.type === "typing", "typing");
  assert.equal(typing.user, 1502n);
  b.c.setHidden(true);
  await a.r.wait((e) => e.type === "presence" && e.state === "hidden", "hidden");
});

test("another device gets SENT; a removed device gets BYE and stops reconnecting", async () => {
  const phone = client(1601n, { device: 1 });
  const laptop = client(1601n, { device: 2 });
  const peer = client(1602n);
  await Promise.all([connected(phone.r), connected(laptop.r), connected(peer.r)]);
  const cid = phone.c.send(1602n, "from the phone");
  const sent = await laptop.r.wait((e) => e.type === "sent", "sent");
  assert.equal(sent.clientId, cid);
  assert.equal(sent.to, 1602n);
  assert.equal(text(sent.body), "from the phone");
  laptop.c.removeDevice(1n);
  const removed = await laptop.r.wait((e) => e.type === "device_removed", "device_removed");
  assert.equal(removed.device, 1n);
  const bye = await phone.r.wait((e) => e.type === "disconnected", "phone disconnected");
  assert.match(bye.reason, /device_removed/);
  assert.equal(bye.retryInMs, null);
  assert.equal(phone.c.connected, false);
  // Removing a device that is not online is refused; the connection stays.
  laptop.c.removeDevice(7n);
  const err = await laptop.r.wait((e) => e.type === "error", "unknown_device");
  assert.equal(err.code, "unknown_device");
  assert.equal(err.clientId, 7n);
  assert.equal(laptop.c.connected, true);
});

test("a bad token is refused and the client stops; a bad recipient refuses only that message", async () => {
  const bad = new Client({ url: server.url, token: "v2.1701.0.1.bogus" });
  const r = recorder(bad);
  clients.push(bad);
  bad.start();
  const err = await r.wait((e) => e.type === "error", "login error");
  assert.equal(err.code, "bad_token");
  const end = await r.wait((e) => e.type === "disconnected", "disconnected");
  assert.equal(end.retryInMs, null);

  const a = client(1702n);
  await connected(a.r);
  const cid = a.c.send(0n, "to nobody");
  const refused = await a.r.wait((e) => e.type === "refused", "refused");
  assert.equal(refused.clientId, cid);
  assert.equal(refused.code, "bad_recipient");
  assert.deepEqual(a.c.pending(), []);
  assert.throws(() => a.c.send(1n, new Uint8Array(65001)), RangeError);
});

test("a group: create, add, send; every member gets every message in order, the sender its receipts", async () => {
  const alice = client(1801n);
  const bob = client(1802n);
  const carol = client(1803n);
  const dave = client(1804n);
  await Promise.all([alice, bob, carol, dave].map((m) => connected(m.r)));
  const g = await alice.c.createGroup();
  assert.ok(g > 0n);
  await alice.c.addMember(g, 1802n);
  await alice.c.addMember(g, 1803n);
  await alice.c.setAdmin(g, 1802n, true);
  const members = await bob.c.members(g);
  members.sort((x, y) => (x.user < y.user ? -1 : 1));
  assert.deepEqual(members, [
    { user: 1801n, admin: true },
    { user: 1802n, admin: true },
    { user: 1803n, admin: false },
  ]);
  // Refusals reject the request's promise with the error's name.
  await assert.rejects(carol.c.addMember(g, 1804n), { code: "not_admin" });
  await assert.rejects(dave.c.members(g), { code: "not_member" });
  await assert.rejects(dave.c.addMember(1n << 60n, 1804n), { code: "unknown_group" });
  const refusedCid = dave.c.sendToGroup(g, "not a member");
  const refused = await dave.r.wait((e) => e.type === "refused", "refused");
  assert.equal(refused.clientId, refusedCid);
  assert.equal(refused.code, "not_member");

  // Every member (the sender too) gets the membership events, in order.
  const added = await carol.r.wait(
    (e) => e.type === "group_event" && e.event === "added" && e.subject === 1803n,
    "carol added",
  );
  assert.equal(added.group, g);
  assert.equal(added.actor, 1801n);

  const cids = [];
  for (const word of ["one", "two", "three"]) cids.push(alice.c.sendToGroup(g, word));
  const acks = [];
  for (const cid of cids) {
    const ack = await alice.r.wait((e) => e.type === "ack" && e.clientId === cid, "group ack");
    assert.equal(ack.to, g);
    assert.equal(ack.group, true);
    acks.push(ack.serverId);
  }
  assert.ok(acks[0] < acks[1] && acks[1] < acks[2], "msg numbers increase");
  assert.deepEqual(alice.c.pending(), []);
  for (const m of [alice, bob, carol]) {
    await until(() => m.r.count((e) => e.type === "group_message") === 3, "three group messages");
    const got = m.r.events.filter((e) => e.type === "group_message");
    assert.deepEqual(got.map((e) => text(e.body)), ["one", "two", "three"]);
    assert.deepEqual(got.map((e) => e.msg), acks);
    assert.deepEqual(got.map((e) => e.clientId), cids);
    for (const e of got) {
      assert.equal(e.group, g);
      assert.equal(e.from, 1801n);
    }
    // Membership events come before the messages in the group's order.
    const events = m.r.events.filter((e) => e.type === "group_event");
    assert.ok(events.every((e) => e.msg < acks[0]));
    for (const e of [...events, ...got]) m.c.accept(e.serverId);
  }
  assert.equal(dave.r.count((e) => e.type === "group_message"), 0);

  // The sender gets delivered receipts naming bob and carol for each message.
  for (const msg of acks) {
    await until(() => {
      const who = new Set();
      for (const e of alice.r.events) {
        if (e.type === "group_receipt" && e.kind === "delivered" && e.msg === msg) {
          assert.equal(e.group, g);
          e.members.forEach((u) => who.add(u));
        }
      }
      return who.has(1802n) && who.has(1803n);
    }, "delivered receipts from bob and carol");
  }
  bob.c.readGroup(g, acks[2], 1801n);
  const read = await alice.r.wait((e) => e.type === "group_receipt" && e.kind === "read", "read receipt");
  assert.equal(read.msg, acks[2]);
  assert.deepEqual(read.members, [1802n]);

  // Carol leaves: the members list no longer names her.
  await carol.c.leaveGroup(g);
  const left = await bob.r.wait((e) => e.type === "group_event" && e.event === "left", "carol left");
  assert.equal(left.subject, 1803n);
  assert.deepEqual(
    (await alice.c.members(g)).map((m) => m.user).sort(),
    [1801n, 1802n],
  );
});
