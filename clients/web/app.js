// The demo chat page: logs in as a demo user with a token the demo server
// mints (GET /demo/token, `tern serve --demo` only), then chats with the
// other demo users through the tern-client library (served at /tern/).
// History is kept in localStorage per user, so a reload shows it again; a
// message is stored there before the page tells the server DELIVERED.

import { Client } from "./tern/index.js";

const USERS = { 1001: "Alice", 1002: "Bob", 1003: "Carol", 1004: "Dave" };
const TYPING_EVERY_MS = 3000;
const TYPING_SHOWN_MS = 4000;
const HISTORY_MAX = 500;

const $ = (id) => document.getElementById(id);
const name = (user) => USERS[user] ?? `user ${user}`;
const decoder = new TextDecoder();

let client = null;
let me = null;
let peer = null;
/** { [peer]: [{ dir: "in"|"out", text, t, state, serverId, clientId }] } */
let history = {};
let lastTypingSent = 0;
let typingTimer = null;

/** This tab's device id: kept across reloads, new for a new tab. */
function deviceId() {
  let d = sessionStorage.getItem("tern-demo-device");
  if (d === null) {
    d = String(1 + Math.floor(Math.random() * 0x7fffffff));
    sessionStorage.setItem("tern-demo-device", d);
  }
  return d;
}

function load() {
  history = JSON.parse(localStorage.getItem(`tern-demo-history-${me}`) ?? "{}");
  for (const msgs of Object.values(history)) {
    for (const m of msgs) {
      // The outbox lived in the page that was closed: not sent.
      if (m.state === "pending") m.state = "failed";
    }
  }
}

function save() {
  for (const p of Object.keys(history)) history[p] = history[p].slice(-HISTORY_MAX);
  localStorage.setItem(`tern-demo-history-${me}`, JSON.stringify(history));
}

function conv(p) {
  return (history[p] ??= []);
}

function find(pred) {
  for (const [p, msgs] of Object.entries(history)) {
    const m = msgs.find(pred);
    if (m) return [p, m];
  }
  return [null, null];
}

const TICKS = { pending: "🕓", ack: "✓", delivered: "✓✓", read: "✓✓", failed: "✗" };
const RANK = { failed: 0, pending: 0, ack: 1, delivered: 2, read: 3 };

function render() {
  for (const li of $("peers").children) {
    li.classList.toggle("active", li.dataset.user === String(peer));
    const unread = (history[li.dataset.user] ?? []).filter((m) => m.dir === "in" && !m.read).length;
    li.querySelector(".unread").textContent = unread ? String(unread) : "";
  }
  const ol = $("messages");
  ol.replaceChildren();
  if (peer === null) return;
  for (const m of conv(peer)) {
    const li = document.createElement("li");
    li.className = m.dir;
    li.dataset.state = m.state ?? "";
    if (m.serverId) li.dataset.serverId = m.serverId;
    li.append(m.text);
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = new Date(m.t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    if (m.dir === "out") {
      const ticks = document.createElement("span");
      ticks.className = "ticks";
      ticks.textContent = TICKS[m.state];
      ticks.title = m.state;
      meta.append(ticks);
    }
    li.append(meta);
    ol.append(li);
  }
  ol.scrollTop = ol.scrollHeight;
}

/** Sends READ for what is shown of the open conversation. */
function markRead() {
  if (peer === null || document.visibilityState !== "visible" || !client?.connected) return;
  let changed = false;
  for (const m of conv(peer)) {
    if (m.dir === "in" && !m.read) {
      client.read(BigInt(m.serverId), BigInt(peer));
      m.read = true;
      changed = true;
    }
  }
  if (changed) save();
}

function open(p) {
  peer = p;
  $("peer-name").textContent = name(p);
  $("text").disabled = false;
  $("send").disabled = false;
  $("typing").textContent = "";
  render();
  markRead();
  $("text").focus();
}

function status(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function onEvent(e) {
  switch (e.type) {
    case "connected":
      status("online", "online");
      markRead();
      break;
    case "disconnected":
      status(
        e.retryInMs === null ? "offline" : "connecting",
        e.retryInMs === null ? `offline (${e.reason})` : "connecting…",
      );
      break;
    case "ack": {
      const [, m] = find((m) => m.dir === "out" && m.clientId === String(e.clientId));
      if (m) {
        m.serverId = String(e.serverId);
        if (RANK[m.state] < RANK.ack) m.state = "ack";
      }
      break;
    }
    case "sent": {
      // Sent from another tab (device) of this user.
      conv(String(e.to)).push({
        dir: "out",
        text: decoder.decode(e.body),
        t: Number(e.serverTimeMs),
        state: "ack",
        serverId: String(e.serverId),
      });
      break;
    }
    case "receipt": {
      const [, m] = find((m) => m.dir === "out" && m.serverId === String(e.serverId));
      if (m && RANK[m.state] < RANK[e.kind]) m.state = e.kind;
      break;
    }
    case "message": {
      const from = String(e.from);
      conv(from).push({
        dir: "in",
        text: decoder.decode(e.body),
        t: Number(e.serverTimeMs),
        serverId: String(e.serverId),
        read: false,
      });
      save();
      // Stored: now the server may drop its copy (two ticks for the sender).
      client.accept(e.serverId);
      if (from === peer) {
        $("typing").textContent = "";
        markRead();
      }
      break;
    }
    case "presence": {
      const li = $("peers").querySelector(`[data-user="${e.user}"]`);
      if (li) li.dataset.presence = e.state;
      return;
    }
    case "typing":
      if (String(e.user) === peer) {
        $("typing").textContent = `${name(peer)} is typing…`;
        clearTimeout(typingTimer);
        typingTimer = setTimeout(() => ($("typing").textContent = ""), TYPING_SHOWN_MS);
      }
      return;
    case "refused": {
      const [, m] = find((m) => m.clientId === String(e.clientId));
      if (m) m.state = "failed";
      break;
    }
    default:
      return;
  }
  save();
  render();
}

async function fetchToken() {
  const r = await fetch(`/demo/token?user=${me}&device=${deviceId()}`);
  if (!r.ok) throw new Error(`token: HTTP ${r.status}`);
  return (await r.json()).token;
}

async function login(user) {
  me = user;
  sessionStorage.setItem("tern-demo-user", user);
  load();
  const info = await (await fetch(`/demo/token?user=${me}&device=${deviceId()}`)).json();
  $("login").hidden = true;
  $("chat").hidden = false;
  $("logout").hidden = false;
  $("me").textContent = `${name(me)} (${me})`;
  document.title = `${name(me)} · Tern demo chat`;
  const peers = $("peers");
  peers.replaceChildren();
  for (const u of Object.keys(USERS)) {
    if (u === me) continue;
    const li = document.createElement("li");
    li.dataset.user = u;
    li.dataset.presence = "offline";
    li.innerHTML = `<span class="dot"></span><span class="name"></span><span class="unread"></span>`;
    li.querySelector(".name").textContent = name(u);
    li.onclick = () => open(u);
    peers.append(li);
  }
  status("connecting", "connecting…");
  client = new Client({ url: `ws://${location.hostname}:${info.ws_port}/`, token: fetchToken });
  client.on(onEvent);
  client.start();
  for (const u of Object.keys(USERS)) if (u !== me) client.subscribe(BigInt(u));
  const last = sessionStorage.getItem("tern-demo-peer");
  if (last !== null && last !== me) open(last);
  render();
}

$("compose").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("text").value.trim();
  if (!text || peer === null) return;
  const clientId = client.send(BigInt(peer), text);
  conv(peer).push({ dir: "out", text, t: Date.now(), state: "pending", clientId: String(clientId) });
  $("text").value = "";
  // Typing after a message is news again: do not wait out the throttle.
  lastTypingSent = 0;
  save();
  render();
});

$("text").addEventListener("input", () => {
  if (peer !== null && client?.connected && Date.now() - lastTypingSent > TYPING_EVERY_MS) {
    lastTypingSent = Date.now();
    client.typing(BigInt(peer));
  }
});

$("peers").addEventListener("click", () => sessionStorage.setItem("tern-demo-peer", peer ?? ""));
document.addEventListener("visibilitychange", markRead);

$("logout").addEventListener("click", () => {
  client?.stop();
  sessionStorage.removeItem("tern-demo-user");
  sessionStorage.removeItem("tern-demo-peer");
  location.reload();
});

for (const [u, n] of Object.entries(USERS)) {
  const b = document.createElement("button");
  b.textContent = `${n} (${u})`;
  b.dataset.user = u;
  b.onclick = () => login(u);
  $("users").append(b);
}

const remembered = sessionStorage.getItem("tern-demo-user");
if (remembered !== null) login(remembered);
