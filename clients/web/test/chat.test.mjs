// The demo chat page in a real headless Chromium (Debian's chromium, driven
// by playwright-core): two users in two browser profiles chat, the ticks go
// ✓ (ACK), ✓✓ (delivered), blue ✓✓ (read); a page that went away and comes
// back reconnects and gets what was sent meanwhile; a reload keeps history.
//
// Needs TERN_DEMO_URL, the page of a running `tern serve --demo`
// (tests/web_page.rs starts one), and CHROMIUM (default /usr/bin/chromium).
// TERN_WEB_SCREENSHOT=PATH saves a screenshot of both pages there.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const URL = process.env.TERN_DEMO_URL;
const WAIT_MS = 15_000;

let browser;
let alice;
let bob;

before(async () => {
  assert.ok(URL, "TERN_DEMO_URL is not set (run through cargo test --test web_page)");
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    // Running as root (CI): Chromium refuses its sandbox there.
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
  // Two profiles: each has its own localStorage and sessionStorage.
  alice = await (await browser.newContext({ viewport: { width: 640, height: 480 } })).newPage();
  bob = await (await browser.newContext({ viewport: { width: 640, height: 480 } })).newPage();
  for (const page of [alice, bob]) page.setDefaultTimeout(WAIT_MS);
});

after(async () => {
  await browser?.close();
});

async function loginAs(page, user) {
  await page.goto(URL);
  await page.click(`#users button[data-user="${user}"]`);
  await page.waitForSelector('#status[data-state="online"]');
}

/** The state (pending, ack, delivered, read) of `page`'s outgoing `text`. */
function outgoing(page, text) {
  return page.locator("#messages li.out", { hasText: text });
}

async function waitState(page, text, state) {
  await page.waitForSelector(`#messages li.out[data-state="${state}"]:has-text("${text}")`);
}

test("two pages chat and the ticks appear: ✓, ✓✓, blue ✓✓", async () => {
  await loginAs(alice, 1001);
  await loginAs(bob, 1002);
  await alice.click('#peers li[data-user="1002"]');
  // Bob looks at another chat: Alice's message is delivered, not read.
  await bob.click('#peers li[data-user="1003"]');
  await alice.fill("#text", "Hi Bob, this is Alice");
  await alice.press("#text", "Enter");
  await waitState(alice, "Hi Bob", "delivered");
  assert.equal(await outgoing(alice, "Hi Bob").locator(".ticks").textContent(), "✓✓");
  const grey = await outgoing(alice, "Hi Bob").locator(".ticks").evaluate((e) => getComputedStyle(e).color);
  await bob.waitForSelector('#peers li[data-user="1001"] .unread:text("1")');
  // Bob opens the chat: he reads it, Alice's ticks turn blue.
  await bob.click('#peers li[data-user="1001"]');
  await bob.waitForSelector('#messages li.in:has-text("Hi Bob, this is Alice")');
  await waitState(alice, "Hi Bob", "read");
  const blue = await outgoing(alice, "Hi Bob").locator(".ticks").evaluate((e) => getComputedStyle(e).color);
  assert.notEqual(blue, grey);
  assert.equal(blue, "rgb(47, 143, 224)");
  // And back: Bob answers while Alice has the chat open.
  await bob.fill("#text", "Hello Alice!");
  await bob.press("#text", "Enter");
  await alice.waitForSelector('#messages li.in:has-text("Hello Alice!")');
  await waitState(bob, "Hello Alice!", "read");
});

test("typing shows on the other page", async () => {
  await bob.type("#text", "typ");
  await alice.waitForSelector('#typing:has-text("Bob is typing")');
  await bob.fill("#text", "");
});

test("a page that went away comes back, reconnects and gets what was sent meanwhile", async () => {
  await bob.goto("about:blank");
  await alice.waitForSelector('#peers li[data-user="1002"][data-presence="offline"]');
  await alice.fill("#text", "Sent while you were away");
  await alice.press("#text", "Enter");
  // One tick: the server has it, nobody to deliver to.
  await waitState(alice, "while you were away", "ack");
  assert.equal(await outgoing(alice, "while you were away").locator(".ticks").textContent(), "✓");
  // Back (same tab: the same user and device log in by themselves).
  await bob.goto(URL);
  await bob.waitForSelector('#status[data-state="online"]');
  await bob.waitForSelector('#messages li.in:has-text("Sent while you were away")');
  await waitState(alice, "while you were away", "read");
  // The history from before is still there (the page keeps it).
  await bob.waitForSelector('#messages li.in:has-text("Hi Bob, this is Alice")');
  assert.equal(await bob.locator('#messages li.in:has-text("Sent while you were away")').count(), 1);
});

test("a reload reconnects; messages flow again", async () => {
  await bob.reload();
  await bob.waitForSelector('#status[data-state="online"]');
  await alice.fill("#text", "After your reload");
  await alice.press("#text", "Enter");
  await bob.waitForSelector('#messages li.in:has-text("After your reload")');
  await waitState(alice, "After your reload", "read");
  assert.equal(await bob.locator('#messages li.in:has-text("Sent while you were away")').count(), 1);
  if (process.env.TERN_WEB_SCREENSHOT) await screenshot(process.env.TERN_WEB_SCREENSHOT);
});

/** Both pages side by side, with every tick state on Alice's. */
async function screenshot(path) {
  await bob.type("#text", "See you");
  await alice.waitForSelector('#typing:has-text("Bob is typing")');
  const bobPng = await bob.screenshot();
  await bob.fill("#text", "");
  await bob.click('#peers li[data-user="1003"]');
  await alice.fill("#text", "Are you still there?");
  await alice.press("#text", "Enter");
  await waitState(alice, "still there", "delivered");
  await bob.goto("about:blank");
  await alice.waitForSelector('#peers li[data-user="1002"][data-presence="offline"]');
  await alice.fill("#text", "Call me when you are back");
  await alice.press("#text", "Enter");
  await waitState(alice, "Call me", "ack");
  const alicePng = await alice.screenshot();
  const img = (png) => `<img src="data:image/png;base64,${png.toString("base64")}">`;
  const page = await browser.newPage({ viewport: { width: 1304, height: 496 } });
  await page.setContent(
    `<body style="margin:0;background:#7a8a93;display:flex;gap:16px;padding:8px">${img(alicePng)}${img(bobPng)}</body>`,
  );
  await page.screenshot({ path });
}
