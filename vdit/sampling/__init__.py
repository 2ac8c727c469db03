"""Flow-matching samplers for VideoDiT, with optional step caching (vdit.sampling.cache)."""
from vdit.sampling.cache import (
    DEFAULT_THRESHOLD,
    METHODS,
    BoundStepModel,
    CacheStats,
    StepCache,
    StepCacheModel,
    reduce_change,
)
from vdit.sampling.flow import FlowSampler, sample_timesteps_schedule, time_shift

__all__ = ["BoundStepModel", "CacheStats", "DEFAULT_THRESHOLD", "FlowSampler", "METHODS", "StepCache",
           "StepCacheModel", "reduce_change", "sample_timesteps_schedule", "time_shift"]
