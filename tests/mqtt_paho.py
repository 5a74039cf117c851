"""A paho-mqtt client driven line by line from tests/mqtt.rs.

Commands on stdin, one per line (words separated by spaces):
  connect HOST PORT USER TOKEN VERSION(311|5) CLEAN(0|1) KEEPALIVE [EXPIRY]
  sub TOPIC QOS
  unsub TOPIC
  pub TOPIC QOS PAYLOAD
  pubmany TOPIC N          publish N QoS 1 messages 'msg-<i>', no waiting
  disconnect
  quit
Events on stdout, one per line, flushed at once:
  connack RC PRESENT
  suback CODE...
  puback MID RC SERVER_ID     (5.0: server_id user property, else -)
  published PAYLOAD           (pubmany: its PUBACK came)
  msg TOPIC QOS PAYLOAD FROM SERVER_ID
  disconnected RC
  error TEXT
"""

import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

out_lock = threading.RLock()


def say(*words):
    with out_lock:
        sys.stdout.write(" ".join(str(w) for w in words) + "\n")
        sys.stdout.flush()


def user_prop(props, name):
    for k, v in getattr(props, "UserProperty", None) or []:
        if k == name:
            return v
    return "-"


client = None
version = mqtt.MQTTv311
mids = {}


def on_connect(c, userdata, flags, rc, props=None):
    say("connack", rc.value, int(flags.session_present))


def on_subscribe(c, userdata, mid, codes, props=None):
    say("suback", *[code.value for code in codes])


def on_publish(c, userdata, mid, rc, props=None):
    with out_lock:
        payload = mids.pop(mid, None)
        if payload is not None:
            say("published", payload)
        else:
            say("puback", mid, rc.value, user_prop(props, "server_id"))


def on_message(c, userdata, m):
    props = getattr(m, "properties", None)
    say("msg", m.topic, m.qos, m.payload.decode(), user_prop(props, "from"),
        user_prop(props, "server_id"))


def on_disconnect(c, userdata, flags, rc, props=None):
    say("disconnected", rc.value)


for line in sys.stdin:
    w = line.split()
    if not w:
        continue
    try:
        if w[0] == "connect":
            host, port, user, token, ver, clean, keepalive = w[1:8]
            version = mqtt.MQTTv5 if ver == "5" else mqtt.MQTTv311
            kw = {}
            if version == mqtt.MQTTv311:
                kw["clean_session"] = clean == "1"
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                 client_id="paho-" + user, protocol=version, **kw)
            client.username_pw_set(user, token)
            client.on_connect = on_connect
            client.on_subscribe = on_subscribe
            client.on_publish = on_publish
            client.on_message = on_message
            client.on_disconnect = on_disconnect
            ckw = {}
            if version == mqtt.MQTTv5:
                ckw["clean_start"] = clean == "1"
                if len(w) > 8:
                    p = Properties(PacketTypes.CONNECT)
                    p.SessionExpiryInterval = int(w[8])
                    ckw["properties"] = p
            client.connect(host, int(port), keepalive=int(keepalive), **ckw)
            client.loop_start()
        elif w[0] == "sub":
            client.subscribe(w[1], qos=int(w[2]))
        elif w[0] == "unsub":
            client.unsubscribe(w[1])
        elif w[0] == "pub":
            client.publish(w[1], w[3].encode(), qos=int(w[2]))
        elif w[0] == "pubmany":
            for i in range(int(w[2])):
                payload = "msg-%08d" % i
                with out_lock:
                    info = client.publish(w[1], payload.encode(), qos=1)
                    mids[info.mid] = payload
        elif w[0] == "disconnect":
            client.disconnect()
            client.loop_stop()
        elif w[0] == "quit":
            break
    except Exception as e:  # reported, the test decides
        say("error", repr(e).replace("\n", " "))
