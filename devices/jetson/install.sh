#!/usr/bin/env bash
# Install flora-agent on an NVIDIA Jetson (Orin/Xavier, JetPack 5 or 6: Ubuntu 20.04/22.04, Python 3.8/3.10).
#
#   sudo devices/jetson/install.sh --ort-wheel onnxruntime_gpu-<ver>-cp310-cp310-linux_aarch64.whl [--bundle DIR]
#                                  [--numpy SPEC]
#
# PyPI's onnxruntime for aarch64 has no CUDA; JetPack needs NVIDIA's onnxruntime-gpu build matched to
# its CUDA and TensorRT (Jetson Zoo, or NVIDIA's pypi.jetson-ai-lab index). Point --ort-wheel at it.
# Without --ort-wheel the CPU build from PyPI is installed (the agent then trains on the CPU).
# NVIDIA's onnxruntime-gpu wheels for JetPack 5 are built against numpy 1.x and fail to import under
# numpy 2, so numpy is pinned to --numpy (default 'numpy>=1.21,<2'; Python 3.8 has no numpy 2 anyway);
# pass --numpy 'numpy>=1.21' for a wheel built against numpy 2.
# Paths as in devices/raspberry-pi/install.sh (FLORA_PREFIX, FLORA_ETC, FLORA_VAR). The agent runs the
# portable `step` trainer here, with --providers cuda,cpu (or tensorrt,cuda,cpu).
set -euo pipefail

PREFIX=${FLORA_PREFIX:-/opt/flora}
ETC=${FLORA_ETC:-/etc/flora}
VAR=${FLORA_VAR:-/var/lib/flora}
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUNDLE=""
WHEEL=""
NUMPY="numpy>=1.21,<2"
while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) BUNDLE=${2:?--bundle needs a folder}; shift 2 ;;
        --ort-wheel) WHEEL=${2:?--ort-wheel needs a wheel file}; shift 2 ;;
        --numpy) NUMPY=${2:?--numpy needs a requirement, e.g. 'numpy>=1.21,<2'}; shift 2 ;;
        -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 1; }
[ -z "$WHEEL" ] || [ -f "$WHEEL" ] || { echo "install.sh: no such wheel: $WHEEL" >&2; exit 2; }
# shellcheck source=devices/install-common.sh
. "$SRC/devices/install-common.sh"
check_paths

echo "== system packages"
apt-get update -qq
apt-get install -y -qq python3 python3-venv python3-pip >/dev/null

echo "== virtualenv in $PREFIX/venv (no torch; $NUMPY)"
python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install -q --upgrade pip
# The edge extra without its onnxruntime (which would clash with onnxruntime-gpu: both are `onnxruntime`).
"$PREFIX/venv/bin/pip" install -q --no-deps "$SRC"
"$PREFIX/venv/bin/pip" install -q "$NUMPY" "pillow>=9.0" "paho-mqtt>=2.0,<3" "safetensors>=0.4" "prometheus_client>=0.17" \
    "cryptography>=42" "pycryptodome>=3.19" "tomli>=2.0; python_version < '3.11'"
if [ -n "$WHEEL" ]; then
    "$PREFIX/venv/bin/pip" install -q "$WHEEL" "$NUMPY"   # the pin again, so the wheel's deps keep it
else
    echo "install.sh: no --ort-wheel: installing CPU onnxruntime from PyPI (no CUDA)" >&2
    "$PREFIX/venv/bin/pip" install -q "onnxruntime>=1.16.3" "$NUMPY"
fi

install_service "$SRC/devices/jetson/agent.example.toml"
usermod -aG video "$SERVICE_USER" 2>/dev/null || true   # GPU device nodes on L4T
if ! runtime_check; then
    echo "install.sh: onnxruntime does not import. 'compiled using NumPy 1.x cannot be run in NumPy 2' means the" \
        "wheel wants --numpy 'numpy>=1.21,<2'; a CUDA library error means the wheel does not match this JetPack" >&2
    exit 1
fi
status=0
if [ -n "$BUNDLE" ]; then
    installed=$(install_bundle "$BUNDLE")
    providers=cpu
    [ -z "$WHEEL" ] || providers=cuda,cpu
    self_test "$installed" --backend step --providers "$providers" --batch-size 32 || status=1
fi
next_steps
[ "$status" = 0 ] || echo "install.sh: installed, but the self-test says the device is not ready (above)" >&2
exit "$status"
