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

The walk over the timesteps and its calls are :mod:`.stepwise`'s (:func:`~.stepwise.union_walk`,
:class:`~.stepwise.ActivePatches`): with ``execution: per_group`` each batch of one group's patches is a call, with
``per_step`` the calls of a timestep take up to ``batch_size`` patches of any group (fewer calls, the same
result up to float rounding). The texture prompt (``prepare_cond``) is still computed once per patch, at its
group's entry, and reused for every step. The sampler's DDIM/DDPM update is used (``DDIMScheduler`` /
``DDPMScheduler``, with its ``clip_sample``): other diffusers schedulers keep per-sample history that a fused
latent whose pixels join at different steps does not have.

Measured (docs/detail_evaluation.md, "Why the demo added grain"): on the known-answer texture task fusion changes no
figure against the default walk. The start noise is one draw per latent pixel, so overlapping patches already start
alike and, with the deterministic DDIM walk, stay close; the seams and phase defects that remain come from the
denoiser's token grid, not from the blend. It stays off by default (``fuse_overlaps: false``).
"""
import torch

from .schedules import _call, alpha_bar, clip_range, ddim_step, q_sample, schedules_aligned, step_noise, to_x0_eps
from .stepwise import ActivePatches, call_cond, call_rows, check_stepwise, union_walk


def check_fusable(scheduler, devices):
    check_stepwise(scheduler, devices, 'fuse_overlaps')


def timelines(timesteps):
    """Lists of groups that share one fused latent: all groups when their schedules line up, else one per group."""
    groups = [g for g in range(len(timesteps)) if timesteps[g]]
    return [groups] if schedules_aligned([timesteps[g] for g in groups]) else [[g] for g in groups]


def fused_walk(net, grid, y0, noise, timesteps, enter, scheduler, prediction_type, eta, window, sigma, seed,
               batch_size=64, across_groups=False, device=None, on_step=None, temperature=1.0):
    """The fused reverse process of the module docstring on the padded latent ``y0``/``noise`` (B, c, hp, wp) of
    ``grid`` (a :class:`PatchGrid` of the padded size). ``timesteps[g]``: group g's schedule (empty for a group
    without patches); ``enter(g)`` -> [:class:`~.stepwise.Segment`] of group g's patches with their prepared
    conditioning, called at its first timestep. ``across_groups``: the calls of a timestep take up to
    ``batch_size`` patches of any group (execution: per_step), else one call per entry batch (per_group). The
    denoiser runs on ``device`` (default: y0's). Returns [(groups, fused latent (B, c, hp, wp) in float32)] per
    timeline: one entry holding every group when the schedules line up. ``temperature`` scales the step noise
    (η > 0) as the sampler scaled ``noise``."""
    b, c, v = y0.shape[0], y0.shape[1], grid.patch_size
    device = torch.device(device or y0.device)
    clip = clip_range(scheduler)
    done = []
    for line in timelines(timesteps):
        x = torch.zeros(y0.shape, dtype=torch.float32, device=y0.device)
        started = torch.zeros(b, 1, *y0.shape[-2:], dtype=torch.bool, device=y0.device)
        active = ActivePatches(batch_size, across_groups)
        for step in union_walk([ts if g in line else [] for g, ts in enumerate(timesteps)]):
            a_t = alpha_bar(scheduler, step.t)
            if step.entering:  # Eq. 7 for pixels no active patch has brought in yet
                segments = [s for g in step.entering for s in enter(g)]
                cov = grid.blender(b, 1, 'uniform', device=y0.device)
                for s in segments:
                    cov.add(s.idx, torch.ones(len(s), 1, v, v, device=y0.device))
                new = cov.result(partial=True)[1] & ~started
                x = torch.where(new, q_sample(y0.float(), noise.float(), a_t), x)
                started |= new
                active.enter(segments)
            blender = grid.blender(b, c, window, sigma, y0.device)
            for pieces in active.calls(step.groups):
                idx = call_rows(pieces, 'idx')
                x_t = grid.gather(x, idx)
                model_out = _call(net, x_t.to(device, y0.dtype), step.t, call_cond(pieces), torch.float32)
                blender.add(idx, to_x0_eps(model_out.to(x_t.device), x_t, a_t, prediction_type)[0])
                if on_step:
                    on_step()
            x0, covered = blender.result(torch.float32, partial=True)
            # aligned: every stepping group's next timestep is the walk's next one
            t_prev = step.prev[step.groups[0]]
            eps = step_noise(seed, step.t, x.shape, temperature).to(x.device) if eta else None
            x = torch.where(covered, ddim_step(x0, x, a_t, alpha_bar(scheduler, t_prev), 'sample', eta, eps, clip),
                            x)
            active.leave(step.leaving)
        done.append((line, x))
    return done
