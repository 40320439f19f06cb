"""Grading patches by difficulty: Qmap and Eq. 2's groups (threshold, quantile and share modes)."""
import pytest
import torch

import patchscaler  # noqa: F401  (compat fixes before BasicSR)
from patchscaler.sampling import GroupAssigner, PatchGrid, assign_groups, check_confidence
from patchscaler.utils.errors import ConfigError, InputError

ABOVE_095 = torch.nextafter(torch.tensor(0.95), torch.tensor(1.0)).item()
BELOW_075 = torch.nextafter(torch.tensor(0.75), torch.tensor(0.0)).item()


def tiled_confidence(values, v=4):
    """(1, 1, v, v·n) map whose non-overlapping V×V patches (stride V) are the constants ``values``."""
    row = torch.tensor(values, dtype=torch.float32).repeat_interleave(v)
    return row.view(1, 1, 1, -1).expand(1, 1, v, -1).contiguous()


def brute_groups(qmap, thresholds):
    """Eq. 2 generalised: group = how many thresholds the patch does not exceed (q <= γ -> harder).

    ``thresholds``: floats, or (B,) tensors of per-image thresholds.
    """
    groups = torch.zeros_like(qmap, dtype=torch.long)
    for gamma in thresholds:
        gamma = gamma.unsqueeze(-1) if torch.is_tensor(gamma) else gamma
        groups += (qmap <= gamma).long()
    return groups


@pytest.mark.parametrize('q,group', [
    (1.0, 0), (ABOVE_095, 0), (0.96, 0), (0.95, 1), (0.9, 1), (0.76, 1), (0.75, 2), (BELOW_075, 2), (0.5, 2),
    (0.0, 2)])
def test_eq2_paper_thresholds_at_the_boundaries(q, group):
    c = torch.full((1, 1, 16, 16), q)
    groups, qmap = assign_groups(c, patch_size=16)
    assert qmap.tolist() == [[torch.tensor(q).item()]]
    assert groups.tolist() == [[group]]


def test_eq2_on_a_map_with_one_value_per_patch():
    values = [1.0, ABOVE_095, 0.95, 0.8, 0.75, 0.3, 0.0]
    c = tiled_confidence(values)
    groups, qmap = assign_groups(c, patch_size=4, stride=4)
    assert torch.equal(qmap, torch.tensor([values]))
    assert groups.tolist() == [[0, 0, 1, 1, 2, 2, 2]]
    assert groups.dtype == torch.long


def test_three_dim_confidence_is_accepted():
    values = [1.0, 0.95, 0.75, 0.1]
    c = tiled_confidence(values)
    g4, q4 = assign_groups(c, patch_size=4, stride=4)
    g3, q3 = assign_groups(c[:, 0], patch_size=4, stride=4)
    assert torch.equal(g3, g4) and torch.equal(q3, q4)
    assert check_confidence(c[:, 0], (1, 4, 4, 16)).shape == (1, 1, 4, 16)


def test_qmap_is_the_patch_mean_of_the_confidence():
    c = torch.rand(2, 1, 40, 24, generator=torch.Generator().manual_seed(0))
    groups, qmap = assign_groups(c, patch_size=16, stride=8)
    grid = PatchGrid.for_shape(40, 24, 16, 8)
    brute = torch.stack([c[:, 0, t:b, left:r].double().mean((1, 2)) for t, left, b, r in grid.boxes()], 1)
    torch.testing.assert_close(qmap.double(), brute, atol=1e-7, rtol=0)
    assert torch.equal(groups, brute_groups(qmap, [0.95, 0.75]))


def test_eq2_boundary_holds_for_float64_confidence():
    c = torch.full((1, 1, 40, 40), 0.95, dtype=torch.float64)
    groups, qmap = assign_groups(c, patch_size=16, stride=8)
    assert (qmap == 0.95).all()
    assert (groups == 1).all()


@pytest.mark.parametrize('num_groups,thresholds', [
    (1, None), (2, [0.5]), (3, [0.8, 0.4]), (4, [0.9, 0.6, 0.3]), (4, [1.0, 0.5, 0.0])])
def test_custom_thresholds(num_groups, thresholds):
    qmap = torch.cat([torch.rand(2, 200, generator=torch.Generator().manual_seed(1)),
                      torch.tensor([[0.0, 1.0, 0.5, 0.9, 0.6, 0.3, 0.8, 0.4]]).expand(2, -1)], 1)
    assigner = GroupAssigner(num_groups, thresholds=thresholds)
    groups, thr = assigner.assign(qmap)
    assert groups.shape == qmap.shape and thr.shape == (2, num_groups - 1)
    assert torch.equal(groups, brute_groups(qmap, thresholds or []))
    assert groups.min() >= 0 and groups.max() <= num_groups - 1
    if thresholds:
        assert torch.equal(thr, torch.tensor([thresholds] * 2))
    # the fixed patches at the thresholds themselves go to the harder group
    fixed = dict(zip([0.0, 1.0, 0.5, 0.9, 0.6, 0.3, 0.8, 0.4], groups[0, 200:].tolist()))
    for g, gamma in enumerate(thresholds or []):
        assert fixed[gamma] == g + 1


def test_default_thresholds_are_the_papers():
    groups, thr = GroupAssigner(3).assign(torch.tensor([[0.96, 0.95, 0.76, 0.75]]))
    assert groups.tolist() == [[0, 1, 1, 2]]
    assert torch.equal(thr, torch.tensor([[0.95, 0.75]]))


@pytest.mark.parametrize('num_groups,quantiles', [(3, [0.6, 0.3]), (2, [0.5]), (4, [0.9, 0.5, 0.1])])
def test_quantile_mode_matches_torch_quantile(num_groups, quantiles):
    qmap = torch.rand(3, 50, generator=torch.Generator().manual_seed(num_groups))
    groups, thr = GroupAssigner(num_groups, mode='quantile', quantiles=quantiles).assign(qmap)
    ref = torch.quantile(qmap.double(), torch.tensor(quantiles, dtype=torch.float64), dim=1).T  # (B, G-1)
    assert thr.shape == (3, num_groups - 1)
    torch.testing.assert_close(thr.double(), ref, atol=1.2e-7, rtol=0)
    assert torch.equal(groups, brute_groups(qmap.double(), list(ref.unbind(1))))
    assert torch.equal(groups, brute_groups(qmap, list(thr.unbind(1))))
    # the share of each group follows the quantiles (50 distinct values per image)
    edges = [1.0] + quantiles + [0.0]
    for g in range(num_groups):
        share = (groups == g).float().mean(1)
        expected = edges[g] - edges[g + 1]
        assert ((share - expected).abs() <= 1 / 50 + 1e-6).all(), (g, share, expected)


def test_quantile_mode_is_per_image():
    qmap = torch.stack([torch.linspace(0, 1, 11), torch.linspace(0, 0.1, 11)])
    groups, thr = GroupAssigner(2, mode='quantile', quantiles=[0.5]).assign(qmap)
    torch.testing.assert_close(thr, torch.tensor([[0.5], [0.05]]))
    assert groups.tolist() == [[1] * 5 + [0] * 6] * 2  # at the median exactly: the easier group


def expected_share_counts(shares, m):
    """Cumulative rounding: counts sum to M and each is within 1 of share·M."""
    bounds, acc = [], 0.0
    for s in shares:
        acc += s * m
        bounds.append(min(round(acc), m))
    bounds[-1] = m
    return [b - a for a, b in zip([0] + bounds[:-1], bounds)]


@pytest.mark.parametrize('shares,m,counts', [
    ([0.4, 0.3, 0.3], 20, [8, 6, 6]), ([0.25, 0.25, 0.5], 16, [4, 4, 8]), ([0.4, 0.3, 0.3], 12, [5, 3, 4]),
    ([1 / 3, 1 / 3, 1 / 3], 9, [3, 3, 3]), ([1.0, 0.0, 0.0], 7, [7, 0, 0]), ([0.0, 0.0, 1.0], 7, [0, 0, 7]),
    ([0.0, 1.0, 0.0], 5, [0, 5, 0]), ([0.7, 0.3], 10, [7, 3]), ([0.1, 0.2, 0.3, 0.4], 30, [3, 6, 9, 12]),
    ([1.0], 6, [6])])
def test_share_mode_gives_exact_counts_by_rank(shares, m, counts):
    assert expected_share_counts(shares, m) == counts
    assert sum(counts) == m
    qmap = torch.rand(2, m, generator=torch.Generator().manual_seed(m))
    groups, thr = GroupAssigner(len(shares), mode='share', shares=shares).assign(qmap)
    assert thr.shape == (2, len(shares) - 1)
    for b in range(2):
        assert [int((groups[b] == g).sum()) for g in range(len(shares))] == counts
        # higher Qmap -> easier (or equal) group: groups are contiguous in rank order
        order = torch.argsort(qmap[b], descending=True)
        assert (groups[b][order].diff() >= 0).all()


def test_share_mode_breaks_ties_by_patch_index():
    qmap = torch.full((2, 10), 0.5)
    groups, _ = GroupAssigner(3, mode='share', shares=[0.4, 0.3, 0.3]).assign(qmap)
    assert groups.tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2, 2]] * 2
    qmap = torch.tensor([[0.9, 0.5, 0.5, 0.5, 0.1, 0.5]])
    groups, _ = GroupAssigner(2, mode='share', shares=[0.5, 0.5]).assign(qmap)
    assert groups.tolist() == [[0, 0, 0, 1, 1, 1]]
    again, _ = GroupAssigner(2, mode='share', shares=[0.5, 0.5]).assign(qmap.clone())
    assert torch.equal(again, groups)


def test_share_mode_through_assign_groups():
    c = tiled_confidence([0.1, 0.9, 0.5, 0.7, 0.3])
    groups, qmap = assign_groups(c, patch_size=4, stride=4, num_groups=3, mode='share', shares=[0.4, 0.4, 0.2])
    assert groups.tolist() == [[2, 0, 1, 0, 1]]


@pytest.mark.parametrize('bad', [
    lambda c: c - 0.01, lambda c: c + 0.01, lambda c: c.index_fill(3, torch.tensor([2]), float('nan')),
    lambda c: c.index_fill(3, torch.tensor([2]), float('inf')), lambda c: c.index_fill(3, torch.tensor([2]), -1.0),
    lambda c: c[..., :-1], lambda c: c[:, :, :-1], lambda c: torch.cat([c, c[:1]]),
    lambda c: c.repeat(1, 2, 1, 1), lambda c: c[0, 0], lambda c: c.unsqueeze(0), lambda c: c.numpy()])
def test_check_confidence_rejects(bad):
    c = torch.rand(2, 1, 8, 12, generator=torch.Generator().manual_seed(0)) * 0.98 + 0.01
    c[0, 0, 0, 0], c[1, 0, 0, 0] = 0.0, 1.0
    assert check_confidence(c, (2, 4, 8, 12)) is c
    with pytest.raises(InputError):
        check_confidence(bad(c.clone()), (2, 4, 8, 12))


def test_check_confidence_converts_integers_and_keeps_range_edges():
    c = torch.ones(1, 8, 8, dtype=torch.long)
    out = check_confidence(c, (1, 4, 8, 8))
    assert out.shape == (1, 1, 8, 8) and out.is_floating_point() and (out == 1).all()
    edges = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    assert torch.equal(check_confidence(edges, (1, 3, 1, 2)), edges)


@pytest.mark.parametrize('kwargs', [
    dict(num_groups=3, thresholds=[0.9]), dict(num_groups=3, thresholds=[0.9, 0.8, 0.7]),
    dict(num_groups=3, thresholds=[0.75, 0.95]), dict(num_groups=3, thresholds=[0.8, 0.8]),
    dict(num_groups=3, thresholds=[1.5, 0.5]), dict(num_groups=3, thresholds=[0.5, -0.1]),
    dict(num_groups=4), dict(num_groups=2),
    dict(num_groups=3, mode='share', shares=[0.5, 0.3, 0.3]), dict(num_groups=3, mode='share', shares=[0.5, 0.5]),
    dict(num_groups=3, mode='share', shares=[1.2, -0.1, -0.1]), dict(num_groups=3, mode='share'),
    dict(num_groups=3, mode='share', thresholds=[0.9, 0.5], shares=[0.4, 0.3, 0.3]),
    dict(num_groups=3, mode='share', thresholds=[0.9, 0.5]),
    dict(num_groups=3, mode='threshold', shares=[0.4, 0.3, 0.3]),
    dict(num_groups=3, mode='quantile', quantiles=[0.3, 0.6]), dict(num_groups=3, mode='quantile'),
    dict(num_groups=3, mode='percentile', thresholds=[0.9, 0.5]), dict(num_groups=0)])
def test_bad_grouping_options_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        GroupAssigner(**kwargs)


def test_assign_rejects_a_qmap_that_is_not_b_by_m():
    with pytest.raises(InputError):
        GroupAssigner(3).assign(torch.rand(2, 1, 5))


def test_assign_groups_module_function_matches_the_parts():
    c = torch.rand(2, 1, 24, 40, generator=torch.Generator().manual_seed(5))
    c[:, :, :, :12] = 0.99  # some simple patches
    c[:, :, :, 12:24] = 0.9  # and medium ones
    for kwargs in (dict(), dict(num_groups=2, thresholds=[0.6]), dict(mode='quantile', quantiles=[0.7, 0.2]),
                   dict(mode='share', shares=[0.2, 0.5, 0.3])):
        groups, qmap = assign_groups(c, 8, 4, **kwargs)
        grid = PatchGrid.for_shape(24, 40, 8, 4)
        assert groups.shape == qmap.shape == (2, grid.num_patches)
        assert torch.equal(qmap, grid.patch_mean(c))
        ref, _ = GroupAssigner(kwargs.pop('num_groups', 3), **kwargs).assign(qmap)
        assert torch.equal(groups, ref)
    groups, _ = assign_groups(c, 8, 4)
    assert set(groups.unique().tolist()) == {0, 1, 2}
    with pytest.raises(InputError):
        assign_groups(c * 2, 8, 4)


@pytest.mark.parametrize('value', [1.0, 0.99, 0.3])
def test_quantile_mode_puts_a_constant_map_in_the_easiest_group(value):
    """Ties at the quantile threshold go to the easier group: a saturated confidence must not cost the most."""
    groups, _ = GroupAssigner(3, mode='quantile', quantiles=[0.6, 0.3]).assign(torch.full((1, 49), value))
    assert (groups == 0).all()
