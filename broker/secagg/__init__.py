"""The aggregator's side of secure aggregation: a pure state machine per attempt (`server.SecAggServer`) and
the recovery of the sum (`recover`). The shared pieces (messages, encoding, ring) are `flora.edge.secagg`."""
