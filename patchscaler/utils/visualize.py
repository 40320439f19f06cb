"""Pictures people look at: the confidence map as a colour image, and labelled side-by-side strips."""
import cv2
import numpy as np
import torch


def to_numpy(x, dtype=None):
    """A NumPy array of ``x`` (array, list or a torch tensor on any device: CUDA tensors are copied to the host,
    which ``np.asarray`` refuses to do)."""
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def confidence_to_bgr(confidence, size=None, colormap=cv2.COLORMAP_VIRIDIS):
    """(h, w) or (1, h, w) confidence in [0, 1] -> uint8 BGR colour image, nearest-upsampled to ``size`` (w, h).

    Low confidence (hard to restore) is dark/blue, high confidence is yellow (viridis).
    """
    c = to_numpy(confidence, np.float32).squeeze()
    img = cv2.applyColorMap(np.clip(c * 255.0 + 0.5, 0, 255).astype(np.uint8), colormap)
    if size is not None:
        img = cv2.resize(img, size, interpolation=cv2.INTER_NEAREST)
    return img


def caption_bar(text, width, height=22, scale=0.5, baseline=16):
    """A white (height, width) uint8 BGR bar with ``text`` in black, for captions above pictures."""
    bar = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(bar, text, (4, baseline), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return bar


def labelled_strip(images, labels, height=None):
    """Put uint8 BGR images side by side with a caption above each; all resized to one height."""
    height = height or max(im.shape[0] for im in images)
    tiles = []
    for im, label in zip(images, labels):
        if im.ndim == 2:
            im = cv2.cvtColor(im, cv2.COLOR_GRAY2BGR)
        w = max(1, round(im.shape[1] * height / im.shape[0]))
        im = cv2.resize(im, (w, height), interpolation=cv2.INTER_NEAREST)
        text_w = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)[0][0]
        scale = 0.5 * min(1.0, (w - 8) / max(text_w, 1))  # narrow tiles get a smaller font, not a cut label
        tiles.append(np.concatenate([caption_bar(label, w, scale=scale), im], axis=0))
        tiles.append(np.full((height + 22, 4, 3), 255, np.uint8))
    return np.concatenate(tiles[:-1], axis=1)


GROUP_COLOURS_BGR = ((80, 175, 76), (59, 193, 255), (54, 67, 244), (176, 39, 156), (136, 150, 0))  # green, amber, red…


def group_panel(image_bgr, groups, grid, alpha=0.45):
    """The image with each pixel tinted by its patch's PGS group (green simple, amber medium, red hard, …) and
    one-pixel patch borders; ``groups`` (M,) per patch of ``grid``, each pixel showing the nearest-centre patch."""
    image_bgr = _bgr(image_bgr)
    size = (image_bgr.shape[1], image_bgr.shape[0])
    owner = grid.owner_map().numpy()
    g = to_numpy(groups).reshape(-1)[owner]
    colours = np.array([GROUP_COLOURS_BGR[i % len(GROUP_COLOURS_BGR)] for i in range(int(g.max()) + 1)], np.uint8)
    group_img = cv2.resize(colours[g], size, interpolation=cv2.INTER_NEAREST)
    panel = cv2.addWeighted(image_bgr, 1 - alpha, group_img, alpha, 0)
    # one-pixel patch borders at the picture's resolution, so a reader sees the V×V grid
    big = cv2.resize(owner.astype(np.int32), size, interpolation=cv2.INTER_NEAREST)
    edges = np.zeros(big.shape, bool)
    edges[:, 1:] |= big[:, 1:] != big[:, :-1]
    edges[1:, :] |= big[1:, :] != big[:-1, :]
    panel[edges] = (panel[edges] * 0.4).astype(np.uint8)
    return panel


def group_legend(groups, group_names=None):
    """'simple 40% / medium 30% / hard 30%': each group's share of the patches."""
    flat = to_numpy(groups).reshape(-1)
    n = int(flat.size)
    names = group_names or [f'group{i}' for i in range(int(flat.max()) + 1)]
    counts = [int((flat == i).sum()) for i in range(len(names))]
    return ' / '.join(f'{name} {100 * c / max(n, 1):.0f}%' for name, c in zip(names, counts))


def _bgr(image_bgr):
    image_bgr = np.ascontiguousarray(image_bgr)
    return cv2.cvtColor(image_bgr, cv2.COLOR_GRAY2BGR) if image_bgr.ndim == 2 else image_bgr


def qmap_overlay(image_bgr, qmap, groups, grid, group_names=None, alpha=0.45):
    """A PNG-ready strip: the image | Qmap over it (viridis) | PGS groups over it, with each group's share.

    ``image_bgr``: uint8 (H, W, 3) at any size (the SR or the bicubic image; H/h = the autoencoder factor).
    ``qmap``, ``groups``: (M,) per patch of ``grid`` (:class:`~patchscaler.sampling.patches.PatchGrid`), e.g.
    ``report.qmap[0]`` and ``report.groups[0]`` from the sampler. Each pixel shows the patch whose centre is
    nearest, so overlapping patches tile the picture without double drawing.
    """
    image_bgr = _bgr(image_bgr)
    size = (image_bgr.shape[1], image_bgr.shape[0])
    q = to_numpy(qmap, np.float32).reshape(-1)[grid.owner_map().numpy()]
    heat = confidence_to_bgr(np.nan_to_num(q, nan=0.0), size)
    q_panel = cv2.addWeighted(image_bgr, 1 - alpha, heat, alpha, 0)
    g_panel = group_panel(image_bgr, groups, grid, alpha)
    return labelled_strip([image_bgr, q_panel, g_panel], ['image', 'Qmap (mean C per patch)',
                                                          group_legend(groups, group_names)])
