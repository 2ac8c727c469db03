"""Benchmark and static-analysis tools behind ``vdit-bench``."""
