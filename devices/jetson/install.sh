#!/usr/bin/env bash
# Install flora-agent on an NVIDIA Jetson (Orin/Xavier, JetPack 5 or 6: Ubuntu 20.04/22.04, Python 3.8/3.10).
#
#   sudo devices/jetson/install.sh --ort-wheel onnxruntime_gpu-<ver>-cp310-cp310-linux_aarch64.whl [--bundle DIR]
#
# PyPI's onnxruntime for aarch64 has no CUDA; JetPack needs NVIDIA's onnxruntime-gpu build matched to
# its CUDA and TensorRT (Jetson Zoo, or NVIDIA's pypi.jetson-ai-lab index). Point --ort-wheel at it.
# Without --ort-wheel the CPU build from PyPI is installed (the agent then trains on the CPU).
# The agent runs the portable `step` trainer here, with --providers cuda,cpu (or tensorrt,cuda,cpu).
set -euo pipefail

PREFIX=${FLORA_PREFIX:-/opt/flora}
ETC=${FLORA_ETC:-/etc/flora}
VAR=${FLORA_VAR:-/var/lib/flora}
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUNDLE=""
WHEEL=""
while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) BUNDLE=$2; shift 2 ;;
        --ort-wheel) WHEEL=$2; shift 2 ;;
        -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 1; }
[ -z "$WHEEL" ] || [ -f "$WHEEL" ] || { echo "install.sh: no such wheel: $WHEEL" >&2; exit 2; }

echo "== system packages"
apt-get update -qq
apt-get install -y -qq python3 python3-venv python3-pip >/dev/null

echo "== virtualenv in $PREFIX/venv (no torch)"
python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install -q --upgrade pip
# The edge extra without its onnxruntime (which would clash with onnxruntime-gpu: both are `onnxruntime`).
"$PREFIX/venv/bin/pip" install -q --no-deps "$SRC"
"$PREFIX/venv/bin/pip" install -q "numpy>=1.21" "pillow>=9.0" "paho-mqtt>=2.0,<3" "safetensors>=0.4" \
    "tomli>=2.0; python_version < '3.11'"
if [ -n "$WHEEL" ]; then
    "$PREFIX/venv/bin/pip" install -q "$WHEEL"
else
    echo "install.sh: no --ort-wheel: installing CPU onnxruntime from PyPI (no CUDA)" >&2
    "$PREFIX/venv/bin/pip" install -q "onnxruntime>=1.17"
fi
"$PREFIX/venv/bin/python" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"

# shellcheck source=devices/install-common.sh
. "$SRC/devices/install-common.sh"
install_service "$SRC/devices/jetson/agent.example.toml"
usermod -aG video flora 2>/dev/null || true   # GPU device nodes on L4T
if [ -n "$BUNDLE" ]; then
    installed=$(install_bundle "$BUNDLE")
    providers=cpu
    [ -n "$WHEEL" ] && providers=cuda,cpu
    echo "== self-test of $installed (providers $providers)"
    "$PREFIX/venv/bin/flora-agent" doctor --bundle "$installed" --backend step --providers "$providers" --batch-size 32
fi
next_steps
