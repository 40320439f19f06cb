"""PatchScalerModel: BasicSR's training/validation interface around the PatchScaler pipeline.

Two training stages under ``train.stage``:

* ``grm``: the frozen autoencoder encodes the bicubic-upsampled LR image (y_LR) and the HR image (x_HR);
  the GRM predicts y_HR and the confidence C, trained with the confidence-driven loss (Eq. 1).
* ``full`` (the paper's recipe, section 4.1): the GRM trains as above for the first ``grm_iters`` iterations
  and is frozen afterwards; Patch-DiT (with the texture encoder) trains throughout on ``patches_per_image``
  random V×V crops of the latents: x0 = HR latent patch, y0 = GRM's coarse patch (detached),
  t ~ U[0, T), x_t from Eq. 4, the x0-prediction loss (``x0_opt``, L2 by default), the texture prompt
  retrieved from the RTM for the y0 patches. EMA of Patch-DiT + encoder (BasicSR's ``ema_decay``),
  gradient clipping, optional ``autocast: bf16``. The T and ᾱ of Eq. 4 are the sampler's, so training and
  PGS share one noise schedule.

Validation runs the whole pipeline (:mod:`patchscaler.models.pipeline`: GRM -> PGS -> decode -> color fix)
and logs every metric for the final SR, the GRM's decoded y_HR and plain bicubic, plus the PGS grading, the
NFE done and the time per image; it saves the SR image, the confidence map, a strip
(bicubic / GRM / PatchScaler / HR / confidence) and the Qmap/group overlay (``*_pgs.png``).

Checkpoints: ``net_grm``, ``net_dit`` and ``net_texture`` (``params`` + ``params_ema``), so BasicSR's
``--auto_resume`` finds every network by its ``network_*`` option name.

Training data comes HR-only with Real-ESRGAN kernels (:class:`RealESRGANHRDataset`) and is degraded here,
on the model's device, by :class:`RealESRGANDegradation`. Paired data (``lq``/``gt``) is used as is.
"""
import copy
from collections import OrderedDict
from os import path as osp

import torch
import torch.nn.functional as F
from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.models.base_model import BaseModel
from basicsr.utils import get_root_logger, tensor2img
from basicsr.utils.registry import MODEL_REGISTRY
from tqdm import tqdm

from patchscaler.archs.autoencoder_arch import build_autoencoder, pad_to_multiple
from patchscaler.data.degradation import RealESRGANDegradation
from patchscaler.metrics import MetricTable
from patchscaler.models.pipeline import (
    PatchScalerPipeline,
    autocast,
    autocast_dtype,
    upsample_lr,
)
from patchscaler.models.pipeline_options import build_sampler_for, speed_options
from patchscaler.models.prompted_dit import build_denoiser, build_rtm_for
from patchscaler.models.validation import (
    STAGE_SUFFIXES,
    add_detail,
    detail_scores,
    log_detail,
    log_metrics,
    log_pgs,
    log_x0_errors,
    save_metric_table,
    save_visuals,
    x0_errors,
    x0_timesteps,
)
from patchscaler.sampling.schedules import loss_weights, q_sample
from patchscaler.utils.checkpoint import load_weights
from patchscaler.utils.errors import ConfigError, InputError, TrainingError

STAGES = ('grm', 'full')


def random_patches(tensors, size, count, generator=None):
    """``count`` random size×size crops per image, at the same positions in every tensor: (B·count, c, V, V)."""
    b, _, h, w = tensors[0].shape
    if h < size or w < size:
        raise InputError(f'the training latents are {h}×{w}, smaller than the V={size} patches Patch-DiT trains on; '
                         f'set train.gt_size (HR crop) to at least V × the autoencoder factor')
    tops = torch.randint(0, h - size + 1, (b, count), generator=generator)
    lefts = torch.randint(0, w - size + 1, (b, count), generator=generator)
    out = []
    for x in tensors:
        out.append(torch.stack([x[i, :, top:top + size, left:left + size] for i in range(b)
                                for top, left in zip(tops[i].tolist(), lefts[i].tolist())]))
    return out


@MODEL_REGISTRY.register()
class PatchScalerModel(BaseModel):
    """Options: ``scale``, ``autoencoder`` (frozen first stage), ``network_grm``, ``network_dit`` and
    ``network_texture`` (stage ``full``), ``rtm``, ``sampler``, ``color_fix``, ``tile``, ``degradation``
    (training only), ``train`` (see :attr:`TRAIN_OPTION_KEYS`), ``val`` (metrics as in BasicSR)."""

    REQUIRED_OPTION_KEYS = ('scale', 'autoencoder', 'network_grm')
    method_name = 'PatchScaler (PGS)'  # the label of the final SR in the validation strips
    TRAIN_OPTION_KEYS = {'stage', 'total_iter', 'warmup_iter', 'optim_grm', 'optim_g', 'scheduler', 'confidence_opt',
                         'x0_opt', 'grad_clip', 'gt_size', 'grm_iters', 'patches_per_image', 'ema_decay', 'autocast',
                         'max_nonfinite_steps', 'loss_weighting'}

    def __init__(self, opt):
        super().__init__(opt)
        missing = [k for k in self.REQUIRED_OPTION_KEYS if k not in opt]
        if missing:
            raise ConfigError(f'PatchScalerModel needs the option(s) {missing}')
        self.scale = int(opt['scale'])
        self.autoencoder = build_autoencoder(opt['autoencoder']).to(self.device)
        self.net_grm = self.model_to_device(build_network(opt['network_grm']))
        self.print_network(self.net_grm)
        denoiser = build_denoiser(opt)
        self.net_g = self.model_to_device(denoiser) if denoiser is not None else None
        if denoiser is not None:
            self.print_network(self.net_g)
        self.sampler = build_sampler_for(opt, denoiser)
        self.rtm = build_rtm_for(opt, self.autoencoder, denoiser, self.device)
        # ᾱ of Eq. 4: training noises with the table PGS samples with
        self.alphas_cumprod = self.sampler.scheduler.alphas_cumprod.to(self.device, torch.float32) \
            if self.sampler is not None else None
        self.pgs_groups = self.report = None
        self._load_pretrained(self.net_grm, 'grm')
        if denoiser is not None:
            self._load_pretrained(denoiser.dit, 'dit')
            if denoiser.texture_encoder is not None:
                self._load_pretrained(denoiser.texture_encoder, 'texture')
        self.color_fix = opt.get('color_fix', True)
        self.tile, self.tile_overlap = opt.get('tile'), opt.get('tile_overlap')
        self.net_g_ema = None
        self.pipeline()  # checks sampler/V/prediction type/tile/autocast now, not at the first validation
        for ds_opt in (opt.get('datasets') or {}).values():  # class maps' classes.json now, not at iteration 1500
            if isinstance(ds_opt, dict) and ds_opt.get('dataroot_labels'):
                from patchscaler.metrics.detail import load_classes
                load_classes(ds_opt)
        if self.is_train:
            self.init_training_settings()

    def _load_pretrained(self, net, name, param_key=None):
        """``path.pretrain_network_<name>``; the key defaults to 'params' for training (resume: the EMA copy asks
        for 'params_ema' itself) and to 'params_ema' for testing, as tools/infer.py does."""
        load_path = self.opt['path'].get(f'pretrain_network_{name}')
        if load_path is None:
            if not self.is_train:
                raise ConfigError(f'testing needs weights for network_{name}: set path.pretrain_network_{name} '
                                  f'(a net_{name}_*.pth of the training run)')
            return
        key = param_key or self.opt['path'].get(f'param_key_{name}', 'params' if self.is_train else 'params_ema')
        self.load_network(net, load_path, self.opt['path'].get(f'strict_load_{name}', True), key)

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """BasicSR's, with one-line errors for a file from another configuration (and weights_only loading)."""
        load_weights(self.get_bare_model(net), load_path, param_key, strict, where=type(net).__name__)
        get_root_logger().info(f'Loaded {type(net).__name__} [{param_key}] from {load_path}')

    # ------------------------------------------------------------------ training
    def init_training_settings(self):
        train_opt = self.opt['train']
        self.stage = train_opt.get('stage', 'grm')
        if self.stage not in STAGES:
            raise ConfigError(f'train.stage must be one of {STAGES}, got {self.stage!r}')
        if self.stage == 'full' and self.net_g is None:
            raise ConfigError("train.stage 'full' trains Patch-DiT: add network_dit (and network_texture + rtm)")
        self.grm_iters = int(train_opt.get('grm_iters', train_opt.get('total_iter', 0))) if self.stage == 'full' \
            else float('inf')
        if self.stage == 'full' and self.grm_iters <= 0 and self.opt['path'].get('pretrain_network_grm') is None:
            get_root_logger().warning('grm_iters is 0 and no pretrain_network_grm is given: Patch-DiT learns to '
                                      'refine an untrained GRM')
        self.net_grm.train()
        self.cri_confidence = build_loss(dict(train_opt.get('confidence_opt', {'type': 'ConfidenceLoss'})))
        self.cri_confidence = self.cri_confidence.to(self.device)
        self._init_shared_training(train_opt)
        if self.stage == 'full':  # first: BasicSR logs the learning rate of optimizers[0]
            self._init_diffusion_training(train_opt)
        optim_opt = dict(train_opt['optim_grm'])
        self.optimizer_grm = self.get_optimizer(optim_opt.pop('type'), list(self.net_grm.parameters()), **optim_opt)
        self.optimizers.append(self.optimizer_grm)
        self.setup_schedulers()

    def _init_shared_training(self, train_opt):
        """What every diffusion model here reads the same way: gradient clipping, HR crop, autocast (bf16 only:
        there is no loss scaling) and the Real-ESRGAN degradation of the training batches."""
        self.grad_clip = train_opt.get('grad_clip')
        self.max_nonfinite_steps, self.nonfinite_run = int(train_opt.get('max_nonfinite_steps', 10)), {}
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f'train.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}')
        self.gt_size = train_opt.get('gt_size')
        self.autocast = autocast_dtype(train_opt.get('autocast'), self.device)
        if self.autocast == torch.float16:
            raise ConfigError('train.autocast fp16 needs loss scaling, which this model does not do; use bf16')
        self.degradation = RealESRGANDegradation(self.opt.get('degradation'), self.device)

    def _init_patch_count(self, train_opt, default, trains_on):
        """``patches_per_image`` random V×V latent crops per HR image, checked against the HR crop size."""
        v, d = self.get_bare_model(self.net_g).patch_size, self.autoencoder.downscale_factor
        if self.gt_size and self.gt_size // d < v:
            raise ConfigError(f'train.gt_size {self.gt_size} gives a {self.gt_size // d}² latent, smaller than '
                              f'the V={v} {trains_on}')
        self.patches_per_image = int(train_opt.get('patches_per_image', default))
        if self.patches_per_image < 1:
            raise ConfigError(f'train.patches_per_image must be >= 1, got {self.patches_per_image}')

    def _step(self, loss, net, optimizer, name):
        """Backward, clip, step; False (nothing changed) when the gradients are not finite.

        Non-finite gradients (what a NaN/inf loss gives) skip the step with a warning, so no NaN reaches the
        weights, the optimizer state, the EMA or a checkpoint; ``train.max_nonfinite_steps`` (default 10) skipped
        steps in a row stop training with an error. The decision is taken on the gradients after backward, which
        DDP has already averaged: every rank skips the same steps. The learning-rate schedule goes on through
        skipped steps (BasicSR steps it per iteration); the count of skips in a row starts again at a resume."""
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), self.grad_clip or float('inf'))
        if torch.isfinite(norm):
            optimizer.step()
            self.nonfinite_run[name] = 0
            return True
        optimizer.zero_grad(set_to_none=True)
        run = self.nonfinite_run[name] = self.nonfinite_run.get(name, 0) + 1
        get_root_logger().warning(f'{name}: non-finite loss or gradient (loss {float(loss.detach()):.4g}, gradient '
                                  f'norm {float(norm):.4g}); step skipped ({run} in a row)')
        if run >= self.max_nonfinite_steps:
            raise TrainingError(f'{name}: {run} non-finite steps in a row; training stopped before NaN reached the '
                                f'weights (the last checkpoint is intact). Lower the learning rate, set '
                                f'train.grad_clip, or check the data; train.max_nonfinite_steps sets the limit')
        return False

    def _step_denoiser(self, loss):
        """Backward, clip, step the denoiser's optimizer, then its EMA (all skipped on a non-finite step)."""
        if self._step(loss, self.net_g, self.optimizer_g, 'denoiser') and self.net_g_ema is not None:
            self.model_ema(self.ema_decay)

    def _init_diffusion_training(self, train_opt):
        self._init_patch_count(train_opt, 8, 'patches Patch-DiT trains on')
        self.cri_x0 = build_loss(dict(train_opt.get('x0_opt', {'type': 'MSELoss'}))).to(self.device)
        self.loss_weighting = train_opt.get('loss_weighting')
        loss_weights(torch.ones(1), self.loss_weighting)  # a bad weighting is an error now, not at iteration 1
        if self.loss_weighting is not None:  # per-element loss, weighted and averaged here (see _diffusion_step)
            self.cri_x0_elementwise = build_loss(dict(train_opt.get('x0_opt', {'type': 'MSELoss'}),
                                                      reduction='none')).to(self.device)
        if 'optim_g' not in train_opt:
            raise ConfigError("train.stage 'full' needs train.optim_g (Patch-DiT + texture encoder optimizer)")
        optim_opt = dict(train_opt['optim_g'])
        self.optimizer_g = self.get_optimizer(optim_opt.pop('type'), list(self.net_g.parameters()), **optim_opt)
        self.optimizers.append(self.optimizer_g)
        self.net_g.train()
        self.ema_decay = float(train_opt.get('ema_decay', 0) or 0)
        if self.ema_decay > 0:
            self.net_g_ema = copy.deepcopy(self.get_bare_model(self.net_g)).eval().requires_grad_(False)
            ema = self.net_g_ema
            self._load_pretrained(ema.dit, 'dit', 'params_ema')
            if ema.texture_encoder is not None:
                self._load_pretrained(ema.texture_encoder, 'texture', 'params_ema')

    def feed_data(self, data):
        """Training batches with kernels are degraded here; paired batches are used as given."""
        if self.is_train and 'kernel1' in data:
            self.lq, self.gt = self.degradation(data, self.scale, self.gt_size)
        else:
            self.lq = data['lq'].to(self.device, non_blocking=True)
            self.gt = data['gt'].to(self.device, non_blocking=True) if 'gt' in data else None

    def encode_lr(self, lq):
        """y_LR: the bicubic ×scale of ``lq``, padded to the autoencoder's multiple, encoded (as the pipeline does)."""
        up = upsample_lr(lq, self.scale)
        return self.autoencoder.encode(pad_to_multiple(up, self.autoencoder.downscale_factor)[0])

    def _autocast(self):
        return autocast(self.device, self.autocast)

    def optimize_parameters(self, current_iter):
        with torch.no_grad():
            y_lr = self.encode_lr(self.lq)
            x_hr = self.autoencoder.encode(pad_to_multiple(self.gt, self.autoencoder.downscale_factor)[0])
        log = OrderedDict()
        if current_iter <= self.grm_iters:
            self.optimizer_grm.zero_grad(set_to_none=True)
            with self._autocast():
                y_hr, confidence = self.net_grm(y_lr)
            y_hr, confidence = y_hr.float(), confidence.float()
            l_conf = self.cri_confidence(y_hr, x_hr, confidence)
            self._step(l_conf, self.net_grm, self.optimizer_grm, 'GRM')
            log.update(l_conf=l_conf.detach(), l1_latent=(y_hr - x_hr).abs().mean().detach(),
                       mean_confidence=confidence.mean().detach())
            y0 = y_hr.detach()
        else:
            if self.net_grm.training:  # frozen from here on (section 4.1: the GRM trains for the first grm_iters)
                get_root_logger().info(f'iter {current_iter}: GRM frozen after {self.grm_iters} iterations')
                self.net_grm.eval().requires_grad_(False)
            with torch.no_grad(), self._autocast():
                y0 = self.net_grm(y_lr)[0].float()
        if self.stage == 'full':
            log.update(self._diffusion_step(x_hr, y0))
        self.log_dict = self.reduce_loss_dict(log)

    def _diffusion_step(self, x_hr, y0):
        """One x0-prediction step of Patch-DiT on random V×V latent crops: x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε."""
        net = self.get_bare_model(self.net_g)
        x0, y0 = random_patches([x_hr, y0], net.patch_size, self.patches_per_image)
        t = torch.randint(0, len(self.alphas_cumprod), (x0.shape[0],), device=self.device)
        a_bar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = q_sample(x0, torch.randn_like(x0), a_bar)
        self.optimizer_g.zero_grad(set_to_none=True)
        cond = {'y0': y0}
        if self.rtm is not None:
            cond['priors'], cond['similarities'] = self.rtm.query(y0)  # encoded inside the (DDP) forward
        with self._autocast():
            pred = self.net_g(x_t, t, cond)
        if self.loss_weighting is None:
            l_x0 = self.cri_x0(pred.float(), x0)
        else:  # mean of w_t * loss, as Min-SNR defines it; BasicSR's weighted mean would divide by the batch's
            # sum of weights and so undo the weighting of an all-high-noise batch
            weight = loss_weights(a_bar.flatten(), self.loss_weighting).view(-1, 1, 1, 1)
            l_x0 = (weight * self.cri_x0_elementwise(pred.float(), x0)).mean()
        self._step_denoiser(l_x0)
        # l_x0_coarse: the same loss for x0 = y0, what Patch-DiT must beat
        return OrderedDict(l_x0=l_x0.detach(), l_x0_coarse=F.mse_loss(y0, x0).detach())

    # ------------------------------------------------------------------ inference
    def pipeline(self):
        """The inference pipeline on this model's networks (bare, EMA weights when there are any)."""
        denoiser = self.net_g_ema if self.net_g_ema is not None else (
            self.get_bare_model(self.net_g) if self.net_g is not None else None)
        return PatchScalerPipeline(self.autoencoder, self.get_bare_model(self.net_grm), self.scale, denoiser,
                                   self.sampler, self.rtm, color_fix=self.color_fix, tile=self.tile,
                                   tile_overlap=self.tile_overlap, **speed_options(self.opt, model=True))

    @torch.no_grad()
    def test(self):
        """The pipeline on ``self.lq``: sets ``output`` (final SR), ``grm_output``, ``confidence``, ``bicubic``."""
        nets = [self.get_bare_model(n) for n in (self.net_grm, self.net_g) if n is not None]
        modes = [n.training for n in nets]  # bare: DDP would wait for ranks that do not validate
        for n in nets:
            n.eval()
        out = self.pipeline()(self.lq, seed=self.opt.get('manual_seed'))
        for n, m in zip(nets, modes):
            n.train(m)
        self.output, self.bicubic, self.confidence, self.report = out.sr, out.bicubic, out.confidence, out.report
        self.y_hr, self.y_lr = out.y_hr, out.y_lr
        self.grm_output = out.grm if out.report is not None else None
        self.pgs_groups = None
        if out.report is not None:
            r = out.report
            self.pgs_groups = (r.groups, r.qmap, r.thresholds, r.grid)
        elif self.sampler is not None:  # Eq. 2 on this image: what PGS will do with it; on the host like the
            # sampler's report, for the pictures and the detail scores
            shape = (self.lq.shape[0], 1, *self.confidence.shape[-2:])
            self.pgs_groups = tuple(x.cpu() if torch.is_tensor(x) else x
                                    for x in self.sampler.assign(self.confidence, shape))

    def x0_timesteps(self):
        """Where validation measures the x0-prediction loss (see :func:`validation.x0_timesteps`)."""
        return x0_timesteps(self.alphas_cumprod)

    def x0_errors(self):
        """The x0-prediction loss on the last :meth:`test` image (see :func:`validation.x0_errors`)."""
        return x0_errors(self)

    def get_current_visuals(self):
        out = OrderedDict(lq=self.lq.detach().cpu(), result=self.output.detach().cpu(),
                          bicubic=self.bicubic.detach().cpu())
        if self.confidence is not None:
            out['confidence'] = self.confidence.detach().cpu()
        if self.grm_output is not None:
            out['grm'] = self.grm_output.detach().cpu()
        if self.gt is not None:
            out['gt'] = self.gt.detach().cpu()
        return out

    def dist_validation(self, dataloader, current_iter, tb_logger, save_img):
        if self.opt['rank'] == 0:
            self.nondist_validation(dataloader, current_iter, tb_logger, save_img)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        dataset_name = dataloader.dataset.opt['name']
        table = MetricTable(self.opt['val'].get('metrics'))
        detail = detail_scores(self, dataloader.dataset.opt)
        max_images = self.opt['val'].get('max_images')  # under DDP the other ranks wait: keep validation short
        skipped, pgs_counts, nfe_done, seconds, images, x0_sums = [], [], 0, 0.0, 0, []
        for val_data in tqdm(dataloader, desc=f'val {dataset_name}', unit='img', leave=False,
                             disable=not self.opt['val'].get('pbar', True)):
            if max_images and images >= max_images:
                break
            name = osp.splitext(osp.basename(val_data['lq_path'][0]))[0]
            if 'error' in val_data:
                skipped.append(val_data['error'][0])
                continue
            self.feed_data(val_data)
            self.test()
            visuals = self.get_current_visuals()
            sr_img = tensor2img([visuals['result']])
            images += 1
            if self.report is not None:
                nfe_done, seconds = nfe_done + self.report.nfe_total, seconds + self.report.seconds
            if save_img:
                save_visuals(self, visuals, sr_img, name, dataset_name, current_iter)
            if self.pgs_groups is not None:
                pgs_counts.append(self.pgs_groups[0].flatten())
            outputs = {'': sr_img, '_bicubic': tensor2img([visuals['bicubic']])}
            if 'grm' in visuals:
                outputs['_grm'] = tensor2img([visuals['grm']])
            outputs = {suffix: outputs[suffix] for suffix, _ in STAGE_SUFFIXES if suffix in outputs}
            table.add(name, outputs, tensor2img([visuals['gt']]) if 'gt' in visuals else None)
            if 'gt' in visuals and self.net_g is not None:
                x0_sums.append(self.x0_errors())
            add_detail(self, detail, visuals, sr_img, val_data.get('labels'))
        if skipped:
            get_root_logger().warning(f'{dataset_name}: skipped {len(skipped)} unreadable image(s):\n  ' +
                                      '\n  '.join(skipped))
        self.metric_results, self.metric_table = table.means(), table
        log_metrics(self, current_iter, dataset_name, tb_logger)
        if not self.opt['is_train'] and table.metrics and table.rows:
            save_metric_table(self, table, dataset_name)
        log_detail(detail, dataset_name, current_iter, tb_logger)
        if x0_sums:
            log_x0_errors(torch.stack(x0_sums).nanmean(0), self.x0_timesteps(), dataset_name, current_iter, tb_logger)
        if pgs_counts:
            diffusion = self.net_g is not None
            log_pgs(self.sampler, torch.cat(pgs_counts), dataset_name, current_iter, tb_logger,
                    nfe_done if diffusion else None, seconds, images)

    # ------------------------------------------------------------------ checkpoints
    def save(self, epoch, current_iter):
        self.save_network(self.net_grm, 'net_grm', current_iter)
        if self.net_g is not None:
            net = self.get_bare_model(self.net_g)
            ema = self.net_g_ema or net
            self.save_network([net.dit, ema.dit], 'net_dit', current_iter, ['params', 'params_ema'])
            if net.texture_encoder is not None:
                self.save_network([net.texture_encoder, ema.texture_encoder], 'net_texture', current_iter,
                                  ['params', 'params_ema'])
        self.save_training_state(epoch, current_iter)
