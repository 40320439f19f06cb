"""StableSRModel: StableSR (the published architecture, :mod:`patchscaler.archs.stablesr_arch`) as a baseline, and
StableSR+PGS without retraining.

Training (StableSR's recipe, on PatchScaler's data and degradation): the frozen autoencoder encodes the HR
image (x0) and the bicubic-upsampled LR image (y_LR); on ``patches_per_image`` random V×V latent crops,
t ~ U[0, T), x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε, and :class:`~patchscaler.archs.stablesr_arch.StableSRUNet`
(UNet with SPADE + time-aware encoder on the y_LR crop) regresses ε, v or x0 (its ``prediction_type``) with
``pixel_opt`` (MSE by default). ``train.freeze_unet`` keeps the UNet's own weights fixed and trains the
time-aware encoder and the SPADE layers only, as StableSR does with SD's UNet; it defaults to true when the UNet
is loaded from ``unet_path`` (pretrained) and to false for a UNet built from a config (the demo trains one from
scratch). EMA, gradient clipping and bf16 autocast as in PatchScalerModel. The ᾱ table is the sampler's
scheduler's, so training and sampling share one schedule. The published weights need no training:
``tools/convert_stablesr.py`` converts them (``options/stablesr/test_stablesr_x4.yml``).

Sampling goes through the same :class:`~patchscaler.models.pipeline.PatchScalerPipeline` and the same PGS
sampler as PatchScaler, with a different configuration only:

* **StableSR** (no ``network_grm``): one group, τ = T, N = 20, y0 = y_LR, as published
  (``sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py``): every latent pixel starts from
  sqrt(ᾱ_999)·y_LR + sqrt(1-ᾱ_999)·ε, then ancestral DDPM (DDIM with η = 1) on the respaced timesteps
  999, 946, …, 53, 0, the V×V tiles' estimates fused with Gaussian weights at every step (``fuse_overlaps``).
  The sampler when the options name none: :func:`stablesr_sampler_options`.
* **StableSR+PGS** (section 4.3, Table 3): add ``network_grm`` with the weights of a trained PatchScaler
  GRM (``path.pretrain_network_grm``) and a 3-group PGS sampler: y0 = the GRM's coarse latent, groups from
  its confidence map, V = the UNet's tile (64 with SD, as in the paper). Nothing in the sampler or the
  network knows it is StableSR; only the options change.

Checkpoints: ``net_g`` with ``params`` + ``params_ema`` (BasicSR's layout, so ``--auto_resume`` works).
Validation logs PSNR/SSIM (and the GRM's and bicubic's with a GRM), the x0-prediction MSE at fixed
timesteps (the UNet's ε/v converted to x0), the PGS/NFE report, and saves the same pictures as
PatchScalerModel.
"""
import copy
from collections import OrderedDict

import torch
from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.models.base_model import BaseModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from patchscaler.archs.autoencoder_arch import build_autoencoder, pad_to_multiple
from patchscaler.models.patchscaler_model import PatchScalerModel, random_patches
from patchscaler.models.pipeline import PatchScalerPipeline
from patchscaler.models.pipeline_options import speed_options
from patchscaler.sampling import build_sampler
from patchscaler.sampling.schedules import q_sample, training_target
from patchscaler.utils.errors import ConfigError

# StableSR's sampling: SD's scaled-linear schedule; ancestral steps (η = 1) on the respaced timesteps, one group
STABLESR_SCHEDULER = dict(type='DDIMScheduler', num_train_timesteps=1000, beta_schedule='scaled_linear',
                          beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=True)


def stablesr_sampler_options(patch_size, prediction_type, steps=20):
    """StableSR's own sampler (module docstring) at the UNet's tile V, overlap V/2: used when the options name
    none."""
    return dict(type='PatchGroupSampler', patch_size=patch_size, stride=patch_size // 2,
                groups=[{'tau': 1000, 'steps': steps}], timestep_spacing='respaced', eta=1.0, fuse_overlaps=True,
                scheduler=dict(STABLESR_SCHEDULER), prediction_type=prediction_type)


@MODEL_REGISTRY.register()
class StableSRModel(PatchScalerModel):
    """Options: ``scale``, ``autoencoder``, ``network_g`` (StableSRUNet), ``sampler`` (default: StableSR's
    the published sampler), ``network_grm`` (optional, pretrained: StableSR+PGS), ``color_fix``, ``tile``,
    ``degradation``, ``train`` (:attr:`TRAIN_OPTION_KEYS`), ``val``."""

    REQUIRED_OPTION_KEYS = ('scale', 'autoencoder', 'network_g')
    TRAIN_OPTION_KEYS = {'total_iter', 'warmup_iter', 'optim_g', 'scheduler', 'pixel_opt', 'grad_clip', 'gt_size',
                         'patches_per_image', 'ema_decay', 'autocast', 'freeze_unet', 'max_nonfinite_steps'}

    def __init__(self, opt):
        BaseModel.__init__(self, opt)  # not PatchScalerModel's: that one builds PatchScaler's networks
        missing = [k for k in self.REQUIRED_OPTION_KEYS if k not in opt]
        if missing:
            raise ConfigError(f'StableSRModel needs the option(s) {missing}')
        self.scale = int(opt['scale'])
        self.autoencoder = build_autoencoder(opt['autoencoder']).to(self.device)
        net = build_network(dict(opt['network_g']))
        if getattr(net, 'cond_keys', None) is None or not hasattr(net, 'patch_size'):
            raise ConfigError(f'network_g must be a sampler-interface denoiser such as StableSRUNet, got '
                              f'{type(net).__name__}')
        if net.in_channels != self.autoencoder.latent_channels:
            raise ConfigError(f'network_g works on {net.in_channels}-channel latents but the autoencoder makes '
                              f'{self.autoencoder.latent_channels}')
        self.freeze_unet = False
        if self.is_train:  # before DDP wraps it: DDP reduces the gradients of what requires grad at wrap time
            self.freeze_unet = self._freeze(net, opt.get('train') or {})
        self.net_g = self.model_to_device(net)
        self.print_network(self.net_g)
        self.sampler = build_sampler(opt.get('sampler') or stablesr_sampler_options(net.patch_size,
                                                                                    net.prediction_type))
        self.net_grm = None
        if opt.get('network_grm'):  # StableSR+PGS: a trained PatchScaler GRM, frozen
            if not opt['path'].get('pretrain_network_grm'):
                raise ConfigError('network_grm (StableSR+PGS) needs the weights of a trained PatchScaler GRM: set '
                                  'path.pretrain_network_grm (a net_grm_*.pth of a PatchScaler run)')
            self.net_grm = build_network(dict(opt['network_grm'])).to(self.device).eval().requires_grad_(False)
            self._load_pretrained(self.net_grm, 'grm')
        self.rtm, self.pgs_groups, self.report = None, None, None
        self.alphas_cumprod = self.sampler.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self._load_pretrained(net, 'g')
        self.color_fix = opt.get('color_fix', True)
        self.tile, self.tile_overlap = opt.get('tile'), opt.get('tile_overlap')
        self.net_g_ema = None
        self.method_name = 'StableSR+PGS' if self.net_grm is not None else 'StableSR'
        self.pipeline()  # checks V, prediction type, groups vs GRM, tile now
        if self.is_train:
            self.init_training_settings()

    def init_training_settings(self):
        train_opt = self.opt['train']
        net = self.get_bare_model(self.net_g)
        self._init_shared_training(train_opt)
        self._init_patch_count(train_opt, 1, 'tiles the UNet trains on')
        self.cri_pix = build_loss(dict(train_opt.get('pixel_opt', {'type': 'MSELoss'}))).to(self.device)
        if 'optim_g' not in train_opt:
            raise ConfigError('StableSRModel training needs train.optim_g')
        trainable = [p for p in self.net_g.parameters() if p.requires_grad]
        get_root_logger().info(f'StableSR trains {sum(p.numel() for p in trainable) / 1e6:.2f} M of '
                               f'{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters'
                               f'{" (UNet frozen)" if self.freeze_unet else ""}')
        optim_opt = dict(train_opt['optim_g'])
        self.optimizer_g = self.get_optimizer(optim_opt.pop('type'), trainable, **optim_opt)
        self.optimizers.append(self.optimizer_g)
        self.net_g.train()
        self.ema_decay = float(train_opt.get('ema_decay', 0) or 0)
        if self.ema_decay > 0:
            self.net_g_ema = copy.deepcopy(net).eval().requires_grad_(False)
            self._load_pretrained(self.net_g_ema, 'g', 'params_ema')
        self.setup_schedulers()

    def _freeze(self, net, train_opt):
        """``train.freeze_unet`` (default: on when the UNet comes from ``unet_path``): SD's UNet stays as it is,
        the SPADE layers inside it and the encoder train. Returns whether it froze."""
        freeze = bool(train_opt.get('freeze_unet', bool(self.opt['network_g'].get('unet_path'))))
        if freeze:
            net.unet.requires_grad_(False)
            for name, module in net.unet.named_modules():
                if name.endswith('.spade'):
                    module.requires_grad_(True)
        return freeze

    def optimize_parameters(self, current_iter):
        net = self.get_bare_model(self.net_g)
        with torch.no_grad():
            y_lr = self.encode_lr(self.lq)
            x_hr = self.autoencoder.encode(pad_to_multiple(self.gt, self.autoencoder.downscale_factor)[0])
        x0, y_lr = random_patches([x_hr, y_lr], net.patch_size, self.patches_per_image)
        t = torch.randint(0, len(self.alphas_cumprod), (x0.shape[0],), device=self.device)
        a_bar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        noise = torch.randn_like(x0)
        self.optimizer_g.zero_grad(set_to_none=True)
        with self._autocast():
            pred = self.net_g(q_sample(x0, noise, a_bar), t, {'y_lr': y_lr})
        loss = self.cri_pix(pred.float(), training_target(x0, noise, a_bar, net.prediction_type))
        self._step_denoiser(loss)
        self.log_dict = self.reduce_loss_dict(OrderedDict(l_pix=loss.detach()))

    def pipeline(self):
        denoiser = self.net_g_ema if self.net_g_ema is not None else self.get_bare_model(self.net_g)
        return PatchScalerPipeline(self.autoencoder, self.net_grm, self.scale, denoiser, self.sampler,
                                   color_fix=self.color_fix, tile=self.tile, tile_overlap=self.tile_overlap,
                                   **speed_options(self.opt, model=True))

    def save(self, epoch, current_iter):
        net = self.get_bare_model(self.net_g)
        self.save_network([net, self.net_g_ema or net], 'net_g', current_iter, ['params', 'params_ema'])
        self.save_training_state(epoch, current_iter)
