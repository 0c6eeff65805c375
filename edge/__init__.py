"""FLORA edge: the on-device side of federated LoRA fine-tuning of CLIP.

This package is the bottom floor of the project. It defines the bundle format, the adapter
blob and the MQTT wire protocol, and it runs training on a device with ONNX Runtime. It never
imports torch.
"""

from __future__ import annotations

__version__ = "0.1.0"


def main() -> int:
    """The `flora-agent` console script: flora.edge.cli.main (or which extra to install)."""
    from .errors import run_console_script

    return run_console_script("flora-agent", "edge", "flora.edge.cli")
