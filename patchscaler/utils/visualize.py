"""Pictures people look at: the confidence map as a colour image, and labelled side-by-side strips."""
import cv2
import numpy as np


def confidence_to_bgr(confidence, size=None, colormap=cv2.COLORMAP_VIRIDIS):
    """(h, w) or (1, h, w) confidence in [0, 1] -> uint8 BGR colour image, nearest-upsampled to ``size`` (w, h).

    Low confidence (hard to restore) is dark/blue, high confidence is yellow (viridis).
    """
    c = np.asarray(confidence, dtype=np.float32).squeeze()
    img = cv2.applyColorMap(np.clip(c * 255.0 + 0.5, 0, 255).astype(np.uint8), colormap)
    if size is not None:
        img = cv2.resize(img, size, interpolation=cv2.INTER_NEAREST)
    return img


def labelled_strip(images, labels, height=None):
    """Put uint8 BGR images side by side with a caption above each; all resized to one height."""
    height = height or max(im.shape[0] for im in images)
    tiles = []
    for im, label in zip(images, labels):
        if im.ndim == 2:
            im = cv2.cvtColor(im, cv2.COLOR_GRAY2BGR)
        w = max(1, round(im.shape[1] * height / im.shape[0]))
        im = cv2.resize(im, (w, height), interpolation=cv2.INTER_NEAREST)
        bar = np.full((22, w, 3), 255, np.uint8)
        text_w = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)[0][0]
        scale = 0.5 * min(1.0, (w - 8) / max(text_w, 1))  # narrow tiles get a smaller font, not a cut label
        cv2.putText(bar, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.concatenate([bar, im], axis=0))
        tiles.append(np.full((height + 22, 4, 3), 255, np.uint8))
    return np.concatenate(tiles[:-1], axis=1)
