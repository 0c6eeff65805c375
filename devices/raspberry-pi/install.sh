#!/usr/bin/env bash
# Install flora-agent on a Raspberry Pi 4/5 (64-bit Raspberry Pi OS or Debian bookworm, Python 3.11).
#
#   sudo devices/raspberry-pi/install.sh [--bundle DIR]
#
# Creates a virtualenv in /opt/flora/venv with the `edge` extra only (no torch: on aarch64 it resolves
# to plain onnxruntime and the portable `step` trainer), a system user `flora`, /etc/flora with an
# example config, /var/lib/flora for state and data, and the flora-agent systemd unit (not started).
# With --bundle it copies the bundle into /var/lib/flora/bundles and runs `flora-agent doctor` on it.
set -euo pipefail

PREFIX=${FLORA_PREFIX:-/opt/flora}
ETC=${FLORA_ETC:-/etc/flora}
VAR=${FLORA_VAR:-/var/lib/flora}
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUNDLE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) BUNDLE=$2; shift 2 ;;
        -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 1; }

echo "== system packages"
apt-get update -qq
apt-get install -y -qq python3 python3-venv python3-pip >/dev/null

echo "== virtualenv in $PREFIX/venv (edge extra, no torch)"
python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install -q --upgrade pip
"$PREFIX/venv/bin/pip" install -q "${SRC}[edge]"
if "$PREFIX/venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "install.sh: torch got installed into the agent's venv; it must not be" >&2; exit 1
fi

# shellcheck source=devices/install-common.sh
. "$SRC/devices/install-common.sh"
install_service "$SRC/devices/agent.example.toml"
if [ -n "$BUNDLE" ]; then
    installed=$(install_bundle "$BUNDLE")
    echo "== self-test of $installed"
    "$PREFIX/venv/bin/flora-agent" doctor --bundle "$installed" --batch-size 32
fi
next_steps
