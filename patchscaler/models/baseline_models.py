"""Real-ESRGAN and SwinIR-GAN baselines trained on exactly PatchScaler's data and degradation.

BasicSR's ``RealESRNetModel`` / ``RealESRGANModel`` degrade in ``feed_data`` with their own copy of the
Real-ESRGAN pipeline, hard-coded to CUDA (``DiffJPEG().cuda()``, ``USMSharp().cuda()``). These two models
are BasicSR's ``SRModel`` (RealESRNet: L1 only) and ``SRGANModel`` (RealESRGAN / SwinIR-GAN: L1 +
perceptual + GAN, U-Net discriminator, EMA) with ``feed_data`` replaced by PatchScaler's
:class:`RealESRGANDegradation`, the one implementation every model here shares, on CPU or GPU. The generator
and discriminator are BasicSR's archs (``RRDBNet``, ``SwinIR``, ``UNetDiscriminatorSN``), chosen in YAML.

Real-ESRGAN trains towards the USM-sharpened GT (``l1_gt_usm`` etc.); here the target is whatever the shared
degradation returns as GT: the plain GT by default, the sharpened one with ``degradation.gt_usm: true``
(then both sides of the pair come from it, as in Real-ESRGAN).
"""
from basicsr.models.sr_model import SRModel
from basicsr.models.srgan_model import SRGANModel
from basicsr.utils.registry import MODEL_REGISTRY

from patchscaler.data.degradation import RealESRGANDegradation
from patchscaler.utils.errors import DataError
from patchscaler.utils.padding import pad_bottom_right


class SharedDegradationMixin:
    """``feed_data``: HR batches with kernels are degraded by PatchScaler's degradation; pairs used as given.
    ``test``: the LR image is reflect-padded to the generator's window size (SwinIR needs multiples of it; BasicSR
    does this only in its own ``SwinIRModel``) and the output cropped back."""

    def test(self):
        window = int(self.opt['network_g'].get('window_size', 1))
        h, w = self.lq.shape[-2:]
        lq = self.lq
        if h % window or w % window:
            lq = pad_bottom_right(self.lq, (-h) % window, (-w) % window)
        full, self.lq = self.lq, lq
        try:
            super().test()
        finally:
            self.lq = full
        s = self.opt['scale']
        self.output = self.output[..., :h * s, :w * s]

    def feed_data(self, data):
        if self.is_train and 'kernel1' in data:
            if getattr(self, 'degradation', None) is None:
                self.degradation = RealESRGANDegradation(self.opt.get('degradation'), self.device)
            self.lq, self.gt = self.degradation(data, self.opt['scale'], self.opt['train'].get('gt_size'))
        elif 'error' in data:  # an unreadable validation pair (the datasets report it instead of raising)
            raise DataError(f'{data["error"][0]}; BasicSR\'s validation loop of this baseline cannot skip it: '
                            f'remove or fix the file')
        else:
            self.lq = data['lq'].to(self.device)
            if 'gt' in data:
                self.gt = data['gt'].to(self.device)
            elif hasattr(self, 'gt'):  # an LR-only image must not be scored against the last training batch's GT
                del self.gt


@MODEL_REGISTRY.register()
class RealESRNetBaselineModel(SharedDegradationMixin, SRModel):
    """RealESRNet (the L1 pre-training of Real-ESRGAN) on the shared degradation."""


@MODEL_REGISTRY.register()
class RealESRGANBaselineModel(SharedDegradationMixin, SRGANModel):
    """RealESRGAN / SwinIR-GAN (L1 + perceptual + GAN) on the shared degradation."""
