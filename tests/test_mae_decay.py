"""Tests for mae_decay.py: each checks a property against an independent reference (the authors'
formula, a hand computation, a brute-force loop, an uninterrupted run)."""
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import mae_decay as m  # noqa: E402

TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "4", "--num-heads", "2",
        "--decoder-dim", "32", "--decoder-depth", "2", "--decoder-heads", "2", "--batch-size", "32",
        "--base-lr", "2e-3", "--warmup-epochs", "0.5", "--probe-epochs", "3", "--eval-every", "0",
        "--no-plots", "--device", "cpu", "--log-every", "1"]


def tiny_cfg(*extra):
    return m.parse_config(TINY + list(extra))


def tiny_data(n_train=256, n_test=64, size=16):
    parts = {"train": m.make_shapes(n_train, size, seed=0), "test": m.make_shapes(n_test, size, seed=1),
             "classes": m.SHAPE_NAMES}
    return m.to_device(parts, torch.device("cpu"))


# --------------------------------------------------------------------------- decay schedule

@pytest.mark.parametrize("depth,alpha_min", [(1, 0.5), (6, 0.4), (12, 0.6), (28, 0.8), (12, 1.0)])
def test_decay_schedule_matches_authors_formula(depth, alpha_min):
    alphas = m.decay_schedule(depth, alpha_min)
    reference = 1 - np.linspace(0, 1, 2 * depth) * (1 - alpha_min)  # the authors' code
    assert len(alphas) == 2 * depth
    assert alphas[0] == 1.0 and alphas[-1] == alpha_min  # exact ends
    np.testing.assert_allclose(alphas, reference, rtol=0, atol=1e-15)
    assert all(a >= b for a, b in zip(alphas, alphas[1:]))


def test_alpha_eff_solver_round_trips_and_matches_spec_table():
    for depth in (4, 6, 8, 12, 24, 28):
        for target in (1e-2, 3.6e-3, 1e-3):
            alpha_min = m.alpha_min_for(target, depth)
            assert math.prod(m.decay_schedule(depth, alpha_min)) == pytest.approx(target, rel=1e-9)
    # spec section 1 (computed): alpha_min for alpha_eff = 1e-2 / 1e-3
    for depth, (a2, a3) in {4: (0.24, 0.08), 6: (0.41, 0.23), 8: (0.53, 0.36), 12: (0.66, 0.53), 24: (0.82, 0.74)}.items():
        assert m.alpha_min_for(1e-2, depth) == pytest.approx(a2, abs=0.006)
        assert m.alpha_min_for(1e-3, depth) == pytest.approx(a3, abs=0.006)
    # the paper's reported best settings: ViT-B 0.6 -> 3.6e-3, SiT-XL/2 (depth 28) 0.8 -> 2.4e-3
    assert math.prod(m.decay_schedule(12, 0.6)) == pytest.approx(3.6e-3, rel=0.02)
    assert math.prod(m.decay_schedule(28, 0.8)) == pytest.approx(2.4e-3, rel=0.02)


def test_alpha_eff_flag_sets_alpha_min():
    cfg = m.parse_config(["--alpha-eff", "1,1e-2", "--depth", "6"])
    alphas = m.alpha_settings(cfg)
    assert alphas[0] == pytest.approx(1.0, abs=1e-12) and alphas[1] == pytest.approx(0.4129, abs=1e-3)


# --------------------------------------------------------------------------- model

def test_encoder_at_init_is_the_alpha_scaled_identity():
    torch.manual_seed(0)
    model = m.MaskedAutoencoder(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, decoder_dim=32,
                                decoder_depth=2, decoder_heads=2, alpha_min=0.3)
    x = torch.randn(3, 3, 16, 16)
    tokens = model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_embed[:, 1:]
    x0 = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(3, -1, -1), tokens], dim=1)
    outputs, _, _ = model.encode(x)
    for i, out in enumerate(outputs):
        scale = math.prod(model.alphas[: 2 * (i + 1)])
        torch.testing.assert_close(out, scale * x0, rtol=1e-6, atol=1e-7)
    # and the decoder predicts exactly zero at init, so the norm-pix loss is the target's mean square
    loss, pred, _ = model(x, torch.rand(3, 16))
    assert pred.abs().max() == 0


def test_final_norm_flag():
    assert isinstance(m.MaskedAutoencoder(final_norm=False).norm, torch.nn.Identity)
    assert isinstance(m.MaskedAutoencoder(final_norm=True).norm, torch.nn.LayerNorm)


def test_random_masking_counts_and_ids_restore():
    torch.manual_seed(0)
    B, L, D = 4, 16, 5
    x = torch.randn(B, L, D)
    noise = torch.rand(B, L)
    visible, mask, ids_restore = m.random_masking(x, 0.75, noise)
    keep = int(L * 0.25)
    assert visible.shape == (B, keep, D)
    assert (mask.sum(1) == L - keep).all()
    for b in range(B):
        kept = noise[b].argsort()[:keep]  # brute force: the `keep` smallest noise values are visible
        torch.testing.assert_close(visible[b], x[b, kept])
        assert set(torch.nonzero(mask[b] == 0).flatten().tolist()) == set(kept.tolist())
    # ids_restore inverts the shuffle: shuffled sequence gathered by ids_restore is the original
    shuffled = torch.gather(x, 1, noise.argsort(1)[:, :, None].expand(-1, -1, D))
    torch.testing.assert_close(torch.gather(shuffled, 1, ids_restore[:, :, None].expand(-1, -1, D)), x)
    # unshuffle puts visible tokens back in place and mask tokens elsewhere
    with_cls = torch.cat([torch.zeros(B, 1, D), visible], 1)
    full = m.unshuffle(with_cls, torch.full((1, 1, D), 7.0), ids_restore)
    torch.testing.assert_close(full[:, 1:][mask == 0], x[mask == 0])
    assert (full[:, 1:][mask == 1] == 7.0).all()


def test_patchify_layout_and_inverse():
    imgs = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = m.patchify(imgs, 4)
    assert patches.shape == (2, 4, 48)
    # patch 1 (row 0, col 1), inner position (p=1, q=2), channel 2 -> index (1*4 + 2)*3 + 2
    assert patches[0, 1, (1 * 4 + 2) * 3 + 2] == imgs[0, 2, 1, 4 + 2]
    torch.testing.assert_close(m.unpatchify(patches, 4, 3), imgs)


def test_norm_pix_loss_against_hand_computation():
    torch.manual_seed(0)
    imgs, pred = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 48)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    total, count = 0.0, 0
    for b in range(2):
        for i in range(2):
            for j in range(2):
                if mask[b, i * 2 + j]:
                    patch = imgs[b, :, i * 4:(i + 1) * 4, j * 4:(j + 1) * 4].permute(1, 2, 0).flatten()
                    target = (patch - patch.mean()) / math.sqrt(float(patch.var(unbiased=True)) + 1e-6)
                    total += float(((pred[b, i * 2 + j] - target) ** 2).mean())
                    count += 1
    assert float(m.masked_patch_loss(pred, imgs, mask, 4, norm_pix=True)) == pytest.approx(total / count, rel=1e-5)
    plain = float(m.masked_patch_loss(pred, imgs, mask, 4, norm_pix=False))
    by_hand = float((((pred - m.patchify(imgs, 4)) ** 2).mean(-1) * mask).sum() / mask.sum())
    assert plain == pytest.approx(by_hand, rel=1e-6)


def test_unet_decoder_receives_every_second_encoder_block_deepest_first():
    torch.manual_seed(0)
    model = m.MaskedAutoencoder(img_size=16, patch_size=4, embed_dim=32, depth=6, num_heads=2, decoder_dim=32,
                                decoder_depth=4, decoder_heads=2)
    for skip in model.skips:  # make the merges non-trivial so that the wiring shows in the output
        torch.nn.init.normal_(skip.fc2.weight, std=0.1)
    assert len(model.skips) == 3 and model.skip_sources() == [5, 3, 1]  # blocks 6, 4, 2 (1-indexed)
    received = []
    for skip in model.skips:
        skip.register_forward_hook(lambda mod, inputs, out: received.append(inputs[1]))
    outputs, _, ids_restore = model.encode(torch.randn(2, 3, 16, 16), torch.rand(2, 16))
    model.decode(outputs, ids_restore)
    assert [r is outputs[i] for r, i in zip(received, [5, 3, 1])] == [True, True, True]
    # and nothing else reaches the decoder: changing blocks 1, 3, 5 leaves the prediction unchanged
    changed = [o + 1.0 if i % 2 == 0 else o for i, o in enumerate(outputs)]
    torch.testing.assert_close(model.decode(changed, ids_restore), model.decode(outputs, ids_restore))


def test_zero_init_of_branch_outputs_and_weight_decay_groups():
    model = m.MaskedAutoencoder()
    for block in list(model.blocks) + list(model.decoder_blocks):
        assert block.attn.proj.weight.abs().sum() == 0 and block.mlp.fc2.weight.abs().sum() == 0
        assert block.attn.qkv.weight.abs().sum() > 0
    assert all(s.fc2.weight.abs().sum() == 0 for s in model.skips)
    assert model.decoder_pred.weight.abs().sum() == 0
    optimizer = m.make_optimizer(model, m.Config(), torch.device("cpu"))
    no_decay = {id(p) for p in optimizer.param_groups[1]["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in no_decay) == (param.ndim <= 1 or name.endswith("token")), name


def test_lr_schedule():
    peak, total, warmup = 1e-3, 100, 10
    assert m.get_lr(0, total, warmup, peak, 0.0) == 0.0
    assert m.get_lr(5, total, warmup, peak, 0.0) == pytest.approx(peak / 2)
    assert m.get_lr(10, total, warmup, peak, 0.0) == pytest.approx(peak)
    assert m.get_lr(55, total, warmup, peak, 1e-5) == pytest.approx(1e-5 + (peak - 1e-5) / 2)
    assert m.get_lr(100, total, warmup, peak, 1e-5) == pytest.approx(1e-5)


def test_flop_count_matches_a_direct_count():
    cfg = tiny_cfg("--decoder", "mae")
    model = m.build_model(cfg, 1.0, 3)
    # direct count: every Linear applied to its number of tokens, plus attention
    L = 16
    T_enc, T_dec = 1 + int(L * 0.25), 1 + L
    linear_macs = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks") and p.ndim == 2) * T_enc
    linear_macs += sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder_blocks") and p.ndim == 2) * T_dec
    linear_macs += model.decoder_embed.weight.numel() * T_enc + model.decoder_pred.weight.numel() * T_dec
    linear_macs += model.patch_embed.weight.numel() * L
    attention = 4 * T_enc ** 2 * 32 * 4 + 4 * T_dec ** 2 * 32 * 2
    assert m.mae_flops_per_image(cfg) == pytest.approx(3 * (2 * linear_macs + attention), rel=1e-9)


# --------------------------------------------------------------------------- evaluation

@pytest.mark.parametrize("n_test", [1, 7, 250])
def test_knn_matches_brute_force(n_test):
    gen = torch.Generator().manual_seed(n_test)
    train_x, test_x = torch.randn(300, 8, generator=gen), torch.randn(n_test, 8, generator=gen)
    train_y = torch.randint(0, 5, (300,), generator=gen)
    for k, temperature in ((1, 0.07), (20, 0.07), (50, 0.5)):
        expected = []
        for q in test_x:  # brute force: one query at a time, python loop over neighbours
            sims = [float(torch.dot(q / q.norm(), t / t.norm())) for t in train_x]
            order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
            votes = [0.0] * 5
            for i in order:
                votes[int(train_y[i])] += math.exp(sims[i] / temperature)
            expected.append(max(range(5), key=lambda c: votes[c]))
        got = m.knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, chunk=64)
        assert got.tolist() == expected
    several = m.knn_predict(train_x, train_y, test_x, k=[1, 20], chunk=3)
    assert several[20].tolist() == m.knn_predict(train_x, train_y, test_x, k=20).tolist()
    with pytest.raises(ValueError):
        m.knn_predict(train_x, train_y, test_x, k=301)


def test_effective_rank_properties():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 16, generator=gen)
    assert m.effective_rank(z) == pytest.approx(16, rel=0.01)
    for r in (1, 3, 10):  # U V^T with orthonormal columns: r singular values, all equal to 1
        u = torch.linalg.qr(torch.randn(500, r, generator=gen, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(40, r, generator=gen, dtype=torch.float64))[0]
        equal_spectrum = u @ v.T
        assert m.effective_rank(equal_spectrum) == pytest.approx(r, rel=1e-6)
    assert m.effective_rank(123.0 * z) == pytest.approx(m.effective_rank(z), rel=1e-9)


def test_linear_probe_separable_and_shuffled():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 20, generator=gen) * 4
    y = torch.randint(0, 4, (1200,), generator=gen)
    x = centres[y] + torch.randn(1200, 20, generator=gen)
    assert m.linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], epochs=30, lr=1e-2) > 0.99
    # labels unrelated to the features (shuffled within train, fresh for test): chance level
    noise, noise_y = torch.randn(3000, 20, generator=gen), torch.randint(0, 4, (3000,), generator=gen)
    assert abs(m.linear_probe(noise[:1000], noise_y[:1000], noise[1000:], noise_y[1000:], epochs=30, lr=1e-2) - 0.25) < 0.05
    assert m.linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], epochs=5, seed=3) == \
        m.linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], epochs=5, seed=3)


# --------------------------------------------------------------------------- data

def test_shapes_dataset_is_deterministic_and_balanced():
    x1, y1 = m.make_shapes(2000, 16, seed=0)
    x2, y2 = m.make_shapes(2000, 16, seed=0)
    assert x1.dtype == np.uint8 and x1.shape == (2000, 3, 16, 16)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(m.make_shapes(2000, 16, seed=1)[0], x1)
    assert np.bincount(y1, minlength=10).min() > 150
    # the class mean images explain almost none of the pixel variance: the label lives in structure
    xf = x1.astype(np.float64) / 255
    between = np.stack([xf[y1 == c].mean(0) for c in range(10)]).var(0).sum()
    assert between < 0.01 * xf.var(0).sum()


def test_textures_are_deterministic_balanced_and_their_class_is_a_patch_statistic_not_a_pixel_pattern():
    x, y = m.make_textures(2000, 16, seed=0)
    assert x.dtype == np.uint8 and x.shape == (2000, 3, 16, 16) and y.dtype == np.int64 and y.shape == (2000,)
    again = m.make_textures(2000, 16, seed=0)
    assert np.array_equal(again[0], x) and np.array_equal(again[1], y)
    assert not np.array_equal(m.make_textures(2000, 16, seed=1)[0], x)
    assert np.bincount(y, minlength=10).min() > 150 and len(m.TEXTURE_NAMES) == 10
    assert m.make_textures(10, 24, seed=0)[0].shape == (10, 3, 24, 24)  # --img-size sizes the built-in data
    test_x, test_y = m.make_textures(500, 16, seed=1)

    def knn_accuracy(features):
        train_f, test_f = (torch.tensor(features(a)) for a in (x, test_x))
        return (m.knn_predict(train_f, torch.tensor(y), test_f, 20, 0.07, num_classes=10) == torch.tensor(test_y)).float().mean().item()

    def pixels(images):  # centred pixels, as the raw-pixel row sees them
        flat = images.reshape(len(images), -1).astype(np.float32) / 255
        return flat - x.reshape(len(x), -1).astype(np.float32).mean(0) / 255

    def power_spectrum(images):  # a patch statistic: where the energy lies in frequency, phase discarded
        grey = images.astype(np.float32).mean(1)
        return np.log1p(np.abs(np.fft.fft2(grey - grey.mean((1, 2), keepdims=True))) ** 2).reshape(len(images), -1)

    ## chance is 0.1; measured (k-NN@20, this protocol): pixels 0.154, power spectrum 0.886 (2000 train / 500 test)
    assert knn_accuracy(pixels) < 0.25 and knn_accuracy(power_spectrum) > 0.8


def test_glyphs_are_deterministic_balanced_and_their_class_is_a_bag_of_patches_not_a_pixel_pattern():
    x, y = m.make_glyphs(2000, 16, seed=0)
    assert x.dtype == np.uint8 and x.shape == (2000, 3, 16, 16) and y.dtype == np.int64 and y.shape == (2000,)
    again = m.make_glyphs(2000, 16, seed=0)
    assert np.array_equal(again[0], x) and np.array_equal(again[1], y)
    assert not np.array_equal(m.make_glyphs(2000, 16, seed=1)[0], x)
    assert np.bincount(y, minlength=10).min() > 150 and len(m.GLYPH_NAMES) == 10 and len(m.GLYPHS) == 20
    # 20 different glyphs, each with some ink and some background
    ink = [frozenset(i for i, c in enumerate(rows.replace(" ", "")) if c == "#") for rows in m.GLYPHS.values()]
    assert len(set(ink)) == 20 and all(0 < len(g) < 16 for g in ink)
    for size in (24, 18):  # --img-size sizes the built-in data, also when it is not a multiple of the 4-pixel cell
        assert m.make_glyphs(10, size, seed=0)[0].shape == (10, 3, size, size)
    test_x, test_y = m.make_glyphs(500, 16, seed=1)

    def knn_accuracy(features):
        train_f, test_f = (torch.tensor(features(a)) for a in (x, test_x))
        return (m.knn_predict(train_f, torch.tensor(y), test_f, 20, 0.07, num_classes=10) == torch.tensor(test_y)).float().mean().item()

    def pixels(images):  # centred pixels, as the raw-pixel row sees them
        flat = images.reshape(len(images), -1).astype(np.float32) / 255
        return flat - x.reshape(len(x), -1).astype(np.float32).mean(0) / 255

    def cell_average(images):  # a bag-of-patches statistic: the mean 4x4 cell, centred, where each glyph sits forgotten
        cells = m.patchify(torch.tensor(images, dtype=torch.float32) / 255, 4).mean(1)
        return (cells - cells.mean(1, keepdim=True)).numpy()

    ## chance is 0.1; measured (k-NN@20, this protocol): pixels 0.232, cell average 0.860 (2000 train / 500 test);
    ## the probe below: 0.130
    assert knn_accuracy(pixels) < 0.3 and knn_accuracy(cell_average) > 0.7
    # the polarity flip hides the class from anything linear in the pixels: a linear probe on them is near chance
    flat = lambda images: torch.tensor(pixels(images))  # noqa: E731
    assert m.linear_probe(flat(x), torch.tensor(y), flat(test_x), torch.tensor(test_y), num_classes=10) < 0.2


def write_cifar_batch(path, images, labels, label_key=b"labels"):
    with open(path, "wb") as f:  # the official layout: bytes keys, data uint8 (N, 3072), labels a list
        pickle.dump({b"batch_label": b"x", label_key: [int(v) for v in labels],
                     b"data": images.reshape(len(images), 3072)}, f, protocol=2)


def make_cifar_tarball(tmp_path, n=20):
    rng = np.random.default_rng(0)
    folder = tmp_path / "src" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    data = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images, labels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)
        write_cifar_batch(folder / name, images, labels)
        data[name] = (images, labels)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive, data


def test_cifar_download_verified_then_loaded(tmp_path, monkeypatch):
    archive, data = make_cifar_tarball(tmp_path)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    entry = m.CIFAR["cifar10"]
    monkeypatch.setitem(m.CIFAR, "cifar10", (archive.as_uri(), md5) + entry[2:])
    data_dir = tmp_path / "data"
    parts = m.load_dataset("cifar10", str(data_dir))
    assert parts["train"][0].shape == (100, 3, 32, 32) and parts["test"][0].shape == (20, 3, 32, 32)
    assert np.array_equal(parts["train"][0][20:40], data["data_batch_2"][0])
    assert np.array_equal(parts["test"][1], data["test_batch"][1])
    # a second call reads the extracted folder, with no download
    monkeypatch.setitem(m.CIFAR, "cifar10", ("file:///nonexistent", md5) + entry[2:])
    assert np.array_equal(m.load_dataset("cifar10", str(data_dir))["train"][0], parts["train"][0])


def test_cifar_wrong_checksum_is_refused_and_nothing_kept(tmp_path, monkeypatch):
    archive, _ = make_cifar_tarball(tmp_path)
    entry = m.CIFAR["cifar10"]
    monkeypatch.setitem(m.CIFAR, "cifar10", (archive.as_uri(), "0" * 32) + entry[2:])
    with pytest.raises(m.UserError, match="checksum"):
        m.load_dataset("cifar10", str(tmp_path / "data"))
    assert not any((tmp_path / "data").iterdir())  # no partial or unverified file left behind


def test_cifar_offline_gives_a_clear_error(tmp_path, monkeypatch):
    entry = m.CIFAR["cifar10"]
    monkeypatch.setitem(m.CIFAR, "cifar10", ((tmp_path / "missing.tar.gz").as_uri(), entry[1]) + entry[2:])
    with pytest.raises(m.UserError, match="could not download"):
        m.load_dataset("cifar10", str(tmp_path / "data"))
    with pytest.raises(m.UserError, match="not found"):
        m.load_dataset("cifar10", str(tmp_path / "data"), allow_download=False)


def test_cifar_corrupt_batch_and_malicious_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_cifar_batch(folder / name, rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), range(4))
    assert m.load_dataset("cifar10", str(tmp_path))["train"][0].shape == (20, 3, 32, 32)
    raw = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(m.UserError, match="data_batch_3 is not a valid CIFAR"):
        m.load_dataset("cifar10", str(tmp_path))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    (folder / "data_batch_3").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(m.UserError, match="refusing to load"):
        m.load_dataset("cifar10", str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("train", "test"):
        write_cifar_batch(folder / name, rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8), [99, 0, 5, 7, 1, 2],
                          label_key=b"fine_labels")
    parts = m.load_dataset("cifar100", str(tmp_path))
    assert parts["train"][1].tolist() == [99, 0, 5, 7, 1, 2] and len(parts["classes"]) == 100


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_idx_folder(folder, n_train=12, n_test=5):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test)}
    for name, array in arrays.items():
        write_idx(folder / name, array)
    return arrays


def test_idx_loader_reads_real_format_and_rejects_corrupt_files(tmp_path):
    arrays = make_idx_folder(tmp_path / "fashion-mnist")
    parts = m.load_dataset("fashion-mnist", str(tmp_path), allow_download=False)
    assert parts["train"][0].shape == (12, 1, 28, 28) and parts["train"][0].dtype == np.uint8
    assert np.array_equal(parts["train"][0][:, 0], arrays["train-images-idx3-ubyte.gz"])
    assert np.array_equal(parts["test"][1], arrays["t10k-labels-idx1-ubyte.gz"])
    bad = tmp_path / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    with gzip.open(bad, "rb") as f:
        raw = f.read()
    with gzip.open(bad, "wb") as f:
        f.write(raw[:-10])  # truncated body
    with pytest.raises(m.UserError, match="truncated"):
        m.load_dataset("fashion-mnist", str(tmp_path), allow_download=False)
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(m.UserError, match="not a readable .gz"):
        m.load_dataset("fashion-mnist", str(tmp_path), allow_download=False)
    write_idx(bad, np.zeros((5, 28), dtype=np.uint8))  # wrong number of dimensions
    with pytest.raises(m.UserError, match="not an IDX file of 3 dimensions"):
        m.load_dataset("fashion-mnist", str(tmp_path), allow_download=False)


def test_idx_mismatched_files_and_download_checksum(tmp_path, monkeypatch):
    make_idx_folder(tmp_path / "mnist", n_train=12)
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", np.zeros(11))
    with pytest.raises(m.UserError, match="do not belong together"):
        m.load_dataset("mnist", str(tmp_path), allow_download=False)
    # download path: files served from a local folder, one with a wrong checksum
    source = tmp_path / "server"
    make_idx_folder(source)
    files = {name: hashlib.md5((source / name).read_bytes()).hexdigest() for name in m.IDX["mnist"][1]}
    monkeypatch.setitem(m.IDX, "mnist", (source.as_uri() + "/", files))
    monkeypatch.setitem(m.SYSTEM_DIRS, "mnist", [])
    assert m.load_dataset("mnist", str(tmp_path / "dl"))["train"][0].shape == (12, 1, 28, 28)
    files = dict(files, **{"t10k-labels-idx1-ubyte.gz": "f" * 32})
    monkeypatch.setitem(m.IDX, "mnist", (source.as_uri() + "/", files))
    with pytest.raises(m.UserError, match="checksum"):
        m.load_dataset("mnist", str(tmp_path / "dl2"))


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debian_package(tmp_path):
    parts = m.load_dataset("fashion-mnist", str(tmp_path), allow_download=False)
    assert parts["train"][0].shape == (60000, 1, 28, 28) and parts["test"][0].shape == (10000, 1, 28, 28)
    assert np.bincount(parts["train"][1]).tolist() == [6000] * 10


def test_image_folder_resized_once_and_cached(tmp_path):
    import matplotlib.image
    rng = np.random.default_rng(0)
    root, cache_dir = tmp_path / "images", tmp_path / "data"
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                matplotlib.image.imsave(root / split / cls / f"{i}.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    parts = m.load_dataset(f"folder:{root}", str(cache_dir), size=16)
    assert parts["train"][0].shape == (6, 3, 16, 16) and parts["test"][0].shape == (4, 3, 16, 16)
    assert parts["train"][0].dtype == np.uint8 and parts["train"][0].std() > 30  # real content, not a constant
    assert parts["train"][1].tolist() == [0, 0, 0, 1, 1, 1]
    caches = list((cache_dir / "image_folder_cache").glob("*_16px.pt"))
    assert len(caches) == 1 and not list(root.rglob("*.pt"))  # cached under the data dir, never in the dataset
    again = m.load_dataset(f"folder:{root}", str(cache_dir), size=16)
    assert np.array_equal(again["train"][0], parts["train"][0])
    (root / "train" / "cat" / "0.png").unlink()  # the folder changed: the stale cache is not used
    assert m.load_dataset(f"folder:{root}", str(cache_dir), size=16)["train"][0].shape == (5, 3, 16, 16)
    with pytest.raises(m.UserError, match="train/<class>"):
        m.load_dataset(f"folder:{tmp_path / 'nothing'}", str(cache_dir), size=16)


def test_augment_is_seeded_and_identity_crop_is_exact():
    data = tiny_data(64, 8)
    a = augment(data["train_x"][:8], 16, torch.Generator().manual_seed(1), 0.2, data["mean"], data["std"])
    b = augment(data["train_x"][:8], 16, torch.Generator().manual_seed(1), 0.2, data["mean"], data["std"])
    assert a.shape == (8, 3, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, augment(data["train_x"][:8], 16, torch.Generator().manual_seed(2), 0.2,
                                        data["mean"], data["std"]))
    # bilinear crops interpolate between pixels: values stay inside the normalised pixel range
    low, high = (0 - data["mean"]) / data["std"], (1 - data["mean"]) / data["std"]
    assert (a >= low - 1e-5).all() and (a <= high + 1e-5).all()


# --------------------------------------------------------------------------- training

def augment(images, size, gen, crop_min, mean, std):
    """The training step's augmentation of one batch: crops drawn from gen, applied on the device."""
    return m.crop_and_flip(images, m.crop_boxes(len(images), gen, crop_min), size, mean, std)


def run_training(tmp_path, name, *extra):
    cfg = tiny_cfg("--out-dir", str(tmp_path / name), *extra)
    data = tiny_data()
    if cfg.train_limit:
        data["train_x"], data["train_y"] = data["train_x"][:cfg.train_limit], data["train_y"][:cfg.train_limit]
    return m.train_run(cfg, data, m.alpha_settings(cfg)[-1], 0, str(tmp_path / name / "run"), torch.device("cpu"))


def test_loss_falls_on_a_tiny_run(tmp_path):
    # overfit one batch (32 images, one step per epoch): the masked-patch loss must drop well below
    # its starting value, the variance of the normalised targets
    result = run_training(tmp_path, "fall", "--epochs", "60", "--alpha-min", "0.5", "--base-lr", "2e-2",
                          "--train-limit", "32", "--warmup-epochs", "5", "--probe-epochs", "1")
    first, last = np.mean(result["losses"][:5]), np.mean(result["losses"][-10:])
    assert last < 0.88 * first, result["losses"]  # observed ~0.81; a zero-predicting model stays at 1.0
    assert set(result["knn"]) == {10, 20} and 0 <= result["linear_probe"] <= 1
    assert 1 <= result["effective_rank"] <= 32
    with np.load(tmp_path / "fall" / "run" / "features.npz") as f:
        assert f["train_features"].shape == (32, 32) and f["test_labels"].shape == (64,)
        assert "mean over all tokens" in str(f["feature"])


def test_resume_continues_exactly(tmp_path):
    full = run_training(tmp_path, "full", "--epochs", "2")
    part = run_training(tmp_path, "part", "--epochs", "2", "--max-steps", "11")
    assert part["steps"] == 11 and part["losses"] == full["losses"][:11]
    resumed = run_training(tmp_path, "part", "--epochs", "2", "--resume")
    assert resumed["losses"] == full["losses"]  # bit-identical continuation
    assert resumed["linear_probe"] == full["linear_probe"] and resumed["knn"] == full["knn"]
    with pytest.raises(m.UserError, match="already exists"):
        run_training(tmp_path, "part", "--epochs", "2")
    with pytest.raises(m.UserError, match="other settings"):
        run_training(tmp_path, "part", "--epochs", "3", "--resume")


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    with pytest.raises(m.UserError, match="loss became"):
        run_training(tmp_path, "nan", "--epochs", "1", "--base-lr", "1e30")


# --------------------------------------------------------------------------- command line

@pytest.mark.parametrize("flags,message", [
    (["--img-size", "30"], "multiple of --patch-size"),
    (["--alpha-min", "1.0,abc"], "comma-separated list"),
    (["--alpha-min", "1.5"], "must be in (0, 1]"),
    (["--alpha-eff", "0"], "must be in (0, 1]"),
    (["--decoder", "unet", "--depth", "8", "--decoder-depth", "2"], "at least 4"),
    (["--mask-ratio", "1.0"], "--mask-ratio"),
    (["--feature", "max"], "--feature"),
    (["--embed-dim", "190", "--num-heads", "5"], "multiples of 4"),
    (["--device", "tpu"], "--device"),
    (["--seeds", "0.5"], "--seeds"),
])
def test_bad_flags_give_one_clear_sentence(flags, message):
    with pytest.raises(m.UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        m.parse_config(flags)


def test_command_line_errors_have_no_traceback(tmp_path):
    for args, message in ((["--img-size", "30"], "multiple of --patch-size"),
                          (["--dataset", "cifar10", "--data-dir", str(tmp_path), "--no-download"], "not found")):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "mae_decay.py")] + args,
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.startswith("error: ") and message in proc.stderr and proc.stderr.count("\n") == 1


def test_main_writes_table_json_plots_and_features(tmp_path, capsys):
    results = m.main(TINY[:-5] + ["--plots", "--eval-every", "1", "--epochs", "2", "--alpha-min", "1.0,0.5",
                                  "--train-limit", "128", "--out-dir", str(tmp_path / "out"), "--eval-train", "0",
                                  "--eval-test", "0", "--json", str(tmp_path / "r.json"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "alpha_min=0.5 minus alpha_min=1, k-NN@20" in out and "k-NN@20" in out and len(results) == 4
    assert [r["setting"] for r in results] == ["alpha_min=1", "alpha_min=0.5", "untrained encoder", "raw pixels"]
    assert "alpha_min=0.5 minus untrained encoder, k-NN@20" in out
    # the control row IS the model before its first step: the epoch-0 evaluation on the same images
    # (--eval-train/--eval-test 0 = all) gives the same k-NN and probe, for either arm
    untrained = results[2]
    for run in results[:2]:
        assert run["evals"][0]["knn"] == untrained["knn"][20]
        assert run["evals"][0]["linear_probe"] == pytest.approx(untrained["linear_probe"], abs=1e-9)
    import json
    summary = json.loads((tmp_path / "r.json").read_text())
    run = summary["runs"][1]
    assert run["alpha_min"] == 0.5 and set(run["knn"]) == {"10", "20", "100"}
    assert summary["config"]["alpha_min"] == "1.0,0.5"
    assert [e["epoch"] for e in run["evals"]] == [0, 1, 2]
    for name in ("curves.png", "recon.png", "pca.png", "feature_norms.png", "results.json", "config.json"):
        assert (tmp_path / "out" / name).exists(), name


def test_fixed_subset_is_stable_and_spans_a_class_sorted_dataset():
    a, b = m.fixed_subset(10000, 1000, "cpu"), m.fixed_subset(10000, 1000, "cpu")
    assert torch.equal(a, b) and len(set(a.tolist())) == 1000 and a.max() < 10000
    labels_sorted_by_class = torch.arange(10000) // 1000  # as an image folder is stored
    assert torch.bincount(labels_sorted_by_class[a], minlength=10).min() > 60
    assert len(m.fixed_subset(50, 1000, "cpu")) == 50


def test_image_resize_keeps_content_and_handles_grey_and_alpha(tmp_path):
    import matplotlib.image
    ramp = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (20, 1))  # (20, 40) grey, brightening to the right
    matplotlib.image.imsave(tmp_path / "grey.png", ramp, cmap="gray", vmin=0, vmax=255)
    out = m.load_image_resized(tmp_path / "grey.png", 10)  # 20x40 -> 10x20 -> centre crop 10x10
    assert out.shape == (3, 10, 10) and out.dtype == np.uint8
    assert (out[0] == out[1]).all() and (out[1] == out[2]).all()  # grey stays grey, alpha dropped
    row = out[0, 5].astype(int)
    assert (np.diff(row) > 0).all() and abs(row.mean() - 127.5) < 8  # the centre of the ramp, increasing


# --------------------------------------------------------------------------- the method, pinned on non-trivial weights

def randomise(module, seed=1, scale=0.2):
    """Random values in EVERY parameter (zero-initialised branch outputs included): at the real
    initialisation each branch outputs zero, and a wrong residual rule would go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(scale * torch.randn(param.shape, generator=gen) + (1.0 if param.ndim == 1 and param.shape == () else 0))
    return module


def reference_attention(x, qkv, proj, heads):
    """Multi-head self-attention written out from the definition, independent of the model's code."""
    B, T, D = x.shape
    q, k, v = (x @ qkv.weight.T + qkv.bias).split(D, dim=-1)
    split = lambda t: t.reshape(B, T, heads, D // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(B, T, D) @ proj.weight.T + proj.bias


def test_block_applies_the_papers_rule_per_sub_layer_on_random_weights():
    block = randomise(m.Block(16, 2, 4.0, alpha_attn=0.9, alpha_mlp=0.6))
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    ln = lambda t, norm: torch.nn.functional.layer_norm(t, (16,), norm.weight, norm.bias, eps=1e-6)  # noqa: E731
    ## the paper's equation, one alpha per residual sub-layer:
    ##   h = a_attn * x + attn(norm1(x)),   out = a_mlp * h + mlp(norm2(h))
    h = 0.9 * x + reference_attention(ln(x, block.norm1), block.attn.qkv, block.attn.proj, 2)
    mlp = block.mlp
    out = 0.6 * h + (torch.nn.functional.gelu(ln(h, block.norm2) @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias)
    ## float32 on values of order 1 through two sub-layers: ~1e-6 rounding; a wrong rule such as
    ## alpha * (x + f(x)) moves the output by (1 - alpha) * |f| ~ 0.1, five orders more.
    torch.testing.assert_close(block(x), out, rtol=1e-5, atol=1e-5)


def test_every_encoder_block_carries_the_authors_alphas():
    depth, alpha_min = 6, 0.7
    model = m.MaskedAutoencoder(img_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=2, decoder_dim=32,
                                decoder_depth=3, decoder_heads=2, alpha_min=alpha_min)
    reference = 1 - np.linspace(0, 1, 2 * depth) * (1 - alpha_min)  # the authors' MAE code, one alpha per sub-layer
    got = [a for block in model.blocks for a in (block.alpha_attn, block.alpha_mlp)]
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-15)
    assert all(b.alpha_attn == 1.0 and b.alpha_mlp == 1.0 for b in model.decoder_blocks)  # decay in the encoder only


def test_features_are_the_mean_of_all_last_block_tokens_without_a_final_norm():
    data = tiny_data(64, 8)
    for flags in ([], ["--feature", "cls"], ["--feature-block", "2"], ["--final-norm"]):
        cfg = tiny_cfg(*flags)
        torch.manual_seed(0)
        model = randomise(m.build_model(cfg, 0.5, 3))
        feats = m.extract_features(model, data["test_x"], cfg, data, torch.device("cpu"))
        ## the encoder run by hand on the whole, unmasked image: cls + every patch token, block by block
        x = (data["test_x"].float() / 255 - data["mean"]) / data["std"]
        h = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(len(x), -1, -1),
                       model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_embed[:, 1:]], dim=1)
        outputs = []
        for block in model.blocks:
            h = block(h)
            outputs.append(h)
        last = model.norm(outputs[-1]) if "--final-norm" in flags else outputs[-1]  # vanilla MAE: after its final LayerNorm
        tokens = outputs[1] if "--feature-block" in flags else last  # --feature-block 2 (1-indexed)
        expected = tokens[:, 0] if "cls" in flags else tokens.mean(1)  # mean over ALL tokens, cls included
        torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model.norm(outputs[-1]).mean(1), outputs[-1].mean(1), atol=1e-3)  # the norm matters


def test_augmentation_really_crops_and_flips():
    ## An image whose pixel value is its column index: a crop of width w shows ~w of the columns,
    ## a flip reverses their order. With crop areas in [0.2, 1] and aspect ratios in [3/4, 4/3]
    ## most crops are narrower than the image.
    size, n = 32, 400
    columns = torch.arange(size).repeat(size, 1).float() / (size - 1)  # (H, W), 0..1 left to right
    images = (columns * 255).round().byte()[None, None].expand(n, 3, size, size)
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    out = augment(images, size, torch.Generator().manual_seed(0), 0.2, zero, one)[:, 0]  # (n, H, W)
    width = out[:, size // 2].max(1).values - out[:, size // 2].min(1).values  # value span of a middle row
    assert (width < 0.9).float().mean() > 0.5 and width.min() < 0.6  # crops, not the whole image
    slope = out[:, size // 2, -1] - out[:, size // 2, 0]
    flipped = (slope < 0).float().mean()
    assert 0.4 < flipped < 0.6  # p = 0.5 flips: 400 draws give a standard error of 0.025
    full = augment(images[:4], size, torch.Generator().manual_seed(0), 1.0, zero, one)[:, 0]
    assert ((full[:, size // 2].max(1).values - full[:, size // 2].min(1).values) > 0.7).all()  # area >= 1: near-full view


# --------------------------------------------------------------------------- robustness of the command line

def tree(root):
    """Every file under root with its size and modification time: what a failed command must not change."""
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(root) for f in files}


BAD_FLAGS = [  # (flags, a fragment of the one error sentence)
    (["--embed-dim", "0"], "multiples of 4"), (["--embed-dim", "-12"], "multiples of 4"),
    (["--num-heads", "0"], "at least 1"), (["--decoder-heads", "0"], "at least 1"),
    (["--mlp-ratio", "-1"], "--mlp-ratio"), (["--decoder-dim", "0"], "multiples of 4"),
    (["--beta2", "1.5"], "--beta2"), (["--probe-epochs", "0"], "--probe-epochs"), (["--probe-epochs", "-1"], "--probe-epochs"),
    (["--weight-decay", "-1"], "cannot be negative"), (["--min-lr", "-1"], "cannot be negative"),
    (["--base-lr", "nan"], "finite"), (["--ckpt-minutes", "0"], "--ckpt-minutes"), (["--probe", "best"], "--probe"), (["--compile-mode", "fast"], "--compile-mode"),
    (["--out-dir", ""], "--out-dir is empty"), (["--out-dir", "afile/out"], "is a file"),
    (["--json", "afile/r.json"], "is a file"), (["--json", "adir"], "is a directory"),
    (["--dataset", "cifar10", "--data-dir", "afile/data"], "is a file"),
    (["--dataset", "glyph"], "unknown dataset 'glyph': use glyphs, shapes, textures, cifar10"),
    (["--knn-k", "100000", "--train-limit", "64"], "--knn-k 100000"),
    (["--epochs", "abc"], "invalid int value: 'abc'"), (["--no-such-flag"], "unrecognized arguments"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_input_exits_2_with_one_sentence_and_changes_nothing(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a regular file")
    (tmp_path / "adir").mkdir()
    before = tree(tmp_path)
    code = m.cli(["--out-dir", "out", "--device", "cpu"] + flags)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert tree(tmp_path) == before  # nothing created, nothing changed


def test_existing_checkpoint_is_refused_before_config_json_is_touched(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "alpha1_seed0").mkdir(parents=True)
    (tmp_path / "out" / "alpha1_seed0" / "ckpt.pt").write_bytes(b"x")
    (tmp_path / "out" / "config.json").write_text(json.dumps({"script": "mae_decay.py", **dataclasses.asdict(
        tiny_cfg("--out-dir", "out", "--alpha-min", "1.0", "--train-limit", "64"))}))
    before = tree(tmp_path)
    assert m.cli(TINY + ["--out-dir", "out", "--alpha-min", "1.0", "--train-limit", "64"]) == 2
    assert "already exists: pass --resume" in capsys.readouterr().err and tree(tmp_path) == before


def test_help_shows_the_real_defaults():
    for script in ("mae_decay.py",):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "default: None" not in proc.stdout
        assert "(default: 4)" in proc.stdout and "(default: 'unet')" in proc.stdout  # --epochs, --decoder


def test_first_ctrl_c_only_raises_a_flag_and_the_second_interrupts():
    import signal
    flag = m.catch_ctrl_c()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag["stop"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        m.release_ctrl_c()


def test_ctrl_c_during_training_checkpoints_the_step_and_resume_matches(tmp_path, monkeypatch):
    full = run_training(tmp_path, "full", "--epochs", "2")
    flag, get_lr = {"stop": False, "signal": "SIGINT"}, m.get_lr

    def interrupting_get_lr(step, *args):  # a Ctrl-C arriving during step 5 (mid-epoch)
        flag["stop"] |= step == 5
        return get_lr(step, *args)
    monkeypatch.setattr(m, "catch_ctrl_c", lambda: flag)
    monkeypatch.setattr(m, "get_lr", interrupting_get_lr)
    with pytest.raises(m.Interrupted, match=r"interrupted \(SIGINT\) at step 6/16"):
        run_training(tmp_path, "part", "--epochs", "2")
    monkeypatch.setattr(m, "get_lr", get_lr)
    flag["stop"] = False
    resumed = run_training(tmp_path, "part", "--epochs", "2", "--resume")
    assert resumed["losses"] == full["losses"] and resumed["knn"] == full["knn"]  # bit-identical continuation


def test_vanilla_arm_is_the_standard_mae_in_the_same_table(tmp_path, capsys):
    results = m.main(TINY + ["--vanilla", "--alpha-min", "1.0,0.5", "--epochs", "1", "--train-limit", "64",
                             "--no-pixels", "--out-dir", str(tmp_path / "out")])
    assert [r["setting"] for r in results] == ["vanilla MAE", "alpha_min=1", "alpha_min=0.5", "untrained encoder"]
    assert "final LayerNorm" in results[0]["feature"] and "final LayerNorm" not in results[1]["feature"]
    assert os.path.exists(tmp_path / "out" / "vanilla_seed0" / "features.npz")
    out = capsys.readouterr().out
    assert "vanilla MAE" in out and "alpha_min=0.5 minus alpha_min=1" in out
    # the control row has no final LayerNorm, so the vanilla arm is not compared with it
    assert "alpha_min=0.5 minus untrained encoder" in out and "vanilla MAE minus untrained encoder" not in out


def test_a_failed_save_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "ckpt.pt"
    m.atomic_save({"step": 1}, str(path))
    with pytest.raises(Exception):  # a lambda cannot be pickled: torch.save fails half-way
        m.atomic_save({"step": 2, "bad": lambda: 0}, str(path))
    assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["ckpt.pt"]


def test_raw_pixel_row_is_skipped_when_it_would_not_fit(tmp_path, capsys, monkeypatch):
    ## 64 train + 2000 test images of 3 x 16 x 16 float32 = 6.1 MiB: over a 1 MiB limit, so skipped
    monkeypatch.setattr(m, "PIXEL_ROW_MAX_GIB", 1 / 1024)
    results = m.main(TINY + ["--train-limit", "64", "--epochs", "1", "--alpha-min", "1.0", "--out-dir", str(tmp_path / "o")])
    assert [r["setting"] for r in results] == ["alpha_min=1", "untrained encoder"]
    assert "no raw-pixel row: the flattened pixels would take 0.0 GiB" in capsys.readouterr().out
    monkeypatch.setattr(m, "PIXEL_ROW_MAX_GIB", 8)
    results = m.main(TINY + ["--train-limit", "64", "--epochs", "1", "--alpha-min", "1.0", "--out-dir", str(tmp_path / "p")])
    assert [r["setting"] for r in results] == ["alpha_min=1", "untrained encoder", "raw pixels"]


# --------------------------------------------------------------------------- the lean GPU step, the same numbers

def test_step_draws_are_the_same_numbers_as_drawing_crops_then_noise():
    # one packed copy (pinned on CUDA) holds exactly what two separate draws from the same generator give
    for rank, world_size in ((0, 1), (1, 2)):
        theta, noise = m.step_draws(m.step_generator(3, 7), 8, 5, 0.3, rank, world_size, torch.device("cpu"))
        gen = m.step_generator(3, 7)
        assert torch.equal(theta, m.shard(m.crop_boxes(8, gen, 0.3), rank, world_size))
        assert torch.equal(noise, m.shard(torch.rand(8, 5, generator=gen), rank, world_size))
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    theta, _ = m.step_draws(m.step_generator(0, 0), 8, 5, 0.3, 0, 1, torch.device("cpu"))
    assert torch.equal(m.crop_and_flip(images, theta, 16, zero, one),
                       augment(images, 16, m.step_generator(0, 0), 0.3, zero, one))


def test_attention_unbind_split_and_skipped_unit_alpha_change_no_number():
    """The q/k/v split by views (.unbind) against the permute it replaced, forward and gradients, bit
    for bit; and a block with alpha = 1 (the multiply skipped) against 1.0 * x + f."""
    torch.manual_seed(0)
    block = m.Block(32, 4, 4.0)
    randomise(block)
    x = torch.randn(6, 9, 32, requires_grad=True)

    def permute_attention(attn, h):
        B, T, D = h.shape
        q, k, v = attn.qkv(h).view(B, T, 3, attn.heads, D // attn.heads).permute(2, 0, 3, 1, 4)
        return attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))

    def reference(h):  # the rule written with the multiply and the old split
        h = 1.0 * h + permute_attention(block.attn, block.norm1(h))
        return 1.0 * h + block.mlp(block.norm2(h))
    outputs, grads = [], []
    for f in (block, reference):
        block.zero_grad()
        x.grad = None
        out = f(x)
        (out ** 2).sum().backward()
        outputs.append(out.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in block.parameters()])
    assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_block_zero_init_makes_it_the_scaled_identity():
    block = m.Block(16, 2, 4.0, alpha_attn=0.9, alpha_mlp=0.8)
    randomise(block)
    for bias in (block.attn.proj.bias, block.mlp.fc2.bias):
        nn.init.zeros_(bias)  # init_weights zeroes every Linear bias
    block.zero_init_()
    x = torch.randn(3, 5, 16)
    assert torch.allclose(block(x), 0.72 * x, rtol=1e-6, atol=0)  # 0.9 * 0.8, one rounding per multiply


def test_compile_mode_auto_is_cuda_graphs_on_one_cuda_gpu_only():
    cfg = m.parse_config(["--compile"])
    assert cfg.compile_mode == "auto" and "compile_mode" in m.TRAJECTORY_KEYS and "compile" in m.TRAJECTORY_KEYS
    assert m.compile_mode(cfg, torch.device("cuda", 0)) == "reduce-overhead"
    assert m.compile_mode(cfg, torch.device("cpu")) == "default"
    assert m.compile_mode(m.parse_config(["--compile", "--compile-mode", "max-autotune"]), torch.device("cuda", 0)) == "max-autotune"


# --------------------------------------------------------------------------- what the teaching comments state

def test_patch_embedding_conv_is_a_linear_on_flattened_patches():
    # the comment: "a Conv2d with kernel = stride = patch size is a Linear applied to each p x p x C patch"
    model = m.MaskedAutoencoder(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                                decoder_dim=32, decoder_depth=1, decoder_heads=2)
    imgs = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    conv = model.patch_embed.double()
    as_linear = conv.weight.permute(0, 2, 3, 1).reshape(32, -1)  # (D, p*p*C) in patchify's (p, p, C) layout
    expected = m.patchify(imgs, 4) @ as_linear.T + conv.bias
    assert torch.allclose(conv(imgs).flatten(2).transpose(1, 2), expected, rtol=1e-10, atol=1e-12)


def test_at_initialisation_skip_merges_are_no_ops_and_the_decoder_predicts_zero():
    torch.manual_seed(0)
    model = m.MaskedAutoencoder(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=4, num_heads=2,
                                decoder_dim=24, decoder_depth=2, decoder_heads=2)
    stream, encoder_tokens = torch.randn(2, 17, 24), torch.randn(2, 5, 32)
    ids_restore = torch.stack([torch.randperm(16) for _ in range(2)])
    for skip in model.skips:
        assert torch.equal(skip(stream, encoder_tokens, ids_restore), stream)  # "starts as a no-op"
        assert skip.mask_token.shape == (1, 1, 32)  # "its OWN mask token, at ENCODER width"
    assert len({id(skip.mask_token) for skip in model.skips}) == len(model.skips) == 2
    _, pred, _ = model(torch.randn(2, 3, 16, 16), torch.rand(2, 16))
    assert torch.equal(pred, torch.zeros_like(pred))  # "the decoder predicts 0"


def test_training_loop_uses_the_linear_scaling_rule_and_drops_the_last_incomplete_batch(tmp_path, monkeypatch):
    # the loop's comments: peak lr = base_lr * batch / 256; the last incomplete batch of an epoch is dropped
    seen, get_lr = [], m.get_lr

    def recording_get_lr(step, total_steps, warmup_steps, peak_lr, min_lr):
        seen.append((step, total_steps, warmup_steps, peak_lr))
        return get_lr(step, total_steps, warmup_steps, peak_lr, min_lr)
    monkeypatch.setattr(m, "get_lr", recording_get_lr)
    run_training(tmp_path, "lr", "--epochs", "2", "--train-limit", "100")  # 100 images, batch 32: 3 steps an epoch
    assert [s[0] for s in seen] == list(range(6)) and {s[1:] for s in seen} == {(6, round(0.5 * 3), 2e-3 * 32 / 256)}


# --------------------------------------------------------------------------- CPU threads

def test_cpu_threads_explicit_then_environment_then_half_the_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert m.set_cpu_threads(2) == (2, "--threads") and torch.get_num_threads() == 2
        assert m.set_cpu_threads(0) == (3, "OMP_NUM_THREADS") and torch.get_num_threads() == 3
        for unset in ("", "0", "many"):  # not a positive count: the automatic choice
            monkeypatch.setenv("OMP_NUM_THREADS", unset)
            threads, why = m.set_cpu_threads(0)
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            assert threads == max(1, cores // 2) == torch.get_num_threads() and why.startswith("auto")
    finally:
        torch.set_num_threads(before)
    with pytest.raises(m.UserError, match="--threads"):
        tiny_cfg("--threads", "-1")


# --------------------------------------------------------------------------- the report a reader takes away

def fake_result(setting, seed, knn, probe, rank):
    return {"setting": setting, "seed": seed, "knn_k": 20, "knn": {20: knn}, "linear_probe": probe, "alpha_eff": 1.0,
            "effective_rank": rank, "effective_rank_centered": rank, "last_epoch_loss": 0.3, "seconds": 12.0,
            "feature": "encoder block 6/6 output, mean over all tokens (cls included)"}


def test_table_has_no_nan_and_verdict_prints_a_minus_b_with_its_noise():
    pixels = {**fake_result("raw pixels", 0, 0.2, 0.19, 400.0), "alpha_eff": math.nan, "last_epoch_loss": math.nan,
              "seconds": 0.0}
    labels = torch.arange(2000) % 10  # balanced: chance 0.1; test-set noise at p = 0.605: 2 sqrt(2 * 0.605 * 0.395 / 2000) = 0.031
    one_seed = [fake_result("alpha_min=1", 0, 0.6104, 0.55, 20.0), fake_result("alpha_min=0.7", 0, 0.5996, 0.45, 9.0),
                pixels]
    table = m.results_table(one_seed)
    assert "nan" not in table.lower() and "0.610" in table and " - " not in table.splitlines()[2]
    pixel_row = table.splitlines()[-1].split()
    assert pixel_row[:3] == ["raw", "pixels", "-"] and pixel_row[-2:] == ["-", "-"]
    lines = m.verdict(one_seed, labels).splitlines()
    # means rounded to 3 decimals first: the printed difference is exactly the printed A minus B
    assert lines[0].startswith("alpha_min=0.7 minus alpha_min=1, k-NN@20: 0.600 - 0.610 = -0.010: WITHIN test-set noise (+-0.031)")
    assert "one seed" in lines[0]
    assert "0.450 - 0.550 = -0.100: beyond test-set noise" in lines[1]
    assert "9.0 - 20.0 = -11.0: one seed, noise unmeasured" in lines[2]
    assert lines[3].startswith("best k-NN, alpha_min=1: 0.610; chance (the most frequent test class) 0.100: beyond it")
    assert lines[4].startswith("alpha_min=1 minus raw pixels, k-NN@20: 0.610 - 0.200 = +0.410: beyond")
    # a difference that rounds to zero prints +0.000, never -0.000
    tie = [fake_result("alpha_min=1", 0, 0.50004, 0.5, 9.0), fake_result("alpha_min=0.7", 0, 0.49996, 0.5, 9.0)]
    assert all("= +0.000" in line or "= +0.0:" in line for line in m.verdict(tie, labels).splitlines()[:3])
    # two seeds: the per-seed differences' spread sets the noise when it is the larger
    two_seeds = [fake_result("alpha_min=1", s, v, 0.5, 9.0) for s, v in ((0, 0.70), (1, 0.50))] + \
                [fake_result("alpha_min=0.7", s, v, 0.5, 9.0) for s, v in ((0, 0.60), (1, 0.52))]
    line = m.verdict(two_seeds, labels).splitlines()[0]
    # per-seed differences -0.10 and +0.02: 2 * std / sqrt(2) = 2 * 0.0849 / 1.414 = 0.120
    assert line == "alpha_min=0.7 minus alpha_min=1, k-NN@20: 0.560 - 0.600 = -0.040: WITHIN noise (+-0.120: 2 std. errors over 2 seeds)"
    assert "0.600+-0.141" in m.results_table(two_seeds)  # sample std of 0.70 and 0.50
    # the untrained-encoder control row: one per seed, paired with each arm's same seed; no alpha_eff, no time
    untrained = [{**fake_result("untrained encoder", s, v, 0.2, 12.0), "alpha_eff": math.nan, "last_epoch_loss": math.nan,
                  "seconds": 0.0} for s, v in ((0, 0.80), (1, 0.76))]
    lines = m.verdict(two_seeds + untrained, labels).splitlines()
    # per-seed differences -0.10 and -0.26: 2 * std / sqrt(2) = 2 * 0.1131 / 1.414 = 0.160
    assert lines[3] == "alpha_min=1 minus untrained encoder, k-NN@20: 0.600 - 0.780 = -0.180: beyond noise (+-0.160: 2 std. errors over 2 seeds)"
    assert lines[5].startswith("best k-NN, alpha_min=1: 0.600")  # the control row is not an arm
    row = m.results_table(two_seeds + untrained).splitlines()[-1].split()
    assert row[:5] == ["untrained", "encoder", "-", "2", "0.780+-0.028"] and row[-2:] == ["-", "-"]


def test_chance_is_the_most_frequent_class_and_one_class_data_warns(tmp_path, capsys):
    assert m.chance_accuracy(torch.tensor([0, 0, 0, 1])) == 0.75
    import matplotlib.image
    for split in ("train", "val"):
        (tmp_path / "images" / split / "cat").mkdir(parents=True)
        for i in range(2):
            matplotlib.image.imsave(tmp_path / "images" / split / "cat" / f"{i}.png", np.zeros((8, 8, 3), np.uint8))
    m.load_dataset(f"folder:{tmp_path / 'images'}", str(tmp_path / "data"), size=8)
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "single class" in warnings[0] and "means nothing" in warnings[0]
