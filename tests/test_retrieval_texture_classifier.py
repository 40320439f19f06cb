"""The texture classifier 𝒯: the weight-free latent descriptor's numerics, and a torchvision backbone loaded
from a local file (random weights written by the test: the real code path, no download)."""
import pytest
import torch
import torch.nn.functional as F

from patchscaler.archs.autoencoder_arch import PixelUnshuffleAutoencoder
from patchscaler.retrieval import LatentTextureDescriptor, TorchvisionTextureClassifier, build_texture_classifier
from patchscaler.utils.errors import ConfigError, InputError, MissingWeightsError


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize('channels', [4, 48])
def test_descriptor_shape_and_determinism(channels):
    td = LatentTextureDescriptor()
    x = torch.randn(5, channels, 16, 16, generator=_g(0))
    k = td(x)
    assert k.shape == (5, td.key_dim(channels)) and k.dtype == torch.float32
    assert torch.equal(k, LatentTextureDescriptor()(x))
    assert td.key_dim(4) == 2 * (4 + 10 + 16) and td.key_dim(48) == 2 * (8 + 36 + 32)


def test_descriptor_blocks_follow_their_definition():
    """One scale, gram block only: the signed square root of the channel covariance, unit norm."""
    x = torch.randn(3, 4, 8, 8, generator=_g(1))
    td = LatentTextureDescriptor(scales=[1], block_weights=[0, 1, 0])
    k = td(x)
    centred = (x - x.mean((2, 3), keepdim=True)).flatten(2)
    cov = centred @ centred.transpose(1, 2) / 64
    iu = torch.triu_indices(4, 4)
    gram = cov[:, iu[0], iu[1]]
    gram = F.normalize(gram.sign() * gram.abs().sqrt(), dim=1)
    assert torch.allclose(k[:, 4:14], gram, atol=1e-6)
    assert torch.all(k[:, :4] == 0) and torch.all(k[:, 14:] == 0)  # zero-weight blocks


def test_descriptor_energy_block_sees_orientation():
    """Vertical stripes excite d/dx, horizontal stripes d/dy: the energy block tells them apart."""
    t = torch.arange(16.0)
    vertical = torch.sin(t * 1.5)[None, None, None, :].expand(1, 4, 16, 16)
    horizontal = vertical.transpose(2, 3)
    td = LatentTextureDescriptor(scales=[1], block_weights=[0, 0, 1])
    kv, kh = td(vertical)[0, 14:].view(4, 4), td(horizontal)[0, 14:].view(4, 4)  # (channel, filter)
    assert (kv[:, 0] > 10 * kv[:, 1]).all() and (kh[:, 1] > 10 * kh[:, 0]).all()


def test_projection_is_orthonormal_and_fixed_by_seed():
    td = LatentTextureDescriptor(proj_channels=8, seed=3)
    p = td.projection(48)
    assert torch.allclose(p @ p.T, torch.eye(8), atol=1e-5)
    assert torch.equal(p, LatentTextureDescriptor(proj_channels=8, seed=3).projection(48))
    assert not torch.equal(p, LatentTextureDescriptor(proj_channels=8, seed=4).projection(48))
    assert td.projection(4) is None


def test_spec_rebuilds_the_same_extractor():
    td = LatentTextureDescriptor(proj_channels=6, scales=[1, 2, 4], block_weights=[1, 2, 3], seed=9)
    again = build_texture_classifier(td.spec())
    x = torch.randn(2, 12, 16, 16, generator=_g(0))
    assert torch.equal(td(x), again(x))
    assert type(build_texture_classifier(None)) is LatentTextureDescriptor


def test_descriptor_bad_input_and_options():
    td = LatentTextureDescriptor()
    with pytest.raises(InputError, match='too small'):
        td(torch.zeros(1, 4, 4, 4))
    with pytest.raises(InputError, match='NaN'):
        td(torch.full((1, 4, 8, 8), float('nan')))
    with pytest.raises(InputError, match=r'\(N, c, V, V\)'):
        td(torch.zeros(4, 8, 8))
    with pytest.raises(ConfigError, match='block_weights'):
        LatentTextureDescriptor(block_weights=[1, 1])
    with pytest.raises(ConfigError, match="did you mean 'scales'"):
        build_texture_classifier({'type': 'LatentTextureDescriptor', 'scale': [1]})
    with pytest.raises(ConfigError, match='unknown type'):
        build_texture_classifier({'type': 'VGGTextureNet'})


# ------------------------------------------------------------------------------------- torchvision backbone
@pytest.fixture(scope='module')
def backbone_weights(tmp_path_factory):
    """A random-init mobilenet_v3_small state dict (10 MB) in both formats users have."""
    import torchvision
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp('weights')
    torch.manual_seed(0)
    state = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    torch.save(state, folder / 'mnv3.pth')
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / 'mnv3.safetensors'))
    return folder


@pytest.mark.parametrize('fmt', ['pth', 'safetensors'])
def test_torchvision_classifier_decodes_and_pools(backbone_weights, fmt):
    ae = PixelUnshuffleAutoencoder(4)
    tc = build_texture_classifier({'type': 'TorchvisionTextureClassifier', 'arch': 'mobilenet_v3_small',
                                   'weights': str(backbone_weights / f'mnv3.{fmt}'), 'layer': 'features.3',
                                   'pool': 'mean_std', 'input_size': 64}, autoencoder=ae)
    x = torch.randn(3, 48, 8, 8, generator=_g(0)) * 0.5
    k = tc(x)
    assert k.shape == (3, 2 * 24) and torch.isfinite(k).all()
    # what it computes: backbone features of the decoded, resized, ImageNet-normalised patch
    rgb = F.interpolate(ae.decode(x).clamp(0, 1), size=(64, 64), mode='bilinear', antialias=True)
    feat = tc.body((rgb - tc.mean) / tc.std)['feat'].flatten(2)
    assert torch.allclose(k, torch.cat([feat.mean(2), feat.std(2, correction=0)], 1), atol=1e-5)
    spec = tc.spec()
    assert spec['weights_sha256'] and len(spec['weights_sha256']) == 64
    assert torch.allclose(build_texture_classifier(spec, ae)(x), k)


def test_torchvision_classifier_errors(backbone_weights, tmp_path):
    base = {'type': 'TorchvisionTextureClassifier', 'arch': 'mobilenet_v3_small', 'layer': 'features.3'}
    with pytest.raises(MissingWeightsError, match='vgg_textures.pth'):
        build_texture_classifier(dict(base, weights=str(tmp_path / 'vgg_textures.pth')), PixelUnshuffleAutoencoder())
    weights = str(backbone_weights / 'mnv3.pth')
    with pytest.raises(ConfigError, match="no layer 'features.33'"):
        build_texture_classifier(dict(base, weights=weights, layer='features.33'), PixelUnshuffleAutoencoder())
    with pytest.raises(ConfigError, match='does not fit torchvision resnet18'):
        build_texture_classifier(dict(base, weights=weights, arch='resnet18', layer='layer1'),
                                 PixelUnshuffleAutoencoder())
    with pytest.raises(ConfigError, match='needs the autoencoder'):
        build_texture_classifier(dict(base, weights=weights))
    with pytest.raises(ConfigError, match='unknown torchvision model'):
        TorchvisionTextureClassifier(weights, arch='vgg99')
    with pytest.raises(ConfigError, match='pool'):
        TorchvisionTextureClassifier(weights, arch='mobilenet_v3_small', layer='features.3', pool='max')


def test_rtm_with_a_torchvision_classifier_round_trips(backbone_weights, tmp_path):
    """Build -> save -> load with the backbone: keys are not centred (a trained classifier's own cosine), the
    weights' hash travels with the memory, and a memory patch finds itself."""
    from patchscaler.retrieval import ReferenceTextureMemory
    ae = PixelUnshuffleAutoencoder(4)
    opt = {'type': 'TorchvisionTextureClassifier', 'arch': 'mobilenet_v3_small',
           'weights': str(backbone_weights / 'mnv3.pth'), 'layer': 'features.3', 'input_size': 64}
    values = ae.encode(torch.rand(24, 3, 32, 32, generator=_g(0)))
    rtm = ReferenceTextureMemory.build(values, opt, 12, autoencoder=ae)
    assert rtm.meta['center_keys'] is False and torch.equal(rtm.key_mean, torch.zeros_like(rtm.key_mean))
    path = rtm.save(tmp_path / 'tv_rtm')
    loaded = ReferenceTextureMemory.load(path, autoencoder=ae, patch_size=8)
    sims, idx = loaded.search(loaded.values)
    assert torch.equal(idx[:, 0], torch.arange(12)) and bool((sims[:, 0] > 0.999).all())
    with pytest.raises(ConfigError, match='needs the autoencoder'):
        ReferenceTextureMemory.load(path)


def test_torchvision_classifier_with_a_bf16_autoencoder(backbone_weights, tiny_vae_config):
    """Half-precision autoencoders (the GPU fast path) and float32 RTM values meet in the classifier."""
    from patchscaler.archs.autoencoder_arch import DiffusersAutoencoderKL
    vae = DiffusersAutoencoderKL(config=tiny_vae_config).to(torch.bfloat16)
    tc = build_texture_classifier({'type': 'TorchvisionTextureClassifier', 'arch': 'mobilenet_v3_small',
                                   'weights': str(backbone_weights / 'mnv3.pth'), 'layer': 'features.3',
                                   'input_size': 32}, autoencoder=vae)
    for dtype in (torch.float32, torch.float16):
        k = tc(torch.randn(2, 4, 8, 8, generator=_g(0)).to(dtype))
        assert k.dtype == torch.float32 and torch.isfinite(k).all()
