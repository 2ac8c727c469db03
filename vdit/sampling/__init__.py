"""Flow-matching samplers for VideoDiT, with optional step caching (vdit.sampling.cache) and noise shared
across sizes (vdit.sampling.noise)."""
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
from vdit.sampling.noise import DEFAULT_CANVAS_HW, InitialNoise

__all__ = ["BoundStepModel", "CacheStats", "DEFAULT_CANVAS_HW", "DEFAULT_THRESHOLD", "FlowSampler", "InitialNoise",
           "METHODS", "StepCache", "StepCacheModel", "reduce_change", "sample_timesteps_schedule", "time_shift"]
