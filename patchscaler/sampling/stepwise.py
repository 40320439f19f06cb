"""Step-synchronous PGS: walk the union of the groups' timesteps; the patches active at a timestep share calls.

PGS's default walk (``execution: per_group``) takes each batch of one group's patches through the group's whole
schedule: sum_g ceil(n_g / batch_size)·N_g denoiser calls, each group's last batch a partial one. The paper's
aligned schedules make every group's timesteps a tail of the hard group's (:func:`~.schedules.schedules_aligned`),
so all patches active at a timestep can go through one call. ``execution: per_step`` walks

1. the union of the groups' timesteps, from high to low (:func:`union_walk`); at each timestep t
2. the groups whose schedule starts at t *enter*: their patches start from y_τ (Eq. 7, the sampler's one noise
   draw) and their conditioning is prepared (``prepare_cond``: once per batch of ≤ batch_size patches of the
   group, as in the per-group walk, and reused for all the group's steps);
3. every active patch (its group's schedule contains t) is denoised, in calls of up to ``batch_size`` patches
   cut across groups (:class:`ActivePatches`);
4. each patch takes one DDIM step from t to *its own group's* next timestep, with the step noise of
   :func:`~.schedules.step_noise` (η > 0). Schedules that do not line up work too: a patch keeps its x_t
   through the timesteps of the other groups;
5. the groups whose schedule ends at t *leave*: their patches' x0 is handed back (the sampler blends it in).

Same patch, start noise, timesteps and step noise as in the per-group walk: only which patches share a call
changes, so a denoiser that treats the patches of a batch independently gives the same result up to float
rounding (matrix products blocked differently). Calls: sum over the union's timesteps of
ceil(active patches / batch_size) (:func:`count_calls`); with the paper's groups and every patch in one call,
20 instead of 8 + 14 + 20.

Memory: the x_t of every patch that has entered and not yet left, one (n, c, V, V) tensor per entry batch in
y0's dtype, and its prepared conditioning (the texture prompt of each such patch, not of one batch). At most all
M patches — (V/stride)² times the latent (4× at the default stride) plus M patches' conditioning — reached in
the paper's last 8 steps, where every patch is active. The denoiser sees at most ``batch_size`` patches at once.

Conditioning of one call: a whole entry batch's as prepared; otherwise the rows of its tensors whose first
dimension is the batch's number of patches are sliced and concatenated, and every other value (a number, a
string, a tensor shared by all patches) must be the same in each batch the call takes patches from.

The update is DDIM's on the scheduler's ᾱ table (``DDIMScheduler`` / ``DDPMScheduler``). Other diffusers
schedulers keep per-run state (multistep history, Heun's two calls per step, a step index) that belongs to one
batch, and group-parallel devices split the work per group: per_step refuses both (:func:`check_stepwise`).
Overlap fusion (:mod:`.fusion`) walks with the same :func:`union_walk` and :class:`ActivePatches`.
"""
from dataclasses import dataclass, field

import torch

from ..utils.errors import ConfigError, InputError
from .schedules import ALPHA_TABLE_SCHEDULERS, _call, alpha_bar, clip_range, ddim_step, q_sample, step_noise


def check_stepwise(scheduler, devices, what):
    """ConfigError unless ``what`` (a walk over all patches in step) can run with this scheduler and devices."""
    if type(scheduler).__name__ not in ALPHA_TABLE_SCHEDULERS:
        raise ConfigError(f"{what} uses the DDIM update of the scheduler's ᾱ table: use DDIMScheduler or "
                          f"DDPMScheduler, not {type(scheduler).__name__} (its own update keeps per-run state; "
                          f"it runs with execution: per_group)")
    if devices and len(devices) > 1:
        raise ConfigError(f'{what} walks every patch in step on one device; group-parallel devices '
                          f'({len(devices)} given) need execution: per_group and fuse_overlaps: false')


@dataclass(frozen=True)
class WalkStep:
    """One timestep of the walk: the groups that step at t, those that enter or leave there, and each stepping
    group's next timestep (-1 after its last)."""

    t: int
    groups: tuple
    entering: tuple
    leaving: tuple
    prev: dict = field(hash=False)


def union_walk(timesteps):
    """[WalkStep] over the union of the groups' ``timesteps`` (descending lists; empty for a group without
    patches), from high to low."""
    steps = []
    for t in sorted({t for ts in timesteps for t in ts}, reverse=True):
        groups = tuple(g for g, ts in enumerate(timesteps) if t in ts)
        prev = {g: (timesteps[g][timesteps[g].index(t) + 1] if t != timesteps[g][-1] else -1) for g in groups}
        steps.append(WalkStep(t, groups, tuple(g for g in groups if timesteps[g][0] == t),
                              tuple(g for g in groups if timesteps[g][-1] == t), prev))
    return steps


def count_calls(timesteps, counts, batch_size):
    """Denoiser calls of the walk across groups: per timestep, ceil(patches of the groups stepping there / batch)."""
    return sum(-(-sum(counts[g] for g in step.groups) // batch_size) for step in union_walk(timesteps))


@dataclass
class Segment:
    """One entry batch: ≤ batch_size patches of one group (flat indices over (B, M), on the latent's device),
    their prepared conditioning, and, in the per-step walk, their x_t."""

    group: int
    idx: torch.Tensor
    cond: object
    x: torch.Tensor = None

    def __len__(self):
        return len(self.idx)


class ActivePatches:
    """The segments that have entered and not left, cut into denoiser calls.

    ``across_groups``: a call takes up to ``batch_size`` rows from the stepping segments in entry order (the
    per-step batching); else every segment is a call of its own (the per-group batching)."""

    def __init__(self, batch_size, across_groups=True):
        self.batch_size, self.across_groups = int(batch_size), across_groups
        self.segments = []

    def enter(self, segments):
        self.segments += segments

    def leave(self, groups):
        """Drop the segments of ``groups`` and return them."""
        gone = [s for s in self.segments if s.group in groups]
        self.segments = [s for s in self.segments if s.group not in groups]
        return gone

    def calls(self, groups):
        """The calls at a timestep where ``groups`` step: lists of pieces (segment, lo, hi), rows lo:hi."""
        stepping = [s for s in self.segments if s.group in groups]
        if not self.across_groups:
            return [[(s, 0, len(s))] for s in stepping]
        calls, call, room = [], [], self.batch_size
        for s in stepping:
            lo = 0
            while lo < len(s):
                hi = min(len(s), lo + room)
                call.append((s, lo, hi))
                room, lo = room - (hi - lo), hi
                if not room:
                    calls.append(call)
                    call, room = [], self.batch_size
        return calls + [call] if call else calls


def call_rows(pieces, name):
    """The pieces' rows of a segment tensor (``idx`` or ``x``), concatenated (a view for one piece)."""
    parts = [getattr(s, name)[lo:hi] for s, lo, hi in pieces]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def call_cond(pieces):
    """The conditioning of one call (see the module docstring)."""
    s, lo, hi = pieces[0]
    if len(pieces) == 1 and lo == 0 and hi == len(s):
        return s.cond
    return _merge([s.cond for s, _, _ in pieces], pieces)


def _merge(values, pieces):
    first = values[0]
    if all(torch.is_tensor(v) and v.dim() and v.shape[0] == len(s) for v, (s, _, _) in zip(values, pieces)):
        parts = [v[lo:hi] for v, (_, lo, hi) in zip(values, pieces)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    if isinstance(first, dict) and all(isinstance(v, dict) and v.keys() == first.keys() for v in values):
        return {k: _merge([v[k] for v in values], pieces) for k in first}
    if all(v is first for v in values):
        return first
    if not any(torch.is_tensor(v) for v in values) and all(_equal(v, first) for v in values):
        return first
    raise InputError(f'execution: per_step puts patches of several prepare_cond batches into one call: a value of '
                     f'their conditioning ({type(first).__name__}) is neither per patch (a tensor whose first '
                     f'dimension is the batch\'s patches) nor the same in every batch; use execution: per_group')


def _equal(a, b):
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def stepwise_walk(net, grid, y0, noise, timesteps, enter, finish, scheduler, prediction_type='sample', eta=0.0,
                  seed=0, batch_size=64, device=None, on_step=None, temperature=1.0):
    """The per-step walk of the module docstring on the padded latent ``y0`` / ``noise`` (B, c, hp, wp) of
    ``grid`` (a :class:`PatchGrid` of the padded size), the denoiser ``net`` running on ``device`` (default:
    y0's). ``timesteps[g]``: group g's schedule (empty for a group without patches). ``enter(g)`` -> [Segment]
    (x unset) of group g, called at its first timestep; ``finish(segment)`` gets each segment as its group leaves,
    ``segment.x`` (on ``device``) its x0. ``noise`` is the start noise as the sampler scaled it; ``temperature``
    scales the step noise (η > 0) the same way."""
    device = torch.device(device or y0.device)
    clip = clip_range(scheduler)
    active = ActivePatches(batch_size)
    for step in union_walk(timesteps):
        a_t = alpha_bar(scheduler, step.t)
        for g in step.entering:
            segments = enter(g)
            for s in segments:  # Eq. 7
                s.x = q_sample(grid.gather(y0, s.idx).to(device), grid.gather(noise, s.idx).to(device), a_t)
            active.enter(segments)
        eps = step_noise(seed, step.t, noise.shape, temperature).to(noise.device, noise.dtype) if eta else None
        for pieces in active.calls(step.groups):
            x = call_rows(pieces, 'x')
            out = _call(net, x, step.t, call_cond(pieces), x.dtype)
            at = 0
            for s, lo, hi in pieces:
                n = hi - lo
                e = grid.gather(eps, s.idx[lo:hi]).to(device) if eta else None
                s.x[lo:hi] = ddim_step(out[at:at + n], x[at:at + n], a_t, alpha_bar(scheduler, step.prev[s.group]),
                                       prediction_type, eta, e, clip)
                at += n
            if on_step:
                on_step()
        for s in active.leave(step.leaving):
            finish(s)
