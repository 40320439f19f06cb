"""The Reference Texture Memory (section 3.3, Algorithm 1): RTM-value latent patches, RTM-key vectors.

Built offline (``ReferenceTextureMemory.build``, or ``tools/build_rtm.py`` from images): keys from the
texture classifier 𝒯, farthest point sampling down to the target size. At sampling time every coarse patch
y0 is projected by the same 𝒯, L2-normalised, and ``query`` returns its top-K texture priors tp^k and their
cosine similarities s^k (Algorithm 1), which the texture encoder turns into the texture prompt.

On disk: ``<name>.safetensors`` (values, normalised keys, the autoencoder probe) whose header carries the
metadata as JSON, and ``<name>.json``, a readable copy of that metadata. No pickle anywhere. Loading checks
the memory against the model it serves: V, latent channels, and the autoencoder itself (type, factors, and
its latent of a fixed probe image, so a different checkpoint with the same config is caught too).
"""
import contextlib
import datetime
import json
import os
import threading
import warnings

import torch
import torch.nn.functional as F

from patchscaler.registry import RETRIEVERS
from patchscaler.utils.checkpoint import atomic_write
from patchscaler.utils.device import placement
from patchscaler.utils.errors import CheckpointError, ConfigError, InputError, MissingWeightsError

from .fps import farthest_point_sampling, fps_space
from .index import KeyIndex
from .texture_classifier import build_texture_classifier, check_latent_patches

FORMAT, VERSION = 'patchscaler-rtm', 1
FPS_SPACES = ('keys', 'values', 'both')
PROBE_TOLERANCE = 0.05  # relative L2 difference of the probe latents: bf16/GPU noise ≪ this ≪ other weights


def autoencoder_identity(autoencoder):
    """(description dict, probe latent): what an RTM records about the autoencoder its values came from.

    The probe latent is the deterministic encoding (posterior mode, even for an autoencoder configured to
    sample) of a fixed random image, computed without touching the global RNG."""
    d = int(autoencoder.downscale_factor)
    side = 8 * d
    probe = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    sampling = getattr(autoencoder, 'sample_posterior', False)
    try:
        if sampling:
            autoencoder.sample_posterior = False
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            latent = autoencoder.encode(probe.to(*placement(autoencoder))).float().cpu()
    finally:
        if sampling:
            autoencoder.sample_posterior = sampling
    return {'type': type(autoencoder).__name__, 'latent_channels': int(autoencoder.latent_channels),
            'downscale_factor': d, 'scaling_factor': float(getattr(autoencoder, 'scaling_factor', 1.0))}, latent


def _describe(ae):
    return f"{ae['type']} (c={ae['latent_channels']}, d={ae['downscale_factor']}, scaling {ae['scaling_factor']:g})"


_tf32_lock = threading.RLock()  # re-entrant: search() holds it around query_keys()


@contextlib.contextmanager
def full_precision(device):
    """Autocast and TF32 off on ``device``'s type. Retrieval runs in float32 always: the memory's keys were computed
    in float32 at build time and training queries it outside autocast, so a query inside the pipeline's bf16/fp16
    autocast changed its top-K set (8-12 % of the queries under CPU bf16) and, in fp16, decoded patches past the
    autoencoder's fp32 fallback (NaN keys); TF32 matmuls (which the tools enable on CUDA) would round the keys to a
    10-bit mantissa. The TF32 flags are global: they are restored on leaving, one retrieval at a time."""
    device = torch.device(device)
    try:
        no_autocast = torch.autocast(device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type without autocast (meta, ...)
        no_autocast = contextlib.nullcontext()
    if device.type != 'cuda':
        with no_autocast:
            yield
        return
    with _tf32_lock, no_autocast:
        flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def extract_keys(extractor, patches, batch_size=None, progress=False):
    """Keys of (N, c, V, V) patches in batches (default: the extractor's ``batch_size``) on the patches'
    device -> (N, D) float32, not normalised."""
    batch_size = int(batch_size or getattr(extractor, 'batch_size', 1024))
    batches = range(0, patches.shape[0], batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc='texture keys', unit='batch')
    return torch.cat([extractor(patches[i:i + batch_size]).float() for i in batches])


@RETRIEVERS.register_module()
class ReferenceTextureMemory:
    """RTM-values (S, c, V, V), unit RTM-keys (S, D), the texture classifier that made them, and a top-K index.

    Args:
        values (Tensor): (S, c, V, V) latent texture patches.
        keys (Tensor): (S, D) keys of ``values`` (normalised here).
        texture_classifier: the key extractor (see :mod:`.texture_classifier`).
        meta (dict | None): provenance (autoencoder, FPS, sources); filled in by ``build``.
        top_k (int): K of ``query`` when not given per call (paper: not stated; 4 is our default).
        backend (str): ``auto`` | ``faiss`` | ``torch`` (see :mod:`.index`).
        autoencoder_probe (Tensor | None): the autoencoder's latent of the fixed probe image.
        key_mean (Tensor | None): (D,) subtracted from raw keys before normalising (see ``build``).
    """

    def __init__(self, values, keys, texture_classifier, meta=None, top_k=4, backend='auto',
                 autoencoder_probe=None, key_mean=None):
        check_latent_patches(values, 'RTM values')
        if keys.dim() != 2 or keys.shape[0] != values.shape[0]:
            raise InputError(f'RTM keys must be (S, D) for S={values.shape[0]} values, got {tuple(keys.shape)}')
        self.values = values.float()
        self.keys = F.normalize(keys.float(), dim=1)
        self.texture_classifier = texture_classifier
        self.meta = dict(meta or {})
        self.top_k = int(top_k)
        self.autoencoder_probe = autoencoder_probe
        self.key_mean = key_mean.float() if key_mean is not None else torch.zeros(keys.shape[1])
        self.index = KeyIndex(self.keys, backend)
        if not 1 <= self.top_k <= len(self):
            raise ConfigError(f'top_k must be between 1 and the RTM size {len(self)}, got {top_k}')

    def __len__(self):
        return self.values.shape[0]

    @property
    def patch_size(self):
        return self.values.shape[-1]

    @property
    def latent_channels(self):
        return self.values.shape[1]

    def __repr__(self):
        return (f'ReferenceTextureMemory({len(self)} patches of {self.latent_channels}×{self.patch_size}², '
                f"keys {self.keys.shape[1]}-d from {self.meta.get('texture_classifier', {}).get('type', '?')}, "
                f'top_k {self.top_k})')

    @classmethod
    def build(cls, values, key_extractor, size, *, fps='both', value_weight=1.0, seed=0, autoencoder=None,
              sources=None, key_batch_size=None, center_keys=None, progress=False, top_k=4, backend='auto'):
        """Keys for all candidate ``values`` (N, c, V, V), then FPS down to ``size`` representative pairs.

        With ``center_keys`` (default: the extractor's ``center_keys``, True for the weight-free
        descriptor, False for a trained backbone) keys are centred on the mean key of all candidates before
        they are L2-normalised, and queries on the same stored mean: a hand-made descriptor's numbers share
        a large common component (energies are positive) that squeezes every cosine similarity towards 1
        and blurs the ranking. Algorithm 1 normalises 𝒯's output as it is; centring is our addition for
        the descriptor (similarities then span [-1, 1]) and is recorded in the metadata.

        Args:
            key_extractor: a texture classifier, or its options dict (built with ``autoencoder`` bound).
            size (int): S, the memory size (paper: 2,000 of 20,000); fewer when fewer distinct candidates exist.
            fps (str): the space FPS covers: ``keys``, ``values`` or ``both`` (the paper: "on both").
            value_weight (float): weight of the value distance in ``both``.
            autoencoder: the autoencoder ``values`` were encoded with (recorded, checked on load).
            sources (list[str] | None): where the candidates came from (recorded).
            key_batch_size (int | None): patches per key-extractor call (default: the extractor's).
            center_keys (bool | None): see above.
        """
        check_latent_patches(values, 'RTM candidates')
        if fps not in FPS_SPACES:
            raise ConfigError(f'fps must be one of {FPS_SPACES}, got {fps!r}')
        if not hasattr(key_extractor, 'spec'):
            key_extractor = build_texture_classifier(key_extractor, autoencoder)
        if isinstance(key_extractor, torch.nn.Module):
            key_extractor.to(values.device)
        if center_keys is None:
            center_keys = getattr(key_extractor, 'center_keys', True)
        raw = extract_keys(key_extractor, values, key_batch_size, progress)
        key_mean = raw.mean(0) if center_keys else torch.zeros_like(raw[0])
        keys = F.normalize(raw - key_mean, dim=1)
        if fps == 'keys':
            points = fps_space(keys)
        elif fps == 'values':
            points = fps_space(keys, values, 1.0, seed=seed)[:, keys.shape[1]:]
        else:
            points = fps_space(keys, values, value_weight, seed=seed)
        chosen = farthest_point_sampling(points, size, seed=seed, progress=progress).to(values.device)
        if len(chosen) < int(size):
            warnings.warn(f'RTM: only {len(chosen)} distinct candidate patches for a memory of {size}; keeping '
                          'all of them', stacklevel=2)
        meta = {'format': FORMAT, 'version': VERSION, 'size': len(chosen), 'candidates': int(values.shape[0]),
                'patch_size': int(values.shape[-1]), 'latent_channels': int(values.shape[1]),
                'key_dim': int(keys.shape[1]), 'texture_classifier': key_extractor.spec(),
                'center_keys': bool(center_keys),
                'fps': {'space': fps, 'value_weight': float(value_weight), 'seed': int(seed)},
                'sources': list(sources or []), 'created': datetime.datetime.now().isoformat(timespec='seconds')}
        probe = None
        if autoencoder is not None:
            meta['autoencoder'], probe = autoencoder_identity(autoencoder)
        rtm = cls(values[chosen].detach().cpu(), keys[chosen].detach().cpu(), key_extractor, meta, top_k, backend,
                  probe, key_mean.cpu())
        rtm.source_indices = chosen.cpu()  # which candidates were kept, in FPS order (not saved)
        return rtm

    def to(self, device):
        """Move values and keys (and a torch-module key extractor) to ``device``; returns self."""
        self.values, self.keys, self.key_mean = self.values.to(device), self.keys.to(device), self.key_mean.to(device)
        self.index = KeyIndex(self.keys, self.index.backend, self.index.block_size)
        if isinstance(self.texture_classifier, torch.nn.Module):
            self.texture_classifier.to(device)
        return self

    def query_keys(self, patches, batch_size=None):
        """y0-query of Algorithm 1: 𝒯(patches), L2-normalised, (M, D)."""
        check_latent_patches(patches, 'query patches')
        if patches.shape[1:] != self.values.shape[1:]:
            raise InputError(f'query patches are {tuple(patches.shape[1:])} but this RTM holds '
                             f'{tuple(self.values.shape[1:])} (c, V, V) patches')
        if patches.shape[0] == 0:
            return patches.new_zeros(0, self.keys.shape[1], dtype=torch.float32)
        with full_precision(patches.device):
            raw = extract_keys(self.texture_classifier, patches.float(), batch_size)
            return F.normalize(raw - self.key_mean.to(raw.device), dim=1)

    @torch.no_grad()
    def search(self, patches, k=None):
        """Top-K indices into the memory and cosine similarities for (M, c, V, V) patches:
        (similarities (M, K) float32, indices (M, K) int64), best first. Keys and search run in float32 with the
        caller's autocast off (:func:`full_precision`)."""
        with full_precision(patches.device):
            return self.index.search(self.query_keys(patches), self.top_k if k is None else k)

    @torch.no_grad()
    def query(self, patches, k=None):
        """Algorithm 1: texture priors tp^k (M, K, c, V, V) in the patches' dtype and device, and the top-K
        similarities s^k (M, K) float32."""
        sims, idx = self.search(patches, k)
        priors = self.values.to(patches.device)[idx.to(patches.device)]
        return priors.to(patches.dtype), sims.to(patches.device)

    # ----------------------------------------------------------------------------------------------- files
    def save(self, path):
        """Write ``<path>`` (.safetensors, metadata in its header) and the readable ``<stem>.json``, each
        written to a temporary file and renamed, so a crash never leaves a half-written memory."""
        from safetensors.torch import save_file
        path = rtm_path(path)
        tensors = {'values': self.values.detach().cpu().contiguous(), 'keys': self.keys.detach().cpu().contiguous(),
                   'key_mean': self.key_mean.detach().cpu().contiguous()}
        if self.autoencoder_probe is not None:
            tensors['autoencoder_probe'] = self.autoencoder_probe.cpu().contiguous()
        meta = dict(self.meta, format=FORMAT, version=VERSION, size=len(self), top_k=self.top_k)
        text = json.dumps(meta, indent=2)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={'patchscaler_rtm': text}))
        atomic_write(path[:-len('.safetensors')] + '.json', lambda tmp: _write_text(tmp, text + '\n'))
        return path

    @classmethod
    def load(cls, path, autoencoder=None, patch_size=None, texture_classifier=None, top_k=None, backend='auto',
             device='cpu'):
        """Load a memory and check it fits the model: ``patch_size`` (V) and ``autoencoder`` when given.

        ``texture_classifier`` overrides the stored spec (e.g. the backbone weights moved to another path);
        it must make the same keys: its spec may differ from the stored one only in the weights' path.
        """
        from safetensors import SafetensorError, safe_open
        path = rtm_path(path)
        if not os.path.isfile(path):
            raise MissingWeightsError(f'RTM not found: {path}. Build it with python tools/build_rtm.py -opt '
                                      'options/build_rtm.yml (the demo: options/demo/build_rtm_demo.yml)')
        try:
            with safe_open(path, 'pt', device='cpu') as f:
                header = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f'{path} is not a readable safetensors file (truncated or corrupt: {e})') from None
        try:
            meta = json.loads(header['patchscaler_rtm'])
        except (KeyError, json.JSONDecodeError):
            raise CheckpointError(f'{path} is a safetensors file but not a PatchScaler RTM (no RTM metadata)') from None
        if meta.get('format') != FORMAT or int(meta.get('version', 0)) > VERSION or 'values' not in tensors:
            raise CheckpointError(f"{path}: unsupported RTM format {meta.get('format')!r} version "
                                  f"{meta.get('version')} (this PatchScaler reads {FORMAT} version <= {VERSION})")
        values = tensors['values']
        if patch_size is not None and int(patch_size) != values.shape[-1]:
            raise ConfigError(f'{path} holds {values.shape[-1]}×{values.shape[-1]} patches but the model uses V = '
                              f'{patch_size}; rebuild the RTM with patch_size: {patch_size}')
        probe = tensors.get('autoencoder_probe')
        if autoencoder is not None:
            _check_autoencoder(path, meta.get('autoencoder'), probe, autoencoder)
        stored = meta['texture_classifier']
        extractor = build_texture_classifier(texture_classifier or stored, autoencoder)
        _check_same_extractor(path, stored, extractor.spec())
        rtm = cls(values, tensors['keys'], extractor, meta, meta.get('top_k', 4) if top_k is None else top_k, backend,
                  probe, tensors.get('key_mean'))
        return rtm.to(device)


def _write_text(path, text):
    with open(path, 'w') as f:
        f.write(text)


def rtm_path(path):
    path = os.fspath(path)
    return path if path.endswith('.safetensors') else path + '.safetensors'


def _check_autoencoder(path, stored, probe, autoencoder):
    rebuild = 'rebuild the RTM with this autoencoder (tools/build_rtm.py) or point the model at the RTM built for it'
    if stored is None:  # built by ReferenceTextureMemory.build without its autoencoder: nothing to vouch for it
        raise ConfigError(f'{path} was built without recording its autoencoder, so it cannot be checked against the '
                          f'model\'s; {rebuild}')
    now, latent = autoencoder_identity(autoencoder)
    fields = ('type', 'latent_channels', 'downscale_factor')
    if any(now[f] != stored[f] for f in fields) or abs(now['scaling_factor'] - stored['scaling_factor']) > 1e-6:
        raise ConfigError(f'{path} was built with the autoencoder {_describe(stored)} but the model uses '
                          f'{_describe(now)}; {rebuild}')
    if probe is not None:
        diff = float((latent - probe).norm() / probe.norm().clamp_min(1e-12)) if latent.shape == probe.shape else 1.0
        if diff > PROBE_TOLERANCE:
            raise ConfigError(f'{path} was built with different weights of {_describe(stored)} (its latent of the '
                              f'probe image differs by {diff:.0%}); {rebuild}')


def _check_same_extractor(path, stored, now):
    a = {k: v for k, v in stored.items() if k != 'weights'}
    b = {k: v for k, v in now.items() if k != 'weights'}
    if a != b:
        raise ConfigError(f'{path} keys were made by the texture classifier {a} but the given one is {b}; queries '
                          'must be projected by the same classifier (same weights) as the memory')


RTM_OPTION_KEYS = ('path', 'top_k', 'backend', 'texture_classifier')  # the model's ``rtm`` section, besides type


def build_retriever(opt, autoencoder=None, patch_size=None, device='cpu'):
    """An RTM from options: ``{type: ReferenceTextureMemory, path: ..., top_k: 4, backend: auto,
    texture_classifier: (optional override)}``, checked against the model's autoencoder and V."""
    from patchscaler.utils.options_check import check_keys, registry_get
    if not isinstance(opt, dict) or 'type' not in opt or 'path' not in opt:
        raise ConfigError(f"rtm options must be a mapping with 'type' and 'path', got {opt!r}")
    opt = dict(opt)
    cls = registry_get(RETRIEVERS, opt.pop('type'), 'rtm')
    check_keys('rtm.', opt, RTM_OPTION_KEYS)
    return cls.load(opt.pop('path'), autoencoder=autoencoder, patch_size=patch_size, device=device, **opt)
