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

echo "== user, folders, config, systemd unit"
id flora >/dev/null 2>&1 || useradd --system --home-dir "$VAR" --shell /usr/sbin/nologin flora
install -d -o flora -g flora -m 750 "$VAR" "$VAR/bundles" "$VAR/images" "$VAR/state"
install -d -m 755 "$ETC"
[ -f "$ETC/agent.toml" ] || install -m 644 "$SRC/devices/agent.example.toml" "$ETC/agent.toml"
[ -f "$ETC/agent.env" ] || { install -m 600 /dev/null "$ETC/agent.env"; echo "# FLORA_MQTT_PASSWORD=" > "$ETC/agent.env"; }
install -m 644 "$SRC/devices/systemd/flora-agent.service" /etc/systemd/system/flora-agent.service
systemctl daemon-reload 2>/dev/null || true

if [ -n "$BUNDLE" ]; then
    name=$(basename "$BUNDLE")
    echo "== bundle -> $VAR/bundles/$name"
    rm -rf "${VAR:?}/bundles/$name"
    cp -r "$BUNDLE" "$VAR/bundles/$name"
    chown -R flora:flora "$VAR/bundles/$name"
    echo "== self-test"
    "$PREFIX/venv/bin/flora-agent" doctor --bundle "$VAR/bundles/$name" --batch-size 32
fi
cat <<MSG
== done. Next:
   edit $ETC/agent.toml (bundle, data, client_id, broker), put FLORA_MQTT_PASSWORD in $ETC/agent.env,
   copy the broker's CA to $ETC/ca.crt and your images to $VAR/images/<class>/, then
   $PREFIX/venv/bin/flora-agent doctor --config $ETC/agent.toml
   systemctl enable --now flora-agent && journalctl -u flora-agent -f
MSG
