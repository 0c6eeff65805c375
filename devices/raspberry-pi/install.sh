#!/usr/bin/env bash
# Install flora-agent on a Raspberry Pi 4/5 (64-bit Raspberry Pi OS or Debian bookworm, Python 3.11).
#
#   sudo devices/raspberry-pi/install.sh [--bundle DIR]
#
# Creates a virtualenv in $FLORA_PREFIX/venv (default /opt/flora) with the `edge` extra only (no torch:
# on aarch64 it resolves to plain onnxruntime and the portable `step` trainer), a system user `flora`,
# $FLORA_ETC (/etc/flora) with an example config, $FLORA_VAR (/var/lib/flora) for state and data, and the
# flora-agent systemd unit rendered with those paths (not started). It then checks, as the `flora`
# user, that onnxruntime imports; with --bundle it copies the bundle into $FLORA_VAR/bundles and runs
# `flora-agent doctor` on it (exit status 1 if the doctor says not ready).
set -euo pipefail

PREFIX=${FLORA_PREFIX:-/opt/flora}
ETC=${FLORA_ETC:-/etc/flora}
VAR=${FLORA_VAR:-/var/lib/flora}
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUNDLE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) BUNDLE=${2:?--bundle needs a folder}; shift 2 ;;
        -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 1; }
# shellcheck source=devices/install-common.sh
. "$SRC/devices/install-common.sh"
check_paths

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

install_service "$SRC/devices/agent.example.toml"
runtime_check
status=0
if [ -n "$BUNDLE" ]; then
    installed=$(install_bundle "$BUNDLE")
    self_test "$installed" --batch-size 32 || status=1
fi
next_steps
[ "$status" = 0 ] || echo "install.sh: installed, but the self-test says the device is not ready (above)" >&2
exit "$status"
