"""Farthest point sampling: the greedy rule exactly, determinism, chunking, and coverage vs a random subset."""
import pytest
import torch

from patchscaler.retrieval import covering_radius, farthest_point_sampling, fps_space
from patchscaler.utils.errors import ConfigError, InputError


def _reference_fps(x, n, first):
    """Textbook O(n·N) FPS with cdist: each new point maximises the distance to the chosen set."""
    chosen = [first]
    for _ in range(n - 1):
        d = torch.cdist(x.double(), x[chosen].double()).min(1).values
        chosen.append(int(torch.argmax(d)))
    return chosen


def test_matches_the_greedy_definition():
    x = torch.randn(300, 7, generator=torch.Generator().manual_seed(0))
    got = farthest_point_sampling(x, 40, seed=3)
    assert got.tolist() == _reference_fps(x, 40, int(got[0]))
    assert len(set(got.tolist())) == 40


def test_deterministic_and_seeded():
    x = torch.randn(500, 5, generator=torch.Generator().manual_seed(1))
    a, b = farthest_point_sampling(x, 50, seed=0), farthest_point_sampling(x, 50, seed=0)
    assert torch.equal(a, b)
    assert farthest_point_sampling(x, 50, seed=1)[0] != a[0]


def test_chunking_does_not_change_the_result():
    x = torch.randn(257, 9, generator=torch.Generator().manual_seed(2))
    assert torch.equal(farthest_point_sampling(x, 30, chunk_size=7), farthest_point_sampling(x, 30))


def test_more_than_available_returns_all_in_fps_order():
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    got = farthest_point_sampling(x, 50)
    assert sorted(got.tolist()) == list(range(12))


def _clustered(seed=0):
    """One big cluster (2,000 points) and 24 small far-apart ones (10 points each): what texture data looks
    like (lots of sky and wall, a little of everything else)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(25, 16, generator=g) * 10
    sizes = [2000] + [10] * 24
    return torch.cat([c + 0.3 * torch.randn(s, 16, generator=g) for c, s in zip(centres, sizes)])


def test_fps_covers_clustered_data_better_than_random_subsets():
    x = _clustered()
    n = 40
    fps_radius = covering_radius(x, farthest_point_sampling(x, n))
    random_radii = [covering_radius(x, torch.randperm(len(x), generator=torch.Generator().manual_seed(s))[:n])
                    for s in range(10)]
    assert fps_radius < 0.5 * min(random_radii), (fps_radius, random_radii)
    # and within the 2-approximation: FPS with one point per cluster already reaches cluster scale
    assert fps_radius < 3.0


def test_covering_radius_is_zero_when_everything_is_selected():
    x = torch.randn(50, 4)
    assert covering_radius(x, torch.arange(50)) == pytest.approx(0.0, abs=1e-4)


def test_fps_space_distances_decompose_into_key_and_value_parts():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(20, 6, generator=g), torch.randn(20, 2, 4, 4, generator=g)
    w = 0.5
    p = fps_space(keys, values, value_weight=w, value_dims=256)  # 32 value numbers: no projection
    k = torch.nn.functional.normalize(keys, dim=1)
    v = values.flatten(1) / values.flatten(1).pow(2).sum(1).mean().sqrt()
    expected = torch.cdist(k, k) ** 2 + w * torch.cdist(v, v) ** 2
    assert torch.allclose(torch.cdist(p, p) ** 2, expected, atol=1e-4)
    assert torch.allclose(fps_space(keys), k)


def test_fps_space_projection_keeps_value_distances_roughly():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(60, 6, generator=g), torch.randn(60, 48, 16, 16, generator=g)
    full = fps_space(keys, values, value_dims=0)[:, 6:]
    projected = fps_space(keys, values, value_dims=256)[:, 6:]
    assert projected.shape[1] == 256
    ratio = torch.pdist(projected) / torch.pdist(full)
    assert 0.8 < float(ratio.min()) and float(ratio.max()) < 1.2


def test_bad_input_is_one_clear_error():
    with pytest.raises(InputError, match='NaN'):
        farthest_point_sampling(torch.tensor([[0.0, float('nan')]]), 1)
    with pytest.raises(InputError, match='no points'):
        farthest_point_sampling(torch.zeros(0, 3), 1)
    with pytest.raises(InputError, match=r'\(N, D\)'):
        farthest_point_sampling(torch.zeros(4), 1)
    with pytest.raises(ConfigError, match='>= 1'):
        farthest_point_sampling(torch.zeros(4, 2), 0)


def test_duplicates_are_never_chosen_twice():
    """Five distinct points repeated four times (a screentone cut on a grid): FPS returns the five, once each,
    instead of filling the memory with copies; near-duplicates (rounding-level noise) count as copies too."""
    base = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    x = base.repeat(4, 1)
    got = farthest_point_sampling(x, 20)
    assert len(got) == 5 and len({tuple(row) for row in x[got].tolist()}) == 5
    noisy = base.repeat(50, 1) + 1e-5 * torch.randn(250, 8, generator=torch.Generator().manual_seed(1))
    assert len(farthest_point_sampling(noisy, 100)) == 5
    spread = torch.randn(300, 512, generator=torch.Generator().manual_seed(2))
    near = torch.cat([spread, spread + 1e-4 * torch.randn(300, 512, generator=torch.Generator().manual_seed(3))])
    picked = farthest_point_sampling(near, 500)
    assert len(set(picked.tolist())) == len(picked)  # never the same index twice
