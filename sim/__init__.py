"""flora-sim: a real federation on one machine (mosquitto, the aggregator and N agent processes)."""

from __future__ import annotations


def main() -> int:
    """The `flora-sim` console script: flora.sim.cli.main (or which extra to install)."""
    from flora.edge.errors import run_console_script

    return run_console_script("flora-sim", "sim", "flora.sim.cli")
