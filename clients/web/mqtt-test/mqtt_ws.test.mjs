// mqtt.js (the npm package `mqtt`, its browser bundle) in a real headless
// Chromium, over Tern's WebSocket listener with the `mqtt` subprotocol
// (docs/MQTT.md, "Over WebSocket"): page A speaks MQTT 3.1.1, page B MQTT
// 5.0; each subscribes to its own inbox `u/<id>` and they send each other a
// QoS 1 message. A also gets the message a Tern-protocol user left for it
// and sends that user one back (tests/mqtt_ws.rs checks the Tern side).
//
// Needs TERN_WS_URL, TERN_MQTT_A / TERN_MQTT_B ("<user> <token>"),
// TERN_MQTT_TERN_USER and CHROMIUM (default /usr/bin/chromium); run through
// `cargo test --test mqtt_ws`.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const WS_URL = process.env.TERN_WS_URL;
const WAIT_MS = 15_000;
const BUNDLE = fileURLToPath(new URL("../node_modules/mqtt/dist/mqtt.min.js", import.meta.url));

let browser;

before(async () => {
  assert.ok(WS_URL, "TERN_WS_URL is not set (run through cargo test --test mqtt_ws)");
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    // Running as root (CI): Chromium refuses its sandbox there.
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
});

after(async () => {
  await browser?.close();
});

/** A page with mqtt.js connected as `who` ("<user> <token>") and
 *  subscribed to its inbox; messages it gets collect in `window.got`. */
async function mqttPage(who, protocolVersion) {
  const [user, token] = who.split(" ");
  const page = await (await browser.newContext()).newPage();
  page.setDefaultTimeout(WAIT_MS);
  await page.addScriptTag({ path: BUNDLE });
  const granted = await page.evaluate(
    ({ url, user, token, protocolVersion }) =>
      new Promise((resolve, reject) => {
        window.got = [];
        const client = mqtt.connect(url, {
          protocolVersion,
          clientId: `page-${user}`,
          username: user,
          password: token,
          clean: true,
          reconnectPeriod: 0,
          connectTimeout: 10_000,
        });
        window.client = client;
        client.on("message", (topic, payload) => {
          window.got.push({ topic, text: new TextDecoder().decode(payload) });
        });
        client.on("error", (e) => reject(String(e)));
        client.on("connect", () => {
          client.subscribe(`u/${user}`, { qos: 1 }, (err, grants) =>
            err ? reject(String(err)) : resolve(grants.map((g) => g.qos)),
          );
        });
      }),
    { url: WS_URL, user, token, protocolVersion },
  );
  assert.deepEqual(granted, [1], `user ${user} got its inbox at QoS 1`);
  return { page, user };
}

/** Publishes `text` to `u/<to>` at QoS 1; resolves at the PUBACK. */
function publish(p, to, text) {
  return p.page.evaluate(
    ({ to, text }) =>
      new Promise((resolve, reject) =>
        window.client.publish(`u/${to}`, text, { qos: 1 }, (err) =>
          err ? reject(String(err)) : resolve(),
        ),
      ),
    { to, text },
  );
}

/** Waits until page `p` got `text` on its inbox. */
async function waitFor(p, text) {
  await p.page.waitForFunction(
    ({ topic, text }) => window.got.some((m) => m.topic === topic && m.text === text),
    { topic: `u/${p.user}`, text },
  );
}

test("two mqtt.js pages and a Tern user message each other over ws://", async () => {
  const a = await mqttPage(process.env.TERN_MQTT_A, 4);
  const b = await mqttPage(process.env.TERN_MQTT_B, 5);
  // What the Tern user sent before A's page existed.
  await waitFor(a, "from tern");
  await publish(a, b.user, "hello B, from A (3.1.1)");
  await waitFor(b, "hello B, from A (3.1.1)");
  await publish(b, a.user, "hello A, from B (5.0)");
  await waitFor(a, "hello A, from B (5.0)");
  await publish(a, process.env.TERN_MQTT_TERN_USER, "from mqtt.js to tern");
  // Foreign subscriptions are refused (SUBACK 0x80, which mqtt.js reports
  // as an error).
  const refused = await a.page.evaluate(
    (other) =>
      new Promise((resolve) =>
        window.client.subscribe(`u/${other}`, { qos: 1 }, (err, grants) =>
          resolve(err ? String(err) : grants.map((g) => g.qos)),
        ),
      ),
    b.user,
  );
  assert.match(String(refused), /Subscribe error/);
  for (const p of [a, b]) {
    await p.page.evaluate(() => new Promise((resolve) => window.client.end(false, {}, resolve)));
  }
});
