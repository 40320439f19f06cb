"""The reference texture memory: Algorithm 1's query, faiss vs torch, files, and the checks that keep a memory
from serving a model it was not built for."""
import json

import pytest
import torch

from patchscaler.archs.autoencoder_arch import DiffusersAutoencoderKL, PixelUnshuffleAutoencoder
from patchscaler.retrieval import KeyIndex, ReferenceTextureMemory, build_retriever, faiss_available
from patchscaler.retrieval import index as index_module
from patchscaler.utils.errors import CheckpointError, ConfigError, InputError, MissingWeightsError


def _g(seed):
    return torch.Generator().manual_seed(seed)


def textures(kind, n, seed, c=4, v=16):
    """n latent patches of one synthetic texture class."""
    g = _g(seed)
    if kind == 'smooth':
        return torch.nn.functional.avg_pool2d(torch.randn(n, c, v + 6, v + 6, generator=g), 7, 1) * 4
    if kind == 'rough':
        return torch.randn(n, c, v, v, generator=g)
    t = torch.arange(v, dtype=torch.float32)
    freq = 1.2 + 0.3 * torch.rand(n, 1, 1, 1, generator=g)
    phase = 6.28 * torch.rand(n, c, 1, 1, generator=g)
    wave = torch.sin(t.view(1, 1, 1, v) * freq + phase).expand(n, c, v, v)
    wave = wave if kind == 'vertical' else wave.transpose(2, 3)
    return wave + 0.1 * torch.randn(n, c, v, v, generator=g)


KINDS = ('smooth', 'rough', 'vertical', 'horizontal')


@pytest.fixture(scope='module')
def rtm():
    values = torch.cat([textures(k, 60, seed=i) for i, k in enumerate(KINDS)])
    return ReferenceTextureMemory.build(values, {'type': 'LatentTextureDescriptor'}, 120, top_k=4)


def test_build_keeps_size_patches_with_unit_keys(rtm):
    assert len(rtm) == 120 and rtm.values.shape == (120, 4, 16, 16)
    assert torch.allclose(rtm.keys.norm(dim=1), torch.ones(120), atol=1e-5)
    assert rtm.meta['candidates'] == 240 and rtm.meta['fps']['space'] == 'both'
    assert len(set(rtm.source_indices.tolist())) == 120


def test_a_patch_in_the_memory_finds_itself_first(rtm):
    sims, idx = rtm.search(rtm.values, k=3)
    assert torch.equal(idx[:, 0], torch.arange(len(rtm)))
    assert torch.allclose(sims[:, 0], torch.ones(len(rtm)), atol=1e-5)
    assert (sims[:, :-1] >= sims[:, 1:]).all()  # best first


def test_query_returns_priors_of_the_same_texture(rtm):
    """Fresh patches of each class retrieve mostly their own class (chance: 0.25): the keys carry texture, not
    just the random colour (mean) and channel mix (covariance) these synthetic classes vary in."""
    labels = torch.tensor([KINDS.index(k) for k in KINDS for _ in range(60)])[rtm.source_indices]
    precision = {}
    for i, kind in enumerate(KINDS):
        _, idx = rtm.search(textures(kind, 20, seed=100 + i), k=4)
        precision[kind] = float((labels[idx] == i).float().mean())
    assert min(precision.values()) >= 0.6 and sum(precision.values()) / 4 >= 0.8, precision


def test_query_shapes_dtypes_and_priors_are_memory_values(rtm):
    q = textures('rough', 5, seed=7).half()
    priors, sims = rtm.query(q, k=2)
    assert priors.shape == (5, 2, 4, 16, 16) and priors.dtype == torch.float16
    assert sims.shape == (5, 2) and sims.dtype == torch.float32
    _, idx = rtm.search(q, k=2)
    assert torch.equal(priors, rtm.values[idx].half())
    assert rtm.query(q)[0].shape[1] == rtm.top_k
    empty_priors, empty_sims = rtm.query(q[:0])
    assert empty_priors.shape == (0, 4, 4, 16, 16) and empty_sims.shape == (0, 4)


def test_query_bad_input(rtm):
    with pytest.raises(InputError, match=r'\(c, V, V\)'):
        rtm.query(torch.zeros(2, 3, 16, 16))
    with pytest.raises(InputError, match='NaN'):
        rtm.query(torch.full((1, 4, 16, 16), float('nan')))
    with pytest.raises(ConfigError, match='top_k'):
        rtm.query(torch.zeros(1, 4, 16, 16), k=500)


@pytest.mark.skipif(not faiss_available(), reason='faiss not installed')
def test_faiss_and_torch_agree_on_random_data():
    keys = torch.nn.functional.normalize(torch.randn(2000, 152, generator=_g(0)), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(961, 152, generator=_g(1)), dim=1)
    s_f, i_f = KeyIndex(keys, 'faiss').search(queries, 8)
    s_t, i_t = KeyIndex(keys, 'torch', block_size=100).search(queries, 8)
    assert torch.equal(i_f, i_t)
    assert torch.allclose(s_f, s_t, atol=1e-5)
    assert KeyIndex(keys).backend_for(torch.device('cpu')) == 'faiss'


@pytest.mark.skipif(not faiss_available(), reason='faiss not installed')
def test_faiss_cpu_serves_cuda_queries_from_a_cpu_index(monkeypatch):
    """backend: faiss with CUDA queries but faiss-cpu: a CPU index, no GPU-only faiss call."""
    monkeypatch.setattr(index_module, 'faiss_available', lambda gpu=False: not gpu)
    index = KeyIndex(torch.nn.functional.normalize(torch.randn(10, 4), dim=1), 'faiss')
    assert index.backend_for(torch.device('cuda', 0)) == 'faiss'
    index._faiss_index(torch.device('cuda', 0))
    assert list(index._faiss) == ['cpu'] and not index._gpu_resources


def test_auto_searches_cuda_queries_with_torch_even_with_gpu_faiss(monkeypatch):
    """faiss's Python API takes host arrays: a GPU index would copy the queries to the host and back for what one
    matmul + top-K does on the GPU."""
    monkeypatch.setattr(index_module, 'faiss_available', lambda gpu=False: True)
    index = KeyIndex(torch.nn.functional.normalize(torch.randn(10, 4), dim=1))
    assert index.backend_for(torch.device('cuda', 0)) == 'torch'
    assert index.backend_for(torch.device('cpu')) == 'faiss'


def test_auto_falls_back_to_torch_without_faiss(monkeypatch):
    monkeypatch.setattr(index_module, 'faiss_available', lambda gpu=False: False)
    keys = torch.nn.functional.normalize(torch.randn(10, 4), dim=1)
    assert KeyIndex(keys).backend_for(torch.device('cpu')) == 'torch'
    with pytest.raises(ConfigError, match='faiss is not installed'):
        KeyIndex(keys, 'faiss')
    with pytest.raises(ConfigError, match='backend must be one of'):
        KeyIndex(keys, 'annoy')


# ------------------------------------------------------------------------------------------------- files
def test_save_load_round_trip(rtm, tmp_path):
    path = rtm.save(tmp_path / 'mem')
    assert path.endswith('mem.safetensors')
    meta = json.loads((tmp_path / 'mem.json').read_text())
    assert meta['size'] == 120 and meta['texture_classifier']['type'] == 'LatentTextureDescriptor'
    from safetensors import safe_open
    with safe_open(path, 'pt') as f:  # a plain safetensors file: tensors + JSON header, no pickle
        assert set(f.keys()) == {'values', 'keys', 'key_mean'}
        assert json.loads(f.metadata()['patchscaler_rtm'])['patch_size'] == 16
    loaded = ReferenceTextureMemory.load(path, patch_size=16)
    assert torch.equal(loaded.values, rtm.values) and torch.allclose(loaded.keys, rtm.keys, atol=1e-6)
    q = textures('vertical', 6, seed=3)
    assert torch.equal(loaded.search(q)[1], rtm.search(q)[1])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []  # no temporary files left


def test_a_failed_save_keeps_the_old_memory(rtm, tmp_path, monkeypatch):
    path = rtm.save(tmp_path / 'mem.safetensors')
    before = (tmp_path / 'mem.safetensors').read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, 'wb') as f:
            f.write(b'half')
        raise OSError('disk full')

    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, 'save_file', broken)
    with pytest.raises(OSError, match='disk full'):
        rtm.save(path)
    assert (tmp_path / 'mem.safetensors').read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['mem.json', 'mem.safetensors']


def test_load_errors_are_one_line(rtm, tmp_path):
    with pytest.raises(MissingWeightsError, match='build_rtm.py'):
        ReferenceTextureMemory.load(tmp_path / 'nowhere.safetensors')
    path = rtm.save(tmp_path / 'mem.safetensors')
    data = open(path, 'rb').read()
    (tmp_path / 'cut.safetensors').write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        ReferenceTextureMemory.load(tmp_path / 'cut.safetensors')
    from safetensors.torch import save_file
    save_file({'w': torch.zeros(2)}, str(tmp_path / 'weights.safetensors'))
    with pytest.raises(CheckpointError, match='not a PatchScaler RTM'):
        ReferenceTextureMemory.load(tmp_path / 'weights.safetensors')
    with pytest.raises(ConfigError, match='V = 8'):
        ReferenceTextureMemory.load(path, patch_size=8)
    with pytest.raises(ConfigError, match='same classifier'):
        ReferenceTextureMemory.load(path, texture_classifier={'type': 'LatentTextureDescriptor', 'seed': 5})


@pytest.fixture(scope='module')
def unshuffle_rtm():
    ae = PixelUnshuffleAutoencoder(4)
    values = ae.encode(torch.rand(40, 3, 64, 64, generator=_g(0)))
    return ReferenceTextureMemory.build(values, None, 20, autoencoder=ae), ae


def test_load_refuses_another_autoencoder(unshuffle_rtm, tmp_path):
    rtm, ae = unshuffle_rtm
    path = rtm.save(tmp_path / 'mem.safetensors')
    assert ReferenceTextureMemory.load(path, autoencoder=ae, patch_size=16).meta['autoencoder']['downscale_factor'] == 4
    with pytest.raises(ConfigError, match=r'autoencoder PixelUnshuffleAutoencoder \(c=48, d=4.*c=12, d=2'):
        ReferenceTextureMemory.load(path, autoencoder=PixelUnshuffleAutoencoder(2))


def test_load_refuses_other_weights_of_the_same_autoencoder(tmp_path, tiny_vae_config):
    torch.manual_seed(0)
    ae = DiffusersAutoencoderKL(config=tiny_vae_config)
    values = torch.randn(12, 4, 8, 8, generator=_g(0))
    path = ReferenceTextureMemory.build(values, None, 6, autoencoder=ae).save(tmp_path / 'vae_mem')
    torch.manual_seed(0)
    same = DiffusersAutoencoderKL(config=tiny_vae_config)
    assert len(ReferenceTextureMemory.load(path, autoencoder=same)) == 6
    torch.manual_seed(1)
    other = DiffusersAutoencoderKL(config=tiny_vae_config)
    with pytest.raises(ConfigError, match='different weights'):
        ReferenceTextureMemory.load(path, autoencoder=other)


def test_a_memory_without_a_recorded_autoencoder_is_refused_by_a_model(rtm, tmp_path):
    path = rtm.save(tmp_path / 'anonymous')  # built from tensors, no autoencoder given
    assert len(ReferenceTextureMemory.load(path)) == 120  # fine for plain retrieval
    with pytest.raises(ConfigError, match='without recording its autoencoder'):
        ReferenceTextureMemory.load(path, autoencoder=PixelUnshuffleAutoencoder(1))


def test_probe_is_deterministic_for_a_sampling_autoencoder(tmp_path, tiny_vae_config):
    """An autoencoder that samples its posterior is still recognised, and the global RNG is left alone."""
    torch.manual_seed(0)
    ae = DiffusersAutoencoderKL(config=tiny_vae_config, sample_posterior=True)
    path = ReferenceTextureMemory.build(torch.randn(8, 4, 8, 8), None, 4, autoencoder=ae).save(tmp_path / 'm')
    state = torch.random.get_rng_state()
    assert len(ReferenceTextureMemory.load(path, autoencoder=ae)) == 4
    assert torch.equal(torch.random.get_rng_state(), state) and ae.sample_posterior


def test_build_retriever_from_options(unshuffle_rtm, tmp_path):
    rtm, ae = unshuffle_rtm
    path = rtm.save(tmp_path / 'mem.safetensors')
    got = build_retriever({'type': 'ReferenceTextureMemory', 'path': path, 'top_k': 2, 'backend': 'torch'},
                          autoencoder=ae, patch_size=16)
    assert got.top_k == 2 and got.index.backend == 'torch'
    with pytest.raises(ConfigError, match="did you mean 'top_k'"):
        build_retriever({'type': 'ReferenceTextureMemory', 'path': path, 'topk': 2})
    with pytest.raises(ConfigError, match='top_k must be between 1 and the RTM size 20'):
        build_retriever({'type': 'ReferenceTextureMemory', 'path': path, 'top_k': 21})
    with pytest.raises(ConfigError, match='top_k must be between 1'):
        build_retriever({'type': 'ReferenceTextureMemory', 'path': path, 'top_k': 0})


def test_fps_spaces_and_small_candidate_sets():
    values = textures('rough', 30, seed=0)
    for space in ('keys', 'values', 'both'):
        assert len(ReferenceTextureMemory.build(values, None, 10, fps=space)) == 10
    with pytest.warns(UserWarning, match='only 30 distinct candidate patches'):
        assert len(ReferenceTextureMemory.build(values, None, 50)) == 30
    with pytest.raises(ConfigError, match='fps must be one of'):
        ReferenceTextureMemory.build(values, None, 10, fps='pixels')
