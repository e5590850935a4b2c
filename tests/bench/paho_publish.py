#!/usr/bin/env python3
"""Baseline for `bench forward`: the seed agent's transport.

paho-mqtt publishes the same batch payloads with QoS 1, as fast as its in-flight window allows,
with no durability (nothing on disk) and no cloud (nobody acks end to end). Timed from the first
publish to the last PUBACK. Prints one JSON line: {"seconds": S, "acked": N, "cpu_seconds": C},
C being this process's CPU time (user + system, all threads) over the same span.

usage: paho_publish.py HOST PORT PAYLOAD_FILE INFLIGHT TOPIC
"""
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt

host, port, path, inflight, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
with open(path, "rb") as f:
    payloads = [line.rstrip(b"\n") for line in f if line.strip()]

done = threading.Event()
connected = threading.Event()
acked = 0


def on_publish(client, userdata, mid, *rest):
    global acked
    acked += 1
    if acked == len(payloads):
        done.set()


def on_connect(client, userdata, flags, *rest):
    connected.set()


try:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-bench")
except AttributeError:  # paho-mqtt 1.x
    client = mqtt.Client(client_id="paho-bench")
client.max_inflight_messages_set(inflight)
client.max_queued_messages_set(0)
client.on_publish = on_publish
client.on_connect = on_connect
client.connect(host, port)
client.loop_start()
if not connected.wait(10):
    sys.exit("paho: no CONNACK within 10 s")
start = time.perf_counter()
cpu_start = time.process_time()
for p in payloads:
    client.publish(topic, p, qos=1)
if not done.wait(600):
    sys.exit(f"paho: only {acked} of {len(payloads)} PUBACKs within 600 s")
seconds = time.perf_counter() - start
cpu_seconds = time.process_time() - cpu_start
client.loop_stop()
print(json.dumps({"seconds": seconds, "acked": acked, "cpu_seconds": cpu_seconds}))
