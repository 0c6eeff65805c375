"""Many virtual clients in one process, for `flora-sim --clients N --processes P` (N > P).

    python -m flora.sim.host --bundle DIR --clients-file clients.json

`clients.json` is a list of `flora-agent run` argument lists, one per client. Each client is a real
`flora.edge.agent.Agent`, with its own data, state dir, feature cache and MQTT connection (client id,
session, last will), exactly as `flora-agent` would run it; what they share is the process's one ONNX
Runtime session: a `SharedStepTrainer` (the `step` backend), from which each client gets its own
weights, AdamW moments and step count before every call, so its results are those it would have in a
process of its own. The clients take turns on the main thread (one trains at a time, as P processes
on P cores would run P at a time); each one's MQTT traffic runs on its own paho thread.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

from flora.edge.agent import Agent
from flora.edge.bundle import load_bundle
from flora.edge.cli import agent_config, build_parser
from flora.edge.trainers.shared import SharedStepTrainer

log = logging.getLogger("flora.sim.host")


def open_clients(bundle_dir: Path, argvs: List[List[str]], threads: int = 1) -> List[Agent]:
    """One Agent per argument list, all on one shared step session."""
    bundle = load_bundle(bundle_dir, backends=["step"])
    shared = SharedStepTrainer(bundle, threads=threads)
    parser = build_parser()
    agents = []
    for argv in argvs:
        args = parser.parse_args(["run", *argv])
        cfg = agent_config(args)
        agents.append(Agent.open(cfg, parts=(bundle, shared.client())))
    return agents


def serve(agents: List[Agent], stop: Optional[List[bool]] = None) -> None:
    """Connect every client, then let each handle its messages and train in turn until all are done."""
    for agent in agents:
        agent.connection.start(timeout=agent.cfg.connect_timeout_s)
    active = list(agents)
    try:
        while active and not (stop and stop[0]):
            busy = False
            for agent in list(active):
                before = agent.state.last_submitted_round
                if not agent.pump(0.0) or agent.stop_event.is_set():
                    active.remove(agent)
                    agent.shutdown()
                busy = busy or agent.state.last_submitted_round != before
            if not busy:
                time.sleep(0.02)
    finally:
        for agent in active:
            agent.shutdown()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="flora-sim-host", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--clients-file", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads of the shared session")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argvs = json.loads(args.clients_file.read_text())
    agents = open_clients(args.bundle, argvs, args.threads)
    log.info("%d virtual clients share one step session", len(agents))
    stop = [False]

    def _stop(signum, frame) -> None:
        stop[0] = True
        for agent in agents:
            agent.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    serve(agents, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
