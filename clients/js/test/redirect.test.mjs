// REDIRECT over WebSocket against a real two-node cluster (docs/CLUSTER.md):
// a nats-server with JetStream and two `tern serve` nodes, started here on
// loopback. Node a serves WebSocket on 127.0.0.1:P, node b on 127.0.0.2:P
// (the same port, as the default `redirectUrl` assumes) and b's
// `public_addr` is 127.0.0.2:TCP. Clients all dial a; those whose partition
// b owns get REDIRECT and log in at b, and chat across the nodes.
//
// Skipped (with the reason) when nats-server is not on the PATH, unless
// TERN_REQUIRE_NATS=1 (CI) says it must be there. Binaries: TERN_BIN or
// the workspace's target/debug/tern; backend: TERN_TEST_IO (default auto).

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

import { Client } from "../dist/index.js";
import { recorder, token } from "./helpers.mjs";

/** Upper bound for the two nodes to share the partitions: a release waits a
 * whole lease (3 s here) before another node may claim it. */
const SETTLE_MS = 40_000;
const SECRET = "js-redirect-secret-0123456789";
const USERS = 24n;

const natsThere = spawnSync("nats-server", ["--version"]).status === 0;
if (!natsThere && process.env.TERN_REQUIRE_NATS === "1") {
  throw new Error("TERN_REQUIRE_NATS=1 but nats-server is not on the PATH");
}
const skip = natsThere ? false : "nats-server is not on the PATH (Debian package nats-server)";

const bin = process.env.TERN_BIN ?? fileURLToPath(new URL("../../../target/debug/tern", import.meta.url));
const children = [];
const clients = [];
let dir;
let a;
let b;

/** A loopback port free right now. */
async function freePort(host = "127.0.0.1") {
  const s = net.createServer();
  await new Promise((r) => s.listen(0, host, r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

/** Resolves once `host:port` accepts a TCP connection (bounded). */
async function listening(host, port, what) {
  const deadline = Date.now() + SETTLE_MS;
  for (;;) {
    const ok = await new Promise((r) => {
      const c = net.connect(port, host, () => {
        c.destroy();
        r(true);
      });
      c.on("error", () => r(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`${what} did not listen on ${host}:${port}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function start(cmd, args) {
  const child = spawn(cmd, args, {
    stdio: ["ignore", "ignore", "pipe"],
    env: { ...process.env, RUST_LOG: "info", TERN_TOKEN_SECRET: "" },
  });
  child.log = "";
  child.stderr.setEncoding("utf8");
  child.stderr.on("data", (d) => (child.log += d));
  children.push(child);
  return child;
}

/** A cluster node: its WebSocket URL and stats socket. */
async function node(id, host, wsPort, natsUrl) {
  const tcp = await freePort(host);
  const conf = join(dir, `${id}.toml`);
  writeFileSync(
    conf,
    `stats_socket = ${JSON.stringify(join(dir, `${id}.sock`))}\n` +
      `data_dir = ${JSON.stringify(join(dir, `${id}-data`))}\n\n[cluster]\nnode_id = "${id}"\n` +
      `nats_urls = ["${natsUrl}"]\npublic_addr = "${host}:${tcp}"\npartitions = 16\nlease_s = 3\n` +
      `stream_replicas = 1\n`,
  );
  const child = start(bin, [
    "serve", "--config", conf, "--listen", `${host}:${tcp}`, "--ws-listen", `${host}:${wsPort}`,
    "--shards", "1", "--token-secret", SECRET,
    // The backend under test (tests/js_client.rs passes it on).
    ...(process.env.TERN_TEST_IO ? ["--io", process.env.TERN_TEST_IO] : []),
  ]);
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`node ${id} did not listen:\n${child.log}`)), SETTLE_MS);
    const look = () => {
      const m = /WebSocket listening at (ws:\/\/\S+)/.exec(child.log);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    };
    child.stderr.on("data", look);
    child.on("exit", (code) => reject(new Error(`node ${id} exited (${code}):\n${child.log}`)));
    look();
  });
  return { url, sock: join(dir, `${id}.sock`), child };
}

/** `Cluster_partitions_owned` of a node, from its stats socket. */
function owned(n) {
  const out = spawnSync(bin, ["stats", "--socket", n.sock, "show", "info"], { encoding: "utf8" });
  const m = /^Cluster_partitions_owned: (\d+)$/m.exec(out.stdout ?? "");
  return m ? Number(m[1]) : -1;
}

before(async () => {
  if (skip) return;
  if (!existsSync(bin)) throw new Error(`no server binary: set TERN_BIN or build ${bin} (cargo build)`);
  dir = mkdtempSync(join(tmpdir(), "tern-js-redirect-"));
  const natsPort = await freePort();
  start("nats-server", ["-js", "-a", "127.0.0.1", "-p", String(natsPort), "-sd", join(dir, "nats")]);
  await listening("127.0.0.1", natsPort, "nats-server");
  const natsUrl = `nats://127.0.0.1:${natsPort}`;
  a = await node("a", "127.0.0.1", 0, natsUrl);
  const wsPort = Number(new URL(a.url).port);
  b = await node("b", "127.0.0.2", wsPort, natsUrl);
  const deadline = Date.now() + SETTLE_MS;
  while (!(owned(a) === 8 && owned(b) === 8)) {
    if (Date.now() > deadline) throw new Error(`partitions not shared: a ${owned(a)}, b ${owned(b)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
});

after(async () => {
  for (const c of clients) c.stop();
  for (const child of children) {
    if (child.exitCode === null) {
      child.kill("SIGKILL");
      await new Promise((r) => (child.exitCode !== null || child.signalCode !== null ? r() : child.once("exit", r)));
    }
  }
  if (dir) rmSync(dir, { recursive: true, force: true });
});

function client(user, opts = {}) {
  const c = new Client({
    url: a.url,
    token: token(SECRET, user),
    backoffMinMs: 20,
    backoffMaxMs: 200,
    ...opts,
  });
  const r = recorder(c);
  clients.push(c);
  c.start();
  return { c, r, user };
}

const connected = (r) => r.wait((e) => e.type === "connected", "connected");

test("a client dialing the wrong node follows REDIRECT to the node's WebSocket address and chats across nodes", { skip }, async () => {
  const all = [];
  for (let u = 1n; u <= USERS; u++) all.push(client(9100n + u));
  const logins = await Promise.all(all.map((x) => connected(x.r)));
  const atB = all.filter((_, i) => new URL(logins[i].url).hostname === "127.0.0.2");
  const atA = all.filter((_, i) => new URL(logins[i].url).hostname === "127.0.0.1");
  // b owns half the partitions: some of the users are its own (2^-24 odds
  // that none is).
  assert.ok(atB.length > 0 && atA.length > 0, `at a ${atA.length}, at b ${atB.length}`);
  for (const x of atB) {
    const d = x.r.events.find((e) => e.type === "disconnected");
    assert.match(d.reason, /^redirected to 127\.0\.0\.2:\d+ \(ws:\/\/127\.0\.0\.2:\d+\/\)$/);
    assert.equal(d.retryInMs, 0);
    assert.equal(new URL(x.r.events.find((e) => e.type === "connected").url).port, new URL(a.url).port);
  }
  for (const x of atA) {
    assert.equal(x.r.count((e) => e.type === "disconnected"), 0, "a's own users are not redirected");
  }
  // A user at b and a user at a chat both ways, with receipts.
  const [p, q] = [atB[0], atA[0]];
  for (const [from, to] of [[p, q], [q, p]]) {
    const cid = from.c.send(to.user, `hello from ${from.user}`);
    await from.r.wait((e) => e.type === "ack" && e.clientId === cid, "ack");
    const msg = await to.r.wait((e) => e.type === "message" && e.from === from.user, "message");
    assert.equal(new TextDecoder().decode(msg.body), `hello from ${from.user}`);
    to.c.accept(msg.serverId);
    await from.r.wait(
      (e) => e.type === "receipt" && e.kind === "delivered" && e.serverId === msg.serverId,
      "delivered receipt",
    );
  }
});

test("a REDIRECT the application declines is not followed", { skip }, async () => {
  // Find one of b's users through a following client first.
  let user = null;
  for (let u = 1n; u <= USERS && user === null; u++) {
    const x = client(9300n + u);
    const login = await connected(x.r);
    if (new URL(login.url).hostname === "127.0.0.2") user = x.user;
    x.c.stop();
  }
  assert.notEqual(user, null, "one of b's users");
  const seen = [];
  const x = client(user, {
    redirectUrl: (addr, url) => {
      seen.push([addr, url]);
      return null;
    },
    // A long backoff: no redial within the test.
    backoffMinMs: 60_000,
    backoffMaxMs: 60_000,
    random: () => 0.5,
  });
  const d = await x.r.wait((e) => e.type === "disconnected", "disconnected");
  assert.match(d.reason, /^redirected to 127\.0\.0\.2:\d+ \(not followed\)$/);
  assert.ok(d.retryInMs !== null && d.retryInMs > 0);
  assert.equal(seen.length, 1);
  assert.match(seen[0][0], /^127\.0\.0\.2:\d+$/);
  assert.equal(seen[0][1], a.url);
  assert.equal(x.r.count((e) => e.type === "connected"), 0);
});
