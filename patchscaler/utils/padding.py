"""Bottom/right padding shared by the autoencoder (to multiples of d) and the PGS patch grid (latents below V)."""
import torch.nn.functional as F


def pad_bottom_right(x, ph, pw):
    """Pad (B, C, H, W) by ``ph`` rows and ``pw`` columns: reflect where the sides allow it (pad < size),
    else replicate."""
    if not ph and not pw:
        return x
    mode = 'reflect' if ph < x.shape[-2] and pw < x.shape[-1] else 'replicate'
    return F.pad(x, (0, pw, 0, ph), mode=mode)
