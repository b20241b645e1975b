"""Benchmarks of mixtral-cluster: `mixtral-cluster bench` (see benchmarks/run.py and BENCHMARKS.md)."""
