"""A secure-aggregation federation in one process: the enrolled clients' and the aggregator's pure state
machines, wired by a message router with a fake clock and scripted dropouts. Used by bench/secagg.py
(the server side of 1,000 clients) and by the tests (small versions of the same code paths)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
from cryptography.hazmat.primitives import serialization

from flora.broker.enroll import FederationPKI
from flora.broker.secagg.server import Outcome, SecAggServer
from flora.edge import signing
from flora.edge.identity import DeviceIdentity
from flora.edge.secagg.client import Refused, SecAggClient
from flora.edge.secagg.messages import ADVERTISE, MASKED, REVEAL, SHARE, UNMASK, StageMsg
from flora.edge.secagg.params import SecAggParams
from flora.edge.secagg.primitives import Context

#: CPU seconds of this process: every call measured is single-threaded, so this is the call's own cost even
#: on a busy machine (wall time counts the other processes' turns too)
cpu = time.process_time

#: a client scripted to drop stops answering from this stage on (ADVERTISE: never advertises)
DROP_STAGES = (ADVERTISE, SHARE, MASKED, UNMASK, REVEAL)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class SimFederation:
    federation: str
    pki: FederationPKI
    identities: Dict[str, DeviceIdentity]
    registry: Dict[str, object]
    ca: object
    signer: object

    @property
    def clients(self) -> List[str]:
        return sorted(self.identities)


def make_federation(state_dir: Path, n: int, federation: str = "sim", prefix: str = "dev") -> SimFederation:
    """A CA and n identities issued in memory (no per-device files: fast at 1,000 devices)."""
    pki = FederationPKI(state_dir, federation)
    pki.ensure()
    identities, registry = {}, {}
    for i in range(n):
        dev = f"{prefix}{i:05d}"
        key, cert = pki.issue_identity(dev)
        identities[dev] = DeviceIdentity(dev, federation, key, cert.public_bytes(serialization.Encoding.DER))
        registry[dev] = key.public_key()
    ca, _ = pki.ca()
    return SimFederation(federation, pki, identities, registry, ca, pki.signer())


@dataclass
class Traffic:
    """Time and bytes of one attempt, by side."""

    server_s: float = 0.0
    client_s: Dict[str, float] = field(default_factory=dict)
    bytes_up: Dict[str, int] = field(default_factory=dict)  # client -> bytes it sent
    bytes_down: Dict[str, int] = field(default_factory=dict)  # client -> bytes sent to it (stage + inbox)
    refusals: Dict[str, str] = field(default_factory=dict)
    rejections: List[Tuple[str, str]] = field(default_factory=list)
    clients: Dict[str, SecAggClient] = field(default_factory=dict)  # the clients' state machines


def run_attempt(fed: SimFederation, params: SecAggParams, deltas: Mapping[str, np.ndarray],
                weights: Mapping[str, int], *, round_number: int = 0, attempt: int = 0,
                drops: Optional[Mapping[str, str]] = None, run_id: str = "sim", tamper=None,
                clock: Optional[FakeClock] = None, watch=None,
                noises: Optional[Mapping[str, np.ndarray]] = None) -> Tuple[Outcome, SecAggServer, Traffic]:
    """One attempt with every client of `deltas` asked; `drops[c] = stage`: c stops answering at that stage;
    `noises[c]`: c's integer noise share (distributed DP), added before masking.

    `tamper(kind, client, payload) -> payload` may rewrite any message in flight (a hostile broker);
    `watch(server, clients)` is called after every message the server handles and every step."""
    drops = dict(drops or {})
    clock = clock or FakeClock()
    ctx = Context(fed.federation, run_id, round_number, attempt)
    asked = set(deltas)
    length = len(next(iter(deltas.values()))) + 1
    traffic = Traffic()
    t0 = cpu()
    server = SecAggServer(ctx, params, asked, fed.registry, fed.signer, length, clock() + 600.0, clock)
    out = server.start()
    traffic.server_s += cpu() - t0
    clients = traffic.clients
    aggregator_key = fed.signer.public_key()
    tamper = tamper or (lambda kind, client, payload: payload)
    watch = watch or (lambda server, clients: None)

    def send_up(client: str, payload: Optional[bytes]) -> None:
        if payload is None:
            return
        payload = tamper("up", client, payload)
        traffic.bytes_up[client] = traffic.bytes_up.get(client, 0) + len(payload)
        t = cpu()
        server.handle(client, payload)
        traffic.server_s += cpu() - t
        watch(server, clients)

    def alive(client: str, stage: str) -> bool:
        d = drops.get(client)
        return d is None or DROP_STAGES.index(stage) < DROP_STAGES.index(d)

    def client_call(client: str, fn, *args):
        t = cpu()
        try:
            return fn(*args)
        except Refused as exc:
            traffic.refusals[client] = exc.reason
            return None
        finally:
            traffic.client_s[client] = traffic.client_s.get(client, 0.0) + cpu() - t

    outcome = None
    for _ in range(20):
        deliver = out
        for msg in deliver:
            if msg.kind == "stage":
                stage = StageMsg.from_body(signing.body_of(msg.payload), ctx).stage
                for c in sorted(asked):
                    if not alive(c, stage if stage in DROP_STAGES else REVEAL):
                        continue
                    payload = tamper("stage", c, msg.payload)
                    traffic.bytes_down[c] = traffic.bytes_down.get(c, 0) + len(payload)
                    if stage == ADVERTISE:
                        sc = client_call(c, SecAggClient, ctx, fed.identities[c], fed.ca, aggregator_key, params,
                                         deltas[c], weights[c], clock, (noises or {}).get(c))
                        if sc is not None:
                            clients[c] = sc
                            send_up(c, client_call(c, sc.advertise))
                    elif c in clients:
                        send_up(c, client_call(c, clients[c].on_stage, payload))
            else:
                c = msg.client
                stage_now = server.stage
                if c in clients and alive(c, stage_now):
                    payload = tamper("inbox", c, msg.payload)
                    traffic.bytes_down[c] = traffic.bytes_down.get(c, 0) + len(payload)
                    send_up(c, client_call(c, clients[c].on_inbox, payload))
        t = cpu()
        out, outcome = server.step()
        if not out and outcome is None:  # someone is missing: let the stage time out
            clock.now = server.deadline + 0.001
            out, outcome = server.step()
        traffic.server_s += cpu() - t
        watch(server, clients)
        if outcome is not None:
            break
    for msg in out:  # the last messages (an abort) reach every client still there
        if msg.kind == "stage":
            for c in sorted(clients):
                if alive(c, REVEAL):
                    send_up(c, client_call(c, clients[c].on_stage, msg.payload))
    traffic.rejections = [(r.client, r.reason) for r in server.rejections]
    return outcome, server, traffic
