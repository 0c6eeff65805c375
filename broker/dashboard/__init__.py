"""The operator's live view of a federation: a page in the browser (`--http`), JSON, and /metrics for Prometheus.

One snapshot (snapshot.py) feeds all three; it is built from the aggregator's own state while it runs, or
from a state dir (`flora-aggregator dashboard --state-dir DIR`), so a copied state dir shows the same page.
"""
