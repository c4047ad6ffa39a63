#!/usr/bin/env python3
"""Independent-client MQTT conformance suite for relaybox (paho-mqtt 2.1.0).

Runs MQTT 3.1.1 and MQTT 5 behaviour checks against a broker listening on
--host/--port, one line per test plus a summary, exit code 0 only if every
test passes.  Every wait is bounded (<= 10 s) and the whole run is bounded by
--timeout.  Client ids and topics carry a random per-run token so runs (and
leftover retained messages / sessions of earlier runs) do not collide.

    python3 tests/interop/conformance.py --host 127.0.0.1 --port 1883 [-k PATTERN]

Only standard library + paho-mqtt==2.1.0 (see requirements.txt).
"""
from __future__ import annotations

import argparse
import os
import secrets
import sys
import threading
import time
import traceback
import unittest

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.client import CallbackAPIVersion, MQTTv311, MQTTv5
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

V3 = MQTTv311
V5 = MQTTv5
HOST = "127.0.0.1"
PORT = 1883
RUN = secrets.token_hex(3)      # per-run token for client ids and topics
MAX_WAIT = 10.0                 # upper bound of every single wait
QUIET = 0.7                     # quiet period used to assert "nothing (more) arrives"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def props(ptype, **kw):
    """Build a paho Properties object: props(PacketTypes.PUBLISH, ContentType='x')."""
    p = Properties(ptype)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def pget(p, name, default=None):
    if p is None:
        return default
    return getattr(p, name, default)


def wait_until(pred, timeout=MAX_WAIT, what="condition"):
    """Poll pred() until true; fail after timeout (bounded)."""
    timeout = min(timeout, MAX_WAIT)
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(0.02)


class Msg:
    __slots__ = ("topic", "raw_topic", "payload", "qos", "retain", "dup",
                 "props", "mid", "alias", "t")

    def __repr__(self):
        return (f"Msg({self.topic!r}, {self.payload[:40]!r}, qos={self.qos}, "
                f"retain={int(self.retain)})")


class Cli:
    """One paho client = one network connection, driven by its own loop thread
    (not loop_start(): paho's loop_forever would silently reconnect after a
    server-side close, which would hide what the server did)."""

    def __init__(self, client_id, proto=V5, clean_session=True, manual_ack=False,
                 name=""):
        kw = {}
        if proto == V3:
            kw["clean_session"] = clean_session
        self.name = name or client_id
        self.proto = proto
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=proto, manual_ack=manual_ack, **kw)
        self.cond = threading.Condition()
        self.msgs: list[Msg] = []
        self.connack = None         # (session_present, reason_code_int, properties)
        self.subacks = {}           # mid -> ([codes], props)
        self.unsubacks = {}
        self.pubacks = {}           # mid -> reason code int (v5 PUBACK/PUBREC/PUBCOMP)
        self.disconnected = None    # (reason_code_int, properties) once the link is down
        self.server_disconnect = None  # reason code of a DISCONNECT sent by the server
        self.violations: list[str] = []
        self.aliases = {}
        self.alias_max = 0          # TopicAliasMaximum we announced in CONNECT
        self.alias_uses = 0
        self.on_msg_hook = None
        self.paused = False
        self._stop = threading.Event()
        self._thread = None
        self.dead = False
        c = self.c
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_unsubscribe
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        # paho 2.1.0 drops the reason code of a server DISCONNECT whose remaining
        # length is 1 (reason code only); read it from the raw packet instead.
        orig_handle_disconnect = c._handle_disconnect

        def handle_disconnect():
            pkt = c._in_packet.get("packet", b"")
            with self.cond:
                self.server_disconnect = pkt[0] if len(pkt) >= 1 else 0
            return orig_handle_disconnect()
        c._handle_disconnect = handle_disconnect

    # ---- callbacks (loop thread) ----
    def _on_connect(self, c, u, flags, rc, properties):
        if self.proto == V5 and properties is not None:
            ska = pget(properties, "ServerKeepAlive")
            if ska is not None:
                # paho 2.1.0 ignores ServerKeepAlive; the client MUST use it.
                c._keepalive = ska
        with self.cond:
            self.connack = (bool(flags.session_present), rc.value,
                            properties if self.proto == V5 else None)
            self.cond.notify_all()

    def _on_subscribe(self, c, u, mid, rcs, properties):
        with self.cond:
            self.subacks[mid] = ([r.value for r in rcs], properties)
            self.cond.notify_all()

    def _on_unsubscribe(self, c, u, mid, rcs, properties):
        with self.cond:
            self.unsubacks[mid] = ([r.value for r in rcs] if rcs else [], properties)
            self.cond.notify_all()

    def _on_publish(self, c, u, mid, rc, properties):
        with self.cond:
            self.pubacks[mid] = rc.value if rc is not None else 0
            self.cond.notify_all()

    def _on_disconnect(self, c, u, flags, rc, properties):
        with self.cond:
            if self.disconnected is None:   # keep the first (most informative) event
                self.disconnected = (rc.value if rc is not None else None, properties)
            self.cond.notify_all()

    def _on_message(self, c, u, m):
        msg = Msg()
        msg.raw_topic = m._topic
        msg.payload = m.payload
        msg.qos = m.qos
        msg.retain = bool(m.retain)
        msg.dup = bool(m.dup)
        msg.props = m.properties if self.proto == V5 else None
        msg.mid = m.mid
        msg.t = time.monotonic()
        try:
            topic = m._topic.decode("utf-8")
        except UnicodeDecodeError:
            self.violations.append(f"{self.name}: topic not valid UTF-8: {m._topic!r}")
            topic = m._topic.decode("utf-8", "replace")
        alias = pget(msg.props, "TopicAlias")
        msg.alias = alias
        # paho 2.1.0 does NOT resolve inbound topic aliases: do it here and
        # check the server only uses aliases we allowed.
        if alias is not None:
            self.alias_uses += 1
            if self.alias_max == 0 or alias > self.alias_max:
                self.violations.append(
                    f"{self.name}: server used TopicAlias {alias} but client allowed "
                    f"TopicAliasMaximum={self.alias_max}")
            if topic:
                self.aliases[alias] = topic
            elif alias in self.aliases:
                topic = self.aliases[alias]
            else:
                self.violations.append(f"{self.name}: empty topic with unknown alias {alias}")
        elif not topic:
            self.violations.append(f"{self.name}: PUBLISH with empty topic and no alias")
        msg.topic = topic
        with self.cond:
            self.msgs.append(msg)
            self.cond.notify_all()
        if self.on_msg_hook is not None:
            try:
                self.on_msg_hook(self, msg)
            except Exception as e:  # pragma: no cover - reported by the test
                self.violations.append(f"{self.name}: hook failed: {e!r}")

    # ---- loop thread ----
    def _run(self):
        while not self._stop.is_set():
            try:
                rc = self.c.loop(timeout=0.05)
            except Exception as e:
                self.violations.append(f"{self.name}: loop error {e!r}")
                break
            if rc != mqtt.MQTT_ERR_SUCCESS:
                break
        if self._stop.is_set() and self.paused:
            return
        with self.cond:
            if self.disconnected is None:
                self.disconnected = (None, None)
            self.cond.notify_all()

    def _wait(self, pred, what, timeout=MAX_WAIT):
        timeout = min(timeout, MAX_WAIT)
        with self.cond:
            ok = self.cond.wait_for(pred, timeout)
        if not ok:
            raise AssertionError(f"{self.name}: timed out after {timeout:.1f}s waiting for {what}")
        return ok

    # ---- API used by the tests ----
    def connect(self, keepalive=30, clean_start=True, properties=None, expect_ok=True):
        if self.proto == V5:
            if properties is not None:
                tam = pget(properties, "TopicAliasMaximum")
                if tam:
                    self.alias_max = tam
            self.c.connect(HOST, PORT, keepalive, clean_start=clean_start,
                           properties=properties)
        else:
            self.c.connect(HOST, PORT, keepalive)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"mqtt-{self.name}")
        self._thread.start()
        self._wait(lambda: self.connack is not None or self.disconnected is not None,
                   "CONNACK")
        if self.connack is None:
            raise AssertionError(f"{self.name}: connection closed before CONNACK "
                                 f"(reason {self.disconnected[0]})")
        if expect_ok and self.connack[1] >= 0x80:
            raise AssertionError(f"{self.name}: CONNACK refused, reason code "
                                 f"0x{self.connack[1]:02x}")
        return self.connack

    @property
    def session_present(self):
        return self.connack[0]

    @property
    def connack_props(self):
        return self.connack[2]

    def subscribe(self, topic, qos=0, options=None, properties=None):
        """SUBSCRIBE one filter, wait for SUBACK, return the list of reason codes."""
        if options is not None:
            rc, mid = self.c.subscribe(topic, options=options, properties=properties)
        else:
            rc, mid = self.c.subscribe(topic, qos, properties=properties)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise AssertionError(f"{self.name}: subscribe({topic!r}) failed locally: {rc}")
        self._wait(lambda: mid in self.subacks or self.disconnected is not None,
                   f"SUBACK for {topic!r}")
        if mid not in self.subacks:
            raise AssertionError(f"{self.name}: connection closed instead of SUBACK "
                                 f"for {topic!r} (reason {self.disconnected[0]})")
        return self.subacks[mid][0]

    def subscribe_raw(self, topic_filter: str, qos=0):
        """SUBSCRIBE bypassing paho's client-side filter validation (private API of
        the pinned paho 2.1.0).  Returns (mid)."""
        opt = SubscribeOptions(qos=qos) if self.proto == V5 else qos
        rc, mid = self.c._send_subscribe(False, [(topic_filter.encode("utf-8"), opt)], None)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise AssertionError(f"{self.name}: raw subscribe failed locally: {rc}")
        return mid

    def unsubscribe(self, topic):
        rc, mid = self.c.unsubscribe(topic)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise AssertionError(f"{self.name}: unsubscribe failed locally: {rc}")
        self._wait(lambda: mid in self.unsubacks, f"UNSUBACK for {topic!r}")
        return self.unsubacks[mid][0]

    def publish(self, topic, payload, qos=0, retain=False, properties=None, wait=True):
        """PUBLISH; by default wait for completion (QoS 0: written, QoS 1:
        PUBACK, QoS 2: PUBCOMP), so at most one message is ever in flight."""
        info = self.c.publish(topic, payload, qos, retain, properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise AssertionError(f"{self.name}: publish to {topic!r} failed locally: {info.rc}")
        if wait:
            self._wait(lambda: info.is_published() or self.disconnected is not None,
                       f"publish completion on {topic!r}")
            if not info.is_published():
                raise AssertionError(f"{self.name}: connection closed during publish "
                                     f"(reason {self.disconnected[0]})")
        return info

    def ack(self, mid, qos=1):
        self.c.ack(mid, qos)

    def messages(self, topic=None, pred=None):
        with self.cond:
            ms = list(self.msgs)
        if topic is not None:
            ms = [m for m in ms if m.topic == topic]
        if pred is not None:
            ms = [m for m in ms if pred(m)]
        return ms

    def wait_msgs(self, n=1, topic=None, pred=None, timeout=MAX_WAIT):
        """Wait until at least n messages (matching topic/pred) arrived; return them."""
        def enough():
            return len(self.messages(topic, pred)) >= n
        try:
            self._wait(enough, f"{n} message(s)" + (f" on {topic!r}" if topic else ""), timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}; got {self.messages(topic, pred)!r}") from None
        return self.messages(topic, pred)

    def settle(self, seconds=None):
        """Quiet period: used only to assert that nothing (more) arrives."""
        time.sleep(QUIET if seconds is None else seconds)

    @property
    def connected(self):
        return self.connack is not None and self.disconnected is None and not self.dead

    def disconnect(self, properties=None):
        if self.connected:
            if self.proto == V5:
                self.c.disconnect(properties=properties)
            else:
                self.c.disconnect()
            self._wait(lambda: self.disconnected is not None, "clean disconnect")
        self._stop_thread()

    def kill(self):
        """Abnormal disconnect: close the TCP socket without sending DISCONNECT."""
        self._stop_thread()
        sock = self.c.socket()
        if sock is not None:
            sock.close()
        self.dead = True
        return time.monotonic()

    def _stop_thread(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(MAX_WAIT)

    def pause(self):
        """Stop the loop thread but keep the socket: the client neither reads nor
        sends anything (no PINGREQ) until resume()."""
        self.paused = True
        self._stop_thread()

    def resume(self):
        self.paused = False
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"mqtt-{self.name}")
        self._thread.start()

    def close(self):
        try:
            if self.connected:
                self.disconnect()
        except Exception:
            pass
        self._stop_thread()
        try:
            sock = self.c.socket()
            if sock is not None:
                sock.close()
        except Exception:
            pass


# --------------------------------------------------------------------------
# base test case
# --------------------------------------------------------------------------

class Base(unittest.TestCase):
    maxDiff = None

    def setUp(self):
        self._clients: list[Cli] = []
        self._retained: set[str] = set()
        self._sessions: list[tuple[str, int]] = []
        self.notes: list[str] = []
        self.short = self._testMethodName[len("test_"):]
        self.prefix = f"rbx-{RUN}/{self.short}"

    def cid(self, tag):
        return f"rbx{RUN}-{self.short}-{tag}"

    def t(self, suffix):
        return f"{self.prefix}/{suffix}"

    def note(self, text):
        self.notes.append(text)

    def client(self, tag, proto=V5, connect=True, client_id=None, clean_session=True,
               manual_ack=False, keepalive=30, clean_start=True, properties=None, will=None):
        cid = self.cid(tag) if client_id is None else client_id
        c = Cli(cid, proto, clean_session=clean_session, manual_ack=manual_ack,
                name=f"{tag}")
        self._clients.append(c)
        if will is not None:
            topic, payload, qos, retain, wprops = (list(will) + [None])[:5]
            c.c.will_set(topic, payload, qos, retain, properties=wprops)
        if connect:
            c.connect(keepalive=keepalive, clean_start=clean_start, properties=properties)
        return c

    def retained(self, topic):
        """Remember a topic that gets a retained message, to clear it afterwards."""
        self._retained.add(topic)
        return topic

    def persistent(self, client_id, proto):
        """Remember a session id to discard at tearDown."""
        self._sessions.append((client_id, proto))
        return client_id

    def tearDown(self):
        violations = [v for c in self._clients for v in c.violations]
        for c in self._clients:
            c.close()
        try:
            if self._retained:
                cl = Cli(self.cid("cleanup"), V3, name="cleanup")
                cl.connect()
                for tp in sorted(self._retained):
                    cl.publish(tp, b"", qos=1, retain=True)
                cl.disconnect()
            for cid, proto in self._sessions:
                cl = Cli(cid, proto, clean_session=True, name="purge")
                if proto == V5:
                    cl.connect(clean_start=True,
                               properties=props(PacketTypes.CONNECT, SessionExpiryInterval=0))
                else:
                    cl.connect()
                cl.disconnect()
        except Exception as e:  # cleanup problems are reported, not hidden
            violations.append(f"cleanup failed: {e!r}")
        if violations:
            self.fail("protocol violations / errors seen by clients: " + "; ".join(violations))

    # shared assertion helpers
    def assertPayloads(self, msgs, expected):
        self.assertEqual([m.payload for m in msgs], expected)


# --------------------------------------------------------------------------
# MQTT 3.1.1
# --------------------------------------------------------------------------

class V311(Base):

    def test_v311_pubsub_qos012(self):
        sub = self.client("sub", V3)
        pub = self.client("pub", V3)
        for q in (0, 1, 2):
            topic = self.t(f"q{q}")
            self.assertEqual(sub.subscribe(topic, q), [q], "SUBACK granted QoS")
            pub.publish(topic, f"hello-q{q}".encode(), qos=q)
            m = sub.wait_msgs(1, topic)[0]
            self.assertEqual((m.payload, m.qos, m.retain), (f"hello-q{q}".encode(), q, False))
        sub.settle()
        self.assertEqual(len(sub.messages()), 3, f"exactly one copy each: {sub.messages()}")

    def test_v311_qos_downgrade(self):
        sub = self.client("sub", V3)
        pub = self.client("pub", V3)
        cases = [(2, 1, 1), (1, 2, 1), (2, 0, 0), (0, 2, 0)]  # (pub qos, sub qos, expected)
        for i, (pq, sq, _) in enumerate(cases):
            self.assertEqual(sub.subscribe(self.t(f"c{i}"), sq), [sq])
        for i, (pq, sq, exp) in enumerate(cases):
            pub.publish(self.t(f"c{i}"), f"p{pq}s{sq}".encode(), qos=pq)
            m = sub.wait_msgs(1, self.t(f"c{i}"))[0]
            self.assertEqual(m.qos, exp, f"publish QoS {pq} to QoS {sq} subscription")
        sub.settle()
        self.assertEqual(len(sub.messages()), len(cases))

    def test_v311_retained_set_replace_clear(self):
        T, C = self.retained(self.t("r/val")), self.retained(self.t("r/ctl"))
        pub = self.client("pub", V3)
        pub.publish(T, b"v1", qos=1, retain=True)
        pub.publish(C, b"ctl", qos=1, retain=True)
        s1 = self.client("s1", V3)
        s1.subscribe(T, 1)
        m = s1.wait_msgs(1, T)[0]
        self.assertEqual((m.payload, m.retain), (b"v1", True))
        pub.publish(T, b"v2", qos=1, retain=True)          # replace
        live = s1.wait_msgs(2, T)[1]
        self.assertEqual((live.payload, live.retain), (b"v2", False))
        s2 = self.client("s2", V3)
        s2.subscribe(T, 1)
        s2.wait_msgs(1, T)
        s2.settle()
        self.assertEqual([(m.payload, m.retain) for m in s2.messages(T)], [(b"v2", True)],
                         "only the replacing retained message")
        pub.publish(T, b"", qos=1, retain=True)             # clear
        clr = s1.wait_msgs(3, T)[2]                          # still forwarded to subscribers
        self.assertEqual((clr.payload, clr.retain), (b"", False))
        s3 = self.client("s3", V3)
        s3.subscribe(self.t("r/#"), 1)
        s3.wait_msgs(1, C)
        s3.settle()
        self.assertEqual(s3.messages(T), [], "retained message must be cleared")
        self.assertEqual([(m.payload, m.retain) for m in s3.messages(C)], [(b"ctl", True)])

    def test_v311_empty_nonretained_keeps_retained(self):
        T = self.retained(self.t("keep"))
        pub = self.client("pub", V3)
        live = self.client("live", V3)
        live.subscribe(T, 1)
        pub.publish(T, b"keep", qos=1, retain=True)
        pub.publish(T, b"", qos=1, retain=False)
        ms = live.wait_msgs(2, T)
        self.assertEqual([m.payload for m in ms], [b"keep", b""])
        new = self.client("new", V3)
        new.subscribe(T, 1)
        new.wait_msgs(1, T)
        new.settle()
        self.assertEqual([(m.payload, m.retain) for m in new.messages(T)], [(b"keep", True)])

    def test_v311_retain_flag_new_vs_live(self):
        T = self.retained(self.t("flag"))
        pub = self.client("pub", V3)
        live = self.client("live", V3)
        live.subscribe(T, 1)
        pub.publish(T, b"r1", qos=1, retain=True)
        m = live.wait_msgs(1, T)[0]
        self.assertEqual((m.payload, m.retain), (b"r1", False),
                         "live delivery MUST have RETAIN=0 [MQTT-3.3.1-9]")
        new = self.client("new", V3)
        new.subscribe(T, 1)
        m = new.wait_msgs(1, T)[0]
        self.assertEqual((m.payload, m.retain), (b"r1", True),
                         "delivery caused by new subscription MUST have RETAIN=1 [MQTT-3.3.1-8]")
        pub.publish(T, b"r2", qos=1, retain=True)
        m = new.wait_msgs(2, T)[1]
        self.assertEqual((m.payload, m.retain), (b"r2", False))

    def test_v311_zero_length_client_id(self):
        c = self.client("anon", V3, client_id="", clean_session=True)
        self.assertEqual(c.connack[1], 0)
        self.assertFalse(c.session_present)
        c.subscribe(self.t("x"), 1)
        c.publish(self.t("x"), b"anon", qos=1)
        self.assertEqual(c.wait_msgs(1)[0].payload, b"anon")

    def test_v311_persistent_session(self):
        cid = self.persistent(self.cid("p"), V3)
        T = self.t("q")
        c = self.client("wipe", V3, client_id=cid, clean_session=True)
        c.disconnect()
        c = self.client("p1", V3, client_id=cid, clean_session=False)
        self.assertFalse(c.session_present, "fresh session: session present = 0")
        self.assertEqual(c.subscribe(T, 1), [1])
        c.disconnect()
        pub = self.client("pub", V3)
        for i in range(3):
            pub.publish(T, f"off{i}".encode(), qos=1)
        c = self.client("p2", V3, client_id=cid, clean_session=False)
        self.assertTrue(c.session_present, "session present = 1 on reconnect")
        ms = c.wait_msgs(3, T)
        self.assertPayloads(ms, [b"off0", b"off1", b"off2"])
        self.assertTrue(all(m.qos == 1 for m in ms))
        pub.publish(T, b"live", qos=1)
        self.assertEqual(c.wait_msgs(4, T)[3].payload, b"live", "subscription kept")
        c.settle()
        self.assertEqual(len(c.messages(T)), 4)

    def test_v311_takeover(self):
        # [MQTT-3.1.4-2]: a CONNECT with a client id in use closes the existing
        # connection. The old one has been quiet for 1.5 s, so relaybox has parked it:
        # the take-over must still reach it.
        cid = self.persistent(self.cid("to"), V3)
        T = self.t("q")
        old = self.client("to1", V3, client_id=cid, clean_session=False)
        self.assertEqual(old.subscribe(T, 1), [1])
        time.sleep(1.5)
        new = self.client("to2", V3, client_id=cid, clean_session=False)
        self.assertTrue(new.session_present, "the session goes on with the new connection")
        old._wait(lambda: old.disconnected is not None,
                  "the server closing the connection that was taken over", timeout=5)
        pub = self.client("pub", V3)
        pub.publish(T, b"to-new", qos=1)
        self.assertEqual(new.wait_msgs(1, T)[0].payload, b"to-new", "subscription kept")
        new.settle()
        self.assertEqual(old.messages(T), [], "nothing reaches the old connection")

    def test_v5_takeover(self):
        # [MQTT-3.1.4-3]: the existing connection gets DISCONNECT 0x8E (session taken
        # over) and is closed, also when relaybox had parked it.
        cid = self.persistent(self.cid("to5"), V5)
        T = self.t("q")
        old = self.client("to5a", client_id=cid, clean_start=True,
                          properties=cprops(SessionExpiryInterval=30))
        self.assertEqual(old.subscribe(T, 1), [1])
        time.sleep(1.5)
        new = self.client("to5b", client_id=cid, clean_start=False,
                          properties=cprops(SessionExpiryInterval=30))
        self.assertTrue(new.session_present, "the session goes on with the new connection")
        old._wait(lambda: old.disconnected is not None,
                  "the server closing the connection that was taken over", timeout=5)
        self.assertEqual(old.server_disconnect, 0x8E, "DISCONNECT 0x8E session taken over")
        pub = self.client("pub")
        pub.publish(T, b"to-new", qos=1)
        self.assertEqual(new.wait_msgs(1, T)[0].payload, b"to-new", "subscription kept")

    def test_v311_overlapping_subscriptions(self):
        # [MQTT-3.3.5-1]: at least one copy at the maximum QoS of all matching
        # subscriptions; the server MAY send one copy per subscription.
        # Both orders of (QoS 0, QoS 1) are tried so tree-walk order cannot hide a bug.
        sub = self.client("sub", V3)
        pub = self.client("pub", V3)
        sub.subscribe(self.t("a/+"), 0)
        sub.subscribe(self.t("a/#"), 1)
        sub.subscribe(self.t("b/+"), 1)
        sub.subscribe(self.t("b/#"), 0)
        pub.publish(self.t("a/x"), b"ov-a", qos=2)
        pub.publish(self.t("b/x"), b"ov-b", qos=2)
        sub.wait_msgs(1, self.t("a/x"))
        sub.wait_msgs(1, self.t("b/x"))
        sub.settle()
        copies = []
        for leaf in ("a", "b"):
            ms = sub.messages(self.t(f"{leaf}/x"))
            self.assertTrue(1 <= len(ms) <= 2, f"{leaf}: one copy, or (MAY) one per subscription: {ms}")
            self.assertTrue(all(m.payload == f"ov-{leaf}".encode() for m in ms))
            self.assertEqual(max(m.qos for m in ms), 1,
                             f"{leaf}: delivered at QoS {[m.qos for m in ms]}, the maximum QoS of "
                             "matching subscriptions (1) must be respected [MQTT-3.3.5-1]")
            if len(ms) == 2:
                self.assertEqual(sorted(m.qos for m in ms), [0, 1],
                                 "extra copy respects its own subscription's QoS")
            copies.append(len(ms))
        self.note(f"copies per message: {copies}")

    def test_v311_dollar_topics(self):
        foo = f"$foo{RUN}"
        allsub = self.client("all", V3)
        allsub.subscribe("#", 0)
        plus = self.client("plus", V3)
        plus.subscribe("+/x", 0)
        dollar = self.client("dollar", V3)
        dollar.subscribe(f"{foo}/#", 0)
        psys = self.client("psys", V3)     # may be refused/dropped by the server: ignored
        try:
            psys.publish(f"$SYS/rbx{RUN}/x", b"sys", qos=0)
        except AssertionError:
            pass
        pub = self.client("pub", V3)
        pub.publish(f"{foo}/x", b"foo", qos=1)
        pub.publish(self.t("marker"), b"marker", qos=1)
        m = dollar.wait_msgs(1, f"{foo}/x")[0]
        self.assertEqual(m.payload, b"foo", "explicit $foo/# subscription gets $foo/x")
        allsub.wait_msgs(1, self.t("marker"))
        allsub.settle()
        bad = [m.topic for m in allsub.messages() if m.topic.startswith("$")]
        self.assertEqual(bad, [], "'#' must not match topics starting with '$' [MQTT-4.7.2-1]")
        self.assertEqual([m.topic for m in plus.messages()], [], "'+/x' must not match $foo/x")

    def test_v311_unsubscribe(self):
        T, C = self.t("t"), self.t("ctl")
        sub = self.client("sub", V3)
        pub = self.client("pub", V3)
        sub.subscribe(T, 1)
        sub.subscribe(C, 1)
        pub.publish(T, b"before", qos=1)
        sub.wait_msgs(1, T)
        sub.unsubscribe(T)
        pub.publish(T, b"after", qos=1)
        pub.publish(C, b"ctl", qos=1)
        sub.wait_msgs(1, C)
        sub.settle()
        self.assertPayloads(sub.messages(T), [b"before"])

    def test_v311_will_on_abnormal_disconnect(self):
        W = self.t("will")
        watch = self.client("watch", V3)
        watch.subscribe(W, 1)
        wc = self.client("wc", V3, will=(W, b"gone", 1, False))
        wc.kill()
        m = watch.wait_msgs(1, W)[0]
        self.assertEqual((m.payload, m.qos, m.retain), (b"gone", 1, False))
        watch.settle()
        self.assertEqual(len(watch.messages(W)), 1)

    def test_v311_no_will_on_clean_disconnect(self):
        W, C = self.t("will"), self.t("ctl")
        watch = self.client("watch", V3)
        watch.subscribe(W, 1)
        watch.subscribe(C, 1)
        wc = self.client("wc", V3, will=(W, b"gone", 1, False))
        wc.disconnect()
        pub = self.client("pub", V3)
        pub.publish(C, b"ctl", qos=1)
        watch.wait_msgs(1, C)
        watch.settle()
        self.assertEqual(watch.messages(W), [], "will must not be sent after DISCONNECT")

    def test_v311_keep_alive_zero(self):
        # Keep alive 0 turns the server's timeout off [MQTT-3.1.2-24 applies only
        # to a non-zero keep alive].
        c = self.client("ka0", V3, keepalive=0)
        c.settle(2.5)
        self.assertTrue(c.connected, "a silent client with keep alive 0 stays connected")
        c.subscribe(self.t("k"), 1)
        c.publish(self.t("k"), b"still here", qos=1)
        self.assertEqual(c.wait_msgs(1)[0].payload, b"still here")

    def test_v311_keep_alive_timeout(self):
        # A client silent for 1.5 x its keep alive is disconnected [MQTT-3.1.2-24].
        c = self.client("silent", V3, keepalive=1)
        c.pause()
        time.sleep(2.5)
        c.resume()
        c._wait(lambda: c.disconnected is not None,
                "the server closing a connection silent for 1.5 x keep alive", timeout=5)

    def test_v311_redelivery_with_dup(self):
        # An unacknowledged QoS 1 delivery of a persistent session is sent again
        # with DUP when the client comes back [MQTT-4.4.0-1].
        T = self.t("dup")
        cid = self.persistent(self.cid("sub"), V3)
        sub = self.client("sub", V3, client_id=cid, clean_session=False, manual_ack=True)
        sub.subscribe(T, 1)
        pub = self.client("pub", V3)
        pub.publish(T, b"once more", qos=1)
        first = sub.wait_msgs(1, T)[0]
        self.assertFalse(first.dup, "first delivery without DUP")
        sub.kill()
        again = self.client("again", V3, client_id=cid, clean_session=False, manual_ack=True)
        self.assertTrue(again.session_present, "the session is kept")
        m = again.wait_msgs(1, T)[0]
        self.assertEqual((m.payload, m.qos, m.dup), (b"once more", 1, True),
                         "the unacknowledged delivery is sent again with DUP")
        again.ack(m.mid, 1)
        again.settle()
        self.assertEqual(len(again.messages(T)), 1, "sent again once")


    def test_v311_unicode_topic_plus(self):
        T = self.t("ü/über/x")
        sub = self.client("sub", V3)
        pub = self.client("pub", V3)
        sub.subscribe(self.t("ü/+/x"), 1)
        pub.publish(T, "grüße".encode(), qos=1)
        m = sub.wait_msgs(1)[0]
        self.assertEqual((m.topic, m.payload), (T, "grüße".encode()))


# --------------------------------------------------------------------------
# MQTT 5
# --------------------------------------------------------------------------

def cprops(**kw):
    return props(PacketTypes.CONNECT, **kw)


def pprops(**kw):
    return props(PacketTypes.PUBLISH, **kw)


class V5Tests(Base):

    def test_v5_pubsub_qos012(self):
        sub = self.client("sub")
        pub = self.client("pub")
        for q in (0, 1, 2):
            topic = self.t(f"q{q}")
            self.assertEqual(sub.subscribe(topic, q), [q])
            pub.publish(topic, f"v5-q{q}".encode(), qos=q)
            m = sub.wait_msgs(1, topic)[0]
            self.assertEqual((m.payload, m.qos, m.retain), (f"v5-q{q}".encode(), q, False))
        sub.settle()
        self.assertEqual(len(sub.messages()), 3)

    def test_v5_qos_downgrade(self):
        sub = self.client("sub")
        pub = self.client("pub")
        cases = [(2, 1, 1), (1, 2, 1), (2, 0, 0), (0, 2, 0)]
        for i, (pq, sq, _) in enumerate(cases):
            self.assertEqual(sub.subscribe(self.t(f"c{i}"), sq), [sq])
        for i, (pq, sq, exp) in enumerate(cases):
            pub.publish(self.t(f"c{i}"), b"x", qos=pq)
            self.assertEqual(sub.wait_msgs(1, self.t(f"c{i}"))[0].qos, exp,
                             f"publish QoS {pq} to QoS {sq} subscription")

    def test_v5_empty_nonretained_keeps_retained(self):
        T = self.retained(self.t("keep"))
        pub = self.client("pub")
        live = self.client("live")
        live.subscribe(T, 1)
        pub.publish(T, b"keep", qos=1, retain=True)
        pub.publish(T, b"", qos=1, retain=False)
        self.assertPayloads(live.wait_msgs(2, T), [b"keep", b""])
        new = self.client("new")
        new.subscribe(T, 1)
        new.wait_msgs(1, T)
        new.settle()
        self.assertEqual([(m.payload, m.retain) for m in new.messages(T)], [(b"keep", True)])

    def test_v5_session_expiry_zero(self):
        cid = self.persistent(self.cid("s0"), V5)
        T, C = self.t("q"), self.t("ctl")
        c = self.client("s0a", client_id=cid, clean_start=True,
                        properties=cprops(SessionExpiryInterval=0))
        c.subscribe(T, 1)
        c.disconnect()
        pub = self.client("pub")
        pub.publish(T, b"lost", qos=1)
        c = self.client("s0b", client_id=cid, clean_start=False,
                        properties=cprops(SessionExpiryInterval=0))
        self.assertFalse(c.session_present, "expiry 0: session ended at disconnect")
        c.subscribe(C, 1)
        pub.publish(T, b"after", qos=1)
        pub.publish(C, b"ctl", qos=1)
        c.wait_msgs(1, C)
        c.settle()
        self.assertEqual(c.messages(T), [], "no queued message and no old subscription")

    def test_v5_session_expiry_30(self):
        cid = self.persistent(self.cid("s30"), V5)
        T = self.t("q")
        c = self.client("s30a", client_id=cid, clean_start=True,
                        properties=cprops(SessionExpiryInterval=30))
        self.assertFalse(c.session_present)
        c.subscribe(T, 1)
        c.disconnect()
        pub = self.client("pub")
        for i in range(3):
            pub.publish(T, f"off{i}".encode(), qos=1)
        c = self.client("s30b", client_id=cid, clean_start=False,
                        properties=cprops(SessionExpiryInterval=30))
        self.assertTrue(c.session_present, "session present = 1")
        ms = c.wait_msgs(3, T)
        self.assertPayloads(ms, [b"off0", b"off1", b"off2"])
        self.assertTrue(all(m.qos == 1 for m in ms))
        c.settle()
        self.assertEqual(len(c.messages(T)), 3)

    def test_v5_no_local(self):
        T = self.t("nl")
        a = self.client("a")
        self.assertEqual(a.subscribe(T, options=SubscribeOptions(qos=1, noLocal=True)), [1])
        obs = self.client("obs")
        obs.subscribe(T, 1)
        b = self.client("b")
        a.publish(T, b"mine", qos=1)
        obs.wait_msgs(1, T, pred=lambda m: m.payload == b"mine")   # it was routed
        b.publish(T, b"theirs", qos=1)
        a.wait_msgs(1, T, pred=lambda m: m.payload == b"theirs")
        obs.wait_msgs(2, T)
        a.settle()
        self.assertPayloads(a.messages(T), [b"theirs"])

    def test_v5_retain_as_published(self):
        T = self.retained(self.t("rap"))
        rap1 = self.client("rap1")
        rap1.subscribe(T, options=SubscribeOptions(qos=1, retainAsPublished=True))
        rap0 = self.client("rap0")
        rap0.subscribe(T, options=SubscribeOptions(qos=1, retainAsPublished=False))
        pub = self.client("pub")
        pub.publish(T, b"r", qos=1, retain=True)
        pub.publish(T, b"n", qos=1, retain=False)
        m1 = rap1.wait_msgs(2, T)
        m0 = rap0.wait_msgs(2, T)
        self.assertEqual([(m.payload, m.retain) for m in m1], [(b"r", True), (b"n", False)],
                         "RAP=1: live message keeps its RETAIN flag")
        self.assertEqual([(m.payload, m.retain) for m in m0], [(b"r", False), (b"n", False)],
                         "RAP=0: live message has RETAIN=0")

    def test_v5_retain_handling(self):
        T = self.retained(self.t("rh"))
        pub = self.client("pub")
        pub.publish(T, b"R", qos=1, retain=True)
        isR = lambda m: m.payload == b"R"  # noqa: E731
        # 0: send retained at every subscribe
        rh0 = self.client("rh0")
        rh0.subscribe(T, options=SubscribeOptions(qos=1, retainHandling=0))
        self.assertTrue(rh0.wait_msgs(1, T, isR)[0].retain)
        rh0.subscribe(T, options=SubscribeOptions(qos=1, retainHandling=0))
        self.assertTrue(rh0.wait_msgs(2, T, isR)[1].retain, "RH=0: sent again on re-subscribe")
        # 1: only if the subscription did not exist
        rh1 = self.client("rh1")
        rh1.subscribe(T, options=SubscribeOptions(qos=1, retainHandling=1))
        self.assertTrue(rh1.wait_msgs(1, T, isR)[0].retain)
        rh1.subscribe(T, options=SubscribeOptions(qos=1, retainHandling=1))
        # 2: never
        rh2 = self.client("rh2")
        rh2.subscribe(T, options=SubscribeOptions(qos=1, retainHandling=2))
        pub.publish(T, b"L", qos=1)   # live control message, after both SUBACKs
        rh1.wait_msgs(1, T, lambda m: m.payload == b"L")
        rh2.wait_msgs(1, T, lambda m: m.payload == b"L")
        rh1.settle()
        self.assertEqual(len(rh1.messages(T, isR)), 1, "RH=1: not re-sent for existing subscription")
        self.assertEqual(rh2.messages(T, isR), [], "RH=2: retained never sent")
        self.assertEqual(len(rh0.messages(T, isR)), 2)

    def test_v5_message_expiry_retained(self):
        E, K = self.retained(self.t("e/exp")), self.retained(self.t("e/keep"))
        pub = self.client("pub")
        pub.publish(E, b"short", qos=1, retain=True, properties=pprops(MessageExpiryInterval=2))
        pub.publish(K, b"keep", qos=1, retain=True)
        early = self.client("early")
        early.subscribe(E, 1)
        m = early.wait_msgs(1, E)[0]
        exp = pget(m.props, "MessageExpiryInterval")
        self.assertIsNotNone(exp, "retained message keeps its expiry interval")
        self.assertTrue(0 <= exp <= 2, f"remaining expiry {exp} <= original 2")
        time.sleep(3.0)              # timing is the behaviour under test
        late = self.client("late")
        late.subscribe(self.t("e/#"), 1)
        late.wait_msgs(1, K)
        late.settle()
        self.assertEqual(late.messages(E), [], "expired retained message must not be delivered")

    def test_v5_message_expiry_queued(self):
        cid = self.persistent(self.cid("mq"), V5)
        T = self.t("q")
        c = self.client("mq1", client_id=cid, properties=cprops(SessionExpiryInterval=60))
        c.subscribe(T, 1)
        c.disconnect()
        pub = self.client("pub")
        pub.publish(T, b"a-exp1", qos=1, properties=pprops(MessageExpiryInterval=1))
        pub.publish(T, b"b-noexp", qos=1)
        pub.publish(T, b"c-exp60", qos=1, properties=pprops(MessageExpiryInterval=60))
        time.sleep(2.5)              # timing is the behaviour under test
        c = self.client("mq2", client_id=cid, clean_start=False,
                        properties=cprops(SessionExpiryInterval=60))
        self.assertTrue(c.session_present)
        c.wait_msgs(2, T)
        c.settle()
        ms = c.messages(T)
        self.assertPayloads(ms, [b"b-noexp", b"c-exp60"])
        self.assertIsNone(pget(ms[0].props, "MessageExpiryInterval"))
        rem = pget(ms[1].props, "MessageExpiryInterval")
        self.assertIsNotNone(rem, "expiry interval forwarded")
        self.assertTrue(1 <= rem <= 58, f"remaining expiry {rem} must be reduced by time queued (>=2.5s)")
        # live delivery carries an expiry <= the original
        pub.publish(T, b"live", qos=1, properties=pprops(MessageExpiryInterval=100))
        m = c.wait_msgs(3, T)[2]
        self.assertTrue(1 <= pget(m.props, "MessageExpiryInterval", -1) <= 100)

    def test_v5_topic_alias_client_to_server(self):
        T1, T2 = self.t("al/one"), self.t("al/two")
        sub = self.client("sub")
        sub.subscribe(self.t("al/#"), 1)
        pub = self.client("pub")
        tam = pget(pub.connack_props, "TopicAliasMaximum", 0)
        self.assertGreaterEqual(tam, 1, "server must accept topic aliases (TopicAliasMaximum>=1)")
        pub.publish(T1, b"1", qos=1, properties=pprops(TopicAlias=1))
        pub.publish("", b"2", qos=1, properties=pprops(TopicAlias=1))
        pub.publish(T2, b"3", qos=1, properties=pprops(TopicAlias=1))   # remap alias 1
        pub.publish("", b"4", qos=1, properties=pprops(TopicAlias=1))
        ms = sub.wait_msgs(4)
        self.assertEqual(sorted((m.payload, m.topic) for m in ms),
                         [(b"1", T1), (b"2", T1), (b"3", T2), (b"4", T2)])
        self.assertTrue(pub.connected)
        self.note(f"server TopicAliasMaximum={tam}")

    def test_v5_topic_alias_server_to_client(self):
        sub = self.client("sub", properties=cprops(TopicAliasMaximum=10))
        sub.subscribe(self.t("sa/#"), 1)
        pub = self.client("pub")
        seq = ["a", "b", "a", "a", "b", "c", "a", "c", "b", "a", "a", "d"]
        for i, s in enumerate(seq):
            pub.publish(self.t(f"sa/{s}"), f"{i}:{s}".encode(), qos=1)
        ms = sub.wait_msgs(len(seq))
        for m in ms:
            i, s = m.payload.decode().split(":")
            self.assertEqual(m.topic, self.t(f"sa/{s}"), f"message {i}")
        sub.settle()
        self.assertEqual(len(sub.messages()), len(seq))
        self.note(f"server used aliases on {sub.alias_uses}/{len(seq)} messages")

    def test_v5_subscription_identifiers(self):
        pub = self.client("pub")
        s = self.client("s")
        s.subscribe(self.t("one"), 1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=7))
        s.subscribe(self.t("none"), 1)
        pub.publish(self.t("one"), b"x", qos=1)
        pub.publish(self.t("none"), b"y", qos=1)
        self.assertEqual(pget(s.wait_msgs(1, self.t("one"))[0].props, "SubscriptionIdentifier"), [7])
        self.assertIsNone(pget(s.wait_msgs(1, self.t("none"))[0].props, "SubscriptionIdentifier"),
                          "no identifier for a subscription made without one")
        ov = self.client("ov")
        ov.subscribe(self.t("ov/+"), 1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=2))
        ov.subscribe(self.t("ov/#"), 1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=3))
        pub.publish(self.t("ov/x"), b"ov", qos=1)
        ov.wait_msgs(1)
        ov.settle()
        ids = sorted(sorted(pget(m.props, "SubscriptionIdentifier", [])) for m in ov.messages())
        self.assertIn(ids, ([[2, 3]], [[2], [3]]),
                      "one message with both ids, or one message per subscription with its id")
        self.note("overlap: " + ("1 message [2,3]" if ids == [[2, 3]] else "2 messages [2],[3]"))

    def test_v5_properties_passthrough(self):
        T = self.t("p")
        sub = self.client("sub")
        sub.subscribe(T, 1)
        pub = self.client("pub")
        up = [("k", "v1"), ("k", "v2"), ("ü", "ß"), ("a", "")]
        pp = pprops(UserProperty=up, ContentType="application/json; charset=utf-8",
                    PayloadFormatIndicator=1, ResponseTopic=self.t("resp/ü"),
                    CorrelationData=b"\x00\x01corr\xff")
        pub.publish(T, '{"ü": 1}'.encode(), qos=1, properties=pp)
        m = sub.wait_msgs(1, T)[0]
        self.assertEqual(m.payload, '{"ü": 1}'.encode())
        self.assertEqual(pget(m.props, "UserProperty"), up, "user properties, order kept")
        self.assertEqual(pget(m.props, "ContentType"), "application/json; charset=utf-8")
        self.assertEqual(pget(m.props, "PayloadFormatIndicator"), 1)
        self.assertEqual(pget(m.props, "ResponseTopic"), self.t("resp/ü"))
        self.assertEqual(pget(m.props, "CorrelationData"), b"\x00\x01corr\xff")

    def test_v5_server_keep_alive(self):
        c0 = self.client("ka0", keepalive=0)
        self.assertEqual(c0.connack[1], 0, "keep alive 0 accepted")
        ska0 = pget(c0.connack_props, "ServerKeepAlive")
        c60 = self.client("ka60", keepalive=60)
        ska60 = pget(c60.connack_props, "ServerKeepAlive")
        for ska in (ska0, ska60):
            if ska is not None:
                self.assertTrue(0 <= ska <= 65535)
        if ska60 is not None:
            self.assertLessEqual(ska60, 65535)
        c0.subscribe(self.t("k"), 1)
        c60.publish(self.t("k"), b"alive", qos=1)
        self.assertEqual(c0.wait_msgs(1)[0].payload, b"alive")
        self.note(f"ServerKeepAlive: ka=0 -> {ska0}, ka=60 -> {ska60}")

    def test_v5_redelivery_with_dup(self):
        T = self.t("dup")
        cid = self.persistent(self.cid("sub"), V5)
        keep = cprops(SessionExpiryInterval=60)
        sub = self.client("sub", client_id=cid, manual_ack=True, properties=keep)
        sub.subscribe(T, 1)
        pub = self.client("pub")
        pub.publish(T, b"once more", qos=1)
        first = sub.wait_msgs(1, T)[0]
        self.assertFalse(first.dup, "first delivery without DUP")
        sub.kill()
        again = self.client("again", client_id=cid, manual_ack=True, clean_start=False,
                            properties=cprops(SessionExpiryInterval=60))
        self.assertTrue(again.session_present, "the session is kept")
        m = again.wait_msgs(1, T)[0]
        self.assertEqual((m.payload, m.qos, m.dup), (b"once more", 1, True),
                         "the unacknowledged delivery is sent again with DUP")
        again.ack(m.mid, 1)

    def test_v5_authentication_method_not_supported(self):
        # Extended authentication is not offered: CONNACK 0x8C (bad
        # authentication method) [MQTT-4.12.0-1].
        c = self.client("auth", connect=False)
        ack = c.connect(properties=cprops(AuthenticationMethod="SCRAM-SHA-1"),
                        expect_ok=False)
        self.assertEqual(ack[1], 0x8C, f"CONNACK 0x{ack[1]:02x}, not 0x8c")


    def test_v5_receive_maximum(self):
        T = self.t("rm")
        sub = self.client("sub", manual_ack=True, properties=cprops(ReceiveMaximum=1))
        sub.subscribe(T, 1)
        pub = self.client("pub")
        srm = pget(pub.connack_props, "ReceiveMaximum")
        if srm is not None:
            self.assertGreaterEqual(srm, 1)
        n = 20
        for i in range(n):
            pub.publish(T, f"m{i:02d}".encode(), qos=1)   # waits for each PUBACK
        for i in range(n):
            m = sub.wait_msgs(i + 1, T)[i]
            if i < 3:   # while a QoS 1 message is unacknowledged no other may be sent
                sub.settle(0.3)
                self.assertEqual(len(sub.messages(T)), i + 1,
                                 "server exceeded client's ReceiveMaximum=1")
            sub.ack(m.mid, 1)
        ms = sub.messages(T)
        self.assertPayloads(ms, [f"m{i:02d}".encode() for i in range(n)])
        self.assertTrue(all(m.qos == 1 for m in ms))
        self.note(f"server ReceiveMaximum={srm}")

    def test_v5_maximum_packet_size(self):
        T = self.t("mps")
        sub = self.client("sub", properties=cprops(MaximumPacketSize=200))
        sub.subscribe(T, 1)
        pub = self.client("pub")
        pub.publish(T, b"B" * 1000, qos=1)
        pub.publish(T, b"small", qos=1)
        sub.wait_msgs(1, T, lambda m: m.payload == b"small")
        sub.settle()
        self.assertPayloads(sub.messages(T), [b"small"])
        self.assertTrue(sub.connected, "oversized message dropped, connection kept")

    def test_v5_shared_subscription(self):
        T = self.t("sh")
        g = f"g{RUN}"
        m1 = self.client("m1")
        m2 = self.client("m2")
        self.assertNotEqual(pget(m1.connack_props, "SharedSubscriptionAvailable", 1), 0)
        self.assertEqual(m1.subscribe(f"$share/{g}/{T}", 1), [1])
        self.assertEqual(m2.subscribe(f"$share/{g}/{T}", 1), [1])
        pub = self.client("pub")
        n = 20
        for i in range(n):
            pub.publish(T, f"s{i:02d}".encode(), qos=1)
        wait_until(lambda: len(m1.messages()) + len(m2.messages()) >= n,
                   what=f"{n} shared messages")
        m1.settle()
        got = [m.payload for m in m1.messages() + m2.messages()]
        self.assertEqual(sorted(got), [f"s{i:02d}".encode() for i in range(n)],
                         "each message delivered to exactly one member")
        self.assertGreater(len(m1.messages()), 0)
        self.assertGreater(len(m2.messages()), 0)
        self.assertTrue(all(m.topic == T for m in m1.messages() + m2.messages()))
        self.note(f"split {len(m1.messages())}/{len(m2.messages())}")

    def test_v5_assigned_client_identifier(self):
        c = self.client("anon", client_id="", clean_start=True)
        aci = pget(c.connack_props, "AssignedClientIdentifier")
        self.assertIsInstance(aci, str)
        self.assertTrue(len(aci) > 0, "AssignedClientIdentifier must be non-empty")
        c.subscribe(self.t("x"), 1)
        c.publish(self.t("x"), b"ok", qos=1)
        self.assertEqual(c.wait_msgs(1)[0].payload, b"ok")

    def test_v5_will_delay(self):
        W = self.t("will")
        watch = self.client("watch")
        watch.subscribe(W, 1)
        cid = self.persistent(self.cid("wd"), V5)
        wc = self.client("wd", client_id=cid, properties=cprops(SessionExpiryInterval=10),
                         will=(W, b"delayed", 1, False,
                               props(PacketTypes.WILLMESSAGE, WillDelayInterval=2)))
        t0 = wc.kill()
        m = watch.wait_msgs(1, W)[0]
        dt = m.t - t0
        self.assertEqual((m.payload, m.qos), (b"delayed", 1))
        self.assertGreaterEqual(dt, 1.5, f"will sent after {dt:.2f}s, before the 2s delay")
        self.assertLessEqual(dt, 6.0, f"will sent after {dt:.2f}s, long after the 2s delay")
        self.note(f"will after {dt:.2f}s")

    def test_v5_invalid_filter_rejected(self):
        # "a/#/b" is not a valid Topic Filter [MQTT-4.7.1-1]. The spec allows either
        # a SUBACK failure code (>= 0x80; then the connection stays usable) or
        # treating the SUBSCRIBE as a Malformed Packet / Protocol Error and closing
        # the connection (DISCONNECT >= 0x80 optional).  It must never be granted.
        # relaybox's stricter choice is checked by test_v5_policy_invalid_filter_suback.
        c = self.client("c")
        mid = c.subscribe_raw(self.t("a/#/b"), 1)
        c._wait(lambda: mid in c.subacks or c.disconnected is not None, "SUBACK or close")
        if mid in c.subacks:
            codes = c.subacks[mid][0]
            self.assertEqual(len(codes), 1)
            self.assertGreaterEqual(codes[0], 0x80, f"SUBACK 0x{codes[0]:02x} granted a/#/b")
            c.subscribe(self.t("ok"), 1)
            c.publish(self.t("ok"), b"still usable", qos=1)
            self.assertEqual(c.wait_msgs(1)[0].payload, b"still usable")
            self.note(f"SUBACK 0x{codes[0]:02x}, connection kept")
        else:
            rc = c.server_disconnect
            if rc is not None:
                self.assertGreaterEqual(rc, 0x80, f"server DISCONNECT reason 0x{rc:02x}")
                self.note(f"server sent DISCONNECT 0x{rc:02x} and closed")
            else:
                self.note("server closed the connection without DISCONNECT")

    def test_v5_request_response(self):
        REQ, RESP = self.t("req"), self.t("resp")
        resp = self.client("responder")

        def answer(cli, m):
            rt = pget(m.props, "ResponseTopic")
            cd = pget(m.props, "CorrelationData")
            if rt:
                kw = {"CorrelationData": cd} if cd is not None else {}
                cli.c.publish(rt, b"pong:" + m.payload, 1, False, pprops(**kw))
        resp.on_msg_hook = answer
        resp.subscribe(REQ, 1)
        req = self.client("requester", properties=cprops(RequestResponseInformation=1))
        req.subscribe(RESP, 1)
        req.publish(REQ, b"ping", qos=1,
                    properties=pprops(ResponseTopic=RESP, CorrelationData=b"id-42"))
        m = req.wait_msgs(1, RESP)[0]
        self.assertEqual(m.payload, b"pong:ping")
        self.assertEqual(pget(m.props, "CorrelationData"), b"id-42")
        ri = pget(req.connack_props, "ResponseInformation")
        self.note(f"ResponseInformation={ri!r}")


class RelayboxPolicy(Base):
    """Behaviour relaybox wants where the specification leaves a choice (MAY).
    Excluded with --spec-only (e.g. when validating against a reference broker)."""

    def test_v311_policy_unicode_client_id(self):
        # 3.1.1 servers MUST accept 1..23 chars [0-9a-zA-Z] and MAY accept others
        # [MQTT-3.1.3-5]; relaybox accepts any valid UTF-8 client id.
        cid = f"{RUN}-ü/ä+x"
        c = self.client("uni", V3, client_id=cid)
        self.assertEqual(c.connack[1], 0, "client id 'ü/ä+x' accepted")
        c.subscribe(self.t("u"), 1)
        c.publish(self.t("u"), b"ok", qos=1)
        self.assertEqual(c.wait_msgs(1)[0].payload, b"ok")

    def test_v311_policy_invalid_filter_suback(self):
        # 3.1.1: SUBACK 0x80 for an invalid filter, the connection kept (the
        # specification also allows closing it [MQTT-4.8.0-1]).
        c = self.client("c", V3)
        mid = c.subscribe_raw(self.t("a/#/b"), 1)
        c._wait(lambda: mid in c.subacks or c.disconnected is not None, "SUBACK for a/#/b")
        self.assertIsNone(c.disconnected, "the connection is kept")
        self.assertEqual(c.subacks[mid][0], [0x80], "SUBACK 0x80 failure")
        c.subscribe(self.t("ok"), 1)
        c.publish(self.t("ok"), b"still usable", qos=1)
        self.assertEqual(c.wait_msgs(1)[0].payload, b"still usable")


    def test_v5_policy_keep_alive_timeout_disconnect(self):
        # A client silent for 1.5 x its keep alive is disconnected [MQTT-3.1.2-22];
        # relaybox says why first, with DISCONNECT 0x8D (keep alive timeout).
        c = self.client("silent", keepalive=1)
        c.pause()
        time.sleep(2.5)
        c.resume()
        c._wait(lambda: c.disconnected is not None,
                "the server closing a connection silent for 1.5 x keep alive", timeout=5)
        self.assertEqual(c.server_disconnect, 0x8D, "DISCONNECT 0x8D keep alive timeout")

    def test_v5_policy_invalid_filter_suback(self):
        # relaybox answers an invalid filter with a SUBACK failure code and keeps
        # the connection (the spec also allows closing it, see
        # test_v5_invalid_filter_rejected).
        c = self.client("c")
        mid = c.subscribe_raw(self.t("a/#/b"), 1)
        c._wait(lambda: mid in c.subacks or c.disconnected is not None, "SUBACK for a/#/b")
        if c.disconnected is not None:
            rc = c.server_disconnect
            how = f"DISCONNECT 0x{rc:02x}" if rc is not None else "no DISCONNECT"
            self.fail(f"server closed the connection ({how}) instead of answering SUBACK "
                      "with a failure code")
        codes = c.subacks[mid][0]
        self.assertEqual(len(codes), 1)
        self.assertGreaterEqual(codes[0], 0x80, f"SUBACK reason 0x{codes[0]:02x} must be a failure")
        c.subscribe(self.t("ok"), 1)
        c.publish(self.t("ok"), b"still usable", qos=1)
        self.assertEqual(c.wait_msgs(1)[0].payload, b"still usable")
        self.note(f"SUBACK 0x{codes[0]:02x}")


# --------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------

class LineResult(unittest.TestResult):
    def __init__(self, out):
        super().__init__()
        self.out = out
        self.passed = 0
        self._t0 = 0.0
        self.details = []

    def startTest(self, test):
        super().startTest(test)
        self._t0 = time.monotonic()

    def _line(self, test, status, extra=""):
        dt = time.monotonic() - self._t0
        notes = getattr(test, "notes", None)
        n = f" [{'; '.join(notes)}]" if notes else ""
        self.out.write(f"{status:4} {test._testMethodName} ({dt:.2f}s){n}{extra}\n")
        self.out.flush()

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed += 1
        self._line(test, "PASS")

    def _short(self, err):
        msg = str(err[1]).strip().splitlines()
        return msg[0][:300] if msg else err[0].__name__

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._line(test, "FAIL", " -- " + self._short(err))
        self.details.append((test, err))

    def addError(self, test, err):
        super().addError(test, err)
        self._line(test, "ERR", " -- " + f"{err[0].__name__}: {self._short(err)}")
        self.details.append((test, err))

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._line(test, "SKIP", " -- " + reason)


def main(argv=None):
    global HOST, PORT, QUIET
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("-k", action="append", default=[], metavar="PATTERN",
                    help="only run tests whose name contains PATTERN (or matches it as a "
                         "glob); repeatable")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="hard bound for the whole run in seconds (default 300)")
    ap.add_argument("--quiet-period", type=float, default=QUIET,
                    help="seconds to wait when asserting that nothing more arrives")
    ap.add_argument("--spec-only", action="store_true",
                    help="leave out RelayboxPolicy tests (behaviour the spec leaves open); "
                         "use when validating against a reference broker")
    ap.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failures")
    args = ap.parse_args(argv)
    HOST, PORT, QUIET = args.host, args.port, args.quiet_period

    res = LineResult(sys.stdout)

    def watchdog():
        done = res.passed + len(res.failures) + len(res.errors)
        sys.stdout.write(f"\nABORT: whole run exceeded {args.timeout:.0f}s "
                         f"({suite.countTestCases() - done} test(s) not finished)\n")
        sys.stdout.write(f"{res.passed} passed, {suite.countTestCases() - res.passed} failed\n")
        sys.stdout.flush()
        os._exit(3)
    wd = threading.Timer(args.timeout, watchdog)
    wd.daemon = True

    loader = unittest.TestLoader()
    if args.k:
        loader.testNamePatterns = [p if any(ch in p for ch in "*?[") else f"*{p}*" for p in args.k]
    suite = unittest.TestSuite()
    suite.addTests(loader.loadTestsFromTestCase(V311))
    suite.addTests(loader.loadTestsFromTestCase(V5Tests))
    if not args.spec_only:
        suite.addTests(loader.loadTestsFromTestCase(RelayboxPolicy))
    print(f"relaybox interop conformance: broker {HOST}:{PORT}, run token {RUN}, "
          f"paho-mqtt {paho.mqtt.__version__}, "
          f"{suite.countTestCases()} tests")
    t0 = time.monotonic()
    wd.start()
    suite.run(res)
    dt = time.monotonic() - t0
    wd.cancel()
    if args.verbose and res.details:
        print()
        for test, err in res.details:
            print(f"--- {test._testMethodName}")
            print("".join(traceback.format_exception(*err)))
    failed = len(res.failures) + len(res.errors)
    skipped = len(res.skipped)
    print(f"run time {dt:.1f}s")
    print(f"{res.passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    return 0 if failed == 0 and res.testsRun > 0 and res.passed == res.testsRun else 1


if __name__ == "__main__":
    sys.exit(main())
