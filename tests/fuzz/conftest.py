"""Fuzzing budget: VDIT_FUZZ_EXAMPLES examples per property (default 100, CI); raise it for long runs."""
import os

from hypothesis import HealthCheck, settings

settings.register_profile("vdit", max_examples=int(os.environ.get("VDIT_FUZZ_EXAMPLES", "100")), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], derandomize=True)
settings.load_profile("vdit")
