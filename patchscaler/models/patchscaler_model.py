"""PatchScalerModel: BasicSR's training/validation interface around the PatchScaler pipeline.

Stage ``grm`` (this file today): the frozen autoencoder encodes the bicubic-upsampled LR image (y_LR) and
the HR image (x_HR); the GRM predicts y_HR and the confidence C and is trained with the confidence-driven
loss (Eq. 1). Validation decodes y_HR, reports PSNR/SSIM through BasicSR's metrics next to the same
metrics of plain bicubic upsampling (the number the GRM must beat), and saves the SR image, the confidence
map and a side-by-side strip. The diffusion stage (Patch-DiT + PGS) is added to this class later; its
options live under the same keys (``train.stage``).

With a ``sampler`` option (a PGS options dict or the path of a file such as
``options/samplers/pgs_paper.yml``), validation also grades the GRM's confidence the way PGS will (Eq. 2),
logs the share of patches per group and the NFE ratio PGS would need against uniform sampling, and saves
the Qmap/group overlay (``*_pgs.png``).

Training data comes HR-only with Real-ESRGAN kernels (:class:`RealESRGANHRDataset`) and is degraded here,
on the model's device, by :class:`RealESRGANDegradation`. Paired data (``lq``/``gt``) is used as is.
"""
from collections import OrderedDict
from os import path as osp

import torch
import torch.nn.functional as F
from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.metrics import calculate_metric
from basicsr.models.base_model import BaseModel
from basicsr.utils import get_root_logger, imwrite, tensor2img
from basicsr.utils.registry import MODEL_REGISTRY
from tqdm import tqdm

from patchscaler.archs.autoencoder_arch import build_autoencoder, pad_to_multiple
from patchscaler.data.degradation import RealESRGANDegradation
from patchscaler.sampling import build_sampler
from patchscaler.utils.errors import ConfigError
from patchscaler.utils.visualize import confidence_to_bgr, labelled_strip, qmap_overlay

STAGES = ('grm',)


@MODEL_REGISTRY.register()
class PatchScalerModel(BaseModel):
    """Options: ``scale``, ``autoencoder`` (frozen first stage), ``network_grm``, ``degradation`` (training
    only), ``train`` (see :attr:`TRAIN_OPTION_KEYS`), ``val`` (metrics as in BasicSR)."""

    REQUIRED_OPTION_KEYS = ('scale', 'autoencoder', 'network_grm')
    TRAIN_OPTION_KEYS = {'stage', 'total_iter', 'warmup_iter', 'optim_grm', 'scheduler', 'confidence_opt',
                         'grad_clip', 'gt_size'}

    def __init__(self, opt):
        super().__init__(opt)
        missing = [k for k in self.REQUIRED_OPTION_KEYS if k not in opt]
        if missing:
            raise ConfigError(f'PatchScalerModel needs the option(s) {missing}')
        self.scale = int(opt['scale'])
        self.autoencoder = build_autoencoder(opt['autoencoder']).to(self.device)
        self.net_grm = self.model_to_device(build_network(opt['network_grm']))
        self.print_network(self.net_grm)
        self.sampler = build_sampler(opt['sampler']) if opt.get('sampler') else None
        self.pgs_groups = None
        load_path = opt['path'].get('pretrain_network_grm')
        if load_path is not None:
            self.load_network(self.net_grm, load_path, opt['path'].get('strict_load_grm', True),
                              opt['path'].get('param_key_grm', 'params'))
        if self.is_train:
            self.init_training_settings()

    # ------------------------------------------------------------------ training
    def init_training_settings(self):
        train_opt = self.opt['train']
        self.stage = train_opt.get('stage', 'grm')
        if self.stage not in STAGES:
            raise ConfigError(f'train.stage must be one of {STAGES}, got {self.stage!r}')
        self.net_grm.train()
        self.cri_confidence = build_loss(dict(train_opt.get('confidence_opt', {'type': 'ConfidenceLoss'})))
        self.cri_confidence = self.cri_confidence.to(self.device)
        self.grad_clip = train_opt.get('grad_clip')
        self.gt_size = train_opt.get('gt_size')
        self.degradation = RealESRGANDegradation(self.opt.get('degradation'), self.device)

        optim_opt = dict(train_opt['optim_grm'])
        params = [p for p in self.net_grm.parameters() if p.requires_grad]
        self.optimizer_grm = self.get_optimizer(optim_opt.pop('type'), params, **optim_opt)
        self.optimizers.append(self.optimizer_grm)
        self.setup_schedulers()

    def feed_data(self, data):
        """Training batches with kernels are degraded here; paired batches are used as given."""
        if self.is_train and 'kernel1' in data:
            self.lq, self.gt = self.degradation(data, self.scale, self.gt_size)
        else:
            self.lq = data['lq'].to(self.device)
            self.gt = data['gt'].to(self.device) if 'gt' in data else None

    def encode_lr(self, lq):
        """Bicubic ×scale, pad to the autoencoder's multiple, encode. Returns (y_LR, bicubic image, (H, W))."""
        up = F.interpolate(lq, scale_factor=self.scale, mode='bicubic', align_corners=False).clamp(0, 1)
        padded, size = pad_to_multiple(up, self.autoencoder.downscale_factor)
        return self.autoencoder.encode(padded), up, size

    def optimize_parameters(self, current_iter):
        with torch.no_grad():
            y_lr, _, _ = self.encode_lr(self.lq)
            x_hr = self.autoencoder.encode(pad_to_multiple(self.gt, self.autoencoder.downscale_factor)[0])
        self.optimizer_grm.zero_grad(set_to_none=True)
        y_hr, confidence = self.net_grm(y_lr)
        l_conf = self.cri_confidence(y_hr, x_hr, confidence)
        l_conf.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.net_grm.parameters(), self.grad_clip)
        self.optimizer_grm.step()
        self.log_dict = self.reduce_loss_dict(OrderedDict(
            l_conf=l_conf.detach(), l1_latent=(y_hr - x_hr).abs().mean().detach(),
            mean_confidence=confidence.mean().detach()))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def test(self):
        """GRM on ``self.lq``: sets ``output`` (decoded y_HR), ``confidence``, ``bicubic``."""
        grm = self.get_bare_model(self.net_grm)  # bare: DDP would wait for ranks that do not validate
        was_training = grm.training
        grm.eval()
        y_lr, self.bicubic, (h, w) = self.encode_lr(self.lq)
        y_hr, confidence = grm(y_lr)
        self.output = self.autoencoder.decode(y_hr)[..., :h, :w].clamp(0, 1)
        d = self.autoencoder.downscale_factor
        self.confidence = confidence[..., :-(-h // d), :-(-w // d)]
        if self.sampler is not None:  # Eq. 2 on this image: what PGS will do with it
            self.pgs_groups = self.sampler.assign(self.confidence, (y_hr.shape[0], 1, *self.confidence.shape[-2:]))
        grm.train(was_training)

    def get_current_visuals(self):
        out = OrderedDict(lq=self.lq.detach().cpu(), result=self.output.detach().cpu(),
                          bicubic=self.bicubic.detach().cpu(), confidence=self.confidence.detach().cpu())
        if self.gt is not None:
            out['gt'] = self.gt.detach().cpu()
        return out

    def dist_validation(self, dataloader, current_iter, tb_logger, save_img):
        if self.opt['rank'] == 0:
            self.nondist_validation(dataloader, current_iter, tb_logger, save_img)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        dataset_name = dataloader.dataset.opt['name']
        metrics = self.opt['val'].get('metrics') or {}
        sums, count, skipped, pgs_counts = {}, 0, [], []
        for val_data in tqdm(dataloader, desc=f'val {dataset_name}', unit='img', leave=False,
                             disable=not self.opt['val'].get('pbar', True)):
            name = osp.splitext(osp.basename(val_data['lq_path'][0]))[0]
            if 'error' in val_data:
                skipped.append(val_data['error'][0])
                continue
            self.feed_data(val_data)
            self.test()
            visuals = self.get_current_visuals()
            sr_img = tensor2img([visuals['result']])
            if save_img:
                self._save_visuals(visuals, sr_img, name, dataset_name, current_iter)
            if self.pgs_groups is not None:
                pgs_counts.append(self.pgs_groups[0].flatten())
            if 'gt' in visuals:
                gt_img, bic_img = tensor2img([visuals['gt']]), tensor2img([visuals['bicubic']])
                for metric, metric_opt in metrics.items():
                    sums[metric] = sums.get(metric, 0.0) + calculate_metric({'img': sr_img, 'img2': gt_img}, metric_opt)
                    sums[f'{metric}_bicubic'] = sums.get(f'{metric}_bicubic', 0.0) + calculate_metric(
                        {'img': bic_img, 'img2': gt_img}, metric_opt)
                count += 1
        if skipped:
            get_root_logger().warning(f'{dataset_name}: skipped {len(skipped)} unreadable image(s):\n  ' +
                                      '\n  '.join(skipped))
        self.metric_results = {k: v / count for k, v in sums.items()} if count else {}
        self._log_metrics(current_iter, dataset_name, tb_logger)
        if pgs_counts:
            self._log_pgs(torch.cat(pgs_counts), dataset_name, current_iter, tb_logger)

    def _log_pgs(self, groups, dataset_name, current_iter, tb_logger):
        s = self.sampler
        nfe, uniform = s.nfe(groups)
        shares = [float((groups == g).float().mean()) for g in range(len(s.groups))]
        parts = ', '.join(f'{n} {100 * f:.1f}%' for n, f in zip(s.group_names, shares))
        get_root_logger().info(f'PGS grading of {dataset_name} ({groups.numel()} patches of {s.patch_size}² latent): '
                               f'{parts}; NFE {nfe} vs {uniform} uniform = {nfe / max(uniform, 1):.2f}x')
        if tb_logger:
            tb_logger.add_scalar(f'pgs/{dataset_name}/nfe_ratio', nfe / max(uniform, 1), current_iter)
            for n, f in zip(s.group_names, shares):
                tb_logger.add_scalar(f'pgs/{dataset_name}/share_{n}', f, current_iter)

    def _log_metrics(self, current_iter, dataset_name, tb_logger):
        if not self.metric_results:
            return
        self._initialize_best_metric_results(dataset_name)
        lines = [f'Validation {dataset_name}']
        for metric, best in self.best_metric_results[dataset_name].items():
            value = self.metric_results.get(metric)
            if value is None:
                continue
            self._update_best_metric_result(dataset_name, metric, value, current_iter)
            bicubic = self.metric_results.get(f'{metric}_bicubic')
            gain = value - bicubic if best['better'] == 'higher' else bicubic - value  # positive = better
            lines.append(f'\t # {metric}: {value:.4f}\t(bicubic: {bicubic:.4f}, gain {gain:+.4f})'
                         f'\tBest: {best["val"]:.4f} @ {best["iter"]} iter')
        get_root_logger().info('\n'.join(lines))
        if tb_logger:
            for metric, value in self.metric_results.items():
                tb_logger.add_scalar(f'metrics/{dataset_name}/{metric}', value, current_iter)

    def _save_visuals(self, visuals, sr_img, name, dataset_name, current_iter):
        if self.opt['is_train']:
            folder, suffix = osp.join(self.opt['path']['visualization'], name), f'{name}_{current_iter}'
        else:
            folder = osp.join(self.opt['path']['visualization'], dataset_name)
            suffix = f'{name}_{self.opt["val"].get("suffix") or self.opt["name"]}'
        imwrite(sr_img, osp.join(folder, f'{suffix}.png'))
        h, w = sr_img.shape[:2]
        conf_img = confidence_to_bgr(visuals['confidence'][0].numpy(), size=(w, h))
        imwrite(conf_img, osp.join(folder, f'{suffix}_confidence.png'))
        tiles = [tensor2img([visuals['bicubic']]), sr_img, conf_img]
        labels = ['bicubic', 'GRM y_HR', 'confidence C']
        if 'gt' in visuals:
            tiles.insert(2, tensor2img([visuals['gt']]))
            labels.insert(2, 'HR')
        imwrite(labelled_strip(tiles, labels), osp.join(folder, f'{suffix}_compare.png'))
        if self.pgs_groups is not None:
            groups, qmap, _, grid = self.pgs_groups
            imwrite(qmap_overlay(sr_img, qmap[0], groups[0], grid, self.sampler.group_names),
                    osp.join(folder, f'{suffix}_pgs.png'))

    # ------------------------------------------------------------------ checkpoints
    def save(self, epoch, current_iter):
        self.save_network(self.net_grm, 'net_grm', current_iter)
        self.save_training_state(epoch, current_iter)
