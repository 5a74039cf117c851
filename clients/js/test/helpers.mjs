// Shared by the live tests: a real Tern server with a WebSocket listener,
// tokens, a TCP proxy that can cut or black-hole connections, and bounded
// waits for client events.
//
// The server: tests/js_client.rs (cargo test) starts one in-process on the
// backend under test and passes TERN_WS_URL and TERN_TEST_SECRET. Without
// them, `tern serve` is started here from TERN_BIN or the workspace's
// target/debug/tern on ephemeral ports.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

/** Upper bound for anything a test waits for; nothing asserts speed. */
export const WAIT_MS = 10_000;

/** A running server: its WebSocket URL, token secret, and a stop function. */
export async function startServer() {
  if (process.env.TERN_WS_URL && process.env.TERN_TEST_SECRET) {
    return { url: process.env.TERN_WS_URL, secret: process.env.TERN_TEST_SECRET, stop: async () => {} };
  }
  const bin =
    process.env.TERN_BIN ?? fileURLToPath(new URL("../../../target/debug/tern", import.meta.url));
  if (!existsSync(bin)) {
    throw new Error(`no server: set TERN_WS_URL and TERN_TEST_SECRET, or build ${bin} (cargo build)`);
  }
  const dir = mkdtempSync(join(tmpdir(), "tern-js-"));
  const secret = "js-test-secret-0123456789";
  const child = spawn(
    bin,
    [
      "serve",
      "--listen", "127.0.0.1:0",
      "--ws-listen", "127.0.0.1:0",
      "--shards", "2",
      "--token-secret", secret,
      "--stats-socket", join(dir, "tern.sock"),
      "--data-dir", join(dir, "data"),
    ],
    { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, RUST_LOG: "info", TERN_TOKEN_SECRET: "" } },
  );
  const url = await new Promise((resolve, reject) => {
    let log = "";
    const timer = setTimeout(() => reject(new Error(`tern serve did not listen:\n${log}`)), WAIT_MS);
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      log += chunk;
      const m = /WebSocket listening at (ws:\/\/\S+)/.exec(log);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    child.on("exit", (code) => reject(new Error(`tern serve exited (${code}):\n${log}`)));
  });
  return {
    url,
    secret,
    stop: async () => {
      child.kill("SIGKILL");
      await new Promise((r) => (child.exitCode !== null ? r() : child.once("exit", r)));
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A `v2.` token for `device` of `user`, valid for an hour (PROTOCOL.md "Login tokens"). */
export function token(secret, user, device = 0) {
  const expiry = Math.floor(Date.now() / 1000) + 3600;
  const signed = `v2.${user}.${device}.${expiry}`;
  return `${signed}.${createHmac("sha256", secret).update(signed).digest("base64url")}`;
}

/**
 * A TCP proxy on a loopback port in front of `target` (a ws:// URL).
 * `cut()` closes every connection through it; `blackhole(true)` keeps
 * forwarding client bytes but drops the server's (so a SEND arrives and its
 * ACK is lost); `refuse(true)` closes new connections at once.
 */
export async function startProxy(target) {
  const { protocol, hostname, port } = new URL(target);
  const pairs = new Set();
  let dropDown = false;
  let refusing = false;
  let connections = 0;
  const server = net.createServer((down) => {
    if (refusing) {
      down.destroy();
      return;
    }
    connections += 1;
    const up = net.connect(Number(port), hostname);
    const pair = { down, up };
    pairs.add(pair);
    const end = () => {
      pairs.delete(pair);
      down.destroy();
      up.destroy();
    };
    down.on("data", (d) => up.write(d));
    up.on("data", (d) => {
      if (!dropDown) down.write(d);
    });
    for (const s of [down, up]) {
      s.on("error", end);
      s.on("close", end);
    }
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    // The same scheme: a wss target gets TLS through the proxy, end to end.
    url: `${protocol}//127.0.0.1:${server.address().port}/`,
    /** Connections accepted so far. */
    get connections() {
      return connections;
    },
    cut() {
      for (const { down, up } of [...pairs]) {
        down.destroy();
        up.destroy();
      }
    },
    blackhole(on) {
      dropDown = on;
    },
    refuse(on) {
      refusing = on;
    },
    async close() {
      this.cut();
      await new Promise((r) => server.close(r));
    },
  };
}

/** Records a client's events; `next(pred)` waits for the first unseen match. */
export function recorder(client) {
  const events = [];
  const waiters = [];
  client.on((e) => {
    events.push(e);
    for (const w of [...waiters]) {
      if (w.pred(e)) {
        waiters.splice(waiters.indexOf(w), 1);
        clearTimeout(w.timer);
        w.resolve(e);
      }
    }
  });
  return {
    events,
    /** Waits (at most WAIT_MS) for an event matching `pred` after `from`. */
    wait(pred, what = "event", from = 0) {
      const seen = events.slice(from).find(pred);
      if (seen) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        const w = { pred, resolve };
        w.timer = setTimeout(() => {
          waiters.splice(waiters.indexOf(w), 1);
          reject(new Error(`no ${what} within ${WAIT_MS} ms; events: ${describe(events)}`));
        }, WAIT_MS);
        waiters.push(w);
      });
    },
    count(pred) {
      return events.filter(pred).length;
    },
  };
}

function describe(events) {
  return JSON.stringify(events.map((e) => e.type + (e.reason ? `(${e.reason})` : e.code ? `(${e.code})` : "")));
}

/** Waits (at most WAIT_MS) until `cond()` is true, polling every 10 ms. */
export async function until(cond, what) {
  const deadline = Date.now() + WAIT_MS;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${WAIT_MS} ms`);
    await new Promise((r) => setTimeout(r, 10));
  }
}
