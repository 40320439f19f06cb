"""Confidence-driven loss of the GRM, paper Eq. 1 (after Ning et al., "Uncertainty-driven loss", 2021).

    L = |y_HR - x_HR|_1 + λ · ( C · e² - η · log C ),    e² = mean over channels of (y_HR - x_HR)²

Choices where the paper is silent, and why:

* The first term is read as the L1 reconstruction loss (the paper's ``‖·‖₁²`` typesetting aside): it keeps
  y_HR trained where C is small, as in UDL's first stage.
* e² is the squared error at each latent position averaged over the c latent channels, because C has one
  channel per position. Averaging (not summing) keeps η's meaning the same for c = 4 (SD VAE) and
  c = 48 (pixel-unshuffle demo autoencoder).
* For a fixed error the confidence term is minimised at C* = η / e², clipped to (0, 1]: confident where
  the error is small. So ``sqrt(η)`` is the error level below which C saturates at 1. The model passes
  ``y_hr`` through the gradient of both terms; the confidence term's gradient into y_HR is weighted by C
  (hard regions, where C is low, are not over-fitted), the standard behaviour of this loss.
* Numerical safety: C is clamped to [eps, 1] before use, so log C is finite and nothing is inf/NaN as
  C -> 0 (a clamped C gets no gradient from either term and cannot run away further).
* Reduction: 'mean' averages the L1 term over all elements and the confidence term over all positions
  (B·h·w), so the loss scale is independent of batch and latent size; 'sum' sums both; 'none' returns
  the per-position map (B, 1, h, w) of L1 (channel mean) + λ·confidence term.
"""
import torch
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

from patchscaler.utils.errors import ConfigError


@LOSS_REGISTRY.register()
class ConfidenceLoss(nn.Module):
    """Eq. 1. ``forward(pred, target, confidence)``; confidence (B, 1, h, w) in (0, 1].

    Args:
        lam (float): λ, weight of the confidence term. Default 1.
        eta (float): η, weight of -log C. Default 1e-2 (C saturates at 1 for RMS latent error < 0.1).
        loss_weight (float): overall weight, BasicSR convention. Default 1.
        reduction (str): 'mean' | 'sum' | 'none'. Default 'mean'.
        eps (float): lower clamp of C. Default 1e-6.
    """

    def __init__(self, lam=1.0, eta=1e-2, loss_weight=1.0, reduction='mean', eps=1e-6):
        super().__init__()
        if reduction not in ('mean', 'sum', 'none'):
            raise ConfigError(f"ConfidenceLoss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if eta <= 0 or lam < 0:
            raise ConfigError(f'ConfidenceLoss: need eta > 0 and lam >= 0, got eta={eta}, lam={lam}')
        self.lam, self.eta, self.loss_weight, self.reduction, self.eps = lam, eta, loss_weight, reduction, eps

    def forward(self, pred, target, confidence):
        if confidence.dim() != 4 or confidence.shape[1] != 1 or confidence.shape[-2:] != pred.shape[-2:]:
            raise ValueError(f'ConfidenceLoss: confidence must be (B, 1, h, w) matching pred {tuple(pred.shape)}, '
                             f'got {tuple(confidence.shape)}')
        diff = pred - target
        conf = confidence.clamp(self.eps, 1.0)
        sq_err = diff.pow(2).mean(dim=1, keepdim=True)  # e², (B, 1, h, w)
        conf_term = conf * sq_err - self.eta * torch.log(conf)
        if self.reduction == 'mean':
            loss = diff.abs().mean() + self.lam * conf_term.mean()
        elif self.reduction == 'sum':
            loss = diff.abs().sum() + self.lam * conf_term.sum()
        else:
            loss = diff.abs().mean(dim=1, keepdim=True) + self.lam * conf_term
        return self.loss_weight * loss

    @staticmethod
    def optimal_confidence(sq_err, eta):
        """C* = η / e² clipped to (0, 1]: the minimiser of C·e² − η·log C for a fixed e²."""
        return (eta / sq_err.clamp_min(torch.finfo(sq_err.dtype).tiny)).clamp(max=1.0)
