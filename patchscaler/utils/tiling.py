"""Tiled application of a spatial function (the autoencoder's encode/decode) with bounded memory.

Decoding a 2048x2048 image with the SD autoencoder in one go needs many GB of activations (its convolutions
run at full resolution with 128-512 channels). :func:`tiled_apply` runs the function on overlapping tiles
instead, so the peak memory is that of one tile plus the output, at the price of a small blend at the seams:
the tiles' outputs are averaged across each overlap with weights that ramp linearly from one tile to the next.

Exactness: where ``fn`` maps each input pixel (or each ``multiple``-sized block) to its own output pixels
(pixel (un)shuffle, a 1x1 convolution, ...) the tiled result equals ``fn(x)`` up to float rounding. For a local
function of receptive radius r < overlap, the result equals ``fn(x)`` away from the seams, and at a seam only
the r outermost pixels of each tile are off, with weights of at most (r - 0.5) / overlap, so a wider overlap
hides them (weights positive everywhere rule out an exact crop). A function with global context (the VAE's
group norms and mid-block attention) only approximates ``fn(x)``; that is the usual tiled-VAE trade-off.
"""
import torch

from patchscaler.utils.errors import ConfigError, InputError


def _scaled(n, scale):
    """``n * scale`` as an int; a ConfigError if it is not one (tile sizes and offsets must map to pixels)."""
    out = n * scale
    if abs(out - round(out)) > 1e-6:
        raise ConfigError(f'tiling: {n} input pixels times scale {scale} is not a whole number of output pixels; '
                          'set multiple to the downscale factor')
    return int(round(out))


def _starts(length, tile, stride):
    """Tile offsets along one side: every ``stride`` pixels, the last one flush with the border."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, stride)) + [length - tile]


def _ramp(n, left, right, device):
    """(n,) float32 weights: 1 inside, rising linearly over the ``left`` and ``right`` overlaps (output pixels).

    At pixel d of an overlap the weight is (d + 0.5) / overlap, so two tiles' weights sum to exactly 1 across a
    shared overlap, and every weight is positive.
    """
    pos = torch.arange(n, dtype=torch.float32, device=device)
    w = torch.ones(n, dtype=torch.float32, device=device)
    if left:
        w = torch.minimum(w, (pos + 0.5) / left)
    if right:
        w = torch.minimum(w, (n - pos - 0.5) / right)
    return w


def _axis(length, tile, stride, scale, device):
    """Per tile along one side: (input start, input size, output start, output size, output weights)."""
    starts = _starts(length, tile, stride)
    size = min(tile, length)
    out = []
    for k, s in enumerate(starts):
        left = starts[k - 1] + size - s if k > 0 else 0
        right = s + size - starts[k + 1] if k + 1 < len(starts) else 0
        n = _scaled(size, scale)
        out.append((s, size, _scaled(s, scale), n, _ramp(n, _scaled(left, scale), _scaled(right, scale), device)))
    return out


def tiled_apply(fn, x, tile, overlap, scale, multiple=1, progress=False):
    """``fn(x)`` computed on overlapping ``tile`` x ``tile`` tiles of ``x`` (B, C, H, W) and blended.

    Args:
        fn: maps a (B, C, h, w) tile to (B, C', h*scale, w*scale).
        tile, overlap (int): tile side and overlap of neighbouring tiles, in input pixels; tile > overlap >= 0,
            tile a multiple of ``multiple``; overlap is rounded up to one (and must stay below tile).
        scale (float | int): output pixels per input pixel, e.g. 1/8 for an encoder, 8 for a decoder.
        multiple (int): tile sizes and offsets are multiples of it (the encoder's downscale factor, so that
            h*scale is whole); H and W must be multiples of it too when x is tiled.
        progress (bool): a tqdm bar over the tiles.

    If ``x`` fits in one tile this is exactly ``fn(x)``. Otherwise the last tile of a row or column is flush
    with the border (no padding), and the output is accumulated tile by tile (in float32 or wider, returned in
    fn's dtype), so only one tile's output is held at a time.
    """
    if not isinstance(multiple, int) or multiple < 1:
        raise ConfigError(f'tiling: multiple must be an integer >= 1, got {multiple!r}')
    if not (isinstance(tile, int) and isinstance(overlap, int) and tile > overlap >= 0):
        raise ConfigError(f'tiling: need integers tile > overlap >= 0, got tile={tile!r} overlap={overlap!r}')
    if tile % multiple:
        raise ConfigError(f'tiling: tile ({tile}) must be a multiple of {multiple}')
    overlap = -(-overlap // multiple) * multiple  # offsets stay multiples of `multiple`
    if overlap >= tile:
        raise ConfigError(f'tiling: overlap rounded up to a multiple of {multiple} is {overlap}, not below tile={tile}')
    if not scale > 0:
        raise ConfigError(f'tiling: scale must be positive, got {scale!r}')
    if x.dim() != 4:
        raise InputError(f'tiling: x must be (B, C, H, W), got {tuple(x.shape)}')
    h, w = x.shape[-2:]
    if h <= tile and w <= tile:
        return fn(x)
    if h % multiple or w % multiple:
        raise InputError(f'tiling: x is {h}x{w}; its sides must be multiples of {multiple} (pad it first)')

    rows = _axis(h, tile, tile - overlap, scale, x.device)
    cols = _axis(w, tile, tile - overlap, scale, x.device)
    # the grid is a product of 1-D tilings, so the weight total is the outer product of the 1-D totals
    total = torch.zeros(_scaled(h, scale), device=x.device)
    for r in rows:
        total[r[2]:r[2] + r[3]] += r[4]
    total_w = torch.zeros(_scaled(w, scale), device=x.device)
    for c in cols:
        total_w[c[2]:c[2] + c[3]] += c[4]
    total = total[:, None] * total_w[None, :]

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(rows) * len(cols), desc='tiles', unit='tile')
    acc = out_dtype = None
    for y0, th, oy, oh, wy in rows:
        for x0, tw, ox, ow, wx in cols:
            y = fn(x[:, :, y0:y0 + th, x0:x0 + tw])
            if y.dim() != 4 or y.shape[-2:] != (oh, ow):
                raise ConfigError(f'tiling: fn mapped a {th}x{tw} tile to {tuple(y.shape)}, expected {oh}x{ow} '
                                  f'(scale {scale})')
            if acc is None:
                out_dtype = y.dtype
                acc_dtype = torch.promote_types(y.dtype, torch.float32)
                acc = torch.zeros(*y.shape[:2], total.shape[0], total.shape[1], dtype=acc_dtype, device=y.device)
            acc[:, :, oy:oy + oh, ox:ox + ow] += y.to(acc.dtype) * (wy[:, None] * wx[None, :]).to(acc)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return acc.div_(total.to(acc)).to(out_dtype)  # in place: no second output-sized tensor
