#!/usr/bin/env bash
# Set everything up (mosquitto, .venv, the offline proxy CLIP) and run a real federated run on this machine,
# offline: a private mosquitto, the aggregator and 4 flora-agent processes fine-tune LoRA in the text tower
# of clip-proxy (clip-tiny pre-trained on printed glyphs) on scikit-learn's handwritten digits split non-IID
# among them, for 10 rounds, next to the zero-shot, centralised (equal epochs and equal steps) and local-only
# baselines. Extra arguments go to flora-sim.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/flora-sim --model clip-proxy --clients 4 --rounds 10 --partition dirichlet:0.5 --dataset digits \
    --compare --out runs/demo "$@"
