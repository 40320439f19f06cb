"""Per-group timestep schedules, the start point y_τ (Eq. 7) and one group's reverse process.

Pure functions of a schedule in the spirit of diffusers' schedulers, with no state between calls.

Schedules. A group with entry step τ and N steps denoises at the "trailing" timesteps of the interval
[0, τ): ``t_k = round(τ - k·τ/N) - 1``, k = 0 … N-1 (0-based diffusers time; the paper's 1-based ᾱ_τ is
``alphas_cumprod[τ - 1]``). The sampler's ``timestep_spacing: respaced`` gives StableSR's spacing instead
(:func:`respaced_timesteps`: from τ - 1 down to 0), and a group may list its own ``timesteps``.
For the paper's τ = (400, 700, 1000), N = (8, 14, 20), τ/N = 50 for every
group, so each group's schedule is the tail of the hardest group's 20-step trailing DDIM schedule
(999, 949, …, 49): they differ only in where they enter. Pairs whose τ/N differ (e.g. τ=500, N=7) still
work: the group gets its own trailing schedule on [0, τ), ending near t = τ/N - 1 instead of at a shared
final step; :func:`schedules_aligned` tells which case a configuration is.

Start point (Eq. 7). The reverse process of a group starts at its first timestep t_0 = τ - 1 from
``y_τ = sqrt(ᾱ)·y0 + sqrt(1 - ᾱ)·ε`` — diffusers' ``add_noise`` — with ε drawn by the caller.

Update rule. ``DDIMScheduler`` and ``DDPMScheduler`` use :func:`ddim_step` below: deterministic for
η = 0, DDPM-like ancestral for η = 1; after the last timestep ᾱ_prev = the scheduler's
``final_alpha_cumprod`` (1.0 with ``set_alpha_to_one``), so the last step returns the model's x0 estimate.
Its noise for η > 0 is :func:`step_noise`, one draw per latent pixel and timestep.
Other diffusers schedulers (DPM-Solver++, Euler, Heun, LCM, … — those whose ``set_timesteps`` takes
custom timesteps) plug in unchanged: a
fresh copy per batch gets ``set_timesteps(timesteps=...)`` and drives ``add_noise`` /
``scale_model_input`` / ``step``; they must accept custom timesteps. The denoiser gets the scheduler's own
timestep values (a float tensor where they are fractional, :func:`timestep_batch`). A DDIM/DDPM scheduler built from a
dict gets ``clip_sample: false`` unless the dict says otherwise: diffusers' default clamps the x0 estimate
to ±1, which suits pixel-space models, not latents.
"""
import inspect

import torch

from ..utils.errors import ConfigError, InputError

PREDICTION_TYPES = ('sample', 'epsilon', 'v_prediction')
ALPHA_TABLE_SCHEDULERS = ('DDIMScheduler', 'DDPMScheduler')
# DiT's schedule (Patch-DiT is built on DiT): linear betas 1e-4 .. 0.02 over T = 1000 steps.
DEFAULT_SCHEDULER = dict(type='DDIMScheduler', num_train_timesteps=1000, beta_schedule='linear',
                         beta_start=1e-4, beta_end=0.02, clip_sample=False, set_alpha_to_one=True,
                         timestep_spacing='trailing')


def trailing_timesteps(tau, steps, num_train_timesteps=1000):
    """The N trailing timesteps of [0, τ), descending: τ=1000, N=20 -> 999, 949, …, 49."""
    tau, steps = int(tau), int(steps)
    if not 1 <= tau <= num_train_timesteps:
        raise ConfigError(f'tau must be in [1, {num_train_timesteps}] (the scheduler has {num_train_timesteps} '
                          f'training steps), got {tau}')
    if not 1 <= steps <= tau:
        raise ConfigError(f'steps must be in [1, tau={tau}], got {steps}')
    return [round(tau - k * tau / steps) - 1 for k in range(steps)]


def respaced_timesteps(tau, steps, num_train_timesteps=1000):
    """The N timesteps of [0, τ) spaced as in guided-diffusion's ``space_timesteps(τ, [N])``, which StableSR's
    sampling uses (``sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py``): ``round(k·(τ-1)/(N-1))``, k = 0 … N-1,
    descending, so the walk starts at τ - 1 and ends at t = 0: τ=1000, N=20 -> 999, 946, …, 53, 0; N=4 ->
    999, 666, 333, 0 (StableSR-turbo)."""
    trailing_timesteps(tau, steps, num_train_timesteps)  # the same range checks
    tau, steps = int(tau), int(steps)
    stride = (tau - 1) / (steps - 1) if steps > 1 else 1
    taken, position = set(), 0.0
    for _ in range(steps):  # accumulated as space_timesteps does: its rounding, ties included
        taken.add(round(position))
        position += stride
    return sorted(taken, reverse=True)


#: how a group's {tau, steps} becomes timesteps (the sampler's ``timestep_spacing``)
TIMESTEP_SPACINGS = {'trailing': trailing_timesteps, 'respaced': respaced_timesteps}


def explicit_timesteps(timesteps, num_train_timesteps=1000):
    """A group's own timestep list, checked: distinct integers in [0, T), walked from the highest."""
    try:
        ts = [int(t) for t in timesteps]
    except (TypeError, ValueError):
        raise ConfigError(f'a group\'s timesteps must be a list of integers, got {timesteps!r}') from None
    if not ts or len(set(ts)) != len(ts) or not all(0 <= t < num_train_timesteps for t in ts) or \
            any(float(t) != float(o) for t, o in zip(ts, timesteps)):
        raise ConfigError(f'a group\'s timesteps must be distinct integers in [0, {num_train_timesteps}), got '
                          f'{list(timesteps)}')
    return sorted(ts, reverse=True)


def _parse_groups(groups):
    """[(tau, steps, explicit timesteps or None)] from ``{tau, steps}``, ``[tau, steps]`` or ``{timesteps: [...]}``
    (then τ = the highest timestep + 1 and N = their count)."""
    out = []
    for i, g in enumerate(groups):
        if isinstance(g, dict) and 'timesteps' in g:
            if set(g) - {'timesteps', 'tau', 'steps'}:
                raise ConfigError(f'groups[{i}] must be {{timesteps: [...]}}, got {g}')
            ts = g['timesteps']
            if not isinstance(ts, (list, tuple)) or not ts:
                raise ConfigError(f'groups[{i}].timesteps must be a non-empty list, got {ts!r}')
            tau, steps = max(int(t) for t in ts) + 1, len(ts)
            if int(g.get('tau', tau)) != tau or int(g.get('steps', steps)) != steps:
                raise ConfigError(f'groups[{i}]: tau/steps contradict its timesteps (tau = the highest + 1 = {tau}, '
                                  f'steps = their count = {steps}); give the timesteps alone')
            out.append((tau, steps, list(ts)))
        elif isinstance(g, dict):
            unknown = set(g) - {'tau', 'steps'}
            if unknown or not {'tau', 'steps'} <= set(g):
                raise ConfigError(f'groups[{i}] must be {{tau: ..., steps: ...}} or {{timesteps: [...]}}, got {g}')
            out.append((int(g['tau']), int(g['steps']), None))
        elif isinstance(g, (list, tuple)) and len(g) == 2:
            out.append((int(g[0]), int(g[1]), None))
        else:
            raise ConfigError(f'groups[{i}] must be {{tau: ..., steps: ...}} or [tau, steps], got {g!r}')
    if not out:
        raise ConfigError('PGS needs at least one group')
    return out


def group_schedules(groups, timestep_spacing='trailing', num_train_timesteps=1000):
    """([(τ, N)] per group, [its timesteps, descending] per group) of the sampler's ``groups`` option: a group's own
    ``timesteps``, else its {τ, N} spaced by ``timestep_spacing`` (:data:`TIMESTEP_SPACINGS`)."""
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ConfigError(f'timestep_spacing must be one of {sorted(TIMESTEP_SPACINGS)}, got {timestep_spacing!r}')
    parsed = _parse_groups(groups)
    timesteps = [explicit_timesteps(ts, num_train_timesteps) if ts is not None else
                 TIMESTEP_SPACINGS[timestep_spacing](tau, n, num_train_timesteps) for tau, n, ts in parsed]
    return [(tau, n) for tau, n, _ in parsed], timesteps


def schedules_aligned(timesteps_per_group):
    """True when every group's timesteps are the tail of the longest group's schedule (the paper's case)."""
    longest = max(timesteps_per_group, key=len)
    return all(ts == longest[len(longest) - len(ts):] for ts in timesteps_per_group)


def build_scheduler(scheduler=None, prediction_type=None):
    """(diffusers scheduler, prediction type) from an instance or a config dict ``{type: DDIMScheduler, ...}``.

    The prediction type is the sampler's ``prediction_type`` if given, else the scheduler's own (an instance,
    or a dict that names one), else 'sample' (x0, what Patch-DiT predicts). Given in both places and
    different, it is a ConfigError: a silently wrong parameterisation samples garbage.
    """
    import diffusers
    if scheduler is None:
        scheduler = dict(DEFAULT_SCHEDULER)
    if isinstance(scheduler, dict):
        kwargs = dict(scheduler)
        name = kwargs.pop('type', 'DDIMScheduler')
        cls = getattr(diffusers, str(name), None)
        if cls is None or not hasattr(cls, 'set_timesteps'):
            raise ConfigError(f"scheduler type '{name}' is not a diffusers scheduler")
        unknown = set(kwargs) - set(inspect.signature(cls.__init__).parameters)
        if unknown:
            raise ConfigError(f"scheduler {name} has no option(s) {sorted(unknown)}")
        if name in ALPHA_TABLE_SCHEDULERS:
            kwargs.setdefault('clip_sample', False)  # diffusers' default clamps x0 to ±1: right for pixels, not latents
        own = kwargs.get('prediction_type')
        scheduler = cls(**kwargs)
    else:
        own = scheduler.config.get('prediction_type')
    if prediction_type is not None and own is not None and own != prediction_type:
        raise ConfigError(f"prediction_type '{prediction_type}' of the sampler contradicts the scheduler's "
                          f"'{own}'; give it in one place")
    prediction_type = prediction_type or own or 'sample'
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type '{prediction_type}' is not one of {PREDICTION_TYPES}")
    if scheduler.config.get('thresholding'):
        raise ConfigError('dynamic thresholding is for pixel-space models; PGS runs on latents: set thresholding '
                          'false')
    if type(scheduler).__name__ not in ALPHA_TABLE_SCHEDULERS:
        params = inspect.signature(scheduler.set_timesteps).parameters
        if 'timesteps' not in params:
            raise ConfigError(f'{type(scheduler).__name__}.set_timesteps takes no custom timesteps, so it cannot '
                              f'run per-group schedules; use DDIMScheduler or e.g. DPMSolverMultistepScheduler')
        if scheduler.config.get('prediction_type') != prediction_type:
            scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)
    return scheduler, prediction_type


def calls_per_patch(scheduler, timesteps):
    """Denoiser calls one patch costs on ``timesteps``: one per step for DDIM; for other schedulers, as many
    as their own timestep list after ``set_timesteps`` (Heun: 2N - 1)."""
    if type(scheduler).__name__ in ALPHA_TABLE_SCHEDULERS:
        return len(timesteps)
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(timesteps=list(timesteps))
    return len(probe.timesteps)


def alpha_bar(scheduler, t):
    """ᾱ_t as a Python float; t = -1 means "after the last step" (the scheduler's final ᾱ)."""
    if t < 0:
        final = getattr(scheduler, 'final_alpha_cumprod', None)
        return 1.0 if final is None else float(final)
    return float(scheduler.alphas_cumprod[int(t)])


def q_sample(y0, noise, a_bar):
    """Eq. 7: y_t = sqrt(ᾱ_t)·y0 + sqrt(1 - ᾱ_t)·ε."""
    return a_bar ** 0.5 * y0 + (1 - a_bar) ** 0.5 * noise


def to_x0_eps(model_output, sample, a_bar, prediction_type):
    """The model's x0 and ε estimates from its output, for each of diffusers' prediction types."""
    s, n = a_bar ** 0.5, (1 - a_bar) ** 0.5
    if prediction_type == 'sample':
        return model_output, (sample - s * model_output) / n
    if prediction_type == 'epsilon':
        return (sample - n * model_output) / s, model_output
    return s * sample - n * model_output, s * model_output + n * sample  # v_prediction


def training_target(x0, noise, a_bar, prediction_type):
    """What a denoiser of ``prediction_type`` is trained to output for x_t = q_sample(x0, noise, ᾱ):
    x0, ε, or v = sqrt(ᾱ)·ε - sqrt(1 - ᾱ)·x0 (diffusers' ``get_velocity``); the inverse of :func:`to_x0_eps`."""
    if prediction_type == 'sample':
        return x0
    if prediction_type == 'epsilon':
        return noise
    if prediction_type == 'v_prediction':
        return a_bar ** 0.5 * noise - (1 - a_bar) ** 0.5 * x0
    raise ConfigError(f'prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}')


LOSS_WEIGHTINGS = ('none', 'min_snr')


def loss_weights(a_bar, weighting=None, prediction_type='sample'):
    """Per-sample weights of the diffusion loss at noise levels ``a_bar`` (ᾱ_t, a tensor).

    ``weighting``: None / ``{type: none}`` (every t alike: the plain x0 / ε / v objective) or
    ``{type: min_snr, gamma: γ}``, Min-SNR-γ (Hang et al., ICCV 2023, Eq. 8 and its table of equivalent forms):
    the x0 objective weighted by min(SNR_t, γ), SNR_t = ᾱ_t / (1 - ᾱ_t); for the ε objective that is
    min(SNR_t, γ) / SNR_t, for v min(SNR_t, γ) / (SNR_t + 1). It stops the nearly noise-free steps from dominating
    ε training and, for an x0 model, the nearly pure-noise steps (where the best x0 is the coarse y0 anyway) from
    taking the capacity that the last, low-noise steps need. Measured on the known-answer task
    (docs/detail_evaluation.md, "Why the demo added grain"): min_snr with γ = 5 made the x0-objective Patch-DiT
    slightly worse there (flats 0.66 dB lower after 3000 iterations), so the default is none."""
    if weighting is not None and not isinstance(weighting, dict):
        raise ConfigError(f'loss weighting must be a dict like {{type: min_snr, gamma: 5}}, got {weighting!r}')
    weighting = weighting or {}
    kind = weighting.get('type', 'none')
    if kind not in LOSS_WEIGHTINGS:
        raise ConfigError(f'loss weighting type must be one of {LOSS_WEIGHTINGS}, got {kind!r}')
    unknown = set(weighting) - ({'type'} if kind == 'none' else {'type', 'gamma'})
    if unknown:
        raise ConfigError(f'{kind} loss weighting does not take {sorted(unknown)}')
    if kind == 'none':
        return torch.ones_like(a_bar)
    gamma = float(weighting.get('gamma', 5.0))
    if not gamma > 0:
        raise ConfigError(f'min_snr gamma must be > 0, got {gamma}')
    snr = a_bar / (1 - a_bar).clamp_min(1e-12)
    w = snr.clamp(max=gamma)
    if prediction_type == 'epsilon':
        return w / snr
    if prediction_type == 'v_prediction':
        return w / (snr + 1)
    return w


def clip_range(scheduler):
    """The x0 clamp of a DDIM/DDPM scheduler's config (``clip_sample_range`` when ``clip_sample``), else None."""
    return scheduler.config.get('clip_sample_range', 1.0) if scheduler.config.get('clip_sample') else None


def step_noise(seed, t, shape, temperature=1.0):
    """The noise of the stochastic DDIM step at timestep t (η > 0): one draw per latent pixel (``shape``, the
    padded latent) from (seed, t) on the CPU, read patch by patch like the start noise ε, times the sampler's
    ``temperature``. So a patch's step noise depends on its pixels, the seed and t, not on which patches share its
    batch, the walk or the device."""
    # integers only: hash() of a str differs between processes
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(t)) % 2 ** 63)
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    return noise * temperature if temperature != 1 else noise


def ddim_step(model_output, sample, a_t, a_prev, prediction_type='sample', eta=0.0, noise=None,
              clip_range=None):
    """One DDIM update x_t -> x_prev (Song et al., Eq. 12) from ᾱ_t and ᾱ_prev; η = 0 is deterministic."""
    x0, eps = to_x0_eps(model_output, sample, a_t, prediction_type)
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5 if eta else 0.0
    prev = a_prev ** 0.5 * x0 + max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
    if sigma:
        if noise is None:
            raise InputError('eta > 0 needs noise for the stochastic DDIM step')
        prev = prev + sigma * noise
    return prev


def timestep_batch(t, n, device):
    """t for a batch of n: a long tensor when t is integral (DDIM's; diffusers' float-typed integral timesteps),
    a float32 one when it is fractional (a sigma schedule's timesteps): the scheduler's own value, not truncated.
    ``t``: a Python number (a tensor is read with ``.item()``: a host sync on a GPU, so callers pass numbers)."""
    value = t.item() if torch.is_tensor(t) else t
    if float(value).is_integer():
        return torch.full((n,), int(value), device=device, dtype=torch.long)
    return torch.full((n,), float(value), device=device, dtype=torch.float32)


def _call(denoiser, x, t, cond, dtype):
    out = denoiser(x, timestep_batch(t, x.shape[0], x.device), cond)
    out = getattr(out, 'sample', out)  # diffusers models return an output object
    if not torch.is_tensor(out) or out.shape != x.shape:
        raise InputError(f'the denoiser must return a tensor shaped like x_t {tuple(x.shape)}, got '
                         f'{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}')
    return out.to(dtype)


def denoise(denoiser, y0, noise, cond, timesteps, scheduler, prediction_type='sample', eta=0.0,
            generator=None, on_step=None, noise_at=None):
    """One group's reverse process for a batch of patches: from y_τ (Eq. 7) through ``timesteps`` to x0.

    ``denoiser(x_t, t, cond)`` is called once per timestep on the whole batch (t: (n,), long for integral
    timesteps, float32 for fractional ones, see :func:`timestep_batch`). ``noise_at(t)`` gives the noise of
    the stochastic DDIM step at t (η > 0), shaped like y0 (PGS reads :func:`step_noise` patch by patch);
    without it, and for stochastic diffusers schedulers, ``generator`` (a CPU torch.Generator) supplies it.
    ``on_step()`` is called after every denoiser call (progress bars).
    """
    def eps_at(t):
        if noise_at is not None:
            return noise_at(t)
        return torch.randn(y0.shape, generator=generator, dtype=torch.float32).to(y0.device, y0.dtype)

    if type(scheduler).__name__ in ALPHA_TABLE_SCHEDULERS:
        x = q_sample(y0, noise, alpha_bar(scheduler, timesteps[0]))
        clip = clip_range(scheduler)
        for i, t in enumerate(timesteps):
            out = _call(denoiser, x, t, cond, x.dtype)
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            x = ddim_step(out, x, alpha_bar(scheduler, t), alpha_bar(scheduler, t_prev), prediction_type, eta,
                          eps_at(t) if eta else None, clip)
            if on_step:
                on_step()
        return x
    sched = type(scheduler).from_config(scheduler.config)  # fresh: multistep solvers keep per-run history
    sched.set_timesteps(timesteps=list(timesteps), device=y0.device)
    x = sched.add_noise(y0, noise, sched.timesteps[:1].repeat(y0.shape[0]))
    step_kwargs = {'generator': generator} if 'generator' in inspect.signature(sched.step).parameters else {}
    host = sched.timesteps.tolist()  # one read per run, not a host sync per step
    for t, value in zip(sched.timesteps, host):
        out = _call(denoiser, sched.scale_model_input(x, t), value, cond, x.dtype)
        x = sched.step(out, t, x, **step_kwargs).prev_sample.to(y0.dtype)
        if on_step:
            on_step()
    return x
