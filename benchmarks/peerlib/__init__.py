"""Pieces of ``benchmarks/peers.py`` that are qmoe's own and tested in ``tests/benchmarks``: the exact
widening of a model for llama.cpp's 256-wide blocks, bit accounting of each peer's stored bytes, and reading
their files back into dense expert weights. Nothing here imports a peer tool; ``workers/`` holds the scripts
that run inside each peer's own virtual environment."""
