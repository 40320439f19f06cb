"""Build an RTM from an option file (what ``tools/build_rtm.py`` runs): images -> candidates -> keys -> FPS ->
``<output>.safetensors`` + ``.json`` + ``_preview.png``. See ``options/build_rtm.yml`` for every option."""
import os
import time

import cv2
import numpy as np
import torch

from patchscaler.registry import AUTOENCODERS
from patchscaler.utils.checkpoint import atomic_write, writable_folder
from patchscaler.utils.device import resolve_device
from patchscaler.utils.errors import ConfigError
from patchscaler.utils.options_check import build_from_registry, check_keys, check_path

from .candidates import MODES, collect_candidates
from .memory import FPS_SPACES, ReferenceTextureMemory, rtm_path
from .preview import rtm_preview
from .texture_classifier import build_texture_classifier

OPTION_KEYS = {'name', 'autoencoder', 'patch_size', 'sources', 'candidates', 'texture_classifier', 'size', 'fps',
               'top_k', 'output', 'device', 'preview', 'center_keys', 'key_batch_size'}
REQUIRED = ('autoencoder', 'patch_size', 'sources', 'size', 'output')
CANDIDATE_KEYS = {'num', 'mode', 'min_std', 'context', 'seed', 'batch_size'}
FPS_KEYS = {'space', 'value_weight', 'seed'}
PREVIEW_KEYS = {'queries', 'count', 'columns', 'tile'}


def _section(opt, name, known):
    value = opt.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"'{name}' must be a mapping")
    check_keys(f'{name}.', value, known)
    return value


def check_rtm_options(opt, check_paths=True):
    """One-line ConfigErrors for unknown, missing or mistyped keys and missing sources, before any work."""
    if not isinstance(opt, dict):
        raise ConfigError('an RTM option file must be a YAML mapping')
    check_keys('', opt, OPTION_KEYS)
    for key in REQUIRED:
        if opt.get(key) is None:
            raise ConfigError(f"RTM options are missing the required key '{key}'")
    _integer('patch_size', opt['patch_size'])
    _integer('size', opt['size'])
    _integer('top_k', opt.get('top_k', 4))
    if opt.get('top_k', 4) > opt['size']:
        raise ConfigError(f"top_k ({opt['top_k']}) cannot exceed the memory size ({opt['size']})")
    if opt.get('key_batch_size') is not None:
        _integer('key_batch_size', opt['key_batch_size'])
    if opt.get('center_keys') not in (None, True, False):
        raise ConfigError(f"center_keys must be true, false or left out, got {opt['center_keys']!r}")
    cand = _section(opt, 'candidates', CANDIDATE_KEYS)
    for key, lowest in (('num', 1), ('batch_size', 1), ('context', 0), ('seed', 0)):
        if key in cand:
            _integer(f'candidates.{key}', cand[key], lowest)
    if cand.get('mode', 'random') not in MODES:
        raise ConfigError(f"candidates.mode must be one of {MODES}, got {cand['mode']!r}")
    if not isinstance(cand.get('min_std', 0.0), (int, float)) or cand.get('min_std', 0.0) < 0:
        raise ConfigError(f"candidates.min_std must be a number >= 0, got {cand['min_std']!r}")
    fps = _section(opt, 'fps', FPS_KEYS)
    if fps.get('space', 'both') not in FPS_SPACES:
        raise ConfigError(f"fps.space must be one of {FPS_SPACES}, got {fps['space']!r}")
    weight = fps.get('value_weight', 1.0)
    if not isinstance(weight, (int, float)) or weight < 0:
        raise ConfigError(f'fps.value_weight must be a number >= 0, got {weight!r}')
    _section(opt, 'preview', PREVIEW_KEYS)  # preview: false turns the picture off
    # before the autoencoder loads: a typo in a path costs a second, not minutes
    for src in _as_list(opt['sources']) if check_paths else ():
        check_path('sources', src.get('root') if isinstance(src, dict) else src)


def _integer(name, value, lowest=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ConfigError(f'{name} must be an integer >= {lowest}, got {value!r}')


def build_rtm_from_options(opt, device=None, output=None, progress=True, log=print):
    """Run the whole build; returns (rtm, path of the .safetensors, CandidateReport)."""
    check_rtm_options(opt)
    device = resolve_device(device or opt.get('device'))
    output = rtm_path(output or opt['output'])
    writable_folder(os.path.dirname(os.path.abspath(output)), 'the RTM output folder')  # before the encoding
    start = time.perf_counter()
    autoencoder = build_from_registry(AUTOENCODERS, opt['autoencoder'], 'autoencoder').to(device)
    extractor = build_texture_classifier(opt.get('texture_classifier'), autoencoder)
    if isinstance(extractor, torch.nn.Module):
        extractor.to(device)
    # one patch through the classifier now, so a V it cannot take fails before minutes of encoding
    extractor(torch.zeros(1, autoencoder.latent_channels, opt['patch_size'], opt['patch_size'], device=device))
    cand = _section(opt, 'candidates', CANDIDATE_KEYS)
    values, origins, report = collect_candidates(
        opt['sources'], autoencoder, opt['patch_size'], num=cand.get('num', 20000), mode=cand.get('mode', 'random'),
        min_std=cand.get('min_std', 0.04), context=cand.get('context', 4), seed=cand.get('seed', 0),
        batch_size=cand.get('batch_size', 16), device=device, progress=progress)
    log(report.summary())
    for name, reason in report.skipped:
        log(f'  skipped {name}: {reason}')
    fps = _section(opt, 'fps', FPS_KEYS)
    rtm = ReferenceTextureMemory.build(
        values.to(device), extractor, opt['size'], fps=fps.get('space', 'both'),
        value_weight=fps.get('value_weight', 1.0), seed=fps.get('seed', 0), autoencoder=autoencoder,
        sources=[s if isinstance(s, str) else s.get('root') for s in _as_list(opt['sources'])],
        key_batch_size=opt.get('key_batch_size'), center_keys=opt.get('center_keys'), progress=progress,
        top_k=opt.get('top_k', 4))
    rtm.meta.update(name=opt.get('name', os.path.splitext(os.path.basename(output))[0]),
                    skipped_images=[list(s) for s in report.skipped],
                    build_seconds=round(time.perf_counter() - start, 2), device=str(device))
    rtm.save(output)
    log(f'RTM: {len(rtm)} of {report.candidates} candidates kept by FPS ({rtm.meta["fps"]["space"]}), '
        f'keys {rtm.keys.shape[1]}-d, {time.perf_counter() - start:.1f} s -> {output}')
    if opt.get('preview', {}) is not False:
        path = _write_preview(rtm, autoencoder, values, opt.get('preview') or {}, output)
        log(f'preview: {path}')
    return rtm, output, report


def _as_list(x):
    return x if isinstance(x, (list, tuple)) else [x]


def _write_preview(rtm, autoencoder, candidates, opt, output):
    """Queries are candidates FPS did not keep (seeded pick), so the picture shows real retrieval."""
    rest = np.setdiff1d(np.arange(len(candidates)), rtm.source_indices.cpu().numpy())
    pool = rest if len(rest) else np.arange(len(candidates))
    picks = np.random.default_rng(0).choice(pool, size=min(int(opt.get('queries', 6)), len(pool)), replace=False)
    img = rtm_preview(rtm, autoencoder, candidates[torch.from_numpy(np.sort(picks))].to(rtm.values.device),
                      count=opt.get('count', 48), columns=opt.get('columns', 12), tile=opt.get('tile', 64))
    path = output[:-len('.safetensors')] + '_preview.png'
    ok, png = cv2.imencode('.png', img)
    if not ok:
        raise OSError(f'could not encode {path}')
    atomic_write(path, lambda tmp: png.tofile(tmp))
    return path
