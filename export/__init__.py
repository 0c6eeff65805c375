"""flora-export: open_clip CLIP + LoRA to an ONNX Runtime on-device training bundle (workstation side)."""

from __future__ import annotations


def main() -> int:
    """The `flora-export` console script: flora.export.cli.main (or which extra to install)."""
    from flora.edge.errors import run_console_script

    return run_console_script("flora-export", "export", "flora.export.cli")


def proxy_main() -> int:
    """The `flora-proxy` console script: flora.export.proxy_cli.main (or which extra to install)."""
    from flora.edge.errors import run_console_script

    return run_console_script("flora-proxy", "export", "flora.export.proxy_cli")
