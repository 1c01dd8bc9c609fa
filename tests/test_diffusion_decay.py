"""Tests for diffusion_decay.py: each checks a property against an independent reference (the
authors' formula, a closed form for Gaussian data, a second implementation in mae_decay.py /
probe.py, an uninterrupted run)."""
import inspect
import json
import math
import os
import signal
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)  # tiny models: one thread is as fast as two and does not fight other work

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import diffusion_decay as d  # noqa: E402
import mae_decay  # noqa: E402
import probe  # noqa: E402

CPU = torch.device("cpu")
TINY = ["--img-size", "8", "--patch-size", "2", "--embed-dim", "32", "--depth", "4", "--num-heads", "2",
        "--batch-size", "32", "--base-lr", "4e-3", "--warmup-epochs", "0.5", "--probe-epochs", "3", "--eval-every", "0",
        "--fd-samples", "48", "--ref-epochs", "1", "--sample-steps", "2", "--feature-t", "0", "--no-plots",
        "--device", "cpu", "--log-every", "1"]


def tiny_cfg(*extra):
    return d.parse_config(TINY + list(extra))


def tiny_data(n_train=256, n_test=64, size=8):
    parts = {"train": d.make_shapes(n_train, size, seed=0), "test": d.make_shapes(n_test, size, seed=1),
             "classes": d.SHAPE_NAMES}
    return d.to_device(parts, CPU)


def tiny_model(alpha_min=0.3, skips=True, num_classes=0, depth=4):
    torch.manual_seed(0)
    return d.DiT(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=depth, num_heads=2, alpha_min=alpha_min,
                 skips=skips, num_classes=num_classes)


def randomise_gates(model, seed=1):
    """Give the zero-initialised adaLN / final Linears random weights, so the network is not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model


# --------------------------------------------------------------------------- decay schedule, model

@pytest.mark.parametrize("depth,alpha_min", [(2, 0.5), (6, 0.3), (12, 0.6), (28, 0.8), (4, 1.0)])
def test_alphas_over_all_blocks_follow_the_authors_schedule(depth, alpha_min):
    model = d.DiT(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=depth, num_heads=2, alpha_min=alpha_min)
    reference = 1 - np.linspace(0, 1, 2 * depth) * (1 - alpha_min)  # the authors' SiT: np.linspace(1, min_sigma, 2*depth)
    got = [a for block in model.blocks for a in (block.alpha_attn, block.alpha_mlp)]
    assert len(got) == 2 * depth  # encoder AND decoder half
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-15)
    assert got[0] == 1.0 and got[-1] == alpha_min
    assert d.decay_schedule(depth, alpha_min) == mae_decay.decay_schedule(depth, alpha_min)
    assert d.alpha_min_for(3e-3, depth) == mae_decay.alpha_min_for(3e-3, depth)


def test_alpha_eff_flag_sets_alpha_min_over_all_blocks():
    cfg = d.parse_config(["--alpha-eff", "1,2.4e-3", "--depth", "28", "--skips", "on"])
    assert d.comparison(cfg)[0] == (True, pytest.approx(1.0, abs=1e-12))
    assert d.comparison(cfg)[1][1] == pytest.approx(0.8, abs=0.01)  # SiT-XL/2's setting (spec section 1)


def test_every_block_at_init_is_the_alpha_scaled_identity_and_output_is_zero():
    model = tiny_model(alpha_min=0.3, skips=True, num_classes=10)
    gen = torch.Generator().manual_seed(0)
    x, skip = torch.randn(3, 16, 32, generator=gen), torch.randn(3, 16, 32, generator=gen)
    c = model.condition(torch.rand(3, generator=gen), torch.tensor([0, 4, 10]))
    for i, block in enumerate(model.blocks):
        scale = model.alphas[2 * i] * model.alphas[2 * i + 1]
        if block.skip_proj is None:
            torch.testing.assert_close(block(x, c), scale * x, rtol=1e-6, atol=1e-7)
        else:  # decoder half: the long skip is live from the start (the authors do not zero it)
            torch.testing.assert_close(block(x, c, skip), scale * (x + block.skip_proj(skip)), rtol=1e-6, atol=1e-6)
    out = model(torch.randn(3, 3, 8, 8, generator=gen), torch.rand(3, generator=gen))
    assert out.shape == (3, 3, 8, 8) and out.abs().max() == 0  # adaLN-Zero: velocity 0 at init
    # with skips off the whole network is a chain of alpha-scaled identities: features = prod(alphas) * tokens
    plain = tiny_model(alpha_min=0.3, skips=False)
    images, t = torch.randn(2, 3, 8, 8, generator=gen), torch.rand(2, generator=gen)
    tokens = plain.patch_embed(images).flatten(2).transpose(1, 2) + plain.pos_embed
    torch.testing.assert_close(plain.features(images, t), math.prod(plain.alphas[:4]) * tokens, rtol=1e-5, atol=1e-6)


def test_a_block_copied_alone_carries_its_adaLN_zero_init(monkeypatch):
    """DiTBlock.zero_init_ (and FinalLayer's) is the whole zero init: a block built and zeroed on its
    own is the alpha-scaled identity, and init_weights zeroes every block through it, nothing else."""
    block = d.DiTBlock(32, 2, 4.0, alpha_attn=0.9, alpha_mlp=0.7, long_skip=True)
    gen = torch.Generator().manual_seed(0)
    x, skip, c = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 5, 32, generator=gen), torch.randn(2, 32, generator=gen)
    assert block(x, c, skip).sub(0.63 * x).abs().max() > 0.1  # torch's default init: the branches are on
    assert block.zero_init_() is block
    torch.testing.assert_close(block(x, c, skip), 0.9 * 0.7 * (x + block.skip_proj(skip)), rtol=1e-6, atol=1e-6)
    final = d.FinalLayer(32, 2, 3).zero_init_()
    assert final(x, c).abs().max() == 0
    zeroed = []
    for cls in (d.DiTBlock, d.FinalLayer):
        real = cls.zero_init_
        monkeypatch.setattr(cls, "zero_init_", lambda self, real=real: zeroed.append(type(self).__name__) or real(self))
    model = tiny_model(depth=4)
    assert zeroed == ["DiTBlock"] * 4 + ["FinalLayer"]
    monkeypatch.undo()
    torch.manual_seed(0)
    fresh = d.DiT(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=2, alpha_min=0.3, skips=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_numbers_the_comments_state_hold():
    """What the docstrings, presets and teaching comments state as numbers, against an independent
    computation: the total shortcut decay prod(alphas) of the settings they name, the GELU gap, the
    logit-normal share near t = 0 and the uniform share near any interior level."""
    prod = lambda depth, alpha_min: math.prod(1 - np.linspace(0, 1, 2 * depth) * (1 - alpha_min))  # the authors' formula
    assert f"{prod(6, 0.3):.2e}" == "2.64e-03" and f"{prod(6, 0.8):.2f}" == "0.27"  # PRESETS quick: our 0.3 vs their 0.8
    assert f"{prod(28, 0.8):.1e}" == "2.4e-03" and f"{prod(12, 0.8):.1e}" == "7.6e-02"  # SiT-XL/2; the cifar preset
    assert f"{prod(12, 0.7):.1e}" == "1.8e-02"  # the authors' MAE ViT-B/16 (alpha_min_for's docstring)
    for text, depth, alpha_min in (("2.6e-3", 6, 0.3), ("0.27", 6, 0.8), ("2.4e-3", 28, 0.8)):
        assert text in inspect.getsource(d).split("PRESETS = {")[1].split("}")[0] or text in d.__doc__, text
    x = torch.linspace(-8, 8, 160_001, dtype=torch.float64)
    assert (F.gelu(x) - F.gelu(x, approximate="tanh")).abs().max() <= 5e-4  # "differ by at most 5e-4"
    # P(sigmoid(N(0, 1)) < 0.05) = Phi(logit(0.05)) = 0.0016, by 10^6 draws (standard error 4e-5)
    draws = torch.sigmoid(torch.randn(1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert abs((draws < 0.05).double().mean().item() - 0.0016) < 2e-4
    assert abs(d.training_visits(0.25, "uniform") - 0.1) < 1e-12  # uniform: a tenth of the steps within +-0.05


def test_long_skips_wire_the_documented_blocks():
    model = randomise_gates(tiny_model(depth=6))
    assert model.skip_sources() == [2, 1, 0]  # decoder blocks 3, 4, 5 get encoder blocks 2, 1, 0
    encoder_out, skip_in = {}, {}
    for i, block in enumerate(model.blocks):
        if i < 3:
            assert block.skip_proj is None
            block.register_forward_hook(lambda mod, inp, out, i=i: encoder_out.__setitem__(i, out.detach()))
        else:
            block.skip_proj.register_forward_hook(lambda mod, inp, out, i=i: skip_in.__setitem__(i, inp[0].detach()))
    model(torch.randn(2, 3, 8, 8), torch.rand(2))
    for j, source in enumerate(model.skip_sources()):
        assert torch.equal(skip_in[3 + j], encoder_out[source])
    assert torch.equal(skip_in[3], encoder_out[2])  # first decoder block <- last encoder block
    off = tiny_model(depth=6, skips=False)
    assert all(block.skip_proj is None for block in off.blocks)
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in off.parameters()) == 3 * (32 * 32 + 32)


def test_timestep_embedding_scales_continuous_time():
    t = torch.tensor([0.0, 0.001, 0.5])
    emb = d.timestep_embedding(t, 256)
    torch.testing.assert_close(emb[:, 0], torch.cos(1000 * t))  # the highest frequency sees 1000 t
    torch.testing.assert_close(emb[:, 128], torch.sin(1000 * t))
    assert (emb[1] - emb[0]).abs().max() > 0.5  # t = 0 and t = 0.001 are told apart


def test_time_embedding_scale_and_the_direction_of_time():
    t = torch.tensor([0.0, 0.013, 0.5, 0.97], dtype=torch.float64)
    freqs = 10000.0 ** (-np.arange(128) / 128)  # GLIDE / DiT / SiT: exp(-log(max_period) * i / half)
    for scale in (1.0, 1000.0):  # SiT's convention (t in [0, 1] as is) and ours (DiT's 0..1000)
        emb = d.timestep_embedding(t.float(), 256, scale=scale).double().numpy()
        angles = scale * t.numpy()[:, None] * freqs[None]
        np.testing.assert_allclose(emb, np.concatenate([np.cos(angles), np.sin(angles)], 1), atol=2e-4)  # fp32 angles up to 1000
        # the reversed time 1 - t (SiT's direction) is a FIXED orthogonal map of each (cos, sin) pair:
        # cos(c - a) = cos c cos a + sin c sin a, sin(c - a) = sin c cos a - cos c sin a, c = scale * freq
        c = scale * freqs
        cos_a, sin_a = emb[:, :128], emb[:, 128:]
        reversed_emb = d.timestep_embedding((1 - t).float(), 256, scale=scale).double().numpy()
        np.testing.assert_allclose(reversed_emb[:, :128], np.cos(c) * cos_a + np.sin(c) * sin_a, atol=5e-4)
        np.testing.assert_allclose(reversed_emb[:, 128:], np.sin(c) * cos_a - np.cos(c) * sin_a, atol=5e-4)
    # SiT's unscaled convention: 96 of the 128 frequencies turn by less than 0.1 rad over all of [0, 1]
    assert (freqs <= 0.1).sum() == 96
    cfg = tiny_cfg("--time-scale", "1")
    assert d.build_model(cfg, 1.0, True, 3, 10).t_embedder.time_scale == 1.0
    assert d.Config().time_scale == 1000.0 and d.Config().time_dist == "uniform"  # SiT's time distribution by default


def test_probed_noise_levels_are_ones_training_visits():
    for preset in ("quick", "cifar"):
        cfg = d.parse_config(["--preset", preset])
        levels = d.noise_levels(cfg)
        assert 0.0 not in levels and levels[0] == 0.1  # the headline level, fixed in advance
        for level in levels:
            # uniform training puts 0.1 of its times within +-0.05 of any interior level; demand at least half that
            assert d.training_visits(level, cfg.time_dist) >= 0.05, (preset, level)
    # the closed form against the sampler itself: 10^5 draws, binomial standard error sqrt(p(1-p)/n) <= 1.6e-3,
    # so 5 standard errors are 8e-3
    n = 100_000
    for time_dist in ("uniform", "logit-normal"):
        samples = d.sample_time(n, torch.Generator().manual_seed(0), time_dist)
        for level in (0.0, 0.1, 0.25, 0.5, 0.9):
            empirical = ((samples - level).abs() <= 0.05).float().mean().item()
            assert abs(empirical - d.training_visits(level, time_dist)) < 8e-3, (time_dist, level)
    assert d.training_visits(0.0, "logit-normal") < 0.002  # why t = 0 is no longer probed: training almost never sees it


def test_flop_count_matches_a_direct_count():
    cfg = tiny_cfg("--class-cond")
    model = d.build_model(cfg, 1.0, True, 3, 10)
    T = 16
    per_token = sum(p.numel() for n, p in model.named_parameters()
                    if p.ndim == 2 and "adaLN" not in n and "embedder" not in n)  # blocks, skips, final Linear
    per_token += model.patch_embed.weight.numel()
    per_image = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and ("adaLN" in n or "t_embedder" in n))
    attention = 4 * T ** 2 * 32 * 4
    assert d.dit_flops_per_image(cfg, True) == pytest.approx(3 * (2 * T * per_token + 2 * per_image + attention), rel=1e-12)


# --------------------------------------------------------------------------- the method, on NON-zero branches

def randomise_all(model, seed=1, scale=0.1):
    """Random weights everywhere, the zero-initialised adaLN and final Linears included: every branch
    f_k is then non-zero, and a wrong residual rule can no longer hide behind f_k = 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))
    return model


def authors_alphas(depth, alpha_min):
    """The authors' SiT/models.py: np.linspace(1, min_sigma, 2 * depth).reshape(depth, -1)."""
    return np.linspace(1, alpha_min, 2 * depth).reshape(depth, 2)


def reference_attention(x, qkv, proj, heads):
    """Multi-head self-attention written out: softmax(q k^T / sqrt(d)) v per head."""
    B, T, D = x.shape
    q, k, v = F.linear(x, qkv.weight, qkv.bias).view(B, T, 3, heads, D // heads).unbind(2)  # 3 x (B, T, H, d)
    weights = torch.softmax(torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D // heads), dim=-1)
    return F.linear(torch.einsum("bhts,bshd->bthd", weights, v).reshape(B, T, D), proj.weight, proj.bias)


def reference_block(block, x, c, alpha_attn, alpha_mlp, skip=None, rule="paper"):
    """The paper's rule inside an adaLN-Zero block, stated independently of DiTBlock.forward:
        h   = a_attn * x + gate_msa * attn(norm1(x) * (1 + scale_msa) + shift_msa)
        out = a_mlp  * h + gate_mlp * mlp(norm2(h) * (1 + scale_mlp) + shift_mlp)
    rule="scaled-sum" is the WRONG rule a * (x + f(x)), used to show the comparison has the power to see it."""
    D = x.shape[-1]
    if skip is not None:
        x = x + F.linear(skip, block.skip_proj.weight, block.skip_proj.bias)
    ada = block.adaLN_modulation[1]
    shift1, scale1, gate1, shift2, scale2, gate2 = [m[:, None] for m in F.linear(F.silu(c), ada.weight, ada.bias).split(D, 1)]
    norm = lambda z: F.layer_norm(z, (D,), eps=1e-6)  # noqa: E731  (no affine: adaLN supplies it)
    attn = gate1 * reference_attention(norm(x) * (1 + scale1) + shift1, block.attn.qkv, block.attn.proj, block.attn.heads)
    h = alpha_attn * x + attn if rule == "paper" else alpha_attn * (x + attn)
    mlp_in = norm(h) * (1 + scale2) + shift2
    mlp = gate2 * F.linear(F.gelu(F.linear(mlp_in, block.mlp.fc1.weight, block.mlp.fc1.bias)), block.mlp.fc2.weight, block.mlp.fc2.bias)
    return alpha_mlp * h + mlp if rule == "paper" else alpha_mlp * (h + mlp)


def reference_dit(model, x, t, y, alpha_min, rule="paper"):
    """The whole network written out: patch tokens + fixed position table, c = time MLP(sinusoid of
    1000 t) + class embedding (null class when y is None), blocks with the authors' alphas, U-ViT skips
    (decoder-half block j gets encoder-half block half-1-j), final adaLN + Linear, patches back to pixels.
    Returns (velocity (B, C, H, W), the encoder-half outputs)."""
    depth, p, C = len(model.blocks), model.patch_size, model.in_chans
    alphas, half = authors_alphas(depth, alpha_min), depth // 2
    tokens = F.conv2d(x, model.patch_embed.weight, model.patch_embed.bias, stride=p).flatten(2).transpose(1, 2)
    tokens = tokens + model.pos_embed
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    angles = 1000 * t[:, None] * freqs[None]
    mlp = model.t_embedder.mlp
    c = F.linear(F.silu(F.linear(torch.cat([angles.cos(), angles.sin()], 1), mlp[0].weight, mlp[0].bias)), mlp[2].weight, mlp[2].bias)
    if model.y_embedder is not None:
        c = c + model.y_embedder.weight[torch.full_like(t, model.num_classes, dtype=torch.long) if y is None else y]
    encoder_outputs = []
    for i, block in enumerate(model.blocks):
        skip = encoder_outputs[2 * half - 1 - i] if i >= half and model.skips else None
        tokens = reference_block(block, tokens, c, alphas[i, 0], alphas[i, 1], skip, rule)
        if i < half:
            encoder_outputs.append(tokens)
    final = model.final_layer
    shift, scale = F.linear(F.silu(c), final.adaLN_modulation[1].weight, final.adaLN_modulation[1].bias).chunk(2, 1)
    out = F.linear(F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None],
                   final.linear.weight, final.linear.bias)  # (B, L, p*p*C), (p, p, C) inside a patch
    g = math.isqrt(out.shape[1])
    velocity = out.view(len(x), g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(len(x), C, g * p, g * p)
    return velocity, encoder_outputs


## Float32 throughout: the two computations differ only in rounding (SDPA against an explicit softmax,
## fused against unfused LayerNorm), ~6e-8 relative per operation, accumulated over sums of 32-128
## terms through up to 6 blocks whose activations stay below 5 with these random weights: ~1e-6
## absolute (measured: 9e-7). ATOL 1e-4 (RTOL 1e-5) leaves two orders of margin; the wrong rule
## (checked below) moves the output by about 1, more than 1000 * ATOL.
RTOL, ATOL = 1e-5, 1e-4


@pytest.mark.parametrize("skips,num_classes", [(True, 10), (False, 0)])
def test_every_block_and_the_whole_network_follow_the_papers_equation_with_nonzero_branches(skips, num_classes):
    alpha_min, depth = 0.3, 6
    model = randomise_all(tiny_model(alpha_min=alpha_min, skips=skips, num_classes=num_classes, depth=depth)).eval()
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 3, 8, 8, generator=gen), torch.rand(3, generator=gen)
    y = torch.tensor([0, 4, 10]) if num_classes else None
    alphas = authors_alphas(depth, alpha_min)
    with torch.no_grad():
        tokens, skip = torch.randn(3, 16, 32, generator=gen), torch.randn(3, 16, 32, generator=gen)
        c = model.condition(t, y)
        for i, block in enumerate(model.blocks):  # each block alone, against the equation with the authors' alphas
            s = skip if block.skip_proj is not None else None
            ours = block(tokens, c, s)
            assert (ours - reference_block(block, tokens, c, 1.0, 1.0, s)).abs().max() > 1e-2 or i == 0  # the alphas matter
            torch.testing.assert_close(ours, reference_block(block, tokens, c, alphas[i, 0], alphas[i, 1], s), rtol=RTOL, atol=ATOL)
            wrong = reference_block(block, tokens, c, alphas[i, 0], alphas[i, 1], s, rule="scaled-sum")
            assert (ours - wrong).abs().max() > 100 * ATOL  # a * (x + f(x)) would be seen (block 0: 1 - a_mlp = 0.06)
        velocity, encoder_outputs = reference_dit(model, x, t, y, alpha_min)
        torch.testing.assert_close(model(x, t, y), velocity, rtol=RTOL, atol=ATOL)
        assert (model(x, t, y) - reference_dit(model, x, t, y, alpha_min, rule="scaled-sum")[0]).abs().max() > 1000 * ATOL
        # the probed features: the LAST encoder-half block (block depth/2 - 1), null class, before any final norm
        torch.testing.assert_close(model.features(x, t), encoder_outputs[-1] if y is None else
                                   reference_dit(model, x, t, None, alpha_min)[1][-1], rtol=RTOL, atol=ATOL)


def test_extracted_features_are_the_mean_over_tokens_of_the_noised_encoder_half_output():
    cfg = tiny_cfg("--class-cond", "--depth", "6")
    model = randomise_all(d.build_model(cfg, 0.3, True, 3, 10))
    images = d.make_shapes(40, 8, seed=3)[0]
    images = torch.from_numpy(images)
    level = 0.25
    features = d.extract_features(model, images, cfg, level, CPU)
    # an independent statement: pixels to [-1, 1], noised along the path with the seeded noise of
    # extraction (one batch of 40 < 512), tokens of block depth/2 - 1, null class, mean over all L tokens
    x0 = images.float() / 127.5 - 1
    noise = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((40,), level)
    with torch.no_grad():
        tokens = reference_dit(model, (1 - level) * x0 + level * noise, t, None, 0.3)[1][-1]  # (40, L, D)
    torch.testing.assert_close(features, tokens.mean(1), rtol=RTOL, atol=ATOL)
    assert model.training  # extraction switches to eval mode and back


def test_the_training_loop_draws_labels_times_and_keeps_the_ema_as_stated(tmp_path, monkeypatch):
    """One run of 32 steps, watched from outside: the labels and times the loss sees, and the raw
    weights after every optimizer step, from which the EMA is recomputed independently."""
    cfg = tiny_cfg("--class-cond", "--class-dropout", "0.1", "--epochs", "4", "--ema-decay", "0.5",
                   "--out-dir", str(tmp_path), "--skips", "on")
    data = tiny_data()  # 256 training images, batch 32: 8 steps per epoch, 1024 labels and times in all
    seen, snapshots, initial = [], [], []
    real_flow_loss, real_make_optimizer = d.flow_loss, d.make_optimizer

    def flow_loss(model, x0, noise, t, y=None):
        seen.append((t.clone(), y.clone()))
        return real_flow_loss(model, x0, noise, t, y)

    def make_optimizer(model, cfg, device):
        optimizer = real_make_optimizer(model, cfg, device)
        initial.extend(p.detach().clone() for p in model.parameters())
        step = optimizer.step

        def step_and_record(*args, **kwargs):
            out = step(*args, **kwargs)
            snapshots.append([p.detach().clone() for p in model.parameters()])
            return out
        optimizer.step = step_and_record
        return optimizer

    monkeypatch.setattr(d, "flow_loss", flow_loss)
    monkeypatch.setattr(d, "make_optimizer", make_optimizer)
    monkeypatch.setattr(d, "finish_run", lambda model, state, *rest: model)  # the model evaluation would get
    evaluated = d.train_run(cfg, data, None, True, 0.5, 0, str(tmp_path / "run"), CPU)
    times, labels = torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen])
    assert len(labels) == 1024 and len(snapshots) == 32
    # labels: the null class (index 10) with probability --class-dropout, else the true label. Binomial:
    # mean 102.4, standard error sqrt(1024 * 0.1 * 0.9) = 9.6; 4 standard errors = 38.4 (an inverted drop gives ~922)
    assert abs((labels == 10).sum().item() - 102.4) < 4 * 9.6
    assert labels.max() <= 10 and len(set(labels[labels < 10].tolist())) == 10
    # times: uniform on [0, 1] (SiT). Kolmogorov-Smirnov against the CDF t: for n = 1024 the 0.1 % critical
    # value is 1.95 / sqrt(n) = 0.061; the logit-normal CDF lies 0.117 away at t = 0.2, so it would be seen
    assert ks_statistic(times, lambda v: v) < 1.95 / math.sqrt(1024)
    # the evaluated weights are the EMA: e <- decay_s * e + (1 - decay_s) * w_s after every step s, with
    # decay_s = min(--ema-decay, (1 + s) / (10 + s)), starting from the initial weights
    ema = [p.clone() for p in initial]
    for s, weights in enumerate(snapshots):
        decay = min(0.5, (1 + s) / (10 + s))
        ema = [decay * e + (1 - decay) * w for e, w in zip(ema, weights)]
    ## float32: 32 updates, each a convex combination rounded at ~6e-8 relative; weights O(1): 1e-6 suffices
    for got, want in zip(evaluated.parameters(), ema):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # Adam moves each weight by at most ~lr (here up to 5e-4) per step: after 32 steps the EMA has moved
    # ~1e-2 (measured 8e-3); an EMA never updated moves exactly 0. (The raw weights, evaluated by mistake,
    # would fail the comparison above: they lie 1.2e-5 from the EMA, 10 times its tolerance.)
    moved = max((got - start).abs().max().item() for got, start in zip(evaluated.parameters(), initial))
    assert moved > 1e-3


def test_the_training_loop_follows_its_stated_schedule(tmp_path, monkeypatch):
    """The lr each optimizer step sees, against the schedule as the comments state it (peak = base_lr *
    batch / 256, linear warm-up over warmup_epochs, then half-cycle cosine to min_lr, per step), and
    the step count (the last incomplete batch of every epoch dropped)."""
    cfg = tiny_cfg("--epochs", "3", "--warmup-epochs", "1", "--base-lr", "8e-3", "--min-lr", "1e-4",
                   "--out-dir", str(tmp_path))
    data = tiny_data(n_train=100)  # batch 32: 3 whole batches per epoch, 4 images dropped
    seen, real_make_optimizer = [], d.make_optimizer

    def make_optimizer(model, cfg, device):
        optimizer = real_make_optimizer(model, cfg, device)
        step = optimizer.step
        optimizer.step = lambda *a, **k: seen.append([g["lr"] for g in optimizer.param_groups]) or step(*a, **k)
        return optimizer

    monkeypatch.setattr(d, "make_optimizer", make_optimizer)
    monkeypatch.setattr(d, "finish_run", lambda model, state, *rest: state)
    state = d.train_run(cfg, data, None, True, 0.5, 0, str(tmp_path / "run"), CPU)
    assert state["step"] == len(seen) == 9 and len(state["losses"]) == 9
    peak, warmup, total = 8e-3 * 32 / 256, 3, 9
    for s, lrs in enumerate(seen):
        want = peak * s / warmup if s < warmup else 1e-4 + (peak - 1e-4) * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) / 2
        assert lrs == [pytest.approx(want, rel=1e-12)] * 2, s  # both parameter groups
    assert seen[0] == [0.0, 0.0] and seen[warmup][0] == pytest.approx(peak)  # starts at 0, peaks when warm-up ends


def ks_statistic(samples, cdf):
    """sup_t |F_n(t) - F(t)| of a sample against a CDF (evaluated at the jumps, both sides)."""
    v = torch.sort(samples.double()).values
    n = len(v)
    f = torch.tensor([cdf(float(s)) for s in v], dtype=torch.float64)
    return max((torch.arange(1, n + 1) / n - f).max().item(), (f - torch.arange(n) / n).max().item())


@pytest.mark.parametrize("time_dist", ["uniform", "logit-normal"])
def test_training_times_follow_their_density(time_dist):
    n = 20_000
    samples = d.sample_time(n, torch.Generator().manual_seed(0), time_dist)
    # the CDF stated independently: t, or P(sigmoid(Z) <= t) = Phi(log(t / (1 - t))) for Z ~ N(0, 1)
    cdf = (lambda v: v) if time_dist == "uniform" else \
        (lambda v: float(torch.special.ndtr(torch.tensor(math.log(v / (1 - v)), dtype=torch.float64))))
    for v in (0.05, 0.3, 0.5, 0.8):
        assert d.time_cdf(v, time_dist) == pytest.approx(cdf(v), abs=1e-12)
    # Kolmogorov-Smirnov: under the null, P(sqrt(n) D > 1.95) = 0.001; the other distribution is 0.117
    # away at t = 0.2, which at n = 20000 is 8.5 times the threshold of 0.0138
    threshold = 1.95 / math.sqrt(n)
    assert ks_statistic(samples, cdf) < threshold
    other = "logit-normal" if time_dist == "uniform" else "uniform"
    assert ks_statistic(samples, lambda v: d.time_cdf(v, other)) > 5 * threshold


# --------------------------------------------------------------------------- flow and sampler, Gaussian data

MU, SIGMA = 1.0, 0.5  # data x_0 ~ N(MU, SIGMA^2) per coordinate, noise ~ N(0, 1)


def exact_velocity(x, t, y=None):
    """E[noise - x_0 | x_t] for Gaussian data: x_t ~ N((1-t) MU, V_t), V_t = (1-t)^2 SIGMA^2 + t^2,
    Cov(noise - x_0, x_t) = t - (1-t) SIGMA^2."""
    t = t.view(-1, *[1] * (x.ndim - 1)).double()
    variance = (1 - t) ** 2 * SIGMA ** 2 + t ** 2
    return (-MU + (t - (1 - t) * SIGMA ** 2) / variance * (x.double() - (1 - t) * MU)).to(x.dtype)


def test_flow_loss_of_the_exact_velocity_is_the_closed_form_minimum():
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = MU + SIGMA * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    for t_value in (0.2, 0.5, 0.9):
        t = torch.full((n,), t_value, dtype=torch.float64)
        variance = (1 - t_value) ** 2 * SIGMA ** 2 + t_value ** 2
        minimum = 1 + SIGMA ** 2 - (t_value - (1 - t_value) * SIGMA ** 2) ** 2 / variance  # Var(noise - x_0 | x_t)
        loss = d.flow_loss(exact_velocity, x0, noise, t)
        assert loss.item() == pytest.approx(minimum, rel=0.01)
        shifted = d.flow_loss(lambda x, tt, y=None: exact_velocity(x, tt) + 0.1, x0, noise, t)
        assert shifted.item() == pytest.approx(minimum + 0.01, rel=0.01)  # any other field costs its squared error
    # the interpolant itself: t = 0 is the data, t = 1 the noise
    assert torch.equal(d.interpolate(x0, noise, torch.zeros(n, dtype=torch.float64)), x0)
    assert torch.equal(d.interpolate(x0, noise, torch.ones(n, dtype=torch.float64)), noise)


def test_ode_sampler_converges_to_the_exact_transport_heun_faster_than_euler():
    z = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = MU + SIGMA * z  # the flow of a Gaussian is affine: x_t = (1-t) MU + sqrt(V_t) z
    errors = {method: [(d.sample_ode(exact_velocity, z, steps, method) - exact).abs().max().item() for steps in (4, 8, 16, 32)]
              for method in ("euler", "heun")}
    for method, order in (("euler", 1), ("heun", 2)):
        e = errors[method]
        assert all(a > b for a, b in zip(e, e[1:])), errors
        assert e[-2] / e[-1] == pytest.approx(2 ** order, rel=0.25), errors  # first / second order convergence
    assert errors["heun"][1] < errors["euler"][-1], errors  # Heun with 8 steps beats Euler with 32


# --------------------------------------------------------------------------- classifier-free guidance

def test_cfg_scale_one_is_the_conditional_model_and_other_scales_extrapolate():
    model = randomise_gates(tiny_model(num_classes=10)).eval()
    gen = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(5, 3, 8, 8, generator=gen), torch.rand(5, generator=gen), torch.tensor([0, 3, 3, 9, 1])
    null = torch.full_like(y, 10)
    with torch.no_grad():
        conditional, unconditional = model(x, t, y), model(x, t, null)
        assert (conditional - unconditional).abs().max() > 1e-3  # the label matters
        torch.testing.assert_close(d.guided_velocity(model, y, 1.0)(x, t), conditional)
        torch.testing.assert_close(d.guided_velocity(model, y, 0.0)(x, t), unconditional, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d.guided_velocity(model, y, 3.0)(x, t), unconditional + 3 * (conditional - unconditional),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x, t), unconditional)  # no label = the null class


# --------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_against_closed_forms():
    gen = torch.Generator().manual_seed(0)
    mean1, mean2 = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    var1, var2 = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1, torch.rand(6, generator=gen, dtype=torch.float64) + 0.1
    # diagonal covariances: |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2
    closed = float(((mean1 - mean2) ** 2).sum() + ((var1.sqrt() - var2.sqrt()) ** 2).sum())
    assert d.frechet_distance(mean1, torch.diag(var1), mean2, torch.diag(var2)) == pytest.approx(closed, rel=1e-10)
    # invariant under a common rotation, which makes both covariances full (non-commuting path)
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))[0]
    rotated = d.frechet_distance(rotation @ mean1, rotation @ torch.diag(var1) @ rotation.T,
                                 rotation @ mean2, rotation @ torch.diag(var2) @ rotation.T)
    assert rotated == pytest.approx(closed, rel=1e-8)
    # identical sets -> 0; statistics are mean and unbiased covariance
    features = torch.randn(300, 8, generator=gen)
    stats = d.feature_stats(features)
    np.testing.assert_allclose(stats[1].numpy(), np.cov(features.double().numpy().T), rtol=1e-10, atol=1e-12)
    assert abs(d.frechet_distance(*stats, *stats)) < 1e-9
    # samples of two Gaussians approach the closed form
    a = mean1 + var1.sqrt() * torch.randn(200_000, 6, generator=gen, dtype=torch.float64)
    b = mean2 + var2.sqrt() * torch.randn(200_000, 6, generator=gen, dtype=torch.float64)
    assert d.frechet_distance(*d.feature_stats(a), *d.feature_stats(b)) == pytest.approx(closed, rel=0.02)


# --------------------------------------------------------------------------- copies agree with the other scripts

def test_evaluation_copies_agree_with_mae_decay_and_probe():
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(400, 12, generator=gen), torch.randn(37, 12, generator=gen)
    train_y, test_y = torch.randint(0, 4, (400,), generator=gen), torch.randint(0, 4, (37,), generator=gen)
    for other in (mae_decay, probe):
        for k in (5, [1, 20]):
            ours, theirs = d.knn_predict(train_x, train_y, test_x, k=k, chunk=10), other.knn_predict(train_x, train_y, test_x, k=k, chunk=10)
            assert (ours == theirs).all() if isinstance(k, int) else all(torch.equal(ours[kk], theirs[kk]) for kk in k)
        assert d.linear_probe(train_x, train_y, test_x, test_y, epochs=3, seed=1) == \
            other.linear_probe(train_x, train_y, test_x, test_y, epochs=3, seed=1)
        assert d.effective_rank(train_x) == other.effective_rank(train_x)
        assert d.effective_rank(train_x, center=True) == other.effective_rank(train_x, center=True)
    for name in ("decay_schedule", "alpha_min_for", "sincos_pos_embed", "unpatchify", "get_lr", "make_shapes",
                 "knn_predict", "linear_probe", "effective_rank", "step_generator", "epoch_order", "center_view", "to_device",
                 "load_dataset", "atomic_save", "save_features", "write_json", "mean_std", "pick_device", "autocast",
                 "Attention", "MLP", "UserError", "knob_help", "parse_floats", "parse_seeds", "alpha_settings",
                 "fixed_subset", "check_writable", "catch_ctrl_c", "release_ctrl_c", "Interrupted", "cli", "probe_settings",
                 "describe_probe", "OneSentenceParser", "atomic_write", "pid_running", "check_out_dir",
                 "sigterm_outside_training"):
        assert inspect.getsource(getattr(d, name)) == inspect.getsource(getattr(mae_decay, name)), name


def test_training_batch_is_seeded_and_flips_only():
    data = tiny_data(n_train=64)
    images = data["train_x"][:16]
    plain = d.center_view(images, 8, 0.5, 0.5)
    assert torch.equal(d.training_batch(images, 8), plain)
    mirror = torch.rand(16, generator=torch.Generator().manual_seed(3)) < 0.5
    a = d.training_batch(images, 8, mirror)
    assert all(torch.equal(a[i], plain[i].flip(-1) if mirror[i] else plain[i]) for i in range(16)) and 0 < mirror.sum() < 16
    assert not any(torch.equal(a[i], plain[i]) for i in range(16) if mirror[i])  # no image is its own mirror here
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(d.to_uint8(plain), images)  # [-1, 1] -> uint8 inverts the scaling exactly


# --------------------------------------------------------------------------- the lean step: the same numbers

def old_training_inputs(data, idx, gen, cfg, num_classes):
    """The step's inputs as the code drew them before they went through one buffer: flip coins,
    times, noise of shape (B, C, S, S), label-drop coins, each its own tensor (one process)."""
    x0 = d.center_view(data["train_x"][idx], cfg.img_size, 0.5, 0.5)
    if cfg.flip:
        mirror = torch.rand(len(idx), generator=gen) < 0.5
        x0 = torch.where(mirror[:, None, None, None], x0.flip(-1), x0)
    t = d.sample_time(len(idx), gen, cfg.time_dist)
    noise = torch.randn((len(idx), *x0.shape[1:]), generator=gen)
    y = None
    if cfg.class_cond:
        y = torch.where(torch.rand(len(idx), generator=gen) < cfg.class_dropout, num_classes, data["train_y"][idx])
    return x0, noise, t, y


@pytest.mark.parametrize("flags", [[], ["--no-flip"], ["--class-cond", "--time-dist", "logit-normal"],
                                   ["--class-cond", "--class-dropout", "0.5", "--no-flip"]])
def test_one_buffer_of_draws_gives_the_same_inputs_bit_for_bit_and_shards_them(flags):
    cfg, data = tiny_cfg(*flags), tiny_data(n_train=64)
    idx = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:32]
    for step in (0, 7):
        new = d.training_inputs(data, idx, d.step_generator(3, step), cfg, 10, 0, 1)
        old = old_training_inputs(data, idx, d.step_generator(3, step), cfg, 10)
        for got, want in zip(new, old):
            assert (got is None and want is None) or torch.equal(got, want)
        # two processes: each gets its contiguous half of exactly the one-process batch
        halves = [d.training_inputs(data, idx, d.step_generator(3, step), cfg, 10, rank, 2) for rank in (0, 1)]
        for j, want in enumerate(new):
            assert want is None or torch.equal(torch.cat([halves[0][j], halves[1][j]]), want)


def old_attention_forward(self, x):  # the permute-then-split formula the unbind replaced
    B, T, D = x.shape
    q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
    return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))


def loss_and_grads(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    x0, t = torch.randn(8, 3, 8, 8, generator=gen), torch.rand(8, generator=gen)
    y = torch.randint(0, 11, (8,), generator=gen) if model.num_classes else None
    loss = d.flow_loss(model, x0, torch.randn(x0.shape, generator=gen), t, y)
    loss.backward()
    return [loss] + [param.grad for param in model.parameters()]


@pytest.mark.parametrize("skips,alpha_min", [(True, 1.0), (True, 0.5), (False, 1.0)])
def test_skipping_alpha_one_and_the_unbind_split_change_no_bit(monkeypatch, skips, alpha_min):
    x = torch.randn(3, 4)
    assert d.scaled(x, 1.0).data_ptr() == x.data_ptr() and torch.equal(d.scaled(x, 0.3), 0.3 * x)  # alpha 1: a view, no copy
    new = loss_and_grads(tiny_model(alpha_min, skips, num_classes=10))
    monkeypatch.setattr(d, "scaled", lambda x, alpha: alpha * x)  # the multiply, always
    monkeypatch.setattr(d.Attention, "forward", old_attention_forward)
    old = loss_and_grads(tiny_model(alpha_min, skips, num_classes=10))
    assert all(torch.equal(a, b) for a, b in zip(new, old))  # the loss and every gradient, bit for bit


def test_the_ema_as_one_foreach_lerp_is_the_per_parameter_lerp():
    model, ema = randomise_all(tiny_model(num_classes=10)), tiny_model(num_classes=10).requires_grad_(False)
    reference = [p.detach().clone() for p in ema.parameters()]
    for step in range(5):
        decay = d.ema_decay_at(step, 0.9)
        d.update_ema(ema, model, decay)
        reference = [r.lerp(p.detach(), 1.0 - decay) for r, p in zip(reference, model.parameters())]
        assert all(torch.equal(e, r) for e, r in zip(ema.parameters(), reference))


def test_compile_mode_cuda_graphs_on_one_gpu_and_resume_checks_it(tmp_path, monkeypatch):
    resolve = lambda flags, device, world: d.resolve_compile_mode(tiny_cfg(*flags), torch.device(device), world).compile_mode
    assert resolve(["--compile"], "cuda", 1) == "reduce-overhead"  # CUDA graphs: the default on one GPU
    assert resolve(["--compile"], "cuda", 2) == "default" and resolve(["--compile"], "cpu", 1) == "default"
    assert resolve(["--compile", "--compile-mode", "max-autotune"], "cuda", 1) == "max-autotune"  # an explicit mode wins
    assert resolve(["--compile-mode", "reduce-overhead"], "cuda", 1) == "eager"  # no --compile: no compile
    assert "compile_mode" in d.TRAJECTORY_KEYS
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode: modes.append(mode) or model)
    run_training(tmp_path, "run", "--epochs", "1", "--max-steps", "3", "--compile")
    assert modes == ["default"]  # on the CPU
    with pytest.raises(d.UserError, match=r"other settings \(compile_mode\)"):
        run_training(tmp_path, "run", "--epochs", "1", "--resume")  # eager now
    # a checkpoint from before compile_mode existed resumes under the same --compile choice
    path = tmp_path / "run" / "run" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["compile_mode"]
    torch.save(ckpt, path)
    assert run_training(tmp_path, "run", "--epochs", "1", "--resume", "--compile")["steps"] == 8
    with pytest.raises(d.UserError, match="argument --compile-mode: invalid choice"):
        tiny_cfg("--compile-mode", "fast")


# --------------------------------------------------------------------------- training

def run_training(tmp_path, name, *extra):
    cfg = tiny_cfg("--out-dir", str(tmp_path / name), *extra)
    data = tiny_data()
    reference = d.reference_network(cfg, data, CPU)
    skips, alpha_min = d.comparison(cfg)[-1]
    return d.train_run(cfg, data, reference, skips, alpha_min, 0, str(tmp_path / name / "run"), CPU)


def test_resume_continues_exactly_and_the_loss_falls(tmp_path):
    flags = ["--epochs", "6", "--skips", "on", "--alpha-min", "0.5", "--class-cond", "--base-lr", "2e-2"]
    full = run_training(tmp_path, "full", *flags)
    part = run_training(tmp_path, "part", *flags, "--max-steps", "13")
    assert part["steps"] == 13 and part["losses"] == full["losses"][:13] and part["final_loss"] == full["losses"][12]
    resumed = run_training(tmp_path, "part", *flags, "--resume")
    assert resumed["losses"] == full["losses"]  # bit-identical continuation (data order, flips, t, noise, label drops)
    assert resumed["fd"] == full["fd"] and resumed["knn"] == full["knn"] and resumed["linear_probe"] == full["linear_probe"]
    assert np.mean(full["losses"][-8:]) < 0.85 * np.mean(full["losses"][:8]), full["losses"]  # zero-init starts at E|noise - x0|^2
    with np.load(tmp_path / "full" / "run" / "features.npz") as f:
        assert f["train_features"].shape == (256, 32) and f["test_labels"].shape == (64,)
        assert "encoder-half output (block 2/4)" in str(f["feature"]) and float(f["alpha_min"]) == 0.5
    with pytest.raises(d.UserError, match="already exists"):
        run_training(tmp_path, "part", *flags)
    with pytest.raises(d.UserError, match="other settings"):
        run_training(tmp_path, "part", *flags[:-3], "--resume")


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    with pytest.raises(d.UserError, match="loss became"):
        run_training(tmp_path, "nan", "--epochs", "1", "--base-lr", "1e30")


# --------------------------------------------------------------------------- command line

def tree(root):
    """Every path under root, a file with its size and modification time: what "nothing was created or changed"
    compares. (A folder's own time is left out: the out-dir lock's file, made and removed, changes it.)"""
    return {os.path.relpath(os.path.join(d, n), root): (os.stat(os.path.join(d, n)).st_size, os.stat(os.path.join(d, n)).st_mtime_ns)
            if n in files else "folder" for d, dirs, files in os.walk(root) for n in dirs + files}


## One row per bad input: the flags, and a piece of the one sentence that must name the problem.
## The first block is refused by the validation pass, the last rows once the data size is known; all
## of them before anything is written.
BAD_FLAGS = [
    (["--img-size", "9"], "multiple of --patch-size"),
    (["--depth", "5"], "must be even"),
    (["--skips", "yes"], "--skips must be a comma list"),
    (["--alpha-min", "1.0,abc"], "comma-separated list"),
    (["--alpha-min", "1.5"], "must be in (0, 1]"),
    (["--alpha-eff", "0"], "must be in (0, 1]"),
    (["--sampler", "rk4"], "--sampler"),
    (["--time-dist", "beta"], "--time-dist"),
    (["--cfg-scale", "2"], "add --class-cond"),
    (["--feature-t", "1.0"], "--feature-t"),
    (["--ema-decay", "1"], "--ema-decay"),
    (["--device", "tpu"], "--device"),
    (["--seeds", "0.5"], "--seeds"),
    (["--probe", "mine"], "--probe"),
    (["--time-scale", "0"], "--time-scale"),
    (["--embed-dim", "0"], "--embed-dim must be a positive multiple of 4"),
    (["--embed-dim", "-12"], "--embed-dim must be a positive multiple of 4"),
    (["--num-heads", "0"], "--num-heads must be at least 1"),
    (["--num-heads", "3"], "divisible by --num-heads"),
    (["--mlp-ratio", "-1"], "--mlp-ratio must be positive"),
    (["--beta2", "1.5"], "--beta2 must be in [0, 1)"),
    (["--probe-epochs", "0"], "--probe-epochs must be at least 1"),
    (["--probe-epochs", "-1"], "--probe-epochs must be at least 1"),
    (["--weight-decay", "-1"], "cannot be negative"),
    (["--min-lr", "-1"], "cannot be negative"),
    (["--base-lr", "nan"], "--base-lr must be a finite number"),
    (["--class-dropout", "1"], "--class-dropout"),
    (["--warmup-epochs", "20"], "--warmup-epochs"),
    (["--knn-k", "0"], "--knn-k must be at least 1"),
    (["--fd-samples", "1"], "--fd-samples"),
    (["--sample-steps", "0"], "--sample-steps"),
    (["--ckpt-minutes", "0"], "--ckpt-minutes positive"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--dataset", "imagenet"], "unknown --dataset"),
    (["--dataset", "folder:no/such/dir"], "is not a directory"),
    (["--epochs", "abc"], "invalid int value"),
    (["--bogus"], "unrecognized arguments"),
    (["--out-dir", ""], "--out-dir is empty"),
    (["--out-dir", "a_file/out"], "which is a file, not a directory"),
    (["--out-dir", "a_file"], "exists and is not a directory"),
    (["--json", "a_file/r.json"], "which is a file, not a directory"),
    (["--json", "a_dir"], "exists and is a directory"),
    (["--dataset", "cifar10", "--data-dir", "a_file/data"], "which is a file, not a directory"),
    (["--knn-k", "20", "--train-limit", "16", "--batch-size", "8"], "--knn-k 20 asks for more neighbours than the 16"),
    (["--batch-size", "64", "--train-limit", "32"], "--batch-size 64 is larger than the 32 training images"),
    (["--out-dir", "has_ckpt", "--skips", "on", "--alpha-min", "1"], "already exists: pass --resume"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_input_is_one_sentence_exit_2_and_changes_nothing(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "has_ckpt" / "skipson_alpha1_seed0").mkdir(parents=True)
    (tmp_path / "has_ckpt" / "skipson_alpha1_seed0" / "ckpt.pt").write_bytes(b"old")
    before = tree(tmp_path)
    short = ["--epochs", "1", "--max-steps", "1", "--train-limit", "64"]  # should a case be accepted, it fails fast
    assert d.cli(TINY + ["--out-dir", "out"] + short + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    after = tree(tmp_path)
    if "out" in after:  # a check that needs the data runs under the out-dir's lock, which made the folder: left empty
        assert os.listdir(tmp_path / "out") == []
        del after["out"]
    assert after == before  # no file created (no config.json, no lock), nothing changed


def test_help_shows_the_real_defaults_by_section(capsys):
    with pytest.raises(SystemExit) as exit_info:
        d.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines wherever a help text's length puts them
    assert exit_info.value.code == 0
    assert "(default: None)" not in text and "(default: 'shapes')" in text and "(default: 0.1)" in text
    assert "flow training:" in text and "representation:" in text and "dataset=cifar10" in text


def test_the_real_command_line(tmp_path):  # the in-process cases above, once through the real interpreter
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "diffusion_decay.py"), "--depth", "5"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.startswith("error: --depth must be even")
    assert proc.stderr.count("\n") == 1 and os.listdir(tmp_path) == []


def test_ctrl_c_saves_a_checkpoint_and_resume_reproduces_the_run_bit_for_bit(tmp_path, monkeypatch, capsys):
    flags = TINY + ["--skips", "on", "--alpha-min", "0.5", "--epochs", "2", "--log-every", "3", "--class-cond", "--train-limit", "128"]
    saved_at, real_save = [], d.save_checkpoint

    def save_checkpoint(path, model, ema, optimizer, state, *rest):
        saved_at.append(state["step"])
        real_save(path, model, ema, optimizer, state, *rest)

    monkeypatch.setattr(d, "save_checkpoint", save_checkpoint)
    # 2 epochs of 4 steps, losses flushed every 3 steps and at the end of each epoch (steps 3, 4, 7, 8).
    # With --ckpt-minutes 1e-9 the time has always passed, so every flush checkpoints (checkpoints do
    # not touch the trajectory, so this run is also the uninterrupted reference)
    full = d.main(flags + ["--out-dir", str(tmp_path / "full"), "--ckpt-minutes", "1e-9"])[0]
    assert saved_at == [3, 4, 7, 8]
    real_flow_loss, calls = d.flow_loss, []

    def flow_loss_with_ctrl_c(*args, **kwargs):  # a real SIGINT during the 6th step (mid-epoch, between two flushes)
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return real_flow_loss(*args, **kwargs)

    monkeypatch.setattr(d, "flow_loss", flow_loss_with_ctrl_c)
    capsys.readouterr()
    saved_at.clear()
    out = str(tmp_path / "part")
    assert d.cli(flags + ["--out-dir", out, "--resume"]) == 130
    captured = capsys.readouterr()
    assert saved_at == [6]  # 10 minutes have not passed and --ckpt-every 4 > 2 epochs: only Ctrl-C's checkpoint
    assert "--resume: no checkpoint yet for 1 of the 1 runs; everything starts from scratch" in captured.out
    assert captured.err.endswith(f"\ninterrupted (SIGINT) at step 6/8; checkpoint {out}/skipson_alpha0.5_seed0/ckpt.pt saved: "
                                 f"rerun the same command with --resume to continue\n")  # after the progress bars
    assert "Traceback" not in captured.err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works normally again
    saved = torch.load(os.path.join(out, "skipson_alpha0.5_seed0", "ckpt.pt"), weights_only=True)
    assert saved["state"]["step"] == 6 and saved["state"]["losses"] == full["losses"][:6]  # pending losses were flushed
    monkeypatch.setattr(d, "flow_loss", real_flow_loss)
    resumed = d.main(flags + ["--out-dir", out, "--resume"])[0]
    assert resumed["losses"] == full["losses"]  # bit for bit
    assert (resumed["fd"], resumed["knn"], resumed["linear_probe"]) == (full["fd"], full["knn"], full["linear_probe"])


def test_main_writes_table_json_features_samples_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    results = d.main(TINY[:-5] + ["--plots", "--eval-every", "1", "--epochs", "2", "--skips", "off,on", "--alpha-min", "1.0",
                                  "--train-limit", "128", "--feature-t", "0.1,0.2", "--out-dir", str(out), "--probe", "authors",
                                  "--json", str(tmp_path / "r.json"), "--device", "cpu"])
    text = capsys.readouterr().out
    assert "FD-smallcnn" in text and "k-NN@20" in text and "real vs real" in text and len(results) == 2
    assert "centred rank" in text and "train visits" in text and "linear probe: the authors'" in text
    summary = json.loads((tmp_path / "r.json").read_text())
    run = summary["runs"][1]
    for key in ("fd", "knn", "linear_probe", "effective_rank", "effective_rank_centered", "final_loss", "seconds", "config"):
        assert key in run, key
    assert all("effective_rank_centered" in e and "effective_rank" in e for e in run["evals"])
    # the headline numbers are those of the first --feature-t, recomputed here from its features file
    with np.load(out / "skipson_alpha1_seed0" / "features.npz") as f:
        train_f, test_f = torch.from_numpy(f["train_features"]), torch.from_numpy(f["test_features"])
        train_y, test_y = torch.from_numpy(f["train_labels"]), torch.from_numpy(f["test_labels"])
        assert float(f["noise_level"]) == 0.1 == run["feature_t"]
    assert run["linear_probe"] == d.linear_probe(train_f, train_y, test_f, test_y, seed=0, num_classes=10, **d.AUTHORS_PROBE)
    assert run["effective_rank"] == d.effective_rank(train_f)
    assert run["effective_rank_centered"] == d.effective_rank(train_f, center=True) != run["effective_rank"]
    assert run["probe"].startswith("the authors'") and d.probe_settings(d.parse_config([])) == {"epochs": 20, "lr": 3e-3}
    assert run["skips"] is True and run["alpha_min"] == 1.0 and set(run["knn"]) == {"10", "20", "100"}
    assert run["config"]["skips"] == "on" and summary["config"]["skips"] == "off,on"
    assert [e["epoch"] for e in run["evals"]] == [0, 1, 2] and run["evals"][-1]["fd"] == run["fd"]
    assert [level["t"] for level in run["by_noise_level"]] == [0.1, 0.2]
    assert all("effective_rank_centered" in level and level["train_visits"] > 0.05 for level in run["by_noise_level"])
    assert summary["fd_reference"]["noise_vs_real"] > summary["fd_reference"]["real_vs_real"]
    for name in ("curves.png", "samples.png", "results.json", "config.json", "fd_reference_shapes_8px.pt"):
        assert (out / name).exists(), name
    for folder in ("skipsoff_alpha1_seed0", "skipson_alpha1_seed0"):
        for name in ("features.npz", "features_t0.2.npz", "samples.png", "ckpt.pt"):
            assert (out / folder / name).exists(), (folder, name)
    arrays, metadata = probe.read_features_file(str(out / "skipson_alpha1_seed0" / "features.npz"))  # probe.py reads it
    assert arrays["train_features"].shape[0] == 128


def test_benchmark_reports_throughput(capsys):
    result = d.main(TINY + ["--benchmark"])
    out = capsys.readouterr().out
    assert result["img_per_s"] > 0 and "ms/step (median of 20 steps" in out
    assert len(result["step_ms"]) == 20 and result["ms_per_step"] == statistics.median(result["step_ms"])


def test_a_failing_compile_falls_back_to_eager_once_and_trains_the_same(tmp_path, monkeypatch, capsys):
    eager = run_training(tmp_path, "eager", "--epochs", "1")
    compiled_calls = []

    def broken_compile(model, **kwargs):  # torch.compile fails lazily: at the first call, not here
        def call(*args):
            compiled_calls.append(1)
            raise RuntimeError("no compiler here")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    capsys.readouterr()
    fallback = run_training(tmp_path, "fallback", "--epochs", "1", "--compile")
    assert compiled_calls == [1] and capsys.readouterr().out.count("torch.compile failed (RuntimeError: no compiler here)") == 1
    assert fallback["losses"] == eager["losses"] and len(eager["losses"]) == 8  # 256 images, batch 32
