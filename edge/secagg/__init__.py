"""Secure aggregation (SecAgg+ with double masking) for FLORA: the server learns only the sum of the updates.

The pure parts shared by the agent and the aggregator live here: the primitives (every one from a
well-kept library), the fixed-point encoding, the shuffled-ring neighbourhoods, the parameters, the
messages and the client's state machine. The aggregator's state machine is `flora.broker.secagg`.
docs/protocol.md ("Secure aggregation") describes the protocol.
"""
