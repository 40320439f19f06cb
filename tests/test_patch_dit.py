"""Patch-DiT and the texture encoder: shapes, the identity-like start, the time-scaled prompt, the
similarity bias, SDPA, presets, and one-line errors."""
import pytest
import torch
from basicsr.archs import build_network
from conftest import ROOT

import patchscaler.archs.patch_dit_arch as dit_mod
from patchscaler.archs.patch_dit_arch import PRESETS, PatchDiT
from patchscaler.archs.texture_encoder_arch import TextureEncoder
from patchscaler.models.prompted_dit import PromptedPatchDiT
from patchscaler.utils.errors import ConfigError, InputError


def _net(c=4, v=16, p=2, k_dim=32, prompt=True, depth=2, token_patch=None):
    dit = PatchDiT(c, v, p, hidden_size=64, depth=depth, num_heads=4, prompt_dim=k_dim if prompt else None)
    if not prompt:
        return PromptedPatchDiT(dit)
    return PromptedPatchDiT(dit, TextureEncoder(c, v, token_patch or (4 if v >= 16 else 2), dim=k_dim, depth=1))


def _cond(net, y0, k, sims=None):
    cond = {'y0': y0}
    if net.texture_encoder is not None:
        n, c, v, _ = y0.shape
        sims = torch.rand(n, k) if sims is None else sims
        cond.update(net.encode_prompt(torch.randn(n, k, c, v, v), sims))
    return cond


def _perturb(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize('v', [8, 16, 32])
@pytest.mark.parametrize('p', [1, 2])
@pytest.mark.parametrize('k', [1, 4])
@pytest.mark.parametrize('prompt', [True, False])
def test_shapes_for_every_v_p_k_with_and_without_prompt(v, p, k, prompt):
    torch.manual_seed(0)
    net = _perturb(_net(v=v, p=p, prompt=prompt, depth=1))
    y0, x_t = torch.randn(3, 4, v, v), torch.randn(3, 4, v, v)
    cond = _cond(net, y0, k)
    if prompt:
        tokens_per_prior = (v // net.texture_encoder.token_patch) ** 2
        assert cond['prompt'].shape == (3, k * tokens_per_prior, 32)
        assert cond['prompt_bias'].shape == (3, k * tokens_per_prior)
    out = net(x_t, torch.tensor([0, 500, 999]), cond)
    assert out.shape == (3, 4, v, v) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_a_fresh_patch_dit_returns_y0_exactly():
    """adaLN-Zero + zero cross-attention scale + zero head: x0 = y0 + 0, the GRM's answer (Δx0 = 0)."""
    torch.manual_seed(0)
    for prompt in (True, False):
        net = _net(prompt=prompt)
        y0 = torch.randn(5, 4, 16, 16)
        out = net(torch.randn(5, 4, 16, 16), torch.randint(0, 1000, (5,)), _cond(net, y0, 4))
        assert torch.equal(out, y0)
    plain = PatchDiT(4, 16, 2, hidden_size=64, depth=2, num_heads=4, residual=False)
    assert torch.equal(plain(torch.randn(2, 4, 16, 16), torch.tensor([3, 4]), torch.randn(2, 4, 16, 16)),
                       torch.zeros(2, 4, 16, 16))


def test_one_training_step_leaves_the_identity():
    torch.manual_seed(0)
    net = _net()
    y0, x0 = torch.randn(8, 4, 16, 16), torch.randn(8, 4, 16, 16)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(3):  # zero-initialised head, then gates/scales, then the prompt path: one step each
        opt.zero_grad()
        loss = (net(x0, torch.randint(0, 1000, (8,)), _cond(net, y0, 4)) - x0).pow(2).mean()
        loss.backward()
        opt.step()
    assert net.texture_encoder.embed.weight.grad.abs().sum() > 0  # the prompt path receives gradients
    assert not torch.equal(net(x0, torch.zeros(8, dtype=torch.long), _cond(net, y0, 4)), y0)


def test_cross_attention_output_is_scaled_per_dimension_by_the_time_embedding():
    torch.manual_seed(0)
    net = _perturb(_net(depth=1))
    block = net.dit.blocks[0]
    seen = {}
    block.cross_attn.register_forward_hook(lambda m, i, o: seen.__setitem__('attn', o))
    y0, x_t = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    cond = _cond(net, y0, 4)
    outs = {}  # the prompt is time-independent; the scale of its cross-attention output is not ...
    for t in (10, 900):
        outs[t] = net(x_t, torch.tensor([t]), cond)
        c = net.dit.t_embedder(torch.tensor([t]))
        outs[f'scale{t}'] = block.cross_scale(c)
    assert outs['scale10'].shape == (1, 64) and not torch.allclose(outs['scale10'], outs['scale900'])
    with torch.no_grad():  # ... and with a zero scale the prompt has no effect at all
        block.cross_scale[-1].weight.zero_()
        block.cross_scale[-1].bias.zero_()
        other = dict(cond, **net.encode_prompt(torch.randn(1, 4, 4, 16, 16), torch.rand(1, 4)))
        assert torch.equal(net(x_t, torch.tensor([10]), cond), net(x_t, torch.tensor([10]), other))


def test_a_badly_matching_prior_counts_less():
    """The similarity bias: changing the content of a low-similarity prior moves the output far less than
    changing a well-matching one (no encoder layers mixing the priors here)."""
    torch.manual_seed(0)
    net = _perturb(PromptedPatchDiT(PatchDiT(4, 16, 2, hidden_size=64, depth=2, num_heads=4, prompt_dim=32),
                                    TextureEncoder(4, 16, 4, dim=32, depth=0)))
    y0, x_t, t = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16), torch.tensor([500])
    priors, sims = torch.randn(1, 2, 4, 16, 16), torch.tensor([[0.95, -0.5]])
    base = net(x_t, t, {'y0': y0, **net.encode_prompt(priors, sims)})

    def change(k):
        p = priors.clone()
        p[0, k] = torch.randn(4, 16, 16)
        return (net(x_t, t, {'y0': y0, **net.encode_prompt(p, sims)}) - base).abs().mean().item()
    assert change(1) < 0.05 * change(0)
    bias = net.texture_encoder(priors, torch.tensor([[0.9, 0.2]]))[1].detach()
    assert bias[0, 0] > bias[0, -1] and float(bias[0, 0]) > -0.1  # a good match is barely penalised


def test_attention_goes_through_sdpa(monkeypatch):
    calls = []
    real = dit_mod.F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    net = _net(depth=3)
    y0 = torch.randn(2, 4, 16, 16)
    cond = _cond(net, y0, 4)  # the encoder's own layers use SDPA too; count Patch-DiT's
    monkeypatch.setattr(dit_mod.F, 'scaled_dot_product_attention', counting)
    net(torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), cond)
    assert len(calls) == 3 * 2  # self- and cross-attention in every block


def test_presets_and_their_sizes():
    sizes = {name: sum(p.numel() for p in PatchDiT(4, 16, 2, preset=name).parameters()) for name in ('S', 'B')}
    assert 30e6 < sizes['S'] < sizes['B'] < 150e6
    dit = PatchDiT(4, 16, 2, preset='S', depth=2)  # explicit arguments override the preset
    assert len(dit.blocks) == 2 and dit.hidden_size == PRESETS['S']['hidden_size']
    with pytest.raises(ConfigError, match='preset'):
        PatchDiT(preset='XL')
    with pytest.raises(ConfigError, match='hidden_size'):
        PatchDiT(depth=2, num_heads=2)


def test_bf16_autocast_forward():
    torch.manual_seed(0)
    net = _perturb(_net())
    y0 = torch.randn(2, 4, 16, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = net(torch.randn(2, 4, 16, 16), torch.tensor([1, 999]), _cond(net, y0, 4))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bad_inputs_and_configs_are_one_line_errors():
    net = _net()
    y0 = torch.randn(2, 4, 16, 16)
    with pytest.raises(InputError, match=r'\(n, 4, 16, 16\)'):
        net(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), {'y0': y0})
    with pytest.raises(InputError, match='batch'):
        net(torch.randn(2, 4, 16, 16), torch.tensor([1, 2, 3]), {'y0': y0})
    no_prompt = _net(prompt=False)
    with pytest.raises(InputError, match='without prompt_dim'):
        no_prompt(y0, torch.tensor([1, 2]), {'y0': y0, 'prompt': torch.randn(2, 4, 32)})
    with pytest.raises(InputError, match='priors'):
        net.encode_prompt(torch.randn(2, 4, 16, 16), torch.rand(2, 4))
    with pytest.raises(ConfigError, match='divisible'):
        PatchDiT(4, 16, 3, hidden_size=64, depth=1, num_heads=4)
    with pytest.raises(ConfigError, match='prompt_dim'):
        PromptedPatchDiT(PatchDiT(4, 16, 2, hidden_size=64, depth=1, num_heads=4, prompt_dim=16),
                         TextureEncoder(4, 16, 4, dim=32))
    with pytest.raises(ConfigError, match='network_texture'):
        PromptedPatchDiT(PatchDiT(4, 16, 2, hidden_size=64, depth=1, num_heads=4, prompt_dim=16))


def test_built_from_the_demo_yaml():
    import yaml
    with open(f'{ROOT}/options/demo/train_patchscaler_demo.yml') as f:
        opt = yaml.safe_load(f)
    dit, enc = build_network(dict(opt['network_dit'])), build_network(dict(opt['network_texture']))
    net = PromptedPatchDiT(dit, enc)
    y0 = torch.randn(2, 48, 16, 16)
    assert net(torch.randn(2, 48, 16, 16), torch.tensor([1, 2]), _cond(net, y0, 4)).shape == (2, 48, 16, 16)


def test_paper_scale_options_are_consistent():
    """train_patchscaler.yml and test_patchscaler.yml: the same networks; Patch-DiT B with its prompt runs on one
    V=16 SD-latent patch; the PGS file's V and prediction type fit it."""
    import yaml

    from patchscaler.sampling import build_sampler
    with open(f'{ROOT}/options/train_patchscaler.yml') as f:
        train = yaml.safe_load(f)
    with open(f'{ROOT}/options/test_patchscaler.yml') as f:
        test = yaml.safe_load(f)
    for key in ('autoencoder', 'network_grm', 'network_dit', 'network_texture', 'rtm', 'sampler', 'scale'):
        assert train[key] == test[key], key
    net = PromptedPatchDiT(build_network(dict(train['network_dit'])), build_network(dict(train['network_texture'])))
    assert 150e6 < sum(p.numel() for p in net.dit.parameters()) < 170e6
    sampler = build_sampler(f"{ROOT}/{train['sampler']}")
    assert sampler.patch_size == net.patch_size == 16 and sampler.prediction_type == 'sample'
    y0 = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(torch.randn(1, 4, 16, 16), torch.tensor([999]), _cond(net, y0, 4)), y0)
