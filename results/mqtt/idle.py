"""Server userspace bytes per idle, logged-in connection.

Opens CONNS connections to PORT on loopback, logs each in as its own user
and keeps them open without traffic; prints the server's VmRSS growth per
connection, (VmRSS after - VmRSS before) / CONNS, read from /proc/PID.

  --proto tern   Tern protocol: LOGIN (version 1) with a v1 token
  --proto mqtt   MQTT 3.1.1: CONNECT (user id, token), SUBSCRIBE u/<id> QoS 1,
                 then idle (the same for Tern's MQTT listener and mosquitto)

Tokens are minted here with TERN_TOKEN_SECRET (HMAC-SHA256, docs/PROTOCOL.md).
Bounded: every socket wait has a timeout; the whole run is CONNS handshakes.
Usage: python3 results/mqtt/idle.py --pid PID --port PORT --proto P --conns N
"""

import argparse
import base64
import hashlib
import hmac
import os
import socket
import sys
import time


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit("no VmRSS")


def token(secret, user):
    body = f"v1.{user}.{int(time.time()) + 86400}"
    mac = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
    return body + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s):
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def login_tern(s, user, secret):
    payload = b"\x01\x01" + token(secret, user).encode()
    s.sendall(varint(len(payload)) + payload)
    first = recv_exact(s, 2)
    if first[1] != 0x02:
        raise ConnectionError(f"no LOGIN_OK: {first!r}")
    recv_exact(s, first[0] - 1)


def login_mqtt(s, user, secret):
    var = mqtt_str("MQTT") + bytes([4, 0xC2]) + (0).to_bytes(2, "big")
    pay = mqtt_str(f"idle-{user}") + mqtt_str(str(user)) + mqtt_str(token(secret, user))
    body = var + pay
    s.sendall(b"\x10" + varint(len(body)) + body)
    ack = recv_exact(s, 4)
    if ack[0] != 0x20 or ack[3] != 0:
        raise ConnectionError(f"CONNACK {ack!r}")
    topic = mqtt_str(f"u/{user}")
    sub = (1).to_bytes(2, "big") + topic + b"\x01"
    s.sendall(b"\x82" + varint(len(sub)) + sub)
    ack = recv_exact(s, 5)
    if ack[0] != 0x90 or ack[4] not in (0, 1):
        raise ConnectionError(f"SUBACK {ack!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--proto", choices=["tern", "mqtt"], required=True)
    ap.add_argument("--conns", type=int, default=15000)
    ap.add_argument("--settle-s", type=float, default=3.0)
    a = ap.parse_args()
    secret = os.environ.get("TERN_TOKEN_SECRET", "")
    login = login_tern if a.proto == "tern" else login_mqtt
    time.sleep(a.settle_s)
    rss0 = rss_kb(a.pid)
    socks = []
    t0 = time.time()
    for i in range(a.conns):
        user = 1_000_000 + i
        s = socket.create_connection(("127.0.0.1", a.port), timeout=10)
        login(s, user, secret)
        socks.append(s)
    ramp = time.time() - t0
    time.sleep(a.settle_s)
    rss1 = rss_kb(a.pid)
    print(f"proto={a.proto} conns={a.conns} ramp_s={ramp:.1f} server_rss0_kb={rss0} "
          f"server_rss_kb={rss1} server_bytes_per_conn={(rss1 - rss0) * 1024 // a.conns}")
    sys.stdout.flush()
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
