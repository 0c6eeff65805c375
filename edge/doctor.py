"""`flora-agent doctor`: can this device run the agent for this bundle? Plain verdict lines, exit 0 if so.

Checks, in order: Python and platform; onnxruntime and its providers; the bundle and the trainer
backends usable here; the broker, whose retained `round` message gives the federation's batch size
(else --batch-size is checked). Then short child processes, each doing one phase of the agent's work
from a fresh start so that its peak RSS is that phase's alone, measure what the agent will hold: the
trainer's step at the configured batch (timed) and at a smaller one (the per-sample cost), and in
text mode the trainer next to the image encoder computing a batch of features. The verdict compares
that with the memory available to the agent and suggests the largest batch that fits with a margin.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .errors import FloraError
from .mqtt import BrokerConfig
from .training import peak_rss_mb

MARGIN = 0.8  # a suggested batch keeps the agent's peak within 80 % of the memory available to it
RESOLUTION_MB = 2.0  # peak RSS differences below this are allocator noise, not a per-sample cost
MAX_SUGGESTED_BATCH = 4096
FEATURE_BATCH = 32  # the agent's image-encoder batch (AgentConfig.feature_batch_size)
ROUND_WAIT_S = 2.0  # how long to wait for the retained round message after the subscription
PROBE_TIMEOUT_S = 1800.0
PROBE_MARK = "FLORA_DOCTOR_PROBE "
GPU_PROVIDERS = ("cuda", "tensorrt", "trt", "CUDAExecutionProvider", "TensorrtExecutionProvider")


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

    def verdict(self) -> str:
        if self.failures:
            return f"VERDICT: not ready ({_count(self.failures, 'problem')})"
        return "VERDICT: ready" + (f" ({_count(self.warnings, 'warning')})" if self.warnings else "")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


# -- memory ------------------------------------------------------------------------------------
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


def own_memory_mb() -> Optional[float]:
    """This process's resident memory that is not file-backed (statm resident - shared), in MiB:
    what the doctor gives back when it exits."""
    try:
        with open("/proc/self/statm") as fh:
            fields = fh.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        return None


@dataclass(frozen=True)
class MemoryModel:
    """The agent's peak RSS as a function of the training batch, from probes at two batch sizes.

    need(b) = max(features_mb, fixed_mb + per_sample_mb * b). When the two peaks differ by less than
    RESOLUTION_MB the per-sample cost is not measurable; it is then bounded from above by
    RESOLUTION_MB / (b2 - b1), which makes need(b) an upper bound for batches above b2.
    """

    fixed_mb: float
    per_sample_mb: float
    features_mb: float = 0.0
    measured: bool = True

    def need(self, batch: int) -> float:
        return max(self.features_mb, self.fixed_mb + self.per_sample_mb * batch)


def memory_model(b1: int, peak1: float, b2: int, peak2: float, features_mb: float = 0.0) -> MemoryModel:
    """Fit the step phase's peak RSS at batches b1 < b2; `features_mb`: the image-encoder phase's peak."""
    if b2 <= b1:
        raise ValueError(f"need two batch sizes b1 < b2, got {b1} and {b2}")
    measured = peak2 - peak1 >= RESOLUTION_MB
    per_sample = (peak2 - peak1) / (b2 - b1) if measured else RESOLUTION_MB / (b2 - b1)
    return MemoryModel(peak2 - per_sample * b2, per_sample, features_mb, measured)


def suggest_batch(model: MemoryModel, budget_mb: float, margin: float = MARGIN,
                  cap: int = MAX_SUGGESTED_BATCH) -> int:
    """Largest power-of-two batch (at most `cap`) whose estimated peak stays within margin * budget; 0 if none."""
    limit = margin * budget_mb
    if model.need(1) > limit:
        return 0
    batch = 1
    while batch * 2 <= cap and model.need(batch * 2) <= limit:
        batch *= 2
    return batch


# -- child processes that measure one phase of the agent's work ------------------------------
@dataclass(frozen=True)
class ProbeSpec:
    """One phase: the trainer's step at `batch`, or (features) the trainer next to the image encoder."""

    bundle: str
    backend: str
    batch: int
    features: bool = False
    threads: Optional[int] = None
    providers: Optional[List[str]] = None

    def argv(self) -> List[str]:
        return [self.bundle, self.backend, str(self.batch), "features" if self.features else "step",
                str(self.threads or 0), ",".join(self.providers or [])]

    @classmethod
    def parse(cls, argv: List[str]) -> ProbeSpec:
        bundle, backend, batch, phase, threads, providers = argv
        return cls(bundle, backend, int(batch), phase == "features", int(threads) or None,
                   [p for p in providers.split(",") if p] or None)


    def describe(self) -> str:
        if self.features:
            return f"the trainer + image encoder probe on {self.batch} images"
        return f"the training step probe at batch {self.batch}"


class ProbeError(FloraError, RuntimeError):
    """A probe failed: in `phase` "trainer" (opening it) or "run"; `killed` names the signal that ended it."""

    def __init__(self, message: str, phase: str = "run", killed: Optional[str] = None) -> None:
        super().__init__(message)
        self.phase = phase
        self.killed = killed


def probe(spec: ProbeSpec) -> Dict[str, Any]:
    """Do the phase in this process: the trainer name, the phase's seconds and the peak RSS."""
    from .bundle import load_bundle
    from .trainers import TrainerError, open_trainer

    bundle = load_bundle(spec.bundle, verify=False)  # the parent verified it
    m = bundle.manifest
    try:
        trainer = open_trainer(bundle, spec.backend, threads=spec.threads, providers=spec.providers)
    except Exception as exc:
        raise ProbeError(str(exc), phase="trainer") from exc
    rng = np.random.default_rng(0)
    if spec.features:
        from .features import ImageEncoder

        encoder = ImageEncoder(bundle, spec.threads, spec.providers)
        size = m.preprocess.image_size
        pixels = rng.standard_normal((spec.batch, 3, size, size)).astype(np.float32)
        t0 = time.perf_counter()
        encoder(pixels)
        seconds = time.perf_counter() - t0
    else:
        x = rng.standard_normal(m.input_shape(spec.batch)).astype(np.float32)
        y = rng.integers(0, m.num_classes, spec.batch)
        trainer.train_step(x, y)  # warm-up: the first run allocates
        t0 = time.perf_counter()
        loss = trainer.train_step(x, y).loss
        seconds = time.perf_counter() - t0
        if not math.isfinite(loss):
            raise TrainerError(f"the training step gave a non-finite loss {loss}")
    return {"trainer": trainer.name, "batch": spec.batch, "seconds": seconds, "peak_mb": peak_rss_mb()}


def probe_main(argv: List[str]) -> int:
    """Child side of run_probe: one marked JSON line on stdout."""
    try:
        result = probe(ProbeSpec.parse(argv))
    except Exception as exc:  # every failure goes back to the parent as a message
        result = {"error": str(exc) or type(exc).__name__, "phase": getattr(exc, "phase", "run")}
    print(PROBE_MARK + json.dumps(result), flush=True)
    return 1 if "error" in result else 0


def _probe_command(spec: ProbeSpec) -> List[str]:
    code = "import sys; from flora.edge.doctor import probe_main; sys.exit(probe_main(sys.argv[1:]))"
    return [sys.executable, "-c", code, *spec.argv()]


def run_probe(spec: ProbeSpec, timeout: float = PROBE_TIMEOUT_S) -> Dict[str, Any]:
    """Run `probe(spec)` in a fresh child process; OSError if no child can be started here."""
    try:
        proc = subprocess.run(_probe_command(spec), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ProbeError(f"{spec.describe()} gave no result within {timeout:.0f} s") from exc
    marked = [ln[len(PROBE_MARK):] for ln in proc.stdout.splitlines() if ln.startswith(PROBE_MARK)]
    result = json.loads(marked[-1]) if marked else {}
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name if -proc.returncode in signal.valid_signals() else "?"
        raise ProbeError(f"{spec.describe()} was killed by signal {-proc.returncode} ({name})", killed=name)
    if proc.returncode != 0 or "error" in result or not result:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])
        raise ProbeError(result.get("error") or f"{spec.describe()}: exit status {proc.returncode}: {tail}",
                         phase=result.get("phase", "run"))
    return result


def probe_batches(batch: int) -> Tuple[int, int]:
    """The two step-probe batches: the configured one and a quarter of it (1 and 2 for batch 1)."""
    return (1, 2) if batch < 2 else (max(1, batch // 4), batch)


# -- broker and the federation's round ---------------------------------------------------------
@dataclass(frozen=True)
class BrokerCheck:
    detail: str
    round: Any = None  # the retained RoundAnnouncement, if the federation has one
    round_note: str = ""


def federation_name(args: argparse.Namespace) -> str:
    """--federation or the config file's `federation` (merged into args by the CLI), else `default`."""
    return str(getattr(args, "federation", None) or "default")


def check_broker(cfg: BrokerConfig, federation: str, timeout: float = 5.0,
                 round_wait: float = ROUND_WAIT_S) -> BrokerCheck:
    """Connect (clean session, nothing left behind) and read the federation's retained `round` message."""
    from .mqtt import connect_properties, make_client
    from .protocol import ProtocolError, RoundAnnouncement, Topics

    topic = Topics(federation).round
    with socket.create_connection((cfg.host, cfg.port), timeout=timeout):
        pass  # a refused or unroutable address fails here, with the operating system's reason
    client = make_client(cfg, f"flora-doctor-{os.getpid()}-{int(time.time())}")
    connected, subscribed, received = threading.Event(), threading.Event(), threading.Event()
    box: Dict[str, Any] = {}

    def on_connect(c, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            box["refused"] = str(reason_code)
        else:
            c.subscribe(topic, qos=1)
        connected.set()

    def on_subscribe(c, userdata, mid, reason_codes, properties) -> None:
        box["suback"] = reason_codes[0]
        subscribed.set()

    def on_message(c, userdata, message) -> None:
        if message.topic == topic:
            box["payload"] = bytes(message.payload)
            received.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    t0 = time.perf_counter()
    client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive, clean_start=True,
                         properties=connect_properties(cfg))
    client.loop_start()
    try:
        if not connected.wait(timeout):
            raise ConnectionError(f"no MQTT connection to {cfg.describe()} within {timeout:.0f} s")
        if "refused" in box:
            raise ConnectionError(f"{cfg.describe()} refused the connection: {box['refused']}")
        dt = time.perf_counter() - t0
        if subscribed.wait(timeout):
            received.wait(round_wait)
    finally:
        client.disconnect()
        client.loop_stop()
    detail = f"{cfg.describe()} accepted an MQTT 5 connection in {1e3 * dt:.0f} ms"
    suback = box.get("suback")
    if suback is None or suback.is_failure:
        return BrokerCheck(detail, None, f"cannot read {topic}: {suback or 'no SUBACK'}")
    if "payload" not in box:
        return BrokerCheck(detail, None, f"no retained round message on {topic}")
    try:
        return BrokerCheck(detail, RoundAnnouncement.from_json(box["payload"]))
    except ProtocolError as exc:
        return BrokerCheck(detail, None, f"the round message on {topic} is malformed: {exc}")


def _check_broker(r: Report, args: argparse.Namespace, model_id: str) -> Tuple[int, str]:
    """Broker lines; returns the batch size to check and where it came from."""
    fallback = max(1, int(args.batch_size))
    url = getattr(args, "broker", None)
    if not url:
        r.info("broker", "not checked (no --broker)")
        return fallback, "--batch-size (no --broker to ask the federation)"
    try:
        federation = federation_name(args)
        check = check_broker(BrokerConfig.from_args(args, session_expiry_s=0), federation)
    except Exception as exc:  # connection refused, TLS, auth, a bad name: all are a verdict, not a crash
        r.fail("broker", f"{url}: {exc}")
        return fallback, "--batch-size (the broker did not answer)"
    rnd = check.round
    if rnd is None:
        r.ok("broker", f"{check.detail}; {check.round_note}")
        return fallback, f"--batch-size ({check.round_note})"
    c = rnd.config
    r.ok("broker", f"{check.detail}; federation {federation!r} is at round {rnd.round} ({rnd.state}): "
                   f"{c.epochs} epoch(s), lr {c.lr:g}, batch {c.batch_size}")
    if rnd.model_id != model_id:
        r.warn("federation", f"its round is for model {rnd.model_id[:16]}, this bundle is {model_id[:16]}: "
                             "the agent would not train with it")
    return c.batch_size, f"the federation's retained round message (round {rnd.round}, federation {federation!r})"


# -- the checks --------------------------------------------------------------------------------
def _check_runtime(r: Report) -> bool:
    from .ort import has_training_api, import_onnxruntime

    try:
        ort = import_onnxruntime()
    except ImportError as exc:
        r.fail("runtime", f"onnxruntime does not import: {exc} "
                          "(install the edge extra: pip install 'flora-edge[edge]')")
        return False
    r.ok("runtime", f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}, "
                    f"training API {'present' if has_training_api() else 'absent'}")
    return True


def _check_bundle(r: Report, args: argparse.Namespace):
    """The verified bundle and the backend to use, or (None, None) after a FAIL line."""
    from .trainers import available_backends, open_bundle

    if not args.bundle:
        r.fail("bundle", "no --bundle given")
        return None, None
    try:
        bundle, backend = open_bundle(args.bundle, args.backend)
    except FloraError as exc:
        r.fail("bundle", str(exc))
        return None, None
    usable = available_backends(bundle)
    m = bundle.manifest
    r.ok("bundle", f"{bundle.root}: {m.preset}, LoRA {m.lora.tower} tower rank {m.lora.rank}, "
                   f"{m.num_classes} classes, files verified")
    r.info("backends", f"bundle holds {list(m.backends)}; usable here: {usable or 'none'}")
    return bundle, backend


def _measure(specs: List[ProbeSpec], run: Callable[[ProbeSpec], Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], str]:
    """Run the probes in child processes; if none can start here, the first one in-process (then the
    memory cannot be measured: this process's peak RSS is a lifetime peak). Returns (results, why not)."""
    try:
        return [run(spec) for spec in specs], ""
    except OSError as exc:
        return [probe(specs[0])], f"no child process could be started ({exc})"


def _check_memory(r: Report, model: MemoryModel, batch: int, step_peaks: Dict[int, float], gpu: bool) -> None:
    """The memory verdict at `batch` and the suggested batch size."""
    available = available_memory_mb()
    parts = ", ".join(f"step at batch {b}: {p:.0f} MiB" for b, p in sorted(step_peaks.items()))
    if model.features_mb:
        parts += f", trainer + image encoder on {FEATURE_BATCH} images: {model.features_mb:.0f} MiB"
    need = model.need(batch)
    gpu_note = "; GPU memory is not counted (CUDA/TensorRT allocations are not in RSS)" if gpu else ""
    if available is None:
        r.warn("memory", f"agent peak {need:.0f} MiB at batch {batch} ({parts}); free memory unknown on this OS"
                         f"{gpu_note}")
        return
    budget = available + (own_memory_mb() or 0.0)
    detail = (f"agent peak {need:.0f} MiB at batch {batch} ({parts}); {budget:.0f} MiB available to the agent "
              f"(MemAvailable {available:.0f} MiB + this doctor's own){gpu_note}")
    if need > budget:
        r.fail("memory", f"{detail}: does not fit")
    elif need > MARGIN * budget:
        r.warn("memory", f"{detail}: fits, but with less than {100 - 100 * MARGIN:.0f} % to spare")
    else:
        r.ok("memory", detail)
    _suggest(r, model, budget, batch)


def _suggest(r: Report, model: MemoryModel, budget: float, batch: int) -> None:
    fits = suggest_batch(model, budget)
    cost = (f"{model.per_sample_mb:.2f} MiB per sample" if model.measured
            else f"per-sample cost under {model.per_sample_mb:.2f} MiB, below the measurement resolution")
    share = f"within {100 * MARGIN:.0f} % of the available memory"
    if fits == 0:
        what = "the image encoder phase" if model.features_mb >= model.fixed_mb else "the trainer"
        r.info("suggest", f"no batch size fits {share}: {what} alone needs {model.need(1):.0f} MiB ({cost})")
    elif fits >= MAX_SUGGESTED_BATCH:
        r.info("suggest", f"memory does not limit the batch size: batches up to {fits} fit {share} ({cost})")
    else:
        r.info("suggest", f"largest batch {share}: {fits} (estimated peak {model.need(fits):.0f} MiB; {cost})")


def _check_training(r: Report, args: argparse.Namespace, bundle, backend: str, batch: int, source: str) -> None:
    """trainer, step and memory lines, from probes at two batch sizes (and the features phase)."""
    m = bundle.manifest
    b1, b2 = probe_batches(batch)
    common = dict(bundle=str(bundle.root), backend=backend, threads=args.threads, providers=args.providers)
    specs = [ProbeSpec(batch=batch, **common)] + [ProbeSpec(batch=b, **common) for b in (b1, b2) if b != batch]
    if m.needs_image_encoder:
        specs.append(ProbeSpec(batch=FEATURE_BATCH, features=True, **common))
    r.info("batch", f"{batch}, from {source}")
    try:
        results, why_not = _measure(specs, run_probe)
    except ProbeError as exc:
        if exc.killed == "SIGKILL":
            r.fail("memory", f"{exc}: most likely the kernel's out-of-memory killer; try a smaller batch")
        elif exc.phase == "trainer":
            r.fail("trainer", str(exc))
        else:
            r.fail("step", f"training step failed: {exc}")
        return
    except Exception as exc:  # the in-process fallback: the step's own error
        r.fail("step", f"training step failed: {exc}")
        return
    first = results[0]
    r.ok("trainer", first["trainer"])
    seconds = first["seconds"]
    r.ok("step", f"one training step at batch {batch}: {1e3 * seconds:.1f} ms ({batch / seconds:.1f} samples/s)")
    if why_not:
        r.warn("memory", f"cannot be measured: {why_not}; this process's peak RSS, {peak_rss_mb():.0f} MiB, is a "
                         "lifetime peak, not the agent's")
        return
    steps = {spec.batch: res["peak_mb"] for spec, res in zip(specs, results) if not spec.features}
    features_mb = results[-1]["peak_mb"] if m.needs_image_encoder else 0.0
    model = memory_model(b1, steps[b1], b2, steps[b2], features_mb)
    gpu = any(p in GPU_PROVIDERS for p in (args.providers or []))
    _check_memory(r, model, batch, steps, gpu)


def run_doctor(args: argparse.Namespace, out=print) -> int:
    r = Report()
    r.info("python", f"{platform.python_version()} on {platform.system()} {platform.machine()} "
                     f"({platform.platform(terse=True)})")
    if _check_runtime(r):
        bundle, backend = _check_bundle(r, args)
        if bundle is not None:
            batch, source = _check_broker(r, args, bundle.manifest.model_id)
            _check_training(r, args, bundle, backend, batch, source)
    r.emit(out)
    out(r.verdict())
    return 1 if r.failures else 0
