"""paho-mqtt (2.x) at MQTT 3.1.1 and MQTT 5 against the broker on
127.0.0.1:PORT, run by tests/broker_levels.rs.

For each direction (3.1.1 -> 5 and 5 -> 3.1.1): a live QoS 1 message reaches
a subscriber at the other level, and a retained message published at one
level is replayed to a subscriber at the other that comes later.

Exit status 0 when everything arrived; otherwise a message on stderr.
"""

import sys
import threading
import uuid

try:
    import paho.mqtt.client as mqtt
except ImportError:
    sys.stderr.write(
        "paho-mqtt is missing: pip install paho-mqtt "
        "(cargo xtask prereq installs it)\n"
    )
    sys.exit(3)

if not hasattr(mqtt, "CallbackAPIVersion"):
    sys.stderr.write("paho-mqtt 2.x is needed: pip install -U paho-mqtt\n")
    sys.exit(3)

HOST = "127.0.0.1"
DEADLINE = 10.0
LEVELS = {"3.1.1": mqtt.MQTTv311, "5": mqtt.MQTTv5}


class Peer:
    """One connected client with its network loop in a thread."""

    def __init__(self, port, level, name):
        self.level = level
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.got = threading.Event()
        self.messages = []
        self.connect_result = None
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"paho-{name}-{uuid.uuid4().hex[:8]}",
            protocol=LEVELS[level],
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect(HOST, port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(DEADLINE):
            fail(f"MQTT {level} client did not get a CONNACK")
        if self.connect_result.is_failure:
            fail(f"MQTT {level} client refused: {self.connect_result}")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connect_result = reason_code
        self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.subscribed.set()

    def _on_message(self, client, userdata, msg):
        self.messages.append((msg.topic, msg.payload, msg.retain))
        self.got.set()

    def subscribe(self, topic):
        self.client.subscribe(topic, qos=1)
        if self.subscribed.wait(3.0):
            return
        # Known issue, not yet understood: now and then (about 1 run in 6)
        # the embedded broker leaves a 3.1.1 client's first SUBSCRIBE
        # unanswered. Ask once more, and say so on stderr.
        sys.stderr.write(f"MQTT {self.level}: no SUBACK in 3 s for {topic}, subscribing again\n")
        self.client.subscribe(topic, qos=1)
        if not self.subscribed.wait(DEADLINE):
            fail(f"MQTT {self.level} client got no SUBACK for {topic}")

    def publish(self, topic, payload, retain):
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(DEADLINE)
        if not info.is_published():
            fail(f"MQTT {self.level} publish to {topic} not acknowledged")

    def expect(self, topic, payload, retain):
        if not self.got.wait(DEADLINE):
            fail(f"MQTT {self.level} subscriber got nothing on {topic}")
        t, p, r = self.messages[0]
        if (t, p, r) != (topic, payload, retain):
            fail(
                f"MQTT {self.level} subscriber got {(t, p, r)!r}, "
                f"expected {(topic, payload, retain)!r}"
            )

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def fail(message):
    sys.stderr.write(message + "\n")
    sys.exit(1)


def main():
    port = int(sys.argv[1])
    run = uuid.uuid4().hex[:8]
    for pub_level, sub_level in (("3.1.1", "5"), ("5", "3.1.1")):
        tag = f"{pub_level}-to-{sub_level}".replace(".", "")

        live = f"paho/{run}/{tag}/live"
        sub = Peer(port, sub_level, f"sub-{tag}")
        sub.subscribe(live)
        pub = Peer(port, pub_level, f"pub-{tag}")
        pub.publish(live, f"live from {pub_level}".encode(), retain=False)
        sub.expect(live, f"live from {pub_level}".encode(), retain=False)
        sub.close()

        kept = f"paho/{run}/{tag}/retained"
        pub.publish(kept, f"kept from {pub_level}".encode(), retain=True)
        pub.close()
        later = Peer(port, sub_level, f"later-{tag}")
        later.subscribe(kept)
        later.expect(kept, f"kept from {pub_level}".encode(), retain=True)
        # Clear it so the broker's retained store is left as found.
        later.publish(kept, b"", retain=True)
        later.close()
        print(f"paho MQTT {pub_level} -> MQTT {sub_level}: live and retained ok")


if __name__ == "__main__":
    main()
