"""The default check of devices/verify-arm64.sh, run under qemu-aarch64 with the `edge` extra's wheels: the
platform, onnxruntime (and a tiny model against numpy), numpy, pillow, safetensors, paho-mqtt (a round trip
through the host's mosquitto when FLORA_ARM64_MQTT_PORT is set) and every flora.edge module importing without
torch. Prints one PASS/FAIL/SKIP line a check, a FLORA_ARM64_RESULT JSON line (tests/test_arm64.py reads it)
and a VERDICT line; exits 1 if a check failed.

    python3 devices/arm64/verify_default.py
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import os
import pkgutil
import platform
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

#: What the checks found (printed as the FLORA_ARM64_RESULT line).
results: Dict[str, Any] = {}
#: (name, check) in the order they run.
CHECKS: List[Tuple[str, Callable[[], Optional[str]]]] = []


def check(name: str) -> Callable[[Callable[[], Optional[str]]], Callable[[], Optional[str]]]:
    """Register a check: it returns a detail line ("SKIP ..." for a check that could not run) or raises."""
    def register(fn: Callable[[], Optional[str]]) -> Callable[[], Optional[str]]:
        CHECKS.append((name, fn))
        return fn

    return register


def run_checks() -> List[str]:
    """Run every check (a failure never stops the others); the names of those that failed."""
    failed = []
    for name, fn in CHECKS:
        t0 = time.perf_counter()
        try:
            detail = fn()
        except Exception as exc:  # every failure is reported, none stops the others
            failed.append(name)
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=3)
        else:
            if detail is None or not str(detail).startswith("SKIP"):
                print(f"PASS {name}: {detail} ({time.perf_counter() - t0:.1f} s)", flush=True)
            else:
                print(f"{detail} [{name}]", flush=True)
    return failed


# -- a tiny ONNX model (MatMul + Add + Softmax), protobuf written by hand: no onnx package here --
def _varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _int(field, v):
    return _varint(field << 3) + _varint(v)


def _len(field, payload):
    if isinstance(payload, str):
        payload = payload.encode()
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _tensor(name, arr):  # TensorProto: dims=1, data_type=2 (FLOAT=1), name=8, raw_data=9
    return b"".join(_int(1, d) for d in arr.shape) + _int(2, 1) + _len(8, name) + _len(9, arr.astype("<f4").tobytes())


def _value_info(name, dims):  # ValueInfoProto{name, TypeProto{tensor_type{elem_type, shape{dim*}}}}
    shape = b"".join(_len(1, _len(2, d) if isinstance(d, str) else _int(1, d)) for d in dims)
    return _len(1, name) + _len(2, _len(1, _int(1, 1) + _len(2, shape)))


def _node(op, inputs, outputs, **ints):  # NodeProto: input=1, output=2, name=3, op_type=4, attribute=5
    attrs = b"".join(_len(5, _len(1, k) + _int(3, v) + _int(20, 2)) for k, v in ints.items())
    wires = b"".join(_len(1, i) for i in inputs) + b"".join(_len(2, o) for o in outputs)
    return wires + _len(3, op) + _len(4, op) + attrs


def tiny_model(np):
    w = (((np.arange(16 * 8) * 37) % 101) / 50.0 - 1.0).astype(np.float32).reshape(16, 8)
    b = (((np.arange(8) * 13) % 7) / 4.0 - 0.75).astype(np.float32)
    graph = (
        _len(1, _node("MatMul", ["x", "W"], ["h"])) + _len(1, _node("Add", ["h", "B"], ["z"]))
        + _len(1, _node("Softmax", ["z"], ["y"], axis=-1)) + _len(2, "flora_tiny")
        + _len(5, _tensor("W", w)) + _len(5, _tensor("B", b))
        + _len(11, _value_info("x", ["N", 16])) + _len(12, _value_info("y", ["N", 8]))
    )
    model = _int(1, 8) + _len(2, "flora-verify-arm64") + _len(7, graph) + _len(8, _len(1, "") + _int(2, 13))
    return model, w, b


@check("platform")
def check_platform() -> Optional[str]:
    m = platform.machine()
    results["machine"] = m
    results["python"] = platform.python_version()
    results["libc"] = "-".join(platform.libc_ver())
    results["byteorder"] = sys.byteorder
    if m != "aarch64":
        raise AssertionError(f"platform.machine() is {m!r}, not 'aarch64'")
    return f"machine={m} python={platform.python_version()} libc={results['libc']} {sys.byteorder}-endian"


@check("onnxruntime")
def check_onnxruntime() -> Optional[str]:
    import onnxruntime as ort

    results["onnxruntime"] = ort.__version__
    results["providers"] = ort.get_available_providers()
    if "CPUExecutionProvider" not in results["providers"]:
        raise AssertionError(f"no CPUExecutionProvider in {results['providers']}")
    try:
        import onnxruntime.training
        results["ort_training"] = True
    except ImportError:
        results["ort_training"] = False
    return (f"onnxruntime {ort.__version__} device={ort.get_device()} providers={results['providers']}"
            f" onnxruntime.training={'yes' if results['ort_training'] else 'no'}")


@check("tiny-model")
def check_tiny_model_matches_numpy() -> Optional[str]:
    import numpy as np
    import onnxruntime as ort

    model, w, b = tiny_model(np)
    x = np.linspace(-1.0, 1.0, 4 * 16, dtype=np.float32).reshape(4, 16)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    z = x.astype(np.float64) @ w.astype(np.float64) + b
    ref = np.exp(z - z.max(axis=1, keepdims=True))
    ref /= ref.sum(axis=1, keepdims=True)
    err = float(np.abs(y - ref).max())
    results["tiny_model"] = {
        "onnx_base64": base64.b64encode(model).decode(),
        "W": w.tolist(),
        "B": b.tolist(),
        "input": x.tolist(),
        "output": y.tolist(),
        "max_abs_err_vs_numpy_float64": err,
    }
    if y.shape != (4, 8) or not err <= 1e-5:
        raise AssertionError(f"output shape {y.shape}, max |ort - numpy| = {err:.3g} > 1e-5")
    return f"MatMul+Add+Softmax (4x16 -> 4x8) max|ort - numpy float64| = {err:.2e}"


@check("numpy")
def check_numpy() -> Optional[str]:
    import numpy as np

    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    rows = a.tolist()
    want = [[float(sum(p * q for p, q in zip(r, c))) for c in rows] for r in rows]
    if (a @ a.T).tolist() != want:
        raise AssertionError(f"a @ a.T = {(a @ a.T).tolist()}, expected {want}")
    big = np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32)
    err = float(np.abs(big @ big.T - (big.astype(np.float64) @ big.T.astype(np.float64))).max())
    if not err < 1e-3:
        raise AssertionError(f"float32 128x128 matmul differs from float64 by {err}")
    results["numpy"] = np.__version__
    return f"numpy {np.__version__} matmul exact (float64 3x4) and within {err:.1e} (float32 128x128 BLAS)"


@check("pillow")
def check_pillow() -> Optional[str]:
    import numpy as np
    import PIL
    from PIL import Image

    a = ((np.arange(24 * 32 * 3) * 7) % 251).astype(np.uint8).reshape(24, 32, 3)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    if not np.array_equal(a, back):
        raise AssertionError("PNG round trip changed the pixels")
    jpg = io.BytesIO()
    Image.fromarray(a).save(jpg, format="JPEG")
    Image.open(io.BytesIO(jpg.getvalue())).load()
    results["pillow"] = PIL.__version__
    return f"pillow {PIL.__version__} PNG encode/decode round trip exact, JPEG ok"


@check("safetensors")
def check_safetensors() -> Optional[str]:
    import numpy as np
    import safetensors
    from safetensors.numpy import load, save

    t = {"lora_A": np.arange(6, dtype=np.float32).reshape(2, 3), "lora_B": np.ones((3, 2), np.float16)}
    back = load(save(t, metadata={"k": "v"}))
    if set(back) != set(t) or not all(np.array_equal(t[k], back[k]) and t[k].dtype == back[k].dtype for k in t):
        raise AssertionError("safetensors round trip changed the tensors")
    results["safetensors"] = safetensors.__version__
    return f"safetensors {safetensors.__version__} save/load round trip exact"


@check("paho-mqtt")
def check_paho_mqtt() -> Optional[str]:
    import paho.mqtt
    import paho.mqtt.client as mqtt

    results["paho_mqtt"] = paho.mqtt.__version__
    port = os.environ.get("FLORA_ARM64_MQTT_PORT")
    if not port:
        return f"SKIP paho-mqtt {paho.mqtt.__version__} imports; no mosquitto on the host for a round trip"
    got, box = threading.Event(), []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flora-verify-arm64", protocol=mqtt.MQTTv5)
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe("flora/verify-arm64", qos=1)
    c.on_subscribe = lambda cl, u, mid, rcs, p: cl.publish("flora/verify-arm64", b"\x00hello from aarch64", qos=1)

    def on_message(cl, u, msg):
        box.append(msg.payload)
        got.set()

    c.on_message = on_message
    c.connect("127.0.0.1", int(port))
    c.loop_start()
    try:
        if not got.wait(60):
            raise AssertionError(f"no message came back from mosquitto on 127.0.0.1:{port} in 60 s")
    finally:
        c.disconnect()
        c.loop_stop()
    if box[0] != b"\x00hello from aarch64":
        raise AssertionError(f"payload changed: {box[0]!r}")
    results["mqtt_roundtrip"] = True
    return f"paho-mqtt {paho.mqtt.__version__} MQTT v5 subscribe/publish round trip via mosquitto 127.0.0.1:{port}"


@check("edge")
def check_edge_imports() -> Optional[str]:
    import flora.edge as edge

    names, bad = ["flora.edge"], []
    for info in pkgutil.walk_packages(edge.__path__, "flora.edge."):
        try:
            importlib.import_module(info.name)
            names.append(info.name)
        except Exception as exc:  # a module that does not import is what this reports
            bad.append(f"{info.name}: {type(exc).__name__}: {exc}")
    results["edge_modules"] = names
    if "torch" in sys.modules:
        bad.append("importing flora.edge pulled in torch")
    if bad:
        raise AssertionError("; ".join(bad))
    return f"{len(names)} modules import under aarch64 from {os.path.dirname(edge.__file__)}"


def main() -> int:
    failed = run_checks()
    results["failed"] = failed
    print("FLORA_ARM64_RESULT " + json.dumps(results, sort_keys=True), flush=True)
    print(f"VERDICT: {'FAIL' if failed else 'PASS'} (aarch64 under qemu; {len(failed)} failed: "
          f"{', '.join(failed) or 'none'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
