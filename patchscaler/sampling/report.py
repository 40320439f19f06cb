"""What one PGS call did (:class:`PGSReport`): groups, NFE against uniform sampling, denoiser calls, timing."""
from dataclasses import dataclass, field

import torch

from .patches import PatchGrid


@dataclass
class PGSReport:
    """What one PGS call did. NFE counts patch evaluations: one denoiser evaluation of one V×V patch."""

    group_names: tuple
    taus: tuple
    steps: tuple
    timesteps: tuple
    aligned: bool
    patches_per_group: tuple
    nfe_per_patch: torch.Tensor  # (B, M)
    nfe_total: int
    nfe_uniform: int
    uniform_steps: int
    denoiser_calls: int
    cond_calls: int
    execution: str  # 'per_group' or 'per_step'
    qmap: torch.Tensor  # (B, M)
    groups: torch.Tensor  # (B, M)
    thresholds: torch.Tensor  # (B, G-1)
    grid: PatchGrid
    seconds: float = 0.0
    seconds_per_device: dict = field(default_factory=dict)

    @property
    def num_patches(self):
        return int(self.groups.numel())

    @property
    def nfe_ratio(self):
        return self.nfe_total / max(self.nfe_uniform, 1)

    @property
    def mean_patches_per_call(self):
        """Patches per denoiser call, on average (NFE / calls): how full the batches were."""
        return self.nfe_total / max(self.denoiser_calls, 1)

    def summary(self):
        parts = ', '.join(f'{n} {c}' for n, c in zip(self.group_names, self.patches_per_group))
        return (f'PGS: {self.num_patches} patches ({parts}); NFE {self.nfe_total} vs {self.nfe_uniform} for uniform '
                f'{self.uniform_steps}-step sampling = {self.nfe_ratio:.2f}x; {self.denoiser_calls} denoiser calls '
                f'({self.mean_patches_per_call:.1f} patches each, {self.execution})')
