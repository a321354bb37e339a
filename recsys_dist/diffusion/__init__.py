"""Diffusion toolkit shared by all models: noise schedules, forward process, posteriors."""

from recsys_dist.diffusion.schedules import NoiseSchedule, make_betas
from recsys_dist.diffusion.gaussian import GaussianDiffusion, timestep_embedding

__all__ = ["NoiseSchedule", "make_betas", "GaussianDiffusion", "timestep_embedding"]
