"""The texture classifier 𝒯 of Algorithm 1: a latent V×V patch -> a key vector (RTM-key and y0-query).

The paper projects RTM-values and coarse patches y0 with "a pre-trained Texture Classifier" that it does
not name, and nothing can be downloaded here. Two key extractors share one small interface:

* ``extractor(latents)``: (N, c, V, V) latent patches -> (N, D) float32 keys (the RTM L2-normalises them);
* ``extractor.spec()``: a JSON-able dict that rebuilds the same extractor (stored in the RTM's metadata,
  so queries are always projected the way the memory's keys were);
* ``needs_autoencoder``: whether it decodes the latent to pixels first (then the RTM binds its autoencoder);
* ``batch_size``: patches per call when keys are computed in bulk (small for extractors that decode);
* ``center_keys``: whether the RTM centres keys on the memory's mean key by default (see
  ``ReferenceTextureMemory.build``): yes for the hand-made descriptor, no for a trained classifier, whose
  own cosine similarities are what it was trained for.

:class:`LatentTextureDescriptor` (the default) needs no weights: second-order texture statistics of the
latent itself at several scales. :class:`TorchvisionTextureClassifier` runs a torchvision backbone (VGG,
ResNet, ...) on the decoded patch with weights from a local file, for users who have a pretrained texture
or ImageNet classifier.
"""
import hashlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from patchscaler.registry import TEXTURE_CLASSIFIERS
from patchscaler.utils.device import placement
from patchscaler.utils.errors import ConfigError, InputError, MissingWeightsError

# a fixed derivative filter bank (d/dx, d/dy, Laplacian, d²/dxdy): the energy of each response, per channel,
# says how much texture there is and of which orientation / frequency
_BANK = torch.tensor([
    [[0, 0, 0], [-0.5, 0, 0.5], [0, 0, 0]],
    [[0, -0.5, 0], [0, 0, 0], [0, 0.5, 0]],
    [[0, 1, 0], [1, -4, 1], [0, 1, 0]],
    [[0.25, 0, -0.25], [0, 0, 0], [-0.25, 0, 0.25]]], dtype=torch.float32)[:, None]


def check_latent_patches(latents, what='latent patches'):
    """(N, c, V, V) finite floating tensor, or a one-line :class:`InputError`."""
    if not torch.is_tensor(latents) or latents.dim() != 4 or latents.shape[-1] != latents.shape[-2]:
        shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
        raise InputError(f'{what} must be a (N, c, V, V) tensor, got {shape}')
    if not latents.is_floating_point():
        raise InputError(f'{what} must be floating point, got {latents.dtype}')
    if latents.numel() and not torch.isfinite(latents).all():
        raise InputError(f'{what} contain NaN or inf')


@TEXTURE_CLASSIFIERS.register_module()
class LatentTextureDescriptor:
    """Weight-free texture key: multi-scale second-order statistics of a latent patch.

    Per scale s (the patch average-pooled by s), on the latent channels (first projected to
    ``proj_channels`` by a fixed orthonormal matrix drawn from ``seed`` when c is larger, e.g. the 48
    channels of the pixel-unshuffle autoencoder; the SD VAE's 4 are used as they are), three blocks:

    * ``mean``: the channel means (colour / brightness);
    * ``gram``: the channel covariance (upper triangle; contrast and how channels co-vary: the Gram
      statistics of neural texture descriptors, here on the latent);
    * ``energy``: the mean squared response of each channel to a fixed derivative filter bank
      (d/dx, d/dy, Laplacian, d²/dxdy; valid region only): edge strength, orientation and frequency.

    Each block is power-normalised (signed square root, as for second-order descriptors) and scaled to
    unit norm (with a floor, so a flat patch's tiny texture blocks stay tiny instead of becoming noise
    directions), then weighted by ``block_weights``. The default 0.25 / 0.5 / 1 makes the filter energies
    (what kind of texture) count most, then the covariance, then colour: a texture classifier should find
    grass for grass whatever its shade. (Measured on synthetic smooth / rough / vertical / horizontal
    classes: top-4 retrieval precision 0.7-1.0 with these weights, 0.3-0.9 with 0.5 / 1 / 1.)
    Key size per scale: m + m(m+1)/2 + 4m for m projected channels (152 in all for m = 8, two scales).

    Args:
        proj_channels (int): m, channels after the fixed projection (only applied when c > m).
        scales (list[int]): average-pooling factors; every V / s must be at least 3 (the filter size).
        block_weights (list[float]): weights of the mean, gram and energy blocks.
        seed (int): seed of the projection matrix (part of the spec: keys depend on it).
    """

    needs_autoencoder = False
    batch_size = 1024
    center_keys = True

    def __init__(self, proj_channels=8, scales=(1, 2), block_weights=(0.25, 0.5, 1.0), seed=0):
        if int(proj_channels) < 1:
            raise ConfigError(f'LatentTextureDescriptor: proj_channels must be >= 1, got {proj_channels}')
        if not scales or any(int(s) < 1 for s in scales):
            raise ConfigError(f'LatentTextureDescriptor: scales must be positive integers, got {scales}')
        if len(block_weights) != 3 or any(w < 0 for w in block_weights) or not any(block_weights):
            raise ConfigError('LatentTextureDescriptor: block_weights needs three non-negative weights (mean, gram, '
                              f'energy), not all zero; got {block_weights}')
        self.proj_channels, self.seed = int(proj_channels), int(seed)
        self.scales = [int(s) for s in scales]
        self.block_weights = [float(w) for w in block_weights]
        self._cache = {}  # (c, device) -> the projection and the filter bank there, made once (no copy per call)

    def spec(self):
        return {'type': type(self).__name__, 'proj_channels': self.proj_channels, 'scales': self.scales,
                'block_weights': self.block_weights, 'seed': self.seed}

    def to(self, device):  # noqa: ARG002 - nothing to move; the projection is made where the input is
        return self

    def key_dim(self, channels):
        m = min(channels, self.proj_channels)
        return len(self.scales) * (m + m * (m + 1) // 2 + _BANK.shape[0] * m)

    def projection(self, channels):
        """(m, c) orthonormal rows fixed by (c, seed), or None when c <= m."""
        if channels <= self.proj_channels:
            return None
        g = torch.Generator().manual_seed(self.seed)
        q, _ = torch.linalg.qr(torch.randn(channels, self.proj_channels, generator=g, dtype=torch.float64))
        return q.T.float()

    @torch.no_grad()
    def __call__(self, latents):
        check_latent_patches(latents)
        v = latents.shape[-1]
        if v // max(self.scales) < 3:
            raise InputError(f'LatentTextureDescriptor: patches of {v}×{v} are too small for scales {self.scales} '
                             '(each V / s must be at least 3)')
        x = latents.float()
        key = (x.shape[1], x.device)
        if key not in self._cache:
            proj = self.projection(x.shape[1])
            m = min(x.shape[1], self.proj_channels)
            self._cache[key] = (None if proj is None else proj.to(x.device), _BANK.to(x.device),
                                torch.triu_indices(m, m, device=x.device))
        proj, bank, iu = self._cache[key]
        if proj is not None:
            x = torch.einsum('mc,nchw->nmhw', proj, x)
        blocks = []
        for s in self.scales:
            blocks += self._blocks(F.avg_pool2d(x, s) if s > 1 else x, bank, iu)
        return torch.cat(blocks, 1)

    def _blocks(self, f, bank, iu):
        n, m, h, w = f.shape
        mean = f.mean((2, 3))
        centred = (f - mean[..., None, None]).flatten(2)
        gram = (centred @ centred.transpose(1, 2) / (h * w))[:, iu[0], iu[1]]
        energy = F.conv2d(f.reshape(n * m, 1, h, w), bank).pow(2).mean((2, 3)).reshape(n, m * bank.shape[0])
        out = []
        for block, weight in zip((mean, gram, energy), self.block_weights):
            block = block.sign() * block.abs().sqrt()
            out.append(weight * block / block.norm(dim=1, keepdim=True).clamp_min(1e-3))
        return out


def file_sha256(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict_file(path):
    """A state dict from ``.safetensors`` or a torch file loaded with ``weights_only=True`` (no pickle code)."""
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        return load_file(path)
    from patchscaler.utils.checkpoint import safe_torch_load
    state = safe_torch_load(path)
    for key in ('state_dict', 'model', 'params'):  # common wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


@TEXTURE_CLASSIFIERS.register_module()
class TorchvisionTextureClassifier(nn.Module):
    """A torchvision backbone on the decoded patch: orderless pooling of one layer's features.

    The latent patch is decoded by the RTM's autoencoder (V·d pixels a side), optionally resized to
    ``input_size``, ImageNet-normalised and run up to ``layer``; the feature map is pooled over space
    (``mean``, or ``mean_std``: the first and second moments, a texture descriptor in the spirit of
    style statistics). With VGG-16's ``features.22`` (relu4_3) that is 1024 numbers per patch.

    Args:
        weights (str): local state dict of the backbone (``.pth`` loaded with ``weights_only=True``, or
            ``.safetensors``), e.g. torchvision's ImageNet file ``vgg16-397923af.pth`` or your own
            texture classifier's. Never downloads.
        arch (str): a torchvision classification model name (``vgg16``, ``resnet50``, ...).
        layer (str): the node whose output is pooled (torchvision feature-extraction node names,
            e.g. ``features.22`` for VGG-16, ``layer3`` for ResNets).
        pool (str): ``mean`` or ``mean_std``.
        input_size (int | None): resize the decoded patch to this side first (None: as decoded).
        autoencoder: bound by the RTM (not an option).
    """

    needs_autoencoder = True
    batch_size = 32  # each patch is decoded to V·d pixels first (128² for the SD VAE)
    center_keys = False

    def __init__(self, weights, arch='vgg16', layer='features.22', pool='mean_std', input_size=None,
                 autoencoder=None):
        super().__init__()
        import torchvision
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        if pool not in ('mean', 'mean_std'):
            raise ConfigError(f"TorchvisionTextureClassifier: pool must be 'mean' or 'mean_std', got {pool!r}")
        if not weights or not os.path.isfile(str(weights)):
            raise MissingWeightsError(
                f'texture classifier weights not found: {weights}. Put a torchvision {arch} state dict there '
                f'(e.g. torchvision\'s ImageNet file for {arch}, copied from ~/.cache/torch/hub/checkpoints/ of a '
                'machine with internet, or your own texture classifier) or set texture_classifier.weights to it.')
        try:
            model = torchvision.models.get_model(arch, weights=None)
        except ValueError:
            raise ConfigError(f'TorchvisionTextureClassifier: unknown torchvision model {arch!r}') from None
        try:
            model.load_state_dict(load_state_dict_file(str(weights)))
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise ConfigError(f'{weights} does not fit torchvision {arch} ({first})') from None
        nodes = get_graph_node_names(model.eval())[1]
        if layer not in nodes and layer not in dict(model.named_modules()):  # a node, or a whole module's output
            import difflib
            close = difflib.get_close_matches(layer, nodes, n=3)
            raise ConfigError(f'TorchvisionTextureClassifier: {arch} has no layer {layer!r}'
                              + (f' (close: {close})' if close else ''))
        self.body = create_feature_extractor(model, {layer: 'feat'}).eval().requires_grad_(False)
        self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.weights, self.arch, self.layer, self.pool = str(weights), arch, layer, pool
        self.input_size = int(input_size) if input_size else None
        self.weights_sha256 = file_sha256(self.weights)
        self._autoencoder = [autoencoder]  # a list: not a submodule of this one (its own device and dtype)

    def spec(self):
        return {'type': type(self).__name__, 'weights': self.weights, 'arch': self.arch, 'layer': self.layer,
                'pool': self.pool, 'input_size': self.input_size, 'weights_sha256': self.weights_sha256}

    def bind(self, autoencoder):
        self._autoencoder[0] = autoencoder
        return self

    @torch.no_grad()
    def forward(self, latents):
        check_latent_patches(latents)
        ae = self._autoencoder[0]
        if ae is None:
            raise ConfigError('TorchvisionTextureClassifier decodes patches first: bind(autoencoder) it, or build it '
                              'through the RTM, which binds its own')
        device, dtype = placement(self.body)
        rgb = ae.decode(latents.to(*placement(ae, latents.device))).float().clamp(0, 1).to(device)
        if self.input_size and rgb.shape[-1] != self.input_size:
            rgb = F.interpolate(rgb, size=(self.input_size,) * 2, mode='bilinear', align_corners=False, antialias=True)
        feat = self.body(((rgb - self.mean) / self.std).to(dtype))['feat'].float().flatten(2)
        feat = feat.to(latents.device)  # keys live where the patches are, whatever device the backbone is on
        return feat.mean(2) if self.pool == 'mean' else torch.cat([feat.mean(2), feat.std(2, correction=0)], 1)


def build_texture_classifier(opt, autoencoder=None):
    """A key extractor from options (``{type: LatentTextureDescriptor, ...}``; default: that type with its
    defaults), with the autoencoder bound when it decodes. A stored ``spec()`` is accepted too."""
    from patchscaler.utils.options_check import build_from_registry
    opt = dict(opt or {'type': 'LatentTextureDescriptor'})
    opt.pop('weights_sha256', None)  # part of a stored spec, checked by the RTM, not an argument
    extractor = build_from_registry(TEXTURE_CLASSIFIERS, opt, 'texture_classifier')
    if getattr(extractor, 'needs_autoencoder', False):
        if autoencoder is None:
            raise ConfigError(f"texture_classifier {opt.get('type')} decodes patches and needs the autoencoder")
        extractor.bind(autoencoder)
    return extractor
