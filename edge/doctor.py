"""`flora-agent doctor`: can this device run the agent for this bundle? Plain verdict lines, exit 0 if so.

It reports Python and platform, onnxruntime and its providers, the trainer backend the bundle can
use here, a timed training step on random input at the configured batch size, the memory that step
needed against what the device has free (with a batch size that fits), and whether the broker
answers.
"""

from __future__ import annotations

import argparse
import platform
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from .training import peak_rss_mb


@dataclass
class Report:
    lines: List[str] = field(default_factory=list)
    failures: int = 0
    warnings: int = 0

    def ok(self, what: str, detail: str) -> None:
        self.lines.append(f"OK    {what:10s} {detail}")

    def info(self, what: str, detail: str) -> None:
        self.lines.append(f"INFO  {what:10s} {detail}")

    def warn(self, what: str, detail: str) -> None:
        self.warnings += 1
        self.lines.append(f"WARN  {what:10s} {detail}")

    def fail(self, what: str, detail: str) -> None:
        self.failures += 1
        self.lines.append(f"FAIL  {what:10s} {detail}")

    def emit(self, line_out=print) -> None:
        for line in self.lines:
            line_out(line)
        self.lines.clear()


def available_memory_mb() -> Optional[float]:
    """MemAvailable from /proc/meminfo (Linux), in MiB."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def suggest_batch(peak_1: float, peak_n: float, n: int, available: float, baseline: float) -> int:
    """Largest power-of-two batch whose linear memory estimate stays within 80 % of `available`.

    `peak_1`/`peak_n` are process peaks after a step at batch 1 and n, `baseline` the peak before.
    """
    per_sample = max((peak_n - peak_1) / max(n - 1, 1), 0.05)
    fixed = max(peak_1 - baseline, 0.0)
    budget = 0.8 * available - fixed
    if budget <= per_sample:
        return 1
    batch = 1
    while batch * 2 * per_sample <= budget and batch < 1024:
        batch *= 2
    return batch


def check_broker(url: str, args: argparse.Namespace, timeout: float = 5.0) -> str:
    from .mqtt import BrokerConfig, Connection, make_client

    cfg = BrokerConfig.from_url(url, username=args.username, password=args.password, ca_file=args.tls_ca,
                                cert_file=args.tls_cert, key_file=args.tls_key)
    with socket.create_connection((cfg.host, cfg.port), timeout=timeout):
        pass  # a refused or unroutable address fails here, with the operating system's reason
    client = make_client(cfg, f"flora-doctor-{int(time.time())}")
    conn = Connection(cfg, client)
    t0 = time.perf_counter()
    conn.start(timeout=timeout)
    dt = time.perf_counter() - t0
    conn.stop()
    return f"{cfg.describe()} accepted an MQTT 5 connection in {1e3 * dt:.0f} ms"


def run_doctor(args: argparse.Namespace, out=print) -> int:
    from .bundle import BundleError, load_bundle
    from .ort import has_training_api, import_onnxruntime
    from .trainers import TrainerError, available_backends, open_trainer

    r = Report()
    r.info("python", f"{platform.python_version()} on {platform.system()} {platform.machine()} "
                     f"({platform.platform(terse=True)})")
    try:
        ort = import_onnxruntime()
        r.ok("runtime", f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}, "
                        f"training API {'present' if has_training_api() else 'absent'}")
    except ImportError as exc:
        r.fail("runtime", f"onnxruntime does not import: {exc}")
        r.emit(out)
        out("VERDICT: not ready (install the edge extra: pip install 'flora-edge[edge]')")
        return 1
    if not args.bundle:
        r.fail("bundle", "no --bundle given")
        r.emit(out)
        out("VERDICT: not ready")
        return 1
    baseline = peak_rss_mb()
    try:
        unverified = load_bundle(args.bundle, verify=False)
        usable = available_backends(unverified)
        backend = args.backend if args.backend != "auto" else (usable[0] if usable else "auto")
        bundle = load_bundle(args.bundle, backends=[backend] if backend != "auto" else None)
        m = bundle.manifest
        r.ok("bundle", f"{bundle.root}: {m.preset}, LoRA {m.lora.tower} tower rank {m.lora.rank}, "
                       f"{m.num_classes} classes, files verified")
        r.info("backends", f"bundle holds {list(m.backends)}; usable here: {usable or 'none'}")
        trainer = open_trainer(bundle, backend, threads=args.threads, providers=args.providers)
        r.ok("trainer", f"{trainer.name}")
    except (BundleError, TrainerError, ValueError) as exc:
        r.fail("bundle", str(exc))
        r.emit(out)
        out(f"VERDICT: not ready ({r.failures} problem{'s' if r.failures != 1 else ''})")
        return 1

    rng = np.random.default_rng(0)
    batch = max(1, int(args.batch_size))

    def step(n: int) -> float:
        x = rng.standard_normal(m.input_shape(n)).astype(np.float32)
        y = rng.integers(0, m.num_classes, n)
        t0 = time.perf_counter()
        result = trainer.train_step(x, y)
        if not np.isfinite(result.loss):
            raise TrainerError(f"the training step gave a non-finite loss {result.loss}")
        return time.perf_counter() - t0

    try:
        step(1)
        peak_1 = peak_rss_mb()
        step(batch)  # warm-up at the real size
        seconds = step(batch)
        peak_n = peak_rss_mb()
        r.ok("step", f"one training step at batch {batch}: {1e3 * seconds:.1f} ms ({batch / seconds:.1f} samples/s)")
    except Exception as exc:
        r.fail("step", f"training step failed: {exc}")
        r.emit(out)
        out(f"VERDICT: not ready ({r.failures} problem{'s' if r.failures != 1 else ''})")
        return 1

    available = available_memory_mb()
    if available is None:
        r.warn("memory", f"training peak {peak_n:.0f} MiB at batch {batch}; free memory unknown on this OS")
    else:
        fits = suggest_batch(peak_1, peak_n, batch, available + peak_n, baseline)
        detail = (f"training peak {peak_n:.0f} MiB (process) at batch {batch}; {available:.0f} MiB still available; "
                  f"a batch that fits: {fits}")
        if peak_n > 0.9 * (available + peak_n):
            r.fail("memory", detail)
        elif fits < batch:
            r.warn("memory", detail)
        else:
            r.ok("memory", detail)

    broker = getattr(args, "broker", None)
    if broker:
        try:
            r.ok("broker", check_broker(broker, args))
        except Exception as exc:  # connection refused, TLS, auth: all are a verdict, not a crash
            r.fail("broker", f"{broker}: {exc}")
    else:
        r.info("broker", "not checked (no --broker)")
    r.emit(out)
    if r.failures:
        out(f"VERDICT: not ready ({r.failures} problem{'s' if r.failures != 1 else ''})")
        return 1
    out(f"VERDICT: ready{f' ({r.warnings} warning' + ('s' if r.warnings != 1 else '') + ')' if r.warnings else ''}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    sys.exit(main(["doctor", *sys.argv[1:]]))
