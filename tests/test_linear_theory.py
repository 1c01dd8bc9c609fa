"""Tests of linear_theory.py. Every closed form is checked against a computation written here,
independently of the module: the objective stated plainly (exact enumeration of every mask, the
Gaussian expectation in closed form), the test's own L-BFGS on it, a brute-force grid search,
a textbook formula (Eckart-Young, ordinary least squares), explicit N x K least-squares solves and
QR factorisations. The data are non-trivial (a decaying spectrum, patch masking that moves the
subspace away from PCA, unbalanced classes), so that a wrong formula cannot pass by coincidence.
Every tolerance says in a comment where it comes from. Small data made here; deterministic; no network."""
import itertools
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

IMAGE_SHAPE = (2, 4, 4)  # D = 32: two channels, 4 patches of 2x2 pixels
K = 4
EPS = torch.finfo(torch.float64).eps  # 2.2e-16


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
    """The top-k principal directions (k, D), from the SVD: independent of the module's eigh calls."""
    return torch.linalg.svd(X, full_matrices=False)[0][:, :k].T


def relative_gap(value, reference):
    return abs(value - reference) / abs(reference)


def angle_deg(A, B):
    """The largest principal angle (degrees) between the row spaces of A and B (k, D), written
    independently of the module: orthonormal bases by SVD, the angle from ||(I - Pa) Qb||_2, which
    stays accurate for tiny angles."""
    Qa = torch.linalg.svd(A.T, full_matrices=False)[0]
    Qb = torch.linalg.svd(B.T, full_matrices=False)[0]
    return math.degrees(math.asin(min(1.0, float(torch.linalg.matrix_norm(Qb - Qa @ (Qa.T @ Qb), ord=2)))))


CORRUPTIONS = [dict(noise="none"), dict(noise="gaussian", sigma=0.4),
               dict(noise="mask", p=0.5, patch=2, image_shape=IMAGE_SHAPE)]
CORRUPTION_IDS = ["none", "gaussian", "mask"]


# --- independent statements of the denoising objective -------------------------------------------

def patch_of_each_coordinate(image_shape, patch):
    """Coordinate (c, h, w) of a flattened image lies in patch (h // patch, w // patch), all channels alike."""
    channels, height, width = image_shape
    columns = math.ceil(width / patch)
    return [(h // patch) * columns + w // patch for c in range(channels) for h in range(height) for w in range(width)]


def every_mask(image_shape, patch, p):
    """All 2^patches keep-patterns m (D,) with their probabilities p^(#dropped) (1-p)^(#kept)."""
    ids = patch_of_each_coordinate(image_shape, patch)
    patches = max(ids) + 1
    for kept in itertools.product([0.0, 1.0], repeat=patches):
        probability = math.prod((1 - p) if k else p for k in kept)
        yield torch.tensor([kept[i] for i in ids], dtype=torch.float64), probability


def plain_expected_loss(E, G, X, corruption):
    """E_q ||X - G E Xt||_F^2 stated directly. none: Xt = X. gaussian: expanding the square, the cross
    term has mean 0 and E||G E sigma eps||^2 = sigma^2 ||G E||_F^2 per sample, N samples. mask: the exact
    expectation, a sum over every keep-pattern of the patches weighted by its probability."""
    if corruption["noise"] == "none":
        return ((X - G @ E @ X) ** 2).sum()
    if corruption["noise"] == "gaussian":
        return ((X - G @ E @ X) ** 2).sum() + X.shape[1] * corruption["sigma"] ** 2 * ((G @ E) ** 2).sum()
    return sum(probability * ((X - G @ E @ (kept[:, None] * X)) ** 2).sum()
               for kept, probability in every_mask(corruption["image_shape"], corruption["patch"], corruption["p"]))


def lbfgs_minimum(loss_fn, shapes, seed, iterations):
    """The test's own optimiser run: torch's L-BFGS with a strong-Wolfe line search from a random start."""
    gen = torch.Generator().manual_seed(seed)
    params = [(0.1 * torch.randn(s, generator=gen, dtype=torch.float64)).requires_grad_() for s in shapes]
    scale = 1 / float(loss_fn(*[torch.zeros(s, dtype=torch.float64) for s in shapes]))  # an O(1) objective
    optimizer = torch.optim.LBFGS(params, lr=1, max_iter=iterations, max_eval=2 * iterations, history_size=50,
                                  tolerance_grad=1e-15, tolerance_change=1e-18, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = scale * loss_fn(*params)
        loss.backward()
        return loss
    optimizer.step(closure)
    return [p.detach() for p in params]


# --- the denoising autoencoder -----------------------------------------------------------------------

@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=CORRUPTION_IDS)
def test_closed_form_is_the_minimum_of_the_plainly_stated_objective(corruption):
    X, _ = make_data()
    E, G, loss = lt.dae_closed_form(X, K, **corruption)
    assert E.shape == (K, X.shape[0]) and G.shape == (X.shape[0], K) and isinstance(loss, float)
    # 1. the loss it reports is the plain objective at its own (E, G). Both are float64 sums of at most
    # 16 masks x N x D = 1.5e5 products: worst-case relative rounding 1.5e5 * EPS = 3e-11 of ||X||^2,
    # and ||X||^2 / loss < 3 here (asserted), so 1e-10 bounds it.
    plain = float(plain_expected_loss(E, G, X, corruption))
    assert float((X ** 2).sum()) / loss < 3 and relative_gap(plain, loss) < 1e-10
    # 2. nothing does better: the test's L-BFGS on the plain objective from a random start. It converges
    # to a relative gap <= 6e-12 on all three (measured; the uncorrupted case is slowest, its top
    # eigenvalues being close). A wrong closed form is off by far more: the next-best K-subspace (one
    # direction swapped for the (K+1)-th) costs (mu_K - mu_K+1) / L* >= 3e-2 here, so 1e-9 separates them.
    E_fit, G_fit = lbfgs_minimum(lambda E, G: plain_expected_loss(E, G, X, corruption),
                                 [(K, X.shape[0]), (X.shape[0], K)], seed=1, iterations=300)
    found = float(plain_expected_loss(E_fit, G_fit, X, corruption))
    assert found >= loss * (1 - 1e-10) and relative_gap(found, loss) < 1e-9  # below it: rounding only
    # 3. first-order optimality, independently of any optimiser: the gradient of the plain objective
    # vanishes at the closed form, up to rounding: ~EPS * sqrt(terms summed) ~ 1e-14 of one term
    # (measured 1e-15); 1e-10.
    params = [E.clone().requires_grad_(), G.clone().requires_grad_()]
    plain_expected_loss(*params, X, corruption).backward()
    # at the optimum the gradient's two terms cancel (e.g. dL/dG = -2 C^T E^T + 2 G E S E^T): compare
    # with the size of one term, 2 ||X X^T E^T|| (dL/dG) and 2 ||G^T X X^T|| (dL/dE)
    assert float(params[1].grad.norm()) < 1e-10 * 2 * float((X @ X.T @ E.T).norm())
    assert float(params[0].grad.norm()) < 1e-10 * 2 * float((G.T @ X @ X.T).norm())
    if corruption["noise"] == "mask":
        # non-trivial: patch masking moves the optimum away from PCA (33 degrees here)
        assert angle_deg(E, pca_rows(X, K)) > 10


def test_uncorrupted_autoencoder_is_eckart_young():
    # Eckart-Young: the best rank-K reconstruction keeps the top K singular directions, and its
    # error is the sum of the other squared singular values (SVD: independent of the module's eigh).
    X, _ = make_data()
    singular = torch.linalg.svdvals(X)
    E, G, loss = lt.dae_closed_form(X, K)
    # rounding of float64 sums of ~D singular values: 1e-12 relative is far above EPS * D = 7e-15
    assert relative_gap(loss, float((singular[K:] ** 2).sum())) < 1e-12
    # the eigenvector perturbation from rounding is ~EPS ||X||^2 / (s_K^2 - s_K+1^2) ~ 1e-14 rad here
    assert angle_deg(E, pca_rows(X, K)) < 1e-8


@pytest.mark.parametrize("corruption", CORRUPTIONS[1:], ids=CORRUPTION_IDS[1:])
def test_moments_equal_the_exact_expectation(corruption):
    X, _ = make_data(n=100)
    gram, n = X @ X.T, X.shape[1]
    C, S = lt.corruption_moments(gram, n, **corruption)
    if corruption["noise"] == "mask":  # E[Xt X^T] and E[Xt Xt^T] as exact sums over the 16 keep-patterns
        C_ref = sum(prob * (kept[:, None] * X) @ X.T for kept, prob in every_mask(IMAGE_SHAPE, 2, corruption["p"]))
        S_ref = sum(prob * (kept[:, None] * X) @ (kept[:, None] * X).T for kept, prob in every_mask(IMAGE_SHAPE, 2, corruption["p"]))
    else:  # Xt = X + sigma eps: C = X X^T, S = X X^T + N sigma^2 I
        C_ref, S_ref = gram, gram + n * corruption["sigma"] ** 2 * torch.eye(X.shape[0], dtype=torch.float64)
    # float64 sums of 16 x N products per entry: relative rounding <= 16 * 100 * EPS = 4e-13
    assert float((C - C_ref).norm() / C_ref.norm()) < 1e-12 and float((S - S_ref).norm() / S_ref.norm()) < 1e-12
    # and the module's own expected loss formula agrees with the plain objective at a random (E, G)
    gen = torch.Generator().manual_seed(3)
    E = 0.3 * torch.randn(K, X.shape[0], generator=gen, dtype=torch.float64)
    G = 0.3 * torch.randn(X.shape[0], K, generator=gen, dtype=torch.float64)
    assert relative_gap(float(lt.expected_dae_loss(E, G, gram, C, S)), float(plain_expected_loss(E, G, X, corruption))) < 1e-11


@pytest.mark.parametrize("corruption", [CORRUPTIONS[1], dict(CORRUPTIONS[2], p=0.7)], ids=CORRUPTION_IDS[1:])
def test_sampled_corruptions_average_to_the_moments(corruption):
    # sample_corruption is what the SGD reference trains on: its draws must average to S (p = 0.7, not
    # 0.5, so that keeping with probability p instead of 1-p shows). Tolerance from the draws themselves:
    # the mean of n draws deviates from S by spread / sqrt(n) in rms (spread: one draw's rms deviation);
    # a norm over D^2 = 1024 entries concentrates tightly around its rms, so 5x that never fails by chance.
    X, _ = make_data(n=100)
    S = lt.corruption_moments(X @ X.T, X.shape[1], **corruption)[1]
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([Xt @ Xt.T for Xt in (lt.sample_corruption(X, gen, **corruption) for _ in range(2000))])
    spread = float(((draws - S) ** 2).sum((1, 2)).mean().sqrt())  # rms Frobenius deviation of one draw
    assert float((draws.mean(0) - S).norm()) < 5 * spread / math.sqrt(len(draws))
    if corruption["noise"] == "mask":  # every channel of a pixel, every pixel of a patch share one draw
        Xt = lt.sample_corruption(torch.ones(32, 500, dtype=torch.float64), gen, **corruption)
        ids = torch.tensor(patch_of_each_coordinate(IMAGE_SHAPE, 2))
        for patch in range(4):
            assert torch.all(Xt[ids == patch] == Xt[ids == patch][0])
        # and the drop rate is p, within 5 standard errors sqrt(p (1-p) / 2000) of the 4 x 500 patch draws
        dropped = float(torch.stack([Xt[ids == patch][0] == 0 for patch in range(4)]).double().mean())
        assert abs(dropped - corruption["p"]) < 5 * math.sqrt(corruption["p"] * (1 - corruption["p"]) / 2000)
    with pytest.raises(ValueError):
        lt.corruption_moments(X @ X.T, X.shape[1], "mask", p=0.5, patch=2)  # patches need image_shape


def test_gaussian_noise_shrinks_the_eigenvalues_and_never_moves_the_subspace():
    X, _ = make_data()
    n = X.shape[1]
    d = torch.linalg.svdvals(X) ** 2  # eigenvalues of X X^T, descending
    for sigma in (0.01, 0.5, 3.0):
        E, _, loss, mu = lt.dae_from_gram(X @ X.T, n, K, "gaussian", sigma)
        predicted = d[:K] ** 2 / (d[:K] + n * sigma ** 2)  # the paper's d^2 / (d + N sigma^2)
        # rounding: eigenvalues of a well-conditioned 32 x 32 matrix to ~D * EPS relative = 7e-15
        assert torch.allclose(mu, predicted, rtol=1e-12, atol=0)
        assert angle_deg(E, pca_rows(X, K)) < 1e-8  # as in Eckart-Young above
        assert relative_gap(loss, float(d.sum() - predicted.sum())) < 1e-12


@pytest.mark.parametrize("corruption", CORRUPTIONS[:2], ids=CORRUPTION_IDS[:2])
def test_reusing_the_eigendecomposition_changes_nothing(corruption):
    # align passes eigh(X X^T) in (for none and gaussian, S shares its eigenvectors): same result
    X, _ = make_data()
    gram, n = X @ X.T, X.shape[1]
    fresh = lt.dae_from_gram(gram, n, K, **corruption)
    reused = lt.dae_from_gram(gram, n, K, **corruption, gram_eig=torch.linalg.eigh(gram))
    assert relative_gap(reused[2], fresh[2]) < 1e-12 and torch.allclose(reused[3], fresh[3], rtol=1e-12)
    assert angle_deg(reused[0], fresh[0]) < 1e-8


def test_entrywise_masking_of_standardised_data_is_pca_and_patches_move_it():
    X, _ = make_data()
    X_std = X / X.std(1, keepdim=True)
    E = lt.dae_closed_form(X_std, K, "mask", p=0.7)[0]
    # S = (1-p)^2 X X^T + p (1-p) diag(X X^T), and the diagonal is a constant after standardising
    assert angle_deg(E, pca_rows(X_std, K)) < 1e-8
    E_patch = lt.dae_closed_form(X_std, K, "mask", p=0.7, patch=2, image_shape=IMAGE_SHAPE)[0]
    assert angle_deg(E_patch, pca_rows(X_std, K)) > 1.0
    # unstandardised data: even entry-wise masking moves it
    X_raw = X * torch.linspace(0.2, 3.0, X.shape[0], dtype=torch.float64)[:, None]
    assert angle_deg(lt.dae_closed_form(X_raw, K, "mask", p=0.7)[0], pca_rows(X_raw, K)) > 1.0


def test_rank_deficient_data_pads_with_zero_features():
    X, _ = make_data(n=6)  # D = 32 > N: X X^T has rank 5 after centring
    E, G, loss = lt.dae_closed_form(X, 8)
    assert E.shape == (8, 32) and torch.all(E[5:] == 0)
    assert loss < 1e-9 * float((X ** 2).sum())  # 5 directions reconstruct everything


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=CORRUPTION_IDS)
def test_verifys_references_reach_the_closed_form(corruption):
    # `verify` prints these gaps for the user: its expected-loss L-BFGS and its sampled-noise SGD
    # must themselves reach the closed form. L-BFGS: as above (<= 7e-12 measured, bound 1e-9). SGD
    # sees a fresh corruption per step; with a cosine-decayed lr over 1500 steps it ends 3e-5 to 4e-5
    # above (measured; the noise floor of the last steps), so 1e-4; without noise there is nothing to sample.
    X, _ = make_data()
    gram = X @ X.T
    C, S = lt.corruption_moments(gram, X.shape[1], **corruption)
    best = lt.dae_closed_form(X, K, **corruption)[2]
    E_fit, G_fit = lt.train_dae_expected(X, K, "lbfgs", 300, seed=1, **corruption)
    assert relative_gap(float(lt.expected_dae_loss(E_fit, G_fit, gram, C, S)), best) < 1e-9
    if corruption["noise"] != "none":
        E_fit, G_fit = lt.train_dae_sampled(X, K, 1500, seed=0, **corruption)
        assert relative_gap(float(lt.expected_dae_loss(E_fit, G_fit, gram, C, S)), best) < 1e-4


# --- Theorem 1 ---------------------------------------------------------------------------------------

def plain_bilinear_loss(V, W, Z, X, Y, lam):
    """||Y - W^T V^T X||^2 + lam ||X - Z^T V^T X||^2, as the theorem states it."""
    return ((Y - W.T @ V.T @ X) ** 2).sum() + lam * ((X - Z.T @ V.T @ X) ** 2).sum()


def brute_force_one_feature(X, Y, lam, points=201, zooms=7):
    """min over unit directions v in R^3 of the loss with the best W, Z for the feature f = v^T X
    (each a 1-D least-squares fit: ||A - A f^T f / ||f||^2||^2 = ||A||^2 - ||A f^T||^2 / ||f||^2),
    by grid search over the sphere, zooming 10 grid steps around the best point 7 times."""
    theta, phi, half_width = math.pi / 2, math.pi / 2, math.pi / 2
    for _ in range(zooms):
        grid_t = torch.linspace(theta - half_width, theta + half_width, points, dtype=torch.float64)
        grid_p = torch.linspace(phi - half_width, phi + half_width, points, dtype=torch.float64)
        T, P = torch.meshgrid(grid_t, grid_p, indexing="ij")
        directions = torch.stack([T.sin() * P.cos(), T.sin() * P.sin(), T.cos()], -1).reshape(-1, 3)
        f = directions @ X  # (M, N): one candidate feature per row
        norm = (f ** 2).sum(1)
        losses = ((Y ** 2).sum() - ((f @ Y.T) ** 2).sum(1) / norm) + lam * ((X ** 2).sum() - ((f @ X.T) ** 2).sum(1) / norm)
        best = int(losses.argmin())
        theta, phi, half_width = float(T.reshape(-1)[best]), float(P.reshape(-1)[best]), half_width * 10 / (points - 1)
    return float(losses[best]), directions[best]


@pytest.mark.parametrize("lam", [0.0, 0.05, 0.3, 3.0])
def test_theorem1_against_brute_force(lam):
    # D = 3, one feature, two classes: the optimum over every direction by grid search
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(3, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 60, generator=gen, dtype=torch.float64)
    X = X - X.mean(1, keepdim=True)
    labels = (torch.randn(3, generator=gen, dtype=torch.float64) @ X + 0.5 * torch.randn(60, generator=gen, dtype=torch.float64) > 0)
    Y = torch.nn.functional.one_hot(labels.long(), 2).T.double()
    V, W, Z, loss = lt.bilinear_closed_form(X, Y, 1, lam)
    searched, direction = brute_force_one_feature(X, Y, lam)
    # The last grid's step is pi (10/200)^6 / 200 = 2.5e-10 rad, so the grid minimum exceeds the true one
    # by ~L'' h^2 ~ 1e-19 relative: only float64 rounding of the sums remains (~1e-15, measured 9e-16).
    assert relative_gap(searched, loss) < 1e-12
    # the same direction: the loss is flat to O(angle^2) at its minimum, so rounding 1e-15 of the loss
    # pins the direction to ~sqrt(1e-15) = 3e-8 rad = 2e-6 degrees (measured <= 4e-6); 1e-3 degrees.
    assert angle_deg(V.T, direction[None]) < 1e-3
    # and its W, Z are the least-squares ones with the loss it reports (the plain statement)
    assert relative_gap(float(plain_bilinear_loss(V, W, Z, X, Y, lam)), loss) < 1e-12
    # non-trivial: the direction moves from the labels' (lam = 0) towards PCA's as lam grows
    expected_angle_to_pca = {0.0: 65.0, 0.05: 63.1, 0.3: 51.0, 3.0: 5.9}[lam]  # measured with the brute force above
    assert abs(angle_deg(V.T, pca_rows(X, 1)) - expected_angle_to_pca) < 0.1


@pytest.mark.parametrize("lam", [0.0, 0.3, 5.0])
def test_theorem1_against_lbfgs(lam):
    # D = 32, K = 2, three classes: the test's own L-BFGS on the plain statement of the theorem's loss
    X, Y = make_data()
    V, W, Z, loss = lt.bilinear_closed_form(X, Y, 2, lam)
    # float64 sums of N (C + lam D) products: relative rounding far below 1e-12
    assert relative_gap(float(plain_bilinear_loss(V, W, Z, X, Y, lam)), loss) < 1e-12
    # the theorem's normalisation V^T X X^T V = I (entries O(1); rounding ~D EPS)
    assert torch.allclose(V.T @ X @ X.T @ V, torch.eye(2, dtype=torch.float64), atol=1e-10)
    V_fit, W_fit, Z_fit = lbfgs_minimum(lambda V, W, Z: plain_bilinear_loss(V, W, Z, X, Y, lam),
                                        [(32, 2), (2, 3), (2, 32)], seed=0, iterations=400)
    found = float(plain_bilinear_loss(V_fit, W_fit, Z_fit, X, Y, lam))
    # L-BFGS ends within 3e-14 relative here (measured), far inside 1e-9; nothing may beat the closed
    # form beyond rounding (1e-10)
    assert found >= loss * (1 - 1e-10) and relative_gap(found, loss) < 1e-9


def test_theorem1_limits():
    X, Y = make_data()
    # lambda = 0 with K >= C: ordinary least squares of Y on X (a direct lstsq solve)
    ols = float(((Y.T - X.T @ torch.linalg.lstsq(X.T, Y.T).solution) ** 2).sum())
    assert relative_gap(lt.bilinear_closed_form(X, Y, 3, 0.0)[3], ols) < 1e-10
    # lambda = 0, K < C: reduced-rank regression (Izenman 1975), written here: the OLS fit projected on
    # its top-K left singular vectors; and the module's own reference (used by verify) agrees
    fitted = Y @ X.T @ torch.linalg.solve(X @ X.T, X)
    U = torch.linalg.svd(fitted, full_matrices=False)[0][:, :2]
    rrr = float(((Y - U @ U.T @ fitted) ** 2).sum())
    assert relative_gap(lt.bilinear_closed_form(X, Y, 2, 0.0)[3], rrr) < 1e-10
    assert relative_gap(lt.reduced_rank_regression_loss(X, Y, 2), rrr) < 1e-12
    # lambda -> infinity: PCA. At lambda = 1e8 the label term tilts the subspace by O(1 / lambda)
    # (measured 3e-7 degrees); 1e-4 degrees, while lambda = 0.01 is more than a degree away
    V = lt.bilinear_closed_form(X, Y, K, 1e8)[0]
    assert angle_deg(V.T, pca_rows(X, K)) < 1e-4
    assert angle_deg(lt.bilinear_closed_form(X, Y, K, 0.01)[0].T, pca_rows(X, K)) > 1.0
    with pytest.raises(ValueError):
        lt.bilinear_closed_form(X, Y, K, -1.0)


# --- alignment ----------------------------------------------------------------------------------------

def direct_scores(F, Y):
    """The alignment numbers of features F (N, K), computed the long way: for each k an explicit
    least-squares fit of the labels on the first k features, and a QR of the N x K feature matrix."""
    N, k_max = F.shape
    err, projected = [], []
    for k in range(1, k_max + 1):
        fit = F[:, :k] @ np.linalg.lstsq(F[:, :k], Y.T, rcond=None)[0]  # P_k Y^T
        err.append(((Y.T - fit) ** 2).sum())
        projected.append(np.linalg.norm(fit))
    projection = 100 * np.array(projected) / projected[-1]  # 100 ||P_K Y|| / ||P_D Y||
    Q = np.linalg.qr(F)[0]  # (N, K) nested orthonormal basis q_k of the features
    ## the authors' normalisation: 100 sqrt(cumsum ||Y^T Y q_k / N||^2) / (its value at K = D)
    energy = np.array([np.sum((Y.T @ (Y @ Q[:, k]) / N) ** 2) for k in range(k_max)])
    authors = 100 * np.sqrt(np.cumsum(energy) / energy.sum())
    return np.array(err), projection, authors


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=CORRUPTION_IDS)
@pytest.mark.parametrize("classes", ["balanced", "unbalanced"])
def test_alignment_scores_equal_a_direct_computation(corruption, classes):
    X, _ = make_data(n=210)
    labels = torch.arange(210) % 3 if classes == "balanced" else (torch.arange(210) % 10 > 6).long() + (torch.arange(210) % 10 > 8).long()
    Y = torch.nn.functional.one_hot(labels, 3).T.double()  # balanced 70 / 70 / 70, unbalanced 147 / 42 / 21
    E = lt.dae_closed_form(X, X.shape[0], **corruption)[0]
    curve = lt.alignment_curve(E, torch.linalg.eigh(X @ X.T), X @ Y.T, Y.sum(1))
    err, projection, authors = direct_scores((E @ X).T.numpy(), Y.numpy())
    # Two routes through different factorisations of the same well-conditioned (cond(F) < 10) problem:
    # agreement to ~cond * D * EPS = 1e-13 relative (err, scores ~O(N) and O(100)); bounds 1e-9.
    assert np.allclose(curve["err"].numpy(), err, rtol=1e-9, atol=0)
    assert np.allclose(curve["projection"].numpy(), projection, rtol=1e-9, atol=1e-9)
    assert np.allclose(curve["authors"].numpy(), authors, rtol=1e-9, atol=1e-9)
    gap = float((curve["projection"] - curve["authors"]).abs().max())
    # the two normalisations coincide for balanced classes only (n_c = N / C weighs every class alike)
    assert gap < 1e-9 if classes == "balanced" else gap > 1.0


def test_alignment_with_fewer_samples_than_pixels():
    # N = 20 < D = 32: the features span 19 directions; K > 19 adds nothing, and the curve still has D values
    X, Y = make_data(n=20)
    E = lt.dae_closed_form(X, 32)[0]
    curve = lt.alignment_curve(E, torch.linalg.eigh(X @ X.T), X @ Y.T, Y.sum(1))
    err, projection, _ = direct_scores((E[:19] @ X).T.numpy(), Y.numpy())
    assert len(curve["err"]) == 32 and np.allclose(curve["err"][:19].numpy(), err, rtol=1e-9)
    assert np.allclose(curve["projection"][:19].numpy(), projection, rtol=1e-9)
    assert torch.all(curve["projection"][18:] == curve["projection"][18])


def test_principal_angles_of_subspaces_built_with_known_angles():
    # span(e1, e2) against span(cos a e1 + sin a e3, cos b e2 + sin b e4): the angles are a and b exactly
    a, b = 1e-7, 0.6  # a tiny one too: the module uses atan2(sin, cos) to keep it accurate
    eye = torch.eye(6, dtype=torch.float64)
    A = torch.stack([eye[0], eye[1]])
    B = torch.stack([math.cos(b) * eye[1] + math.sin(b) * eye[3], math.cos(a) * eye[0] + math.sin(a) * eye[2]])
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    angles = lt.principal_angles(A @ rotation, 3 * B @ rotation)  # a common rotation and a scale change nothing
    # rounding: EPS relative on the sines (1e-7 * 2e-16 rad) and on the cosines of 0.6 rad
    assert torch.allclose(angles, torch.tensor([math.degrees(a), math.degrees(b)], dtype=torch.float64), rtol=1e-9, atol=0)
    ## A and B unrotated are a different input from the rotated pair, so the last bits may differ by
    ## BLAS and CPU (one ulp, 7e-15 degrees, was seen): compare at the accuracy asserted just above.
    assert lt.max_principal_angle(A, B) == pytest.approx(float(angles.max()), rel=1e-9, abs=0)


def test_pixel_statistics_match_a_direct_computation():
    gen = np.random.default_rng(0)
    images = gen.integers(0, 256, size=(50, 2, 3, 3), dtype=np.uint8)
    labels = gen.integers(0, 4, size=50)
    stats = lt.pixel_statistics(images, labels, 4, torch.device("cpu"), chunk=7)
    X = torch.from_numpy(images.reshape(50, -1)).double().T / 255
    mean = X.mean(1)
    X = X - mean[:, None]
    Y = torch.nn.functional.one_hot(torch.from_numpy(labels), 4).T.double()
    # centring after the fact cancels sum x x^T (~50 per entry) against n m m^T: rounding ~50 * EPS = 1e-14
    assert torch.allclose(stats["gram"], X @ X.T, atol=1e-12) and torch.allclose(stats["xy"], X @ Y.T, atol=1e-12)
    assert torch.allclose(stats["mean"], mean, atol=1e-15) and torch.equal(stats["counts"], Y.sum(1))
    assert stats["image_shape"] == (2, 3, 3) and stats["n"] == 50
    # standardised: every pixel divided by its own std (a constant pixel left at zero)
    images[:, 0, 0, 0] = 7  # a constant pixel
    stats = lt.standardized(lt.pixel_statistics(images, labels, 4, torch.device("cpu")))
    X = torch.from_numpy(images.reshape(50, -1)).double().T / 255
    X = X - X.mean(1, keepdim=True)
    std = X.std(1, unbiased=False)
    X = torch.where(std[:, None] > 0, X / std[:, None].clamp_min(1e-300), torch.zeros_like(X))
    assert torch.allclose(stats["gram"], X @ X.T, atol=1e-10) and torch.allclose(stats["xy"], X @ Y.T, atol=1e-10)


# --- top / bottom subspaces and learning order ---------------------------------------------------

@pytest.mark.parametrize("end", ["top", "bottom"])
@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5, 0.9, 1.0])
def test_variance_subspace_keeps_the_requested_fraction(end, fraction):
    X, _ = make_data(n=500)
    eigvals, eigvecs = lt.covariance_eigh(X @ X.T, X.shape[1])
    assert torch.all(eigvals.diff() <= 0) and torch.allclose(eigvals, torch.linalg.svdvals(X) ** 2 / 500, rtol=1e-12)
    basis, kept = lt.variance_subspace(eigvals, eigvecs, fraction, end)
    k = basis.shape[1]
    projected = basis @ basis.T @ X
    actual = float((projected ** 2).sum() / (X ** 2).sum())  # the variance the projected images really keep
    assert abs(actual - kept) < 1e-10 and kept >= fraction - 1e-12  # rounding of sums of 32 x 500 squares
    # the fewest directions: one fewer would not reach the fraction
    one_less = eigvals[:k - 1].sum() if end == "top" else eigvals[len(eigvals) - k + 1:].sum()
    assert float(one_less / eigvals.sum()) < fraction
    # leading or trailing directions, as asked: the same span as the SVD's
    singular_vectors = torch.linalg.svd(X, full_matrices=False)[0]
    expected = singular_vectors[:, :k] if end == "top" else singular_vectors[:, X.shape[0] - k:]
    assert angle_deg(basis.T, expected.T) < 1e-6


def test_projected_images_are_mean_plus_projection():
    gen = np.random.default_rng(1)
    images = gen.integers(0, 256, size=(5, 1, 2, 2), dtype=np.uint8)
    mean = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    basis = torch.linalg.qr(torch.from_numpy(gen.normal(size=(4, 2))))[0]
    x = torch.from_numpy(images.reshape(5, 4)).double() / 255
    expected = (mean + (x - mean) @ basis @ basis.T).reshape(5, 1, 2, 2)
    # the module computes in float32: ~1e-7 relative on values <= 1
    assert torch.allclose(lt.project_images(images, mean, basis, torch.device("cpu")).double(), expected, atol=1e-6)


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
    # Discrete steps against the flow: direction k's error is (1 - 2 lr l_k)^(2 s) = exp(-4 l_k t - 4 s (lr l_k)^2 - ...),
    # t = lr s, so its relative error is at most 4 s (lr l_1)^2 = 4 * 3000 * 1e-6 = 1.2e-2 (largest l);
    # a band's error is a positive mix of its directions', so the same bound holds: rtol 1.3e-2.
    assert torch.allclose(measured, predicted, rtol=1.3e-2, atol=0)
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
    common = ["--datasets", f"folder:{tmp_path / 'images'}", "--img-size", "8", "--out-dir", str(tmp_path / "out"),
              "--data-dir", str(tmp_path / "data")]  # the resized copy is cached under --data-dir
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
    # K above D: refused before any computation (it used to run 4 minutes on CIFAR-10 and print nan)
    (["align", "--ks", "8,1000000"], "--ks 1000000 asks for more features than shapes has pixel coordinates (D = 3072)"),
    (["align", "--datasets", "shapes,mnist", "--ks", "1000"], "give --ks values up to 784"),
    (["align", "--img-size", "8", "--ks", "8,193"], "(D = 192)"),  # untyped, the default list keeps its K <= 192 (align on 8x8 images above)
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
def test_bad_input_ends_with_one_sentence_and_changes_nothing(argv, word, workdir, capsys, monkeypatch):
    def let_through(*args):  # a flag that passes validation would start real work: fail fast instead
        raise AssertionError(f"validation let {argv} through")
    monkeypatch.setattr(lt, "verify", let_through)
    if "--no-download" not in argv:  # the cases about missing data do load (and fail) for real
        monkeypatch.setattr(lt, "load_datasets", let_through)
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
    assert capsys.readouterr().err == "error: --device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto.\n"


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

    def half_then_interrupt(f):
        f.write(b"{")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        lt.atomic_write(str(target), half_then_interrupt)
    assert os.listdir(tmp_path / "out") == []  # neither the target nor the temporary file
    lt.write_json(str(target), {"a": 1})
    assert target.read_text().replace(" ", "").replace("\n", "") == '{"a":1}'
    # an output that cannot be written at the end (here: a directory in its place) is one sentence
    (tmp_path / "out" / "taken.json").mkdir()
    with pytest.raises(lt.UserError, match="could not write"):
        lt.write_json(str(tmp_path / "out" / "taken.json"), {"a": 1})
    assert sorted(os.listdir(tmp_path / "out")) == ["result.json", "taken.json"]  # no temporary file left


def write_folder(root, classes, per_class=4, seed=0):
    """root/train/<class>/ and root/val/<class>/ with random 6x6 RGB PNGs."""
    import matplotlib.image
    gen = np.random.default_rng(seed)
    for split in ("train", "val"):
        for cls in classes:
            os.makedirs(root / split / cls)
            for i in range(per_class):
                matplotlib.image.imsave(root / split / cls / f"{i}.png", gen.integers(0, 256, (6, 6, 3), dtype=np.uint8))


def test_one_class_dataset_warns_in_one_line(tmp_path, capsys):
    write_folder(tmp_path / "one", ["cat"])
    common = ["--img-size", "6", "--ks", "4", "--out-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")]
    assert lt.main(["align", "--datasets", f"folder:{tmp_path / 'one'}", *common]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "single class" in warnings[0] and "100 % and means nothing" in warnings[0]
    write_folder(tmp_path / "two", ["cat", "dog"])
    assert lt.main(["align", "--datasets", f"folder:{tmp_path / 'two'}", *common]) == 0
    assert "warning" not in capsys.readouterr().out


def test_symlink_loop_named_like_an_image_is_one_sentence(tmp_path, capsys):
    write_folder(tmp_path / "images", ["cat", "dog"])
    loop = tmp_path / "images" / "val" / "dog" / "loop.png"
    os.symlink("loop.png", loop)  # a real loop: stat and open fail with ELOOP
    assert lt.main(["align", "--datasets", f"folder:{tmp_path / 'images'}", "--img-size", "6", "--ks", "4",
                    "--out-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {loop} cannot be read (Too many levels of symbolic links); fix or remove it.")
    assert not (tmp_path / "out").exists()


class RunsCode:
    """Unpickling this runs os.makedirs(path): a harmless stand-in for a malicious pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


def test_a_cache_holding_a_pickled_object_is_never_run_and_is_rebuilt(tmp_path, capsys):
    # the only file linear_theory.py reads with torch.load is the image-folder cache under --data-dir
    write_folder(tmp_path / "images", ["cat", "dog"])
    first = lt.load_dataset(f"folder:{tmp_path / 'images'}", str(tmp_path / "data"), size=6)
    (cache,) = (tmp_path / "data" / "image_folder_cache").iterdir()
    marker = tmp_path / "code_ran"
    torch.save({"fingerprint": RunsCode(str(marker))}, cache)
    capsys.readouterr()
    again = lt.load_dataset(f"folder:{tmp_path / 'images'}", str(tmp_path / "data"), size=6)
    assert not marker.exists()
    assert capsys.readouterr().out.splitlines()[0] == f"the cache {cache} is unreadable (UnpicklingError): rebuilding it"
    assert np.array_equal(again["train"][0], first["train"][0]) and np.array_equal(again["test"][1], first["test"][1])
