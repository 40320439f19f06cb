"""What an option file says about the pipeline: its speed arguments and its sampler."""
from patchscaler.utils.errors import ConfigError

#: top-level option -> PatchScalerPipeline argument (the speed options of the module docstring)
SPEED_OPTIONS = {'autocast': 'autocast', 'autoencoder_autocast': 'autoencoder_autocast',
                 'channels_last': 'channels_last', 'compile': 'compile', 'pgs_devices': 'devices',
                 'grm_tile': 'grm_tile', 'grm_tile_overlap': 'grm_tile_overlap'}


def speed_options(opt, model=False):
    """The pipeline's speed arguments from a parsed option file. ``model``: for PatchScalerModel / StableSRModel
    (tools/train.py and tools/test.py), which run on one device and whose networks are the training networks:
    ``pgs_devices`` is refused there (tools/infer.py and the benchmark take it), and so are ``compile`` and
    ``channels_last`` in a training file (they would change the networks being trained, in place)."""
    out = {arg: opt[key] for key, arg in SPEED_OPTIONS.items() if opt.get(key) is not None and opt[key] is not False}
    refused = ['pgs_devices'] if model else []
    if model and opt.get('is_train'):
        refused += ['compile', 'channels_last']
    for key in refused:
        if opt.get(key) not in (None, False):
            raise ConfigError(f'{key} is an inference option (tools/infer.py, tools/benchmark.py'
                              f'{"" if key == "pgs_devices" else ", test files"}); remove it from this file')
    return out


def build_sampler_for(opt, denoiser):
    """``opt['sampler']`` (a dict or a YAML path), else the paper's PGS at the denoiser's V; None without either."""
    from patchscaler.sampling import build_sampler
    if opt.get('sampler'):
        return build_sampler(opt['sampler'])
    return build_sampler({'type': 'PatchGroupSampler', 'patch_size': denoiser.patch_size}) if denoiser else None
