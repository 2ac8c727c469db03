"""Flow-matching samplers for VideoDiT."""
from vdit.sampling.flow import FlowSampler, sample_timesteps_schedule, time_shift

__all__ = ["FlowSampler", "sample_timesteps_schedule", "time_shift"]
