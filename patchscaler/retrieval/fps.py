"""Farthest point sampling (the paper's reduction of 20,000 RTM candidates to 2,000 representative pairs).

Greedy k-center: start from a seeded random point, then repeatedly add the point farthest from everything
chosen so far. The result covers the data within twice the best possible covering radius (Gonzalez 1985),
which a random subset of the same size does not guarantee: rare textures survive, near-duplicates do not.

Each step is one matrix-vector product against all N points (squared distances from precomputed norms), so
20,000 × 1,000-d runs in seconds on a CPU; ``chunk_size`` bounds the temporary memory for very large N.
"""
import torch
import torch.nn.functional as F

from patchscaler.utils.errors import ConfigError, InputError


def _check_points(points):
    if not torch.is_tensor(points) or points.dim() != 2:
        raise InputError(f'FPS expects an (N, D) tensor, got {getattr(points, "shape", type(points).__name__)}')
    if points.shape[0] == 0:
        raise InputError('FPS got no points')
    if not torch.isfinite(points).all():
        raise InputError('FPS points contain NaN or inf')


def _sq_dist_to(points, sq_norms, point, chunk_size):
    """Squared Euclidean distances from every row of ``points`` to ``point``, in chunks of rows."""
    out = torch.empty_like(sq_norms)
    point_sq = point.dot(point)
    for i in range(0, points.shape[0], chunk_size):
        block = points[i:i + chunk_size]
        out[i:i + chunk_size] = (sq_norms[i:i + chunk_size] + point_sq - 2 * (block @ point)).clamp_min_(0)
    return out


def farthest_point_sampling(points, n, seed=0, chunk_size=65536, progress=False):
    """Indices of up to ``n`` points chosen by farthest point sampling, in the order chosen.

    Args:
        points (Tensor): (N, D); any device (computed there, in float32).
        n (int): how many to keep.
        seed (int): picks the first point; the rest is deterministic (ties go to the lowest index).
        chunk_size (int): rows per distance block.
        progress (bool): a tqdm bar over the n steps.

    Returns:
        LongTensor (n',) of distinct indices on ``points.device``. n' < n when the data runs out of
        distinct points first: every remaining point is then a duplicate of a chosen one (squared distance
        below 1e-6 of the largest squared norm, i.e. closer than 0.1 % of the data's scale), and adding
        it would only put the same texture into the memory twice.
    """
    _check_points(points)
    if int(n) < 1:
        raise ConfigError(f'FPS: the number of points to keep must be >= 1, got {n}')
    x = points.float()
    num = x.shape[0]
    n = min(int(n), num)
    sq_norms = (x * x).sum(1)
    duplicate = 1e-6 * float(sq_norms.max()) + 1e-20
    first = int(torch.randint(num, (1,), generator=torch.Generator().manual_seed(int(seed))))
    chosen = [first]
    min_dist = _sq_dist_to(x, sq_norms, x[first], chunk_size)
    min_dist[first] = -1  # never chosen twice, whatever the rounding of the distances
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc='farthest point sampling', unit='pt', initial=1, total=n)
    while len(chosen) < n:
        nxt = int(torch.argmax(min_dist))  # first maximum: deterministic
        if float(min_dist[nxt]) <= duplicate:
            break
        chosen.append(nxt)
        torch.minimum(min_dist, _sq_dist_to(x, sq_norms, x[nxt], chunk_size), out=min_dist)
        min_dist[nxt] = -1  # (chosen points stay at -1: the minimum keeps it)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return torch.tensor(chosen, dtype=torch.long, device=x.device)


def covering_radius(points, selected, chunk_size=4096):
    """max over all points of the distance to the nearest selected point (smaller: better coverage)."""
    _check_points(points)
    x = points.float()
    centres = x[selected]
    worst = x.new_zeros(())
    for i in range(0, x.shape[0], chunk_size):
        dist = torch.cdist(x[i:i + chunk_size], centres, compute_mode='donot_use_mm_for_euclid_dist')
        worst = torch.maximum(worst, dist.min(1).values.max())
    return float(worst)


def fps_space(keys, values=None, value_weight=1.0, value_dims=256, seed=0):
    """The points FPS runs on: L2-normalised keys, and with ``values`` (the paper samples "on both RTM-value
    and RTM-key") the flattened values scaled to unit root-mean-square norm over the set, weighted so that
    squared distance ≈ ‖k̂_i − k̂_j‖² + value_weight · ‖v̂_i − v̂_j‖².

    Values longer than ``value_dims`` (an SD latent patch has 1,024 numbers, a pixel-unshuffle one 12,288)
    are first projected by a fixed Gaussian matrix (seeded): by Johnson–Lindenstrauss the distances change
    by a few percent while each FPS step reads far less memory."""
    if not value_weight >= 0:
        raise ConfigError(f'fps value_weight must be >= 0, got {value_weight}')
    k = F.normalize(keys.float(), dim=1)
    if values is None or value_weight == 0:
        return k
    v = values.float().flatten(1)
    if value_dims and v.shape[1] > value_dims:
        g = torch.Generator().manual_seed(int(seed))
        proj = torch.randn(v.shape[1], int(value_dims), generator=g) / int(value_dims) ** 0.5
        v = v @ proj.to(v.device)
    rms = v.pow(2).sum(1).mean().sqrt().clamp_min(1e-12)
    return torch.cat([k, (float(value_weight) ** 0.5) * v / rms], 1)
