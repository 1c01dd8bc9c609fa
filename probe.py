"""
probe.py: frozen-feature evaluation for any encoder, in one file: DINO k-NN, a linear probe,
effective rank with the singular-value spectrum, and the perception-vs-reconstruction subspace
probe of Balestriero & LeCun (2024). It reads the features.npz that mae_decay.py and
diffusion_decay.py write (or any encoder's features in that format), or a dataset's raw pixels.

Run (`--help` lists every knob):

    python probe.py --pixels shapes --img-size 16           # quick check, ~15 s on 2 CPU cores: raw pixels of the built-in data
    python probe.py --pixels fashion-mnist                  # raw pixels: the reference every encoder must beat
    python probe.py runs/mae/alpha1_seed0/features.npz      # features written by mae_decay.py (or any encoder)
    python probe.py runs/mae/*/features.npz --pixels shapes --img-size 16 --json results.json  # one table, pixels as a row
    python probe.py --pixels cifar10 --data-dir data --subspace top:90,bottom:20  # where does the label live?
    python probe.py my_features.pt --knn-k 20 --majority --plot spectrum.png

Known-good numbers produced by this file (2-core CPU, torch 2.13, numpy 2.4, default settings):

    python probe.py --pixels shapes --img-size 16            # ~15 s
    input          dim  knn@10  knn@20  knn@100  knn@200  linear  erank  erank_c
    pixels:shapes  768   21.95   22.25    16.95    15.25   12.90  162.9    248.8
    (--probe authors: linear 16.15, ~20 s)

    python probe.py --pixels fashion-mnist --subspace top:100,top:90,bottom:20   # an earlier commit, before erank_c
    input                    dim  knn@10  knn@20  knn@100  knn@200  linear  erank
    pixels:fashion-mnist     784   85.59   84.59    80.92    79.13   84.43  344.6
      top:100 (100.0% var)   784   86.62   86.05    83.67    82.91   84.43  416.5
      top:90 (90.1% var)      84   86.84   86.43    84.25    83.36   83.48   59.0
      bottom:20 (20.3% var)  761   87.91   87.88    87.21    86.90   45.82  574.9

    python probe.py --pixels cifar10 --data-dir data   # (earlier commit) knn@10 37.43, knn@20 36.30, linear 40.69, erank 455.1
    python probe.py --pixels shapes                     # knn@10 21.95, knn@20 21.70, linear 15.00, erank 607.4, erank_c 884.5

    (Public raw-pixel Fashion-MNIST benchmarks: k-NN about 85-86 %, logistic regression about 84 %.)
    Wall times, hardware and known issues are in README.md.

A features file (.npz, or .pt read with torch.load(weights_only=True)) holds train_features
(N, D), train_labels (N,), test_features (M, D), test_labels (M,): float features, non-negative
integer class ids (any ids: {0, 7, 10**9} are renumbered 0..2, in their order, with a line saying
so); any other key is metadata, copied into the JSON. Defaults: k-NN on L2-normalised features
with exp(sim / 0.07) votes, k = 10, 20, 100, 200 from one search; linear probe = standardise by
train statistics + one Linear layer, AdamW, weight decay 0 (the authors' probe: 0.01), cosine schedule, the FINAL epoch's
test accuracy (`--probe authors`: the decay paper's authors' raw-feature probe); effective rank
of the train features, not centred (erank, RankMe's convention) and centred (erank_c).
Several inputs are evaluated one by one: a bad one (unreadable, malformed, too few samples for a
k you typed) is reported in one sentence at the end with exit status 2, and the others keep
their rows in the table and the JSON. --json and --plot are written whole or not at all (a full
disk: one sentence, the previous file intact); Ctrl-C exits 130 and SIGTERM 143, each with one line.

Reading order: the Config (the knobs), THE IDEA (the protocols, each beside its equation), the
evaluation driver, the report; the plumbing (command line, data loaders, file I/O) comes last.
Two comment layers: `##` lines teach (why a line exists, which equation it implements) and can be
stripped with `sed '/^\\s*## /d'`; `#` lines are ordinary comments.
"""
import argparse
import dataclasses
import gzip
import hashlib
import inspect
import json
import math
import numbers
import os
import pickle
import signal
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data): printed as one sentence, no traceback."""


# =============================================================================================
# Config: every knob, with its default and one line on what it does
# read first: the table of what can be changed (--help prints the same lines)
# =============================================================================================

@dataclasses.dataclass
class Config:
    # --- input (feature files are positional arguments) ---
    pixels: str = ""              # also evaluate raw pixels: shapes | cifar10 | cifar100 | fashion-mnist | mnist | folder:PATH
    data_dir: str = "data"        # where --pixels datasets are looked for and downloaded to, and folder:PATH's resized copy is cached
    download: bool = True         # download a missing --pixels dataset (checksum verified before use)
    img_size: int = 32            # image side of the built-in shapes and of folder:PATH images (resized to it)
    # --- k-NN (DINO protocol) ---
    knn_k: str = "10,20,100,200"  # comma list of neighbour counts from one top-k search (the default's ks above the train size are skipped)
    knn_t: float = 0.07           # temperature of the exp(sim / T) vote weights
    majority: bool = False        # also report plain majority votes (every neighbour weighs 1)
    # --- linear probe ---
    probe: str = "standard"       # standard (train-standardised features, the three knobs below) | authors (the decay paper's: raw features, AdamW lr 1e-2, batch 256, 200 epochs)
    probe_epochs: int = 20        # standard probe's epochs; the final one is reported, never the best (0 = no probe at all)
    probe_lr: float = 3e-3        # standard probe's AdamW peak lr (cosine schedule, weight decay 0)
    probe_batch_size: int = 1024  # standard probe's samples per step; 0 = full batch (fastest on a GPU, wants a higher lr)
    seed: int = 0                 # seeds the probe's init and sample order (k-NN has no randomness)
    # --- analysis ---
    subspace: str = ""            # e.g. top:90,bottom:20: probe the principal subspaces explaining p% of the variance
    plot: str = ""                # write the singular-value spectrum of every input's train features to this PNG
    # --- system ---
    device: str = "auto"          # auto | cuda | mps | cpu
    json: str = ""                # also write every number and the settings to this file (atomically)


# =============================================================================================
# THE IDEA: the evaluation protocols, k-NN, linear probe, effective rank, subspace probe
# read first: what every number in the table means, beside the line that computes it
# =============================================================================================

## A frozen encoder is judged by what its features make easy. Every protocol below gets the same
## four arrays, train features (N, D) with their labels (N,) and test features (M, D) with theirs
## (M,), and never changes the features (no fine-tuning): a number measures the features, not a
## training recipe. Three questions, three protocols, and a fourth that asks where the label lives:
##   * k-NN: are images of one class NEIGHBOURS? (nothing is trained)
##   * linear probe: are the classes LINEARLY separable? (one Linear layer is trained)
##   * effective rank: how many directions do the features really use? (no labels at all)
##   * subspace probe: is the label in the directions of LARGE variance, which a reconstruction
##     loss cares about, or in the small ones?
## knn_predict, linear_probe, AUTHORS_PROBE and effective_rank are deliberate verbatim copies of
## mae_decay.py's (tests/test_copies.py checks it), so a number here means what it means there.

## k-NN, DINO's protocol (Wu et al. 2018; Caron et al. 2021, their eval_knn.py). The features are
## L2-normalised, so the dot product of a query with a training feature is their cosine
## similarity s_i in [-1, 1]. The k most similar training samples vote for their own label with
## weight exp(s_i / T), and the prediction is argmax over classes c of
##     sum over the k nearest i with y_i = c of exp(s_i / T).
## With T = 0.07 a neighbour at s = 0.9 outweighs one at s = 0.8 by exp(0.1 / 0.07) = 4.2 times,
## so the closest neighbours dominate; T = infinity gives every neighbour weight 1 (a plain
## majority vote, --majority). topk returns the neighbours sorted by similarity, so ONE search for
## the largest k answers every smaller k too: its first k columns are exactly the k nearest.
@torch.no_grad()
def knn_predict(train_x, train_y, test_x, k=20, temperature=0.07, num_classes=None, chunk=1024):
    """DINO's weighted k-NN (Wu et al. 2018; Caron et al. 2021): cosine similarity on L2-normalised
    features, the k nearest training samples each vote for their label with weight exp(sim / T).
    `k` may be an int or a list of ints (one prediction per k from one top-k search).
    Queries go in fixed chunks, so any number of them works (1 or 10^6).
    Returns int64 predictions (N_test,), or a dict k -> predictions when k is a list."""
    single = isinstance(k, numbers.Integral)
    ks = [int(k)] if single else [int(kk) for kk in k]
    train_y = train_y.long()
    if max(ks) > len(train_x):
        raise ValueError(f"k={max(ks)} neighbours requested but only {len(train_x)} training samples")
    num_classes = num_classes or int(train_y.max()) + 1
    train_x = F.normalize(train_x.float(), dim=1)
    predictions = {kk: [] for kk in ks}
    for start in range(0, len(test_x), chunk):
        query = F.normalize(test_x[start:start + chunk].float(), dim=1)
        sims, idx = (query @ train_x.T).topk(max(ks), dim=1)  # (Q, k_max), sorted by similarity
        weights, labels = (sims / temperature).exp(), train_y[idx]
        for kk in ks:
            votes = torch.zeros(len(query), num_classes, device=query.device, dtype=weights.dtype)
            votes.scatter_add_(1, labels[:, :kk], weights[:, :kk])
            predictions[kk].append(votes.argmax(1))
    predictions = {kk: torch.cat(p) for kk, p in predictions.items()}
    return predictions[ks[0]] if single else predictions


## Linear probe: the features stay frozen and only a Linear(D, C) layer is trained, with
## cross-entropy. Each feature dimension is first standardised, z = (x - mu) / sigma, with mu and
## sigma from the TRAIN features only: the test set is not looked at before the final accuracy, so
## a shift between train and test features is kept, not normalised away. Standardising is what
## facebookresearch/mae's probe head does (a BatchNorm1d without affine parameters), and it makes
## one learning rate mean the same thing for features of any scale. AdamW with weight decay 0
## (the head is not pulled toward zero), a cosine decay of the learning rate to zero over every
## step, and the accuracy after the FINAL epoch: taking the best epoch would select on the test
## set (the MAE and DINO scripts print such a maximum). The head's init and the sample order come
## from one seeded generator, so the same seed gives the same number whatever ran before.
def linear_probe(train_x, train_y, test_x, test_y, epochs=20, lr=3e-3, batch_size=1024, seed=0, num_classes=None,
                 standardize=True, weight_decay=0.0, lr_per_epoch=False, drop_last=False):
    """Linear probe on frozen features: standardise by TRAIN statistics (= MAE's BatchNorm1d without
    affine; standardize=False feeds the raw features, as the decay paper's authors' probe does),
    one Linear layer, cross-entropy, AdamW (weight decay 0 unless given) and a cosine schedule, per
    step (lr_per_epoch=True: set once after each epoch, as the authors' probe does; drop_last=True
    drops each epoch's incomplete batch, keeping at least one).
    Returns the test accuracy (fraction) after the FINAL epoch, never a maximum over epochs."""
    gen = torch.Generator().manual_seed(seed)
    device = train_x.device
    train_y, test_y = train_y.long(), test_y.long()
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    mean, std = train_x.float().mean(0), train_x.float().std(0).clamp_min(1e-6)
    if not standardize:
        mean, std = torch.zeros_like(mean), torch.ones_like(std)
    train_z, test_z = (train_x.float() - mean) / std, (test_x.float() - mean) / std
    head = nn.Linear(train_z.shape[1], num_classes).to(device)
    with torch.no_grad():  # seeded init, independent of the global RNG
        bound = 1 / math.sqrt(train_z.shape[1])
        head.weight.copy_((torch.rand(head.weight.shape, generator=gen) * 2 - 1) * bound)
        head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, len(train_z) // batch_size) if drop_last else math.ceil(len(train_z) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    for epoch in range(epochs):
        order = torch.randperm(len(train_z), generator=gen).to(device)
        for start in range(0, steps_per_epoch * batch_size, batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(head(train_z[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not lr_per_epoch:
                schedule.step()
        if lr_per_epoch:  ## the authors': after epoch e (from 0), lr = lr * 0.5 * (1 + cos(pi * e / epochs)); epochs 0 and 1 both run at lr
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    with torch.no_grad():
        return (head(test_z).argmax(1) == test_y).float().mean().item()


## The decay paper's authors' in-code probe (their MAE/util/misc.py, eval_model): raw features,
## AdamW lr 1e-2, batch 256, 200 epochs, cosine, final epoch. Offered beside the standardised one.
## Raw features make its result depend on the features' scale and common mean; the standardised
## probe above does not, which is why it is the default (`--probe authors` picks this one).
AUTHORS_PROBE = {"standardize": False, "lr": 1e-2, "batch_size": 256, "epochs": 200, "weight_decay": 0.01,
                 "lr_per_epoch": True, "drop_last": True}


## Effective rank (Roy & Vetterli 2007), the label-free score of RankMe (Garrido et al. 2023).
## Take the singular values s_1 >= s_2 >= ... of the (N, D) feature matrix, normalise them into a
## distribution p_i = s_i / sum_j s_j, and return exp(entropy(p)) = exp(-sum_i p_i log p_i):
## D equal singular values give exactly D, one dominant direction gives about 1, and in between
## it counts the directions in use, weighted by their share. Singular values, NOT their squares
## (the variances): s = (4, 2, 1, 0.5) gives 3.117, the squares would give 2.063. Reported twice:
## uncentred (RankMe's convention) and centred (z - mean first). Mean-pooled features of an
## encoder without a final norm carry a large common mean: one big singular value, which the
## uncentred number then mostly measures; the centred one measures the spread around it.
def effective_rank(z, center=False, eps=1e-7):
    """Effective rank (Roy & Vetterli 2007; RankMe, Garrido et al. 2023) of a feature matrix (N, D):
    exp of the entropy of p_i = s_i / sum_j s_j, s = singular values (not squared). Not centred by
    default (RankMe's convention). Between 1 and min(N, D); scale-invariant."""
    z = torch.as_tensor(z).double()
    if center:
        z = z - z.mean(0, keepdim=True)
    s = torch.linalg.svdvals(z)
    p = s / s.sum().clamp_min(eps)
    return float(torch.exp(-(p * torch.log(p + eps)).sum()))


def float64_ready(x):
    """x itself, or a CPU copy on Apple's MPS, which has no float64 (SVD and eigh want it here)."""
    # plumbing: skip on a first read
    return x.cpu() if x.device.type == "mps" else x


## The perception-vs-reconstruction probe (Balestriero & LeCun 2024, "Learning by Reconstruction
## Produces Uninformative Features For Perception", section 4). A reconstruction loss is dominated
## by the directions of largest variance (on images: background, colour, lighting), so a
## reconstruction-trained encoder spends its capacity there; a classifier may need the small
## ones. So: eigendecompose the TRAIN covariance, keep either the fewest leading directions that
## explain p% of the variance ("top:p") or the fewest trailing ones that explain q% ("bottom:q"),
## project the features onto them, and run the same k-NN and linear probe on each projection. On
## natural images the paper finds the bottom 20% as informative as (or more than) the top 90%.
def principal_directions(train_x):
    """Mean (D,), variances (D,) in decreasing order, and the matching eigenvectors (D, D) as columns
    of the train covariance, in float64 (the small variances are what the bottom probe is about)."""
    x = float64_ready(train_x).double()
    mean = x.mean(0)
    ## Sigma = (X - mu)^T (X - mu) / (N - 1). Its eigenvectors are the principal directions and its
    ## eigenvalues the variance of the features along each; they add up to the total variance.
    covariance = (x - mean).T @ (x - mean) / max(len(x) - 1, 1)  # (D, D)
    variances, vectors = torch.linalg.eigh(covariance)  # ascending
    return mean, variances.flip(0).clamp_min(0), vectors.flip(1)


def subspace_directions(variances, side, percent):
    """Indices of the fewest leading (side='top') or trailing ('bottom') directions whose variances
    add up to at least `percent`% of the total, and the fraction of the variance they keep."""
    fraction = variances / variances.sum().clamp_min(1e-300)
    ## Walk from the large end (top) or the small end (bottom) and stop at the first direction where
    ## the running share of the variance reaches p%; 1e-12 absorbs float rounding, so that 30% of
    ## ten equal variances is exactly three directions, not four.
    ordered = fraction if side == "top" else fraction.flip(0)
    count = min(int((ordered.cumsum(0) < percent / 100 - 1e-12).sum()) + 1, len(fraction))
    index = torch.arange(count) if side == "top" else torch.arange(len(fraction) - count, len(fraction))
    return index.to(variances.device), float(fraction[index].sum())


def project(x, mean, vectors):
    """The centred features projected onto the span of `vectors` (orthonormal columns, (D, K)), in
    the original coordinates: (N, D). Like the paper's projected images, minus the mean image, so
    'top:100' gives back the centred features and the probes see no rotation or whitening."""
    ## V V^T is the orthogonal projector onto span(V): (x - mu) V V^T keeps the part of each centred
    ## feature that lies in the chosen directions, expressed in the original D coordinates.
    return ((float64_ready(x).double() - mean) @ vectors @ vectors.T).float().to(x.device)


# =============================================================================================
# Evaluation driver: every protocol on one input, then on each --subspace projection of it
# read second: how the table's numbers are put together
# =============================================================================================

def knn_accuracies(train_x, train_y, test_x, test_y, ks, temperature, num_classes):
    """{k: test accuracy} for every k, from one top-k search."""
    predictions = knn_predict(train_x, train_y, test_x, k=ks, temperature=temperature, num_classes=num_classes)
    return {k: (predicted == test_y).float().mean().item() for k, predicted in predictions.items()}


def evaluate_features(train_x, train_y, test_x, test_y, ks, cfg):
    """k-NN (weighted, and majority on request), linear probe and effective rank of one feature set."""
    num_classes = int(train_y.max()) + 1
    result = {"dim": train_x.shape[1], "knn": knn_accuracies(train_x, train_y, test_x, test_y, ks, cfg.knn_t, num_classes)}
    if cfg.majority:
        ## A majority vote is the same vote with T = infinity: exp(sim / T) = 1 for every neighbour.
        result["knn_majority"] = knn_accuracies(train_x, train_y, test_x, test_y, ks, math.inf, num_classes)
    if cfg.probe_epochs:
        ## --probe authors: the decay paper's authors' settings exactly, raw features included.
        knobs = AUTHORS_PROBE if cfg.probe == "authors" else dict(
            epochs=cfg.probe_epochs, lr=cfg.probe_lr, batch_size=cfg.probe_batch_size or len(train_x))  # 0: full batch
        result["linear_probe"] = linear_probe(train_x, train_y, test_x, test_y, seed=cfg.seed, num_classes=num_classes,
                                              **knobs)
    result["effective_rank"] = effective_rank(float64_ready(train_x))  # RankMe's convention: not centred
    result["effective_rank_centered"] = effective_rank(float64_ready(train_x), center=True)
    return result


def evaluate(arrays, ks, cfg, device):
    """Every number for one input: the full features, then each --subspace projection (its 'dim' is
    the number of principal directions kept)."""
    train_x, train_y, test_x, test_y = (arrays[key].to(device) for key in FEATURE_KEYS)
    result = evaluate_features(train_x, train_y, test_x, test_y, ks, cfg)
    subspaces = parse_subspaces(cfg.subspace)
    if subspaces:
        mean, variances, vectors = principal_directions(train_x)
        result["subspace"] = {}
        for side, percent in subspaces:
            index, kept = subspace_directions(variances, side, percent)
            basis = vectors[:, index]  # (D, K)
            numbers = evaluate_features(project(train_x, mean, basis), train_y, project(test_x, mean, basis), test_y, ks, cfg)
            result["subspace"][f"{side}:{percent:g}"] = {"variance_kept": kept, **numbers, "dim": len(index)}
    return result


def usable_ks(cfg, num_train, source):
    """The neighbour counts to evaluate on an input with num_train training samples. A k that was
    typed with --knn-k must fit, or the input is refused before anything is computed; the default
    list (10, 20, 100, 200) quietly keeps the ks that fit, as mae_decay.py's extra ks do."""
    ks = parse_ks(cfg.knn_k)
    fitting = [k for k in ks if k <= num_train]
    if len(fitting) < len(ks) and (ks != parse_ks(Config.knn_k) or not fitting):
        raise UserError(f"{source} has only {num_train} training samples, too few for --knn-k {cfg.knn_k}; "
                        f"give --knn-k values up to {num_train}.")
    return fitting


def evaluate_input(source, cfg, device):
    """Read, check and evaluate one input: a features file, or 'pixels:DATASET'. Returns the result
    (every number, the metadata, the settings) and the singular values of the train features (for
    --plot; None without it). Every problem with the input is one UserError naming it."""
    start = time.time()
    if source.startswith("pixels:"):
        name = source[len("pixels:"):]
        arrays, metadata = pixel_features(name, cfg.data_dir, cfg.img_size, cfg.download), {"pixels": name}
    else:
        arrays, metadata = read_features_file(source)
    arrays, class_ids = renumber_classes(check_features(arrays, source))
    if not torch.equal(class_ids, torch.arange(len(class_ids))):
        shown = ", ".join(map(str, class_ids[:5].tolist())) + (", ..." if len(class_ids) > 5 else "")
        print(f"{source}: class ids {{{shown}}} renumbered 0..{len(class_ids) - 1}, keeping their sorted order")
        metadata = {**metadata, "renumbered_class_ids": as_metadata(class_ids)}
    if len(class_ids) == 1 and "pixels" not in metadata:  # for pixels, load_dataset has already said so
        print(f"{source}: warning: every label is one class, so every accuracy is 100 % and means nothing")
    train_x, test_x = arrays["train_features"], arrays["test_features"]
    ks = usable_ks(cfg, len(train_x), source)
    print(f"{source}: {len(train_x)} train and {len(test_x)} test samples, {train_x.shape[1]} dimensions, on {device}",
          flush=True)
    numbers = evaluate(arrays, ks, cfg, device)
    result = {"input": source, "metadata": metadata, "num_train": len(train_x), "num_test": len(test_x), **numbers,
              "seconds": time.time() - start, "settings": settings(cfg, device)}
    return result, torch.linalg.svdvals(train_x.double()).numpy() if cfg.plot else None


# =============================================================================================
# The report: one table for every input, the JSON file, the spectrum plot
# skim: formatting only
# =============================================================================================

def table_row(label, numbers, cfg, seconds=""):
    """One row of cells; '-' for a k that this input has too few training samples for."""
    percent = lambda accuracies, k: f"{100 * accuracies[k]:.2f}" if k in accuracies else "-"
    ks = parse_ks(cfg.knn_k)
    cells = [label, str(numbers["dim"])] + [percent(numbers["knn"], k) for k in ks]
    cells += [percent(numbers["knn_majority"], k) for k in ks] if cfg.majority else []
    cells += [f"{100 * numbers['linear_probe']:.2f}"] if cfg.probe_epochs else []
    return cells + [f"{numbers['effective_rank']:.1f}", f"{numbers['effective_rank_centered']:.1f}", seconds]


def format_table(results, cfg):
    """Accuracies in percent; one row per input, then one per --subspace projection of it."""
    ks = parse_ks(cfg.knn_k)
    header = ["input", "dim"] + [f"knn@{k}" for k in ks] + ([f"maj@{k}" for k in ks] if cfg.majority else [])
    header += (["linear"] if cfg.probe_epochs else []) + ["erank", "erank_c", "time"]
    rows = [header]
    for result in results:
        rows.append(table_row(result["input"], result, cfg, f"{result['seconds']:.1f}s"))
        for name, numbers in result.get("subspace", {}).items():
            rows.append(table_row(f"  {name} ({100 * numbers['variance_kept']:.1f}% var)", numbers, cfg))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    caption = [f"k-NN: DINO protocol, votes exp(sim / {cfg.knn_t:g}); linear probe: {describe_probe(cfg)}",
               "erank, erank_c: effective rank of the train features, not centred (RankMe) and centred"]
    return "\n".join(caption + [lines[0], "-" * len(lines[0])] + lines[1:])


def describe_probe(cfg):
    """Which linear probe produced the numbers, in words, for the table and the JSON."""
    if not cfg.probe_epochs:
        return "none (--probe-epochs 0)"
    if cfg.probe == "authors":
        knobs = AUTHORS_PROBE
        return (f"the decay paper's authors' (raw features, AdamW lr {knobs['lr']:g} with weight decay "
                f"{knobs['weight_decay']:g}, batch {knobs['batch_size']}, incomplete batch dropped, cosine set once per "
                f"epoch, final epoch of {knobs['epochs']})")
    batch = cfg.probe_batch_size or "full"
    return (f"standard (features standardised by train statistics, AdamW lr {cfg.probe_lr:g}, batch {batch}, "
            f"cosine, final epoch of {cfg.probe_epochs})")


def settings(cfg, device):
    """The exact settings, with the conventions spelled out, for the JSON file."""
    return {**dataclasses.asdict(cfg), "device": str(device), "torch": torch.__version__, "numpy": np.__version__,
            "knn_protocol": "DINO: L2-normalised features, cosine similarity, votes exp(sim / knn_t)",
            "probe_protocol": f"{describe_probe(cfg)}; one Linear layer, cross-entropy, weight decay "
                              f"{AUTHORS_PROBE['weight_decay'] if cfg.probe == 'authors' else 0}",
            "effective_rank_of": "train features: effective_rank not centred (RankMe), effective_rank_centered after "
                                 "subtracting their mean (subspace rows are centred projections: the two agree)"}


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def plot_spectra(spectra, path):
    """Singular values s_i / s_1 of each input's train features, log-log: the whole spectrum that
    effective rank summarises in one number."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, singular_values, erank, erank_centered in spectra:
        ax.loglog(np.arange(1, len(singular_values) + 1), singular_values / singular_values[0],
                  label=f"{label} (erank {erank:.1f}, centred {erank_centered:.1f})")
    ax.set(xlabel="index i", ylabel="s_i / s_1", title="singular values of the train features (not centred)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


# =============================================================================================
# Plumbing: the command line and its validation
# skip on a first read: read only if you add a flag
# =============================================================================================

class OneSentenceParser(argparse.ArgumentParser):
    """argparse, but a flag it cannot parse (unknown, missing value, not a number) is a UserError:
    one `error:` sentence and exit code 2 like every other bad input, not usage lines."""

    def error(self, message):
        raise UserError(f"{message} (see --help).")


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


def parse_config(argv=None):
    """Returns (Config, list of feature-file paths), every flag checked before anything is read."""
    parser = OneSentenceParser(prog="probe.py", description="Frozen-feature evaluation: k-NN, linear probe, effective "
                               "rank, subspace probes. The text of each option is its comment in probe.py's Config.")
    parser.add_argument("features", nargs="*", help="features files (.npz or .pt) with train/test features and labels")
    helps, sections, groups = knob_help(), knob_sections(), {}
    choices = {"device": ("auto", "cuda", "mps", "cpu"), "probe": ("standard", "authors")}  # argparse refuses the rest
    for field in dataclasses.fields(Config):
        section, default = sections[field.name], field.default
        group = groups[section] if section in groups else groups.setdefault(section, parser.add_argument_group(section))
        ## argparse %-formats help strings: a literal % in a comment ("p% of") must be doubled.
        text = f"{helps[field.name]} (default: {default if default != '' else 'none'})".replace("%", "%%")
        flag = "--" + field.name.replace("_", "-")
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            group.add_argument(flag, type=type(default), choices=choices.get(field.name), default=default, help=text)
    args = vars(parser.parse_args(argv))
    paths = args.pop("features")
    cfg = Config(**args)
    check_config(cfg, paths)
    return cfg, paths


def parse_ks(text):
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise UserError(f"--knn-k must be a comma-separated list of integers, got '{text}'.") from None
    if not ks or ks[0] < 1:
        raise UserError(f"--knn-k needs at least one neighbour count, each at least 1, got '{text}'.")
    return ks


def parse_subspaces(text):
    """'top:90,bottom:20' -> [('top', 90.0), ('bottom', 20.0)]."""
    subspaces = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        side, _, percent = item.partition(":")
        try:
            percent = float(percent)
        except ValueError:
            percent = -1.0
        if side not in ("top", "bottom") or not 0 < percent <= 100:
            raise UserError(f"--subspace items look like top:90 or bottom:20 (a percentage in (0, 100]), got '{item}'.")
        subspaces.append((side, percent))
    return subspaces


def nearest_existing(path):
    """path itself if it exists, else its closest ancestor that does (never empty)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_config(cfg, paths):
    """Every bad value a user can type ends here with one sentence naming the fix, before anything is
    read, computed or written: a run never fails at the end for a reason known at the start.
    Creates nothing."""
    def need(ok, message):
        if not ok:
            raise UserError(message)
    need(paths or cfg.pixels, "nothing to evaluate: give one or more features files (.npz or .pt), or --pixels DATASET.")
    parse_ks(cfg.knn_k)
    parse_subspaces(cfg.subspace)
    for flag, value in (("--knn-t", cfg.knn_t), ("--probe-lr", cfg.probe_lr)):
        need(math.isfinite(value) and value > 0, f"{flag} must be a positive finite number, got {value}.")
    ## The k-NN votes are float32: k votes exp(sim / T) at sim = 1 add up to inf once
    ## 1 / T > log(3.4e38) - log(k) (88.7 - 5.3 for k = 200), and the vote then means nothing.
    smallest_t = 1 / (math.log(torch.finfo(torch.float32).max) - math.log(max(parse_ks(cfg.knn_k))))
    need(cfg.knn_t > smallest_t, f"--knn-t must be above {smallest_t:.4f} for k up to {max(parse_ks(cfg.knn_k))} "
                                 f"(the votes exp(sim / T) overflow float32 below), got {cfg.knn_t}.")
    need(cfg.probe_epochs >= 0, f"--probe-epochs must be at least 1 (or 0 to skip the probe), got {cfg.probe_epochs}.")
    need(cfg.probe_batch_size >= 0, f"--probe-batch-size must be at least 1 (or 0 for full batch), got {cfg.probe_batch_size}.")
    need(cfg.img_size >= 1, f"--img-size must be at least 1, got {cfg.img_size}.")
    need(0 <= cfg.seed < 2 ** 63, f"--seed must be between 0 and 2**63 - 1, got {cfg.seed}.")
    if cfg.pixels:
        folder = cfg.pixels[len("folder:"):] if cfg.pixels.startswith("folder:") else None
        need(folder is not None or cfg.pixels in (*BUILT_IN, *CIFAR, *IDX),
             f"--pixels must be glyphs, shapes, textures, {', '.join([*CIFAR, *IDX])} or folder:PATH, got '{cfg.pixels}'.")
        need(folder is None or os.path.isdir(folder), f"--pixels {cfg.pixels}: there is no folder {folder}.")
        if cfg.pixels not in BUILT_IN:  # --data-dir is read, and written to by a download or an image-folder cache
            need(cfg.data_dir, "--data-dir is empty; give a folder.")
            ancestor = nearest_existing(cfg.data_dir)
            need(os.path.isdir(ancestor), f"--data-dir {cfg.data_dir} cannot be a folder: {ancestor} is a file.")
    outputs = [(flag, path) for flag, path in (("--json", cfg.json), ("--plot", cfg.plot)) if path]
    for flag, path in outputs:
        need(not path.endswith(("/", os.sep)) and not os.path.isdir(path), f"{flag} {path} is a folder; give a file name.")
        need(not os.path.exists(path) or os.path.isfile(path), f"{flag} {path} exists and is not a regular file.")
        need(os.path.realpath(path) not in {os.path.realpath(p) for p in paths},
             f"{flag} {path} is one of the inputs; writing it would destroy it.")
        ancestor = nearest_existing(os.path.dirname(os.path.abspath(path)))
        need(os.path.isdir(ancestor), f"{flag} {path} cannot be created: {ancestor} is a file, not a folder.")
        need(os.access(ancestor, os.W_OK | os.X_OK), f"{flag} {path} cannot be written: {ancestor} is not writable.")
    need(len(outputs) < 2 or os.path.realpath(cfg.json) != os.path.realpath(cfg.plot),
         f"--json and --plot name the same file {cfg.json}; give two names.")


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


# =============================================================================================
# Plumbing: raw pixels for --pixels. This section, down to load_dataset and atomic_save, is a
# deliberate verbatim copy of mae_decay.py's; tests/test_copies.py checks that the copies match.
# skip on a first read: read only if you change the data
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


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))

# =============================================================================================
# Plumbing: a features file or a dataset's raw pixels, checked before anything is computed
# skip on a first read: read only if you change the features-file format
# =============================================================================================

FEATURE_KEYS = ("train_features", "train_labels", "test_features", "test_labels")


def as_metadata(value):
    """A JSON-friendly version of a metadata entry (numbers, strings, small arrays; big arrays by shape)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        size = value.size if isinstance(value, np.ndarray) else value.numel()
        return value.tolist() if size <= 64 else f"array of shape {tuple(value.shape)}"
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def read_features_file(path):
    """{key: tensor} for the four feature keys, and the metadata: every other key."""
    if not os.path.isfile(path):
        raise UserError(f"features file {path} does not exist.")
    try:
        if path.endswith(".npz"):
            if not zipfile.is_zipfile(path):
                raise UserError(f"{path} is not an .npz (zip) file; write features with numpy.savez.")
            with np.load(path, allow_pickle=False) as npz:  # no pickles: a features file cannot run code
                blob = {key: npz[key] for key in npz.files}
        elif path.endswith(".pt"):
            blob = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers only
        else:
            raise UserError(f"{path}: a features file must end in .npz or .pt.")
    except UserError:
        raise
    except Exception as e:
        # a pickled Python object (a class instance, a function, an object array) could run code when
        # loaded, so it is refused; torch's own text for it is eight lines suggesting weights_only=False
        if isinstance(e, pickle.UnpicklingError) or "allow_pickle" in str(e):
            raise UserError(f"{path} holds a Python object other than arrays, numbers and strings (a class instance, "
                            f"say), which is not loaded because unpickling it could run code; save only those "
                            f"(numpy.savez, or torch.save of a dict of tensors).") from None
        raise UserError(f"{path} could not be read as a features file ({type(e).__name__}: {e}).") from None
    if not isinstance(blob, dict):
        raise UserError(f"{path} holds a {type(blob).__name__}, not a dict of arrays with keys {', '.join(FEATURE_KEYS)}.")
    missing = [key for key in FEATURE_KEYS if key not in blob]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: a features file needs {', '.join(FEATURE_KEYS)}.")
    arrays = {}
    for key in FEATURE_KEYS:
        try:  # np.array copies, so the tensor never shares a read-only buffer
            arrays[key] = torch.as_tensor(np.array(blob[key]) if isinstance(blob[key], np.ndarray) else blob[key])
        except (TypeError, ValueError, RuntimeError):
            kind = getattr(blob[key], "dtype", type(blob[key]).__name__)
            raise UserError(f"{path}: {key} must be a numeric array, got {kind}.") from None
    metadata = {key: as_metadata(value) for key, value in blob.items() if key not in FEATURE_KEYS}
    return arrays, metadata


def pixel_features(name, data_dir, size, allow_download):
    """A dataset's raw pixels as features: (N, C*H*W) floats in [0, 1], the reference every encoder must beat."""
    parts = load_dataset(name, data_dir, size, allow_download)
    return {f"{split}_{kind}": torch.from_numpy(np.array(array)).flatten(1).float().div_(255) if kind == "features"
            else torch.from_numpy(np.array(array))
            for split in ("train", "test") for kind, array in zip(("features", "labels"), parts[split])}


def check_features(arrays, source):
    """Every problem in a features file a user can cause, as one sentence. Returns float features
    and int64 labels, ready for the functions below."""
    def need(ok, message):
        if not ok:
            raise UserError(f"{source}: {message}")
    checked = {}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_features"], arrays[f"{split}_labels"]
        need(x.ndim == 2 and len(x) > 0, f"{split}_features must be a non-empty 2-D (N, D) array, got shape {tuple(x.shape)}.")
        need(y.ndim == 1, f"{split}_labels must be 1-D (one class id per sample), got shape {tuple(y.shape)}.")
        need(len(x) == len(y), f"{split}_features has {len(x)} rows but {split}_labels has {len(y)} entries; they must match.")
        need(not x.is_complex(), f"{split}_features must be real numbers, got dtype {x.dtype}.")
        x = x.float()  # (N, D)
        bad_rows = int((~torch.isfinite(x)).any(1).sum())
        need(bad_rows == 0, f"{split}_features has NaN or infinite values in {bad_rows} of {len(x)} rows; fix the encoder or drop them.")
        need(not y.is_complex() and (not y.is_floating_point() or bool((y == y.round()).all())),
             f"{split}_labels must be integer class ids, got non-integer values (dtype {y.dtype}).")
        need(bool((y >= 0).all()), f"{split}_labels must be non-negative class ids, found {int(y.min())}.")
        checked[f"{split}_features"], checked[f"{split}_labels"] = x, y.long()
    need(checked["train_features"].shape[1] == checked["test_features"].shape[1],
         f"train_features have {checked['train_features'].shape[1]} dimensions but test_features "
         f"{checked['test_features'].shape[1]}; they must come from the same encoder.")
    unseen = sorted(set(checked["test_labels"].tolist()) - set(checked["train_labels"].tolist()))
    need(not unseen, f"test class(es) {unseen[:10]} never appear in train_labels, so no classifier can predict them.")
    return checked


def renumber_classes(arrays):
    """The labels as 0..C-1, the class ids keeping their sorted order: {0, 7, 10**9} -> {0, 1, 2}.
    The k-NN vote table and the probe's output layer have one column per id up to the largest, so
    ids like 10**9 would ask for 4 GB of float32 votes per test sample. Returns the arrays and the
    sorted original ids (C,)."""
    ids = torch.unique(arrays["train_labels"])  # sorted; check_features made sure every test id is among them
    return {key: torch.searchsorted(ids, value) if key.endswith("_labels") else value
            for key, value in arrays.items()}, ids


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


class Terminated(Exception):
    """SIGTERM (what `timeout`, `docker stop` and job schedulers send): ends a run like Ctrl-C, exit code 143."""


def terminate_on_sigterm():
    """From here on SIGTERM raises Terminated in the main thread: the run ends with one line, not a silent kill."""
    def handler(signum, frame):
        raise Terminated
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


# =============================================================================================
# Main: validate every flag, evaluate each input, print the table, write the files
# read: the whole run, in order
# =============================================================================================

def main(argv=None):
    try:
        cfg, paths = parse_config(argv)
        device = pick_device(cfg.device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results, spectra, errors = [], [], []
    terminate_on_sigterm()  # from here on SIGTERM ends the run with one line, like Ctrl-C
    try:
        for source in ([f"pixels:{cfg.pixels}"] if cfg.pixels else []) + paths:
            try:
                result, singular_values = evaluate_input(source, cfg, device)
                spectra.append((source, singular_values, result["effective_rank"], result["effective_rank_centered"]))
            except (UserError, OSError) as e:  # one bad input must not cost the others their results
                message = str(e) if isinstance(e, UserError) else f"{e.strerror or e}: {e.filename}."
                named = source.removeprefix("pixels:").removeprefix("folder:") in message  # most errors name the file
                result = {"input": source, "error": message if named else f"{source}: {message}"}
                errors.append(result["error"])
                print(f"{source}: not evaluated, see the error at the end", flush=True)
            results.append(result)
        if len(errors) < len(results):
            print(format_table([r for r in results if "error" not in r], cfg))
            if cfg.json:
                write_json(cfg.json, results[0] if len(results) == 1 else results)  # a failed input: its error
                print(f"wrote {cfg.json}")
            if cfg.plot:
                plot_spectra(spectra, cfg.plot)
                print(f"wrote {cfg.plot}")
    except (KeyboardInterrupt, Terminated) as e:
        print(f"{'terminated (SIGTERM)' if isinstance(e, Terminated) else 'interrupted'}; only the files reported as "
              f"written were written", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130  # the shell's 128 + the signal's number
    except UserError as e:  # the output folder filled up or changed after the checks (atomic_write's one sentence)
        errors.append(str(e))
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    return 2 if errors else 0

if __name__ == "__main__":
    sys.exit(main())
