"""The paper's learned metrics (ManIQA, CLIPIQA, MUSIQ) and LPIPS through pyiqa, from local files only.

pyiqa fetches its weights on first use; nothing may be downloaded here. Every file comes from one folder:
the metric option ``weights_dir``, else ``$PATCHSCALER_IQA_WEIGHTS``, else ``weights/pyiqa`` (relative to the
working directory). Files keep the names pyiqa downloads them under (:data:`WEIGHT_FILES`;
``python -m patchscaler.metrics`` prints the list, where each comes from, and which are present). While a
metric is built, pyiqa's download function, CLIP's and torchvision's weight loaders are pointed at that
folder; a file that is not there raises :class:`MetricUnavailable` naming it, a stray download attempt raises
too, and the Hugging Face hub is set offline. Validation and ``tools/test.py`` report such a metric as
unavailable and go on; ``tools/compare.py`` notes it once per model. Metrics are built under a lock, but
the redirection is process-wide while one is built: build them from the main thread.

Choices (the paper names the metrics, not their settings; these are pyiqa's defaults, which ResShift,
StableSR and the paper's other baselines report):

- ManIQA: pyiqa ``maniqa``, the official KonIQ-10k checkpoint (the paper: "ManIQA-KONIQ"). pyiqa builds its
  ViT-B/8 backbone with timm's ImageNet weights from the Hugging Face hub first; here it is built without
  them, since the ManIQA checkpoint is loaded strictly and replaces every backbone weight anyway.
- CLIPIQA: pyiqa ``clipiqa`` (OpenAI CLIP RN50, pyiqa's ensemble of five antonym prompt pairs).
- MUSIQ: pyiqa ``musiq`` (KonIQ-10k checkpoint, score 0-100).
- LPIPS: pyiqa ``lpips`` (AlexNet, v0.1), full-reference, lower is better.
- ``calculate_pyiqa`` takes any other pyiqa metric by name (``metric: dists``...), offline the same way; a
  metric that needs files from the Hugging Face hub (timm backbones) is reported unavailable.

Inputs are BasicSR's: uint8 (or [0, 255] float) BGR HWC numpy images, ``crop_border`` pixels cut off each
side. The networks run on ``device`` (default: CUDA when available) and are built once per process.
The weight files are loaded the way pyiqa loads them (``torch.load`` with ``weights_only=False``): put
only files from their publishers in the folder.
"""
import contextlib
import os
import os.path as osp
import threading
from urllib.parse import urlparse

import numpy as np
import torch
from basicsr.utils.registry import METRIC_REGISTRY

from patchscaler.utils.errors import MissingWeightsError

ENV_VAR = 'PATCHSCALER_IQA_WEIGHTS'
DEFAULT_DIR = osp.join('weights', 'pyiqa')
_HF = 'https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/'
#: pyiqa name -> [(file name, where pyiqa 0.1.x downloads it from)]
WEIGHT_FILES = {
    'maniqa': [('ckpt_koniq10k.pt', _HF + 'ckpt_koniq10k.pt')],
    'clipiqa': [('RN50.pt', 'https://openaipublic.azureedge.net/clip/models/'
                 'afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt')],
    'musiq': [('musiq_koniq_ckpt-e95806b9.pth', _HF + 'musiq_koniq_ckpt-e95806b9.pth')],
    'lpips': [('LPIPS_v0.1_alex-df73285e.pth', _HF + 'LPIPS_v0.1_alex-df73285e.pth'),
              ('alexnet-owt-7be5be79.pth', 'https://download.pytorch.org/models/alexnet-owt-7be5be79.pth')],
}
#: pyiqa metrics scored without a reference image (others: pyiqa's own metric_mode, see :func:`pyiqa_info`)
NO_REFERENCE = {'maniqa', 'clipiqa', 'musiq'}
#: metrics whose timm backbone is built without hub weights: their checkpoint is loaded strictly over all of it
TIMM_REPLACED = {'maniqa'}


class MetricUnavailable(MissingWeightsError):
    """A metric cannot run here (its weight files are missing, or a package it needs fails to import).
    ``short``: one line for tables and logs; the message itself names every file and where it comes from."""

    def __init__(self, message, short=None):
        super().__init__(message)
        self.short = short or message.splitlines()[0]


def weights_dir(option=None):
    """The folder the metric weights are read from: the option, else ``$PATCHSCALER_IQA_WEIGHTS``, else
    ``weights/pyiqa``."""
    return osp.expanduser(option or os.environ.get(ENV_VAR) or DEFAULT_DIR)


def missing_files(name, folder):
    """[(file name, source URL)] of metric ``name`` that are not in ``folder``."""
    return [(f, url) for f, url in WEIGHT_FILES.get(name, []) if not osp.isfile(osp.join(folder, f))]


def _unavailable(name, folder, missing):
    files = '\n'.join(f'  {f}   (from {url})' for f, url in missing)
    message = (f"metric '{name}' is unavailable: put these files in {osp.abspath(folder)} (or point the metric's "
               f'weights_dir option or ${ENV_VAR} at a folder holding them); nothing is downloaded:\n{files}')
    return MetricUnavailable(message, f'missing {", ".join(f for f, _ in missing)} in {folder}')


class _Offline:
    """Redirects pyiqa's, CLIP's and torchvision's weight downloads to ``folder`` while a metric is built."""

    def __init__(self, name, folder):
        self.name, self.folder = name, folder

    def resolve(self, url, file_name=None):
        base = file_name or osp.basename(urlparse(url).path)
        path = osp.join(self.folder, base)
        if not osp.isfile(path):
            raise _unavailable(self.name, self.folder, [(base, url)])
        return path

    def load_file_from_url(self, url, model_dir=None, progress=True, file_name=None):
        return self.resolve(url, file_name)

    def clip_download(self, url, root=None):
        return self.resolve(url)

    def load_state_dict_from_url(self, url, *args, file_name=None, **kwargs):
        return torch.load(self.resolve(url, file_name), map_location='cpu', weights_only=True)

    def refuse(self, url, *args, **kwargs):
        raise MetricUnavailable(f"metric '{self.name}' tried to download {url}; nothing is downloaded here: put "
                                f'the file in {osp.abspath(self.folder)}')

    @contextlib.contextmanager
    def __call__(self):
        import sys
        import urllib.request

        import timm
        import torch.hub
        import torchvision.models._api as tv_api

        patches = [(tv_api, 'load_state_dict_from_url', self.load_state_dict_from_url),
                   (torch.hub, 'download_url_to_file', self.refuse), (urllib.request, 'urlopen', self.refuse)]
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or not mod_name.startswith('pyiqa'):
                continue
            if hasattr(mod, 'load_file_from_url'):
                patches.append((mod, 'load_file_from_url', self.load_file_from_url))
            if hasattr(mod, 'download_url_to_file'):
                patches.append((mod, 'download_url_to_file', self.refuse))
            if mod_name.endswith('clip_model') and hasattr(mod, '_download'):
                patches.append((mod, '_download', self.clip_download))
        if self.name in TIMM_REPLACED:
            create_model = timm.create_model

            def create_model_offline(*args, **kwargs):  # the metric's own checkpoint replaces these weights
                return create_model(*args, **dict(kwargs, pretrained=False))

            patches.append((timm, 'create_model', create_model_offline))
        saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in patches]
        hub_offline = os.environ.get('HF_HUB_OFFLINE')
        try:
            os.environ['HF_HUB_OFFLINE'] = '1'  # any other Hugging Face hub fetch fails instead of downloading
            for mod, attr, new in patches:
                setattr(mod, attr, new)
            yield
        finally:
            for mod, attr, old in saved:
                setattr(mod, attr, old)
            if hub_offline is None:
                os.environ.pop('HF_HUB_OFFLINE', None)
            else:
                os.environ['HF_HUB_OFFLINE'] = hub_offline


_CACHE, _LOCK = {}, threading.Lock()


def _import_arch(name):
    from pyiqa.default_model_configs import DEFAULT_CONFIGS
    arch = DEFAULT_CONFIGS[name]['metric_opts']['type']
    try:
        from pyiqa.archs import _lazy_import_arch
    except ImportError:  # pyiqa versions that import every arch with pyiqa.archs
        return
    _lazy_import_arch(arch)


def build_metric(name, folder=None, device=None):
    """pyiqa's ``create_metric(name)`` with weights from ``folder`` (see :func:`weights_dir`), cached per
    (name, folder, device). :class:`MetricUnavailable` when files or packages are missing."""
    folder = weights_dir(folder)
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    key = (name, osp.abspath(folder), str(device))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        missing = missing_files(name, folder)
        if missing:
            raise _unavailable(name, folder, missing)
        try:
            import pyiqa
            import pyiqa.archs.arch_util  # noqa: F401  (imported before patching, so its names are patched)
        except ImportError as e:
            raise MetricUnavailable(f"metric '{name}' is unavailable: pyiqa does not import ({e}); "
                                    f"CLIP in pyiqa needs pkg_resources: pip install 'setuptools<81'") from e
        if name not in pyiqa.list_models():
            raise MetricUnavailable(f"metric '{name}' is not a pyiqa metric (pyiqa {pyiqa.__version__})")
        offline = _Offline(name, folder)
        try:
            _import_arch(name)  # pyiqa imports its archs lazily: import this one first, so that it gets patched
            with offline():
                metric = pyiqa.create_metric(name, device=device)
        except MetricUnavailable:  # a missing file, named by the redirection (it is an OSError too)
            raise
        except ImportError as e:
            raise MetricUnavailable(f"metric '{name}' is unavailable: {e} (openai-clip needs pkg_resources: "
                                    f"pip install 'setuptools<81')") from e
        except OSError as e:  # e.g. a Hugging Face hub file, with the hub offline
            raise MetricUnavailable(f"metric '{name}' is unavailable: it needs a file this folder cannot provide "
                                    f'offline ({type(e).__name__}: {str(e).strip()[:300]})') from e
        metric.eval()
        _CACHE[key] = metric
        return metric


def pyiqa_info(name):
    """(no_reference, lower_better) of a pyiqa metric from pyiqa's table; (None, None) if pyiqa lacks it."""
    if name in WEIGHT_FILES:
        return name in NO_REFERENCE, name == 'lpips'
    try:
        from pyiqa.default_model_configs import DEFAULT_CONFIGS
    except ImportError:
        return None, None
    cfg = DEFAULT_CONFIGS.get(name)
    if cfg is None:
        return None, None
    return cfg.get('metric_mode') == 'NR', bool(cfg.get('lower_better', False))


def _to_tensor(img, crop_border, input_order):
    """BasicSR image (BGR, [0, 255], HWC or CHW) -> (1, 3, H, W) RGB float in [0, 1]."""
    img = np.asarray(img, dtype=np.float64)
    if input_order == 'CHW':
        img = img.transpose(1, 2, 0)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if crop_border:
        img = img[crop_border:-crop_border, crop_border:-crop_border]
    rgb = np.ascontiguousarray(img[..., 2::-1] / 255.0, dtype=np.float32)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].clamp_(0, 1)


@METRIC_REGISTRY.register()
def calculate_pyiqa(img, img2=None, metric=None, crop_border=0, input_order='HWC', weights_dir=None, device=None,
                    **kwargs):
    """Any pyiqa metric by name, offline; ``img2`` (the reference) is used by full-reference metrics only."""
    if not metric:
        raise MetricUnavailable("calculate_pyiqa needs 'metric: <pyiqa name>'")
    net = build_metric(metric, weights_dir, device)
    x = _to_tensor(img, crop_border, input_order).to(net.device)
    with torch.no_grad():
        if metric in NO_REFERENCE or getattr(net, 'metric_mode', 'NR') == 'NR':
            score = net(x)
        else:
            if img2 is None:
                raise ValueError(f'{metric} is a full-reference metric and needs the HR image')
            score = net(x, _to_tensor(img2, crop_border, input_order).to(net.device))
    return float(score.mean())


def _named(metric, doc):
    def fn(img, img2=None, crop_border=0, input_order='HWC', weights_dir=None, device=None, **kwargs):
        return calculate_pyiqa(img, img2, metric, crop_border, input_order, weights_dir, device)
    fn.__name__ = f'calculate_{metric}'
    fn.__doc__ = doc
    fn.no_reference = metric in NO_REFERENCE
    return METRIC_REGISTRY.register()(fn)


calculate_maniqa = _named('maniqa', 'ManIQA (KonIQ-10k checkpoint), no reference, higher is better.')
calculate_clipiqa = _named('clipiqa', 'CLIPIQA (CLIP RN50, pyiqa prompts), no reference, higher is better.')
calculate_musiq = _named('musiq', 'MUSIQ (KonIQ-10k checkpoint, 0-100), no reference, higher is better.')
calculate_lpips = _named('lpips', 'LPIPS (AlexNet, v0.1) against the HR image, lower is better.')
