"""Benchmarks that time an optimisation against its baseline in one run: `python -m bench`."""
