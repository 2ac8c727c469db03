"""Benchmarks share the test tolerances' conventions but no test fixtures: run with
``pytest benchmarks/ --benchmark-only``."""
