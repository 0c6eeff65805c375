"""flora-sim: a real federation on one machine (mosquitto, the aggregator and N agent processes)."""
