"""What the memory holds and what it retrieves, as one picture.

Top: the first RTM values in FPS order (the most mutually different textures), decoded. Below: a few query
patches (candidates FPS did not keep, so not in the memory) each followed by its top-K priors with their
cosine similarities.
"""
import cv2
import numpy as np
import torch
from basicsr.utils import tensor2img

from patchscaler.utils.device import placement
from patchscaler.utils.visualize import caption_bar, labelled_strip


def _decode(autoencoder, latents, tile):
    """(N, c, V, V) latents -> list of uint8 BGR tiles of ``tile`` px."""
    device, dtype = placement(autoencoder, latents.device)
    with torch.no_grad():
        rgb = autoencoder.decode(latents.to(device, dtype))
    return [cv2.resize(im, (tile, tile), interpolation=cv2.INTER_NEAREST)
            for im in tensor2img(list(rgb), rgb2bgr=True, min_max=(0, 1))]


_TITLE = {'height': 26, 'scale': 0.55, 'baseline': 18}


def _pad_to(img, width):
    if img.shape[1] >= width:
        return img
    return np.concatenate([img, np.full((img.shape[0], width - img.shape[1], 3), 255, np.uint8)], 1)


def rtm_preview(rtm, autoencoder, queries=None, k=None, count=48, columns=12, tile=64):
    """A uint8 BGR picture: the memory's first ``count`` values, then each query with its top-K priors."""
    n = min(count, len(rtm))
    tiles = _decode(autoencoder, rtm.values[:n], tile)
    gap = 2
    rows = []
    for r in range(0, n, columns):
        row = tiles[r:r + columns]
        row += [np.full((tile, tile, 3), 255, np.uint8)] * (columns - len(row))
        rows.append(np.concatenate([np.pad(t, ((gap, gap), (gap, gap), (0, 0)), constant_values=255) for t in row], 1))
    grid = np.concatenate(rows, 0)
    title = (f'RTM: {len(rtm)} patches of {rtm.latent_channels}x{rtm.patch_size}^2 latents; the first {n} in '
             'farthest-point order')
    parts = [caption_bar(title, grid.shape[1], **_TITLE), grid]
    if queries is not None and len(queries):
        k = min(k or rtm.top_k, len(rtm))
        priors, sims = rtm.query(queries, k)
        parts.append(caption_bar(f'queries (not in the memory) and their top-{k} priors, cosine similarity',
                                 grid.shape[1], **_TITLE))
        for q, pri, s in zip(queries, priors, sims):
            ims = _decode(autoencoder, torch.cat([q[None], pri]), tile)
            labels = ['query'] + [f'{float(v):.3f}' for v in s]
            parts.append(labelled_strip(ims, labels, tile))
    width = max(p.shape[1] for p in parts)
    return np.concatenate([_pad_to(p, width) for p in parts], 0)
