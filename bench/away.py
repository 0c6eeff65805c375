"""What a device that was away for R rounds downloads when it comes back, by the QoS it subscribes `global` and
`round` with.

    python -m bench.away                     # R = 20, ViT-B/32 rank-8 fp32 globals (1.5 MiB), QoS 1 and 0

A private mosquitto (the sim's and tests' config: `max_queued_messages 1000`); a device with a persistent
session (clean_start false, session expiry 1 h, the agent's transport `flora.edge.mqtt`) subscribes, takes
the current global, and disconnects; an aggregator stand-in then publishes R rounds as flora-aggregator
does (`global` then `round`, retained, QoS 1); the device reconnects and subscribes again, as the agent does
on every connection, and the bytes it receives until 3 s pass without a message are counted.

At QoS 1 the broker queued every global and round message published while the device was away and
delivers all of them, then the retained copies its new subscription asks for; at QoS 0 nothing is queued
for an offline device and the re-subscription brings the retained `global` and `round` once: the current
ones. Writes bench/results/away.json and away.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
FEDERATION = "away"


class Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_topic: Dict[str, List[int]] = {}
        self.rounds: List[int] = []
        self.last = time.monotonic()

    def on_message(self, client, userdata, msg) -> None:
        from flora.edge import adapter

        with self.lock:
            self.by_topic.setdefault(msg.topic.rsplit("/", 1)[-1], []).append(len(msg.payload))
            if msg.topic.endswith("/global"):
                self.rounds.append(int(adapter.read_header(msg.payload)[1]["round"]))
            self.last = time.monotonic()

    def reset(self) -> None:
        with self.lock:
            self.by_topic, self.rounds = {}, []
            self.last = time.monotonic()  # quiet is counted from now, not from the last message before

    def quiet_for(self, seconds: float, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() - self.last < seconds and time.monotonic() < deadline:
            time.sleep(0.1)


def measure(qos: int, rounds: int, manifest, workdir: Path) -> Dict:
    """One device away for `rounds` rounds, subscribed as the agent is (`Topics.downlink`) but at `qos`."""
    from flora.broker.mosquitto import start_mosquitto
    from flora.edge import adapter
    from flora.edge.fileio import sha256_bytes
    from flora.edge.mqtt import BrokerConfig, Connection, make_client
    from flora.edge.protocol import RoundAnnouncement, Topics, TrainConfig
    from flora.edge.synthetic import random_adapter

    topics = Topics(FEDERATION)
    broker = start_mosquitto(workdir / f"mosquitto-qos{qos}", anonymous=True)  # loopback, no credentials
    try:
        cfg = BrokerConfig.from_url(broker.url)
        server = make_client(cfg, "aggregator")
        server_conn = Connection(cfg, server)
        server_conn.start()

        def publish_round(r: int) -> None:
            blob = adapter.encode(random_adapter(manifest, r, scale=0.01), model_id=manifest.model_id, round=r,
                                  kind="global")
            ann = RoundAnnouncement(r, manifest.model_id, "training", TrainConfig(), ["device"], time.time() + 300,
                                    sha256_bytes(blob), rounds + 1)
            server.publish(topics.global_, blob, qos=1, retain=True).wait_for_publish(30)
            server.publish(topics.round, ann.to_json(), qos=1, retain=True).wait_for_publish(30)

        publish_round(0)
        counter = Counter()
        device = make_client(cfg, "device")
        device.on_message = counter.on_message
        subscribe = [(topic, qos) for topic, _ in topics.downlink()]  # the agent's own subscriptions, at `qos`
        conn = Connection(cfg, device, on_connected=lambda c: c.subscribe(subscribe))
        conn.start()
        counter.quiet_for(1.0)
        first = sum(map(sum, counter.by_topic.values()))
        conn.stop()  # away: the broker keeps the session (and, at QoS 1, queues for it)
        for r in range(1, rounds + 1):
            publish_round(r)
        counter.reset()
        t0 = time.monotonic()
        device2 = make_client(cfg, "device")  # the same client id: the same session
        device2.on_message = counter.on_message
        conn2 = Connection(cfg, device2, on_connected=lambda c: c.subscribe(subscribe))
        conn2.start()
        counter.quiet_for(3.0)
        conn2.stop()
        server_conn.stop()
        with counter.lock:
            got = {k: (len(v), sum(v)) for k, v in counter.by_topic.items()}
            received_rounds = list(counter.rounds)
        return {"qos": qos, "rounds_away": rounds, "global_bytes": len(adapter.encode(
                    random_adapter(manifest, 0), model_id=manifest.model_id, round=0, kind="global")),
                "bytes_at_first_connect": first,
                "messages": {k: n for k, (n, _) in got.items()}, "bytes": {k: b for k, (_, b) in got.items()},
                "bytes_total": sum(b for _, b in got.values()), "global_rounds_received": received_rounds,
                "latest_global_received": rounds in received_rounds,
                "seconds_to_quiet": round(time.monotonic() - t0 - 3.0, 2)}
    finally:
        broker.stop()


def markdown(result: Dict) -> str:
    lines = ["# A device away for a number of rounds", "", f"Command: `{result['command']}`.",
             f"Global adapter: {result['adapter']}.", "",
             "| subscription QoS of global, round | globals received | round messages | bytes downloaded "
             "| has the latest global |", "| --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['qos']} | {r['messages'].get('global', 0)} | {r['messages'].get('round', 0)} "
                     f"| {r['bytes_total'] / 2**20:.1f} MiB | {'yes' if r['latest_global_received'] else 'NO'} |")
    if len(result["rows"]) == 2:
        a, b = (r["bytes_total"] for r in result["rows"])
        lines += ["", f"After {result['rows'][0]['rounds_away']} rounds away: {a / 2**20:.1f} MiB at QoS "
                  f"{result['rows'][0]['qos']}, {b / 2**20:.1f} MiB at QoS {result['rows'][1]['qos']} "
                  f"({a / max(b, 1):.0f}x less)."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--qos", default="1,0", help="comma-separated subscription QoS values to measure (the agent "
                                                "subscribes at flora.edge.protocol.DOWNLINK_QOS, 0; it did at 1)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    from flora.edge.synthetic import vitb32_manifest

    manifest = vitb32_manifest()
    result = {"command": "python -m bench.away " + " ".join(argv if argv is not None else sys.argv[1:]),
              "adapter": "ViT-B/32 text tower, rank 8 on q, k, v, out, fp32", "rows": [],
              "load": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        for qos in (int(q) for q in args.qos.split(",")):
            result["rows"].append(measure(qos, args.rounds, manifest, Path(tmp)))
            print(json.dumps(result["rows"][-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "away.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "away.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
