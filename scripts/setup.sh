#!/usr/bin/env bash
# Set up everything the project needs, idempotently: mosquitto (Debian package) and a Python
# virtual environment in .venv with every extra installed at the versions in constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing mosquitto (apt-get)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
    else
        echo "setup: mosquitto is missing; install it with: sudo apt-get install -y mosquitto" >&2
        exit 1
    fi
fi

stamp=.venv/.flora-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: creating .venv and installing the project (torch is large; a few minutes the first time)"
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[edge,broker,export,sim,dev]"
    echo "$want" > "$stamp"
    echo "setup: done"
fi

# The offline stand-in for pre-trained CLIP weights (the clip-proxy preset, the demo's model): pre-trained
# on printed glyphs the first time (a few minutes on 2 cores), then reused while its recipe, torch and
# open_clip stay the same ($FLORA_PROXY_DIR, else ~/.cache/flora-edge/proxy).
.venv/bin/flora-proxy | sed 's/^/setup: /'
