"""
diffusion_decay.py: a diffusion transformer (DiT, trained as a flow like SiT) whose blocks use
DECAYED identity shortcuts and U-ViT long skips, from data to generation quality AND frozen-feature
quality, in one file.

Paper: Zhang, Jiang, Gao, Willett, Maire, "Residual Connections Harm Generative Representation
Learning" (arXiv 2404.10947). Every residual sub-layer x_{k+1} = x_k + f_k(x_k) becomes

    x_{k+1} = alpha_k * x_k + f_k(norm(x_k)),   alpha_k falling linearly from 1 to alpha_min,

over ALL blocks of the network. The paper's diffusion claim (SiT-XL/2, ImageNet 256, 400k steps,
no guidance): FID 17.2 baseline, 16.5 with U-ViT long skips, 11.8 with long skips and alpha_min 0.8.
As the authors' SiT code (SiT/models.py): adaLN-Zero blocks, one alpha per sub-layer over all
blocks, x = x + Linear(skip) into each decoder-half block, the straight path between data and
noise with a velocity target, uniform training times. The paper's three rows are one flag apart:

    --skips off --alpha-min 1.0     baseline DiT / SiT
    --skips on  --alpha-min 1.0     + long skips
    --skips on  --alpha-min 0.8     + long skips + decayed shortcuts (the authors' value at depth 28;
                                    the CPU demo uses 0.3 at depth 6, see PRESETS for why)

Where we differ from the authors' SiT, and why: pixels instead of Stable-Diffusion VAE latents (no
extra download); time runs from data (t = 0) to noise (t = 1), the reverse of SiT's, which changes
nothing a network can tell (see the flow section); t is multiplied by 1000 before the sinusoidal
time embedding, as DiT's integer steps (SiT feeds t in [0, 1], where most of the embedding is
nearly constant; --time-scale 1 is SiT's); exact GELU instead of its tanh approximation; a
fixed-step Heun sampler instead of dopri5; a cosine learning-rate schedule with warm-up and an EMA
warm-up (SiT: constant lr 1e-4, EMA 0.9999 from step 0); unconditional by default (--class-cond).

Run (each command prints what it does; `--help` lists every knob with its default):

    python diffusion_decay.py                       # CPU demo: skips off/on x alpha_min 1.0/0.3, built-in shapes 16px
    python diffusion_decay.py --preset cifar --compile                    # DiT-S/2 on CIFAR-10, one GPU (CUDA graphs)
    python diffusion_decay.py --dataset fashion-mnist --img-size 28 --train-limit 10000 --epochs 3 --eval-every 0
    python diffusion_decay.py --class-cond --cfg-scale 2.0 --skips on --alpha-min 0.3   # class-conditional + CFG
    python diffusion_decay.py --preset cifar --benchmark --compile        # img/s, ms/step, memory, MFU
    python diffusion_decay.py --alpha-eff 1,2.4e-3 --skips on             # our tool: alpha_min from a target prod(alphas)
    python diffusion_decay.py --probe authors       # the authors' linear probe (raw features, 200 epochs) instead of ours

The study (--study): the paper's three diffusion rows as arms, plain DiT (skips off, alpha_min 1.0),
+ long skips (on, 1.0) and + long skips + decay (on, 0.8, the authors' SiT value), class-conditional,
CIFAR-10 at 32 px, seeds 0 and 1, each run with its own full schedule. It prints ONE table (mean +-
std over seeds per arm: FD-smallcnn unguided and at CFG 1.5, k-NN, probe, both ranks, loss, train
seconds), the paired differences against the baseline arm on the same seed (and decay against long
skips alone), and verdict lines naming which differences exceed the seed spread (|mean| > 2 x the std
of the paired differences; a screen, not a test: see exceeds_seed_spread); it writes, in
runs/diffusion_study, results.json (after every run, so a study stopped early keeps its finished
runs) and samples.png (one grid per arm, one figure). The FD floor printed beside it is 2,000 real TRAINING images against the full test set:
the same count as the samples against the same reference, so the floor carries the same finite-sample
bias as the numbers it sits beside (two halves of the test set would compare 5,000 with 5,000).
Not yet run on a GPU; the command for one GPU, with our ESTIMATE of its wall time:

    python diffusion_decay.py --study --compile --data-dir DATA               # ~8.5 min (estimate below)
    python diffusion_decay.py --study --compile --data-dir DATA --benchmark   # first, if in doubt: each arm's step, and the projected training time

The estimate, from the README's H100 measurements (torch 2.11; an H200 is similar or a bit faster):
* training: DiT-S/2 (width 384, depth 12, patch 2: 256 tokens) at 50.6 ms per step of 256 images
  (compiled, default mode) = 9.9 s per CIFAR-10 epoch of 195 steps; 3 arms x 2 seeds x 3 epochs =
  18 epochs = 178 s. --compile now uses CUDA graphs on one GPU, which should only shorten this (unmeasured).
* FD: 2,000 samples per FD (Heun, 10 steps = 20 network calls), unguided and at CFG 1.5 (which runs a
  doubled batch): 20 x 2,000 x (1 + 2) = 120,000 image forwards per run. The EMA model samples
  eagerly; a forward is ~1/3 of a training step, so ~3 x 2,752 = 8,300 img/s (the README's eager
  class-conditional DiT-S/2 step: 2,752 img/s) -> 14.5 s per run, 87 s for 6 runs.
* features: 3 noise levels x 60,000 images through the encoder half (half a forward) = 90,000
  forward-equivalents per run -> 11 s per run, 65 s for 6 runs.
* not measured, assumed: k-NN and linear probes < 30 s in all; loading CIFAR-10 and training the
  reference CNN (15 epochs, 95k parameters) < 30 s; compiling 3 graphs (one per arm; the seeds of an
  arm share it) ~40 s each = 120 s.
* sum: 178 + 87 + 65 + 30 + 30 + 120 = 510 s = 8.5 min. Why 3 epochs and 2,000 samples: they are what
  fits; 10,000 samples per FD would cost 5 x 87 = 435 s of sampling alone. Whether 2,000 suffice
  is read off the output: the floor is the FD a perfect generator would get at this count, and the
  paired std is the seed-to-seed spread the verdicts compare each difference with. If the
  --benchmark line projects more than ~200 s of training, lower --epochs to 2.

Several GPUs (PyTorch DDP: one process per GPU; --batch-size stays the GLOBAL batch, split evenly,
and the run follows the one-process trajectory; only rank 0 prints and writes files):

    torchrun --standalone --nproc_per_node=8 diffusion_decay.py --preset cifar --compile
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 diffusion_decay.py ...  # R=0, 1
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 diffusion_decay.py --device cpu   # CPU, gloo

Outputs go to --out-dir (default runs/diffusion; one run at a time, and only a run of this script with
the same settings: anything else is refused before a file is written): config.json (this script's
name and the settings), the cached reference classifier (fd_reference_*.pt), one folder per (skips,
alpha_min, seed) with ckpt.pt (model, EMA, optimizer, RNG, step, config), samples.png and
features.npz (the format probe.py reads; features_t<t>.npz for the other noise levels),
results.json, and the plots curves.png (loss, FD, k-NN and both effective ranks over training) and
samples.png (grids side by side). Ctrl-C or SIGTERM during training saves a checkpoint first.

What is measured, and how:
* Generation: "FD-smallcnn", the Frechet distance between generated images (EMA weights,
  deterministic Heun ODE sampler) and the real test images, in the penultimate features of a small
  CNN that this file trains once on the real training set and caches. It is NOT ImageNet-Inception
  FID: numbers are comparable only within one dataset, image size and --fd-samples. Real-vs-real
  (training images) and noise-vs-real values are printed next to it as floor and ceiling.
* Representation: tokens at the end of the ENCODER HALF (the U-ViT bottleneck) of the EMA model,
  mean-pooled, null class, for the image noised along the path to each --feature-t (default 0.1,
  0.25, 0.5: uniform training times visit each of them as often as any other level, a tenth of
  the steps within +-0.05; a clean t = 0 input lies at the edge of that range, and with
  --time-dist logit-normal training almost never sees it: 0.0016 of the steps below t = 0.05).
  The headline is the FIRST level, fixed in advance (never picked on test labels); every level is
  printed in a second table. k-NN (DINO protocol), linear probe (final epoch; ours or, with
  --probe authors, the authors'), effective rank uncentred (RankMe) and centred.

Known-good numbers: `OMP_NUM_THREADS=1 python diffusion_decay.py` (torch 2.13, one thread, a 2-core CPU
busy with other work at load ~5: 24 min 47 s wall for the 4 runs of 624 steps, evaluation included).
shapes 16px, DiT 64x6/4, 8 epochs, seed 0; reference CNN test accuracy 0.5035; chance is 0.10:

skips alpha_min alpha_eff seeds   FD-smallcnn         k-NN@20    linear probe       eff. rank    centred rank  loss (last ep)  train s
  off         1  1.00e+00     1       20.9970          0.1085          0.1130         13.0065         26.9879          0.3331      318
  off       0.3  2.64e-03     1       26.1037          0.1075          0.0900         11.5044         20.5383          0.3510      348
   on         1  1.00e+00     1       17.5658          0.1055          0.0975         11.2561         14.8659          0.3398      344
   on       0.3  2.64e-03     1       15.6110          0.1105          0.1040         12.4857         21.5198          0.3310      143

One seed of one tiny model, so no claim: long skips lowered the FD (21.00 -> 17.57), decay without
skips raised it (26.10), decay with skips gave the lowest (15.61). The features are at chance for
every setting at every probed level (k-NN 0.0935 to 0.1225 in the second table, t = 0.1, 0.25, 0.5):
a model this small, trained this briefly, has not learned the shape classes.

Two comment layers: `##` lines teach (why a line exists, which equation it implements) and can be
stripped with `sed '/^\\s*## /d'`; `#` lines are ordinary comments.
"""

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import gzip
import hashlib
import inspect
import json
import math
import numbers
import os
import pickle
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
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm


# =============================================================================================
# Config: every knob of an experiment, one line each (read it: it is the table of contents)
# =============================================================================================

@dataclasses.dataclass
class Config:
    # --- data ---
    dataset: str = "shapes"       # glyphs | shapes | textures (all built-in) | cifar10 | cifar100 | fashion-mnist | mnist | folder:PATH
    data_dir: str = "data"        # where datasets are looked for and downloaded to (and image folders cached)
    download: bool = True         # download missing official files (checksum verified before use)
    train_limit: int = 0          # use only the first N training images (0 = all)
    img_size: int = 16            # side of the square image the model generates
    flip: bool = True             # random horizontal flips of the training images
    # --- model ---
    patch_size: int = 4           # patch side in pixels
    embed_dim: int = 64           # transformer width
    depth: int = 6                # blocks (even): the first half is the encoder half, the rest the decoder half
    num_heads: int = 4            # attention heads
    mlp_ratio: float = 4.0        # MLP hidden width / width
    skips: str = "off,on"         # comma list of on|off: U-ViT long skips between the halves; one run per value
    alpha_min: str = "1.0,0.3"    # comma list: one run per value (times each --skips value), identical settings
    alpha_eff: str = ""           # instead of alpha_min: comma list of targets for prod(alphas) over all blocks (our tool)
    class_cond: bool = False      # class-conditional model (labels would leak into the probed features: off by default)
    class_dropout: float = 0.1    # with --class-cond: fraction of training labels replaced by the null class (CFG)
    # --- flow training ---
    time_dist: str = "uniform"    # uniform (SiT's default) | logit-normal (SD3's): distribution of the training time t
    time_scale: float = 1000.0    # t is multiplied by this before the sinusoidal time embedding (DiT's steps: 1000; SiT: 1)
    epochs: int = 8               # passes over the training set
    max_steps: int = 0            # stop after this many optimizer steps (0 = all); the schedule still spans --epochs
    batch_size: int = 128         # images per optimizer step
    base_lr: float = 2e-3         # lr = base_lr * batch_size / 256
    min_lr: float = 0.0           # floor of the cosine schedule
    warmup_epochs: float = 1.0    # linear warm-up length, then half-cycle cosine, per step
    weight_decay: float = 0.0     # AdamW decay, not applied to biases, norms and tokens (SiT: 0)
    beta2: float = 0.999          # AdamW beta2 (SiT: 0.999)
    ema_decay: float = 0.995      # EMA of the weights (with warm-up min(decay, (1+step)/(10+step))); SiT: 0.9999
    seeds: str = "0"              # comma list of seeds; several give mean +- std in the table
    # --- sampling and generation quality ---
    sampler: str = "heun"         # euler | heun: deterministic ODE sampler from t=1 (noise) to t=0 (data)
    sample_steps: int = 10        # sampler steps (heun costs two network calls per step)
    cfg_scale: float = 1.0        # classifier-free guidance scale with --class-cond (1 = conditional model)
    fd_cfg_scale: float = 0.0     # with --class-cond: a second FD-smallcnn of samples at this guidance scale (0 = none)
    fd_samples: int = 500         # generated images (and real training images for the real-vs-real floor) per FD
    ref_epochs: int = 3           # epochs of the reference CNN whose features define FD-smallcnn
    # --- representation ---
    eval_every: int = 4           # FD + cheap k-NN + effective rank every N epochs (0 = only at the end)
    feature_t: str = "0.1,0.25,0.5"  # comma list of noise levels t of the probed input; the FIRST is the headline
    knn_k: int = 20               # neighbours for the headline k-NN number (DINO protocol)
    knn_t: float = 0.07           # k-NN temperature
    probe: str = "standard"       # standard (standardised features, the two knobs below) | authors (raw features, AdamW lr 1e-2, batch 256, 200 epochs)
    probe_epochs: int = 20        # linear-probe epochs (final epoch is reported, never the best); one default in every script
    probe_lr: float = 3e-3        # linear-probe AdamW peak lr (cosine schedule, weight decay 0); one default in every script
    # --- study ---
    study: bool = False           # the study: every --study-arms arm x every --seed, the STUDY settings, one table with paired differences and verdicts
    study_arms: str = "plain,skips,decay"  # with --study: comma list of STUDY_ARMS names; the first is the baseline
    # --- system ---
    device: str = "auto"          # auto | cuda | mps | cpu
    threads: int = 0              # CPU threads for torch (CPU only): 0 = OMP_NUM_THREADS if set, else half the usable cores, at least 1
    compile: bool = False         # torch.compile the model for training (falls back to eager if it fails)
    compile_mode: str = "auto"    # with --compile: auto (reduce-overhead = CUDA graphs on one CUDA GPU, else default) | default | reduce-overhead | max-autotune
    out_dir: str = "runs/diffusion"  # where checkpoints, features, samples, plots and results go
    resume: bool = False          # continue each run from its checkpoint in out_dir
    ckpt_every: int = 4           # write a checkpoint every N epochs (and at the end) ...
    ckpt_minutes: float = 10.0    # ... and whenever this many minutes of training passed since the last one
    log_every: int = 20           # steps between progress-bar updates (each one syncs the device)
    json: str = ""                # also write every run's final numbers to this file
    plots: bool = True            # write the PNG plots and sample grids
    benchmark: bool = False       # only time the training step and print img/s, ms/step, memory, MFU
    dist_backend: str = "auto"    # under torchrun: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    dist_timeout: float = 30.0    # under torchrun: minutes a process waits for the others before failing


PRESETS = {
    ## The CPU demo (= the defaults above): a DiT of width 64, depth 6, patch 4 on 16x16 built-in
    ## shapes (16 tokens), 8 epochs, the four combinations of skips off/on and alpha_min 1.0/0.3.
    ## Our choice of 0.3: at depth 6 it gives prod(alphas) = 2.6e-3, the TOTAL shortcut decay of the
    ## authors' SiT-XL/2 (alpha_min 0.8 at depth 28: 2.4e-3); the authors' 0.8 itself would give only
    ## 0.27 at depth 6. Which of the two carries over to a small model is open: compare them with
    ## --skips on --alpha-min 1.0,0.8,0.3.
    "quick": dict(),
    ## DiT-S/2 (width 384, depth 12, 6 heads) on 32x32 CIFAR-10: 256 tokens, with the authors' SiT
    ## value alpha_min 0.8 (at depth 12: prod(alphas) 7.6e-2).
    "cifar": dict(dataset="cifar10", img_size=32, patch_size=2, embed_dim=384, depth=12, num_heads=6,
                  skips="off,on", alpha_min="1.0,0.8", epochs=100, batch_size=256, base_lr=2e-4, warmup_epochs=2,
                  ema_decay=0.9999, sample_steps=32, fd_samples=10000, ref_epochs=15, eval_every=10,
                  ckpt_every=5, log_every=50),
}


## The study (--study): the paper's three diffusion rows, each arm with its own full schedule, over
## --seeds. Arm name -> (label, skips, alpha_min); the first arm of --study-arms is the baseline.
STUDY_ARMS = {"plain": ("plain DiT", False, 1.0), "skips": ("+ long skips", True, 1.0),
              "decay": ("+ long skips + decay", True, 0.8)}  # 0.8: the authors' SiT-XL/2 value

## The study's settings (on top of the preset; typed flags still win). DiT-S/2 on CIFAR-10 because
## it is the model whose speed was measured (README: 50.6 ms per step of 256 images on an H100,
## torch.compile default mode, 9.9 s per epoch); class-conditional like the paper's SiT; 3 epochs
## and 2,000 samples per FD so that the study fits ~8 minutes (the docstring's study section has the sums).
## lr 3e-4 with half an epoch of warm-up (the cifar preset's 2e-4 and 2 warm-up epochs are for 100
## epochs) is our untuned choice for a 3-epoch schedule.
STUDY = dict(dataset="cifar10", img_size=32, patch_size=2, embed_dim=384, depth=12, num_heads=6, class_cond=True,
             cfg_scale=1.0, fd_cfg_scale=1.5, epochs=3, batch_size=256, base_lr=3e-4, warmup_epochs=0.5,
             ema_decay=0.9999, sample_steps=10, fd_samples=2000, ref_epochs=15, eval_every=0, seeds="0,1",
             ckpt_every=5, log_every=50, out_dir="runs/diffusion_study")


# =============================================================================================
# THE IDEA, part 1: a DiT whose every residual sub-layer has a decayed shortcut, plus U-ViT
# long skips. Read this first: it is the paper's method, line by line.
# =============================================================================================
## A transformer block has two residual sub-layers (attention, then MLP). The paper replaces each
##     x_{k+1} = x_k + f_k(norm(x_k))        by        x_{k+1} = alpha_k * x_k + f_k(norm(x_k)),
## with alpha_k a FIXED number (nothing learnable) that falls linearly from 1 at the first sub-layer
## to alpha_min at the last. A shortcut weighted below 1 lets an early layer's signal reach the
## end only after being shrunk by every later alpha, so the deep layers must re-derive what they
## need from the branches f_k: the paper argues this pushes the network toward low-rank, abstract
## features. alpha_min = 1 is the ordinary residual network (the baseline of every comparison).

def decay_schedule(depth, alpha_min):
    """The 2*depth shortcut weights, one per residual sub-layer: first exactly 1.0, last exactly
    alpha_min, linear in between."""
    ## The authors' code: alphas = 1 - linspace(0, 1, 2*depth) * (1 - alpha_min), reshaped (depth, 2):
    ## block i scales its attention shortcut by alphas[2i] and its MLP shortcut by alphas[2i+1].
    ## The paper writes alpha_l = 1 - delta*l with delta = (1 - alpha_min)/L, which is off by one
    ## against that code; we follow the code. Written as a lerp so both ends are exact floats.
    n = 2 * depth
    return [(1 - i / (n - 1)) * 1.0 + (i / (n - 1)) * alpha_min for i in range(n)]


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block with one shortcut weight per residual sub-layer, and (decoder
    half, --skips on) a long-skip input."""

    def __init__(self, dim, heads, mlp_ratio, alpha_attn=1.0, alpha_mlp=1.0, long_skip=False):
        super().__init__()
        ## The two shortcut weights of this block: alphas[2i] (attention) and alphas[2i+1] (MLP).
        self.alpha_attn, self.alpha_mlp = alpha_attn, alpha_mlp  # plain floats: nothing learnable
        ## LayerNorms WITHOUT their own scale and shift: adaLN supplies both, per sample, from (t, y).
        self.norm1, self.attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6), MLP(dim, int(dim * mlp_ratio))
        ## adaLN-Zero (DiT, Peebles & Xie 2023): one Linear maps the conditioning vector c to six
        ## per-channel vectors: shift, scale and gate for each of the two sub-layers. It starts at
        ## ZERO (zero_init_ below), so every gate is 0 and every branch is switched off at step 0.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        ## Decoder-half blocks (--skips on) also read one encoder-half output through a Linear.
        self.skip_proj = nn.Linear(dim, dim) if long_skip else None

    def forward(self, x, c, skip=None):  # x (B, T, D), c (B, D), skip (B, T, D) or None
        if skip is not None:
            ## U-ViT long skip (Bao et al. 2023), as the authors' SiT/models.py: x = x + Linear(encoder-half
            ## output). An undecayed path from the encoder half into the decoder half, added BEFORE the block.
            x = x + self.skip_proj(skip)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        ## The paper's rule inside an adaLN-Zero block (the authors' SiT/models.py, SiTBlock.forward):
        ##   x = alpha_a * x + gate_msa * attn(modulate(norm1(x), shift_msa, scale_msa))
        ##   x = alpha_m * x + gate_mlp * mlp(modulate(norm2(x), shift_mlp, scale_mlp))
        ## ONLY the shortcut term is scaled; the branch is added unscaled. (Scaling the whole sum,
        ## alpha * (x + f(x)), is another rule: the paper's ImageNet-100 ablation of sqrt(0.5) * (x + f)
        ## gives a linear probe of 82.6 against 83.6 for the decay.)
        ## With alpha = 1 this is the DiT block; the gates start at zero, so at initialisation the block
        ## is exactly alpha_a * alpha_m * x (decoder half, --skips on: alpha_a * alpha_m * (x + Linear(skip)),
        ## the skip Linear is not zeroed). The gates (B, D) broadcast over the T tokens: unsqueeze(1).
        x = scaled(x, self.alpha_attn) + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = scaled(x, self.alpha_mlp) + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x

    def zero_init_(self):
        """adaLN-Zero: zero the modulation Linear (weight and bias), after any other init. Every shift,
        scale and gate is then 0, and the block starts as the alpha-scaled identity."""
        ## The zero init matters as much as the rule: the paper reports that without it feature norms
        ## blow up early in training once alpha_min is at or below 0.7. A copied block carries it.
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
        return self


def scaled(x, alpha):
    """alpha * x, skipped when alpha is 1.0 (exactly x in floating point): the first sub-layer and
    every sub-layer of the baseline save one read and one write of x, forward and backward."""
    # a view, not x itself: a free autograd node in the multiply's place, so that autograd sums the
    # gradients of a tensor with three consumers (a long skip's source) in the same order, bit for bit
    return x.view_as(x) if alpha == 1.0 else alpha * x


def modulate(x, shift, scale):  # (B, T, D), (B, D), (B, D) -> (B, T, D)
    ## adaLN (DiT, Peebles & Xie 2023): LayerNorm without affine, then a per-sample scale and shift
    ## regressed from the conditioning vector c = embed(t) + embed(y). "1 + scale" so that a zero
    ## modulation Linear leaves the normalised tokens unchanged.
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


## The two branches f_k are the standard ViT ones, shared verbatim with mae_decay.py: multi-head
## self-attention (every token attends to every token; the heads split the width D into H parts)
## and a two-layer MLP with GELU (hidden width D * mlp_ratio). The authors' SiT uses timm's Mlp
## with the tanh approximation of GELU; we use the exact GELU (they differ by at most 5e-4).
class Attention(nn.Module):
    """Multi-head self-attention: every token attends to every token (no mask, no causal order)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, T, D)
        B, T, D = x.shape
        # unbind on the q/k/v dim of the head split: in backward the three gradients are stacked straight
        # into the (B, T, 3, H, D/H) layout of the qkv Linear's output (permuting first costs one more copy)
        q, k, v = (part.transpose(1, 2) for part in self.qkv(x).view(B, T, 3, self.heads, D // self.heads).unbind(2))  # 3 x (B, H, T, D/H)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D/H), flash / memory-efficient kernel when available
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """The per-token feed-forward branch: Linear, GELU, Linear (hidden = mlp_ratio * dim)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def timestep_embedding(t, dim=256, max_period=10000, scale=1000.0):
    """(B,) continuous times in [0, 1] -> (B, dim) sinusoidal features (cos half, then sin half) of
    scale * t at dim/2 frequencies from 1 down to 1/max_period (GLIDE's and DiT's formula)."""
    ## What we do and why. DiT feeds integer steps 0..999 to this sinusoid. The authors' SiT feeds
    ## the continuous t in [0, 1] UNSCALED (SiT/models.py, TimestepEmbedder), and then the angles
    ## t * freq stay below 0.1 rad for 96 of the 128 frequencies over the whole range of t: most
    ## features are nearly constant and the network sees time only through the few fastest ones.
    ## We multiply t by --time-scale 1000 first (DiT's range); --time-scale 1 is SiT's convention.
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # (half,)
    angles = scale * t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, D): the sinusoid above, then a two-layer MLP (DiT's TimestepEmbedder)."""

    def __init__(self, dim, frequency_dim=256, time_scale=1000.0):
        super().__init__()
        self.frequency_dim, self.time_scale = frequency_dim, time_scale
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # (B,) -> (B, D)
        return self.mlp(timestep_embedding(t, self.frequency_dim, scale=self.time_scale))


class FinalLayer(nn.Module):
    """adaLN, then a Linear to p*p*C values per token (the velocity of that patch)."""

    def __init__(self, dim, patch_size, out_chans):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))  ## zero at init: no shift, no scale
        self.linear = nn.Linear(dim, patch_size * patch_size * out_chans)  ## zero at init: the velocity starts at 0

    def forward(self, x, c):  # (B, T, D), (B, D) -> (B, T, p*p*C)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))

    def zero_init_(self):
        """Zero the modulation and the output Linear: the network's velocity starts at exactly 0."""
        for linear in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        return self


class DiT(nn.Module):
    """Pixel-space DiT predicting the flow velocity. Blocks 0..depth/2-1 form the encoder half,
    the rest the decoder half; decayed shortcuts in ALL blocks (the authors' SiT)."""

    def __init__(self, img_size=16, patch_size=4, in_chans=3, embed_dim=96, depth=6, num_heads=4,
                 mlp_ratio=4.0, alpha_min=1.0, skips=True, num_classes=0, time_scale=1000.0):
        super().__init__()
        self.patch_size, self.in_chans, self.skips, self.num_classes = patch_size, in_chans, skips, num_classes
        ## U-ViT splits the blocks in two: the first half (the "encoder half") feeds the long skips,
        ## the second half (the "decoder half") receives them. Its output is the probed representation.
        self.half = depth // 2
        ## Patch embedding: a p x p convolution with stride p is one Linear applied to each
        ## non-overlapping p x p patch: (B, C, H, W) -> (B, D, H/p, W/p), flattened to L = (H/p)(W/p) tokens.
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        grid = img_size // patch_size
        ## Fixed (not learned) 2D sin-cos position embeddings, added to the tokens.
        ## DiT has no cls token: drop the zero cls row of the MAE table.
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, grid)[1:][None], persistent=False)  # (1, L, D)
        self.t_embedder = TimestepEmbedder(embed_dim, time_scale=time_scale)
        ## Class embedding with one extra row, index num_classes = the null class. Classifier-free
        ## guidance (Ho & Salimans 2022) trains on null labels with probability --class-dropout.
        self.y_embedder = nn.Embedding(num_classes + 1, embed_dim) if num_classes else None
        ## One alpha per residual sub-layer over ALL blocks: block i uses alphas[2i], alphas[2i+1]
        ## (the authors' SiT decays the encoder half AND the decoder half, unlike their MAE).
        self.alphas = decay_schedule(depth, alpha_min)
        self.blocks = nn.ModuleList(
            DiTBlock(embed_dim, num_heads, mlp_ratio, self.alphas[2 * i], self.alphas[2 * i + 1],
                     long_skip=skips and i >= self.half) for i in range(depth))
        self.final_layer = FinalLayer(embed_dim, patch_size, in_chans)
        init_weights(self)

    def skip_sources(self):
        """0-indexed encoder-half block feeding each decoder-half block (--skips on): the first
        decoder block gets the last encoder block, the last decoder block the first (a stack)."""
        return list(range(self.half - 1, -1, -1))

    def condition(self, t, y=None):  # (B,), (B,) int or None -> (B, D)
        ## The conditioning vector c that every adaLN reads: embed(t) + embed(y), as DiT.
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:  # unconditional: the null class
                y = torch.full((len(t),), self.num_classes, dtype=torch.long, device=t.device)
            c = c + self.y_embedder(y)
        return c

    def encode(self, x, t, y=None):
        """x (B, C, H, W), t (B,) -> (outputs of the encoder-half blocks, each (B, L, D); c (B, D))."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, L, D)
        c = self.condition(t, y)
        outputs = []
        for block in self.blocks[:self.half]:
            tokens = block(tokens, c)
            outputs.append(tokens)  ## kept for the long skips (and the last one for the features)
        return outputs, c

    def forward(self, x, t, y=None):
        """x_t (B, C, H, W) at times t (B,), labels y (B,) or None -> velocity (B, C, H, W)."""
        outputs, c = self.encode(x, t, y)
        tokens = outputs[-1]
        ## The long skips form a stack (U-ViT): the first decoder-half block pops the LAST
        ## encoder-half output, the last decoder-half block the first one.
        stack = list(outputs)
        for block in self.blocks[self.half:]:
            tokens = block(tokens, c, stack.pop() if self.skips else None)  # (B, L, D)
        ## Each token becomes the p*p*C velocity values of its patch, put back in image layout.
        return unpatchify(self.final_layer(tokens, c), self.patch_size, self.in_chans)

    def features(self, x, t):
        """Tokens at the end of the encoder half (the U-ViT bottleneck), null class: (B, L, D)."""
        ## How the authors probed their diffusion model is not public; the bottleneck is our choice:
        ## the output of the last encoder-half block, where the decoder half (which turns the
        ## representation back into a velocity) begins.
        return self.encode(x, t)[0][-1]


def init_weights(model):
    """Every initialisation in one place (as the authors' SiT code):
    * Linear: xavier-uniform weight, zero bias (long-skip Linears included: they are NOT zeroed);
      the patch-embedding Conv2d likewise, seen as a Linear;
    * timestep MLP: normal(0, 0.02); class embedding: normal(0, 0.02);
    * ZERO (adaLN-Zero, each block's and the final layer's zero_init_): the modulation Linear of every
      block and of the final layer, and the final Linear, so every gate starts at 0, every block is
      the alpha-scaled identity (plus its long skip's Linear in the decoder half) and the network
      predicts velocity 0;
    * LayerNorms have no parameters; position embeddings are fixed."""
    ## At step 0 the encoder half is a pure chain of alpha-scaled identities:
    ## features = prod(alphas of the encoder half) * tokens.
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    w = model.patch_embed.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.patch_embed.bias)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    if model.y_embedder is not None:
        nn.init.normal_(model.y_embedder.weight, std=0.02)
    for block in list(model.blocks) + [model.final_layer]:
        block.zero_init_()


def build_model(cfg, alpha_min, skips, in_chans, num_classes):
    return DiT(cfg.img_size, cfg.patch_size, in_chans, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio,
               alpha_min, skips, num_classes if cfg.class_cond else 0, cfg.time_scale)


## The rest of part 1 is shared verbatim with mae_decay.py: our bisection tool behind --alpha-eff,
## the 2D sin-cos position table and the patch layout.

def alpha_min_for(alpha_eff, depth):
    """The alpha_min whose schedule has prod(alphas) == alpha_eff (bisection; the product grows with
    alpha_min). Our tool for comparing depths; the authors choose alpha_min itself (0.7 for their
    released MAE ViT-B/16, alpha_eff 1.8e-2; 0.8 for SiT-XL/2 at depth 28, alpha_eff 2.4e-3)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if math.prod(decay_schedule(depth, mid)) < alpha_eff else (low, mid)
    return (low + high) / 2


def sincos_pos_embed(dim, grid_size):
    """Fixed 2D sin-cos position embeddings (MAE): (1 + grid_size**2, dim), row 0 (cls) is zero.
    Half the channels encode the row, half the column, each as sin/cos at dim/4 frequencies."""
    ## Fixed, not learned (as MAE): the decoder must know WHERE each hidden patch is, and a table it
    ## cannot tune keeps that information from being mixed into the features the encoder learns.
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")

    def encode(pos):  # (L,) -> (L, dim/2)
        angles = pos.flatten().double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


def unpatchify(x, p, channels):
    """(B, L, p*p*C) -> (B, C, H, W), the inverse of patchify for square images."""
    B, L, _ = x.shape
    side = math.isqrt(L)
    x = x.reshape(B, side, side, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, side * p, side * p)


# =============================================================================================
# THE IDEA, part 2: the flow that trains the DiT (SiT's linear interpolant and velocity loss)
# and the ODE sampler that generates with it. Read this second.
# =============================================================================================

## A flow model (rectified flow, Liu et al. 2023; stochastic interpolants, Albergo & Vanden-Eijnden
## 2023; SiT, Ma et al. 2024) learns to move noise into data along straight lines. Each training
## image x_0 is paired with Gaussian noise and a random time t in [0, 1]; the network sees the
## mixture x_t and learns the direction (the velocity) from data to noise. Sampling runs that
## velocity field backwards, from pure noise at t = 1 to an image at t = 0.
##
## SiT's convention, and where ours differs: the authors' SiT (SiT/transport) uses the same straight
## path with time running the other way (its t = 1 is the data, t = 0 the noise) and the velocity
## data - noise. Ours is the rectified-flow / SD3 direction (t = 0 is the data). Nothing a network
## can tell changes: with t -> 1 - t and v -> -v the path, the loss and the sampler are the same,
## and the sinusoid of (1 - t) is a FIXED orthogonal map (a reflection) of each (cos, sin) pair of
## the sinusoid of t, which the first Linear of the time MLP absorbs (its i.i.d. normal init is
## invariant under orthogonal maps, so even the initial network has the same distribution).

def sample_time(n, gen, time_dist):
    """Training times t in (0, 1): uniform (SiT's default: Transport.sample draws t ~ U[0, 1] for a
    velocity model) or logit-normal (sigmoid of a standard normal; SD3, Esser et al. 2024, which puts
    more steps at middle noise levels and almost none near the clean image: P(t < 0.05) = 0.0016)."""
    if time_dist == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=gen))
    return torch.rand(n, generator=gen)


def time_cdf(t, time_dist):
    """P(training time <= t) for --time-dist, in closed form: t (uniform), or Phi(logit(t))
    (logit-normal). Tells how often training visits a probed noise level (and tests sample_time)."""
    t = min(max(float(t), 0.0), 1.0)
    if time_dist == "uniform" or t in (0.0, 1.0):
        return t
    return 0.5 * (1 + math.erf(math.log(t / (1 - t)) / math.sqrt(2)))


def interpolate(x0, noise, t):
    """The straight path between an image and its noise: x_t = (1 - t) x_0 + t * noise; t (B,) broadcast."""
    ## t = 0: the clean image; t = 1: pure noise; in between, a mixture whose noise share grows linearly.
    t = t.view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)  # (B, 1, 1, 1)
    return (1 - t) * x0 + t * noise


def flow_loss(model, x0, noise, t, y=None):
    """Mean squared error between the predicted and the true velocity of the path,
    d x_t / dt = noise - x_0 (SiT's velocity objective, with the sign of our time direction).
    model(x_t, t, y) -> velocity."""
    ## The target does not depend on t: along a straight line the velocity is constant. The network
    ## only sees x_t, so it learns the AVERAGE of noise - x_0 over all pairs that pass through x_t.
    target = noise - x0
    prediction = model(interpolate(x0, noise, t), t, y)
    return ((prediction.float() - target.float()) ** 2).mean()  ## averaged over pixels and batch, in fp32


@torch.no_grad()
def sample_ode(velocity, noise, steps, method="heun"):
    """Deterministic sampler: integrate dx/dt = velocity(x, t) from t = 1 (pure noise) to t = 0
    (data) on a uniform grid of `steps` steps. Euler: x <- x + h v(x, t). Heun (explicit trapezoid,
    2nd order; EDM, Karras et al. 2022): x <- x + h/2 (v(x, t) + v(x + h v(x, t), t + h)).
    velocity(x (B, ...), t (B,)) -> (B, ...); h = -1/steps < 0."""
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    x = noise
    for t, t_next in zip(times[:-1], times[1:]):
        h = t_next - t
        t_batch = torch.full((len(x),), t, device=x.device)
        v = velocity(x, t_batch)
        x_euler = x + h * v
        if method == "heun":
            v_next = velocity(x_euler, torch.full((len(x),), t_next, device=x.device))
            x = x + 0.5 * h * (v + v_next)
        else:
            x = x_euler
    return x


def guided_velocity(model, y=None, cfg_scale=1.0):
    """The velocity function the sampler integrates. With labels y and cfg_scale != 1:
    classifier-free guidance on ALL channels, v = v(x, t, null) + s (v(x, t, y) - v(x, t, null))
    (the authors' SiT applies it to the first 3 of 4 latent channels by default; we do not)."""
    def velocity(x, t):
        if y is None or cfg_scale == 1.0:  # s = 1 is exactly the conditional model: skip the null pass
            return model(x, t, y).float()
        null = torch.full_like(y, model.num_classes)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float()  # (2B, C, H, W)
        conditional, unconditional = both.chunk(2)
        return unconditional + cfg_scale * (conditional - unconditional)
    return velocity


@torch.no_grad()
def generate(model, n, cfg, device, seed, in_chans, num_classes=0, batch_size=500):
    """n uint8 images (n, C, S, S) from fixed noise (seeded), labels i % num_classes when the model
    is class-conditional. The model is put in eval mode. Under torchrun each process samples a
    contiguous run of batches and all get every image, in order."""
    rank, world_size = rank_and_world()
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    mine = block_starts(n, batch_size, rank, world_size)
    images = [torch.zeros(0, in_chans, cfg.img_size, cfg.img_size, dtype=torch.uint8, device=device)]
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        noise = torch.randn(count, in_chans, cfg.img_size, cfg.img_size, generator=gen)  # every process draws every batch's noise
        if start not in mine:
            continue
        y = (torch.arange(start, start + count) % num_classes).to(device) if num_classes else None
        with autocast(device):
            x = sample_ode(guided_velocity(model, y, cfg.cfg_scale), noise.to(device), cfg.sample_steps, cfg.sampler)
        images.append(to_uint8(x))
    model.train(was_training)
    return all_gather_rows(torch.cat(images), world_size)


# =============================================================================================
# Training: one run = one (skips, alpha_min, seed), deterministic and resumable.
# Read it to see the loop; the device and seeding details can be skipped.
# =============================================================================================

## Keys that change what a run computes: a checkpoint resumes only under identical values.
TRAJECTORY_KEYS = ("dataset", "train_limit", "img_size", "flip", "patch_size", "embed_dim", "depth", "num_heads",
                   "mlp_ratio", "class_cond", "class_dropout", "time_dist", "time_scale", "epochs", "batch_size", "base_lr", "min_lr",
                   "warmup_epochs", "weight_decay", "beta2", "ema_decay", "compile_mode")

## What an --out-dir's config.json must agree on for another run to write into it: the trajectory and
## the arms (the study's too). (Evaluation knobs, devices and logging may change between a run and its --resume.)
OUT_DIR_KEYS = TRAJECTORY_KEYS + ("skips", "alpha_min", "alpha_eff", "seeds", "study", "study_arms")
SCRIPT = "diffusion_decay.py"  # written into config.json: which script an out-dir belongs to


## The model sees pixels in [-1, 1] (DiT / SiT convention), not per-channel standardised ones:
## generated images then map back to uint8 the same way for every dataset.
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5


def training_batch(images, out_size, mirror=None):
    """uint8 (B, C, H, W) -> float (B, C, S, S) in [-1, 1], image i mirrored left-right where the
    bool mirror[i] is True (coins the caller tosses with probability 1/2 from its seeded CPU
    generator: exact resume, the same batch on every device). Diffusion models are trained without
    crops, so flips are all there is."""
    x = center_view(images, out_size, PIXEL_MEAN, PIXEL_STD)
    if mirror is not None:
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x


def to_uint8(x):
    """[-1, 1] floats -> uint8 images, the inverse of the model's input scaling."""
    return ((x.float() * PIXEL_STD + PIXEL_MEAN).clamp(0, 1) * 255).round().to(torch.uint8)


def autocast(device):
    """bf16 autocast on CUDA (no loss scaling needed); full fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def get_lr(step, total_steps, warmup_steps, peak_lr, min_lr):
    """Linear warm-up, then half-cycle cosine to min_lr, per optimizer step (MAE's schedule)."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, cfg, device):
    """AdamW, betas (0.9, beta2); no weight decay on biases, norms and tokens (timm's rule)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or name.endswith("token") else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.base_lr, betas=(0.9, cfg.beta2), fused=device.type == "cuda")


## Every random number of a step comes from a generator seeded by (seed, step), and the data order
## from one seeded by (seed, epoch). Nothing depends on history, so --resume continues exactly, and
## runs on CPU and GPU draw the same flips, times, noise and label drops.
def step_generator(seed, step):
    return torch.Generator().manual_seed(1_000_003 * seed + step)


def epoch_order(seed, epoch, n):
    return torch.randperm(n, generator=torch.Generator().manual_seed(7_919 * seed + epoch + 1))


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, every parameter in one multi-tensor lerp (one kernel
    launch per group of tensors on CUDA, not one per parameter)."""
    torch._foreach_lerp_(list(ema.parameters()), [param.detach() for param in model.parameters()], 1.0 - decay)


def ema_decay_at(step, decay):
    ## A short EMA warm-up (as TensorFlow's ExponentialMovingAverage with num_updates): the average
    ## does not drag the random initialisation along for thousands of steps on a short run.
    return min(decay, (1 + step) / (10 + step))


def train_run(cfg, data, reference, skips, alpha_min, seed, run_dir, device):
    """Train one flow model (one setting, one seed); returns its result dict (numbers, curves, samples).
    The loop below is the step only (lr, forward under autocast, backward, AdamW, EMA, log); resume,
    DDP, the compile fallback, checkpoints, curve points and Ctrl-C / SIGTERM are each one named helper."""
    rank, world_size = rank_and_world()
    cfg = resolve_compile_mode(cfg, device, world_size)  # auto -> reduce-overhead on one CUDA GPU; "eager" without --compile
    torch.manual_seed(seed)  # the same initial weights in every process
    in_chans, num_classes = data["train_x"].shape[1], len(data["classes"])
    model = build_model(cfg, alpha_min, skips, in_chans, num_classes).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)  ## the EMA weights are what gets evaluated and sampled
    optimizer = make_optimizer(model, cfg, device)
    n_train, batch = len(data["train_x"]), cfg.batch_size
    steps_per_epoch, total_steps, stop_step, warmup_steps = step_counts(cfg, n_train, world_size)
    peak_lr = cfg.base_lr * batch / 256
    ckpt_path, setting = os.path.join(run_dir, "ckpt.pt"), (skips, alpha_min)
    state = start_or_resume(ckpt_path, model, ema, optimizer, cfg, setting, seed, total_steps)  # fresh, or from the checkpoint
    forward = compile_or_eager(wrap_ddp(model, device), cfg)  # DDP under torchrun; torch.compile with an eager fallback
    # everything between steps: losses fetched in groups, curve points, checkpoints, Ctrl-C / SIGTERM
    books = Bookkeeper(cfg, state, total_steps, stop_step, ckpt_path, setting_name(skips, alpha_min), seed,
                       save=lambda: save_checkpoint(ckpt_path, model, ema, optimizer, state, cfg, setting, seed),
                       curve_point=lambda: evaluate_cheap(ema, cfg, data, reference, device, seed)[0])
    try:
        model.train()
        for step in range(state["step"], stop_step):
            epoch, i = divmod(step, steps_per_epoch)
            if i == 0 or step == state["step"]:
                order = epoch_order(seed, epoch, n_train).to(device)
            x0, noise, t, y = training_inputs(data, order[i * batch:(i + 1) * batch], step_generator(seed, step), cfg,
                                              num_classes, rank, world_size)  # (B/W, C, S, S) x2, (B/W,), (B/W,) or None
            lr = get_lr(step, total_steps, warmup_steps, peak_lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device):
                loss = flow_loss(forward, x0, noise, t, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_ema(ema, model, ema_decay_at(step, cfg.ema_decay))  # identical in every process: so are the parameters
            state["step"] = step + 1
            books.after_step(loss, epoch, i == steps_per_epoch - 1)  # log; at a flush: curve point, checkpoint, Ctrl-C / SIGTERM
    finally:  # also when the loop ends by an error: a later Ctrl-C must interrupt again
        books.close()
    if state["step"] < total_steps and rank == 0:  # stopped early by --max-steps: keep the state so --resume continues
        save_checkpoint(ckpt_path, model, ema, optimizer, state, cfg, setting, seed)
    return finish_run(ema, state, cfg, data, reference, skips, alpha_min, seed, run_dir, device, steps_per_epoch)


# ---------------------------------------------------------------------------------------------
# The training loop's helpers: one job each, in the order train_run calls them. Skip on a first read.
# ---------------------------------------------------------------------------------------------

def step_counts(cfg, n_train, world_size):
    """(steps per epoch, total steps of the schedule, the step to stop at (--max-steps), warm-up steps)."""
    if cfg.batch_size > n_train:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {n_train} training images; lower it.")
    check_world_size(cfg.batch_size, world_size)
    steps_per_epoch = n_train // cfg.batch_size  # the last incomplete batch of an epoch is dropped
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    return steps_per_epoch, total_steps, stop_step, round(cfg.warmup_epochs * steps_per_epoch)


def start_or_resume(ckpt_path, model, ema, optimizer, cfg, setting, seed, total_steps):
    """The run's progress: fresh, or (with --resume) loaded from its checkpoint into model, EMA and
    optimizer, by every process. A checkpoint without --resume is an error: nothing is overwritten."""
    if not os.path.exists(ckpt_path):
        return {"step": 0, "losses": [], "evals": [], "seconds": 0.0}
    if not cfg.resume:
        raise UserError(f"{ckpt_path} already exists: pass --resume to continue it, or choose another --out-dir.")
    state = load_checkpoint(ckpt_path, model, ema, optimizer, cfg, setting, seed)
    if rank_and_world()[0] == 0:
        print(f"resumed {ckpt_path} at step {state['step']}/{total_steps}")
    return state


## Under torchrun the model is wrapped in DDP (whose constructor also waits for every process, so
## none can write the checkpoint before all have looked for it); `model` stays the plain module that
## the EMA follows and checkpoints save, so they resume with any number of processes.
def wrap_ddp(model, device):
    if dist.is_available() and dist.is_initialized():
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def resolve_compile_mode(cfg, device, world_size):
    """cfg with compile_mode made explicit (checkpoints record it and --resume checks it): "eager"
    without --compile; --compile-mode auto is reduce-overhead (CUDA graphs: the whole forward and
    backward replayed as one graph, no per-kernel launch cost) on one CUDA GPU, and torch.compile's
    default under torchrun (DDP's gradient hooks) or off CUDA (no CUDA graphs there)."""
    mode = cfg.compile_mode
    if not cfg.compile:
        mode = "eager"
    elif mode == "auto":
        mode = "reduce-overhead" if device.type == "cuda" and world_size == 1 else "default"
    return dataclasses.replace(cfg, compile_mode=mode)


def compile_or_eager(model, cfg):
    """`model`, torch.compile'd in --compile-mode (resolved) with --compile. torch.compile fails lazily,
    at the first call: a call that raises prints one line and runs, then and from then on, the eager `model`."""
    if not cfg.compile:
        return model
    compiled = torch.compile(model, mode=cfg.compile_mode)

    def forward(*args):
        nonlocal compiled
        try:
            return compiled(*args)
        except Exception as e:
            if compiled is model:
                raise
            if rank_and_world()[0] == 0:
                print(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); continuing in eager mode")
            compiled = model
            return model(*args)
    return forward


def training_inputs(data, idx, gen, cfg, num_classes, rank, world_size):
    """One step's inputs from its global batch of indices `idx` (B,) and the step's generator:
    the flipped images x0 in [-1, 1], the noise, the times t and the labels (None unless --class-cond;
    the null class with probability --class-dropout). Returns this process's slice of each."""
    ## Same trajectory for any number of processes: every process draws the data order, the flips,
    ## the times t, the noise and the label drops for the WHOLE global batch from the same seeded
    ## generators, then keeps its contiguous slice [rank*B/W, (rank+1)*B/W). The W slices together
    ## are exactly the one-process batch, and the loss is a mean over equal-sized slices, so the
    ## mean of the W per-process losses (what DDP's gradient average differentiates) is the global loss.
    idx, batch = shard(idx, rank, world_size), len(idx)  # (B/W,)
    images, device = data["train_x"], data["train_x"].device
    shape = (batch, images.shape[1], cfg.img_size, cfg.img_size)  # the global batch's noise: (B, C, S, S)
    ## All of the step's random numbers, drawn on the CPU in a fixed order into ONE float32 buffer:
    ## flip coins (B), times (B), noise (B*C*S*S), label-drop coins (B). Pinned (page-locked) on CUDA,
    ## so that ONE non-blocking copy is queued behind the previous step's kernels and the CPU goes on
    ## without waiting for the GPU (a copy from ordinary memory would make it wait).
    sizes = [batch if cfg.flip else 0, batch, math.prod(shape), batch if cfg.class_cond else 0]
    draws = torch.empty(sum(sizes), pin_memory=device.type == "cuda")
    flip_coins, t, noise, drop_coins = draws.split(sizes)
    if cfg.flip:
        torch.rand(batch, generator=gen, out=flip_coins)
    t.copy_(sample_time(batch, gen, cfg.time_dist))
    torch.randn(len(noise), generator=gen, out=noise)
    if cfg.class_cond:
        torch.rand(batch, generator=gen, out=drop_coins)
    flip_coins, t, noise, drop_coins = draws.to(device, non_blocking=True).split(sizes)
    mirror = shard(flip_coins, rank, world_size) < 0.5 if cfg.flip else None  # each image mirrored with probability 1/2
    x0 = training_batch(images[idx], cfg.img_size, mirror)  # (B/W, C, S, S) in [-1, 1]
    t, noise = shard(t, rank, world_size), shard(noise.view(shape), rank, world_size)
    y = None
    if cfg.class_cond:  # the null class with probability class_dropout
        y = torch.where(shard(drop_coins, rank, world_size) < cfg.class_dropout, num_classes, data["train_y"][idx])
    return x0, noise, t, y


class Bookkeeper:
    """Everything a run does between steps besides the step. Per-step losses stay on the device and
    are fetched in groups (a fetch syncs the device): every --log-every steps, at each epoch end, at
    the last step and at Ctrl-C. At such a flush the losses are checked (NaN stops the run), shown on
    the progress bar and timed; at an epoch end the curves get a point every --eval-every epochs;
    a checkpoint is written every --ckpt-every epochs, at the last epoch, after --ckpt-minutes and at
    Ctrl-C or SIGTERM, whose first arrival stops the run after the step with that checkpoint."""

    def __init__(self, cfg, state, total_steps, stop_step, ckpt_path, name, seed, save, curve_point):
        self.cfg, self.state, self.total_steps, self.stop_step, self.ckpt_path = cfg, state, total_steps, stop_step, ckpt_path
        self.name, self.seed, self.save, self.curve_point = name, seed, save, curve_point
        self.rank, self.world_size = rank_and_world()
        if cfg.eval_every and state["step"] == 0 and not state["evals"]:
            self.add_curve_point(0)  # the curves start at the initial model
        self.pending = []  # per-step losses still on the device
        self.ctrl_c = catch_ctrl_c() if self.world_size == 1 else {"stop": False, "signal": "SIGINT"}  # under torchrun, torchrun handles Ctrl-C
        self.progress = tqdm(total=stop_step, initial=state["step"], desc=f"{name} seed={seed}", dynamic_ncols=True, mininterval=1.0,
                             disable=self.rank != 0)
        self.last_time = self.last_save = time.perf_counter()
        self.last_step = state["step"]

    def add_curve_point(self, epoch):
        self.state["evals"].append({"epoch": epoch, "step": self.state["step"], **self.curve_point()})
        e = self.state["evals"][-1]
        if self.rank == 0:
            tqdm.write(f"{self.name} seed={self.seed} epoch {epoch}: FD-smallcnn {e['fd']:.2f}, k-NN@{self.cfg.knn_k} {e['knn']:.4f} "
                       f"(5k/1k subset), effective rank {e['effective_rank']:.1f} (centred {e['effective_rank_centered']:.1f})")

    def after_step(self, loss, epoch, end_of_epoch):
        cfg, step = self.cfg, self.state["step"]
        self.pending.append(loss.detach().clone())  # a copy: CUDA graphs (reduce-overhead) reuse the output's memory
        if not (len(self.pending) >= cfg.log_every or end_of_epoch or step == self.stop_step or self.ctrl_c["stop"]):
            return
        ## Checkpoints are written only here, right after a flush (a collective under torchrun, so
        ## every process reaches it at the same steps): the saved losses always match the saved step.
        self.flush()
        save_now = time.perf_counter() - self.last_save > 60 * cfg.ckpt_minutes or self.ctrl_c["stop"]
        if end_of_epoch:
            done = epoch + 1
            if cfg.eval_every and done % cfg.eval_every == 0 and step < self.stop_step:  # the last point: finish_run
                self.add_curve_point(done)
                self.last_time = time.perf_counter()  # evaluation time is not training time
            save_now |= done % cfg.ckpt_every == 0 or done == cfg.epochs
        if save_now and self.rank == 0:
            self.save()
            self.last_time = self.last_save = time.perf_counter()
        if self.ctrl_c["stop"]:
            self.progress.close()
            raise Interrupted(f"interrupted ({self.ctrl_c['signal']}) at step {step}/{self.total_steps}; checkpoint "
                              f"{self.ckpt_path} saved: rerun the same command with --resume to continue", self.ctrl_c["signal"])

    def flush(self):
        ## The logged loss is the GLOBAL batch's: the mean of the per-process means (equal sizes).
        values = mean_over_ranks(torch.stack(self.pending), self.world_size).tolist()
        self.pending = []
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:  # every process sees the same values, so all stop together
            raise UserError(f"the loss became {values[bad]} at step {self.last_step + bad} ({self.name}); "
                            f"lower --base-lr or raise --alpha-min.")
        self.state["losses"] += values
        now = time.perf_counter()
        self.state["seconds"] += now - self.last_time
        self.progress.update(len(values))
        self.progress.set_postfix(loss=f"{values[-1]:.4f}", img_s=f"{len(values) * self.cfg.batch_size / (now - self.last_time):.0f}")
        self.last_time, self.last_step = now, self.last_step + len(values)

    def close(self):
        release_ctrl_c()
        self.progress.close()


# =============================================================================================
# Evaluation: generation quality (FD-smallcnn) and representation quality (k-NN, linear probe,
# effective rank) of the EMA model. Read it to know what the numbers mean.
# =============================================================================================

def feature_stats(features):
    """(N, D) -> mean (D,) and unbiased covariance (D, D), float64."""
    f = features.double()
    mean = f.mean(0)
    centred = f - mean
    return mean, centred.T @ centred / (len(f) - 1)


def frechet_distance(mean1, cov1, mean2, cov2):
    """Frechet distance between N(mean1, cov1) and N(mean2, cov2) (Dowson & Landau 1982; FID,
    Heusel et al. 2017): |m1 - m2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2). Both square
    roots are of symmetric PSD matrices, by eigendecomposition in float64 (no scipy)."""
    def sqrt_psd(m):
        values, vectors = torch.linalg.eigh((m + m.T) / 2)
        return (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    mean1, cov1, mean2, cov2 = (torch.as_tensor(v, dtype=torch.float64) for v in (mean1, cov1, mean2, cov2))
    root1 = sqrt_psd(cov1)
    cross = sqrt_psd(root1 @ cov2 @ root1)
    return float(((mean1 - mean2) ** 2).sum() + cov1.trace() + cov2.trace() - 2 * cross.trace())


class ReferenceCNN(nn.Module):
    """The small classifier whose penultimate features (global-average-pooled, 4*width) define
    FD-smallcnn. Trained once per dataset and image size on the real training images."""

    def __init__(self, in_chans, num_classes, width=32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.GELU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.BatchNorm2d(4 * width), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 4*width)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):  # (B, C, S, S) in [-1, 1] -> logits (B, classes)
        return self.head(self.body(x))


@torch.no_grad()
def reference_features(net, images, img_size, batch_size=500):
    """uint8 images (N, C, H, W) -> (N, 4*width) penultimate features of the reference CNN."""
    net.eval()
    return torch.cat([net.body(center_view(images[s:s + batch_size], img_size, PIXEL_MEAN, PIXEL_STD)).float()
                      for s in range(0, len(images), batch_size)])


def reference_network(cfg, data, device, batch_size=256, lr=2e-3):
    """The FD reference: load it from --out-dir, or train it (AdamW, cosine, flips, seed 0) and cache it.
    Returns dict(net, test_stats, accuracy, sanity) with the real-vs-real and noise-vs-real FDs."""
    in_chans, num_classes = data["train_x"].shape[1], len(data["classes"])
    key = {"dataset": cfg.dataset, "img_size": cfg.img_size, "train_limit": cfg.train_limit, "ref_epochs": cfg.ref_epochs,
           "in_chans": in_chans, "num_classes": num_classes}
    slug = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in cfg.dataset)
    path = os.path.join(cfg.out_dir, f"fd_reference_{slug}_{cfg.img_size}px.pt")
    torch.manual_seed(0)
    net = ReferenceCNN(in_chans, num_classes).to(device)
    cached = None
    if os.path.exists(path):
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"the cached reference {path} is unreadable ({type(e).__name__}); delete it to retrain it.") from None
    if cached is not None and cached["key"] == key:
        net.load_state_dict(cached["model"])
        accuracy, seconds = cached["accuracy"], cached["seconds"]
    else:
        started = time.perf_counter()
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
        n = len(data["train_x"])
        steps_per_epoch = max(1, n // batch_size)
        total = cfg.ref_epochs * steps_per_epoch
        net.train()
        ## Under torchrun every process trains the same reference (seeded, on its own device) at the
        ## same time; only the first one writes the cache.
        for step in tqdm(range(total), desc="reference CNN for FD", dynamic_ncols=True, mininterval=1.0,
                         disable=rank_and_world()[0] != 0):
            epoch, i = divmod(step, steps_per_epoch)
            if i == 0:
                order = epoch_order(10_007, epoch, n).to(device)
            idx = order[i * batch_size:(i + 1) * batch_size]
            x = training_batch(data["train_x"][idx], cfg.img_size, (torch.rand(len(idx), generator=step_generator(10_007, step)) < 0.5).to(device))
            for group in optimizer.param_groups:
                group["lr"] = get_lr(step, total, steps_per_epoch // 2, lr, 0.0)
            with autocast(device):
                loss = F.cross_entropy(net(x).float(), data["train_y"][idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        net.eval()
        with torch.no_grad():
            logits = torch.cat([net(center_view(data["test_x"][s:s + 500], cfg.img_size, PIXEL_MEAN, PIXEL_STD)).float()
                                for s in range(0, len(data["test_x"]), 500)])
        accuracy, seconds = (logits.argmax(1) == data["test_y"]).float().mean().item(), time.perf_counter() - started
        if rank_and_world()[0] == 0:
            atomic_save({"key": key, "model": net.state_dict(), "accuracy": accuracy, "seconds": seconds}, path)
    test_stats = feature_stats(reference_features(net, data["test_x"], cfg.img_size))
    n = cfg.fd_samples
    noise_images = torch.randint(0, 256, (n, in_chans, cfg.img_size, cfg.img_size), dtype=torch.uint8,
                                 generator=torch.Generator().manual_seed(0)).to(device)
    sanity = {"real_vs_real": frechet_distance(*feature_stats(reference_features(net, data["train_x"][:n], cfg.img_size)), *test_stats),
              "noise_vs_real": frechet_distance(*feature_stats(reference_features(net, noise_images, cfg.img_size)), *test_stats)}
    if rank_and_world()[0] == 0:
        print(f"FD reference: small CNN ({sum(p.numel() for p in net.parameters())} parameters, cached in {path}), "
              f"test accuracy {accuracy:.4f}, trained in {seconds:.0f} s; FD-smallcnn of {min(n, len(data['train_x']))} "
              f"real training images vs the test set {sanity['real_vs_real']:.2f} (floor), of {n} uniform-noise images "
              f"{sanity['noise_vs_real']:.2f}")
    return {"net": net, "test_stats": test_stats, "accuracy": accuracy, "sanity": sanity}


def generation_fd(model, cfg, data, reference, device, seed):
    """FD-smallcnn of --fd-samples generated images against the real test set, and the images."""
    in_chans, num_classes = data["train_x"].shape[1], len(data["classes"]) if cfg.class_cond else 0
    images = generate(model, cfg.fd_samples, cfg, device, seed=1_000 + seed, in_chans=in_chans, num_classes=num_classes)
    stats = feature_stats(reference_features(reference["net"], images, cfg.img_size))
    return frechet_distance(*stats, *reference["test_stats"]), images


@torch.no_grad()
def extract_features(model, images, cfg, noise_level, device, batch_size=512):
    """Frozen features (eval mode, no grad) of the whole, un-augmented image, optionally noised along
    the flow path to time t = noise_level with fixed noise: tokens at the end of the encoder half,
    mean-pooled over all tokens, null class. Returns (N, D) float32. Under torchrun each process
    extracts a contiguous run of batches and all get every feature, in order."""
    rank, world_size = rank_and_world()
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(0)  # the same noise for every model
    mine = block_starts(len(images), batch_size, rank, world_size)
    features = [torch.zeros(0, cfg.embed_dim, device=images.device)]  # (0, D): a process may get no batch
    for start in range(0, len(images), batch_size):
        count = min(batch_size, len(images) - start)
        noise = torch.randn(count, images.shape[1], cfg.img_size, cfg.img_size, generator=gen)  # every process draws every batch's noise
        if start not in mine:
            continue
        x = center_view(images[start:start + batch_size], cfg.img_size, PIXEL_MEAN, PIXEL_STD)
        noise = noise.to(x.device)
        t = torch.full((len(x),), float(noise_level), device=x.device)
        with autocast(device):
            tokens = model.features(interpolate(x, noise, t), t)  # (B, L, D)
        features.append(tokens.mean(1).float())
    model.train(was_training)
    return all_gather_rows(torch.cat(features), world_size)


def describe_feature(cfg, noise_level):
    return (f"encoder-half output (block {cfg.depth // 2}/{cfg.depth}) of the EMA model, mean over all tokens, "
            f"input x_t at t={noise_level:g}, null class")


def fixed_subset(total, n, device):
    """n of `total` indices, the same at every call (a seeded permutation, sorted): a subset that
    stays representative when a dataset is stored class by class (image folders, some CIFAR copies)."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n].sort().values.to(device)


def evaluate_cheap(model, cfg, data, reference, device, seed):
    """The curve point: FD-smallcnn (the full protocol), and a k-NN on a fixed 5000 train / 1000 test subset
    plus their effective rank, at the headline noise level. Returns (point, generated images)."""
    fd, images = generation_fd(model, cfg, data, reference, device, seed)
    level = noise_levels(cfg)[0]
    subset = {s: fixed_subset(len(data[f"{s}_x"]), n, device) for s, n in (("train", 5000), ("test", 1000))}
    feats = {s: extract_features(model, data[f"{s}_x"][idx], cfg, level, device) for s, idx in subset.items()}
    pred = knn_predict(feats["train"], data["train_y"][subset["train"]], feats["test"], min(cfg.knn_k, len(feats["train"])),
                       cfg.knn_t, num_classes=len(data["classes"]))
    return {"fd": fd, "knn": (pred == data["test_y"][subset["test"]]).float().mean().item(),
            "effective_rank": effective_rank(feats["train"]),
            "effective_rank_centered": effective_rank(feats["train"], center=True)}, images


def probe_settings(cfg):
    """The keyword arguments of linear_probe for --probe: ours (standardised) or the authors'."""
    return AUTHORS_PROBE if cfg.probe == "authors" else {"epochs": cfg.probe_epochs, "lr": cfg.probe_lr}


def describe_probe(cfg):
    if cfg.probe == "authors":
        return ("the authors' (raw features, AdamW lr 1e-2, weight decay 0.01, batch 256, incomplete batch dropped, "
                "200 epochs, cosine set once per epoch, final epoch)")
    return f"standardised features, AdamW lr {cfg.probe_lr:g}, batch 1024, {cfg.probe_epochs} epochs, cosine, final epoch"


def training_visits(level, time_dist, window=0.05):
    """The share of training times t within +-window of a probed noise level: how familiar the
    network is with inputs at that level (uniform times, the default: 2 * window at every interior
    level; logit-normal times put only 0.0016 of the steps below 0.05)."""
    return time_cdf(level + window, time_dist) - time_cdf(level - window, time_dist)


def finish_run(model, state, cfg, data, reference, skips, alpha_min, seed, run_dir, device, steps_per_epoch):
    """Final evaluation of the EMA model: FD-smallcnn (also the last curve point), the full k-NN /
    probe / effective ranks at every --feature-t, the features files and the sample grid.
    The headline numbers are those of the FIRST --feature-t (default 0.1), fixed before any run:
    the level is never chosen by looking at test labels. The other levels are reported beside it."""
    rank = rank_and_world()[0]
    started = time.perf_counter()
    num_classes = len(data["classes"])
    epochs_done = state["step"] / steps_per_epoch
    last, images = evaluate_cheap(model, cfg, data, reference, device, seed)  # the final point of the curves
    fd = last["fd"]
    state["evals"].append({"epoch": epochs_done, "step": state["step"], **last})
    fd_cfg = None  # --fd-cfg-scale: the same FD with guided samples (same noise and labels)
    if cfg.fd_cfg_scale:
        fd_cfg = generation_fd(model, dataclasses.replace(cfg, cfg_scale=cfg.fd_cfg_scale), data, reference, device, seed)[0]
    by_level = []
    for j, level in enumerate(noise_levels(cfg)):
        train_f = extract_features(model, data["train_x"], cfg, level, device)
        test_f = extract_features(model, data["test_x"], cfg, level, device)
        ks = [k for k in sorted({10, 20, 100, 200, cfg.knn_k}) if k <= len(train_f)]
        preds = knn_predict(train_f, data["train_y"], test_f, ks, cfg.knn_t, num_classes=num_classes)
        probe = linear_probe(train_f, data["train_y"], test_f, data["test_y"], seed=seed, num_classes=num_classes,
                             **probe_settings(cfg))
        ## Effective rank on at most 25,600 training features (RankMe's sample size), uncentred
        ## (RankMe's convention) and centred: mean-pooled tokens share a large common mean, and the
        ## uncentred value then mostly measures that mean.
        by_level.append({"t": level, "train_visits": training_visits(level, cfg.time_dist),
                         "knn": {k: (p == data["test_y"]).float().mean().item() for k, p in preds.items()},
                         "linear_probe": probe, "effective_rank": effective_rank(train_f[:25600]),
                         "effective_rank_centered": effective_rank(train_f[:25600], center=True)})
        file = "features.npz" if j == 0 else f"features_t{level:g}.npz"
        if rank == 0:  # every process evaluated the gathered features; one writes them
            save_features(os.path.join(run_dir, file), train_f, data["train_y"], test_f, data["test_y"],
                          {"config": json.dumps(dataclasses.asdict(cfg)), "feature": describe_feature(cfg, level),
                           "alpha_min": alpha_min, "skips": skips, "seed": seed, "noise_level": level,
                           "classes": np.asarray(data["classes"])})
    grid = image_grid(images[:64])
    if cfg.plots and rank == 0:
        save_png(grid, os.path.join(run_dir, "samples.png"))
    losses = state["losses"]
    whole_epochs = len(losses) // steps_per_epoch
    run_config = {**dataclasses.asdict(cfg), "skips": "on" if skips else "off", "alpha_min": alpha_min, "alpha_eff": "", "seeds": str(seed)}
    return {"skips": skips, "alpha_min": alpha_min, "alpha_eff": math.prod(model.alphas), "seed": seed, "steps": state["step"],
            "fd": fd, "fd_real_vs_real": reference["sanity"]["real_vs_real"], "fd_noise_vs_real": reference["sanity"]["noise_vs_real"],
            "knn": by_level[0]["knn"], "knn_k": cfg.knn_k, "linear_probe": by_level[0]["linear_probe"],
            "effective_rank": by_level[0]["effective_rank"], "effective_rank_centered": by_level[0]["effective_rank_centered"],
            "feature_t": by_level[0]["t"], "probe": describe_probe(cfg), "by_noise_level": by_level,
            "final_loss": losses[-1] if losses else float("nan"),
            "last_epoch_loss": float(np.mean(losses[-steps_per_epoch:])) if losses else float("nan"),
            "seconds": state["seconds"], "eval_seconds": time.perf_counter() - started,
            "epoch_losses": [float(np.mean(losses[e * steps_per_epoch:(e + 1) * steps_per_epoch])) for e in range(whole_epochs)],
            "losses": losses, "evals": state["evals"], "feature": describe_feature(cfg, by_level[0]["t"]),
            "config": run_config, "samples": grid, "fd_cfg": fd_cfg, "fd_cfg_scale": cfg.fd_cfg_scale}


# ---------------------------------------------------------------------------------------------
# The frozen-feature protocols: deliberate copies of probe.py's and mae_decay.py's (the tests
# check that the copies are identical). Skip on a first read if you know DINO's k-NN.
# ---------------------------------------------------------------------------------------------

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
AUTHORS_PROBE = {"standardize": False, "lr": 1e-2, "batch_size": 256, "epochs": 200, "weight_decay": 0.01,
                 "lr_per_epoch": True, "drop_last": True}


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


# =============================================================================================
# The experiment and its report: the comparison table, the plots, the throughput benchmark.
# Skim on a first read.
# =============================================================================================

def mean_std(values, decimals=4):
    """One table cell: the mean (+- the sample std when there are several seeds) at a fixed number
    of decimals, or '-' when the row has no such number (the raw-pixel row has no loss)."""
    values = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(values) == 0:
        return "-"
    return f"{values.mean():.{decimals}f}" + (f"+-{values.std(ddof=1):.{decimals}f}" if len(values) > 1 else "")


def results_table(results):
    """One row per (skips, alpha_min), mean +- std over seeds (sample std) when there are several.
    The representation columns are at the headline noise level (the first --feature-t)."""
    k = results[0]["knn_k"]
    header = f"{'skips':>5} {'alpha_min':>9} {'alpha_eff':>9} {'seeds':>5} {'FD-smallcnn':>13} {f'k-NN@{k}':>15} " \
             f"{'linear probe':>15} {'eff. rank':>15} {'centred rank':>15} {'loss (last ep)':>15} {'train s':>8}"
    rows = [header, "-" * len(header)]
    for skips, alpha in dict.fromkeys((r["skips"], r["alpha_min"]) for r in results):
        group = [r for r in results if (r["skips"], r["alpha_min"]) == (skips, alpha)]
        rows.append(f"{'on' if skips else 'off':>5} {alpha:>9.4g} {group[0]['alpha_eff']:>9.2e} {len(group):>5} "
                    f"{mean_std([r['fd'] for r in group]):>13} {mean_std([r['knn'][k] for r in group]):>15} "
                    f"{mean_std([r['linear_probe'] for r in group]):>15} {mean_std([r['effective_rank'] for r in group]):>15} "
                    f"{mean_std([r['effective_rank_centered'] for r in group]):>15} "
                    f"{mean_std([r['last_epoch_loss'] for r in group]):>15} {np.mean([r['seconds'] for r in group]):>8.0f}")
    return "\n".join(rows)


def noise_level_table(results):
    """The representation at every probed noise level t, one row per (skips, alpha_min, t), with
    the share of training times within +-0.05 of t (how often training saw inputs like these)."""
    k = results[0]["knn_k"]
    header = f"{'skips':>5} {'alpha_min':>9} {'t':>5} {'train visits':>12} {f'k-NN@{k}':>15} {'linear probe':>15} " \
             f"{'eff. rank':>15} {'centred rank':>15}"
    rows = [header, "-" * len(header)]
    for skips, alpha in dict.fromkeys((r["skips"], r["alpha_min"]) for r in results):
        group = [r for r in results if (r["skips"], r["alpha_min"]) == (skips, alpha)]
        for j, level in enumerate(group[0]["by_noise_level"]):
            at = [r["by_noise_level"][j] for r in group]
            rows.append(f"{'on' if skips else 'off':>5} {alpha:>9.4g} {level['t']:>5.3g} {level['train_visits']:>12.4f} "
                        f"{mean_std([a['knn'][k] for a in at]):>15} {mean_std([a['linear_probe'] for a in at]):>15} "
                        f"{mean_std([a['effective_rank'] for a in at]):>15} {mean_std([a['effective_rank_centered'] for a in at]):>15}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# The study (--study): one table of mean +- std over seeds per arm, paired differences against the
# baseline arm (same seed), and verdict lines. The four small functions first are pure.
# ---------------------------------------------------------------------------------------------

def mean_and_std(values):
    """(mean, sample standard deviation) of a list of numbers; the std is None for fewer than 2."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None


def paired_differences(values, baseline_values):
    """arm minus baseline, seed by seed: two dicts seed -> number in, the list over the seeds both
    have (in seed order) out. Pairing removes what a seed does to both arms alike."""
    return [values[seed] - baseline_values[seed] for seed in sorted(values) if seed in baseline_values]


def exceeds_seed_spread(differences, factor=2.0):
    """Our rule: a paired difference counts when |mean| > factor * the sample std of the paired
    differences. True / False, or None with fewer than 2 seeds (no spread to compare with).
    It is a screen, not a significance test: with n seeds it asks t = mean / (std / sqrt(n)) to
    exceed factor * sqrt(n), which pure noise does with probability 0.22 at n = 2 and 0.074 at n = 3
    (Student's t with n - 1 degrees of freedom)."""
    if len(differences) < 2:
        return None
    mean, std = mean_and_std(differences)
    return abs(mean) > factor * std


def verdict_line(arm, baseline, rows, factor=2.0):
    """One plain sentence per pair of arms: rows = [(metric label, paired differences)]; which
    differences exceed the seed spread (with their sign) and which do not."""
    beyond, within = [], []
    for label, differences in rows:
        mean, std = mean_and_std(differences)
        if exceeds_seed_spread(differences, factor):
            beyond.append(f"{label} {'higher' if mean > 0 else 'lower'} by {abs(mean):.4g} (paired std {std:.2g})")
        elif std is not None:
            within.append(f"{label} ({mean:+.2g} +- {std:.2g})")
    if len(rows) and all(len(differences) < 2 for _, differences in rows):
        return f"{arm} vs {baseline}: one seed, no spread to judge any difference by; run more --seeds."
    return (f"{arm} vs {baseline}: beyond the seed spread: {'; '.join(beyond) or 'nothing'}. "
            f"Within it (no claim): {', '.join(within) or 'nothing'}.")


def study_metrics(results):
    """The study table's columns: label -> the number of one run."""
    k = results[0]["knn_k"]
    metrics = {"FD (no guidance)": lambda r: r["fd"]}
    if results[0]["fd_cfg"] is not None:
        metrics[f"FD (CFG {results[0]['fd_cfg_scale']:g})"] = lambda r: r["fd_cfg"]
    metrics.update({f"k-NN@{k}": lambda r: r["knn"][k], "linear probe": lambda r: r["linear_probe"],
                    "eff. rank": lambda r: r["effective_rank"], "centred rank": lambda r: r["effective_rank_centered"],
                    "loss (last ep)": lambda r: r["last_epoch_loss"], "train s": lambda r: r["seconds"]})
    return metrics


def study_pairs(arms):
    """The comparisons the study reports: every arm against the baseline (the first arm), and each
    arm against the one before it when that is not the baseline (decay on top of long skips)."""
    pairs = [(arm, arms[0]) for arm in arms[1:]]
    return pairs + [(arm, before) for before, arm in zip(arms[1:], arms[2:])]


def study_report(results, arms, factor=2.0):
    """The study's table (mean +- std over seeds per arm), its paired differences and verdict lines
    (text), and the same numbers as a dict for the results JSON. arms: [(label, skips, alpha_min)]."""
    metrics = study_metrics(results)
    values = {label: {name: {r["seed"]: get(r) for r in results if (r["skips"], r["alpha_min"]) == (skips, alpha)}
                      for name, get in metrics.items()} for label, skips, alpha in arms}
    width = max(len(label) for label, _, _ in arms)
    header = f"{'arm':<{width}} {'skips':>5} {'alpha_min':>9} {'seeds':>5} " + " ".join(f"{m:>17}" for m in metrics)
    lines = [header, "-" * len(header)]
    for label, skips, alpha in arms:
        lines.append(f"{label:<{width}} {'on' if skips else 'off':>5} {alpha:>9.4g} {len(values[label]['train s']):>5} "
                     + " ".join(f"{mean_std(list(values[label][m].values())):>17}" for m in metrics))
    pairs = study_pairs([label for label, _, _ in arms])
    pair_width = max([len(f"{arm} - {reference}") for arm, reference in pairs] + [15])
    header = f"{'arm - reference':<{pair_width}} " + " ".join(f"{m:>17}" for m in metrics if m != "train s")
    lines += ["", "paired differences, arm minus reference on the same seed (mean +- std over seeds):", header, "-" * len(header)]
    summary = {"arms": {label: {m: dict(zip(("mean", "std"), mean_and_std(list(v.values()))), values=list(v.values()))
                                for m, v in values[label].items()} for label, _, _ in arms}, "pairs": [], "verdicts": []}
    for arm, reference in pairs:
        rows = [(m, paired_differences(values[arm][m], values[reference][m])) for m in metrics if m != "train s"]
        cells = []
        for m, differences in rows:
            mean, std = mean_and_std(differences)
            cells.append(f"{mean:+.4f}" + (f"+-{std:.4f}" if std is not None else ""))
            summary["pairs"].append({"arm": arm, "reference": reference, "metric": m, "differences": differences,
                                     "mean": mean, "std": std, "exceeds_seed_spread": exceeds_seed_spread(differences, factor)})
        lines.append(f"{arm + ' - ' + reference:<{pair_width}} " + " ".join(f"{c:>17}" for c in cells))
        summary["verdicts"].append(verdict_line(arm, reference, rows, factor))
    lines += ["", f"verdicts (a difference counts when |mean| > {factor:g} x the std of its paired differences; "
                  f"a screen, not a test: see exceeds_seed_spread):"] + [f"* {v}" for v in summary["verdicts"]]
    return "\n".join(lines), summary


def image_grid(images, rows=8):
    """(N, C, H, W) uint8 -> (rows*H + rows-1, cols*W + cols-1, C) numpy, one pixel of white between images."""
    n, c, h, w = images.shape
    cols = math.ceil(n / rows)
    grid = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, c), 255, dtype=np.uint8)
    for i, image in enumerate(images.cpu().numpy()):
        r, col = divmod(i, cols)
        grid[r * (h + 1):r * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = image.transpose(1, 2, 0)
    return grid


def save_plots(results, out_dir, names=None):
    """curves.png (loss, FD-smallcnn, k-NN and both effective ranks over training) and samples.png
    (the first seed's grid of every setting, side by side in one figure); names: setting -> title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = list(dict.fromkeys((r["skips"], r["alpha_min"]) for r in results))
    colour = {s: plt.cm.viridis(i / max(1, len(settings) - 1)) for i, s in enumerate(settings)}
    first_seed = [next(r for r in results if (r["skips"], r["alpha_min"]) == s) for s in settings]

    def save(fig, name):
        atomic_write(os.path.join(out_dir, name), lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
        plt.close(fig)

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for r in results:
        setting = (r["skips"], r["alpha_min"])
        label = f"{(names or {}).get(setting) or setting_name(*setting)} seed={r['seed']}"
        axes[0].plot(range(1, len(r["epoch_losses"]) + 1), r["epoch_losses"], color=colour[setting], label=label)
        epochs = [e["epoch"] for e in r["evals"]]
        axes[1].plot(epochs, [e["fd"] for e in r["evals"]], "o-", color=colour[setting], label=label)
        axes[2].plot(epochs, [e["knn"] for e in r["evals"]], "o-", color=colour[setting], label=label)
        axes[3].plot(epochs, [e["effective_rank"] for e in r["evals"]], "o-", color=colour[setting], label=label)
        axes[3].plot(epochs, [e["effective_rank_centered"] for e in r["evals"]], "s--", color=colour[setting])
    axes[1].axhline(results[0]["fd_real_vs_real"], color="grey", ls="--", label="real vs real")
    t = results[0]["feature_t"]
    for ax, title in zip(axes, ["flow loss (epoch mean)", "FD-smallcnn of EMA samples (lower is better)",
                                f"k-NN@{results[0]['knn_k']} at t={t:g} (5k train / 1k test)",
                                f"effective rank at t={t:g} (dashed: centred)"]):
        ax.set_title(title)
        ax.set_xlabel("epoch")
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=7)
    save(fig, "curves.png")

    fig, axes = plt.subplots(1, len(first_seed), figsize=(3.2 * len(first_seed), 3.4), squeeze=False)
    for ax, r in zip(axes[0], first_seed):
        grid = r["samples"]
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray" if grid.shape[-1] == 1 else None,
                  interpolation="nearest")
        setting = (r["skips"], r["alpha_min"])
        ax.set_title(f"{(names or {}).get(setting) or setting_name(*setting)}\nFD-smallcnn {r['fd']:.2f}", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    save(fig, "samples.png")


def dit_flops_per_image(cfg, skips=True, in_chans=3):
    """Training FLOPs per image (forward x3 for forward + backward), counted explicitly: 2 FLOPs per
    multiply-add in every Linear (per token, or once per image for the conditioning), plus 4*T^2*D
    per attention layer (QK^T and AV)."""
    T, D, r, p = (cfg.img_size // cfg.patch_size) ** 2, cfg.embed_dim, cfg.mlp_ratio, cfg.patch_size
    per_token = cfg.depth * (4 + 2 * r) * D * D + (cfg.depth // 2) * D * D * skips + D * p * p * in_chans  # blocks, skips, final
    per_token += p * p * in_chans * D  # patch embedding
    per_image = 256 * D + D * D + cfg.depth * 6 * D * D + 2 * D * D  # timestep MLP, block and final modulation
    return 3 * (2 * T * per_token + 2 * per_image + cfg.depth * 4 * T * T * D)


## Peak dense bf16 tensor throughput, FLOP/s, by device name; MFU is printed only for these.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def run_benchmark(cfg, device, setting=None, warmup_steps=5, timed_steps=20):
    """Times the full training step (the random draws and their one copy, flips, forward, backward,
    AdamW, EMA) on random uint8 data: warmup_steps first (compilation and CUDA-graph capture
    included), then the MEDIAN of timed_steps single steps, each timed by CUDA events on a GPU (no
    host sync inside the timed steps) or by the wall clock with a device sync elsewhere."""
    cfg = resolve_compile_mode(cfg, device, 1)
    skips, alpha_min = setting or comparison(cfg)[-1]
    torch.manual_seed(0)
    model = build_model(cfg, alpha_min, skips, 3, 10).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = make_optimizer(model, cfg, device)
    forward = compile_or_eager(model, cfg)
    data = {"train_x": torch.randint(0, 256, (cfg.batch_size, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8, device=device),
            "train_y": torch.randint(0, 10, (cfg.batch_size,), device=device)}
    idx = torch.arange(cfg.batch_size, device=device)

    def train_step(step):
        x0, noise, t, y = training_inputs(data, idx, step_generator(0, step), cfg, 10, 0, 1)
        with autocast(device):
            loss = flow_loss(forward, x0, noise, t, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, cfg.ema_decay)

    for step in range(warmup_steps):
        train_step(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step_ms = step_times_ms(train_step, range(warmup_steps, warmup_steps + timed_steps), device)
    ms = float(np.median(step_ms))
    img_s = cfg.batch_size / ms * 1000
    flops = dit_flops_per_image(cfg, skips)
    if device.type == "cuda":
        name, memory = torch.cuda.get_device_name(), f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (peak allocated)"
    else:
        import resource
        name = f"{device.type} ({os.cpu_count()} cores)"
        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (peak process RSS)"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    mfu = f"{flops * img_s / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16" if peak else "n/a (no peak FLOP/s known for this device)"
    print(f"device {name}, torch {torch.__version__}, compile={cfg.compile}{f' ({cfg.compile_mode})' if cfg.compile else ''}, "
          f"batch {cfg.batch_size}, {cfg.img_size}px/{cfg.patch_size}, DiT {cfg.embed_dim}x{cfg.depth}, {setting_name(skips, alpha_min)}")
    print(f"{ms:.1f} ms/step (median of {timed_steps} steps; min {min(step_ms):.1f}, max {max(step_ms):.1f})  {img_s:.0f} img/s  "
          f"{flops / 1e9:.3f} GFLOP/img  {flops * img_s / 1e12:.2f} TFLOP/s  MFU {mfu}  memory {memory}")
    return {"ms_per_step": ms, "img_per_s": img_s, "flops_per_image": flops, "step_ms": step_ms}


def study_benchmark(cfg, device):
    """--study --benchmark: the training step of every arm, timed as --benchmark does, and the study's
    training time projected from it (arms x seeds x epochs x steps per epoch x median ms per step).
    Evaluation comes on top (the module docstring's study section estimates it)."""
    n_train = len(load_dataset(cfg.dataset, cfg.data_dir, cfg.img_size, cfg.download)["train"][1])
    n_train = min(n_train, cfg.train_limit or n_train)
    steps = cfg.epochs * (n_train // cfg.batch_size) * len(parse_seeds(cfg.seeds))
    timings = {label: run_benchmark(cfg, device, (skips, alpha_min)) for label, skips, alpha_min in study_arms(cfg)}
    seconds = sum(steps * t["ms_per_step"] / 1000 for t in timings.values())
    print(f"study training, projected: {len(timings)} arms x {len(parse_seeds(cfg.seeds))} seeds x {cfg.epochs} epochs x "
          f"{n_train // cfg.batch_size} steps at the medians above = {seconds:.0f} s (evaluation and compilation not included)")
    return {"arms": timings, "projected_train_seconds": seconds}


def step_times_ms(run_step, steps, device):
    """Milliseconds of each call run_step(step): CUDA events around every step on a GPU, read after
    one sync at the end (the steps queue back to back, as in training); elsewhere the wall clock
    with a device sync after each step."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in steps]
        for step, (start, end) in zip(steps, events):
            start.record()
            run_step(step)
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
    sync = torch.mps.synchronize if device.type == "mps" else (lambda: None)
    times = []
    for step in steps:
        started = time.perf_counter()
        run_step(step)
        sync()
        times.append((time.perf_counter() - started) * 1000)
    return times


# =============================================================================================
# Plumbing: command line, data loaders, files, devices and torchrun. A first-time reader can
# skip all of it; read a part only when you change what it does.
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# Command line: parsing and the one validation pass (every bad flag ends here with one sentence)
# ---------------------------------------------------------------------------------------------

class UserError(Exception):
    """A problem the user can fix (bad flag, missing data): printed as one sentence, no traceback."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM ended the run with one line; during training it first stopped between two
    steps and saved a checkpoint. exit_code is the shell's convention, 128 + the signal's number (130
    for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message, signal_name="SIGINT"):
        super().__init__(message)
        self.exit_code = 128 + int(getattr(signal, signal_name))


def knob_help():
    """The comment after each Config field, so `--help` and the code share one description."""
    helps = {}
    for line in inspect.getsource(Config).splitlines():
        name, _, comment = line.partition("#")
        if ":" in name and "=" in name and comment:
            helps[name.split(":")[0].strip()] = comment.strip()
    return helps


CHOICES = {"time_dist": ("logit-normal", "uniform"), "sampler": ("euler", "heun"), "probe": ("standard", "authors"),
           "compile_mode": ("auto", "default", "reduce-overhead", "max-autotune"), "device": ("auto", "cuda", "mps", "cpu"),
           "dist_backend": ("auto", "nccl", "gloo")}  # the flags with a fixed set of values: argparse refuses the rest


def parse_config(argv=None):
    """Defaults < preset < the study settings (STUDY, with --study) < command line. Returns a checked
    Config (UserError on any bad value)."""
    parser = OneSentenceParser(description="Diffusion transformer (flow) with decayed identity shortcuts and long skips "
                                           "(arXiv 2404.10947). Every option shows its default (the quick preset's).",
                               epilog="The study on one GPU: python diffusion_decay.py --study --compile --data-dir DATA "
                                      "(an ESTIMATED 8.5 min on one H100 or H200, not yet run; the module docstring gives "
                                      "the sums; --study --benchmark times each arm's step first).")
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                        help="a set of defaults: " + "; ".join(f"{name}: {', '.join(f'{k}={v}' for k, v in values.items()) or 'the defaults'}"
                                                           for name, values in PRESETS.items()).replace("%", "%%"))
    helps, defaults, groups = knob_help(), dataclasses.asdict(Config()), {}
    section = "options"
    for line in config_source().splitlines():  # the "# --- data ---" lines of Config name the --help groups
        if line.strip().startswith("# ---"):
            section = line.strip(" #-")
        elif ":" in line.partition("#")[0] and "=" in line:
            groups[line.split(":")[0].strip()] = section
    sections = {name: parser.add_argument_group(name) for name in dict.fromkeys(groups.values())}
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        text = f"{helps.get(field.name, '')} (default: {defaults[field.name]!r})".replace("%", "%%")
        group = sections[groups[field.name]]
        ## default=None marks "not given", so that a preset's value survives unless the flag is typed.
        if field.type in (bool, "bool"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(getattr(field.type, "__name__", field.type), str)
            group.add_argument(flag, type=kind, choices=CHOICES.get(field.name), default=None, help=text)
    args = parser.parse_args(argv)
    typed = {k: v for k, v in vars(args).items() if v is not None and k != "preset"}
    values = {**dataclasses.asdict(Config()), **PRESETS[args.preset]}
    if typed.get("study", values["study"]):
        values.update(STUDY)
        chosen = [f"--{k.replace('_', '-')}" for k in ("skips", "alpha_min", "alpha_eff") if k in typed]
        if chosen:
            raise UserError(f"--study trains its fixed arms ({', '.join(STUDY_ARMS)}): drop {' and '.join(chosen)} "
                            f"or choose arms with --study-arms.")
    values.update(typed)
    cfg = Config(**values)
    check_config(cfg)
    return cfg


@functools.lru_cache(maxsize=1)
def config_source():
    return inspect.getsource(Config)  # parses this whole file (~0.1 s): once per process


class OneSentenceParser(argparse.ArgumentParser):
    """argparse, but a flag it cannot parse (unknown, missing value, not a number) is a UserError:
    one `error:` sentence and exit code 2 like every other bad input, not usage lines."""

    def error(self, message):
        raise UserError(f"{message} (see --help).")


def parse_floats(text, flag):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be a comma-separated list of numbers, got '{text}'.") from None
    if not values:
        raise UserError(f"{flag} is empty: give at least one number, e.g. {flag} 1.0,0.4.")
    return values


def check_config(cfg):
    """Every bad value a user can type ends here, before anything is computed or written, with one
    sentence naming the fix."""
    def need(ok, message):
        if not ok:
            raise UserError(message)
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        need(not isinstance(value, float) or math.isfinite(value), f"--{field.name.replace('_', '-')} must be a finite number, got {value}.")
    need(cfg.dataset in (*BUILT_IN, "cifar10", "cifar100", "fashion-mnist", "mnist") or cfg.dataset.startswith("folder:"),
         f"unknown --dataset '{cfg.dataset}': use glyphs, shapes, textures, cifar10, cifar100, fashion-mnist, mnist or folder:PATH.")
    need(not cfg.dataset.startswith("folder:") or os.path.isdir(cfg.dataset[len("folder:"):]),
         f"--dataset {cfg.dataset}: {cfg.dataset[len('folder:'):]} is not a directory.")
    need(cfg.img_size >= 1 and cfg.patch_size >= 1 and cfg.img_size % cfg.patch_size == 0,
         f"--img-size ({cfg.img_size}) must be a positive multiple of --patch-size ({cfg.patch_size}).")
    need(cfg.embed_dim >= 4 and cfg.embed_dim % 4 == 0,
         f"--embed-dim must be a positive multiple of 4 (2D sin-cos position embeddings), got {cfg.embed_dim}.")
    need(cfg.num_heads >= 1, f"--num-heads must be at least 1, got {cfg.num_heads}.")
    need(cfg.embed_dim % cfg.num_heads == 0, f"--embed-dim ({cfg.embed_dim}) must be divisible by --num-heads ({cfg.num_heads}).")
    need(int(cfg.embed_dim * cfg.mlp_ratio) >= 1, f"--mlp-ratio must be positive, got {cfg.mlp_ratio}.")
    need(cfg.depth >= 2 and cfg.depth % 2 == 0,
         f"--depth must be even and at least 2 (an encoder half and a decoder half), got {cfg.depth}.")
    skip_settings(cfg)
    need(cfg.time_scale > 0, f"--time-scale must be positive, got {cfg.time_scale}.")
    need(0.0 <= cfg.class_dropout < 1.0, f"--class-dropout must be in [0, 1), got {cfg.class_dropout}.")
    need(cfg.cfg_scale >= 0, f"--cfg-scale cannot be negative, got {cfg.cfg_scale}.")
    need(cfg.fd_cfg_scale >= 0, f"--fd-cfg-scale cannot be negative, got {cfg.fd_cfg_scale}.")
    need(cfg.fd_cfg_scale == 0 or (cfg.class_cond and cfg.class_dropout > 0),
         "--fd-cfg-scale needs a class-conditional model that also learned the null class: add --class-cond "
         "and a --class-dropout above 0.")
    study_arms(cfg)
    need(cfg.cfg_scale == 1.0 or cfg.class_cond, "--cfg-scale other than 1 needs a class-conditional model: add --class-cond.")
    need(cfg.cfg_scale == 1.0 or cfg.class_dropout > 0,
         "--cfg-scale other than 1 needs an unconditional model too: set --class-dropout above 0.")
    need(0.0 <= cfg.ema_decay < 1.0, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}.")
    need(0.0 <= cfg.beta2 < 1.0, f"--beta2 must be in [0, 1), got {cfg.beta2}.")
    need(cfg.sample_steps >= 1, f"--sample-steps must be at least 1, got {cfg.sample_steps}.")
    need(cfg.fd_samples >= 2 and cfg.ref_epochs >= 1, "--fd-samples must be at least 2 and --ref-epochs at least 1.")
    need(cfg.epochs >= 1 and cfg.batch_size >= 1, "--epochs and --batch-size must be at least 1.")
    need(cfg.max_steps >= 0 and cfg.train_limit >= 0, "--max-steps and --train-limit cannot be negative.")
    need(cfg.base_lr > 0 and cfg.probe_lr > 0, "--base-lr and --probe-lr must be positive.")
    need(cfg.min_lr >= 0 and cfg.weight_decay >= 0, "--min-lr and --weight-decay cannot be negative.")
    need(0 <= cfg.warmup_epochs <= cfg.epochs, f"--warmup-epochs must be in [0, --epochs={cfg.epochs}].")
    need(all(0.0 <= t < 1.0 for t in noise_levels(cfg)), f"every --feature-t must be in [0, 1), got '{cfg.feature_t}'.")
    need(cfg.knn_k >= 1 and cfg.knn_t > 0, "--knn-k must be at least 1 and --knn-t positive.")
    need(cfg.probe_epochs >= 1, f"--probe-epochs must be at least 1, got {cfg.probe_epochs}.")
    need(cfg.threads >= 0, f"--threads must be 0 (automatic) or a positive count, got {cfg.threads}.")
    need(cfg.dist_timeout > 0, f"--dist-timeout must be a positive number of minutes, got {cfg.dist_timeout}.")
    need(cfg.log_every >= 1 and cfg.ckpt_every >= 1 and cfg.eval_every >= 0 and cfg.ckpt_minutes > 0,
         "--log-every and --ckpt-every must be at least 1, --eval-every at least 0, --ckpt-minutes positive.")
    alphas = alpha_settings(cfg)
    need(all(0.0 < a <= 1.0 for a in alphas), f"every alpha_min must be in (0, 1], got {alphas}.")
    parse_seeds(cfg.seeds)
    if not cfg.benchmark:  # a run must never fail at its end for a reason known at its start
        check_writable(cfg.out_dir, "--out-dir", directory=True)
        if cfg.json:
            check_writable(cfg.json, "--json", directory=False)
        if cfg.dataset not in BUILT_IN and not cfg.dataset.startswith("folder:") and not os.path.isdir(cfg.data_dir):
            check_writable(cfg.data_dir, "--data-dir", directory=True)  # an existing folder may be read-only


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


def parse_seeds(text):
    try:
        return [int(v) for v in text.split(",") if v.strip()] or [0]
    except ValueError:
        raise UserError(f"--seeds must be a comma-separated list of integers, got '{text}'.") from None


def alpha_settings(cfg):
    """The list of alpha_min values this invocation compares (from --alpha-eff when given)."""
    if cfg.alpha_eff:
        targets = parse_floats(cfg.alpha_eff, "--alpha-eff")
        if not all(0.0 < t <= 1.0 for t in targets):
            raise UserError(f"every --alpha-eff must be in (0, 1], got {targets}.")
        return [alpha_min_for(t, cfg.depth) for t in targets]
    return parse_floats(cfg.alpha_min, "--alpha-min")


def skip_settings(cfg):
    """The --skips values this invocation compares, as booleans."""
    values = [v.strip() for v in cfg.skips.split(",") if v.strip()]
    if not values or any(v not in ("on", "off") for v in values):
        raise UserError(f"--skips must be a comma list of on and off (e.g. off,on), got '{cfg.skips}'.")
    return [v == "on" for v in dict.fromkeys(values)]


def noise_levels(cfg):
    return parse_floats(cfg.feature_t, "--feature-t")


def comparison(cfg):
    """Every (skips, alpha_min) pair this invocation trains, in table order (--study: its arms)."""
    if cfg.study:
        return [(skips, alpha_min) for _, skips, alpha_min in study_arms(cfg)]
    return [(skips, alpha_min) for skips in skip_settings(cfg) for alpha_min in alpha_settings(cfg)]


def study_arms(cfg):
    """The --study-arms as (label, skips, alpha_min), the baseline first."""
    names = [v.strip() for v in cfg.study_arms.split(",") if v.strip()]
    if not names or any(n not in STUDY_ARMS for n in names) or len(set(names)) != len(names):
        raise UserError(f"--study-arms must be a comma list of distinct names from {', '.join(STUDY_ARMS)}, "
                        f"got '{cfg.study_arms}'.")
    return [STUDY_ARMS[n] for n in names]


def setting_name(skips, alpha_min):
    return f"skips {'on' if skips else 'off'}, alpha_min {alpha_min:.4g}"


# ---------------------------------------------------------------------------------------------
# Data loaders: every dataset becomes uint8 tensors (N, C, H, W) + int64 labels on the device.
# Read only if you change the data.
# ---------------------------------------------------------------------------------------------

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


def to_device(parts, device, train_limit=0):
    """uint8 tensors on the device (4x smaller than float; CIFAR-10 train is 150 MB) and float stats."""
    train_x, train_y = parts["train"]
    if train_limit:
        train_x, train_y = train_x[:train_limit], train_y[:train_limit]
    # torch.tensor copies: the IDX reader's arrays are read-only views of the file's bytes
    data = {"train_x": torch.tensor(train_x).to(device), "train_y": torch.tensor(train_y).to(device),
            "test_x": torch.tensor(parts["test"][0]).to(device), "test_y": torch.tensor(parts["test"][1]).to(device),
            "classes": parts["classes"]}
    # per-channel mean / std of the training pixels, for input normalisation
    pixels = data["train_x"][:10000].float().div_(255).transpose(0, 1).flatten(1)
    data["mean"], data["std"] = pixels.mean(1).view(1, -1, 1, 1), pixels.std(1).clamp_min(1e-3).view(1, -1, 1, 1)
    return data


def center_view(images, out_size, mean, std):
    """The evaluation view: the whole image, resized if needed, no randomness."""
    x = images.float().div_(255)
    if x.shape[-1] != out_size or x.shape[-2] != out_size:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------
# Checkpoints and files: everything is written atomically (temporary file, then rename)
# ---------------------------------------------------------------------------------------------

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


def save_checkpoint(path, model, ema, optimizer, state, cfg, setting, seed):
    atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "state": state, "config": dataclasses.asdict(cfg), "skips": setting[0], "alpha_min": setting[1],
                 "seed": seed, "rng": torch.get_rng_state()}, path)


def read_checkpoint(path, cfg, setting, seed):
    """The checkpoint at path, if it is one of this run's: readable as tensors only, and trained with
    the same settings (TRAJECTORY_KEYS, skips, alpha_min, seed); otherwise one sentence."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = {"compile_mode": "default" if ckpt["config"].get("compile") else "eager", **ckpt["config"]}  # older checkpoints
        trained = (ckpt["skips"], ckpt["alpha_min"]), ckpt["seed"]
    except Exception as e:  # truncated, not a checkpoint, or a pickle that asks for code (refused by weights_only)
        raise UserError(f"{path} is not a readable checkpoint of this script ({type(e).__name__}); delete it or use "
                        f"another --out-dir.") from None
    changed = [k for k in TRAJECTORY_KEYS if saved.get(k) != getattr(cfg, k)]
    if changed or trained != (setting, seed):
        raise UserError(f"{path} was trained with other settings ({', '.join(changed) or 'skips/alpha_min/seed'}); "
                        f"resume with the same flags or use another --out-dir.")
    return ckpt


def load_checkpoint(path, model, ema, optimizer, cfg, setting, seed):
    ckpt = read_checkpoint(path, cfg, setting, seed)
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    return ckpt["state"]


def save_features(path, train_features, train_labels, test_features, test_labels, meta):
    """The features file probe.py reads (.npz): train_features (N, D) float32, train_labels (N,)
    int64, test_features (M, D) float32, test_labels (M,) int64, plus metadata: config (JSON text),
    feature (what the vectors are), alpha_min, seed, classes."""
    atomic_write(path, lambda f: np.savez(
        f, train_features=train_features.cpu().numpy(), train_labels=train_labels.cpu().numpy(),
        test_features=test_features.cpu().numpy(), test_labels=test_labels.cpu().numpy(),
        **{k: np.asarray(v) for k, v in meta.items()}))


def save_png(array, path):
    """(H, W, C) uint8 -> PNG (written atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    atomic_write(path, lambda f: plt.imsave(f, array.squeeze(-1) if array.shape[-1] == 1 else array, format="png",
                                            cmap="gray" if array.shape[-1] == 1 else None))


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


## An --out-dir belongs to one run of one script. Its config.json names the script that wrote it
## ("script") and that run's settings; a run into it with another script or other settings that
## change the results is refused before anything is written, and a lock file keeps two runs from
## writing into it at once (each would overwrite the other's files and both would "succeed").

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


def check_out_dir(out_dir, script, settings, keys):
    """Refuses an --out-dir whose config.json another script wrote, or a run of this script with
    other values of `keys` (the settings that change what it computes): continuing or overwriting
    it would mix two runs' files. A config.json without "script" (older versions) is judged by its keys."""
    path = os.path.join(out_dir, "config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
        old = old if isinstance(old, dict) else {}
    except (OSError, ValueError):
        old = {}
    owner = old.get("script", script if old and all(k in old for k in keys) else "another program")
    if owner != script:
        raise UserError(f"--out-dir {out_dir} holds a run of {owner} (see its config.json); choose another --out-dir.")
    changed = [k for k in keys if old.get(k) != settings.get(k)]
    if changed:
        shown = ", ".join(f"--{k.replace('_', '-')} {old.get(k)!r} there, {settings.get(k)!r} now" for k in changed[:3])
        raise UserError(f"--out-dir {out_dir} holds a run with other settings ({shown}); rerun with its flags or "
                        f"choose another --out-dir.")


# ---------------------------------------------------------------------------------------------
# Devices and multi-GPU: torchrun + DistributedDataParallel (the few lines of nanoGPT's train.py).
# Read only if you run on several GPUs.
# ---------------------------------------------------------------------------------------------

def catch_ctrl_c():
    """The first Ctrl-C (SIGINT) or SIGTERM (what `timeout`, `docker stop` and job schedulers send)
    only raises a flag, which the training loop checks after every step: the run then stops between
    two steps with a checkpoint. A second one acts at once (KeyboardInterrupt, or termination)."""
    flag = {"stop": False, "signal": "SIGINT"}

    def handler(signum, frame):
        flag["stop"], flag["signal"] = True, signal.Signals(signum).name
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
    return flag


def release_ctrl_c():
    """Outside training, Ctrl-C raises KeyboardInterrupt and SIGTERM raises Interrupted: either ends
    the run with one line (cli), the out-dir lock released, instead of a silent kill."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, sigterm_outside_training)


def sigterm_outside_training(signum, frame):
    raise Interrupted("terminated (SIGTERM), not during a training step: nothing new was saved; rerun the same "
                      "command with --resume to continue from the last checkpoint", "SIGTERM")


def set_cpu_threads(requested=0):
    """Sets torch's CPU thread count; returns (threads, why). An explicit count wins, then
    OMP_NUM_THREADS, then half the cores this process may use (at least one)."""
    ## A thread that waits for a descheduled sibling stalls every small op. On 2 shared cores, the
    ## demo's model (--benchmark --device cpu) trained at 19-49 img/s with torch's default of 2
    ## threads while other processes were busy, and at 275-590 img/s with 1 thread; idle, 2 threads
    ## gave ~1,030 and 1 thread ~560. Half the cores gives up at most 2x on an idle machine and
    ## avoids the 10-20x collapse on a busy one.
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if requested > 0:
        threads, why = requested, "--threads"
    elif env.isdigit() and int(env) > 0:
        threads, why = int(env), "OMP_NUM_THREADS"
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads, why = max(1, cores // 2), f"auto: half of {cores} usable cores; --threads N to change"
    torch.set_num_threads(threads)
    return threads, why


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


## `torchrun --nproc_per_node=N` starts N copies of this file and gives each RANK, LOCAL_RANK and
## WORLD_SIZE in its environment; plain `python` sets none of them, and then no process group is
## made and everything below reduces to the one-process code. Each process holds a full replica
## of the model; DDP averages the gradients over processes during backward, so every replica
## takes the same AdamW step and the replicas stay identical.

def setup_distributed(cfg):
    """The device of this process. Under torchrun: checks the batch, takes cuda:LOCAL_RANK (or the
    CPU) and starts the process group (NCCL on CUDA, gloo otherwise) with a timeout."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return pick_device(cfg.device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if cfg.benchmark:
        raise UserError("--benchmark times one process: run it with python, not torchrun.")
    check_world_size(cfg.batch_size, world_size)
    device = pick_device(cfg.device)
    if device.type == "mps":
        raise UserError("torchrun needs CUDA GPUs or the CPU (no process-group backend runs on MPS); add --device cpu.")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU of its own (this machine has {torch.cuda.device_count()}); "
                            f"start at most that many processes per node.")
        device = torch.device("cuda", local_rank)  # one GPU per process: cuda:LOCAL_RANK
        torch.cuda.set_device(device)
    backend = cfg.dist_backend if cfg.dist_backend != "auto" else "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError(f"--dist-backend nccl needs CUDA GPUs but this run is on {device.type}; "
                        f"use --dist-backend gloo (or auto).")
    ## The timeout turns a missing or dead peer into an error instead of a silent hang.
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=cfg.dist_timeout),
                                device_id=device if backend == "nccl" else None)
    except Exception as e:
        raise UserError(f"rank {rank} of {world_size} could not start the {backend} process group "
                        f"({type(e).__name__}: {str(e)[:200]}); check the rendezvous address and port, and that every "
                        f"node runs the same torchrun command.") from None
    return device


def check_world_size(batch_size, world_size):
    """--batch-size is the GLOBAL batch: each of the world_size processes takes batch_size / world_size."""
    if world_size > batch_size:
        raise UserError(f"{world_size} processes need at least one image each but --batch-size is {batch_size}; "
                        f"raise --batch-size or start fewer processes.")
    if batch_size % world_size:
        raise UserError(f"--batch-size {batch_size} (the global batch) is not divisible by the {world_size} processes; "
                        f"use a multiple of {world_size}.")


def rank_and_world():
    """(rank, world_size) of this process: (0, 1) unless torchrun started it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batch, rank, world_size):
    """Rows [rank * B/W, (rank + 1) * B/W) of a global batch (B, ...): this process's contiguous slice."""
    size = len(batch) // world_size
    return batch[rank * size:(rank + 1) * size]


def block_starts(n, block, rank, world_size):
    """The starts (0, block, 2*block, ...) of the blocks of n items that this process evaluates: a
    contiguous run of WHOLE blocks, so every block is computed exactly as in a one-process run."""
    starts = list(range(0, n, block))
    return starts[len(starts) * rank // world_size:len(starts) * (rank + 1) // world_size]


def all_gather_rows(rows, world_size):
    """Every process's (n_r, ...) tensor, concatenated in rank order (n_r may differ): all_gather
    needs equal shapes, so each pads to the largest n_r, and the padding is cut off again."""
    if world_size == 1:
        return rows
    counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world_size)]
    dist.all_gather(counts, torch.tensor([len(rows)], device=rows.device))
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[:len(rows)] = rows
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)])


def mean_over_ranks(values, world_size):
    """The average of a tensor over all processes (gloo has no AVG reduction: sum, then divide)."""
    if world_size == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world_size


def load_dataset_once_per_node(cfg):
    """load_dataset, but under torchrun the first process of each machine (LOCAL_RANK 0) loads
    first, so a download or an image-folder cache is made once, while the others wait at a barrier
    and then read what it wrote."""
    distributed = rank_and_world()[1] > 1
    waits = distributed and int(os.environ.get("LOCAL_RANK", "0")) != 0
    if waits:
        dist.barrier()
    parts = load_dataset(cfg.dataset, cfg.data_dir, cfg.img_size, cfg.download)
    if distributed and not waits:
        dist.barrier()
    return parts


# =============================================================================================
# Main: parse, validate, load, train every setting and seed, report
# =============================================================================================

def main(argv=None):
    cfg = parse_config(argv)
    device = setup_distributed(cfg)  # cuda:LOCAL_RANK under torchrun; pick_device(cfg.device) otherwise
    if device.type == "cpu":
        threads, why = set_cpu_threads(cfg.threads)
        if rank_and_world()[0] == 0:
            print(f"CPU threads: {threads} ({why})")
    if cfg.benchmark:
        return study_benchmark(cfg, device) if cfg.study else run_benchmark(cfg, device)
    ## Only the first process writes files, so only it holds the out-dir's lock.
    with out_dir_lock(cfg.out_dir) if rank_and_world()[0] == 0 else contextlib.nullcontext():
        return run_experiment(cfg, device)


def run_experiment(cfg, device):
    rank, world_size = rank_and_world()
    cfg = resolve_compile_mode(cfg, device, world_size)  # recorded in config.json, results and checkpoints
    check_out_dir(cfg.out_dir, SCRIPT, dataclasses.asdict(cfg), OUT_DIR_KEYS)
    settings, seeds = comparison(cfg), parse_seeds(cfg.seeds)
    parts = load_dataset_once_per_node(cfg)
    ## Every process holds the whole training set as uint8 on its GPU (CIFAR-10: 150 MB; fine for
    ## CIFAR-size data, and each process still works only on its own slice of each batch).
    data = to_device(parts, device, cfg.train_limit)
    ## The checks that need the data, still before anything is written.
    if cfg.knn_k > len(data["train_x"]):
        raise UserError(f"--knn-k {cfg.knn_k} asks for more neighbours than the {len(data['train_x'])} training images; lower it.")
    if cfg.batch_size > len(data["train_x"]):
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {len(data['train_x'])} training images; lower it.")
    run_dirs = {(skips, alpha_min, seed): os.path.join(cfg.out_dir, f"skips{'on' if skips else 'off'}_alpha{alpha_min:.4g}_seed{seed}")
                for skips, alpha_min in settings for seed in seeds}
    found = {key: d for key, d in run_dirs.items() if os.path.exists(os.path.join(d, "ckpt.pt"))}
    if found and not cfg.resume:  # refused before anything is written
        raise UserError(f"{next(iter(found.values()))}/ckpt.pt already exists: pass --resume to continue it, or choose "
                        f"another --out-dir.")
    for (skips, alpha_min, seed), run_dir in found.items():  # a checkpoint that cannot be resumed stops us now, not later
        read_checkpoint(os.path.join(run_dir, "ckpt.pt"), cfg, (skips, alpha_min), seed)
    if rank == 0:  # only the first process prints and writes files
        print(f"{cfg.dataset}: {len(data['train_x'])} train / {len(data['test_x'])} test images of shape "
              f"{tuple(data['train_x'].shape[1:])} (model sees {cfg.img_size}px), {len(data['classes'])} classes; device {device}"
              f"{f' x {world_size} processes' if world_size > 1 else ''}; "
              f"settings: {'; '.join(setting_name(*s) for s in settings)}; seeds {seeds}")
        if cfg.resume and len(found) < len(run_dirs):
            print(f"--resume: no checkpoint yet for {len(run_dirs) - len(found)} of the {len(run_dirs)} runs; "
                  f"{'those start' if found else 'everything starts'} from scratch")
    reference = reference_network(cfg, data, device)  # its cached file is read (and checked) before config.json is written
    if rank == 0:
        write_json(os.path.join(cfg.out_dir, "config.json"), {"script": SCRIPT, **dataclasses.asdict(cfg)})
    results = []
    runs_summary = lambda: {"config": dataclasses.asdict(cfg), "device": str(device), "torch": torch.__version__,
                       "processes": world_size, "fd_reference": {"test_accuracy": reference["accuracy"], **reference["sanity"]},
                       "runs": [{k: v for k, v in r.items() if k != "samples"} for r in results]}
    for (skips, alpha_min, seed), run_dir in run_dirs.items():
        results.append(train_run(cfg, data, reference, skips, alpha_min, seed, run_dir, device))
        if cfg.study and rank == 0:  # the finished runs, in case the study is stopped before its end
            write_json(os.path.join(cfg.out_dir, "results.json"), {**runs_summary(), "complete": False})
    if rank == 0:
        sanity = reference["sanity"]
        print(f"\n{cfg.dataset}, {cfg.img_size}px; generation: FD-smallcnn of {cfg.fd_samples} EMA samples ({cfg.sampler}, "
              f"{cfg.sample_steps} steps{f', CFG {cfg.cfg_scale:g}' if cfg.class_cond else ''}) vs the test set "
              f"(real vs real {sanity['real_vs_real']:.2f}, noise vs real {sanity['noise_vs_real']:.2f}); "
              f"features: {results[0]['feature']} (the headline level: the first --feature-t, fixed in advance); "
              f"k-NN: DINO protocol, T={cfg.knn_t}; linear probe: {describe_probe(cfg)}")
        if cfg.study:
            table, study = study_report(results, study_arms(cfg))
            print(f"study: {len(results)} runs ({len(study_arms(cfg))} arms x seeds {seeds}), {cfg.epochs} epochs each, "
                  f"DiT {cfg.embed_dim}x{cfg.depth}/{cfg.patch_size}; FD floor: real vs real {sanity['real_vs_real']:.2f} "
                  f"({min(cfg.fd_samples, len(data['train_x']))} training images vs the {len(data['test_x'])} test images, the "
                  f"same count as the samples), ceiling: noise vs real {sanity['noise_vs_real']:.2f}\n{table}")
        else:
            print(results_table(results))
        print(f"\nthe features at every probed noise level t (train visits: share of training times within +-0.05 of t, "
              f"--time-dist {cfg.time_dist})\n{noise_level_table(results)}")
        summary = {**runs_summary(), **({"study": study, "complete": True} if cfg.study else {})}
        write_json(os.path.join(cfg.out_dir, "results.json"), summary)
        if cfg.json:
            write_json(cfg.json, summary)
        if cfg.plots:
            save_plots(results, cfg.out_dir, {(skips, alpha): label for label, skips, alpha in study_arms(cfg)} if cfg.study else None)
            print(f"plots: {cfg.out_dir}/curves.png, samples.png (one samples.png per run folder too)")
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return results


def cli(argv=None):
    """main() with the ways a run ends early: a UserError is one `error:` line and exit code 2;
    Ctrl-C or SIGTERM is one line and exit code 130 or 143 (after a checkpoint when it came during training)."""
    release_ctrl_c()  # SIGTERM from here on ends the run with one line, like Ctrl-C
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        print(str(e) if isinstance(e, Interrupted) else "interrupted (not during a training step: nothing new was saved); "
              "rerun the same command with --resume to continue from the last checkpoint", file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else 130
    finally:
        release_ctrl_c()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
