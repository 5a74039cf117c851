// The session bookkeeping without sockets: client ids, the outbox and its
// refusals, and the duplicate filter.

import { test } from "node:test";
import assert from "node:assert/strict";

import { SessionState, ErrorCode } from "../dist/index.js";

const body = new Uint8Array([1]);

test("client ids start above the clock and keep increasing", () => {
  let now = 5_000_000n;
  const s = new SessionState(16, () => now);
  assert.equal(s.send(2n, body).clientId, 5_000_000n);
  // A clock that stands still (or goes back) still gives increasing ids.
  assert.equal(s.send(2n, body).clientId, 5_000_001n);
  now = 4n;
  assert.equal(s.send(2n, body).clientId, 5_000_002n);
  now = 9_000_000n;
  assert.equal(s.send(2n, body).clientId, 9_000_000n);
});

test("the outbox keeps messages until ACKed and resends them in order", () => {
  const s = new SessionState(16, () => 10n);
  const a = s.send(2n, body);
  const b = s.send(3n, body);
  const c = s.send(2n, body);
  assert.deepEqual(
    s.resend().map((f) => [f.type, f.clientId, f.to]),
    [["send", a.clientId, 2n], ["send", b.clientId, 3n], ["send", c.clientId, 2n]],
  );
  assert.equal(s.onAck(b.clientId), true);
  assert.equal(s.onAck(b.clientId), false); // a second ACK (a retry's) is not news
  assert.deepEqual(s.resend().map((f) => f.clientId), [a.clientId, c.clientId]);
});

test("refusals: temporary ones keep the message, final ones drop it", () => {
  const s = new SessionState(16, () => 10n);
  const a = s.send(2n, body);
  for (const code of ["queue_full", "storage_full", "unavailable", "rate_limited", "internal"]) {
    assert.equal(s.onRefused(a.clientId, ErrorCode[code]), "retry", code);
  }
  assert.equal(s.pending().length, 1);
  // An ERROR whose client_id field is not one of ours, or not about a SEND.
  assert.equal(s.onRefused(999n, ErrorCode.queue_full), "none");
  assert.equal(s.onRefused(a.clientId, ErrorCode.unknown_device), "none");
  assert.equal(s.onRefused(a.clientId, ErrorCode.stale_client_id), "final");
  assert.equal(s.pending().length, 0);
  const b = s.send(0n, body);
  assert.equal(s.onRefused(b.clientId, ErrorCode.bad_recipient), "final");
});

test("a message is shown once, whatever comes back", () => {
  const s = new SessionState(16);
  assert.equal(s.onDeliver(100n, 7n, 55n), "show");
  // Re-delivered before the app stored it: the app's accept answers.
  assert.equal(s.onDeliver(100n, 7n, 55n), "ignore");
  assert.equal(s.accept(100n), true);
  // Re-delivered after: answer DELIVERED again, show nothing.
  assert.equal(s.onDeliver(100n, 7n, 55n), "answer_delivered");
  // The same (sender, client id) under another server id: a copy.
  assert.equal(s.onDeliver(101n, 7n, 55n), "answer_delivered");
  // Client id 0 (a v1 sender) names nothing; null (a v1 DELIVER) neither.
  assert.equal(s.onDeliver(102n, 7n, 0n), "show");
  assert.equal(s.onDeliver(103n, 7n, 0n), "show");
  assert.equal(s.onDeliver(104n, 7n, null), "show");
  // Another sender may use the same client id.
  assert.equal(s.onDeliver(105n, 8n, 55n), "show");
  assert.equal(s.accept(999n), false);
});

test("the duplicate filter is bounded: the oldest entries go first", () => {
  const s = new SessionState(2);
  assert.equal(s.onDeliver(1n, 7n, 0n), "show");
  assert.equal(s.onDeliver(2n, 7n, 0n), "show");
  assert.equal(s.onDeliver(3n, 7n, 0n), "show");
  assert.equal(s.onDeliver(3n, 7n, 0n), "ignore");
  assert.equal(s.onDeliver(1n, 7n, 0n), "show"); // forgotten
  const none = new SessionState(0);
  assert.equal(none.onDeliver(1n, 7n, 1n), "show");
  assert.equal(none.onDeliver(1n, 7n, 1n), "show"); // capacity 0 remembers nothing
});

test("SENT copies are reported once per server id", () => {
  const s = new SessionState(4);
  assert.equal(s.onSent(9n), true);
  assert.equal(s.onSent(9n), false);
  assert.equal(s.onSent(10n), true);
});

test("group messages share the outbox and ids; their copies are shown once", () => {
  const s = new SessionState(16, () => 10n);
  const a = s.send(2n, body);
  const g = s.send(1025n, body, true);
  const req = s.nextId();
  // Requests and client ids come from one counter: an ERROR names one of them.
  assert.ok(a.clientId < g.clientId && g.clientId < req);
  assert.deepEqual(
    s.resend().map((f) => f.type),
    ["send", "group_send"],
  );
  assert.deepEqual(s.resend()[1], { type: "group_send", clientId: g.clientId, group: 1025n, body });
  assert.equal(s.onRefused(g.clientId, ErrorCode.not_member), "final");
  assert.equal(s.onRefused(a.clientId, ErrorCode.unknown_group), "final");
  assert.deepEqual(s.pending(), []);

  // A GROUP_DELIVER: server id 100, group 1025, msg 3, from 7, client id 55.
  assert.equal(s.onGroupDeliver(100n, 1025n, 3n, 7n, 55n), "show");
  assert.equal(s.onGroupDeliver(100n, 1025n, 3n, 7n, 55n), "ignore");
  assert.equal(s.accept(100n), true);
  // Sent out again after the home shard restarted: same (group, msg).
  assert.equal(s.onGroupDeliver(101n, 1025n, 3n, 7n, 55n), "answer_delivered");
  // Taken twice after a lost ACK: a new msg, same (group, sender, client id).
  assert.equal(s.onGroupDeliver(102n, 1025n, 4n, 7n, 55n), "answer_delivered");
  // The same client id in another group, or a 1:1 message, is another message.
  assert.equal(s.onGroupDeliver(103n, 1026n, 3n, 7n, 55n), "show");
  assert.equal(s.onDeliver(104n, 7n, 55n), "show");
  // Events are known by (group, msg) alone.
  assert.equal(s.onGroupDeliver(105n, 1025n, 5n, 7n, null), "show");
  assert.equal(s.onGroupDeliver(106n, 1025n, 5n, 7n, null), "answer_delivered");
  assert.equal(s.onGroupDeliver(107n, 1025n, 6n, 7n, null), "show");
});
