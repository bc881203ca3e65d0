"""Scripts run by ``benchmarks/peers.py`` with a peer's own Python (``python workers/X.py job.json``)."""
