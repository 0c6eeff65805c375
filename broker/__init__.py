"""flora-aggregator: the broker-side part of FLORA edge (no torch).

- `cli`: the `flora-aggregator` command (run, status, plot)
- `aggregator`: the MQTT loop: queue messages, validate, fold, close rounds, checkpoint, publish
- `rounds`: the round state machine (sampling, quorum, timeout, extension) with an injectable clock
- `validation`: the checks an update must pass, each failure with a reason code
- `strategies`: aggregation strategies behind one streaming interface (`fedavg`)
- `checkpoint`: the durable state dir (global adapters, state.json, history.jsonl, spool)
- `report`: the status table and the PNG plot; `evaluation`: server-side test accuracy (`--eval-data`)
- `mosquitto`: start a private mosquitto for tests and the simulator
"""

from __future__ import annotations


def main() -> int:
    """The `flora-aggregator` console script: flora.broker.cli.main (or which extra to install)."""
    from flora.edge.errors import run_console_script

    return run_console_script("flora-aggregator", "broker", "flora.broker.cli")
