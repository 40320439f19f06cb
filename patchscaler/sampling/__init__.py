"""PGS, patch-adaptive group sampling (section 3.2): usable by any diffusion denoiser, no model imports."""
from .grouping import GroupAssigner, assign_groups, check_confidence, texture_confidence
from .patches import PatchGrid, blend_window
from .pgs import PAPER_GROUPS, PatchGroupSampler, PerPatch, PGSReport, build_sampler, sample
from .schedules import build_scheduler, ddim_step, denoise, q_sample, schedules_aligned, trailing_timesteps

__all__ = ['GroupAssigner', 'assign_groups', 'check_confidence', 'PatchGrid', 'blend_window', 'PAPER_GROUPS',
           'PatchGroupSampler', 'PerPatch', 'PGSReport', 'build_sampler', 'sample', 'build_scheduler', 'ddim_step',
           'denoise', 'q_sample', 'schedules_aligned', 'texture_confidence', 'trailing_timesteps']
