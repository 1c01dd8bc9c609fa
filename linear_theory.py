"""
linear_theory.py: why learning by reconstruction spends its features on the wrong directions,
in closed form. The linear (denoising) autoencoder, Theorem 1's supervised + reconstruction
model, the alignment measure, and four experiments that make them visible, in one file.

Paper: Balestriero & LeCun, "Learning by Reconstruction Produces Uninformative Features For
Perception" (ICML 2024, arXiv 2402.11337). A linear autoencoder with K features learns the
top-K principal subspace of the pixels. On natural images most pixel variance is background,
colour and lighting, so those K features explain the labels poorly (the alignment measure).
A corruption can move the learned subspace only by changing the second moment S = E[Xt Xt^T]
differently in different directions: additive Gaussian noise adds N sigma^2 I and never moves it,
whatever sigma; masking multiplies S entry-wise and does.

Run (each command prints what it does; `--help` lists every knob with its default; a bad flag or output
path ends in one `error:` sentence, exit code 2, before anything is computed or written; Ctrl-C exits 130,
SIGTERM 143, each with one line).
Timings: 2-core CPU, OMP_NUM_THREADS=1:

    python linear_theory.py verify      # 27 checks: every closed form against Adam / L-BFGS / sampled-noise SGD (16-35 s)
    python linear_theory.py align --datasets shapes,fashion-mnist,cifar10          # Figure 2 + corruption table (~6 min)
    python linear_theory.py subspace --datasets cifar10 --train-limit 10000 --epochs 4 --width 16 --seeds 0,1,2  # Figs 1/4 (~6 min)
    python linear_theory.py subspace --datasets cifar10 --epochs 30 --width 64 --seeds 0,1,2   # the same at full size, one GPU
    python linear_theory.py order --datasets fashion-mnist    # which eigen-directions are learned first (~30 s)

Outputs go to --out-dir (default runs/linear): alignment.png/.json, subspace_<dataset>.png + subspace.json,
order_<dataset>.png + order.json. Every JSON holds this script's name, the config and every number printed.
One command at a time per --out-dir (a second one is refused), and never a training run's out-dir (one
with a config.json); a full disk is one sentence, with the previous file of that name whole.

Known-good numbers produced by this file (README.md has the full tables, commands and times):
* verify: 27/27 checks pass; L-BFGS reaches the closed-form loss to a relative gap <= 2e-12, SGD on
  freshly sampled corruptions to ~2e-5; Gaussian noise: eigenvalues d^2/(d + N sigma^2) to 4e-15.
* align, no corruption, projection score at K = 8 / 32 / 128: Fashion-MNIST 80.1 / 92.7 / 97.9 %,
  CIFAR-10 56.7 / 71.9 / 79.4 % (official files, all training images). Gaussian noise changes no score
  (largest angle to PCA <= 4e-7 degrees); patch masking (p 0.75, patch 4) moves CIFAR-10's by up to +6.6 points.
* subspace, CIFAR-10 (10k train images, small CNN, 4 epochs, 3 seeds): all pixels 50.0 +- 0.2 %,
  top 90 % of the variance (91 directions) 43.2 +- 0.2 %, bottom 20 % (3042 directions) 47.6 +- 0.2 %.

Memory: the closed forms hold about ten dense float64 D x D matrices: 0.05 GB for D = 784,
0.75 GB for D = 3072 (CIFAR; peak RSS of the whole CIFAR-10 align run: 1.6 GB), 12 GB for D = 12288
(64x64 RGB). Pixels stream through in chunks; every eigendecomposition is done once and reused.

Reading order: the Config (every knob) -> THE IDEA (the closed forms, Theorem 1, the alignment
measure: each equation beside the line that implements it) -> the gradient-based references that
check them -> the four experiments -> their reports -> plumbing (command line, data, files) -> main.
Two comment layers: `##` lines teach (which equation of which paper a line implements) and can be
stripped with `sed '/^\\s*## /d'`; `#` lines are ordinary comments.
"""
import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import inspect
import json
import math
import os
import pickle
import shutil
import signal
import socket
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


# =============================================================================================
# Config: every knob of every command with its default (`--help` prints the same). Read first.
# =============================================================================================

@dataclasses.dataclass
class Config:
    # --- data ---
    datasets: str = "shapes"      # comma list: glyphs | shapes | textures (all built-in) | cifar10 | cifar100 | fashion-mnist | mnist | folder:PATH
    data_dir: str = "data"        # where datasets are looked for and downloaded to (and image folders cached)
    download: bool = True         # download missing official files (checksum verified before use)
    train_limit: int = 0          # use only the first N training images (0 = all; order then uses 10000)
    img_size: int = 32            # image side for shapes and folder: datasets (64 -> D = 12288 in RGB)
    # --- align: Figure 2 and the corruption table ---
    corruptions: str = "none,gaussian:0.3,mask:0.75:1,mask:0.75:4"  # none | gaussian:SIGMA | mask:P:PATCH (pixels in [0, 1])
    ks: str = "8,16,32,64,128,256"  # K values of the printed table, each at most D (the default list skips larger ones)
    standardize: bool = False     # divide every pixel by its std first (then entry-wise masking = PCA)
    # --- subspace: Figures 1 and 4 ---
    top: str = "0.9"              # comma list: keep the leading eigenvectors explaining these variance fractions
    bottom: str = "0.2"           # comma list: keep the trailing eigenvectors explaining these fractions
    epochs: int = 5               # classifier epochs per projection
    batch_size: int = 128         # classifier batch size
    lr: float = 2e-3              # classifier AdamW peak lr (one-cycle: 15% warm-up, then cosine; weight decay 5e-4)
    width: int = 32               # channels of the classifier's first conv (then 2x, 4x)
    seeds: str = "0"              # comma list of seeds; several give mean +- std
    # --- order: which directions are learned first ---
    ae_steps: int = 600           # Adam steps of the deep autoencoder
    ae_hidden: int = 512          # hidden width of the deep autoencoder (D -> hidden -> bottleneck -> hidden -> D)
    ae_bottleneck: int = 128      # its code size
    ae_lr: float = 1e-3           # its Adam lr
    # --- system ---
    device: str = "auto"          # auto | cuda | mps | cpu (float64 linear algebra runs on cuda or cpu)
    out_dir: str = "runs/linear"  # where PNG and JSON outputs go
    threads: int = 0              # torch CPU threads (0 = torch's default; verify then uses 1)
    seed: int = 0                 # seed of the toy data, initialisations and corruptions


COMMANDS = ("verify", "align", "subspace", "order")


# =============================================================================================
# THE IDEA 1/3: the optimal linear denoising autoencoder, in closed form. Start reading here.
# =============================================================================================
## Notation. X (D, N): N centred images as columns, one row per
## pixel coordinate (D = C * H * W). Y (C, N): their one-hot labels. A linear autoencoder with K
## features has an encoder E (K, D) and a decoder G (D, K): features E X (K, N), reconstruction G E X.
## The DENOISING autoencoder sees a corrupted input Xt ~ q(. | X) and must give back the clean X:
##     L(G, E) = E_q || X - G E Xt ||_F^2
##             = tr(X X^T) - 2 tr(G E C) + tr(G E S E^T G^T)      (expand the square, then take E_q)
## with C = E[Xt] X^T = E[Xt X^T] (D, D) and S = E[Xt Xt^T] (D, D). The loss sees the data only
## through these D x D matrices: the optimum is a D x D eigenproblem, whatever N is.

RANK_RTOL = 1e-10  # eigenvalues of S below RANK_RTOL * max are treated as 0: we work in the span of the data


def as_float64(array):
    return torch.as_tensor(array).double()


def patch_ids(image_shape, patch):
    """(D,) the index of the spatial patch each coordinate of a flattened (C, H, W) image lies in.
    Every channel of a pixel shares its patch; edge patches may be smaller when patch does not divide H or W."""
    channels, height, width = image_shape
    rows, cols = torch.arange(height) // patch, torch.arange(width) // patch
    ids = rows[:, None] * math.ceil(width / patch) + cols[None, :]  # (H, W)
    return ids.expand(channels, height, width).reshape(-1)


def corruption_moments(gram, n, noise="none", sigma=0.0, p=0.0, patch=1, image_shape=None):
    """C = E[Xt X^T] and S = E[Xt Xt^T] (both (D, D)) of the corrupted data, from gram = X X^T."""
    dim = gram.shape[0]
    ## No corruption, Xt = X: C = S = X X^T, and the autoencoder is PCA (Eckart-Young).
    if noise == "none":
        return gram, gram
    if noise == "gaussian":
        ## Xt = X + sigma eps, eps ~ N(0, I) per coordinate and sample: E[Xt] = X, so C = X X^T, and the
        ## cross terms vanish in expectation: S = X X^T + sigma^2 E[eps eps^T] = X X^T + N sigma^2 I.
        ## S and C share their eigenvectors, so the learned subspace is PCA's whatever sigma.
        return gram, gram + n * sigma ** 2 * torch.eye(dim, dtype=gram.dtype, device=gram.device)
    if noise == "mask":
        if not 0 <= p < 1:
            raise ValueError(f"the masking probability p must be in [0, 1), got {p}")
        if image_shape is None:
            if patch != 1:
                raise ValueError("patch masking needs image_shape=(C, H, W); without it every coordinate is its own patch")
            ids = torch.arange(dim)
        else:
            if math.prod(image_shape) != dim:
                raise ValueError(f"image_shape {tuple(image_shape)} does not hold D = {dim} coordinates")
            ids = patch_ids(image_shape, patch)
        ids = ids.to(gram.device)
        same_patch = ids[:, None] == ids[None, :]  # (D, D) bool
        ## Xt = m o X, m_i ~ Bernoulli(1-p) shared by every coordinate of a patch (all channels), and
        ## no 1/(1-p) rescaling (it would scale E and G, not move the subspace). E[Xt] = (1-p) X, so
        ## C = (1-p) X X^T. E[m_i m_j] = 1-p when i and j lie in one patch (i = j included), (1-p)^2
        ## otherwise: S = (X X^T) o M, a Hadamard product that shrinks the off-patch correlations
        ## and so tilts the eigenvectors away from PCA's.
        keep_both = torch.where(same_patch, 1 - p, (1 - p) ** 2).to(gram.dtype)  # M (D, D)
        return (1 - p) * gram, gram * keep_both
    raise ValueError(f"noise must be 'none', 'gaussian' or 'mask', got '{noise}'")


def generalized_eigh(A, S, S_eig=None, rtol=RANK_RTOL):
    """Solve A v = mu S v (A, S symmetric (D, D), S >= 0) in the span of S. Returns mu (r,) in
    descending order and V (D, r) with V^T S V = I. S_eig = (eigenvalues, eigenvectors) of S
    when they are already known, so an eigendecomposition is never repeated."""
    s, Q = S_eig if S_eig is not None else torch.linalg.eigh(S)
    keep = s > rtol * s.max()
    ## Whitening: S = Q diag(s) Q^T, so with v = Q s^{-1/2} u (in the span of S) the problem
    ## A v = mu S v becomes the ordinary symmetric one (s^{-1/2} Q^T A Q s^{-1/2}) u = mu u,
    ## and u^T u = 1 gives v^T S v = 1.
    whiten = Q[:, keep] / s[keep].sqrt()  # (D, r): whiten^T S whiten = I
    mu, U = torch.linalg.eigh(whiten.T @ A @ whiten)  # ascending
    return mu.flip(0), whiten @ U.flip(1)


def top_k(mu, V, K):
    """The K leading (mu, v) pairs; when the span holds fewer than K directions, the rest are zero."""
    missing = K - len(mu)
    if missing <= 0:
        return mu[:K], V[:, :K]
    return F.pad(mu, (0, missing)), F.pad(V, (0, missing))


def dae_from_gram(gram, n, K, noise="none", sigma=0.0, p=0.0, patch=1, image_shape=None, gram_eig=None):
    """The optimal linear denoising autoencoder from gram = X X^T (D, D) of n centred samples.
    Returns E (K, D), G (D, K), the optimal expected loss, and the generalised eigenvalues mu (K,).
    gram_eig = eigh(gram), when known, is reused for 'none' and 'gaussian' (their S shares its eigenvectors)."""
    dim = gram.shape[0]
    if not 1 <= K <= dim:
        raise ValueError(f"K must be in [1, D = {dim}], got {K}")
    C, S = corruption_moments(gram, n, noise, sigma, p, patch, image_shape)
    S_eig = None
    if gram_eig is not None and noise != "mask":
        S_eig = (gram_eig[0] + (n * sigma ** 2 if noise == "gaussian" else 0.0), gram_eig[1])
    ## For a fixed E the loss is quadratic in G: setting its gradient -2 C^T E^T + 2 G E S E^T to 0
    ## gives G = C^T E^T (E S E^T)^{-1}, and then L = tr(X X^T) - tr((E S E^T)^{-1} E C C^T E^T).
    ## That trace ratio is largest when the rows of E span the top-K generalised eigenvectors of
    ## (C C^T) v = mu S v: E*^T = those eigenvectors, normalised so that V^T S V = I.
    mu, V = top_k(*generalized_eigh(C @ C.T, S, S_eig), K)
    ## With V^T S V = I: G* = C^T E*^T (E* S E*^T)^{-1} = C^T V, and L* = tr(X X^T) - sum_{k <= K} mu_k.
    loss = gram.trace() - mu.sum()
    return V.T, C.T @ V, float(loss), mu


def dae_closed_form(X, K, noise="none", sigma=0.0, p=0.0, patch=1, image_shape=None):
    """The optimal linear denoising autoencoder min_{G, E} E_q ||X - G E Xt||_F^2 for centred data
    X (D, N), corruption 'none', 'gaussian' (Xt = X + sigma eps) or 'mask' (each patch of
    `patch` x `patch` pixels, all channels, zeroed with probability p; image_shape = (C, H, W)).
    Returns encoder E (K, D), decoder G (D, K), and the optimal expected loss (float)."""
    X = as_float64(X)
    E, G, loss, _ = dae_from_gram(X @ X.T, X.shape[1], K, noise, sigma, p, patch, image_shape)
    return E, G, loss


def expected_dae_loss(E, G, gram, C, S):
    """L(G, E) = E_q ||X - G E Xt||^2 = tr(X X^T) - 2 tr(G E C) + tr(G E S E^T G^T)."""
    GE = G @ E  # (D, D)
    ## tr(A B) = sum_ij A_ij B_ji: (GE * C^T).sum() = tr(G E C), ((GE S) * GE).sum() = tr(G E S E^T G^T).
    return gram.trace() - 2 * (GE * C.T).sum() + ((GE @ S) * GE).sum()


# =============================================================================================
# THE IDEA 2/3: Theorem 1 (supervision + reconstruction) and the alignment measure. Read this.
# =============================================================================================
## Theorem 1 (Balestriero & LeCun 2024): K features V^T X (V (D, K)) that must serve BOTH a linear
## classifier W (K, C) and a linear decoder Z (K, D), reconstruction weighted by lam >= 0:
##     min_{V, W, Z}  || Y - W^T V^T X ||^2 + lam || X - Z^T V^T X ||^2.
## lam = 0 is reduced-rank regression (the features that best predict the labels); lam -> infinity
## is reconstruction alone, i.e. PCA. In between, the features follow the labels only as far as the
## pixel variance lets them: the paper's point is that on natural images they mostly do not.

def bilinear_closed_form(X, Y, K, lam):
    """Theorem 1: min_{V, W, Z} ||Y - W^T V^T X||^2 + lam ||X - Z^T V^T X||^2 for centred X (D, N)
    and targets Y (C, N), V (D, K). Returns V (D, K), W (K, C), Z (K, D) and the optimal loss.
    Works in the span of the data (directions with X X^T eigenvalue <= 1e-10 * max are dropped)."""
    if lam < 0 or not math.isfinite(lam):
        raise ValueError(f"lam must be finite and >= 0, got {lam} (lam -> infinity is PCA: try 1e8)")
    X, Y = as_float64(X), as_float64(Y)
    gram, xy = X @ X.T, X @ Y.T  # (D, D), (D, C)
    ## For features with V^T X X^T V = I, W and Z are least-squares fits: W* = V^T X Y^T, Z* = V^T X X^T,
    ## and the loss left is ||Y||^2 + lam ||X||^2 - tr(V^T A V) with A = X Y^T Y X^T + lam (X X^T)^2.
    ## The paper writes the solution with X X^T = P diag(d) P^T, H = d^{-1/2} P^T A P d^{-1/2} and
    ## V* = P d^{-1/2} U_K (U_K the top-K eigenvectors of H): that is exactly the generalised
    ## eigenproblem A v = mu (X X^T) v solved by whitening, so eig_k(H) = mu_k.
    eig_H, V = top_k(*generalized_eigh(xy @ xy.T + lam * gram @ gram, gram), K)
    W = V.T @ xy  # (K, C): W* = V*^T X Y^T
    Z = V.T @ gram  # (K, D): Z* = V*^T X X^T
    ## L* = ||Y||^2 + lam ||X||^2 - sum_{k <= K} eig_k(H)
    loss = (Y ** 2).sum() + lam * gram.trace() - eig_H.sum()
    return V, W, Z, float(loss)


def bilinear_loss(V, W, Z, X, Y, lam):
    features = V.T @ X  # (K, N)
    return ((Y - W.T @ features) ** 2).sum() + lam * ((X - Z.T @ features) ** 2).sum()


## The alignment measure (the paper's Figure 2): how well can the best LINEAR classifier on the first
## K features F_K = E*_K X (K, N) of the optimal (denoising) autoencoder fit the labels?
##     err(K) = min_W || Y - W F_K ||^2 = ||Y||^2 - sum_{k <= K} || Y q_k ||^2,
## q_1..q_K (N,) the nested orthonormal basis of the feature rows (QR of F_K^T), so one QR serves every K.
## Reported in percent of what all D features reach: the projection score 100 ||P_K Y^T|| / ||P_D Y^T||
## (P_K the projector onto span(q_1..q_K)): 100 at K = D, low at small K when the top reconstruction
## features miss the labels.

def alignment_curve(E, gram_eig, xy, counts, rtol=1e-8):
    """The least-squares supervised error err(K) = min_W ||Y - W F_K||^2 of the first K features
    F_K = E[:K] X, for every K at once, and the two normalised scores in percent.
    E (K_max, D) encoder rows in order; gram_eig = eigh(X X^T); xy = X Y^T (D, C); counts (C,).
    Needs only D x D quantities: the N x K feature matrix is never formed."""
    d, P = gram_eig
    keep = d > RANK_RTOL * d.max()
    d, P = d[keep], P[:, keep]
    ## X = P diag(d^1/2) U^T with U (N, r) orthonormal, so F^T = X^T E^T = U B with B (r, K) below.
    ## QR of B gives the QR of F^T: q_k = U Qb[:, k] is the nested orthonormal basis,
    ## and Y q_k = (X Y^T)^T P d^{-1/2} Qb[:, k].
    B = d.sqrt()[:, None] * (P.T @ E.T)  # (r, K)
    Qb, R = torch.linalg.qr(B)
    Yq = (xy.T @ (P / d.sqrt())) @ Qb  # (C, K): column k = Y q_k
    # a feature that adds nothing new (R_kk ~ 0, e.g. a zero feature beyond the span) adds no energy
    new = R.diagonal().abs() > rtol * R.diagonal().abs().max()
    missing = E.shape[0] - len(new)  # the data span r < K directions: features beyond the r-th add nothing
    energy = F.pad((Yq ** 2).sum(0) * new, (0, missing))  # (K,) ||q_k^T Y^T||^2
    ## err(K) = ||Y||^2 - sum_{k <= K} ||q_k^T Y^T||^2  (one-hot Y: ||Y||^2 = N)
    err = counts.sum() - torch.cumsum(energy, 0)
    ## The two normalised scores. Projection energy: 100 ||P_K Y|| / ||P_D Y||.
    projection = 100 * (torch.cumsum(energy, 0) / energy.sum()).sqrt()
    ## The authors' code: 100 sqrt(cumsum ||Y^T Y q_k / N||^2) / (value at K = D); for one-hot Y,
    ## ||Y^T Y q_k||^2 = sum_c n_c (Y q_k)_c^2, so it equals the projection score for balanced classes.
    authors_energy = F.pad((counts[:, None] * Yq ** 2).sum(0) * new, (0, missing))
    authors = 100 * (torch.cumsum(authors_energy, 0) / authors_energy.sum()).sqrt()
    return dict(err=err, projection=projection, authors=authors)


def principal_angles(A, B):
    """The K principal angles in degrees (ascending) between the row spaces of A (K, D) and B (K, D)."""
    Qa, Qb = torch.linalg.qr(A.T)[0], torch.linalg.qr(B.T)[0]
    ## The cosines of the principal angles are the singular values of Qa^T Qb (Bjorck & Golub 1973).
    cosines = torch.linalg.svdvals(Qa.T @ Qb)  # descending
    ## sin of the same angles from the part of B outside A: accurate for tiny angles, where acos is not
    sines = torch.linalg.svdvals(Qb - Qa @ (Qa.T @ Qb)).flip(0)  # ascending
    return torch.rad2deg(torch.atan2(sines, cosines))


def max_principal_angle(A, B):
    return float(principal_angles(A, B).max())


# =============================================================================================
# THE IDEA 3/3: top- and bottom-variance subspaces, which directions are learned first. Read this.
# =============================================================================================
## The paper's Figures 1 and 4 keep only the eigen-directions of the pixel covariance that explain the
## top p% (or the bottom q%) of the variance and train a classifier on the projected images; Figure 3
## shows that reconstruction fits the top directions first. For the linear model this ordering is exact.

def covariance_eigh(gram, n):
    """The eigenvalues (r,) in descending order and eigenvectors (D, r) of the pixel covariance X X^T / n,
    restricted to the span of the data: a constant pixel, or fewer images than pixels, leaves
    directions without any variance (eigenvalue <= RANK_RTOL * largest), which are dropped."""
    eigvals, eigvecs = torch.linalg.eigh(gram / n)  # ascending
    keep = eigvals > RANK_RTOL * eigvals[-1]
    return eigvals[keep].flip(0), eigvecs[:, keep].flip(1)


def variance_subspace(eigvals, eigvecs, fraction, end):
    """The columns of the eigenbasis (descending eigenvalues) that keep `fraction` of the variance:
    the fewest LEADING ('top') or TRAILING ('bottom') eigenvectors whose variance reaches it.
    Returns basis (D, k) and the fraction it really keeps."""
    variance = eigvals.clamp_min(0)
    ordered = variance if end == "top" else variance.flip(0)
    ## The projected images x -> basis basis^T x keep sum_{kept} lambda_k / sum_all lambda_k of the variance.
    cumulative = torch.cumsum(ordered, 0) / variance.sum()
    k = min(int(torch.searchsorted(cumulative, torch.tensor([fraction], dtype=cumulative.dtype))) + 1, len(eigvals))
    columns = torch.arange(k) if end == "top" else torch.arange(len(eigvals) - k, len(eigvals))
    return eigvecs[:, columns], float(cumulative[k - 1])


def gradient_flow_band_error(eigvals, bands, times):
    """The linear model W (D, D), loss mean ||x - W x||^2, gradient flow from W = 0: I - W(t) = exp(-2 Sigma t),
    so the error along eigen-direction k decays as exp(-4 lambda_k t): large-variance directions first.
    eigvals (D,) of the covariance Sigma, bands [(start, stop)], times (T,) -> relative error per band (T, bands)."""
    ## dW/dt = -grad = 2 (I - W) Sigma, so R = I - W obeys dR/dt = -2 R Sigma: R(t) = exp(-2 Sigma t).
    ## The squared error along eigenvector k is lambda_k exp(-4 lambda_k t) (lambda_k: its variance).
    decay = torch.exp(-4 * times[:, None] * eigvals[None, :])  # (T, D)
    return torch.stack([(decay[:, a:b] * eigvals[a:b]).sum(1) / eigvals[a:b].sum() for a, b in bands], 1)


# =============================================================================================
# Gradient-based references: the same models trained by optimisers, to check the closed forms. Skippable.
# =============================================================================================

def sample_corruption(X, gen, noise="none", sigma=0.0, p=0.0, patch=1, image_shape=None):
    """One draw Xt ~ q(. | X) for X (D, N): a fresh noise or mask for every sample."""
    if noise == "gaussian":
        return X + sigma * torch.randn(X.shape, generator=gen, dtype=X.dtype)
    if noise == "mask":
        ids = patch_ids(image_shape, patch) if image_shape is not None else torch.arange(X.shape[0])
        kept = torch.rand(int(ids.max()) + 1, X.shape[1], generator=gen) >= p  # (patches, N)
        return X * kept[ids].to(X.dtype)  # (D, N): every coordinate of a patch shares its draw
    return X


def init_params(shapes, seed, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(s, generator=gen, dtype=torch.float64)).requires_grad_() for s in shapes]


def minimise(loss_fn, params, method, steps, lr=1e-2):
    """Minimise loss_fn() over params with 'lbfgs' (strong Wolfe) or 'adam' (cosine lr decay)."""
    if method == "lbfgs":
        optimizer = torch.optim.LBFGS(params, lr=1, max_iter=steps, max_eval=2 * steps, history_size=50,
                                      tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss
        optimizer.step(closure)
        return params
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
        schedule.step()
    return params


def train_dae_expected(X, K, method, steps, seed, **corruption):
    """A linear DAE trained on the exact expected loss. Returns E (K, D), G (D, K) (detached)."""
    X = as_float64(X)
    gram = X @ X.T
    C, S = corruption_moments(gram, X.shape[1], **corruption)
    scale = 1 / gram.trace()  # an O(1) loss for the optimiser; the minimiser does not change
    E, G = init_params([(K, X.shape[0]), (X.shape[0], K)], seed)
    minimise(lambda: scale * expected_dae_loss(E, G, gram, C, S), [E, G], method, steps)
    return E.detach(), G.detach()


def train_dae_sampled(X, K, steps, seed, lr=0.05, **corruption):
    """A linear DAE trained by SGD (momentum 0.9, cosine lr) on ||X - G E Xt||^2 with a fresh
    corruption Xt at every step: the way such a model is trained in practice."""
    X = as_float64(X)
    gen = torch.Generator().manual_seed(seed + 1)
    E, G = init_params([(K, X.shape[0]), (X.shape[0], K)], seed)
    scale = 1 / (X ** 2).sum()
    optimizer = torch.optim.SGD([E, G], lr=lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    for _ in range(steps):
        X_tilde = sample_corruption(X, gen, **corruption)
        loss = scale * ((X - G @ (E @ X_tilde)) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return E.detach(), G.detach()


def train_bilinear(X, Y, K, lam, steps, seed):
    """Theorem 1's model trained by L-BFGS. Returns V (D, K), W (K, C), Z (K, D)."""
    X, Y = as_float64(X), as_float64(Y)
    V, W, Z = init_params([(X.shape[0], K), (K, Y.shape[0]), (K, X.shape[0])], seed)
    scale = 1 / ((Y ** 2).sum() + lam * (X ** 2).sum())
    minimise(lambda: scale * bilinear_loss(V, W, Z, X, Y, lam), [V, W, Z], "lbfgs", steps)
    return V.detach(), W.detach(), Z.detach()


def reduced_rank_regression_loss(X, Y, K):
    """The textbook reduced-rank regression (Izenman 1975): project the least-squares fit
    Yhat = Y X^T (X X^T)^{-1} X onto its top-K left singular vectors."""
    fitted = Y @ X.T @ torch.linalg.solve(X @ X.T, X)  # (C, N)
    U = torch.linalg.svd(fitted, full_matrices=False)[0][:, :K]
    return float(((Y - U @ U.T @ fitted) ** 2).sum())


def toy_data(image_shape=(2, 4, 4), n=400, num_classes=3, seed=0):
    """Small correlated 'images' X (D, N), centred, with a decaying spectrum, and one-hot labels
    Y (classes, N) set by random directions (so they do not follow the top principal components)."""
    gen = torch.Generator().manual_seed(seed)
    dim = math.prod(image_shape)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0]
    scales = 0.92 ** torch.arange(dim, dtype=torch.float64)
    X = basis @ (scales[:, None] * torch.randn(dim, n, generator=gen, dtype=torch.float64))
    X = X - X.mean(1, keepdim=True)
    labels = (torch.randn(num_classes, dim, generator=gen, dtype=torch.float64) @ X).argmax(0)
    return X, F.one_hot(labels, num_classes).T.double()


# =============================================================================================
# The experiments, one per command: verify, align (Fig. 2), subspace (Figs. 1, 4), order (Fig. 3). Read.
# =============================================================================================

@torch.no_grad()
def pixel_statistics(images, labels, num_classes, device, chunk=2048):
    """One streaming pass over uint8 images (N, C, H, W), pixels scaled to [0, 1], in float64:
    mean (D,), gram = X X^T (D, D) and xy = X Y^T (D, classes) of the CENTRED pixels X (D, N),
    Y the one-hot labels (classes, N), and the class counts. Memory: two D x D matrices."""
    n, dim = len(images), int(np.prod(images.shape[1:]))
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    second = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    class_sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
    for start in range(0, n, chunk):
        x = torch.from_numpy(images[start:start + chunk].copy()).to(device)  # copy: IDX arrays are read-only
        x = x.reshape(len(x), dim).double().div_(255)  # (B, D)
        y = torch.from_numpy(labels[start:start + chunk]).to(device)
        total += x.sum(0)
        second.addmm_(x.T, x)  # += sum_b x_b x_b^T
        class_sums.index_add_(0, y, x)
    counts = torch.bincount(torch.from_numpy(labels).to(device), minlength=num_classes).double()
    mean = total / n
    ## Centring after the fact: sum (x - m)(x - m)^T = sum x x^T - n m m^T (float64 keeps ~15 digits).
    gram = second - n * torch.outer(mean, mean)
    xy = (class_sums - counts[:, None] * mean).T  # (D, classes): column c = sum of the centred images of class c
    return dict(mean=mean, gram=gram, xy=xy, counts=counts, n=n, image_shape=tuple(images.shape[1:]))


def standardized(stats):
    """The same statistics for per-pixel standardised data (constant pixels dropped to zero)."""
    std = (stats["gram"].diagonal().clamp_min(0) / stats["n"]).sqrt()
    scale = torch.where(std > 1e-8, 1 / std, torch.zeros_like(std))
    return {**stats, "gram": stats["gram"] * scale[:, None] * scale[None, :], "xy": stats["xy"] * scale[:, None]}


def verify(cfg, device):
    """Every closed form against gradient-based training of the same model, on toy data.
    Prints one row per check with its gap and the bound it must meet; exit code 1 if one fails."""
    if not cfg.threads:
        # toy sizes (D = 32): one thread is fastest, and immune to oversubscribed cores (2 threads on a
        # busy 2-core machine made this 15x slower)
        torch.set_num_threads(1)
    image_shape, K = (2, 4, 4), 4
    X, Y = toy_data(image_shape, seed=cfg.seed)
    gram, n = X @ X.T, X.shape[1]
    pca = torch.linalg.eigh(gram)[1].flip(1)[:, :K].T  # (K, D) top-K principal directions
    rows = []  # (case, check, value, bound, "<=" or ">=")

    def rel_gap(loss, best):
        return abs(loss - best) / abs(best)

    cases = [dict(noise="none"), dict(noise="gaussian", sigma=0.5),
             dict(noise="mask", p=0.5, patch=2, image_shape=image_shape)]
    for corruption in cases:
        name = corruption_name(corruption)
        E, G, best, _ = dae_from_gram(gram, n, K, **corruption)
        C, S = corruption_moments(gram, n, **corruption)
        for method, steps, bound in (("lbfgs", 500, 1e-9), ("adam", 3000, 1e-6)):
            E_fit, G_fit = train_dae_expected(X, K, method, steps, cfg.seed, **corruption)
            rows.append((name, f"{method} on the expected loss: relative loss gap",
                         rel_gap(float(expected_dae_loss(E_fit, G_fit, gram, C, S)), best), bound, "<="))
            if method == "lbfgs":
                rows.append((name, "lbfgs: angle between learned subspaces (deg)", max_principal_angle(E_fit, E), 1e-2, "<="))
        E_fit, G_fit = train_dae_sampled(X, K, 3000, cfg.seed, **corruption)
        rows.append((name, "SGD on sampled corruptions: relative loss gap",
                     rel_gap(float(expected_dae_loss(E_fit, G_fit, gram, C, S)), best), 1e-4, "<="))

    # the moments themselves: Monte Carlo average of the masking second moment
    mask = dict(noise="mask", p=0.5, patch=2, image_shape=image_shape)
    gen = torch.Generator().manual_seed(cfg.seed)
    draws = 4000
    S_mc = sum(Xt @ Xt.T for Xt in (sample_corruption(X, gen, **mask) for _ in range(draws))) / draws
    S = corruption_moments(gram, n, **mask)[1]
    rows.append(("mask moments", f"Monte Carlo S ({draws} draws) vs (X X^T) o M: relative error",
                 float((S_mc - S).norm() / S.norm()), 1e-2, "<="))

    # Gaussian noise: eigenvalues d^2 / (d + N sigma^2), PCA eigenvectors, for any sigma
    d = torch.linalg.eigvalsh(gram).flip(0)
    for sigma in (0.1, 1.0, 10.0):
        E, _, _, mu = dae_from_gram(gram, n, K, "gaussian", sigma)
        predicted = d[:K] ** 2 / (d[:K] + n * sigma ** 2)
        rows.append((f"gaussian s={sigma:g}", "eigenvalues vs d^2/(d + N s^2): relative error",
                     float(((mu - predicted).abs() / predicted).max()), 1e-10, "<="))
        rows.append((f"gaussian s={sigma:g}", "angle to the PCA subspace (deg)", max_principal_angle(E, pca), 1e-9, "<="))

    # masking: entry-wise on standardised data is PCA; patches (or raw data) move the subspace
    X_std = X / X.std(1, keepdim=True)
    E_std = dae_closed_form(X_std, K, "mask", p=0.5)[0]
    pca_std = torch.linalg.eigh(X_std @ X_std.T)[1].flip(1)[:, :K].T
    rows.append(("mask entry-wise, standardised", "angle to PCA (deg)", max_principal_angle(E_std, pca_std), 1e-9, "<="))
    E_patch = dae_closed_form(X_std, K, "mask", p=0.5, patch=2, image_shape=image_shape)[0]
    rows.append(("mask patch=2, standardised", "angle to PCA (deg): it MOVES", max_principal_angle(E_patch, pca_std), 1.0, ">="))

    # Theorem 1 for several lambda, against L-BFGS, reduced-rank regression and PCA
    for lam in (0.0, 0.5, 10.0):
        V, W, Z, best = bilinear_closed_form(X, Y, 2, lam)
        V_fit, W_fit, Z_fit = train_bilinear(X, Y, 2, lam, 1000, cfg.seed)
        rows.append((f"theorem 1 lambda={lam:g}", "lbfgs: relative loss gap",
                     rel_gap(float(bilinear_loss(V_fit, W_fit, Z_fit, X, Y, lam)), best), 1e-9, "<="))
    rows.append(("theorem 1 lambda=0", "vs reduced-rank regression: relative loss gap",
                 rel_gap(bilinear_closed_form(X, Y, 2, 0.0)[3], reduced_rank_regression_loss(X, Y, 2)), 1e-10, "<="))
    V = bilinear_closed_form(X, Y, K, 1e8)[0]
    rows.append(("theorem 1 lambda=1e8", "angle to PCA (deg)", max_principal_angle(V.T, pca), 1e-4, "<="))

    # alignment: the nested-QR error of every K against a direct least-squares solve per K
    E = dae_closed_form(X, X.shape[0], "mask", p=0.5, patch=2, image_shape=image_shape)[0]
    curve = alignment_curve(E, torch.linalg.eigh(gram), X @ Y.T, Y.sum(1))
    direct = torch.stack([((Y.T - (E[:k] @ X).T @ torch.linalg.lstsq((E[:k] @ X).T, Y.T).solution) ** 2).sum()
                          for k in range(1, X.shape[0] + 1)])
    rows.append(("alignment", "err(K) vs least squares, every K: max relative gap",
                 float(((curve["err"] - direct).abs() / direct).max()), 1e-9, "<="))

    table, failed = verify_table(rows)
    print(table)
    return 1 if failed else 0


def align(cfg, device):
    """The paper's Figure 2: how well the optimal K reconstruction features explain the labels, for
    every K, per dataset and corruption; and a table of how much each corruption changes it."""
    linalg = float64_device(device)
    corruptions = [parse_corruption(c) for c in cfg.corruptions.split(",")]
    table_ks = parse_list(cfg.ks, "--ks", int)
    results = {}
    for name, (images, labels, num_classes, _) in load_datasets(cfg).items():
        start = time.time()
        stats = pixel_statistics(images, labels, num_classes, linalg)
        stats = standardized(stats) if cfg.standardize else stats
        dim, n = stats["gram"].shape[0], stats["n"]
        gram_eig = torch.linalg.eigh(stats["gram"])  # once per dataset, reused by every corruption
        d, P = gram_eig[0].flip(0), gram_eig[1].flip(1)  # descending
        rank = int((d > RANK_RTOL * d[0]).sum())  # < D with constant pixels or N <= D: K > rank adds nothing
        print(f"{name}: N = {n}, D = {dim}" + (f", the centred pixels span only {rank} directions" if rank < dim else "")
              + f"; the closed forms need about {10 * dim * dim * 8 / 1e9:.2f} GB (pixel statistics {time.time() - start:.1f} s)")
        ks = [k for k in table_ks if k <= dim]
        results[name] = {"N": n, "D": dim, "rank": rank, "corruptions": {}}
        for corruption in corruptions:
            tick = time.time()
            kwargs = {**corruption, "image_shape": stats["image_shape"]} if corruption["noise"] == "mask" else corruption
            E, _, loss, mu = dae_from_gram(stats["gram"], n, dim, **kwargs, gram_eig=gram_eig)
            curve = alignment_curve(E, gram_eig, stats["xy"], stats["counts"])
            entry = {"projection_score": curve["projection"].tolist(), "authors_score": curve["authors"].tolist(),
                     "err": curve["err"].tolist(),
                     "angles_to_pca_deg": {k: principal_angles(E[:k], P[:, :k].T).tolist() for k in ks if k <= rank}}
            if corruption["noise"] == "gaussian":
                predicted = d ** 2 / (d + n * corruption["sigma"] ** 2)
                entry["eigenvalue_formula_gap"] = float((mu - predicted).abs().max() / mu[0])
            results[name]["corruptions"][corruption_name(corruption)] = entry
            print(f"  {corruption_name(corruption):<22} " + "  ".join(f"K={k}: {entry['projection_score'][k - 1]:5.1f}%" for k in ks)
                  + f"  (largest angle to PCA {largest_angle(entry):.2g} deg, {time.time() - tick:.1f} s)")
        results[name]["seconds"] = time.time() - start
    save_figure(alignment_figure(results), os.path.join(cfg.out_dir, "alignment.png"))
    write_json(os.path.join(cfg.out_dir, "alignment.json"), {"script": SCRIPT, "config": dataclasses.asdict(cfg), "results": results})
    print(corruption_table(results, table_ks))
    print(f"wrote {cfg.out_dir}/alignment.png and alignment.json")
    return 0


def small_cnn(in_channels, num_classes, width):
    """Three conv-BN-ReLU blocks (width, 2 width, 4 width channels), two max-pools, global average pool, linear."""
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*block(in_channels, width), nn.MaxPool2d(2), *block(width, 2 * width), nn.MaxPool2d(2),
                         *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))


@torch.no_grad()
def project_images(images, mean, basis, device, chunk=4096):
    """x -> mean + basis basis^T (x - mean) for uint8 images (N, C, H, W); float32 (N, C, H, W) in [0, 1] units."""
    basis, mean = basis.to(device, torch.float32), mean.to(device, torch.float32)
    out = []
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(images[start:start + chunk].copy()).to(device).float().div_(255)
        centred = x.flatten(1) - mean  # (B, D)
        out.append(((centred @ basis) @ basis.T + mean).view(x.shape))
    return torch.cat(out)


def train_classifier(train_x, train_y, test_x, test_y, num_classes, cfg, seed, device):
    """The same small CNN for every projection: inputs standardised by the train set (mean image,
    one scalar std), AdamW + cosine, no augmentation. Returns the FINAL epoch's test accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0, keepdim=True), train_x.std().clamp_min(1e-8)
    model = small_cnn(train_x.shape[1], num_classes, cfg.width).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=5e-4)
    steps = cfg.epochs * math.ceil(len(train_x) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen).to(device)
        for start in range(0, len(train_x), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            with autocast:
                loss = F.cross_entropy(model((train_x[idx] - mean) / std), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad(), autocast:
        correct = sum(int((model((test_x[i:i + 1024] - mean) / std).argmax(1) == test_y[i:i + 1024]).sum())
                      for i in range(0, len(test_x), 1024))
    return correct / len(test_x)


def subspace(cfg, device):
    """The paper's Figures 1 and 4: classify images projected onto the top-variance eigenvectors
    (p% of the variance) or the bottom ones (q%) with the same small CNN."""
    linalg = float64_device(device)
    seeds = parse_list(cfg.seeds, "--seeds", int)
    results = {}
    for name, (images, labels, num_classes, parts) in load_datasets(cfg).items():
        start = time.time()
        stats = pixel_statistics(images, labels, num_classes, linalg)
        eigvals, eigvecs = covariance_eigh(stats["gram"], stats["n"])  # once; (r,) descending, (D, r)
        dim = eigvecs.shape[0]
        projections = [("full", 1.0, None)] + [(f"top {100 * f:g}%", f, "top") for f in parse_list(cfg.top, "--top")] \
            + [(f"bottom {100 * f:g}%", f, "bottom") for f in parse_list(cfg.bottom, "--bottom")]
        test_images, test_labels = parts["test"]
        train_y, test_y = torch.from_numpy(labels).to(device), torch.from_numpy(test_labels).to(device)
        rows, examples = [], []
        example_ids = torch.from_numpy(np.unique(test_labels, return_index=True)[1][:8]).to(device)  # one per class
        for label, fraction, end in projections:
            basis, kept = (eigvecs, 1.0) if end is None else variance_subspace(eigvals, eigvecs, fraction, end)
            train_x = project_images(images, stats["mean"], basis, device)
            test_x = project_images(test_images, stats["mean"], basis, device)
            tick = time.time()
            accuracies = [train_classifier(train_x, train_y, test_x, test_y, num_classes, cfg, s, device) for s in seeds]
            rows.append(dict(projection=label, directions=basis.shape[1], variance_kept=kept,
                             accuracy_mean=float(np.mean(accuracies)), accuracy_std=float(np.std(accuracies)),
                             accuracies=accuracies, seconds_per_run=(time.time() - tick) / len(seeds)))
            examples.append((label, test_x[example_ids].cpu()))
            print(f"{name} {label:<12} {basis.shape[1]:5d}/{dim} directions ({100 * kept:5.1f}% of the variance): "
                  f"test accuracy {100 * rows[-1]['accuracy_mean']:.1f} +- {100 * rows[-1]['accuracy_std']:.1f}% "
                  f"({rows[-1]['seconds_per_run']:.0f} s per run)")
        results[name] = dict(N_train=len(images), N_test=len(test_images), D=dim, rows=rows, seconds=time.time() - start)
        save_figure(example_grid(examples, name), os.path.join(cfg.out_dir, f"subspace_{safe_name(name)}.png"))
    write_json(os.path.join(cfg.out_dir, "subspace.json"), {"script": SCRIPT, "config": dataclasses.asdict(cfg), "results": results})
    print(subspace_table(results, len(seeds)))
    print(f"wrote {cfg.out_dir}/subspace_*.png and subspace.json")
    return 0


def eigen_bands(dim):
    """Bands of eigen-directions 1, 2-4, 5-16, 17-64, ... (powers of 4), as (start, stop) index pairs."""
    edges = [0] + [4 ** i for i in range(0, 10) if 4 ** i < dim] + [dim]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def deep_autoencoder(dim, hidden, bottleneck):
    """D -> hidden -> bottleneck -> hidden -> D with ReLUs. Every layer keeps PyTorch's default init
    except the last, which starts at zero so the reconstruction error starts at exactly 100% per direction."""
    model = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, bottleneck), nn.ReLU(),
                          nn.Linear(bottleneck, hidden), nn.ReLU(), nn.Linear(hidden, dim))
    nn.init.zeros_(model[-1].weight)
    nn.init.zeros_(model[-1].bias)
    return model


def order(cfg, device):
    """The paper's Figure 1 (bottom) / Figure 3: a deep autoencoder fits the large-variance
    eigen-directions first, like the linear model's gradient flow predicts in closed form.
    Trains on the first --train-limit images (10000 when it is 0)."""
    linalg = float64_device(device)
    results = {}
    for name, (images, labels, num_classes, _) in load_datasets(cfg).items():
        start = time.time()
        images, labels = images[:cfg.train_limit or 10000], labels[:cfg.train_limit or 10000]
        stats = pixel_statistics(images, labels, num_classes, linalg)
        eigvals, eigvecs = covariance_eigh(stats["gram"], stats["n"])  # (r,) descending, (D, r)
        dim, rank = eigvecs.shape
        bands = eigen_bands(rank)  # directions without variance have no error to follow
        X = (torch.from_numpy(images.copy()).reshape(len(images), dim).to(device).float() / 255
             - stats["mean"].to(device, torch.float32))  # (N, D) centred
        probe = X[:2000]
        probe_energy = (probe @ eigvecs.to(device, torch.float32)) ** 2  # (B, D)
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        model = deep_autoencoder(dim, cfg.ae_hidden, cfg.ae_bottleneck).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.ae_lr)
        checkpoints = sorted({0, cfg.ae_steps} | {int(s) for s in np.geomspace(1, cfg.ae_steps, 30)})
        history = []
        for step in range(cfg.ae_steps + 1):
            if step in checkpoints:
                with torch.no_grad():
                    error = ((probe - model(probe)) @ eigvecs.to(device, torch.float32)) ** 2  # (B, D)
                history.append([float(error[:, a:b].sum() / probe_energy[:, a:b].sum()) for a, b in bands])
            if step == cfg.ae_steps:
                break
            idx = torch.randint(0, len(X), (256,), generator=gen).to(device)
            loss = ((X[idx] - model(X[idx])) ** 2).sum(1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        history = np.array(history)  # (checkpoints, bands)
        ## The linear prediction, in closed form: relative error exp(-4 lambda_k t) per direction.
        times = torch.logspace(math.log10(0.01 / eigvals[0]), math.log10(10 / eigvals[min(255, rank - 1)]), 200,
                               dtype=torch.float64)
        linear = gradient_flow_band_error(eigvals, bands, times).numpy()
        band_names = [f"directions {a + 1}-{b}" if b > a + 1 else f"direction {b}" for a, b in bands]
        half_step = [next((checkpoints[i] for i in range(len(checkpoints)) if history[i, j] < 0.5), None) for j in range(len(bands))]
        results[name] = dict(bands=band_names, checkpoints=checkpoints, deep_error=history.tolist(),
                             linear_times=times.tolist(), linear_error=linear.tolist(), first_step_below_half=half_step,
                             seconds=time.time() - start)
        print(f"{name}: step at which each band's relative error falls below 50% (deep AE, Adam): "
              + ", ".join(f"{b}: {'not reached' if s is None else s}" for b, s in zip(band_names, half_step)) + f" ({time.time() - start:.0f} s)")
        save_figure(order_figure(name, results[name]), os.path.join(cfg.out_dir, f"order_{safe_name(name)}.png"))
    write_json(os.path.join(cfg.out_dir, "order.json"), {"script": SCRIPT, "config": dataclasses.asdict(cfg), "results": results})
    print(f"wrote {cfg.out_dir}/order_*.png and order.json")
    return 0


# =============================================================================================
# Reports: the printed tables and the figures of the experiments. Skip on a first read.
# =============================================================================================

def verify_table(rows):
    """verify's rows (case, check, value, bound, '<=' or '>=') as a text table marking each ok or FAILED.
    Returns (table, number of failed checks)."""
    width = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"{'case':<{width[0]}}  {'check':<{width[1]}}  {'gap':>9}  bound"]
    failed = 0
    for case, check, value, bound, sense in rows:
        ok = value <= bound if sense == "<=" else value >= bound
        failed += not ok
        lines.append(f"{case:<{width[0]}}  {check:<{width[1]}}  {value:9.2e}  {sense} {bound:.0e}  {'ok' if ok else 'FAILED'}")
    lines.append(f"{len(rows) - failed}/{len(rows)} checks passed")
    return "\n".join(lines), failed


def largest_angle(entry):
    """The largest principal angle to PCA over every tabulated K (~0 for Gaussian noise, whatever sigma)."""
    return max((max(angles) for angles in entry["angles_to_pca_deg"].values()), default=0.0)


def corruption_table(results, ks):
    """Markdown: per dataset and corruption, the score at each K, its largest change against no
    corruption, and how far the learned subspace moved from PCA (largest angle over K; mean angle at the first K)."""
    lines = ["| dataset | corruption | " + " | ".join(f"K={k}" for k in ks)
             + f" | largest change (points) | largest angle to PCA (deg) | mean angle to PCA at K={ks[0]} (deg) |",
             "|---" * (len(ks) + 5) + "|"]
    for name, result in results.items():
        base = result["corruptions"].get("none")
        for corruption, entry in result["corruptions"].items():
            kk = [k for k in ks if k <= result["D"]]
            scores = [f"{entry['projection_score'][k - 1]:.1f}" for k in kk] + ["-"] * (len(ks) - len(kk))
            change = (f"{max(abs(entry['projection_score'][k - 1] - base['projection_score'][k - 1]) for k in kk):.2g}"
                      if base and kk else "-")  # without a 'none' row there is nothing to change from
            first = entry["angles_to_pca_deg"].get(ks[0])
            mean_angle = f"{np.mean(first):.2g}" if first else "-"
            lines.append(f"| {name} | {corruption} | " + " | ".join(scores)
                         + f" | {change} | {largest_angle(entry):.2g} | {mean_angle} |")
    return "\n".join(lines)


def alignment_figure(results):
    """Figure 2: the projection score against K and against K / D; one colour per dataset, one line style per corruption."""
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(12, 4.5))
    by_k, by_fraction = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, result) in enumerate(results.items()):
        K = np.arange(1, result["D"] + 1)
        for number, (corruption, entry) in enumerate(result["corruptions"].items()):
            style, label = ["-", "--", ":", "-."][number % 4], f"{name}, {corruption}"
            by_k.plot(K, entry["projection_score"], style, color=colours[index % len(colours)], label=label)
            by_fraction.plot(K / result["D"], entry["projection_score"], style, color=colours[index % len(colours)], label=label)
    for axis, xlabel in ((by_k, "K (number of features)"), (by_fraction, "K / D")):
        axis.set_xscale("log")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("alignment: projection score (%)")
        axis.grid(alpha=0.3)
    by_fraction.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("How well the K optimal linear (denoising) autoencoder features explain the labels: "
                 "100 ||P_K Y|| / ||P_D Y|| (Balestriero & LeCun 2024, Fig. 2)", fontsize=10)
    return fig


def subspace_table(results, num_seeds):
    lines = [f"| dataset | projection | directions kept | variance kept | test accuracy (%, {num_seeds} seed(s)) |",
             "|---|---|---|---|---|"]
    for name, result in results.items():
        for row in result["rows"]:
            lines.append(f"| {name} | {row['projection']} | {row['directions']}/{result['D']} | "
                         f"{100 * row['variance_kept']:.1f}% | {100 * row['accuracy_mean']:.1f} +- {100 * row['accuracy_std']:.1f} |")
    return "\n".join(lines)


def example_grid(examples, name):
    """Rows: projections; columns: test images. Each image is min-max stretched on its own so that
    the low-variance (bottom) projections are visible at all."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(examples), 8, figsize=(8 * 1.1, len(examples) * 1.2), squeeze=False)
    for row, (label, images) in enumerate(examples):
        for col in range(min(8, len(images))):
            image = images[col]
            image = ((image - image.min()) / (image.max() - image.min()).clamp_min(1e-8)).permute(1, 2, 0)
            axes[row, col].imshow(image.squeeze(-1).numpy(), cmap="gray" if image.shape[-1] == 1 else None)
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
        axes[row, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(f"{name}: test images projected onto variance subspaces (each image min-max stretched)", fontsize=9)
    return fig


def order_figure(name, result):
    """Figure 3: relative reconstruction error per band of eigen-directions, deep autoencoder (left)
    against the linear model's gradient flow in closed form (right)."""
    import matplotlib.pyplot as plt
    history, linear = np.array(result["deep_error"]), np.array(result["linear_error"])  # (checkpoints, bands), (T, bands)
    fig, (deep, flow) = plt.subplots(1, 2, figsize=(12, 4.5))
    for j, band in enumerate(result["bands"]):
        deep.plot(np.maximum(result["checkpoints"], 0.8), history[:, j], marker=".", label=band)
        flow.plot(result["linear_times"], linear[:, j], label=band)
    deep.set(xscale="log", xlabel="Adam step (step 0 drawn at 0.8)", ylabel="relative reconstruction error in the band",
             title=f"deep autoencoder on {name}")
    flow.set(xscale="log", xlabel="gradient-flow time t", ylabel="relative error  sum lambda e^{-4 lambda t} / sum lambda",
             title="linear model, closed form")
    for axis in (deep, flow):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return fig


def safe_name(name):
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


# =============================================================================================
# Plumbing: command line and its validation. Skip on a first read.
# =============================================================================================

class UserError(Exception):
    """A problem the user can fix (bad flag, missing data): printed as one sentence, no traceback."""


DATASETS = ("glyphs", "shapes", "textures", "cifar10", "cifar100", "fashion-mnist", "mnist")  # and folder:PATH
SCRIPT = "linear_theory.py"  # written into its JSON files: which script wrote them
OUTPUTS = {"verify": [], "align": ["alignment.png", "alignment.json"],  # what each command writes to --out-dir
           "subspace": ["subspace_{}.png", "subspace.json"], "order": ["order_{}.png", "order.json"]}


def knob_help():
    """The comment after each Config field, so `--help` and the code share one description."""
    helps = {}
    for line in inspect.getsource(Config).splitlines():
        name, _, comment = line.partition("#")
        if ":" in name and "=" in name and comment:
            helps[name.split(":")[0].strip()] = comment.strip()
    return helps


def knob_sections():
    """The `# --- section ---` line above each Config field, so `--help` groups the knobs as the code does."""
    sections, section = {}, "options"
    for line in inspect.getsource(Config).splitlines():
        name, _, comment = line.partition("#")
        if not name.strip() and comment.strip().startswith("---"):
            section = comment.strip(" -")
        elif ":" in name and "=" in name:
            sections[name.split(":")[0].strip()] = section
    return sections


class OneSentenceParser(argparse.ArgumentParser):
    """argparse, but a flag it cannot parse (unknown, missing value, not a number) is a UserError:
    one `error:` sentence and exit code 2 like every other bad input, not usage lines."""

    def error(self, message):
        raise UserError(f"{message} (see --help).")


def parse_config(argv=None):
    """Defaults < command line, then one validation pass. Returns (command, Config)."""
    parser = OneSentenceParser(description="Closed-form linear autoencoders and the alignment theorem (arXiv 2402.11337).",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("command", choices=COMMANDS, help="verify: the closed forms against optimisers; align: Figure 2; "
                        "subspace: Figures 1 and 4; order: Figure 3")
    helps, sections, groups = knob_help(), knob_sections(), {}
    choices = {"device": ("auto", "cuda", "mps", "cpu")}  # argparse refuses the rest
    for field in dataclasses.fields(Config):
        section = sections[field.name]
        group = groups[section] if section in groups else groups.setdefault(section, parser.add_argument_group(section))
        flag, text = "--" + field.name.replace("_", "-"), helps[field.name].replace("%", "%%")  # argparse formats help with %
        if field.type in (bool, "bool"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=text)
        else:
            kind = {"int": int, "float": float, "str": str}[getattr(field.type, "__name__", field.type)]
            group.add_argument(flag, type=kind, choices=choices.get(field.name), default=field.default, help=text)
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    cfg = Config(**args)
    check_config(cfg, command)
    return command, cfg


def parse_list(text, flag, kind=float):
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be a comma-separated list of {kind.__name__}s, got '{text}'.") from None
    if not values:
        raise UserError(f"{flag} is empty: give at least one value.")
    return values


def parse_corruption(text):
    """'none' | 'gaussian:SIGMA' | 'mask:P:PATCH' -> keyword arguments of dae_closed_form."""
    parts = text.strip().split(":")
    try:
        if parts == ["none"]:
            return dict(noise="none")
        if parts[0] == "gaussian" and len(parts) == 2 and 0 < float(parts[1]) < math.inf:
            return dict(noise="gaussian", sigma=float(parts[1]))
        if parts[0] == "mask" and len(parts) == 3 and 0 < float(parts[1]) < 1 and int(parts[2]) >= 1:
            return dict(noise="mask", p=float(parts[1]), patch=int(parts[2]))
    except ValueError:
        pass
    raise UserError(f"--corruptions entry '{text}' is not none, gaussian:SIGMA (0 < SIGMA, finite) or mask:P:PATCH "
                    f"(0 < P < 1, PATCH a whole number of pixels), e.g. mask:0.75:4.")


def corruption_name(kwargs):
    if kwargs["noise"] == "gaussian":
        return f"gaussian s={kwargs['sigma']:g}"
    if kwargs["noise"] == "mask":
        return f"mask p={kwargs['p']:g} patch={kwargs['patch']}"
    return "none"


def dataset_names(cfg):
    return [d.strip() for d in cfg.datasets.split(",") if d.strip()]


def dataset_dim(name, img_size):
    """D = C * H * W of a dataset, known before loading it (folder images are read as RGB)."""
    return {"cifar10": 3072, "cifar100": 3072, "fashion-mnist": 784, "mnist": 784}.get(name, 3 * img_size ** 2)


def check_writable(path, flag, directory):
    """Refuses a path that cannot be written, without creating anything: an existing path must be
    a directory (or a regular file when directory=False) we may write to; otherwise its nearest
    existing ancestor must be a directory we may write into."""
    if not path:
        raise UserError(f"{flag} is empty: give a path.")
    if os.path.exists(path):
        if directory != os.path.isdir(path):
            raise UserError(f"{flag} {path} exists and is {'not ' if directory else ''}a directory; choose another path.")
        if not os.access(path, os.W_OK):
            raise UserError(f"{flag} {path} is not writable; choose another path.")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path} lies under {parent}, which is a file, not a directory; choose another path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} cannot be created: {parent} is not writable; choose another path.")


def physical_memory(device):
    """Bytes of memory of the device the float64 linear algebra runs on, or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_config(cfg, command):
    """One validation pass before anything is loaded, computed or written: every bad value a user can
    type ends here with one sentence naming the fix. Creates nothing."""
    def need(ok, message):
        if not ok:
            raise UserError(message)
    for field in dataclasses.fields(Config):
        value = getattr(cfg, field.name)
        if isinstance(value, float):
            need(math.isfinite(value), f"--{field.name.replace('_', '-')} must be a finite number, got {value}.")
    need(cfg.train_limit >= 0, f"--train-limit cannot be negative (0 = all images), got {cfg.train_limit}.")
    need(cfg.img_size >= 4, f"--img-size must be at least 4, got {cfg.img_size}.")
    for flag in ("epochs", "batch_size", "width", "ae_steps", "ae_hidden", "ae_bottleneck"):
        need(getattr(cfg, flag) >= 1, f"--{flag.replace('_', '-')} must be at least 1, got {getattr(cfg, flag)}.")
    for flag in ("lr", "ae_lr"):
        need(getattr(cfg, flag) > 0, f"--{flag.replace('_', '-')} must be positive, got {getattr(cfg, flag):g}.")
    need(cfg.threads >= 0, f"--threads cannot be negative (0 = torch's default), got {cfg.threads}.")
    need(all(k >= 1 for k in parse_list(cfg.ks, "--ks", int)), f"every --ks value must be at least 1, got '{cfg.ks}'.")
    for flag in ("top", "bottom"):
        fractions = parse_list(getattr(cfg, flag), f"--{flag}")
        need(all(0 < f <= 1 for f in fractions), f"every --{flag} fraction must be in (0, 1], got '{getattr(cfg, flag)}'.")
    seeds = parse_list(cfg.seeds, "--seeds", int) + [cfg.seed]
    need(all(0 <= s < 2 ** 63 for s in seeds), f"seeds must be whole numbers in [0, 2^63), got --seeds '{cfg.seeds}' --seed {cfg.seed}.")
    [parse_corruption(c) for c in cfg.corruptions.split(",")]
    names = dataset_names(cfg)
    need(bool(names), "--datasets is empty: give at least one, e.g. --datasets shapes.")
    need(len(set(names)) == len(names), f"--datasets lists a dataset twice: '{cfg.datasets}'.")
    for name in names:
        folder = name[len("folder:"):] if name.startswith("folder:") else None
        need(name in DATASETS or folder is not None,
             f"unknown dataset '{name}': use glyphs, shapes, textures, cifar10, cifar100, fashion-mnist, mnist or folder:PATH.")
        if folder is not None and command != "verify":
            need(os.path.isdir(folder), f"--datasets {name}: {folder} is not a directory of train/<class>/ and val/<class>/ images.")
    if command == "verify":
        return  # verify makes its own toy data and writes no file
    if command == "align" and cfg.ks != Config.ks:  # the default list quietly keeps the K that fit (K = 8 always does)
        ## K counts the features of a linear autoencoder of D pixel coordinates: there are at most D.
        smallest = min(names, key=lambda name: dataset_dim(name, cfg.img_size))
        dim, largest_k = dataset_dim(smallest, cfg.img_size), max(parse_list(cfg.ks, "--ks", int))
        need(largest_k <= dim, f"--ks {largest_k} asks for more features than {smallest} has pixel coordinates "
                               f"(D = {dim}), the most a linear autoencoder has; give --ks values up to {dim}.")
    if any(name not in BUILT_IN for name in names):  # downloads go there, and folder: datasets' resized copies
        need(cfg.data_dir != "", "--data-dir is empty: give a directory, e.g. --data-dir data.")
        existing = cfg.data_dir
        while existing and not os.path.exists(existing):
            existing = os.path.dirname(existing.rstrip(os.sep))
        need(not existing or os.path.isdir(existing), f"--data-dir {cfg.data_dir} is not a directory" +
             ("." if existing == cfg.data_dir else f": {existing} is a file."))
    ## Memory: the closed forms hold about ten dense float64 D x D matrices (the eigendecompositions of
    ## subspace and order about four), so D is bounded by what the device holds, known before any work.
    linalg = float64_device(pick_device(cfg.device))
    available, dim = physical_memory(linalg), max(dataset_dim(name, cfg.img_size) for name in names)
    needed = (10 if command == "align" else 4) * 8 * dim ** 2
    need(available is None or needed <= available,
         f"D = {dim} pixel coordinates needs about {needed / 1e9:.0f} GB of float64 matrices, more than the "
         f"{available / 1e9 if available else 0:.0f} GB of {linalg.type}; use a smaller --img-size.")
    check_writable(cfg.out_dir, "--out-dir", directory=True)
    for name in names:
        for output in OUTPUTS[command]:
            check_writable(os.path.join(cfg.out_dir, output.format(safe_name(name))), "--out-dir", directory=False)


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but this PyTorch has no MPS backend; use --device cpu or auto.")
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def float64_device(device):
    """MPS has no float64: the closed forms run there on the CPU."""
    return device if device.type == "cuda" else torch.device("cpu")


# =============================================================================================
# Plumbing: data loaders, copies of mae_decay.py's (tests keep them identical). Read only to change the data.
# =============================================================================================

DATA_HELP = ("use a built-in dataset (glyphs, shapes or textures: no download), or put the files in --data-dir, "
             "or run once with network access")

CIFAR = {  # official python tarballs (Krizhevsky 2009) and their published md5
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                 "cifar-100-python", ["train"], ["test"], b"fine_labels"),
}
IDX = {  # official IDX files (LeCun et al. 1998; Xiao et al. 2017) and their published md5
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}),
}
SYSTEM_DIRS = {"fashion-mnist": ["/usr/share/datasets/fashion-mnist"]}  # Debian's dataset-fashion-mnist


def md5sum(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url, dest, md5):
    """Fetch url to dest, keeping it only if its md5 matches: nothing unverified is ever opened."""
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    tmp = dest + ".part"
    print(f"downloading {url}")
    try:
        urllib.request.urlretrieve(url, tmp)
    except (urllib.error.URLError, OSError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not download {url} ({e}); {DATA_HELP}.") from None
    if md5sum(tmp) != md5:
        os.remove(tmp)
        raise UserError(f"the download of {url} failed its checksum (corrupt or tampered); delete nothing, just run again.")
    os.replace(tmp, dest)


class _ArraysOnly(pickle.Unpickler):
    ## The CIFAR batches are Python pickles, and unpickling can run arbitrary code. Downloads are
    ## checksum-verified first; files already on disk are read with this unpickler, which refuses
    ## every global except the few that rebuild a numpy array.
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("copyreg", "_reconstructor"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path, label_key):
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="bytes").load()
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except Exception as e:  # truncated, not a pickle, wrong keys or shapes
        raise UserError(f"{path} is not a valid CIFAR python batch ({type(e).__name__}: {e}); delete it and download again.") from None
    if len(images) != len(labels):
        raise UserError(f"{path} holds {len(images)} images but {len(labels)} labels; delete it and download again.")
    return images, labels


def load_cifar(name, data_dir, allow_download):
    url, md5, folder, train_files, test_files, label_key = CIFAR[name]
    root = os.path.join(data_dir, folder)
    if not os.path.isdir(root):
        archive = os.path.join(data_dir, url.rsplit("/", 1)[1])
        if not os.path.exists(archive):
            if not allow_download:
                raise UserError(f"{name} not found: no {root}/ and no {archive}; {DATA_HELP}.")
            download(url, archive, md5)
        elif md5sum(archive) != md5:
            raise UserError(f"{archive} does not match the official md5 (corrupt or partial); delete it and run again.")
        with tarfile.open(archive) as tar:
            tar.extractall(data_dir, filter="data")
    parts = {}
    for split, files in (("train", train_files), ("test", test_files)):
        missing = [f for f in files if not os.path.exists(os.path.join(root, f))]
        if missing:
            raise UserError(f"{root} lacks {', '.join(missing)}; delete the folder and run again to re-extract it.")
        arrays = [read_cifar_batch(os.path.join(root, f), label_key) for f in files]
        parts[split] = (np.concatenate([a[0] for a in arrays]), np.concatenate([a[1] for a in arrays]))
    return parts


def read_idx(path, expected_ndim):
    """An IDX file (gzip): magic 0x0000 08 ndim, big-endian int32 sizes, then uint8 values."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path} is not a readable .gz file ({e}); delete it and download again.") from None
    if len(raw) < 4 + 4 * expected_ndim or raw[:3] != b"\x00\x00\x08" or raw[3] != expected_ndim:
        raise UserError(f"{path} is not an IDX file of {expected_ndim} dimensions; delete it and download again.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(expected_ndim))
    body = raw[4 + 4 * expected_ndim:]
    if len(body) != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: header says {shape}, body has {len(body)} bytes; delete it and download again.")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def load_idx(name, data_dir, allow_download):
    base_url, files = IDX[name]
    candidates = [os.path.join(data_dir, name), data_dir] + SYSTEM_DIRS.get(name, [])
    root = next((d for d in candidates if all(os.path.exists(os.path.join(d, f)) for f in files)), None)
    if root is None:
        if not allow_download:
            raise UserError(f"{name} not found in {', '.join(candidates)}; {DATA_HELP}.")
        root = os.path.join(data_dir, name)
        for f, md5 in files.items():
            if not os.path.exists(os.path.join(root, f)):
                download(base_url + f, os.path.join(root, f), md5)
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), 3)
        labels = read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), 1)
        if len(images) != len(labels):
            raise UserError(f"{root}: {split} has {len(images)} images but {len(labels)} labels; the files do not belong together.")
        parts[split] = (images[:, None], labels.astype(np.int64))
    return parts


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".JPEG", ".JPG", ".PNG")


def load_image_resized(path, size):
    """One image file -> (3, size, size) uint8: shorter side resized to `size` (bicubic, antialiased),
    then the centre crop. Decoding goes through matplotlib (PNG natively, other formats through
    the Pillow it depends on), so the scripts need no image package of their own."""
    import matplotlib.image
    try:
        image = torch.as_tensor(np.array(matplotlib.image.imread(path)))  # (H, W[, C]): uint8, or float in [0, 1] (PNG)
    except Exception as e:  # not an image, truncated, unsupported format
        raise UserError(f"{path} could not be read as an image ({type(e).__name__}: {e}); fix or remove it.") from None
    image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
    image = image[:, :, None] if image.ndim == 2 else image
    image = image[:, :, :3].expand(-1, -1, 3).permute(2, 0, 1)[None]  # grey -> RGB, alpha dropped; (1, 3, H, W)
    scale = size / min(image.shape[-2:])
    h, w = max(size, round(image.shape[-2] * scale)), max(size, round(image.shape[-1] * scale))
    image = F.interpolate(image, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (h - size) // 2, (w - size) // 2
    crop = image[0, :, top:top + size, left:left + size]
    return (crop.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def load_folder(root, size, cache_dir):
    """train/<class>/* and val/<class>/* (or test/<class>/*) resized once (shorter side, centre crop)
    and cached under cache_dir/image_folder_cache/, never inside the dataset (it may be read-only).
    The cache holds a fingerprint of every image's path, byte size and modification time: adding,
    removing or editing an image rebuilds it. A cache that cannot be written costs time, not the run."""
    train_dir = os.path.join(root, "train")
    test_dir = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(train_dir) or test_dir is None:
        raise UserError(f"{root} must hold train/<class>/ and val/<class>/ (or test/<class>/) folders of images.")
    subfolders = lambda d: {n for n in os.listdir(d) if os.path.isdir(os.path.join(d, n)) and not n.startswith(".")}
    classes = sorted(subfolders(train_dir))
    files = {}  # split -> [(path, label)]
    for split, folder in (("train", train_dir), ("test", test_dir)):
        strays = sorted(subfolders(folder) - set(classes))
        if strays:
            raise UserError(f"{os.path.join(folder, strays[0])} has no class folder of that name in {train_dir}; "
                            f"add one there or remove it.")
        files[split] = []
        for label, cls in enumerate(classes):
            cls_dir = os.path.join(folder, cls)
            if not os.path.isdir(cls_dir):
                continue  # a class may be absent from the test split
            names = sorted(n for n in os.listdir(cls_dir) if n.endswith(IMAGE_EXTENSIONS))
            if not names:
                raise UserError(f"the class folder {cls_dir} holds no images ({', '.join(IMAGE_EXTENSIONS[:5])}, ...); "
                                f"add some or remove it.")
            files[split] += [(os.path.join(cls_dir, n), label) for n in names]
        if not files[split]:
            raise UserError(f"{train_dir} holds no class folders; put each class's images in {train_dir}/<class>/."
                            if split == "train" else f"{folder} holds no class folders named like those of "
                            f"{train_dir} (val/ is read when it exists, else test/); add them there.")

    def stat(path):  # a dangling link or a symlink loop named like an image: one sentence, not a traceback
        try:
            return os.stat(path)
        except OSError as e:
            raise UserError(f"{path} cannot be read ({e.strerror}); fix or remove it.") from None
    listing = sorted((os.path.relpath(p, root), stat(p)) for pairs in files.values() for p, _ in pairs)
    fingerprint = hashlib.sha256("\n".join(f"{n}\t{st.st_size}\t{st.st_mtime_ns}" for n, st in listing).encode()).hexdigest()
    where = os.path.realpath(root)
    cache = os.path.join(cache_dir, "image_folder_cache",
                         f"{os.path.basename(where)}_{hashlib.sha256(where.encode()).hexdigest()[:12]}_{size}px.pt")
    if os.path.exists(cache):
        try:
            blob = torch.load(cache, weights_only=True)
            if blob["fingerprint"] == fingerprint:
                return {s: (blob[f"{s}_x"].numpy(), blob[f"{s}_y"].numpy()) for s in ("train", "test")}
            print(f"{root} changed since it was cached: rebuilding {cache}")
        except Exception as e:
            print(f"the cache {cache} is unreadable ({type(e).__name__}): rebuilding it")
    parts = {}
    for split, pairs in files.items():
        print(f"{root}: resizing {len(pairs)} {split} images to {size}px once (cached in {cache})")
        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:  # decoding releases the GIL
            images = list(tqdm(pool.map(lambda pair: load_image_resized(pair[0], size), pairs), total=len(pairs)))
        parts[split] = (np.stack(images), np.asarray([label for _, label in pairs], dtype=np.int64))
    blob = {f"{s}_{k}": torch.from_numpy(v) for s, (x, y) in parts.items() for k, v in (("x", x), ("y", y))}
    try:
        atomic_save({**blob, "fingerprint": fingerprint}, cache)
    except UserError as e:  # atomic_save's one sentence: a full disk, or --data-dir cannot hold the cache
        print(f"the cache was not written, continuing without it: {e}")
    return parts


## The built-in dataset. Natural images put most pixel variance in things a label does not care
## about (background, colour, lighting) and the class in a small amount of structure; that is the
## situation where reconstruction-trained features go wrong (Balestriero & LeCun 2024) and where
## the paper claims decay helps. "shapes" copies it: the class is the SHAPE of a small object,
## while background colour, a background gradient, object colour, position, size, a small rotation
## and global brightness are all random and carry most of the pixel variance.
SHAPE_NAMES = ["disk", "square", "triangle", "diamond", "plus", "cross", "ring", "frame", "dumbbell", "half-disk"]


def shape_signed_distance(label, u, v):
    """Positive inside the shape, in units of its radius; (u, v) are object-centred coordinates."""
    radius = torch.sqrt(u ** 2 + v ** 2)
    box = torch.maximum(u.abs(), v.abs())
    if label == 0:
        return 1 - radius
    if label == 1:
        return 0.8 - box
    if label == 2:  # equilateral triangle pointing up (image rows grow downward)
        edges = [u * math.cos(a) + v * math.sin(a) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
        return 0.5 - torch.stack(edges).amax(0)
    if label == 3:
        return 1 - (u.abs() + v.abs())
    if label in (4, 5):
        if label == 5:
            u, v = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)
        arm_h = torch.minimum(0.25 - v.abs(), 1 - u.abs())
        arm_v = torch.minimum(0.25 - u.abs(), 1 - v.abs())
        return torch.maximum(arm_h, arm_v)
    if label == 6:
        return 0.2 - (radius - 0.7).abs()
    if label == 7:
        return 0.18 - (box - 0.65).abs()
    if label == 8:
        return 0.4 - torch.minimum(torch.sqrt((u - 0.5) ** 2 + v ** 2), torch.sqrt((u + 0.5) ** 2 + v ** 2))
    return torch.minimum(1 - radius, v + 0.1)  # half-disk


def make_shapes(n, size, seed):
    """n images (n, 3, size, size) uint8 and labels, a pure function of (n, size, seed)."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=gen)

    labels = torch.randint(0, len(SHAPE_NAMES), (n,), generator=gen)
    coords = (torch.arange(size) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (S, S) in [-1, 1]
    # nuisance 1: a background colour plus a linear gradient of random direction and strength
    bg_colour = uniform(n, 3, 1, 1)
    angle = uniform(n, 1, 1, high=2 * math.pi)
    ramp = (torch.cos(angle) * xx + torch.sin(angle) * yy).unsqueeze(1)  # (n, 1, S, S)
    background = bg_colour + uniform(n, 3, 1, 1, low=-0.35, high=0.35) * ramp
    # the object: class = shape; position, size, rotation and colour are nuisance
    cx, cy = uniform(n, 1, 1, low=-0.35, high=0.35), uniform(n, 1, 1, low=-0.35, high=0.35)
    r = uniform(n, 1, 1, low=0.35, high=0.55)
    rot = uniform(n, 1, 1, low=-0.3, high=0.3)
    u = ((xx - cx) * torch.cos(rot) + (yy - cy) * torch.sin(rot)) / r
    v = (-(xx - cx) * torch.sin(rot) + (yy - cy) * torch.cos(rot)) / r
    signed = torch.empty(n, size, size)
    for label in range(len(SHAPE_NAMES)):  # a loop over classes, not samples
        sel = labels == label
        signed[sel] = shape_signed_distance(label, u[sel], v[sel])
    coverage = (signed / (2 / size / r) + 0.5).clamp(0, 1).unsqueeze(1)  # anti-aliased edge, one pixel wide
    fg_colour = (bg_colour + uniform(n, 3, 1, 1, low=0.3, high=0.7)) % 1.0  # always visible against the background
    # nuisance 2: global brightness, and a little sensor noise
    image = uniform(n, 1, 1, 1, low=0.6, high=1.2) * ((1 - coverage) * background + coverage * fg_colour)
    image = image + 0.02 * torch.randn(image.shape, generator=gen)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), labels.numpy()


## The second built-in dataset, "textures": the class is a PATCH STATISTIC that raw pixels do not
## show. Each image is a wavy grating: the class is its orientation (5, 36 degrees apart) and
## spatial period (3 or 6 pixels); its phase, a slow random warp of that phase, the position and
## size of the window it shows through, its contrast and its colours are random. Two images of one
## class share no pixel pattern, so pixel k-NN is weak, but the local power spectrum of any patch
## names the class (a k-NN on each image's power spectrum is right ~9 times in 10).
TEXTURE_NAMES = [f"{angle} deg, period {period}px" for period in (3, 6) for angle in range(0, 180, 36)]


def make_textures(n, size, seed):
    """n images (n, 3, size, size) uint8 and labels (n,) int64, a pure function of (n, size, seed)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(TEXTURE_NAMES), n)
    coords = np.arange(size) + 0.5 - size / 2  # pixel centres, origin at the image centre
    yy, xx = np.meshgrid(coords, coords, indexing="ij")  # (S, S)
    per_image = lambda values: values[:, None, None]  # noqa: E731  (n,) -> (n, 1, 1)
    # the class: orientation and period, each jittered a little
    angle = per_image(labels % 5 * np.pi / 5 + rng.uniform(-0.15, 0.15, n))
    frequency = per_image(1 / np.where(labels < 5, 3.0, 6.0) * rng.uniform(0.85, 1.15, n))  # cycles per pixel
    # nuisance: the phase, warped by two slow waves (wavelength 16 px, up to 3 rad each) of random direction
    phase = per_image(rng.uniform(0, 2 * np.pi, n))
    for _ in range(2):
        direction = per_image(rng.uniform(0, 2 * np.pi, n))
        phase = phase + per_image(rng.uniform(0, 3, n)) * np.cos(
            2 * np.pi / 16 * (np.cos(direction) * xx + np.sin(direction) * yy) + per_image(rng.uniform(0, 2 * np.pi, n)))
    grating = np.cos(2 * np.pi * frequency * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)  # (n, S, S)
    # nuisance: a soft window of random position and size, contrast, background colour, tint
    centre_x, centre_y = (per_image(rng.uniform(-0.3, 0.3, n) * size) for _ in range(2))
    radius = per_image(rng.uniform(0.35, 0.7, n) * size)
    window = np.exp(-((xx - centre_x) ** 2 + (yy - centre_y) ** 2) / (2 * radius ** 2))
    contrast = per_image(rng.uniform(0.15, 0.3, n))
    background = rng.uniform(0.25, 0.75, (n, 3, 1, 1))
    tint = rng.uniform(0.3, 1.0, (n, 3, 1, 1)) * rng.choice([-1.0, 1.0], (n, 3, 1, 1))
    image = background + (contrast * window * grating)[:, None] * tint + 0.02 * rng.standard_normal((n, 3, size, size))
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), labels.astype(np.int64)


## The third built-in dataset, "glyphs" (the CPU demo's default): the class is WHICH small pattern
## recurs in the image, a bag-of-patches statistic. The image is a grid of 4x4-pixel cells; each
## cell shows the class's glyph (probability 0.35) or one of 10 distractor glyphs, drawn with its
## own background colour and contrast, and the whole image is light-on-dark or dark-on-light. Two
## images of one class share almost no pixel pattern, and the polarity flip makes the class
## invisible to anything LINEAR in the pixels (a linear probe on pixels is near chance), yet
## counting glyphs over the cells names it: a k-NN on the cells' average is far above a k-NN on
## pixels. The cells align with 4-pixel patches, so at --patch-size 4 one token sees one glyph.
GLYPHS = {  # name: 4 rows of 4 pixels, "#" = ink; the first 10 are the classes, the last 10 distractors
    "left bar": "#... #... #... #...", "bottom bar": ".... .... .... ####", "diagonal \\": "#... .#.. ..#. ...#",
    "diagonal /": "...# ..#. .#.. #...", "plus": ".#.. #### .#.. .#..", "cross": "#..# .##. .##. #..#",
    "frame": "#### #..# #..# ####", "corner block": "##.. ##.. .... ....", "checker": "#.#. .#.# #.#. .#.#",
    "corner": "#### #... #... #...",
    "_plus2": "..#. ..#. #### ..#.", "_zigzag": "##.. ..## ##.. ..##", "_triangle": "#... ##.. ###. ####",
    "_ring": ".##. #..# #..# .##.", "_two bars": "#..# #..# #..# #..#", "_two lines": "#### .... #### ....",
    "_right bar": "..## ..## ..## ..##", "_stripes": "#.#. #.#. #.#. #.#.", "_dots": "#..# .... .... #..#",
    "_centre": ".... .##. .##. ....",
}
GLYPH_NAMES = [name for name in GLYPHS if not name.startswith("_")]


def make_glyphs(n, size, seed):
    """n images (n, 3, size, size) uint8 and labels (n,) int64, a pure function of (n, size, seed)."""
    rng = np.random.default_rng(seed)
    ink = np.array([[[c == "#" for c in row] for row in rows.split()] for rows in GLYPHS.values()], dtype=np.float64)
    cells = -(-size // 4)  # cells per side; an image side that is not a multiple of 4 cuts the last row and column
    labels = rng.integers(0, len(GLYPH_NAMES), n)
    # each cell: the class glyph with probability 0.35, else a random distractor
    glyph = np.where(rng.random((n, cells, cells)) < 0.35, labels[:, None, None],
                     rng.integers(len(GLYPH_NAMES), len(GLYPHS), (n, cells, cells)))
    pattern = ink[glyph].transpose(0, 1, 3, 2, 4).reshape(n, 4 * cells, 4 * cells)  # (n, 4c, 4c)
    per_cell = lambda values: values.repeat(4, -2).repeat(4, -1)  # noqa: E731  (..., c, c) -> (..., 4c, 4c)
    # nuisance: each cell's background colour and contrast, the image's polarity, sensor noise
    contrast = per_cell(rng.uniform(0.08, 0.2, (n, cells, cells))) * rng.choice([-1.0, 1.0], (n, 1, 1))
    background = per_cell(rng.uniform(0.1, 0.6, (n, 3, cells, cells)))
    image = background + (contrast * pattern)[:, None] + 0.05 * rng.standard_normal((n, 3, 4 * cells, 4 * cells))
    return (np.clip(image[:, :, :size, :size], 0, 1) * 255).round().astype(np.uint8), labels.astype(np.int64)


BUILT_IN = ("glyphs", "shapes", "textures")  # generated in memory: no --data-dir, no download


def load_dataset(name, data_dir, size=32, allow_download=True):
    """Returns dict(train=(x, y), test=(x, y), classes=[...]); x uint8 (N, C, H, W), y int64 (N,)."""
    if name == "shapes":
        parts = {"train": make_shapes(10000, size, seed=0), "test": make_shapes(2000, size, seed=1)}
        parts["classes"] = SHAPE_NAMES
    elif name == "textures":
        parts = {"train": make_textures(10000, size, seed=0), "test": make_textures(2000, size, seed=1)}
        parts["classes"] = TEXTURE_NAMES
    elif name == "glyphs":
        parts = {"train": make_glyphs(10000, size, seed=0), "test": make_glyphs(2000, size, seed=1)}
        parts["classes"] = GLYPH_NAMES
    elif name in CIFAR:
        parts = load_cifar(name, data_dir, allow_download)
    elif name in IDX:
        parts = load_idx(name, data_dir, allow_download)
    elif name.startswith("folder:"):
        parts = load_folder(name[len("folder:"):], size, data_dir)
    else:
        raise UserError(f"unknown dataset '{name}': use glyphs, shapes, textures, cifar10, cifar100, fashion-mnist, mnist or folder:PATH.")
    num_classes = int(max(parts["train"][1].max(), parts["test"][1].max())) + 1
    parts.setdefault("classes", [str(i) for i in range(num_classes)])
    if len(np.unique(np.concatenate([parts["train"][1], parts["test"][1]]))) == 1:
        print(f"warning: {name} has a single class, so every accuracy is 100 % and means nothing; "
              f"give it images of at least two classes")
    return parts


def load_datasets(cfg):
    """Every dataset of --datasets, loaded (and downloaded) BEFORE any computation, so that a missing or
    corrupt one stops the run before minutes are spent on the others. Returns {name: (images, labels,
    number of classes, parts)}: the training split cut to --train-limit, uint8 (N, C, H, W) and int64 (N,)."""
    loaded = {}
    for name in dataset_names(cfg):
        try:
            parts = load_dataset(name, cfg.data_dir, cfg.img_size, cfg.download)
        except OSError as e:  # e.g. a read-only --data-dir to download into
            raise UserError(f"could not read or write the files of {name} ({e}); check --data-dir.") from None
        images, labels = parts["train"]
        if cfg.train_limit:
            images, labels = images[:cfg.train_limit], labels[:cfg.train_limit]
        if len(np.unique(labels)) == 1 < len(np.unique(parts["train"][1])):  # load_dataset warns for a one-class dataset
            print(f"{name}: warning: every training label is one class, so every accuracy and alignment score is "
                  f"100 % and means nothing")
        loaded[name] = (images, labels, len(parts["classes"]), parts)
    return loaded


# =============================================================================================
# Plumbing: file I/O (temporary file, then rename: never half a file). Skip on a first read.
# =============================================================================================

def atomic_write(path, write):
    """write(f) into a temporary file beside `path`, then rename it over `path`: a crash, Ctrl-C or
    full disk never leaves half a file, nor the temporary one, and the previous `path` stays whole
    until the new one is complete. A write the system refuses (no space, no permission) is one sentence."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave an empty file
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = e  # torch.save reports a full disk as a RuntimeError raised while handling the OSError
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is not None:
            raise UserError(f"could not write {path} ({cause.strerror or cause}); free some disk space or choose another "
                            f"path (any previous {os.path.basename(path)} is intact).") from None
        raise


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def save_figure(fig, path):
    import matplotlib.pyplot as plt
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


## An --out-dir takes the PNG and JSON files of any command of this script (each command its own
## names, a rerun replaces its own), never another script's training run, and one run at a time: a
## lock file keeps two runs from writing into it at once (the later one's files would silently win).

@contextlib.contextmanager
def out_dir_lock(out_dir):
    """Holds out_dir/.lock ("host pid", created atomically with O_EXCL) while the block runs. A lock
    held by a live process is refused; one left by a process that is gone (same host, pid not
    running) is taken over, saying so. Another host's lock cannot be checked: it is refused."""
    path, me = os.path.join(out_dir, ".lock"), f"{socket.gethostname()} {os.getpid()}"
    for attempt in range(2):
        try:
            os.makedirs(out_dir, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                with open(path) as f:
                    host, pid = f.read().split()
                pid = int(pid)
            except (OSError, ValueError):
                host, pid = "?", 0
            if attempt == 0 and host == socket.gethostname() and not pid_running(pid):
                print(f"{out_dir}: taking over the lock of process {pid}, which is no longer running")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            raise UserError(f"--out-dir {out_dir} is in use by another run (process {pid} on {host}); wait for it "
                            f"to finish or choose another --out-dir (delete {path} only if that process is gone).") from None
        except OSError as e:  # not a directory, read-only, a pseudo-filesystem that refuses files, ...
            raise UserError(f"could not create {path} ({e.strerror or e}); choose another --out-dir.") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(me)
    except OSError as e:  # a full disk: remove the empty lock, which would otherwise look held by "process 0"
        os.remove(path)
        raise UserError(f"could not write {path} ({e.strerror or e}); free some disk space or choose another "
                        f"--out-dir.") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            with open(path) as f:
                mine = f.read() == me
            if mine:
                os.remove(path)


def pid_running(pid):
    if pid <= 0 or os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return pid > 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def check_out_dir_owner(out_dir):
    """This script writes no config.json: an --out-dir holding one holds a training run of
    mae_decay.py or diffusion_decay.py (named in it), whose folder is not ours to write into."""
    path = os.path.join(out_dir, "config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            owner = json.load(f).get("script", "another program")
    except (OSError, ValueError, AttributeError):
        owner = "another program"
    raise UserError(f"--out-dir {out_dir} holds a run of {owner} (see its config.json); choose another --out-dir.")


def first_missing_folder(path):
    """The outermost folder of path that does not exist yet (None if path exists): what creating path adds."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        return None
    while not os.path.exists(os.path.dirname(path)):
        path = os.path.dirname(path)
    return path


class Terminated(Exception):
    """SIGTERM (what `timeout`, `docker stop` and job schedulers send): ends a run like Ctrl-C, exit code 143."""


def terminate_on_sigterm():
    """From here on SIGTERM raises Terminated in the main thread: the run ends with one line, not a silent kill."""
    def handler(signum, frame):
        raise Terminated
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


# =============================================================================================
# Main: parse and check the command line, run one command; a user's mistake ends in one sentence.
# =============================================================================================

def main(argv=None):
    """Returns the exit code: 0 done, 1 a verify check failed, 2 a user error (one sentence), 130 interrupted
    (Ctrl-C), 143 terminated (SIGTERM)."""
    made = None  # the folders the out-dir lock creates: removed again if the command wrote nothing
    try:
        terminate_on_sigterm()  # SIGTERM from here on ends the run with one line, like Ctrl-C
        command, cfg = parse_config(argv)  # every check happens here, before anything is loaded or written
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = pick_device(cfg.device)
        ## verify writes no file; the other commands hold the out-dir's lock while they run.
        made = first_missing_folder(cfg.out_dir) if OUTPUTS[command] else None
        with out_dir_lock(cfg.out_dir) if OUTPUTS[command] else contextlib.nullcontext():
            if OUTPUTS[command]:
                check_out_dir_owner(cfg.out_dir)
            start = time.time()
            print(f"{command} on {device} (float64 linear algebra on {float64_device(device)}), torch {torch.__version__}")
            status = {"verify": verify, "align": align, "subspace": subspace, "order": order}[command](cfg, device)
            print(f"{command} took {time.time() - start:.1f} s")
        return status
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        print(f"{'terminated (SIGTERM)' if isinstance(e, Terminated) else 'interrupted'}: the files written so far are "
              f"complete, the rest were not written; rerun the command to redo it.", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130  # the shell's 128 + the signal's number
    finally:
        if made and not any(files for _, _, files in os.walk(made)):  # a command that failed before writing leaves no trace
            shutil.rmtree(made, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
