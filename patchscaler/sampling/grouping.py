"""Grading patches by difficulty: the quantified confidence map Qmap and its groups (Eq. 2).

Groups are numbered from easiest to hardest: with the paper's three, 0 = simple, 1 = medium, 2 = hard.
With thresholds γ1 > γ2 > … > γ_{G-1} (G groups), Eq. 2's half-open intervals generalise to

    group 0:  Qmap ∈ (γ1, 1]        group g:  Qmap ∈ (γ_{g+1}, γ_g]        group G-1:  Qmap ∈ [0, γ_{G-1}]

so a patch exactly at a threshold goes to the harder group. Three ways to get the thresholds, chosen by
``mode`` (options ``grouping: {mode: ..., ...}``):

- ``threshold``: fixed γ's (paper: 0.95, 0.75). Right for PatchScaler's own GRM, whose C is calibrated
  by Eq. 1.
- ``quantile``: γ_g = the q_g-quantile of each image's Qmap (q descending, e.g. [0.6, 0.3] puts about
  the top 40 % of patches in the simple group). For another model's confidence, whose scale is unknown.
  Here a patch *at* a threshold goes to the easier group (Qmap < γ is needed to be harder): ties at the
  top — a saturated confidence, flat regions — would otherwise all land in the hardest group.
- ``share``: a target share of patches per group, easiest first (e.g. [0.4, 0.3, 0.3]); patches are
  ranked by Qmap and cut at exact counts (ties broken by patch index, so the result is deterministic).
  Counts are rounded so they sum to the number of patches.

``quantile`` and ``share`` are per image: each image of a batch gets its own thresholds.
"""
import torch
import torch.nn.functional as F

from ..utils.errors import ConfigError, InputError

GROUPING_MODES = ('threshold', 'quantile', 'share')
PAPER_THRESHOLDS = (0.95, 0.75)


def check_confidence(confidence, latent_shape):
    """C must be (B, 1, h, w) or (B, h, w) over y0's (B, ·, h, w), finite and within [0, 1]; returns (B, 1, h, w)."""
    if not torch.is_tensor(confidence):
        raise InputError(f'confidence must be a tensor, got {type(confidence).__name__}')
    b, _, h, w = latent_shape
    c = confidence.unsqueeze(1) if confidence.dim() == 3 else confidence
    if c.dim() != 4 or c.shape[1] != 1 or (c.shape[0], *c.shape[2:]) != (b, h, w):
        raise InputError(f'confidence must be (B, 1, h, w) = ({b}, 1, {h}, {w}) to match the latent '
                         f'{tuple(latent_shape)}, got {tuple(confidence.shape)}')
    # graded in float32: the sigmoid's precision; Qmap sums it in float64, so a float32 map that is exactly γ on
    # a patch has Qmap exactly γ and Eq. 2's boundaries hold to the bit (a float64 map within float32 rounding
    # of γ counts as γ)
    c = c.float()
    if not torch.isfinite(c).all():
        raise InputError(f'confidence holds {int((~torch.isfinite(c)).sum())} NaN/inf values')
    lo, hi = c.min().item(), c.max().item()
    if lo < 0 or hi > 1:
        raise InputError(f'confidence must lie in [0, 1] (Eq. 2), got values in [{lo:.4g}, {hi:.4g}]; '
                         'rescale another model\'s score, or use grouping mode quantile/share')
    return c


def _check_descending(values, name, lo=0.0, hi=1.0):
    values = [float(v) for v in values]
    if any(not lo <= v <= hi for v in values) or any(a <= b for a, b in zip(values, values[1:])):
        raise ConfigError(f'{name} must be strictly decreasing values in [{lo}, {hi}], got {values}')
    return values


class GroupAssigner:
    """``assign(qmap) -> (groups, thresholds)`` for (B, M) Qmaps; built from the ``grouping`` options."""

    def __init__(self, num_groups, mode='threshold', thresholds=None, quantiles=None, shares=None):
        self.num_groups = int(num_groups)
        if self.num_groups < 1:
            raise ConfigError(f'the number of groups must be >= 1, got {num_groups}')
        if mode not in GROUPING_MODES:
            raise ConfigError(f"grouping mode '{mode}' is not one of {GROUPING_MODES}")
        self.mode = mode
        given = {'thresholds': thresholds, 'quantiles': quantiles, 'shares': shares}
        wanted = {'threshold': 'thresholds', 'quantile': 'quantiles', 'share': 'shares'}[mode]
        extra = [k for k, v in given.items() if v is not None and k != wanted]
        if extra:
            raise ConfigError(f"grouping mode '{mode}' takes '{wanted}', not {extra}")
        value = given[wanted]
        if value is None and mode == 'threshold' and self.num_groups == 3:
            value = PAPER_THRESHOLDS
        if value is None and self.num_groups == 1:
            value = [1.0] if mode == 'share' else []
        if value is None:
            raise ConfigError(f"grouping mode '{mode}' with {self.num_groups} groups needs '{wanted}'")
        value = list(value)
        expected = self.num_groups if mode == 'share' else self.num_groups - 1
        if len(value) != expected:
            raise ConfigError(f"{len(value)} {wanted} given for {self.num_groups} groups; need {expected}")
        if mode == 'share':
            if any(float(s) < 0 for s in value) or abs(sum(float(s) for s in value) - 1) > 1e-6:
                raise ConfigError(f'shares must be >= 0 and sum to 1, got {value}')
            self.values = [float(s) for s in value]
        else:
            self.values = _check_descending(value, wanted)

    def thresholds_for(self, qmap):
        """(B, G-1) thresholds γ per image (for 'share' mode: the Qmap value at each cut, for display)."""
        b = qmap.shape[0]
        if self.num_groups == 1:
            return qmap.new_zeros(b, 0)
        if self.mode == 'threshold':
            return torch.tensor(self.values, dtype=qmap.dtype, device=qmap.device).expand(b, -1)
        if self.mode == 'quantile':
            q = torch.tensor(self.values, dtype=torch.float64, device=qmap.device)
            return torch.quantile(qmap.double(), q, dim=1).T.to(qmap.dtype)
        groups = self._rank_groups(qmap)
        return torch.stack([torch.where(groups <= g, qmap, float('inf')).amin(1)
                            for g in range(self.num_groups - 1)], 1)

    def _rank_groups(self, qmap):
        b, m = qmap.shape
        counts = torch.tensor(self.values, dtype=torch.float64) * m
        bounds = torch.round(torch.cumsum(counts, 0)).long().clamp(max=m)
        bounds[-1] = m
        order = torch.sort(-qmap, dim=1, stable=True).indices  # easiest (highest Qmap) first
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(m, device=qmap.device).expand(b, m))
        return torch.bucketize(rank, bounds.to(qmap.device), right=True)

    def assign(self, qmap):
        """(B, M) Qmap -> (B, M) long group index (0 easiest), and the (B, G-1) thresholds used.

        Thresholds are compared at Qmap's precision (float32): a patch whose Qmap is float32(γ) — e.g. a map
        that holds the value 0.8 — is at the threshold γ = 0.8 and goes to the harder group, as Eq. 2 says."""
        if qmap.dim() != 2:
            raise InputError(f'Qmap must be (B, M), got {tuple(qmap.shape)}')
        if self.mode == 'share':
            return self._rank_groups(qmap), self.thresholds_for(qmap)
        thr = self.thresholds_for(qmap)
        # group = how many thresholds the patch does not exceed: q > γ1 -> 0, γ2 < q <= γ1 -> 1, q <= γ2 -> 2
        harder = torch.lt if self.mode == 'quantile' else torch.le
        groups = harder(qmap.unsqueeze(-1), thr.unsqueeze(1)).sum(-1)
        return groups, thr


def assign_groups(confidence, patch_size=16, stride=None, num_groups=3, mode='threshold', thresholds=None,
                  quantiles=None, shares=None):
    """Confidence map (B, 1, h, w) in [0, 1] -> (groups (B, M), Qmap (B, M)) for V×V patches (Eq. 2).

    The patch grid is :class:`~patchscaler.sampling.patches.PatchGrid` of the same (h, w, V, stride) that
    the sampler uses, so group m belongs to patch m.
    """
    from .patches import PatchGrid
    c = check_confidence(confidence, (confidence.shape[0], 1, *confidence.shape[-2:]))
    grid = PatchGrid.for_shape(c.shape[-2], c.shape[-1], patch_size, stride)
    qmap = grid.patch_mean(c)
    groups, _ = GroupAssigner(num_groups, mode, thresholds, quantiles, shares).assign(qmap)
    return groups, qmap


def texture_confidence(latent, window=5, strength=1.0):
    """A confidence-like map in (0, 1] for models without a GRM: exp(-local high-frequency energy / its median).

    Flat regions (little to restore) come out near 1, textured ones lower. Only the ranking matters with
    grouping mode ``share`` or ``quantile``; ``strength`` sharpens the map for mode ``threshold``.
    """
    x = latent.float()
    high = x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode='replicate'), 3, stride=1)
    pad = window // 2
    energy = F.avg_pool2d(F.pad(high.pow(2).mean(1, keepdim=True), (pad,) * 4, mode='replicate'), window, stride=1)
    scale = energy.flatten(1).median(1).values.clamp_min(1e-12).view(-1, 1, 1, 1)
    return torch.exp(-strength * energy / scale)
