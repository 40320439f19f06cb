"""Overlap fusion at every step: PGS's patches share one latent wherever they share a timestep.

Denoised independently and blended once at the end (PGS's default walk), two overlapping patches each sample their
own detail, and the blend averages two unrelated textures (a grating of two phases, a seam). With fusion the
sampler walks the timesteps from high to low and at each one

1. every patch *active* at that timestep (its group's schedule contains it) is read from one shared latent x_t,
   and the denoiser gives its x0 estimate;
2. the estimates are blended into one x̂0 with the blend window (the same Gaussian/linear/uniform weights as the
   final blend), over the pixels the active patches cover;
3. one DDIM step (η as configured) moves x_t to the next timestep at those pixels, from x̂0 and the ε it implies.

This is MultiDiffusion's fusion (Bar-Tal et al. 2023, Eq. 5: the least-squares merge of the patches' steps, which
for DDIM, linear in x̂0 at a shared x_t, is the step of the blended x̂0), applied where PGS's groups share
timesteps. With the paper's aligned schedules (every group's timesteps a tail of the hard group's) all groups
share one latent: a group joins it at its entry step τ_g, where the pixels it brings in start from Eq. 7,
``y_τ = sqrt(ᾱ_τ)·y0 + sqrt(1 - ᾱ_τ)·ε`` (ε: the sampler's one noise draw, so a pixel's start is the same in every
walk), and pixels that harder patches already cover keep their trajectory. Schedules that do not line up are fused
within each group and the groups blended at the end. NFE is the same as without fusion: each patch is evaluated
once per step of its group.

The texture prompt (``prepare_cond``) is still computed once per patch, at its group's entry, and reused for every
step. The sampler's DDIM/DDPM update is used (``DDIMScheduler`` / ``DDPMScheduler``): other diffusers schedulers
keep per-sample history that a fused latent whose pixels join at different steps does not have.

Measured (docs/detail_evaluation.md, "Why the demo added grain"): on the known-answer texture task fusion changes no
figure against the default walk. The start noise is one draw per latent pixel, so overlapping patches already start
alike and, with the deterministic DDIM walk, stay close; the seams and phase defects that remain come from the
denoiser's token grid, not from the blend. It stays off by default (``fuse_overlaps: false``).
"""
import torch

from ..utils.errors import ConfigError
from .schedules import ALPHA_TABLE_SCHEDULERS, _call, alpha_bar, ddim_step, q_sample, schedules_aligned, to_x0_eps


def check_fusable(scheduler, devices):
    if type(scheduler).__name__ not in ALPHA_TABLE_SCHEDULERS:
        raise ConfigError(f'fuse_overlaps uses the DDIM update of the scheduler\'s ᾱ table: use DDIMScheduler or '
                          f'DDPMScheduler, not {type(scheduler).__name__}')
    if devices and len(devices) > 1:
        raise ConfigError('fuse_overlaps walks every patch in step; group-parallel devices need fuse_overlaps: false')


def timelines(timesteps):
    """Lists of groups that share one fused latent: all groups when their schedules line up, else one per group."""
    groups = [g for g in range(len(timesteps)) if timesteps[g]]
    return [groups] if schedules_aligned([timesteps[g] for g in groups]) else [[g] for g in groups]


def fused_walk(net, grid, y0, noise, batches, conds, timesteps, scheduler, prediction_type, eta, window, sigma,
               seed, on_step=None):
    """The fused reverse process of the module docstring on the padded latent ``y0``/``noise`` (B, c, hp, wp) of
    ``grid`` (a :class:`PatchGrid` of the padded size). ``batches[g]``: the flat patch indices of group g in
    batches; ``conds[g][i]``: the (prepared) conditioning of batch i. Returns [(groups, fused latent (B, c, hp, wp)
    in float32)] per timeline: one entry holding every group when the schedules line up."""
    b, c = y0.shape[:2]
    done = []
    for line in timelines(timesteps):
        x = torch.zeros(y0.shape, dtype=torch.float32, device=y0.device)
        started = torch.zeros(b, 1, *y0.shape[-2:], dtype=torch.bool, device=y0.device)
        walk = sorted({t for g in line for t in timesteps[g]}, reverse=True)
        for i, t in enumerate(walk):
            a_t = alpha_bar(scheduler, t)
            entering = [g for g in line if timesteps[g][0] == t]
            if entering:  # Eq. 7 for pixels no active patch has brought in yet
                cov = grid.blender(b, 1, 'uniform', device=y0.device)
                for g in entering:
                    for idx in batches[g]:
                        cov.add(idx, torch.ones(len(idx), 1, grid.patch_size, grid.patch_size, device=y0.device))
                new = cov.result(partial=True)[1] & ~started
                x = torch.where(new, q_sample(y0.float(), noise.float(), a_t), x)
                started |= new
            blender = grid.blender(b, c, window, sigma, y0.device)
            for g in line:
                if t not in timesteps[g]:
                    continue
                for idx, cond in zip(batches[g], conds[g]):
                    x_t = grid.gather(x, idx)
                    model_out = _call(net, x_t.to(y0.dtype), t, cond, torch.float32)
                    blender.add(idx, to_x0_eps(model_out, x_t, a_t, prediction_type)[0])
                    if on_step:
                        on_step()
            x0, covered = blender.result(torch.float32, partial=True)
            t_prev = walk[i + 1] if i + 1 < len(walk) else -1
            step_noise = None
            if eta:
                # integers only: hash() of a str differs between processes
                gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(t)) % 2 ** 63)
                step_noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device)
            x = torch.where(covered, ddim_step(x0, x, a_t, alpha_bar(scheduler, t_prev), 'sample', eta, step_noise),
                            x)
        done.append((line, x))
    return done
