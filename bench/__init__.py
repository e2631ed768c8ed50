"""Benchmarks: `python -m bench.compare` (see bench/README.md)."""
