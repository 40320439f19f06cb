"""PGS — Patch-adaptive Group Sampling (section 3.2, Eq. 2 and 5–7, Fig. 4), for any diffusion denoiser.

The coarse HR latent y0 is split into overlapping V×V patches; each patch is graded by its mean confidence
(Qmap) into groups; group g enters the reverse diffusion at its own step τ_g from
y_τ = sqrt(ᾱ_τ)·y0 + sqrt(1 - ᾱ_τ)·ε and takes N_g steps; the denoised patches are blended back::

    sampler = SAMPLERS.build(dict(type='PatchGroupSampler', patch_size=16))   # paper configuration
    x0, report = sampler.sample(lambda x_t, t, cond: net(torch.cat([cond, x_t], 1), t), y0, confidence, cond=y0)
    print(report.summary())   # patches per group, NFE, and the uniform-sampling NFE it replaces

Conditioning. ``cond`` is a tensor or a dict of them. A tensor must be spatial, (B, C, h, w) over the
latent's (h, w): it is read on the same patch grid as y0, so patch m of y0 and of cond line up. A
:class:`PerPatch` tensor (B, M, ...) already holds one entry per patch and is sliced. Values that are not
tensors (None, numbers, strings) are passed through unchanged.
``prepare_cond(cond_batch) -> cond_batch`` runs once per batch of patches before its first step, for
time-independent conditioning such as the texture prompt: computed once per patch, reused for all steps.
If it has a ``denoiser`` parameter, it gets the denoiser that batch runs on (the copy on that device).

Memory. Patches are read from y0, the noise and spatial conditioning batch by batch and blended into the
latent as they come (:class:`PatchBlender`): the per-group walk holds y0, its noise and a float64 sum of the latent,
never the full set of patches (4× the latent at stride V/2), so its memory grows with the image, not with the
overlap (``execution: per_step`` holds more, see Execution).

Randomness. ε of Eq. 7 is drawn once for the whole latent (B, c, h, w) from ``seed`` on the CPU and then read patch
by patch, so overlapping patches see the same noise at the same pixel, a patch's start does not depend on the batch
size, the grouping or the devices, and a seed gives the same start on CPU and GPU. The noise of stochastic DDIM
steps (η > 0) is drawn the same way, one latent per timestep from (seed, t)
(:func:`~patchscaler.sampling.schedules.step_noise`): a patch's trajectory does not depend on the batch size or the
execution either. ``temperature`` scales every one of these draws (ε of Eq. 7, the hard group's x_T, the DDIM step
noise; not the noise a stochastic diffusers scheduler draws itself): below 1 the walk samples less detail and stays
closer to y0 (a fidelity-realism knob, see the class docstring). The per-group walk keeps the step-noise latents of
all its timesteps for the call (20 latents for the paper's groups; only with η > 0). Stochastic diffusers schedulers
(e.g. SDE-DPM-Solver++) draw from a generator seeded by (seed, group, first patch of the batch): seeded, but
dependent on the batch size.

Execution. ``execution: per_group`` (default) takes each batch of a group's patches through the group's whole
schedule: sum_g ceil(n_g / batch_size)·N_g denoiser calls; it holds one batch's x_t. ``per_step`` walks the
union of the groups' timesteps and denoises all patches active at a timestep in calls of up to ``batch_size``
patches across groups (:mod:`patchscaler.sampling.stepwise`): for the paper's groups with every patch in one
batch, 20 calls instead of 42; the same result up to float rounding; it holds the x_t and prepared conditioning
of every patch that has entered and not finished (at most all M patches). DDIM/DDPM schedulers on one device only.

Devices. ``devices=['cuda:0', 'cuda:1']`` runs groups concurrently, one thread per device (the paper puts
the hard group on one GPU and the others on a second, +33.7 %). Groups go to devices by
``device_groups`` or, by default, longest-processing-time first on the groups' NFE. Every patch is computed
as in the sequential run (worker threads inherit the caller's grad mode and autocast); the blend adds them in
the order the devices finish, which can change the last bit of a few float32 values. ``denoiser`` may be a list
with one denoiser per device; an ``nn.Module`` is copied to each other device on every call (pass a list
to avoid that copy). Without ``devices``, everything runs where y0 is.
"""
import contextlib
import copy
import inspect
import threading
import time
import warnings

import torch

from ..registry import SAMPLERS
from ..utils.device import placement
from ..utils.errors import ConfigError, InputError
from .fusion import check_fusable, fused_walk, timelines
from .grouping import GroupAssigner, check_confidence
from .patches import PatchGrid, blend_window
from .report import PGSReport
from .schedules import (
    ALPHA_TABLE_SCHEDULERS,
    build_scheduler,
    calls_per_patch,
    denoise,
    group_schedules,
    schedules_aligned,
    step_noise,
)
from .stepwise import Segment, check_stepwise, count_calls, stepwise_walk

PAPER_GROUPS = ({'tau': 400, 'steps': 8}, {'tau': 700, 'steps': 14}, {'tau': 1000, 'steps': 20})
GROUP_NAMES = {1: ('all',), 2: ('simple', 'hard'), 3: ('simple', 'medium', 'hard')}
EXECUTIONS = ('per_group', 'per_step')
#: named placements of the groups on two or more devices (``device_split``; ``tools/infer.py --device-split``)
DEVICE_SPLITS = {'paper': 'the hardest group on the first device, the others on the second (the paper: +33.7 %)',
                 'lpt': "per image, longest-processing-time first on the groups' NFE (the default)"}


class PerPatch:
    """Marks conditioning that is already per patch, (B, M, ...), so the sampler slices it by patch."""

    def __init__(self, tensor):
        self.tensor = tensor


class _Spatial:
    """A spatial conditioning tensor (padded like y0 where the latent is below V), read patch by patch."""

    def __init__(self, tensor):
        self.tensor = tensor


def _lpt(loads, num_devices):
    """Longest-processing-time-first: heaviest group to the least-loaded device."""
    buckets, totals = [[] for _ in range(num_devices)], [0] * num_devices
    for g in sorted(range(len(loads)), key=lambda g: -loads[g]):
        d = totals.index(min(totals))
        buckets[d].append(g)
        totals[d] += loads[g]
    return buckets


@SAMPLERS.register_module()
class PatchGroupSampler:
    """Patch-adaptive group sampling; defaults are the paper's (V=16, γ=(0.95, 0.75), τ=(400,700,1000), N=(8,14,20)).

    Args:
        patch_size (int): V, in latent pixels. stride (int): patch stride (default V // 2).
        groups (list): per group, easiest first, ``{tau, steps}``, or ``{timesteps: [...]}`` (its own timesteps).
        timestep_spacing (str): how ``{tau, steps}`` is spaced: 'trailing' (default, the paper's DDIM walk ending at
            τ/N - 1) or 'respaced' (StableSR's: from τ - 1 down to 0, see :func:`~.schedules.respaced_timesteps`).
        grouping (dict): ``{mode: threshold|quantile|share, thresholds|quantiles|shares: [...]}``, see
            :mod:`patchscaler.sampling.grouping`. Default: Eq. 2 with the paper's thresholds.
        scheduler (dict | diffusers scheduler): its ᾱ table (DDIM update) or its own update, see
            :mod:`patchscaler.sampling.schedules`. Default: DDIM, DiT's linear betas, T = 1000.
        prediction_type (str): what the denoiser predicts: 'sample' (x0, Patch-DiT), 'epsilon', 'v_prediction';
            default: the scheduler's own if it names one, else 'sample'.
        eta (float): DDIM η (0 = deterministic; 1 = ancestral DDPM on the chosen timesteps: StableSR's sampler).
        temperature (float): scale of the sampler's noise draws, ε and the DDIM step noise (default 1: the model's own
            distribution; a stochastic diffusers scheduler's own noise is not scaled). Below 1 the
            start y_τ = sqrt(ᾱ_τ)·y0 + temperature·sqrt(1 - ᾱ_τ)·ε holds less noise than the model expects at τ, so
            it turns less of it into detail: the output moves from a sample towards y0, trading detail for
            fidelity, as SRFlow's sampling temperature and StableSR's CFW weight w do. 0 is the deterministic walk
            from sqrt(ᾱ_τ)·y0. The paper samples at 1; the CPU demo at 0.3, chosen by measurement
            (docs/detail_evaluation.md, "Why the demo added grain").
        batch_size (int): patches per denoiser call.
        blend (str), blend_sigma (float): patch blending window, see :mod:`patchscaler.sampling.patches`.
        seed (int): seed of ε. uniform_steps (int): the uniform sampler the report compares with
            (default: the hardest group's N, i.e. every patch treated as hard — the paper's "unified" setting).
        devices (list), device_groups (list of lists), device_split (str): group-parallel sampling, see the module
            docstring and :meth:`place`; ``device_split: paper`` is the paper's hard group alone on the first device
            and the others on the second.
        progress (bool): a tqdm bar over denoiser calls.
        fuse_overlaps (bool): walk the timesteps in step and fuse overlapping patches at every step where they
            share a timestep (:mod:`patchscaler.sampling.fusion`); False: each patch's whole schedule on its own,
            blended once at the end. The same NFE either way.
        execution (str): 'per_group' (default): each batch of a group's patches runs its whole schedule;
            'per_step': walk the union of the groups' timesteps and denoise every patch active at a timestep in
            calls of up to batch_size patches across groups (:mod:`patchscaler.sampling.stepwise`): fewer calls,
            the same result; DDIM/DDPM schedulers and one device only. With ``fuse_overlaps`` it picks how the
            fused walk batches its calls.
    """

    def __init__(self, patch_size=16, stride=None, groups=PAPER_GROUPS, grouping=None, scheduler=None,
                 prediction_type=None, eta=0.0, batch_size=64, blend='gaussian', blend_sigma=0.1, seed=0,
                 uniform_steps=None, devices=None, device_groups=None, progress=False, fuse_overlaps=False,
                 execution='per_group', device_split=None, timestep_spacing='trailing', temperature=1.0):
        self.scheduler, prediction_type = build_scheduler(scheduler, prediction_type)
        self.groups, self.timesteps = group_schedules(groups, timestep_spacing,
                                                      int(self.scheduler.config.num_train_timesteps))
        self.timestep_spacing = timestep_spacing
        self.calls = [calls_per_patch(self.scheduler, ts) for ts in self.timesteps]  # NFE per patch, per group
        if eta and type(self.scheduler).__name__ not in ALPHA_TABLE_SCHEDULERS:
            raise ConfigError(f'eta applies to the DDIM update; {type(self.scheduler).__name__} has its own '
                              f'stochasticity options')
        grouping = dict(grouping or {})
        self.assigner = GroupAssigner(len(self.groups), **grouping)
        PatchGrid.for_shape(1, 1, patch_size, stride)  # validates V and stride now, not at the first call
        self.patch_size, self.stride = int(patch_size), stride
        self.prediction_type, self.eta = prediction_type, float(eta)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not 0 <= temperature < float('inf'):
            raise ConfigError(f"temperature must be a number >= 0 (1: the model's distribution), got {temperature!r}")
        self.temperature = float(temperature)
        if int(batch_size) < 1:
            raise ConfigError(f'batch_size must be >= 1, got {batch_size}')
        self.batch_size, self.blend, self.blend_sigma = int(batch_size), blend, float(blend_sigma)
        self.seed = int(seed)
        self.uniform_steps = int(uniform_steps or max(self.calls))
        blend_window(blend, 2, blend_sigma)  # a bad window is an error now, not after all the sampling
        self.progress = progress
        self.fuse_overlaps = bool(fuse_overlaps)
        if execution not in EXECUTIONS:
            raise ConfigError(f'execution must be one of {EXECUTIONS}, got {execution!r}')
        self.execution = execution
        if device_split is not None and device_split not in DEVICE_SPLITS:
            raise ConfigError(f'device_split must be one of {", ".join(DEVICE_SPLITS)}, got {device_split!r}')
        if device_split is not None and device_groups is not None:
            raise ConfigError('sampler: give device_groups or device_split, not both')
        if device_groups is not None:
            flat = sorted(g for gs in device_groups for g in gs)
            if flat != list(range(len(self.groups))):
                raise ConfigError(f'device_groups must list every group index 0..{len(self.groups) - 1} exactly once, '
                                  f'one list per device, got {device_groups}')
        self._device_groups, self.device_split = device_groups, device_split
        self._warned_placement = False
        self.place(devices)
        n = len(self.groups)
        self.group_names = GROUP_NAMES.get(n, tuple(f'group{g}' for g in range(n)))

    def place(self, devices):
        """Group-parallel sampling on ``devices`` (None: where y0 is): the groups go to the devices by
        ``device_groups``, ``device_split`` (:data:`DEVICE_SPLITS`) or, by default, longest-processing-time
        first. Checked here, so the sampler file can name a placement that the devices given later (``tools/infer.py
        --devices``, ``pgs_devices``) complete."""
        self.devices = [torch.device(d) for d in devices] if devices else None
        n_dev, n_groups = len(self.devices or ()), len(self.groups)
        groups = self._device_groups
        if self.device_split == 'paper' and self.devices:
            if n_dev != 2 or n_groups < 2:
                raise ConfigError(f"device_split 'paper' puts the hard group on one device and the others on a second:"
                                  f" it needs 2 devices and 2+ groups, got {n_dev} device(s) and {n_groups} group(s)")
            groups = [[n_groups - 1], list(range(n_groups - 1))]
        if groups is not None and self.devices and len(groups) != n_dev:
            raise ConfigError(f'device_groups has {len(groups)} lists for {n_dev} devices ({groups})')
        self.device_groups = groups if self.devices else None
        if self.fuse_overlaps:
            check_fusable(self.scheduler, self.devices)
        if self.execution == 'per_step':
            check_stepwise(self.scheduler, self.devices, 'execution: per_step')

    # ---------------------------------------------------------------- conditioning
    @staticmethod
    def _split_cond(cond, grid, batch):
        """A slicer(idx, device) of the conditioning of patches ``idx``: spatial tensors are read patch by patch
        (:meth:`PatchGrid.gather`), PerPatch ones flattened to (B·M, ...) and indexed."""
        def prepare(c):
            if isinstance(c, PerPatch):
                t = c.tensor
                if t.shape[:2] != (batch, grid.num_patches):
                    raise InputError(f'PerPatch conditioning must be (B, M, ...) = ({batch}, {grid.num_patches}, ...),'
                                     f' got {tuple(t.shape)}')
                return t.reshape(batch * grid.num_patches, *t.shape[2:])
            if torch.is_tensor(c):
                if c.dim() != 4 or c.shape[0] != batch or tuple(c.shape[-2:]) != (grid.height, grid.width):
                    raise InputError(f'spatial conditioning must be (B, C, h, w) with (B, h, w) = ({batch}, '
                                     f'{grid.height}, {grid.width}) like y0, got {tuple(c.shape)}; wrap per-patch '
                                     f'tensors in PerPatch')
                return _Spatial(grid.pad(c))
            return c

        flat = {k: prepare(v) for k, v in cond.items()} if isinstance(cond, dict) else prepare(cond)
        padded = PatchGrid.for_shape(*grid.padded_size, grid.patch_size, grid.stride)

        def slicer(idx, device):
            def take(c):
                if isinstance(c, _Spatial):
                    return padded.gather(c.tensor, idx.to(c.tensor.device)).to(device)
                return c[idx.to(c.device)].to(device) if torch.is_tensor(c) else c
            return {k: take(v) for k, v in flat.items()} if isinstance(flat, dict) else take(flat)
        return slicer

    # ---------------------------------------------------------------- grouping
    def assign(self, confidence, latent_shape):
        """(groups (B, M), Qmap (B, M), thresholds (B, G-1), grid) for a confidence map over the latent."""
        grid = PatchGrid.for_shape(latent_shape[-2], latent_shape[-1], self.patch_size, self.stride)
        if confidence is None:
            if len(self.groups) != 1:
                raise InputError(f'{len(self.groups)} groups need a confidence map; pass confidence=..., or '
                                 'configure one group for uniform sampling')
            q = torch.ones(latent_shape[0], grid.num_patches)
            return torch.zeros_like(q, dtype=torch.long), q, q.new_zeros(latent_shape[0], 0), grid
        c = check_confidence(confidence, latent_shape)
        qmap = grid.patch_mean(c)
        groups, thr = self.assigner.assign(qmap)
        return groups, qmap, thr, grid

    def nfe(self, groups):
        """(NFE of PGS, NFE of uniform sampling) for a (B, M) group map: patch evaluations, exact."""
        return int(torch.tensor(self.calls)[groups.long().cpu()].sum()), groups.numel() * self.uniform_steps

    # ---------------------------------------------------------------- sampling
    def _plan(self, groups_flat, home):
        """Per device, the batches [(group, its first patch (an int), patch indices on ``home``)], hardest group
        first; and the patches per group. The indices reach ``home`` in one copy and the first patches are read on
        the CPU: no host-device sync per batch."""
        n_dev = len(self.devices) if self.devices else 1
        by_group = [torch.nonzero(groups_flat == g).flatten() for g in range(len(self.groups))]
        counts = [len(idx) for idx in by_group]
        on_home = torch.cat(by_group).to(home).split(counts)
        buckets = self.device_groups or _lpt([c * n for c, n in zip(counts, self.calls)], n_dev)
        plan = [[] for _ in range(n_dev)]
        for d, gs in enumerate(buckets):
            for g in sorted(gs, reverse=True):
                firsts = by_group[g][::self.batch_size].tolist()
                plan[d] += [(g, first, on_home[g][i:i + self.batch_size])
                            for first, i in zip(firsts, range(0, counts[g], self.batch_size))]
        return plan, counts

    def count_calls(self, counts):
        """Denoiser calls of one :meth:`sample` with ``counts`` patches per group (what the progress bar counts)."""
        per_group = sum(-(-c // self.batch_size) * n for c, n in zip(counts, self.calls))
        if self.execution == 'per_group':
            return per_group
        timesteps = [ts if c else [] for ts, c in zip(self.timesteps, counts)]
        if not self.fuse_overlaps:
            return count_calls(timesteps, counts, self.batch_size)
        return sum(count_calls([ts if g in line else [] for g, ts in enumerate(timesteps)], counts, self.batch_size)
                   for line in timelines(timesteps))

    def replicate(self, denoiser, devices=None):
        """One denoiser per device of ``devices`` (default: the sampler's): ``denoiser`` itself where it already
        is, a copy elsewhere. Pass the list to :meth:`sample` to copy once instead of on every call."""
        devices = devices or self.devices or []
        if isinstance(denoiser, (list, tuple)):
            if len(denoiser) != len(devices):
                raise ConfigError(f'{len(denoiser)} denoisers given for {len(devices)} devices')
            return list(denoiser)
        if isinstance(denoiser, torch.nn.Module) and self.devices:
            home = placement(denoiser)[0]
            same = [torch.device(d).type == home.type and (torch.device(d).index or 0) == (home.index or 0)
                    for d in devices]
            return [denoiser if s else copy.deepcopy(denoiser).to(d) for d, s in zip(devices, same)]
        if len({str(d) for d in devices}) > 1:
            raise ConfigError('group-parallel sampling on several devices needs one denoiser per device '
                              '(a list) or an nn.Module to copy')
        return [denoiser] * len(devices)

    @torch.no_grad()
    def sample(self, denoiser, y0, confidence=None, cond=None, prepare_cond=None, groups=None, seed=None):
        """Denoise y0 (B, c, h, w) patch by patch, each group with its own (τ, N); returns (x0, PGSReport).

        ``confidence``: (B, 1, h, w) in [0, 1] over y0 (the GRM's C), graded by Eq. 2. ``groups``: a (B, M)
        long tensor that overrides the grading (e.g. from :meth:`assign` on another map).
        """
        if not torch.is_tensor(y0) or y0.dim() != 4 or not y0.is_floating_point():
            raise InputError(f'y0 must be a float tensor (B, c, h, w), got '
                             f'{tuple(y0.shape) if torch.is_tensor(y0) else type(y0).__name__}')
        start = time.perf_counter()
        if not self.devices and (self._device_groups is not None or self.device_split == 'paper') \
                and not self._warned_placement:
            self._warned_placement = True
            warnings.warn('the sampler places its groups on devices (device_groups / device_split) but runs on one '
                          'device: nothing to place (tools/infer.py --devices cuda:0,cuda:1, or pgs_devices, gives '
                          'the devices)', stacklevel=2)
        b = y0.shape[0]
        if groups is None:
            groups, qmap, thr, grid = self.assign(confidence, y0.shape)
        else:
            grid = PatchGrid.for_shape(y0.shape[-2], y0.shape[-1], self.patch_size, self.stride)
            if groups.is_floating_point() or tuple(groups.shape) != (b, grid.num_patches) or groups.min() < 0 \
                    or groups.max() >= len(self.groups):
                raise InputError(f'groups must be an integer (B, M) = ({b}, {grid.num_patches}) tensor with values in '
                                 f'[0, {len(self.groups) - 1}], got {groups.dtype} {tuple(groups.shape)}')
            qmap, thr = torch.full(groups.shape, float('nan')), torch.zeros(b, 0)
        groups = groups.to(torch.long).cpu()
        seed = self.seed if seed is None else int(seed)
        # drawn over the padded size: a latent smaller than V gets i.i.d. noise in its padding, not a reflection
        hp, wp = grid.padded_size
        noise = torch.randn(b, y0.shape[1], hp, wp, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        noise = (noise * self.temperature if self.temperature != 1 else noise).to(y0.device, y0.dtype)
        # a latent below V is padded once here, not on every batch's read: patches come from the padded grid
        padded = PatchGrid.for_shape(hp, wp, grid.patch_size, grid.stride)
        y0_src = grid.pad(y0)
        cond_at = self._split_cond(cond, grid, b)
        # patches are read from y0 and the noise batch by batch and blended in as they come (bounded memory)
        blender = grid.blender(b, y0.shape[1], self.blend, self.blend_sigma, y0.device)
        groups_flat = groups.flatten()
        plan, counts = self._plan(groups_flat, y0.device)
        devices = self.devices or [y0.device]
        takes_net = prepare_cond is not None and 'denoiser' in inspect.signature(prepare_cond).parameters
        nets = self.replicate(denoiser, devices)
        timesteps = [ts if c else [] for ts, c in zip(self.timesteps, counts)]  # groups without patches: no walk
        stats = {'calls': 0, 'cond': 0, 'seconds': {}}
        lock = threading.Lock()
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.count_calls(counts), desc='PGS', unit='call', leave=False)

        def on_step():
            with lock:
                stats['calls'] += 1
                if bar is not None:
                    bar.update(1)

        def prepared(idx, dev, net):
            """The conditioning of patches ``idx``, prepared once for all their steps."""
            c = cond_at(idx, dev)
            if prepare_cond is not None:
                c = prepare_cond(c, denoiser=net) if takes_net else prepare_cond(c)
                with lock:
                    stats['cond'] += 1
            return c

        def enter(g):
            """Group g's batches as they enter a step-synchronous walk (one device)."""
            dev = torch.device(devices[0])
            return [Segment(g, home, prepared(home, dev, nets[0])) for gg, _, home in plan[0] if gg == g]

        # grad mode and autocast are thread-local: worker threads get the caller's, so a threaded run computes
        # exactly what the sequential one does (and builds no autograd graph)
        grad = torch.is_grad_enabled()
        autocast = {t: (torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in {d.type for d in devices}}

        def run_device(d):
            dev = torch.device(devices[d])
            on, dtype = autocast[dev.type]
            with torch.set_grad_enabled(grad), torch.autocast(dev.type, dtype=dtype, enabled=on), \
                    (torch.cuda.device(dev) if dev.type == 'cuda' else contextlib.nullcontext()):
                run_batches(d, dev)

        def run_batches(d, dev):
            t0, net = time.perf_counter(), nets[d]
            # η > 0: each timestep's step noise, drawn once for the whole latent and read batch by batch
            eps = {t: step_noise(seed, t, noise.shape, self.temperature).to(y0.device, y0.dtype)
                   for t in {t for g, _, _ in plan[d] for t in self.timesteps[g]}} if self.eta else {}
            for g, first, home in plan[d]:
                c = prepared(home, dev, net)
                gen = torch.Generator().manual_seed(hash((seed, g, first)) % 2 ** 63)
                noise_at = (lambda t, home=home: padded.gather(eps[t], home).to(dev)) if self.eta else None
                x = denoise(net, padded.gather(y0_src, home).to(dev), padded.gather(noise, home).to(dev), c,
                            self.timesteps[g], self.scheduler, self.prediction_type, self.eta, gen, on_step,
                            noise_at)
                with lock:
                    blender.add(home, x.to(y0.device, y0.dtype))
            stats['seconds'][f'{d}:{devices[d]}'] = time.perf_counter() - t0

        def run_stepwise():
            t0 = time.perf_counter()
            stepwise_walk(nets[0], padded, y0_src, noise, timesteps, enter,
                          lambda s: blender.add(s.idx, s.x.to(y0.device, y0.dtype)), self.scheduler,
                          self.prediction_type, self.eta, seed, self.batch_size, devices[0], on_step,
                          temperature=self.temperature)
            stats['seconds'][f'0:{devices[0]}'] = time.perf_counter() - t0

        def run_fused():
            t0 = time.perf_counter()
            for line, x in fused_walk(nets[0], padded, y0_src, noise, timesteps, enter, self.scheduler,
                                      self.prediction_type, self.eta, self.blend, self.blend_sigma, seed,
                                      self.batch_size, self.execution == 'per_step', devices[0], on_step,
                                      temperature=self.temperature):
                for g in line:
                    for home in [home for gg, _, home in plan[0] if gg == g]:
                        blender.add(home, padded.gather(x, home).to(y0.dtype))
            stats['seconds'][f'0:{devices[0]}'] = time.perf_counter() - t0

        try:
            if self.fuse_overlaps:
                run_fused()
            elif self.execution == 'per_step':
                run_stepwise()
            elif len(plan) == 1:
                run_batches(0, torch.device(devices[0]))
            else:
                self._run_threads(run_device, len(plan))
        finally:
            if bar is not None:
                bar.close()
        noise = None  # freed before the result is made (one latent less at the peak)
        x0 = blender.result(y0.dtype)
        nfe_per_patch = torch.tensor(self.calls)[groups]
        nfe_total, nfe_uniform = self.nfe(groups)
        report = PGSReport(
            group_names=self.group_names, taus=tuple(t for t, _ in self.groups),
            steps=tuple(self.calls), timesteps=tuple(tuple(ts) for ts in self.timesteps),
            aligned=schedules_aligned(self.timesteps), patches_per_group=tuple(counts),
            nfe_per_patch=nfe_per_patch, nfe_total=nfe_total, nfe_uniform=nfe_uniform, uniform_steps=self.uniform_steps,
            denoiser_calls=stats['calls'], cond_calls=stats['cond'], execution=self.execution, qmap=qmap.cpu(),
            groups=groups,
            thresholds=thr.cpu(), grid=grid, seconds=time.perf_counter() - start,
            seconds_per_device=stats['seconds'])
        return x0, report

    @staticmethod
    def _run_threads(fn, n):
        errors = []

        def guarded(d):
            try:
                fn(d)
            except BaseException as e:  # re-raised in the caller's thread below
                errors.append(e)
        threads = [threading.Thread(target=guarded, args=(d,), name=f'pgs-device{d}') for d in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


def sample(denoiser, y0, confidence=None, cond=None, prepare_cond=None, **sampler_options):
    """One-shot PGS: ``PatchGroupSampler(**sampler_options).sample(denoiser, y0, confidence, cond, prepare_cond)``."""
    return PatchGroupSampler(**sampler_options).sample(denoiser, y0, confidence, cond, prepare_cond)


def sampler_options(opt):
    """The sampler options ``{type: ..., ...}`` of a dict, a dict with a ``sampler`` section, or the path of a YAML
    file with one (``options/samplers/pgs_paper.yml``)."""
    if isinstance(opt, str):  # read as option files are (a key given twice refused, 3e-1 a float)
        from ..utils.option_yaml import load_yaml
        with open(opt, encoding='utf-8') as f:
            opt = load_yaml(f)
    if isinstance(opt, dict) and 'sampler' in opt and 'type' not in opt:
        opt = opt['sampler']
    return opt


def build_sampler(opt):
    """A sampler from options (what :func:`sampler_options` reads: a dict or a YAML path). Unknown keys are
    one-line ConfigErrors."""
    from ..utils.options_check import build_from_registry
    return build_from_registry(SAMPLERS, sampler_options(opt), 'sampler')
