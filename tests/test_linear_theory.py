"""Tests of linear_theory.py: every closed form against an independent computation (gradient-based
training, Monte Carlo, a textbook formula or a direct least-squares solve). Small data made here;
deterministic; no network, no files."""
import json
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import linear_theory as lt  # noqa: E402

SCRIPT = os.path.abspath(lt.__file__)

torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and CI shares its cores

IMAGE_SHAPE = (2, 4, 4)  # D = 32: two channels, 2x2 patches of size 2
K = 4


def make_data(image_shape=IMAGE_SHAPE, n=300, num_classes=3, seed=0, decay=0.92):
    """Centred correlated data X (D, N) with a decaying spectrum, and one-hot labels Y (C, N)."""
    gen = torch.Generator().manual_seed(seed)
    dim = math.prod(image_shape)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0]
    X = basis @ (decay ** torch.arange(dim, dtype=torch.float64)[:, None] * torch.randn(dim, n, generator=gen, dtype=torch.float64))
    X = X - X.mean(1, keepdim=True)
    labels = (torch.randn(num_classes, dim, generator=gen, dtype=torch.float64) @ X).argmax(0)
    return X, torch.nn.functional.one_hot(labels, num_classes).T.double()


def pca_rows(X, k):
    return torch.linalg.eigh(X @ X.T)[1].flip(1)[:, :k].T


def relative_gap(value, reference):
    return abs(value - reference) / abs(reference)


CORRUPTIONS = [dict(noise="none"), dict(noise="gaussian", sigma=0.4),
               dict(noise="mask", p=0.5, patch=2, image_shape=IMAGE_SHAPE)]


# --- the denoising autoencoder ---------------------------------------------------------------

def test_interface_shapes_and_loss_consistency():
    X, _ = make_data()
    for corruption in CORRUPTIONS:
        E, G, loss = lt.dae_closed_form(X.numpy(), K, **corruption)  # numpy in works too
        assert E.shape == (K, X.shape[0]) and G.shape == (X.shape[0], K) and isinstance(loss, float)
        C, S = lt.corruption_moments(X @ X.T, X.shape[1], **corruption)
        assert relative_gap(float(lt.expected_dae_loss(E, G, X @ X.T, C, S)), loss) < 1e-12
        # more features never hurt, and the loss is below that of doing nothing
        assert lt.dae_closed_form(X, K + 1, **corruption)[2] < loss < float((X ** 2).sum())


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=lambda c: c["noise"])
def test_closed_form_matches_lbfgs_and_adam(corruption):
    X, _ = make_data()
    E, G, best = lt.dae_closed_form(X, K, **corruption)
    gram = X @ X.T
    C, S = lt.corruption_moments(gram, X.shape[1], **corruption)
    E_fit, G_fit = lt.train_dae_expected(X, K, "lbfgs", 500, seed=1, **corruption)
    assert relative_gap(float(lt.expected_dae_loss(E_fit, G_fit, gram, C, S)), best) < 1e-9
    assert lt.max_principal_angle(E_fit, E) < 1e-2  # the same learned subspace, in degrees
    E_fit, G_fit = lt.train_dae_expected(X, K, "adam", 2000, seed=2, **corruption)
    assert relative_gap(float(lt.expected_dae_loss(E_fit, G_fit, gram, C, S)), best) < 1e-6


@pytest.mark.parametrize("corruption", CORRUPTIONS[1:], ids=lambda c: c["noise"])
def test_closed_form_matches_sgd_on_sampled_corruptions(corruption):
    X, _ = make_data()
    gram = X @ X.T
    E, G, best = lt.dae_closed_form(X, K, **corruption)
    C, S = lt.corruption_moments(gram, X.shape[1], **corruption)
    E_fit, G_fit = lt.train_dae_sampled(X, K, 2000, seed=0, **corruption)
    assert relative_gap(float(lt.expected_dae_loss(E_fit, G_fit, gram, C, S)), best) < 1e-4
    assert lt.max_principal_angle(E_fit, E) < 2.0


@pytest.mark.parametrize("corruption", CORRUPTIONS[1:], ids=lambda c: c["noise"])
def test_expected_loss_formula_matches_monte_carlo(corruption):
    # the objective the optimisers above minimise must itself be the expectation over corruptions
    X, _ = make_data(n=100)
    gen = torch.Generator().manual_seed(3)
    E = torch.randn(K, X.shape[0], generator=gen, dtype=torch.float64) * 0.3
    G = torch.randn(X.shape[0], K, generator=gen, dtype=torch.float64) * 0.3
    C, S = lt.corruption_moments(X @ X.T, X.shape[1], **corruption)
    draws = [float(((X - G @ E @ lt.sample_corruption(X, gen, **corruption)) ** 2).sum()) for _ in range(3000)]
    assert relative_gap(np.mean(draws), float(lt.expected_dae_loss(E, G, X @ X.T, C, S))) < 1e-2


def test_masking_second_moment_monte_carlo():
    X, _ = make_data(n=200)
    mask = dict(noise="mask", p=0.6, patch=2, image_shape=IMAGE_SHAPE)
    C, S = lt.corruption_moments(X @ X.T, X.shape[1], **mask)
    gen = torch.Generator().manual_seed(0)
    draws = [lt.sample_corruption(X, gen, **mask) for _ in range(4000)]
    S_mc = sum(Xt @ Xt.T for Xt in draws) / len(draws)
    C_mc = sum(Xt @ X.T for Xt in draws) / len(draws)
    assert float((S_mc - S).norm() / S.norm()) < 1e-2
    assert float((C_mc - C).norm() / C.norm()) < 1e-2
    # and the structure: all channels of a pixel share one patch, edge patches may be ragged
    ids = lt.patch_ids((3, 5, 5), 2)
    assert ids.shape == (75,) and torch.equal(ids[:25], ids[25:50]) and int(ids.max()) + 1 == 9


def test_gaussian_noise_never_moves_the_subspace():
    X, _ = make_data()
    n = X.shape[1]
    d = torch.linalg.eigvalsh(X @ X.T).flip(0)
    for sigma in (0.01, 0.5, 3.0):
        E, _, loss, mu = lt.dae_from_gram(X @ X.T, n, K, "gaussian", sigma)
        predicted = d[:K] ** 2 / (d[:K] + n * sigma ** 2)
        assert torch.allclose(mu, predicted, rtol=1e-10, atol=0)
        assert lt.max_principal_angle(E, pca_rows(X, K)) < 1e-8
        assert relative_gap(loss, float(d.sum() - predicted.sum())) < 1e-12


def test_entrywise_masking_of_standardised_data_is_pca_and_patches_move_it():
    X, _ = make_data()
    X_std = X / X.std(1, keepdim=True)
    E = lt.dae_closed_form(X_std, K, "mask", p=0.7)[0]
    assert lt.max_principal_angle(E, pca_rows(X_std, K)) < 1e-8
    E_patch = lt.dae_closed_form(X_std, K, "mask", p=0.7, patch=2, image_shape=IMAGE_SHAPE)[0]
    assert lt.max_principal_angle(E_patch, pca_rows(X_std, K)) > 1.0
    # unstandardised data: even entry-wise masking moves it
    X_raw = X * torch.linspace(0.2, 3.0, X.shape[0], dtype=torch.float64)[:, None]
    assert lt.max_principal_angle(lt.dae_closed_form(X_raw, K, "mask", p=0.7)[0], pca_rows(X_raw, K)) > 1.0


def test_rank_deficient_data_pads_with_zero_features():
    X, _ = make_data(n=6)  # D = 32 > N: X X^T has rank 5 after centring
    E, G, loss = lt.dae_closed_form(X, 8)
    assert E.shape == (8, 32) and torch.all(E[5:] == 0)
    assert loss < 1e-9 * float((X ** 2).sum())  # 5 directions reconstruct everything
    with pytest.raises(ValueError):
        lt.dae_closed_form(X, 4, "mask", p=0.5, patch=2)  # patches need image_shape


# --- Theorem 1 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("lam", [0.0, 0.3, 5.0])
def test_theorem1_matches_lbfgs(lam):
    X, Y = make_data()
    V, W, Z, best = lt.bilinear_closed_form(X, Y, 2, lam)
    assert relative_gap(float(lt.bilinear_loss(V, W, Z, X, Y, lam)), best) < 1e-12
    assert torch.allclose(V.T @ X @ X.T @ V, torch.eye(2, dtype=torch.float64), atol=1e-10)
    V_fit, W_fit, Z_fit = lt.train_bilinear(X, Y, 2, lam, 1000, seed=0)
    assert relative_gap(float(lt.bilinear_loss(V_fit, W_fit, Z_fit, X, Y, lam)), best) < 1e-9


def test_theorem1_limits():
    X, Y = make_data()
    # lambda = 0: reduced-rank regression (textbook formula), and ordinary least squares once K >= C
    assert relative_gap(lt.bilinear_closed_form(X, Y, 2, 0.0)[3], lt.reduced_rank_regression_loss(X, Y, 2)) < 1e-10
    ols = float(((Y.T - X.T @ torch.linalg.lstsq(X.T, Y.T).solution) ** 2).sum())
    assert relative_gap(lt.bilinear_closed_form(X, Y, 3, 0.0)[3], ols) < 1e-10
    # lambda -> infinity: PCA
    V = lt.bilinear_closed_form(X, Y, K, 1e8)[0]
    assert lt.max_principal_angle(V.T, pca_rows(X, K)) < 1e-4
    assert lt.max_principal_angle(lt.bilinear_closed_form(X, Y, K, 0.01)[0].T, pca_rows(X, K)) > 1.0
    with pytest.raises(ValueError):
        lt.bilinear_closed_form(X, Y, K, -1.0)


# --- alignment -----------------------------------------------------------------------------------

@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=lambda c: c["noise"])
def test_alignment_error_equals_direct_least_squares(corruption):
    X, Y = make_data(n=200)
    dim = X.shape[0]
    E = lt.dae_closed_form(X, dim, **corruption)[0]
    curve = lt.alignment_curve(E, torch.linalg.eigh(X @ X.T), X @ Y.T, Y.sum(1))
    for k in (1, 3, 8, dim):
        features = (E[:k] @ X).T  # (N, k)
        residual = Y.T - features @ torch.linalg.lstsq(features, Y.T).solution
        assert relative_gap(float(curve["err"][k - 1]), float((residual ** 2).sum())) < 1e-9
    assert torch.all(curve["projection"].diff() >= -1e-9) and abs(float(curve["projection"][-1]) - 100) < 1e-9


def test_alignment_scores_agree_for_balanced_classes_only():
    X, _ = make_data(n=300)
    balanced = torch.nn.functional.one_hot(torch.arange(300) % 3, 3).T.double()
    unbalanced = torch.nn.functional.one_hot((torch.arange(300) % 10 > 6).long() + (torch.arange(300) % 10 > 8).long(), 3).T.double()
    E = lt.dae_closed_form(X, X.shape[0])[0]
    gram_eig = torch.linalg.eigh(X @ X.T)
    same = lt.alignment_curve(E, gram_eig, X @ balanced.T, balanced.sum(1))
    assert torch.allclose(same["projection"], same["authors"], atol=1e-9)
    different = lt.alignment_curve(E, gram_eig, X @ unbalanced.T, unbalanced.sum(1))
    assert float((different["projection"] - different["authors"]).abs().max()) > 1e-3


def test_pixel_statistics_match_a_direct_computation():
    gen = np.random.default_rng(0)
    images = gen.integers(0, 256, size=(50, 2, 3, 3), dtype=np.uint8)
    labels = gen.integers(0, 4, size=50)
    stats = lt.pixel_statistics(images, labels, 4, torch.device("cpu"), chunk=7)
    X = torch.from_numpy(images.reshape(50, -1)).double().T / 255
    X = X - X.mean(1, keepdim=True)
    Y = torch.nn.functional.one_hot(torch.from_numpy(labels), 4).T.double()
    assert torch.allclose(stats["gram"], X @ X.T, atol=1e-12) and torch.allclose(stats["xy"], X @ Y.T, atol=1e-12)
    assert stats["image_shape"] == (2, 3, 3) and stats["n"] == 50


# --- top / bottom subspaces and learning order ---------------------------------------------------

@pytest.mark.parametrize("end", ["top", "bottom"])
@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5, 0.9, 1.0])
def test_variance_subspace_keeps_the_requested_fraction(end, fraction):
    X, _ = make_data(n=500)
    eigvals, eigvecs = torch.linalg.eigh(X @ X.T / X.shape[1])
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    basis, kept = lt.variance_subspace(eigvals, eigvecs, fraction, end)
    k = basis.shape[1]
    projected = basis @ basis.T @ X
    actual = float((projected ** 2).sum() / (X ** 2).sum())  # the variance the projected images really keep
    assert abs(actual - kept) < 1e-10 and kept >= fraction - 1e-12
    # the fewest directions: one fewer would not reach the fraction
    one_less = eigvals[:k - 1].sum() if end == "top" else eigvals[len(eigvals) - k + 1:].sum()
    assert float(one_less / eigvals.sum()) < fraction
    # leading or trailing directions, as asked
    expected = eigvecs[:, :k] if end == "top" else eigvecs[:, -k:]
    assert torch.equal(basis, expected)


def test_gradient_flow_prediction_matches_gradient_descent():
    # the closed-form learning curve per eigen-band against plain gradient descent of W from 0
    X, _ = make_data(image_shape=(1, 4, 4), n=400)
    cov = X @ X.T / X.shape[1]
    eigvals, eigvecs = torch.linalg.eigh(cov)
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    lr, steps = 1e-3 / float(eigvals[0]), 3000
    W = torch.zeros(16, 16, dtype=torch.float64)
    for _ in range(steps):
        W += lr * 2 * (torch.eye(16, dtype=torch.float64) - W) @ cov  # -grad of mean ||x - W x||^2
    residual = ((torch.eye(16, dtype=torch.float64) - W) @ X).T @ eigvecs  # (N, D) in the eigenbasis
    bands = lt.eigen_bands(16)
    measured = torch.tensor([float((residual[:, a:b] ** 2).sum() / ((X.T @ eigvecs)[:, a:b] ** 2).sum()) for a, b in bands],
                            dtype=torch.float64)
    predicted = lt.gradient_flow_band_error(eigvals, bands, torch.tensor([lr * steps], dtype=torch.float64))[0]
    assert torch.allclose(measured, predicted, rtol=1e-2, atol=1e-4)
    assert torch.all(predicted.diff() > 0)  # top bands are fitted first
    assert bands == [(0, 1), (1, 4), (4, 16)]


# --- real images with constant pixels (MNIST's borders): every command copes with a rank-deficient covariance ---

def test_every_command_on_images_with_constant_pixels(tmp_path, capsys):
    # 8x8 RGB images whose 2-pixel border is black in every image: only the 4x4x3 = 48 interior
    # coordinates vary, so the covariance has rank 48 of D = 192 (N = 80 train images > 48).
    import matplotlib.image
    gen = np.random.default_rng(0)
    for split, per_class in (("train", 40), ("val", 10)):
        for label, cls in enumerate(("dark", "bright")):
            os.makedirs(tmp_path / "images" / split / cls)
            for i in range(per_class):
                image = np.zeros((8, 8, 3), dtype=np.uint8)
                image[2:6, 2:6] = gen.integers(0, 156, size=(4, 4, 3)) + 100 * label
                matplotlib.image.imsave(tmp_path / "images" / split / cls / f"{i}.png", image)
    common = ["--datasets", f"folder:{tmp_path / 'images'}", "--img-size", "8", "--out-dir", str(tmp_path / "out")]
    assert lt.main(["align", *common]) == 0
    result = json.loads((tmp_path / "out" / "alignment.json").read_text())["results"][f"folder:{tmp_path / 'images'}"]
    assert result["D"] == 192 and result["rank"] == 48
    for entry in result["corruptions"].values():
        score = np.array(entry["projection_score"])
        assert len(score) == 192 and np.all(np.diff(score) >= -1e-9)  # one value per K, never decreasing
        assert abs(score[47] - 100) < 1e-9 and np.all(score[48:] == score[47])  # complete at K = rank
        assert max(int(k) for k in entry["angles_to_pca_deg"]) <= 48  # angles only where PCA is defined
    assert lt.main(["subspace", *common, "--epochs", "1", "--width", "2", "--batch-size", "32"]) == 0
    rows = json.loads((tmp_path / "out" / "subspace.json").read_text())["results"][f"folder:{tmp_path / 'images'}"]["rows"]
    assert rows[0]["projection"] == "full" and rows[0]["directions"] == 48
    assert lt.main(["order", *common, "--ae-steps", "3", "--ae-hidden", "8", "--ae-bottleneck", "4"]) == 0
    order = json.loads((tmp_path / "out" / "order.json").read_text())["results"][f"folder:{tmp_path / 'images'}"]
    assert np.all(np.isfinite(order["deep_error"])) and np.all(np.isfinite(order["linear_error"]))
    assert order["bands"][-1] == "directions 17-48"
    assert "error" not in capsys.readouterr().err


# --- the command line: every bad input ends in one sentence, before anything is computed or written ---------

def tree_snapshot(root):
    """Every path under root with its kind, size and mtime: 'no file created or changed' is a plain == ."""
    snapshot = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            snapshot[os.path.relpath(path, root)] = (os.path.isdir(path), info.st_size, info.st_mtime_ns)
    return snapshot


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh cwd with the obstacles the bad paths below point at."""
    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "blocked" / "alignment.json").mkdir(parents=True)  # an output file that is a directory
    (tmp_path / "blocked2" / "subspace_shapes.png").mkdir(parents=True)
    (tmp_path / "blocked3" / "order_mnist.png").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


BAD_ARGV = [  # (argv, a word the one-sentence message must contain)
    ([], "command"), (["bogus"], "invalid choice"), (["align", "--no-such-flag"], "unrecognized"),
    (["align", "--epochs"], "expected one argument"), (["align", "--epochs", "x"], "invalid int"),
    (["align", "--lr", "fast"], "invalid float"),
    (["subspace", "--epochs", "0"], "--epochs"), (["subspace", "--epochs", "-1"], "--epochs"),
    (["subspace", "--batch-size", "0"], "--batch-size"), (["subspace", "--width", "0"], "--width"),
    (["subspace", "--lr", "0"], "--lr"), (["subspace", "--lr", "-1e-3"], "--lr"), (["subspace", "--lr", "nan"], "--lr"),
    (["subspace", "--lr", "inf"], "--lr"), (["order", "--ae-lr", "0"], "--ae-lr"), (["order", "--ae-lr", "-inf"], "--ae-lr"),
    (["order", "--ae-steps", "0"], "--ae-steps"), (["order", "--ae-hidden", "0"], "--ae-hidden"),
    (["order", "--ae-bottleneck", "-5"], "--ae-bottleneck"),
    (["align", "--train-limit", "-1"], "--train-limit"), (["align", "--img-size", "3"], "--img-size"),
    (["align", "--img-size", "100000"], "GB"), (["align", "--threads", "-1"], "--threads"),
    (["align", "--ks", "0"], "--ks"), (["align", "--ks", "8,x"], "--ks"), (["align", "--ks", ","], "--ks"),
    (["subspace", "--top", "1.5"], "--top"), (["subspace", "--top", "0"], "--top"), (["subspace", "--bottom", "nan"], "--bottom"),
    (["subspace", "--bottom", "-0.2"], "--bottom"), (["subspace", "--seeds", "0,-1"], "seeds"), (["subspace", "--seeds", "a"], "--seeds"),
    (["align", "--seed", "-3"], "seeds"), (["align", "--seed", str(2 ** 64)], "seeds"),
    (["align", "--corruptions", "mask:2:4"], "mask:P:PATCH"), (["align", "--corruptions", "mask:0.5:0"], "mask:P:PATCH"),
    (["align", "--corruptions", "mask:0.5"], "mask:P:PATCH"), (["align", "--corruptions", "gaussian:0"], "gaussian:SIGMA"),
    (["align", "--corruptions", "gaussian:inf"], "gaussian:SIGMA"), (["align", "--corruptions", "gaussian:nan"], "gaussian:SIGMA"),
    (["align", "--corruptions", "blur:3"], "--corruptions"), (["verify", "--corruptions", "none,"], "--corruptions"),
    (["align", "--datasets", "nope"], "unknown dataset"), (["align", "--datasets", ","], "--datasets"),
    (["align", "--datasets", "shapes,shapes"], "twice"), (["align", "--datasets", "folder:missing"], "not a directory"),
    (["align", "--datasets", "shapes,folder:afile"], "not a directory"), (["align", "--device", "tpu"], "--device"),
    (["align", "--out-dir", ""], "--out-dir"), (["align", "--out-dir", "afile"], "not a directory"),
    (["subspace", "--out-dir", "afile/sub"], "is a file"), (["align", "--out-dir", "blocked"], "alignment.json"),
    (["subspace", "--out-dir", "blocked2"], "subspace_shapes.png"),
    (["order", "--datasets", "mnist", "--out-dir", "blocked3", "--data-dir", "empty", "--no-download"], "order_mnist.png"),
    (["align", "--datasets", "mnist", "--data-dir", "afile"], "--data-dir"),
    (["align", "--datasets", "mnist", "--data-dir", "afile/x"], "--data-dir"),
    (["align", "--datasets", "mnist", "--data-dir", ""], "--data-dir"),
    # data that is missing is found missing before any computation (the shapes come first in the list)
    (["align", "--datasets", "shapes,cifar10", "--img-size", "8", "--data-dir", "empty", "--no-download"], "cifar10 not found"),
]


@pytest.mark.parametrize("argv,word", BAD_ARGV, ids=[" ".join(a) or "no-args" for a, _ in BAD_ARGV])
def test_bad_input_ends_with_one_sentence_and_changes_nothing(argv, word, workdir, capsys):
    before = tree_snapshot(workdir)
    try:
        code = lt.main(argv)
    except SystemExit as e:  # argparse's own exits must not escape either
        code = e.code
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    assert word in lines[0]
    assert tree_snapshot(workdir) == before  # nothing created (not even --out-dir), nothing changed


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_refused(workdir, capsys):
    assert lt.main(["align", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("error: --device cuda is not available")


def run_cli(*args, cwd, **kwargs):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=120, **kwargs)


def test_real_command_line_bad_flag_and_help(workdir):
    # the real CLI, as a user types it: exit code 2, one line, no traceback, nothing written
    before = tree_snapshot(workdir)
    result = run_cli("align", "--epochs", "0", "--out-dir", "fresh", cwd=workdir)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: --epochs")
    assert result.stdout == "" and tree_snapshot(workdir) == before
    result = run_cli("--help", cwd=workdir)
    assert result.returncode == 0 and result.stderr == "" and "usage:" in result.stdout


def test_help_shows_every_knob_with_its_real_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lt.main(["-h"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare word streams
    body = text[text.index("options:"):]  # the entries, after the usage lines
    for field in lt.dataclasses.fields(lt.Config):
        entry = body[re.search(re.escape("--" + field.name.replace("_", "-")) + "[ ,]", body).start():]
        shown = entry[entry.index("(default: ") + len("(default: "):]
        assert shown[:shown.index(")")] == str(field.default), field.name  # the first default after the flag is its own
    assert "(default: None)" not in text
    for section in ("data:", "align: Figure 2", "subspace: Figures 1 and 4", "order:", "system:"):
        assert section in text  # grouped by the Config's sections


def test_interrupt_ends_with_one_line_and_exit_130(workdir, monkeypatch, capsys):
    def interrupted(cfg, device):
        raise KeyboardInterrupt
    monkeypatch.setattr(lt, "align", interrupted)
    assert lt.main(["align"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted") and "Traceback" not in err


def test_real_sigint_during_a_run(workdir):
    # a real Ctrl-C (SIGINT) in the middle of verify: one line, exit 130. The child restores Python's
    # default SIGINT handler, since a shell may start background jobs (and so this test) with SIGINT ignored.
    code = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"sys.argv = [{SCRIPT!r}, 'verify']; runpy.run_path({SCRIPT!r}, run_name='__main__')")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().startswith("verify on")  # started computing
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130 and err.count("\n") == 1 and err.startswith("interrupted"), err


def test_atomic_write_leaves_nothing_behind_when_interrupted(tmp_path):
    target = tmp_path / "out" / "result.json"

    def half_then_interrupt(tmp):
        with open(tmp, "w") as f:
            f.write("{")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        lt.atomic_write(str(target), half_then_interrupt)
    assert os.listdir(tmp_path / "out") == []  # neither the target nor the temporary file
    lt.save_json({"a": 1}, str(target))
    assert target.read_text().replace(" ", "").replace("\n", "") == '{"a":1}'


def test_data_loaders_are_identical_copies_of_mae_decays():
    # linear_theory.py carries its own copy of the data section (no script imports another):
    # every shared piece must stay identical to mae_decay.py's, or the datasets would differ
    import inspect
    import mae_decay
    for name in ("UserError", "md5sum", "download", "_ArraysOnly", "read_cifar_batch", "load_cifar", "read_idx",
                 "load_idx", "load_image_resized", "load_folder", "shape_signed_distance", "make_shapes", "load_dataset"):
        assert inspect.getsource(getattr(lt, name)) == inspect.getsource(getattr(mae_decay, name)), name
    for name in ("CIFAR", "IDX", "SYSTEM_DIRS", "DATA_HELP", "SHAPE_NAMES", "IMAGE_EXTENSIONS"):
        assert getattr(lt, name) == getattr(mae_decay, name), name
