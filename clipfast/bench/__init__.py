"""Benchmarks: `python -m clipfast.bench`; cases shared with benchmarks/bench_*.py."""
