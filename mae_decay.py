"""
mae_decay.py: a masked autoencoder (MAE) whose encoder uses DECAYED identity shortcuts, from
data to frozen-feature evaluation, in one file.

Paper: Zhang, Jiang, Gao, Willett, Maire, "Residual Connections Harm Generative Representation
Learning" (arXiv 2404.10947). A standard pre-norm transformer adds every sub-layer to an identity
path, x_{k+1} = x_k + f_k(norm(x_k)). The paper scales that path down, layer by layer:

    x_{k+1} = alpha_k * x_k + f_k(norm(x_k)),   alpha_k falling linearly from 1 to alpha_min,

which makes an MAE's frozen features far better for k-NN and linear probes (ViT-B/16 on ImageNet:
k-NN 27.4 -> 63.9, linear probe 67.8 -> 72.7). It is implemented as the authors' code does it:
one alpha per residual SUB-layer, zero-initialised branch outputs, no final encoder norm, and
their "UNet" decoder that reads every second encoder block (their Figure 5).

Run (each command prints what it does; `--help` lists every knob and its default):

    python mae_decay.py                                   # CPU demo: alpha_min 1.0 vs 0.7 on built-in glyphs, ~2 min on 2 cores
    python mae_decay.py --dataset shapes                  # ... on built-in shapes (class = the shape of one object)
    python mae_decay.py --preset cifar --compile          # ViT-S/4 on CIFAR-10, one GPU (CUDA graphs by default)
    python mae_decay.py --preset cifar --vanilla          # ... with the paper's baseline arm (vanilla MAE) added
    python mae_decay.py --preset cifar --data-dir DATA --study --study-workers 6 --compile   # the paper's comparison
        # with seeds: vanilla MAE / skip decoder / skip decoder + decay, one table; sized to ~8 min on one GPU
    python mae_decay.py --preset base --dataset folder:/data/imagenet100 --compile   # ViT-B/16, 224px
    python mae_decay.py --preset cifar --benchmark --compile                # img/s, ms/step, memory, MFU
    python mae_decay.py --alpha-eff 1,1e-2 --seeds 0,1,2   # choose alpha_min by the product of all alphas
    python mae_decay.py --resume                          # continue an interrupted run (Ctrl-C / SIGTERM save a checkpoint)

Several GPUs (PyTorch DDP: one process per GPU; --batch-size stays the GLOBAL batch, split evenly,
and the run follows the one-process trajectory; only rank 0 prints and writes files):

    torchrun --standalone --nproc_per_node=8 mae_decay.py --preset base --dataset folder:/data/imagenet100
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 mae_decay.py ...
    torchrun --nnodes=2 --node_rank=1 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 mae_decay.py ...
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 mae_decay.py --device cpu   # CPU, gloo

Outputs go to --out-dir (default runs/mae): config.json, one folder per (setting, seed) with
ckpt.pt and features.npz (the format probe.py reads, see save_features), results.json, and the
plots curves.png, recon.png, pca.png, feature_norms.png.

Known-good numbers produced by this file (README.md has every table with its command and timing):

    python mae_decay.py --preset cifar --data-dir DATA --alpha-min A --epochs 100 --compile   # A = 1.0, 0.7
    one NVIDIA H100, torch 2.11, 482 s / 440 s of training; CIFAR-10 50k/10k at 32px, seed 0
    (measured at commit a2f5004, when --compile meant torch.compile's default mode; --compile now
    picks CUDA graphs on one GPU, so add --compile-mode default to rerun it as measured):
    alpha_min  alpha_eff  k-NN@20  linear probe  eff. rank  eff. rank (centred)
    1.0        1          0.642    0.684         130.3      156.5
    0.7        1.8e-2     0.608    0.666          80.5      113.5       (raw pixels: 0.363 / 0.407)

  Decay at the authors' alpha_min is behind the standard residual MAE at every 10-epoch checkpoint
  of 100 (one seed), the gap narrowing from 0.078 to 0.034 k-NN; the paper's gain (ViT-B/16,
  ImageNet, 800 epochs) is not reproduced at this scale. Decay lowers the effective rank, as in the
  paper's Figure 4.

    python mae_decay.py   # 2-core CPU, torch 2.13, 1 thread (the automatic choice), a busy process beside it
    glyphs, 10,000 / 2,000 images at 16px, 4 epochs, seed 0: 127 s wall; chance 0.115
    alpha_min 1.0: k-NN 0.664, probe 0.174;  0.7: 0.609, 0.152;  untrained encoder 0.865, 0.193;  raw pixels 0.275, 0.135

    (--threads 2 rounds differently, 87 s: 1.0 gives 0.749, 0.7 gives 0.266; one seed cannot rank the arms)

  Both arms are far above raw pixels on k-NN, but so is the same encoder before training, and more:
  averaging tokens already forgets where each glyph sits. Four epochs of reconstruction LOWER the
  k-NN (decay more so), and no feature here is linearly separable (the polarity flip). At this
  scale the demo shows the machinery and an honest report, not the paper's effect; on
  --dataset shapes and textures the trained arms are near chance, below raw pixels.

Two comment layers: `##` lines teach (why a line exists, which equation it implements) and can be
stripped with `sed '/^\\s*## /d'`; `#` lines are ordinary comments.
"""
import argparse
import contextlib
import dataclasses
import datetime
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
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data): printed as one sentence, no traceback."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM ended the run with one line; during training it first stopped between two
    steps and saved a checkpoint. exit_code is the shell's convention, 128 + the signal's number (130
    for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message, signal_name="SIGINT"):
        super().__init__(message)
        self.exit_code = 128 + int(getattr(signal, signal_name))


# =============================================================================================
# Config: every knob of a run, with its default, and the presets
# read first: the table of what can be changed
# =============================================================================================

@dataclasses.dataclass
class Config:
    # --- data ---
    dataset: str = "glyphs"       # glyphs | shapes | textures (all built-in) | cifar10 | cifar100 | fashion-mnist | mnist | folder:PATH
    data_dir: str = "data"        # where datasets are looked for and downloaded to (and image folders cached)
    download: bool = True         # download missing official files (checksum verified before use)
    train_limit: int = 0          # use only the first N training images (0 = all)
    img_size: int = 16            # side of the square image the model sees (the built-in datasets are generated at this size)
    crop_min: float = 0.2         # random-resized-crop smallest area fraction (MAE: 0.2)
    # --- model ---
    patch_size: int = 4           # patch side in pixels
    embed_dim: int = 96           # encoder width
    depth: int = 6                # encoder blocks (2*depth residual sub-layers, one alpha each)
    num_heads: int = 3            # encoder attention heads
    mlp_ratio: float = 4.0        # MLP hidden width / width
    decoder: str = "unet"         # unet (the authors' skip decoder) | mae (the standard MAE decoder)
    decoder_dim: int = 64         # decoder width
    decoder_depth: int = 3        # decoder blocks (unet needs at least depth/2)
    decoder_heads: int = 2        # decoder attention heads
    final_norm: bool = False      # LayerNorm after the last encoder block (standard MAE; the authors drop it)
    mask_ratio: float = 0.75      # fraction of patches hidden from the encoder
    norm_pix: bool = True         # predict per-patch normalised pixels (MAE's norm-pix loss)
    alpha_min: str = "1.0,0.7"    # comma list: one run per value at otherwise identical settings (0.7: the authors' MAE)
    alpha_eff: str = ""           # instead of alpha_min: comma list of targets for prod(alphas) (our tool, not the authors')
    vanilla: bool = False         # add the paper's baseline arm: standard MAE decoder, final LayerNorm, alpha_min 1
    # --- optimisation ---
    epochs: int = 4               # passes over the training set (4: the CPU demo's ~3 minutes on 2 shared cores)
    max_steps: int = 0            # stop after this many optimizer steps (0 = all); the schedule still spans --epochs
    batch_size: int = 128         # images per optimizer step
    base_lr: float = 2e-3         # lr = base_lr * batch_size / 256 (MAE's rule; MAE itself uses 1.5e-4 for 800 epochs)
    min_lr: float = 0.0           # floor of the cosine schedule
    warmup_epochs: float = 1.0    # linear warm-up length, then half-cycle cosine, per step
    weight_decay: float = 0.05    # AdamW decay, not applied to biases, norms and tokens
    beta2: float = 0.95           # AdamW beta2 (MAE: 0.95)
    seeds: str = "0"              # comma list of seeds; several give mean +- std in the table
    # --- evaluation ---
    eval_every: int = 2           # k-NN, linear probe and effective ranks every N epochs (0 = only at the end)
    eval_train: int = 5000        # training images that periodic evaluation uses (a fixed random subset; 0 = all)
    eval_test: int = 1000         # test images that periodic evaluation uses (0 = all)
    knn_k: int = 20               # neighbours for the headline k-NN number (DINO protocol)
    knn_t: float = 0.07           # k-NN temperature
    feature: str = "mean"         # mean (all tokens of the block, the authors') | cls
    feature_block: int = 0        # encoder block (1-indexed) whose output is the feature; 0 = last
    probe: str = "standard"       # standard (standardised features, the two knobs below) | authors (raw features, AdamW lr 1e-2 weight decay 0.01, batch 256, 200 epochs, cosine per epoch)
    probe_epochs: int = 20        # linear-probe epochs (final epoch is reported, never the best); one default in every script
    probe_lr: float = 3e-3        # linear-probe AdamW peak lr (cosine schedule, weight decay 0); one default in every script
    untrained: bool = True        # add a control row: the same evaluation of each seed's encoder before training (what training adds to)
    pixels: bool = True           # add a reference row: the same k-NN / probe / ranks on raw pixels (skipped above 8 GiB)
    # --- system ---
    device: str = "auto"          # auto | cuda | mps | cpu
    threads: int = 0              # CPU threads for torch (CPU only): 0 = OMP_NUM_THREADS if set, else half the usable cores, at least 1
    compile: bool = False         # torch.compile the model (falls back to eager if it fails)
    compile_mode: str = "auto"    # with --compile: auto (reduce-overhead on one CUDA GPU, else default) | default | reduce-overhead (CUDA graphs) | max-autotune
    out_dir: str = "runs/mae"     # where checkpoints, features, plots and results go
    resume: bool = False          # continue each run from its checkpoint in out_dir
    ckpt_every: int = 5           # write a checkpoint every N epochs (and at the end)
    ckpt_minutes: float = 10.0    # ... and at the first progress update after this many minutes (wall clock, evaluation included) since the last one
    log_every: int = 20           # steps between progress-bar updates (each one syncs the device)
    json: str = ""                # also write every run's final numbers to this file (not with --study: see its study.json)
    plots: bool = True            # write the PNG plots
    benchmark: bool = False       # only time the training step and print img/s, ms/step, memory, MFU
    dist_backend: str = "auto"    # under torchrun: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    dist_timeout: float = 30.0    # under torchrun: minutes a process waits for the others before failing
    # --- the study (run_study): arms x seeds as parallel worker processes on one device, one table ---
    study: bool = False           # run the study: every arm of --study-arms x seeds (--seeds if 2 or more, else 0,1,2), each its own full run
    study_arms: str = "vanilla,1.0,0.7,0.6"  # with --study, in priority order: vanilla (standard decoder, final LayerNorm, alpha_min 1) or a skip-decoder alpha_min; arms after the 3rd only if the budget allows
    study_workers: int = 4        # with --study: runs trained at once, each a process of this file sharing the device
    study_minutes: float = 8.0    # with --study: wall-clock budget; a benchmark sizes the epochs (30-50 on a GPU) to fit it; 0 = use --epochs (typing --epochs sets 0)
    study_eval: bool = False      # also evaluate every encoder block (mean and cls, raw and centred k-NN, probe) and the authors' probe (on in the study's workers)


PRESETS = {
    ## The CPU demo (= the defaults above): a ViT of width 96 and depth 6 on 16x16 built-in glyphs
    ## (16 patches, 4 visible), 4 epochs, the standard residual MAE (alpha_min 1) vs decay.
    "quick": dict(),
    ## ViT-S/4 on 32x32 images (CIFAR-10/100): 64 patches, 16 visible.
    "cifar": dict(dataset="cifar10", img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=6,
                  decoder_dim=256, decoder_depth=6, decoder_heads=8, epochs=200, warmup_epochs=10,
                  batch_size=512, base_lr=5e-4, alpha_min="1.0,0.7", eval_every=10, eval_train=0, eval_test=0,
                  ckpt_every=10, log_every=50),
    ## ViT-B/16 at 224 with the authors' decoder (512 wide, 8 blocks) and schedule (800 epochs, 40 warm-up).
    "base": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_dim=512,
                 decoder_depth=8, decoder_heads=16, epochs=800, warmup_epochs=40, batch_size=256, base_lr=1.5e-4,
                 alpha_min="1.0,0.7", eval_every=50, ckpt_every=5, log_every=50, pixels=False),  # 224px pixels: ~75 GB
}


# =============================================================================================
# THE IDEA: a ViT masked autoencoder whose encoder has decayed identity shortcuts
# read first: the decay schedule, the block that applies it, the MAE and the authors' UNet decoder
# =============================================================================================

def decay_schedule(depth, alpha_min):
    """The 2*depth shortcut weights, one per residual sub-layer: first exactly 1.0, last exactly
    alpha_min, linear in between."""
    ## The authors' code: alphas = 1 - linspace(0, 1, 2*depth) * (1 - alpha_min), reshaped (depth, 2):
    ## block i scales its attention shortcut by alphas[2i] and its MLP shortcut by alphas[2i+1].
    ## The paper writes alpha_l = 1 - delta*l with delta = (1 - alpha_min)/L, which is off by one
    ## against that code; we follow the code. Written as a lerp so both ends are exact floats.
    n = 2 * depth
    return [(1 - i / (n - 1)) * 1.0 + (i / (n - 1)) * alpha_min for i in range(n)]


def alpha_min_for(alpha_eff, depth):
    """The alpha_min whose schedule has prod(alphas) == alpha_eff (bisection; the product grows with
    alpha_min). Our tool for comparing depths; the authors choose alpha_min itself (0.7 for their
    released MAE ViT-B/16, alpha_eff 1.8e-2; 0.8 for SiT-XL/2 at depth 28, alpha_eff 2.4e-3)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if math.prod(decay_schedule(depth, mid)) < alpha_eff else (low, mid)
    return (low + high) / 2


def scaled(x, alpha):
    """alpha * x, skipped when alpha is 1.0 (exactly x in floating point): the first sub-layer and
    every sub-layer of the baseline save one read and one write of x, forward and backward."""
    # a view, not x itself: a free autograd node in the multiply's place, so that autograd sums the
    # gradients of a tensor with three consumers (a long skip's source) in the same order, bit for bit
    return x.view_as(x) if alpha == 1.0 else alpha * x


class Block(nn.Module):
    """Pre-norm transformer block with one shortcut weight per residual sub-layer."""

    def __init__(self, dim, heads, mlp_ratio, alpha_attn=1.0, alpha_mlp=1.0):
        super().__init__()
        ## Plain floats, fixed by the schedule: the paper reports that a learnable alpha drifts back
        ## toward 1 and probes worse (ImageNet-100 linear probe 79.5 against 83.6 fixed).
        self.alpha_attn, self.alpha_mlp = alpha_attn, alpha_mlp
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), MLP(dim, int(dim * mlp_ratio))

    def forward(self, x):  # (B, T, D)
        ## The paper's rule, x_{k+1} = alpha_k * x_k + f_k(norm(x_k)). With alpha = 1 this is the
        ## standard residual block; with alpha < 1 the identity path of the stack is attenuated
        ## (its total weight is prod(alphas)), which pushes deep features toward low rank.
        x = scaled(x, self.alpha_attn) + self.attn(self.norm1(x))
        x = scaled(x, self.alpha_mlp) + self.mlp(self.norm2(x))
        return x

    @torch.no_grad()
    def zero_init_(self):
        """Zero the weights of the two branch outputs (attention projection, second MLP Linear): with
        zero biases (init_weights) the block starts as exactly x -> alpha_mlp * alpha_attn * x. A
        copied Block should call this after its own init, or it loses half of the method."""
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.mlp.fc2.weight)


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


def patchify(imgs, p):
    """(B, C, H, W) -> (B, L, p*p*C), patches in row-major order, (p, p, C) inside a patch (MAE's layout)."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p, channels):
    """(B, L, p*p*C) -> (B, C, H, W), the inverse of patchify for square images."""
    B, L, _ = x.shape
    side = math.isqrt(L)
    x = x.reshape(B, side, side, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, side * p, side * p)


def random_masking(x, mask_ratio, noise):
    """MAE's per-sample random masking by argsort of uniform noise.
    x: (B, L, D) patch tokens; noise: (B, L) in [0, 1).
    Returns the int(L*(1-mask_ratio)) visible tokens (B, L_keep, D), the mask (B, L) with 1 = hidden
    in the original patch order, and ids_restore (B, L) that puts a shuffled sequence back in order."""
    B, L, D = x.shape
    keep = int(L * (1 - mask_ratio))
    ## Sorting uniform noise gives each image its own random permutation in one batched call, and
    ## every image keeps exactly `keep` patches, so the visible tokens stack into one dense (B, L_keep, D)
    ## tensor: the encoder never sees (nor computes on) a hidden patch, which is what makes MAE cheap.
    ids_shuffle = noise.argsort(dim=1)  # small noise = kept
    ## The argsort of a permutation is its inverse: ids_restore[b, j] is where patch j went, so one
    ## gather with it puts any shuffled sequence (visible first, then hidden) back in image order.
    ids_restore = ids_shuffle.argsort(dim=1)
    visible = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
    mask = torch.ones(B, L, device=x.device)
    mask[:, :keep] = 0  # in shuffled order the first `keep` are the visible ones ...
    return visible, torch.gather(mask, 1, ids_restore), ids_restore  # ... the mask in image order


def unshuffle(tokens, mask_token, ids_restore):
    """(B, 1 + L_keep, D) cls + visible tokens -> (B, 1 + L, D): hidden places filled with
    mask_token, patches back in their original order, cls first."""
    B, n_tokens, D = tokens.shape
    L = ids_restore.shape[1]
    ## Append one shared, learned mask token per hidden patch (the shuffled order is visible first,
    ## hidden after), then gather with ids_restore. The decoder thus sees a full grid in which it
    ## cannot tell hidden patches apart except by their position embeddings: it must predict them from
    ## the visible ones, and the loss (masked_patch_loss) asks for nothing else.
    patches = torch.cat([tokens[:, 1:], mask_token.to(tokens.dtype).expand(B, L + 1 - n_tokens, D)], dim=1)
    patches = torch.gather(patches, 1, ids_restore[:, :, None].expand(-1, -1, D))
    return torch.cat([tokens[:, :1], patches], dim=1)


class SkipMerge(nn.Module):
    """The authors' "SkipLayer": merges one encoder block's tokens into the decoder stream."""

    def __init__(self, decoder_dim, encoder_dim):
        super().__init__()
        ## Each skip has its OWN mask token, at ENCODER width: the encoder block it reads saw only the
        ## visible patches, so its hidden places are filled before merging, and what "nothing seen here"
        ## looks like differs from block to block (shallow vs deep features).
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder_dim))
        ## Concatenate, then a 2-layer MLP back to decoder width (not a sum): the encoder and decoder
        ## widths differ, and the MLP learns how much of the skip to let in, per token.
        self.fc1 = nn.Linear(encoder_dim + decoder_dim, decoder_dim)
        self.fc2 = nn.Linear(decoder_dim, decoder_dim)  # zero-initialised: the merge starts as a no-op

    def forward(self, stream, encoder_tokens, ids_restore):  # (B, 1+L, Dd), (B, 1+L_keep, De)
        full = unshuffle(encoder_tokens, self.mask_token, ids_restore)  # (B, 1+L, De)
        ## A residual merge: the stream goes on unchanged, plus what the MLP reads from the skip.
        return stream + self.fc2(F.silu(self.fc1(torch.cat([full, stream], dim=-1))))  # (B, 1+L, Dd)


class MaskedAutoencoder(nn.Module):
    def __init__(self, img_size=32, patch_size=4, in_chans=3, embed_dim=192, depth=6, num_heads=3,
                 mlp_ratio=4.0, decoder="unet", decoder_dim=128, decoder_depth=3, decoder_heads=4,
                 final_norm=False, mask_ratio=0.75, norm_pix=True, alpha_min=1.0):
        super().__init__()
        self.patch_size, self.in_chans, self.mask_ratio, self.norm_pix = patch_size, in_chans, mask_ratio, norm_pix
        self.decoder_kind = decoder
        grid = img_size // patch_size
        # --- encoder: decayed shortcuts live here and only here ---
        ## A Conv2d with kernel = stride = patch size is a Linear applied to each non-overlapping
        ## p x p x C patch (one fused kernel instead of patchify + matmul); init_weights treats it so.
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, grid)[None], persistent=False)  # (1, 1+L, D)
        self.alphas = decay_schedule(depth, alpha_min)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, self.alphas[2 * i], self.alphas[2 * i + 1])
                                    for i in range(depth))
        ## The authors' encoder has NO final LayerNorm: features are the raw last-block tokens.
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if final_norm else nn.Identity()
        # --- decoder: standard residual blocks (alpha = 1) ---
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(decoder_dim, grid)[None], persistent=False)
        if decoder == "unet":
            ## The authors' "UNet transformer" decoder (their Fig. 5): the decoder stream starts from a
            ## learned cls token + the fixed position embeddings of ALL patches (not from the encoder
            ## output); every second encoder block (2, 4, ...) reaches it through SkipMerge, deepest first.
            ## Their ImageNet-100 ablation: decay without these skips collapses (LP 61.5 vs 83.6).
            self.decoder_cls_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
            self.decoder_embed = nn.Linear(decoder_dim, decoder_dim)
            self.skips = nn.ModuleList(SkipMerge(decoder_dim, embed_dim) for _ in range(depth // 2))
        else:
            ## The vanilla MAE decoder: the LAST encoder block's tokens, projected to decoder width,
            ## with one shared mask token per hidden patch (MAE, He et al. 2022).
            self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, mlp_ratio) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * in_chans)
        init_weights(self)

    def encode(self, imgs, noise=None):
        """imgs (B, C, H, W) -> (outputs, mask, ids_restore): outputs is the list of every encoder
        block's tokens (B, 1 + L_visible, D), cls first. `noise` (B, L) selects the visible patches
        (MAE masking); noise=None keeps every patch (feature extraction)."""
        ## Position embeddings are added BEFORE masking, so a visible token keeps its place in the image.
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]  # (B, L, D)
        mask = ids_restore = None
        if noise is not None:
            x, mask, ids_restore = random_masking(x, self.mask_ratio, noise)  # (B, L_keep, D)
        ## The cls token is kept because the authors keep it (their features average it with the patch
        ## tokens); nothing in MAE's loss trains it for classification.
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        ## Every block's output is kept: the UNet decoder reads every second one, and the features
        ## (extract_features) can be taken from any block.
        outputs[-1] = self.norm(outputs[-1])  # identity unless --final-norm
        return outputs, mask, ids_restore

    def skip_sources(self):
        """0-indexed encoder blocks feeding decoder blocks 1, 2, ... (unet decoder): the odd indices, deepest
        first (depth-1, depth-3, ..., 1 for an even depth)"""
        ## U-Net order: the first decoder block hears the DEEPEST encoder block, the last one the
        ## shallowest, so the decoder walks back down the encoder as it reconstructs.
        return [i for i in range(len(self.blocks)) if i % 2 == 1][::-1]

    def decode(self, outputs, ids_restore):  # -> (B, L, p*p*C) predicted patches
        if self.decoder_kind == "unet":
            ## The stream starts as the same (1, 1+L, Dd) for every image: all it learns about the image
            ## enters through the skips, merged just before decoder blocks 1, 2, ..., depth/2.
            start = torch.cat([self.decoder_cls_token, self.decoder_pos_embed[:, 1:]], dim=1)  # (1, 1+L, Dd)
            x = self.decoder_embed(start).expand(outputs[0].shape[0], -1, -1)
            sources = self.skip_sources()
            for i, block in enumerate(self.decoder_blocks):
                if i < len(sources):
                    x = self.skips[i](x, outputs[sources[i]], ids_restore)
                x = block(x)
        else:
            ## Position embeddings again, at decoder width: the mask tokens are all alike and only
            ## these tell the decoder which patch each must predict.
            x = unshuffle(self.decoder_embed(outputs[-1]), self.mask_token, ids_restore) + self.decoder_pos_embed
            for block in self.decoder_blocks:
                x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # drop the cls position

    def forward(self, imgs, noise):
        """imgs (B, C, H, W) normalised; noise (B, L) uniform. Returns (loss, pred (B, L, p*p*C), mask (B, L))."""
        outputs, mask, ids_restore = self.encode(imgs, noise)
        pred = self.decode(outputs, ids_restore)
        ## The loss in float32 even under bf16 autocast: a mean of many small squared errors loses
        ## digits in bf16's 8-bit mantissa.
        return masked_patch_loss(pred.float(), imgs.float(), mask, self.patch_size, self.norm_pix), pred, mask


def masked_patch_loss(pred, imgs, mask, patch_size, norm_pix):
    """Mean squared error on the HIDDEN patches only. With norm_pix each target patch is
    standardised by its own mean and (unbiased) variance, as in the reference MAE code."""
    ## Only hidden patches count: a visible patch could be copied through the network, which would
    ## teach nothing (MAE reports worse features when the loss includes them). norm_pix removes each
    ## patch's brightness and contrast from the target, which MAE found to improve the features: the
    ## model is asked for local structure, not for the overall intensity it could guess from neighbours.
    target = patchify(imgs, patch_size)  # (B, L, p*p*C)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()


def init_weights(model):
    """Every initialisation in one place (as the authors' code):
    * Linear: xavier-uniform weight, zero bias; the patch-embedding Conv2d likewise, seen as a Linear;
    * ZERO: each block's attention output projection and second MLP Linear (encoder and decoder),
      each SkipMerge's last Linear, and the prediction head, so that at initialisation every block
      is exactly the alpha-scaled identity and the decoder predicts 0;
    * LayerNorm: weight 1, bias 0; cls / mask tokens: normal(0, 0.02); position embeddings: fixed."""
    ## Xavier-uniform keeps each Linear's output variance near its input's at the start; MAE's code
    ## and the authors' use it for every Linear, so every arm here starts from one recipe.
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    ## The patch Conv2d is a Linear on flattened patches (see MaskedAutoencoder): initialise it as one,
    ## with fan-in p*p*C, not the Conv2d default.
    w = model.patch_embed.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.patch_embed.bias)
    ## Zero-init of the branch outputs matters as much as the rule itself: the authors report feature
    ## norms blowing up early in training for alpha_min <= 0.7 without it.
    for block in list(model.blocks) + list(model.decoder_blocks):
        block.zero_init_()
    ## Likewise each skip merge starts as a no-op and the head predicts 0: the first gradients then
    ## flow through the identity paths, and no random branch adds noise of its own at step 0.
    for skip in getattr(model, "skips", []):
        nn.init.zeros_(skip.fc2.weight)
    nn.init.zeros_(model.decoder_pred.weight)
    for name, param in model.named_parameters():
        if name.endswith("token"):
            nn.init.normal_(param, std=0.02)


def build_model(cfg, alpha_min, in_chans):
    return MaskedAutoencoder(cfg.img_size, cfg.patch_size, in_chans, cfg.embed_dim, cfg.depth, cfg.num_heads,
                             cfg.mlp_ratio, cfg.decoder, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads,
                             cfg.final_norm, cfg.mask_ratio, cfg.norm_pix, alpha_min)


@torch.no_grad()
def block_norms(model, imgs):
    """Mean L2 norm of the tokens after each encoder block, on unmasked images: with alpha_min < 1
    the identity path no longer accumulates, so the norms stop growing with depth."""
    ## What decay does to the residual stream, in numbers: with alpha = 1 every block adds to the
    ## norm it receives; feature_norms.png draws the curves at initialisation and after training.
    outputs, _, _ = model.encode(imgs)
    return [float(o.float().norm(dim=-1).mean()) for o in outputs]


def mae_flops_per_image(cfg, in_chans=3):
    """Training FLOPs per image (forward x3 for forward + backward), counted explicitly: 2 FLOPs per
    multiply-add in every Linear, plus 4*T^2*D per attention layer (QK^T and AV)."""
    L = (cfg.img_size // cfg.patch_size) ** 2
    T_enc, T_dec = 1 + int(L * (1 - cfg.mask_ratio)), 1 + L
    D, Dd, r = cfg.embed_dim, cfg.decoder_dim, cfg.mlp_ratio

    def blocks(n, T, d):
        return n * (2 * T * (4 + 2 * r) * d * d + 4 * T * T * d)

    flops = 2 * L * cfg.patch_size ** 2 * in_chans * D + blocks(cfg.depth, T_enc, D)
    if cfg.decoder == "unet":
        flops += 2 * T_dec * Dd * Dd + (cfg.depth // 2) * 2 * T_dec * ((D + Dd) * Dd + Dd * Dd)
    else:
        flops += 2 * T_enc * D * Dd
    flops += blocks(cfg.decoder_depth, T_dec, Dd) + 2 * T_dec * Dd * cfg.patch_size ** 2 * in_chans
    return 3 * flops


# =============================================================================================
# Training: optimizer, schedule, on-device augmentation, and the loop
# read to see how a run is trained; the loop is train_run
# =============================================================================================

## Keys that change what a run computes: a checkpoint resumes only under identical values (the
## compile mode too: compiled kernels, CUDA graphs most of all, round differently from eager ones).
TRAJECTORY_KEYS = ("dataset", "train_limit", "img_size", "crop_min", "patch_size", "embed_dim", "depth", "num_heads",
                   "mlp_ratio", "decoder", "decoder_dim", "decoder_depth", "decoder_heads", "final_norm", "mask_ratio",
                   "norm_pix", "epochs", "batch_size", "base_lr", "min_lr", "warmup_epochs", "weight_decay", "beta2",
                   "compile", "compile_mode")


## What an --out-dir's config.json must agree on for another run to write into it: the trajectory and
## the arms. (Evaluation knobs, devices and logging may change between a run and its --resume.)
OUT_DIR_KEYS = TRAJECTORY_KEYS + ("alpha_min", "alpha_eff", "seeds", "vanilla")
SCRIPT = "mae_decay.py"  # written into config.json: which script an out-dir belongs to


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
## runs on CPU and GPU draw the same crops, flips and masks.
def step_generator(seed, step):
    return torch.Generator().manual_seed(1_000_003 * seed + step)


def epoch_order(seed, epoch, n):
    return torch.randperm(n, generator=torch.Generator().manual_seed(7_919 * seed + epoch + 1))


def fixed_subset(total, n, device):
    """n of `total` indices, the same at every call (a seeded permutation, sorted): a subset that
    stays representative when a dataset is stored class by class (image folders, some CIFAR copies)."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n].sort().values.to(device)


def crop_boxes(n, gen, crop_min):
    """n random resized crops (area in [crop_min, 1], aspect in [3/4, 4/3]) with random horizontal
    flips, as affine maps theta (n, 2, 3) in grid_sample's [-1, 1] coordinates, drawn on the CPU
    from `gen`, so a run draws the same crops on every device and can be resumed exactly."""
    area = crop_min + (1 - crop_min) * torch.rand(n, generator=gen)
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(n, generator=gen)
    w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1)  # crop width, fraction of the image
    h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1)
    cx = (2 * torch.rand(n, generator=gen) - 1) * (1 - w)  # crop centre in [-1, 1] coordinates
    cy = (2 * torch.rand(n, generator=gen) - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    return theta


def crop_and_flip(images, theta, out_size, mean, std):
    """uint8 images (B, C, H, W) -> the crops theta (B, 2, 3) describe, resized to out_size, normalised;
    the whole batch at once on the device (bilinear, reflected at the borders)."""
    grid = F.affine_grid(theta, (len(theta), images.shape[1], out_size, out_size), align_corners=False)
    x = F.grid_sample(images.float().div_(255), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return (x - mean) / std


def step_draws(gen, batch, num_patches, crop_min, rank, world_size, device):
    """Every random number of one training step, drawn from the CPU generator `gen` for the GLOBAL
    batch in a fixed order (crops, then masking noise), this process's slice kept: theta (B/W, 2, 3)
    and noise (B/W, L). On CUDA both go in ONE non-blocking copy from pinned (page-locked) memory,
    so the host does not wait for the GPU, nor the GPU for a second transfer."""
    theta = shard(crop_boxes(batch, gen, crop_min), rank, world_size)
    noise = shard(torch.rand(batch, num_patches, generator=gen), rank, world_size)
    packed = torch.empty(theta.numel() + noise.numel(), pin_memory=device.type == "cuda")
    torch.cat([theta.flatten(), noise.flatten()], out=packed)
    packed = packed.to(device, non_blocking=True)
    return packed[:theta.numel()].view(theta.shape), packed[theta.numel():].view(noise.shape)


def center_view(images, out_size, mean, std):
    """The evaluation view: the whole image, resized if needed, no randomness."""
    x = images.float().div_(255)
    if x.shape[-1] != out_size or x.shape[-2] != out_size:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
    return (x - mean) / std


def train_run(cfg, data, alpha_min, seed, run_dir, device):
    """Train one MAE (one alpha_min, one seed); returns its result dict (numbers, curves, images)."""
    rank, world_size = rank_and_world()
    torch.manual_seed(seed)  # the same initial weights in every process
    model = build_model(cfg, alpha_min, data["train_x"].shape[1]).to(device)
    optimizer = make_optimizer(model, cfg, device)
    n_train, batch = len(data["train_x"]), cfg.batch_size
    if batch > n_train:
        raise UserError(f"--batch-size {batch} is larger than the {n_train} training images; lower it.")
    check_world_size(batch, world_size)
    steps_per_epoch = n_train // batch  # the last incomplete batch of an epoch is dropped
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    peak_lr = cfg.base_lr * batch / 256  ## MAE's linear scaling rule: lr = base_lr * batch / 256
    num_patches = (cfg.img_size // cfg.patch_size) ** 2
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    state = start_or_resume(ckpt_path, model, optimizer, cfg, alpha_min, seed, total_steps)  # --resume: from ckpt.pt
    probe_imgs = center_view(data["test_x"][fixed_subset(len(data["test_x"]), 256, device)], cfg.img_size,
                             data["mean"], data["std"])
    if state["init_norms"] is None:
        state["init_norms"] = block_norms(model, probe_imgs)
    if cfg.eval_every and state["step"] == 0 and not state["evals"]:
        evaluate_periodic(model, state, cfg, data, alpha_min, seed, 0, device)  # the curves' epoch-0 point
    forward = wrap_model(model, cfg, device)  # DDP under torchrun; torch.compile with an eager fallback
    log = StepLog(state, stop_step, batch, f"alpha_min={alpha_min:g} seed={seed}")
    signals = catch_ctrl_c() if world_size == 1 else {"stop": False, "signal": "SIGINT"}  # torchrun handles them itself

    model.train()
    with log:  # closes the progress bar however the loop ends
        for step in range(state["step"], stop_step):
            epoch, i = divmod(step, steps_per_epoch)
            if i == 0 or step == state["step"]:
                order = epoch_order(seed, epoch, n_train).to(device)
            ## Same trajectory for any number of processes: every process draws the data order, the crops,
            ## the flips and the masking noise for the WHOLE global batch from the same seeded generators,
            ## then keeps its contiguous slice [rank*B/W, (rank+1)*B/W). The W slices together are exactly
            ## the one-process batch, and since every image hides the same number of patches, the mean of
            ## the W per-process losses (what DDP's gradient average differentiates) is the global loss.
            idx = shard(order[i * batch:(i + 1) * batch], rank, world_size)  # (B/W,)
            theta, noise = step_draws(step_generator(seed, step), batch, num_patches, cfg.crop_min, rank, world_size, device)
            imgs = crop_and_flip(data["train_x"][idx], theta, cfg.img_size, data["mean"], data["std"])  # (B/W, C, H, W)
            lr = get_lr(step, total_steps, warmup_steps, peak_lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device):
                loss = forward(imgs, noise)[0]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log.add(loss)  # kept on the device: fetching it every step would stall the GPU
            state["step"] = step + 1

            end_of_epoch = i == steps_per_epoch - 1
            if len(log.pending) >= cfg.log_every or end_of_epoch or step + 1 == stop_step or signals["stop"]:
                log.flush(alpha_min)  # every process at the same steps (a collective under torchrun)
                save = signals["stop"] or log.minutes_since_save() > cfg.ckpt_minutes  # --ckpt-minutes, Ctrl-C, SIGTERM
                if end_of_epoch:
                    done = epoch + 1
                    if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.epochs):
                        evaluate_periodic(model, state, cfg, data, alpha_min, seed, done, device)  # --eval-every
                        log.restart_clock()  # evaluation time is not training time
                    save |= done % cfg.ckpt_every == 0 or done == cfg.epochs  # --ckpt-every
                if save and rank == 0:
                    save_checkpoint(ckpt_path, model, optimizer, state, cfg, alpha_min, seed)
                    log.saved()
                if signals["stop"]:  # after the checkpoint: stop between two steps
                    raise Interrupted(f"interrupted ({signals['signal']}) at step {state['step']}/{total_steps}; checkpoint "
                                      f"{ckpt_path} saved: rerun the same command with --resume to continue", signals["signal"])
    release_ctrl_c()
    if state["step"] < total_steps and rank == 0:  # stopped early by --max-steps: keep the state so --resume continues
        save_checkpoint(ckpt_path, model, optimizer, state, cfg, alpha_min, seed)
    return finish_run(model, state, cfg, data, alpha_min, seed, run_dir, device, probe_imgs, steps_per_epoch)


## The helpers of train_run, in the order it calls them.

def start_or_resume(ckpt_path, model, optimizer, cfg, alpha_min, seed, total_steps):
    """A fresh run's state, or, with --resume, the state (and weights, optimizer, RNG) of ckpt_path."""
    state = {"step": 0, "losses": [], "evals": [], "seconds": 0.0, "init_norms": None}
    if os.path.exists(ckpt_path):
        if not cfg.resume:
            raise UserError(f"{ckpt_path} already exists: pass --resume to continue it, or choose another --out-dir.")
        state = load_checkpoint(ckpt_path, model, optimizer, cfg, alpha_min, seed)  # every process loads it
        if rank_and_world()[0] == 0:
            print(f"resumed {ckpt_path} at step {state['step']}/{total_steps}")
    return state


def evaluate_periodic(model, state, cfg, data, alpha_min, seed, epoch, device):
    """k-NN, linear probe and both effective ranks on fixed subsets (--eval-train / --eval-test
    images; 0 = all), appended to state["evals"] to draw the curves. The full evaluation runs once,
    at the end (finish_run)."""
    subset = {s: fixed_subset(len(data[f"{s}_x"]), min(n or len(data[f"{s}_x"]), len(data[f"{s}_x"])), device)
              for s, n in (("train", cfg.eval_train), ("test", cfg.eval_test))}
    feats = {s: extract_features(model, data[f"{s}_x"][idx], cfg, data, device) for s, idx in subset.items()}
    labels = {s: data[f"{s}_y"][idx] for s, idx in subset.items()}
    pred = knn_predict(feats["train"], labels["train"], feats["test"], min(cfg.knn_k, len(feats["train"])),
                       cfg.knn_t, num_classes=len(data["classes"]))
    probe = linear_probe(feats["train"], labels["train"], feats["test"], labels["test"], seed=seed,
                         num_classes=len(data["classes"]), **probe_settings(cfg))
    e = {"epoch": epoch, "knn": (pred == labels["test"]).float().mean().item(), "linear_probe": probe,
         "effective_rank": effective_rank(feats["train"][:25600]),
         "effective_rank_centered": effective_rank(feats["train"][:25600], center=True)}
    state["evals"].append(e)
    if rank_and_world()[0] == 0:
        tqdm.write(f"alpha_min={alpha_min:g} seed={seed} epoch {epoch}: k-NN@{cfg.knn_k} {e['knn']:.4f}, "
                   f"probe {e['linear_probe']:.4f} ({len(feats['train'])} train / {len(feats['test'])} test), "
                   f"effective rank {e['effective_rank']:.1f} (centred {e['effective_rank_centered']:.1f})")


def compile_mode(cfg, device):
    """--compile-mode auto: CUDA graphs ("reduce-overhead") on one CUDA GPU, where a small model's
    step is otherwise bound by the host launching ~1,000 kernels; plain "default" elsewhere
    (under DDP, whose gradient hooks CUDA graphs do not capture, and on CPU / MPS)."""
    if cfg.compile_mode != "auto":
        return cfg.compile_mode
    return "reduce-overhead" if device.type == "cuda" and rank_and_world()[1] == 1 else "default"


def wrap_model(model, cfg, device):
    """What the training step calls. Under torchrun, `model` wrapped in DDP (whose constructor also
    waits for every process, so none can write the checkpoint before all have looked for it);
    `model` itself stays the plain module that evaluation uses and checkpoints save, so they resume
    with any number of processes. Then, with --compile, torch.compile, which fails lazily, at the
    first call: the returned function then says so once and continues in eager mode."""
    if dist.is_available() and dist.is_initialized():
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        # the (1, 1, D) tokens' gradients differ from DDP's buckets only in the strides of size-1 dims: harmless
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    if not cfg.compile:
        return model
    compiled = torch.compile(model, mode=compile_mode(cfg, device))

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


class StepLog:
    """The losses of the steps since the last flush, kept on the device; flush() fetches them (one
    device sync per --log-every steps, sooner at an epoch's end, the last step or a signal), stops
    the run on a non-finite loss, appends them to state["losses"], adds the training time to
    state["seconds"] and updates the progress bar."""

    def __init__(self, state, stop_step, batch, desc):
        self.state, self.batch, self.pending = state, batch, []
        self.progress = tqdm(total=stop_step, initial=state["step"], desc=desc, dynamic_ncols=True, mininterval=1.0,
                             disable=rank_and_world()[0] != 0)
        self.clock = self.last_save = time.perf_counter()

    def add(self, loss):
        self.pending.append(loss.detach().clone())  # a copy: CUDA graphs (reduce-overhead) reuse the output's memory

    def flush(self, alpha_min):
        if not self.pending:
            return
        ## The logged loss is the GLOBAL batch's: the mean of the per-process means (equal sizes).
        values = mean_over_ranks(torch.stack(self.pending), rank_and_world()[1]).tolist()
        self.pending = []
        first_step = self.state["step"] - len(values)
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:  # every process sees the same values, so all stop together
            raise UserError(f"the loss became {values[bad]} at step {first_step + bad} (alpha_min={alpha_min:g}); "
                            f"lower --base-lr or raise --alpha-min (the paper finds alpha_min <= 0.4 unstable for ViT-B).")
        self.state["losses"] += values
        now = time.perf_counter()
        self.state["seconds"] += now - self.clock
        self.progress.update(len(values))
        self.progress.set_postfix(loss=f"{values[-1]:.4f}", img_s=f"{len(values) * self.batch / (now - self.clock):.0f}")
        self.clock = now

    def restart_clock(self):
        self.clock = time.perf_counter()

    def minutes_since_save(self):
        return (time.perf_counter() - self.last_save) / 60

    def saved(self):
        self.clock = self.last_save = time.perf_counter()  # checkpoint time is not training time

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.progress.close()


# =============================================================================================
# Evaluation: frozen features, k-NN, linear probe, effective rank
# read to see what the numbers mean; knn_predict, linear_probe, AUTHORS_PROBE, effective_rank are copies of probe.py's
# =============================================================================================

@torch.no_grad()
def extract_features(model, images, cfg, data, device, batch_size=512, all_blocks=False):
    """Frozen features of the whole, unmasked, un-augmented image (eval mode, no grad).
    Default (the authors'): tokens of the last encoder block, no final norm, mean-pooled over ALL
    tokens, cls included. --feature cls takes the cls token; --feature-block K takes block K.
    all_blocks=True: every block's mean and cls features from the same forward pass, (N, 2, depth, D).
    Under torchrun each process extracts a contiguous run of batches and all get every feature, in order."""
    rank, world_size = rank_and_world()
    was_training = model.training
    model.eval()
    block = (cfg.feature_block or cfg.depth) - 1
    shape = (2, cfg.depth, cfg.embed_dim) if all_blocks else (cfg.embed_dim,)
    features = [torch.zeros(0, *shape, device=images.device)]  # (0, ...): a process may get no batch
    for start in block_starts(len(images), batch_size, rank, world_size):
        x = center_view(images[start:start + batch_size], cfg.img_size, data["mean"], data["std"])
        with autocast(device):
            outputs = model.encode(x)[0]  # depth x (B, 1+L, D)
        if all_blocks:
            tokens = torch.stack(outputs, 1)  # (B, depth, 1+L, D)
            features.append(torch.stack([tokens.mean(2), tokens[:, :, 0]], 1).float())  # (B, 2, depth, D)
        else:
            features.append((outputs[block].mean(1) if cfg.feature == "mean" else outputs[block][:, 0]).float())
    model.train(was_training)
    return all_gather_rows(torch.cat(features), world_size)


def describe_feature(cfg):
    block = cfg.feature_block or cfg.depth
    pooled = "mean over all tokens (cls included)" if cfg.feature == "mean" else "cls token"
    return f"encoder block {block}/{cfg.depth} output, {pooled}" + (", after the final LayerNorm" if cfg.final_norm and block == cfg.depth else "")


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
## torch.optim.AdamW(params, 1e-2) and so torch's default weight decay 0.01, batch 256 (per GPU:
## theirs ran on 8), the incomplete batch dropped, 200 epochs, cosine set once per epoch, final
## epoch. Offered beside the standardised one.
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


def probe_settings(cfg):
    """The keyword arguments of linear_probe for --probe: ours (standardised) or the authors'."""
    return AUTHORS_PROBE if cfg.probe == "authors" else {"epochs": cfg.probe_epochs, "lr": cfg.probe_lr}


def describe_probe(cfg):
    if cfg.probe == "authors":
        return ("the authors' (raw features, AdamW lr 1e-2, weight decay 0.01, batch 256, incomplete batch dropped, "
                "200 epochs, cosine set once per epoch, final epoch)")
    return f"standardised features, AdamW lr {cfg.probe_lr:g}, batch 1024, {cfg.probe_epochs} epochs, cosine, final epoch"


PIXEL_ROW_MAX_GIB = 8  # the raw-pixel row is skipped when the flattened pixels would take more memory


def pixel_reference(cfg, data, batch_size=4096):
    """The reference row: k-NN, linear probe and effective ranks of the raw pixels (the evaluation
    view, flattened), what a learned feature has to beat to be worth anything."""
    with torch.no_grad():
        pixels = {s: torch.cat([center_view(data[f"{s}_x"][i:i + batch_size], cfg.img_size, data["mean"],
                                            data["std"]).flatten(1)
                                for i in range(0, len(data[f"{s}_x"]), batch_size)]) for s in ("train", "test")}
    return reference_row(pixels["train"], pixels["test"], cfg, data)


def untrained_reference(cfg, data, seed, device):
    """The control row: the same evaluation of the encoder as initialised for `seed`, before any
    training step, what training has to ADD to. The branches start at zero (init_weights), so this
    feature is the patch embedding plus position, averaged over tokens; alpha_min only rescales it,
    which changes neither the cosine k-NN nor the standardised probe, so one row serves every arm
    with the --decoder and --final-norm of the command."""
    torch.manual_seed(seed)  # the initial weights of train_run's model for this seed
    model = build_model(cfg, 1.0, data["train_x"].shape[1]).to(device)
    features = {s: extract_features(model, data[f"{s}_x"], cfg, data, device) for s in ("train", "test")}
    return {**reference_row(features["train"], features["test"], cfg, data), "seed": seed, "feature": describe_feature(cfg)}


def reference_row(train_f, test_f, cfg, data):
    """A reference row's numbers (k-NN, linear probe, effective ranks) for given train / test features."""
    pred = knn_predict(train_f, data["train_y"], test_f, cfg.knn_k, cfg.knn_t, num_classes=len(data["classes"]))
    return {"alpha_min": math.nan, "alpha_eff": math.nan, "seed": 0, "knn": {cfg.knn_k: (pred == data["test_y"]).float().mean().item()},
            "knn_k": cfg.knn_k, "linear_probe": linear_probe(train_f, data["train_y"], test_f, data["test_y"],
                                                            num_classes=len(data["classes"]), **probe_settings(cfg)),
            "effective_rank": effective_rank(train_f[:25600]),
            "effective_rank_centered": effective_rank(train_f[:25600], center=True),
            "last_epoch_loss": math.nan, "seconds": 0.0}


@torch.no_grad()
def reconstruction_examples(model, images, cfg, data, seed, n=6):
    """(3, n, C, H, W) uint8: originals, masked inputs, reconstructions (visible patches pasted back)."""
    model.eval()
    x = center_view(images[:n], cfg.img_size, data["mean"], data["std"])
    noise = torch.rand(len(x), (cfg.img_size // cfg.patch_size) ** 2, generator=torch.Generator().manual_seed(seed))
    _, pred, mask = model(x, noise.to(x.device))
    target = patchify(x, cfg.patch_size)
    if cfg.norm_pix:  # undo the per-patch normalisation with the true patch statistics (display only)
        pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    hidden = mask[:, :, None]
    recon = unpatchify(target * (1 - hidden) + pred * hidden, cfg.patch_size, x.shape[1])
    masked = unpatchify(target * (1 - hidden), cfg.patch_size, x.shape[1])
    model.train()
    to_uint8 = lambda t: ((t * data["std"] + data["mean"]).clamp(0, 1) * 255).round().byte().cpu()
    return torch.stack([to_uint8(x), to_uint8(masked), to_uint8(recon)]).numpy()


@torch.no_grad()
def pca_maps(model, images, cfg, data, n=6):
    """(n, h, w, 3) floats in [0, 1]: the last block's patch tokens projected on their top-3
    principal components, as RGB (the idea of the paper's Figure 3)."""
    model.eval()
    x = center_view(images[:n], cfg.img_size, data["mean"], data["std"])
    tokens = model.encode(x)[0][-1][:, 1:].float()  # (n, L, D), cls dropped
    model.train()
    flat = tokens.reshape(-1, tokens.shape[-1])
    flat = flat - flat.mean(0)
    components = torch.linalg.svd(flat, full_matrices=False)[2][:3]  # (3, D)
    rgb = flat @ components.T
    rgb = (rgb - rgb.min(0).values) / (rgb.max(0).values - rgb.min(0).values).clamp_min(1e-8)
    side = math.isqrt(tokens.shape[1])
    return rgb.reshape(n, side, side, 3).cpu().numpy()


def finish_run(model, state, cfg, data, alpha_min, seed, run_dir, device, probe_imgs, steps_per_epoch):
    """Full frozen-feature evaluation of a trained run, its features file and its plot material."""
    started = time.perf_counter()
    train_f = extract_features(model, data["train_x"], cfg, data, device)
    test_f = extract_features(model, data["test_x"], cfg, data, device)
    num_classes = len(data["classes"])
    ks = [k for k in sorted({10, 20, 100, 200, cfg.knn_k}) if k <= len(train_f)]
    preds = knn_predict(train_f, data["train_y"], test_f, ks, cfg.knn_t, num_classes=num_classes)
    knn = {k: (p == data["test_y"]).float().mean().item() for k, p in preds.items()}
    probe = linear_probe(train_f, data["train_y"], test_f, data["test_y"], seed=seed, num_classes=num_classes,
                         **probe_settings(cfg))
    ## Effective rank on at most 25,600 training features (RankMe's sample size), uncentred (RankMe's
    ## convention) and centred (the mean feature removed: a large shared mean alone makes the
    ## uncentred spectrum look low-rank, whatever the features' spread).
    erank = effective_rank(train_f[:25600])
    erank_centered = effective_rank(train_f[:25600], center=True)
    if rank_and_world()[0] == 0:  # every process evaluated the gathered features; one writes them
        save_features(os.path.join(run_dir, "features.npz"), train_f, data["train_y"], test_f, data["test_y"],
                      {"config": json.dumps(dataclasses.asdict(cfg)), "feature": describe_feature(cfg),
                       "alpha_min": alpha_min, "seed": seed, "classes": np.asarray(data["classes"])})
    losses = state["losses"]
    epochs_done = len(losses) // steps_per_epoch
    return {"alpha_min": alpha_min, "alpha_eff": math.prod(model.alphas), "seed": seed, "steps": state["step"],
            "knn": knn, "knn_k": cfg.knn_k, "linear_probe": probe, "effective_rank": erank,
            "effective_rank_centered": erank_centered,
            "final_loss": losses[-1] if losses else float("nan"),
            "last_epoch_loss": float(np.mean(losses[-steps_per_epoch:])) if losses else float("nan"),
            "seconds": state["seconds"], "eval_seconds": time.perf_counter() - started,
            "epoch_losses": [float(np.mean(losses[e * steps_per_epoch:(e + 1) * steps_per_epoch])) for e in range(epochs_done)],
            "losses": losses, "evals": state["evals"], "block_norms_init": state["init_norms"],
            "block_norms": block_norms(model, probe_imgs), "feature": describe_feature(cfg),
            "recon": reconstruction_examples(model, data["test_x"], cfg, data, seed),
            "pca": pca_maps(model, data["test_x"], cfg, data),
            **({"study": study_evaluation(model, cfg, data, device, seed)} if cfg.study_eval else {})}


# =============================================================================================
# The experiment's report: the comparison table, plots and the benchmark
# skip on a first read
# =============================================================================================

def mean_std(values, decimals=4):
    """One table cell: the mean (+- the sample std when there are several seeds) at a fixed number
    of decimals, or '-' when the row has no such number (the raw-pixel row has no loss)."""
    values = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(values) == 0:
        return "-"
    return f"{values.mean():.{decimals}f}" + (f"+-{values.std(ddof=1):.{decimals}f}" if len(values) > 1 else "")


REFERENCE_ROWS = ("untrained encoder", "raw pixels")  # rows that are not a trained arm (no alpha_eff, no training time)


def results_table(results):
    """One row per setting (arm), mean +- std over seeds (sample std) when there are several;
    accuracies to 3 decimals, ranks to 1, '-' where a row has no number."""
    k = results[0]["knn_k"]
    header = f"{'setting':<22} {'alpha_eff':>9} {'seeds':>5} {f'k-NN@{k}':>13} {'linear probe':>13} " \
             f"{'eff. rank':>11} {'eff. rank (c)':>13} {'loss (last ep)':>14} {'train s':>8}"
    rows = [header, "-" * len(header)]
    for setting in dict.fromkeys(r["setting"] for r in results):
        group = [r for r in results if r["setting"] == setting]
        column = lambda key: [r[key] for r in group]  # noqa: E731
        reference = setting in REFERENCE_ROWS
        alpha_eff = "-" if reference else f"{group[0]['alpha_eff']:.2e}"
        seconds = "-" if reference else f"{np.mean(column('seconds')):.0f}"
        rows.append(f"{setting:<22} {alpha_eff:>9} {len(group):>5} {mean_std([r['knn'].get(k) for r in group], 3):>13} "
                    f"{mean_std(column('linear_probe'), 3):>13} {mean_std(column('effective_rank'), 1):>11} "
                    f"{mean_std(column('effective_rank_centered'), 1):>13} {mean_std(column('last_epoch_loss'), 4):>14} "
                    f"{seconds:>8}")
    return "\n".join(rows)


def chance_accuracy(labels):
    """The accuracy of always answering the most frequent class: what any feature must beat."""
    return torch.bincount(torch.as_tensor(labels).long().flatten()).max().item() / len(labels)


def accuracy_noise(accuracy, n_test):
    """Two standard errors of the difference of two accuracies near `accuracy`, each measured on
    the same n_test test images: a difference below it can come from test-set sampling alone."""
    return 2 * math.sqrt(2 * accuracy * (1 - accuracy) / n_test)


def verdict(results, test_labels):
    """The lines a reader takes away, each with its noise: every decayed arm minus the standard
    residual MAE (alpha_min 1 with the same decoder), every arm minus its untrained encoder, and the
    best arm minus raw pixels and chance."""
    ## A difference is called "beyond noise" only when it exceeds both the test-set sampling noise
    ## (accuracy_noise) and, with several seeds, twice the standard error of its per-seed values;
    ## with one seed the seed-to-seed spread is unknown and the line says so. Means are rounded to
    ## 3 decimals BEFORE subtracting, so the printed difference is exactly "A minus B" as printed.
    k, n_test, lines = results[0]["knn_k"], len(test_labels), []
    chance = chance_accuracy(test_labels)
    settings = list(dict.fromkeys(r["setting"] for r in results))
    value = lambda r, key: r["knn"].get(k, math.nan) if key == "knn" else r[key]  # noqa: E731
    names = {"knn": f"k-NN@{k}", "linear_probe": "linear probe", "effective_rank_centered": "eff. rank (c)"}

    def compare(a, b, key):
        by_seed = {s: {r["seed"]: value(r, key) for r in results if r["setting"] == s} for s in (a, b)}
        baseline = by_seed[b] if b != "raw pixels" else {seed: by_seed[b][0] for seed in by_seed[a]}  # pixels: one row
        paired = paired_difference(by_seed[a], baseline)  # the study's same-seed differences and standard error
        decimals = 1 if key.startswith("effective") else 3
        mean_a, mean_b = (round(float(np.mean(list(by_seed[x].values()))), decimals) for x in (a, b))
        diff = round(mean_a - mean_b, decimals) + 0.0  # + 0.0: never print -0.000
        test_noise = accuracy_noise((mean_a + mean_b) / 2, n_test) if decimals == 3 else 0.0
        seed_noise = 2 * paired["se"]  # nan with one seed
        text = f"{a} minus {b}, {names[key]}: {mean_a:.{decimals}f} - {mean_b:.{decimals}f} = {diff:+.{decimals}f}"
        if len(paired["seeds"]) > 1:
            noise = max(test_noise, seed_noise)
            why = f"2 std. errors over {len(paired['seeds'])} seeds" + (", test-set sampling" if test_noise > seed_noise else "")
            return f"{text}: {'beyond' if abs(diff) > noise else 'WITHIN'} noise (+-{noise:.{decimals}f}: {why})"
        if decimals == 1:
            return f"{text}: one seed, noise unmeasured (--seeds 0,1,2 measures it)"
        return (f"{text}: {'beyond' if abs(diff) > test_noise else 'WITHIN'} test-set noise (+-{test_noise:.3f}); "
                f"one seed, seed noise unmeasured (--seeds 0,1,2)")

    base = next((s for s in settings if s.startswith("alpha_min=") and float(s.split("=")[1]) == 1.0), None)
    for s in settings:
        if base and s.startswith("alpha_min=") and s != base:
            lines += [compare(s, base, key) for key in ("knn", "linear_probe", "effective_rank_centered")]
    trained = [s for s in settings if s not in REFERENCE_ROWS]
    start = next((r["feature"] for r in results if r["setting"] == "untrained encoder"), None)
    if start:  # what training added to the encoder it started from: arms that read the same feature (not --vanilla's, after its final norm)
        lines += [compare(s, "untrained encoder", "knn") for s in trained
                  if next(r["feature"] for r in results if r["setting"] == s) == start]
    if trained:
        best = max(trained, key=lambda s: np.mean([value(r, "knn") for r in results if r["setting"] == s]))
        best_knn = round(float(np.mean([value(r, "knn") for r in results if r["setting"] == best])), 3)
        noise = accuracy_noise(chance, n_test) / math.sqrt(2)  # one accuracy against a fixed number
        lines.append(f"best k-NN, {best}: {best_knn:.3f}; chance (the most frequent test class) {chance:.3f}: "
                     f"{'beyond' if best_knn - chance > noise else 'NOT beyond'} it (test-set noise +-{noise:.3f})")
        if "raw pixels" in settings:
            lines.append(compare(best, "raw pixels", "knn"))
    return "\n".join(lines)


def save_plots(results, out_dir, test_labels):
    """curves.png (loss, k-NN, probe, effective ranks over training), recon.png, pca.png, feature_norms.png."""
    pixels = next((r for r in results if r["setting"] == "raw pixels"), None)
    results = [r for r in results if "evals" in r]  # trained runs only (not the raw-pixel row)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = list(dict.fromkeys(r["setting"] for r in results))
    colour = {a: plt.cm.viridis(i / max(1, len(settings) - 1)) for i, a in enumerate(settings)}
    first_seed = [next(r for r in results if r["setting"] == a) for a in settings]

    def save(fig, name):
        atomic_write(os.path.join(out_dir, name), lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
        plt.close(fig)

    k = results[0]["knn_k"]
    curves = [("knn", f"k-NN@{k} (periodic subset)", "test accuracy"),
              ("linear_probe", "linear probe (periodic subset)", "test accuracy"),
              ("effective_rank", "effective rank, uncentred (paper Fig. 4)", "effective rank"),
              ("effective_rank_centered", "effective rank, centred", "effective rank")]
    fig, axes = plt.subplots(1, 1 + len(curves), figsize=(5 * (1 + len(curves)), 4))
    for r in results:
        label = f"{r['setting']} seed={r['seed']}"
        axes[0].plot(range(1, len(r["epoch_losses"]) + 1), r["epoch_losses"], color=colour[r["setting"]], label=label)
        epochs = [e["epoch"] for e in r["evals"]]
        for ax, (key, *_) in zip(axes[1:], curves):
            ax.plot(epochs, [e[key] for e in r["evals"]], "o-", color=colour[r["setting"]], label=label)
    ## The two numbers every accuracy must beat: chance (always the most frequent class) and the same
    ## evaluation on raw pixels (whole test set; the curves use the periodic subsets).
    for ax, key in zip(axes[1:3], ("knn", "linear_probe")):
        ax.axhline(chance_accuracy(test_labels), color="grey", linestyle=":", label="chance")
        if pixels:
            ax.axhline(pixels["knn"][k] if key == "knn" else pixels[key], color="black", linestyle="--",
                       label="raw pixels")
    for ax, title, ylabel in zip(axes, ["training loss (epoch mean)"] + [c[1] for c in curves],
                                 ["masked-patch loss (log scale)"] + [c[2] for c in curves]):
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    save(fig, "curves.png")

    def show(ax, image, label=None):
        ax.imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        if label:
            ax.set_ylabel(label, fontsize=7)

    for name, key in (("recon.png", "recon"), ("pca.png", "pca")):
        rows, top = (3, 0) if key == "recon" else (1, 1)  # pca.png starts with a row of the images themselves
        fig, axes = plt.subplots(top + rows * len(first_seed), 6, figsize=(9, 1.6 * (top + rows * len(first_seed))),
                                 squeeze=False)
        for col in range(6 if top else 0):
            show(axes[0, col], first_seed[0]["recon"][0, col].transpose(1, 2, 0), "image" if col == 0 else None)
        for a, r in enumerate(first_seed):
            for row in range(rows):
                label = ["original", "masked", "reconstruction"][row] if key == "recon" else "PCA of patch tokens"
                for col in range(6):
                    image = r[key][row, col].transpose(1, 2, 0) if key == "recon" else r[key][col]
                    show(axes[top + a * rows + row, col], image, f"{r['setting']}\n{label}" if col == 0 else None)
        if key == "pca":
            fig.suptitle("How to read: each square is one patch of the image above it, coloured by its last-block feature's top 3 "
                         "principal components\n(over all patches shown): same colour = similar feature. Features that serve "
                         "the class colour the object or texture, not the background.", fontsize=7)
        save(fig, name)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in first_seed:
        blocks = range(1, len(r["block_norms"]) + 1)
        ax.plot(blocks, r["block_norms"], "o-", color=colour[r["setting"]], label=f"{r['setting']} trained")
        ax.plot(blocks, r["block_norms_init"], "x--", color=colour[r["setting"]], alpha=0.5, label="at init")
    ax.set(xlabel="encoder block", ylabel="mean token norm", yscale="log", title="feature norm per block")
    ax.legend(fontsize=7)
    save(fig, "feature_norms.png")


## Peak dense bf16 tensor throughput, FLOP/s, by device name; MFU is printed only for these.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


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


def run_benchmark(cfg, device, warmup_steps=5, timed_steps=20):
    """Times the training step as train_run runs it (random draws, augmentation, masking, forward,
    backward, AdamW) on random uint8 data after warm-up (which includes compilation): the MEDIAN
    of timed_steps per-step times, from CUDA events on a GPU (no host sync between steps)."""
    alpha_min = alpha_settings(cfg)[-1]
    torch.manual_seed(0)
    model = build_model(cfg, alpha_min, 3).to(device)
    optimizer = make_optimizer(model, cfg, device)
    forward = wrap_model(model, cfg, device)
    images = torch.randint(0, 256, (cfg.batch_size, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8, device=device)
    mean = torch.full((1, 3, 1, 1), 0.5, device=device)
    num_patches = (cfg.img_size // cfg.patch_size) ** 2

    def train_step(step):
        theta, noise = step_draws(step_generator(0, step), cfg.batch_size, num_patches, cfg.crop_min, 0, 1, device)
        with autocast(device):
            loss = forward(crop_and_flip(images, theta, cfg.img_size, mean, mean), noise)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else torch.mps.synchronize if device.type == "mps" else (lambda: None)
    for step in range(warmup_steps):
        train_step(step)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = step_times_ms(train_step, range(warmup_steps, warmup_steps + timed_steps), device)
    ms = float(np.median(times))
    img_s = cfg.batch_size / ms * 1000
    flops = mae_flops_per_image(cfg)
    if device.type == "cuda":
        name, memory = torch.cuda.get_device_name(), f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (peak allocated)"
    else:
        import resource
        name = f"{device.type} ({os.cpu_count()} cores)"
        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (peak process RSS)"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    mfu = f"{flops * img_s / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16" if peak else "n/a (no peak FLOP/s known for this device)"
    print(f"device {name}, torch {torch.__version__}, compile={cfg.compile}{' (' + compile_mode(cfg, device) + ')' if cfg.compile else ''}, batch {cfg.batch_size}, "
          f"{cfg.img_size}px/{cfg.patch_size}, ViT {cfg.embed_dim}x{cfg.depth}, decoder {cfg.decoder} {cfg.decoder_dim}x{cfg.decoder_depth}")
    print(f"{ms:.1f} ms/step (median of {timed_steps})  {img_s:.0f} img/s  {flops / 1e9:.3g} GFLOP/img  {flops * img_s / 1e12:.3g} TFLOP/s  "
          f"MFU {mfu}  memory {memory}")
    return {"ms_per_step": ms, "img_per_s": img_s, "flops_per_image": flops}


# =============================================================================================
# The study: vanilla MAE vs the skip decoder alone vs skip decoder + decay, over seeds, one device
# skip on a first read; run_study is the whole of it, study_evaluation what each run adds
# =============================================================================================

## The paper compares the vanilla MAE (standard decoder, final LayerNorm) with its method (the skip
## decoder AND decay); the skip decoder without decay, the control that separates the two, is
## reported nowhere. The study trains every arm with several seeds, each (arm, seed) a full run of
## its own, as parallel worker processes of this file (a small model can leave a big GPU idle between
## kernel launches, which other processes may fill; the study's benchmark times the step with all of
## them running, so any gain or loss is measured), and reports paired differences against their spread.
STUDY_EPOCHS = {"cuda": (30, 50), "other": (1, 50)}  # the sized epoch count is clamped to this range


def study_evaluation(model, cfg, data, device, seed):
    """Evaluation that cannot flatter an arm, beside the headline (last block, mean over all tokens):
    every encoder block, mean and cls features, k-NN@k (DINO) on raw and on centred features (the
    train mean subtracted from train and test), the standard probe and both effective ranks per block,
    all from ONE forward pass; and the authors' probe on the headline feature. With --final-norm
    (the vanilla MAE) the last block's features are taken after the final LayerNorm."""
    started = time.perf_counter()
    feats = {s: extract_features(model, data[f"{s}_x"], cfg, data, device, all_blocks=True) for s in ("train", "test")}
    num_classes, train_y, test_y = len(data["classes"]), data["train_y"], data["test_y"]
    k = min(cfg.knn_k, len(train_y))

    def knn(train_f, test_f):
        return (knn_predict(train_f, train_y, test_f, k, cfg.knn_t, num_classes=num_classes) == test_y).float().mean().item()

    blocks = {}
    for p, pooling in enumerate(("mean", "cls")):
        blocks[pooling] = []
        for b in range(cfg.depth):
            train_f, test_f = feats["train"][:, p, b], feats["test"][:, p, b]  # (N, D)
            centre = train_f.mean(0)
            blocks[pooling].append({
                "block": b + 1, "knn": knn(train_f, test_f), "knn_centered": knn(train_f - centre, test_f - centre),
                "linear_probe": linear_probe(train_f, train_y, test_f, test_y, epochs=cfg.probe_epochs, lr=cfg.probe_lr,
                                             seed=seed, num_classes=num_classes),
                "effective_rank": effective_rank(train_f[:25600]),
                "effective_rank_centered": effective_rank(train_f[:25600], center=True)})
    authors = linear_probe(feats["train"][:, 0, -1], train_y, feats["test"][:, 0, -1], test_y, seed=seed,
                           num_classes=num_classes, **AUTHORS_PROBE)
    return {"blocks": blocks, "authors_probe": authors, "knn_k": k, "final_norm": cfg.final_norm,
            "authors_probe_is": describe_probe(dataclasses.replace(cfg, probe="authors")),
            "probe_per_block_is": describe_probe(dataclasses.replace(cfg, probe="standard")),
            "seconds": time.perf_counter() - started}


def study_arms(cfg):
    """The arms of --study-arms in priority order: (label, folder name, the Config values it sets)."""
    arms = []
    for item in (a.strip() for a in cfg.study_arms.split(",") if a.strip()):
        if item == "vanilla":
            arms.append(("vanilla MAE", "vanilla", {"decoder": "mae", "final_norm": True, "alpha_min": "1.0"}))
            continue
        try:
            alpha_min = float(item)
        except ValueError:
            alpha_min = math.nan
        if not 0.0 < alpha_min <= 1.0:
            raise UserError(f"--study-arms takes 'vanilla' and alpha_min values in (0, 1], got '{item}'.")
        arms.append((f"skip, alpha_min={alpha_min:g}", f"skip{alpha_min:g}",
                     {"decoder": "unet", "final_norm": False, "alpha_min": repr(alpha_min)}))
    if not arms or len({a[1] for a in arms}) < len(arms):
        raise UserError(f"--study-arms needs distinct arms, e.g. vanilla,1.0,0.7; got '{cfg.study_arms}'.")
    return arms


def study_seeds(cfg):
    seeds = parse_seeds(cfg.seeds)
    return seeds if len(seeds) >= 2 else [0, 1, 2]


def worker_argv(cfg, **overrides):
    """The command line whose Config equals cfg with `overrides`: every knob spelled out, so a worker
    never depends on a preset or on the defaults of the file it runs."""
    argv = []
    for name, value in {**dataclasses.asdict(cfg), "study": False, "alpha_eff": "", "vanilla": False, **overrides}.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [f"{flag}={value}"]
    return argv


def run_workers(jobs, n_workers, on_done=None, tick=None):
    """Runs jobs [(name, argv, log path)] as processes of this file, at most n_workers at once, in
    order; returns ({name: exit code}, {name: launch time}). Each worker has its own session, so a
    Ctrl-C in the terminal reaches only this process, which passes every SIGINT or SIGTERM it gets on
    to each running worker as ONE SIGINT: the first makes them checkpoint at their next step and exit
    (and no new one starts), a second stops them at once. Then Interrupted is raised: --resume continues."""
    import subprocess
    ## The CPU cores are shared out between the workers (math threads, and torch.compile's kernel
    ## compilers, which would otherwise start one process per core in every worker).
    threads = str(max(1, (os.cpu_count() or 1) // min(n_workers, max(1, len(jobs)))))
    env = {"OMP_NUM_THREADS": threads, "TORCHINDUCTOR_COMPILE_THREADS": threads, **os.environ, "PYTHONUNBUFFERED": "1"}
    received, forwarded, running, codes, launched, queue = [], 0, {}, {}, {}, list(jobs)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        while queue or running:
            queue = [] if received else queue
            while queue and len(running) < n_workers:
                name, argv, log_path = queue.pop(0)
                os.makedirs(os.path.dirname(log_path), exist_ok=True)
                with open(log_path, "ab") as log:
                    launched[name] = time.time()
                    running[name] = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], stdout=log,
                                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
            if len(received) > forwarded:
                for process in running.values():
                    process.send_signal(signal.SIGINT)
                forwarded = len(received)
            for name, process in list(running.items()):
                if process.poll() is not None:
                    codes[name] = running.pop(name).returncode
                    if on_done:
                        on_done(name, codes[name])
            if tick:
                tick(codes)
            time.sleep(0.1)
    finally:
        for process in running.values():  # reached only on an unexpected error here: stop them as a Ctrl-C would
            process.send_signal(signal.SIGINT)
            process.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise Interrupted(f"interrupted ({signal.Signals(received[0]).name}): {len(codes)} run(s) stopped (each saved a "
                          f"checkpoint if it was training); rerun the same command with --resume to continue the study",
                          signal.Signals(received[0]).name)
    return codes, launched


def study_benchmark(cfg):
    """One benchmark worker of the study (--benchmark --study-eval): loads the data, compiles and
    warms up its arm's training step (run_benchmark), waits until every worker is warm (a file
    barrier), times the step while they all run at once (contention included), then times one final
    evaluation of an untrained model (finish_run with study_evaluation). Writes the numbers to --json."""
    device = pick_device(cfg.device)
    parent, go = os.getppid(), os.path.join(os.path.dirname(cfg.json), "go")
    data = to_device(load_dataset(cfg.dataset, cfg.data_dir, cfg.img_size, cfg.download), device, cfg.train_limit)
    run_benchmark(cfg, device, warmup_steps=3, timed_steps=1)  # compilation and CUDA-graph capture, not timed
    write_json(cfg.json + ".ready", {"time": time.time()})
    while not os.path.exists(go):
        if os.getppid() != parent:
            raise UserError("the study that started this benchmark worker is gone; rerun the study.")
        time.sleep(0.05)
    ## 100 steps on a GPU: long against the spread of the workers' re-warm-ups (a fresh model re-captures
    ## its CUDA graphs), so that the timed windows overlap and the contention is really measured.
    timed = run_benchmark(cfg, device, warmup_steps=2, timed_steps=100 if device.type == "cuda" else 2)
    alpha_min = alpha_settings(cfg)[0]
    torch.manual_seed(0)
    model = build_model(cfg, alpha_min, data["train_x"].shape[1]).to(device)
    probe_imgs = center_view(data["test_x"][:256], cfg.img_size, data["mean"], data["std"])
    state = {"step": 0, "losses": [], "evals": [], "seconds": 0.0, "init_norms": None}
    run_dir = os.path.join(os.path.dirname(cfg.json), f".eval_{os.getpid()}")
    os.makedirs(run_dir, exist_ok=True)
    started = time.perf_counter()
    evaluated = finish_run(model, state, cfg, data, alpha_min, 0, run_dir, device, probe_imgs, 1)
    final_eval_seconds = time.perf_counter() - started
    os.remove(os.path.join(run_dir, "features.npz"))
    os.rmdir(run_dir)
    ## A periodic evaluation (k-NN, probe and ranks of the headline feature) costs about what
    ## finish_run spends before its plot material and study_evaluation: its eval_seconds.
    result = {"ms_per_step": timed["ms_per_step"], "ready_at": json.load(open(cfg.json + ".ready"))["time"],
              "final_eval_seconds": final_eval_seconds, "periodic_eval_seconds": evaluated["eval_seconds"]}
    write_json(cfg.json, result)
    return result


def log_tail(path, lines=15):
    """The last lines of a worker's log, indented, so a failure's cause is in the study's own output."""
    try:
        with open(path, "rb") as f:
            text = f.read()[-20000:].decode(errors="replace").replace("\r", "\n")
    except OSError:
        return f" (no log at {path})"
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return f"; the end of {path}:\n" + "\n".join("    " + line for line in tail)


def study_makespan(durations, n_workers):
    """Wall time of running jobs of these durations, in order, each on the first free of n_workers slots."""
    slots = [0.0] * n_workers
    for d in durations:
        slots[slots.index(min(slots))] += d
    return max(slots)


def size_study(timing, arms, seeds, n_workers, steps_per_epoch, seconds_left, epoch_range, eval_every, shortest=None):
    """The plan (arms, seeds, epochs) that fits the time left, from the measured timing of each arm
    {label: {start, ms_per_step, final_eval_seconds, periodic_eval_seconds}}. Plans are tried from
    the largest (every arm, every seed) down to the required (3 arms, 2 seeds), fewer seeds last;
    the first whose epoch count can reach epoch_range[0] wins, at the most epochs that fit (at most
    epoch_range[1]). If none does, the smallest plan gets the most epochs that fit below the range,
    down to `shortest` (default a third of its floor; a budget overrun loses the whole study, a
    shorter schedule does not), and a line says so. Returns (arms, seeds, epochs, lines).
    A run's time: start + epochs * steps_per_epoch * ms_per_step + its evaluations; runs fill the
    n_workers slots in order (study_makespan)."""
    low, high = epoch_range

    def makespan(plan_arms, plan_seeds, epochs):
        durations = []
        for _ in plan_seeds:
            for label, *_ in plan_arms:
                t = timing[label]
                periodic = (epochs // eval_every + 1) if eval_every else 0  # the epoch-0 evaluation included
                durations.append(t["start"] + epochs * steps_per_epoch * t["ms_per_step"] / 1000
                                 + t["final_eval_seconds"] + periodic * t["periodic_eval_seconds"])
        return study_makespan(durations, n_workers)

    plans = [(arms[:a], seeds[:s]) for s in range(len(seeds), min(2, len(seeds)) - 1, -1)
             for a in range(len(arms), min(3, len(arms)) - 1, -1)]
    lines = [f"{label}: start {timing[label]['start']:.1f} s (process, data, compile), "
             f"{timing[label]['ms_per_step']:.1f} ms/step with {timing[label]['concurrent']} benchmark workers at once = "
             f"{steps_per_epoch * timing[label]['ms_per_step'] / 1000:.2f} s/epoch, final evaluation "
             f"{timing[label]['final_eval_seconds']:.1f} s, periodic {timing[label]['periodic_eval_seconds']:.1f} s"
             for label, *_ in arms]
    for plan_arms, plan_seeds in plans:
        fits = [e for e in range(low, high + 1) if makespan(plan_arms, plan_seeds, e) <= seconds_left]
        if fits:
            epochs = fits[-1]
            lines.append(f"plan: {len(plan_arms)} arms x {len(plan_seeds)} seeds = {len(plan_arms) * len(plan_seeds)} runs "
                         f"on {n_workers} workers, {epochs} epochs: expected {makespan(plan_arms, plan_seeds, epochs):.0f} s "
                         f"of the {seconds_left:.0f} s left (larger plans did not reach {low} epochs)")
            return plan_arms, plan_seeds, epochs, lines
    plan_arms, plan_seeds = plans[-1]
    floor = min(low, shortest or max(1, low // 3))
    epochs = max([e for e in range(floor, low) if makespan(plan_arms, plan_seeds, e) <= seconds_left], default=floor)
    lines.append(f"plan: NOT within the budget at {low} epochs (the smallest plan, {len(plan_arms)} arms x {len(plan_seeds)} "
                 f"seeds, would take {makespan(plan_arms, plan_seeds, low):.0f} s of the {seconds_left:.0f} s left): "
                 f"{epochs} epochs instead, expected {makespan(plan_arms, plan_seeds, epochs):.0f} s; raise --study-minutes "
                 f"or give --epochs for a longer schedule")
    return plan_arms, plan_seeds, epochs, lines


def paired_difference(values, baseline):
    """values, baseline: {seed: number}. The differences on the seeds both have, their mean, sample
    std, standard error std/sqrt(n), and whether |mean| > 2 x standard error (the study's rule)."""
    seeds = sorted(set(values) & set(baseline))
    diffs = np.asarray([values[s] - baseline[s] for s in seeds], dtype=np.float64)
    n = len(diffs)
    mean = float(diffs.mean()) if n else math.nan
    std = float(diffs.std(ddof=1)) if n >= 2 else math.nan
    se = std / math.sqrt(n) if n >= 2 else math.nan
    return {"seeds": seeds, "diffs": diffs.tolist(), "mean": mean, "std": std, "se": se,
            "beyond_noise": bool(n >= 2 and abs(mean) > 2 * se)}


## (key, column title, decimals) of the study's table; "k-NN@k" gets the real k.
STUDY_METRICS = [("knn", "k-NN@k", 4), ("linear_probe", "linear probe", 4), ("knn_centered", "k-NN centred", 4),
                 ("authors_probe", "authors' probe", 4), ("effective_rank", "eff. rank", 1),
                 ("effective_rank_centered", "eff. rank (c)", 1), ("last_epoch_loss", "loss (last ep)", 4),
                 ("seconds", "train s", 0)]


def plus_minus(mean, std, digits, sign=False):
    """'0.6420+-0.0031' (or '+0.0120+-0.0031' with sign); the std part only when there is one."""
    text = f"{mean:{'+' if sign else ''}.{digits}f}"
    return text if math.isnan(std) else f"{text}+-{std:.{digits}f}"


def study_metrics(run):
    """The headline numbers of one run's results.json entry, flat (JSON turns the k-NN keys into text)."""
    k = run["knn_k"]
    last_mean = run["study"]["blocks"]["mean"][-1] if "study" in run else {}
    return {"knn": run["knn"].get(str(k), run["knn"].get(k, math.nan)), "linear_probe": run["linear_probe"],
            "knn_centered": last_mean.get("knn_centered", math.nan),
            "authors_probe": run.get("study", {}).get("authors_probe", math.nan),
            "effective_rank": run["effective_rank"], "effective_rank_centered": run["effective_rank_centered"],
            "last_epoch_loss": run["last_epoch_loss"], "seconds": run["seconds"]}


def study_comparisons(labels):
    """(arm, baseline) pairs: every arm against the vanilla MAE, and every decayed skip arm against
    the skip decoder without decay (alpha_min 1)."""
    pairs = [(label, "vanilla MAE") for label in labels if label != "vanilla MAE" and "vanilla MAE" in labels]
    control = "skip, alpha_min=1"
    return pairs + [(label, control) for label in labels if label.startswith("skip,") and label != control and control in labels]


def study_report(runs, pixels, k):
    """runs: [{arm, seed, metrics, blocks}]. Returns (text, comparisons): the mean +- std table, the
    paired differences with their spread, the verdict lines, and per-block k-NN / probe tables."""
    labels = list(dict.fromkeys(r["arm"] for r in runs))
    by_arm = {label: {r["seed"]: r["metrics"] for r in runs if r["arm"] == label} for label in labels}
    names = [name.replace("k-NN@k", f"k-NN@{k}") for _, name, _ in STUDY_METRICS]
    header = f"{'arm':<40} {'seeds':>5} " + " ".join(f"{n:>16}" for n in names)
    lines = [header, "-" * len(header)]
    for label in labels:
        cells = []
        for key, _, digits in STUDY_METRICS:
            values = np.asarray([m[key] for m in by_arm[label].values()], dtype=np.float64)
            cells.append(plus_minus(values.mean(), values.std(ddof=1) if len(values) > 1 else math.nan, digits))
        lines.append(f"{label:<40} {len(by_arm[label]):>5} " + " ".join(f"{c:>16}" for c in cells))
    if pixels:
        cells = ["" if math.isnan(pixels[key]) or key == "seconds" else f"{pixels[key]:.{digits}f}" for key, _, digits in STUDY_METRICS]
        lines.append(f"{'raw pixels':<40} {'':>5} " + " ".join(f"{c:>16}" for c in cells))
    comparisons, verdicts = [], []
    lines += ["", "paired differences (arm - baseline on the same seed), mean +- std over seeds:"]
    for arm, base in study_comparisons(labels):
        diffs = {key: paired_difference({s: m[key] for s, m in by_arm[arm].items()},
                                        {s: m[key] for s, m in by_arm[base].items()}) for key, _, _ in STUDY_METRICS}
        comparisons.append({"arm": arm, "baseline": base, "differences": diffs})
        cells = [plus_minus(diffs[key]["mean"], diffs[key]["std"], digits, sign=True) for key, _, digits in STUDY_METRICS]
        lines.append(f"{arm + ' - ' + base:<40} {len(diffs['knn']['seeds']):>5} " + " ".join(f"{c:>16}" for c in cells))
        beyond = [f"{name} {diffs[key]['mean']:+.{digits}f}" for (key, _, digits), name in zip(STUDY_METRICS, names)
                  if diffs[key]["beyond_noise"]]
        within = [name for (key, _, _), name in zip(STUDY_METRICS, names) if not diffs[key]["beyond_noise"]]
        verdicts.append(f"{arm} vs {base} ({len(diffs['knn']['seeds'])} paired seeds): "
                        + (f"beyond the seed spread: {', '.join(beyond)}" if beyond else "no difference beyond the seed spread")
                        + (f"; within it, so not told apart here: {', '.join(within)}" if within else "") + ".")
    lines += ["", "verdict (rule: a paired difference, arm minus baseline, counts as beyond the seed spread when |mean| > 2 x "
              "its standard error std/sqrt(n). A rule of thumb, not a significance test: with 2 seeds it holds whenever both "
              "differences have the same sign and are within a factor 3 of each other; a 95 % t-test would need |mean| > "
              "12.7 (2 seeds) or 4.3 (3 seeds) standard errors):"] + verdicts
    depth = len(runs[0]["blocks"]["mean"])
    lines += ["", f"best block (mean feature, mean over seeds; picked on the test numbers, so descriptive only; the "
                  f"headline is block {depth}):"]
    for label in labels:
        for key, title in (("knn", f"k-NN@{k}"), ("linear_probe", "linear probe")):
            values = np.mean([[b[key] for b in r["blocks"]["mean"]] for r in runs if r["arm"] == label], axis=0)
            lines.append(f"{label}: {title} best at block {values.argmax() + 1} ({values.max():.4f}), "
                         f"last block {values[-1]:.4f}")
    for pooling in ("mean", "cls"):
        for key, title in (("knn", f"k-NN@{k}"), ("knn_centered", f"k-NN@{k} centred"), ("linear_probe", "linear probe (standard)")):
            lines += ["", f"per encoder block: {title}, {'mean over all tokens' if pooling == 'mean' else 'cls token'}, "
                          f"mean over seeds (block {depth} is the last; the vanilla MAE's is after its final LayerNorm)",
                      f"{'arm':<40} " + " ".join(f"{b:>6}" for b in range(1, depth + 1))]
            for label in labels:
                values = np.mean([[b[key] for b in r["blocks"][pooling]] for r in runs if r["arm"] == label], axis=0)
                lines.append(f"{label:<40} " + " ".join(f"{v:>6.3f}" for v in values))
    return "\n".join(lines), comparisons


## A study's out-dir is its own kind (a plain run must not write into it, nor it into a plain run's);
## the epochs are left out of its keys because the study sizes them itself (study_plan.json keeps them).
STUDY_SCRIPT = "mae_decay.py --study"
STUDY_KEYS = tuple(k for k in TRAJECTORY_KEYS if k not in ("epochs", "decoder", "final_norm")) + (
    "study_arms", "seeds", "study_minutes")


def run_study(cfg):
    """The study: benchmark each arm with the workers running at once, size the epochs to the budget,
    train every (arm, seed) as a worker process, then one table with paired differences and verdicts.
    Writes study_plan.json, study.json and study.txt in --out-dir; each run has its own folder."""
    started = time.perf_counter()
    if "RANK" in os.environ:
        raise UserError("--study starts its own worker processes: run it with python, not torchrun.")
    check_out_dir(cfg.out_dir, STUDY_SCRIPT, dataclasses.asdict(cfg), STUDY_KEYS)  # before anything is written
    arms, seeds = study_arms(cfg), study_seeds(cfg)
    plan_path = os.path.join(cfg.out_dir, "study_plan.json")
    if os.path.exists(plan_path) and not cfg.resume:
        raise UserError(f"{plan_path} already exists: pass --resume to continue that study, or choose another --out-dir.")
    parts = load_dataset(cfg.dataset, cfg.data_dir, cfg.img_size, cfg.download)  # on the CPU: sizes only
    n_train = min(len(parts["train"][1]), cfg.train_limit or len(parts["train"][1]))
    if cfg.batch_size > n_train:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {n_train} training images; lower it.")
    print(f"study: {cfg.dataset}, {n_train} training images, arms {', '.join(a[0] for a in arms)}; seeds {seeds}; "
          f"{cfg.study_workers} workers; out {cfg.out_dir}")
    if os.path.exists(plan_path):  # --resume: the plan is kept, so every run resumes under its own settings
        plan = json.load(open(plan_path))
        known = {a[1]: a for a in arms}
        if any(folder not in known for folder in plan["arms"]):
            raise UserError(f"{plan_path} names arms {plan['arms']} that --study-arms lacks; resume with the same flags.")
        arms, seeds, epochs, sizing = [known[f] for f in plan["arms"]], plan["seeds"], plan["epochs"], plan["sizing"]
        print(f"--resume: the study's plan from {plan_path}: {epochs} epochs")
    elif cfg.study_minutes == 0:
        epochs, sizing = cfg.epochs, [f"--epochs {cfg.epochs} given: no benchmark, every arm and seed"]
    else:
        arms, seeds, epochs, sizing = study_size_by_benchmark(cfg, arms, seeds, n_train, started)
    write_json(os.path.join(cfg.out_dir, "config.json"), {"script": STUDY_SCRIPT, **dataclasses.asdict(cfg)})
    write_json(plan_path, {"arms": [a[1] for a in arms], "seeds": seeds, "epochs": epochs, "sizing": sizing})
    print("\n".join(sizing))

    jobs, folders = [], {}
    for seed in seeds:  # seed-major: the first seed of every arm is trained first
        for i, (label, folder, values) in enumerate(arms):
            name = f"{folder}_seed{seed}"
            out = os.path.join(cfg.out_dir, name)
            folders[name] = (label, seed, out)
            if os.path.exists(os.path.join(out, "results.json")):
                print(f"{name}: already done ({out}/results.json)")
                continue
            jobs.append((name, worker_argv(cfg, **values, seeds=str(seed), epochs=epochs, out_dir=out, json="",
                                           pixels=cfg.pixels and seed == seeds[0] and i == 0, study_eval=True, untrained=False),
                         os.path.join(out, "worker.log")))

    def done(name, code):
        label, seed, out = folders[name]
        print(f"{name}: {'finished' if code == 0 else 'stopped' if code == 130 else f'FAILED (exit {code})'} "
              f"at {time.perf_counter() - started:.0f} s{'' if code in (0, 130) else log_tail(os.path.join(out, 'worker.log'))}")

    codes, _ = run_workers(jobs, cfg.study_workers, on_done=done)
    failed = [name for name, code in codes.items() if code != 0]
    runs, pixels = [], None
    for name, (label, seed, out) in folders.items():
        path = os.path.join(out, "results.json")
        if name in failed or not os.path.exists(path):
            continue
        for r in json.load(open(path))["runs"]:
            if r["setting"] == "raw pixels":
                pixels = study_metrics(r)
            else:
                runs.append({"arm": label, "seed": seed, "folder": name, "metrics": study_metrics(r),
                             "blocks": r["study"]["blocks"], "epoch_losses": r["epoch_losses"], "evals": r["evals"],
                             "alpha_min": r["alpha_min"], "alpha_eff": r["alpha_eff"], "feature": r["feature"],
                             "authors_probe_is": r["study"]["authors_probe_is"]})
    if not runs:
        raise UserError(f"every run failed ({', '.join(failed)}); read their worker.log, fix the cause and rerun with --resume.")
    k = min(cfg.knn_k, n_train)
    text, comparisons = study_report(runs, pixels, k)
    wall, missing = time.perf_counter() - started, f"; FAILED and missing: {', '.join(failed)}" if failed else ""
    head = (f"study: {cfg.dataset} at {cfg.img_size}px, ViT {cfg.embed_dim}x{cfg.depth}/{cfg.patch_size}, {epochs} epochs, "
            f"batch {cfg.batch_size}, seeds {seeds}, {cfg.study_workers} workers, {wall:.0f} s wall; torch {torch.__version__}"
            f"{missing}\n"
            f"headline feature: last encoder block, mean over all tokens (the vanilla MAE's after its final LayerNorm); "
            f"k-NN: DINO, k={k}, T={cfg.knn_t}; linear probe: {describe_probe(dataclasses.replace(cfg, probe='standard'))}; "
            f"authors' probe: {describe_probe(dataclasses.replace(cfg, probe='authors'))}; k-NN centred: train mean subtracted")
    write_json(os.path.join(cfg.out_dir, "study.json"),
               {"config": dataclasses.asdict(cfg), "epochs": epochs, "seeds": seeds, "arms": [a[0] for a in arms],
                "sizing": sizing, "wall_seconds": wall, "torch": torch.__version__, "runs": runs, "raw_pixels": pixels,
                "comparisons": comparisons})
    atomic_write(os.path.join(cfg.out_dir, "study.txt"), lambda f: f.write(f"{head}\n{text}\n".encode()))
    print(f"\n{head}\n{text}\nwritten: {cfg.out_dir}/study.txt, study.json")
    if failed:  # the table above holds the runs that finished; the failed ones are missing from it
        raise UserError(f"{len(failed)} run(s) failed ({', '.join(failed)}) and are missing from the table; read their "
                        f"worker.log, fix the cause and rerun with --resume (finished runs are kept).")
    return {"runs": runs, "comparisons": comparisons, "epochs": epochs}


def study_size_by_benchmark(cfg, arms, seeds, n_train, started):
    """Benchmarks every arm with the workers running at once (at least one worker per arm), then
    sizes the study to what is left of --study-minutes (size_study). Returns (arms, seeds, epochs, lines)."""
    bench_dir = os.path.join(cfg.out_dir, "benchmark")
    os.makedirs(bench_dir, exist_ok=True)
    for name in os.listdir(bench_dir):  # a fresh barrier and fresh numbers every time
        if name == "go" or name.endswith((".json", ".ready")):
            os.remove(os.path.join(bench_dir, name))
    n = max(cfg.study_workers, len(arms))
    jobs = []
    for i in range(n):
        label, folder, values = arms[i % len(arms)]
        path = os.path.join(bench_dir, f"{folder}_{i}.json")
        jobs.append((f"{folder}_{i}", worker_argv(cfg, **values, seeds="0", benchmark=True, study_eval=True, json=path,
                                                  pixels=False, out_dir=bench_dir), path[:-5] + ".log"))
    print(f"benchmark: {n} workers at once ({', '.join(j[0] for j in jobs)}), then the evaluation of one run each")

    def tick(codes):
        ready = sum(os.path.exists(os.path.join(bench_dir, f"{name}.json.ready")) for name, *_ in jobs)
        if ready + len(codes) >= n and not os.path.exists(os.path.join(bench_dir, "go")):
            open(os.path.join(bench_dir, "go"), "w").close()

    codes, launched = run_workers(jobs, n, tick=tick)
    device_kind = "cuda" if pick_device(cfg.device).type == "cuda" else "other"
    failed = [name for name, code in codes.items() if code != 0]
    if failed:  # nothing to size by: the smallest plan at the floor of the range, rather than no study at all
        print(f"the benchmark failed in {', '.join(failed)}{log_tail(os.path.join(bench_dir, failed[0] + '.log'))}")
        low = max(STUDY_EPOCHS[device_kind][0], math.ceil(cfg.warmup_epochs))
        return arms[:3], seeds[:2], low, [f"benchmark FAILED ({', '.join(failed)}): nothing measured; the smallest plan "
                                          f"(3 arms x 2 seeds) at {low} epochs, unsized"]
    timing = {}  # per arm, the slowest of its workers: the budget must hold for every run
    for label, folder, _ in arms:
        names = [name for name, *_ in jobs if name.rsplit("_", 1)[0] == folder]
        numbers = {name: json.load(open(os.path.join(bench_dir, f"{name}.json"))) for name in names}
        timing[label] = {"start": max(numbers[name]["ready_at"] - launched[name] for name in names), "concurrent": n,
                         **{key: max(r[key] for r in numbers.values())
                            for key in ("ms_per_step", "final_eval_seconds", "periodic_eval_seconds")}}
    seconds_left = 60 * cfg.study_minutes - (time.perf_counter() - started)
    warmup = math.ceil(cfg.warmup_epochs)  # a run needs at least its warm-up epochs
    low, high = (max(e, warmup) for e in STUDY_EPOCHS[device_kind])
    plan_arms, plan_seeds, epochs, lines = size_study(timing, arms, seeds, cfg.study_workers, n_train // cfg.batch_size,
                                                      seconds_left, (low, high), cfg.eval_every,
                                                      shortest=max(1, warmup, low // 3))
    lines.insert(0, f"benchmark took {time.perf_counter() - started:.0f} s of the {60 * cfg.study_minutes:.0f} s budget; "
                    f"epochs clamped to {low}-{high} on {device_kind} (at least the {cfg.warmup_epochs:g} warm-up epochs)")
    return plan_arms, plan_seeds, epochs, lines + [f"timing: {json.dumps(timing)}"]


# =============================================================================================
# Plumbing: command line and its validation
# skip on a first read; read only if you add a flag
# =============================================================================================

def knob_help():
    """The comment after each Config field, so `--help` and the code share one description."""
    helps = {}
    for line in inspect.getsource(Config).splitlines():
        name, _, comment = line.partition("#")
        if ":" in name and "=" in name and comment:
            helps[name.split(":")[0].strip()] = comment.strip()
    return helps


CHOICES = {"decoder": ("unet", "mae"), "feature": ("mean", "cls"), "probe": ("standard", "authors"),
           "compile_mode": ("auto", "default", "reduce-overhead", "max-autotune"), "device": ("auto", "cuda", "mps", "cpu"),
           "dist_backend": ("auto", "nccl", "gloo")}  # the flags with a fixed set of values: argparse refuses the rest


def parse_config(argv=None):
    """Defaults < preset < command line. Returns a checked Config (UserError on any bad value)."""
    parser = OneSentenceParser(description="MAE with decayed identity shortcuts (arXiv 2404.10947).")
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                        help="a set of defaults: " + "; ".join(f"{name}: {', '.join(f'{k}={v}' for k, v in values.items()) or 'the defaults'}"
                                                           for name, values in PRESETS.items()).replace("%", "%%"))
    helps, defaults = knob_help(), dataclasses.asdict(Config())
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        text = f"{helps.get(field.name, '')} (default: {defaults[field.name]!r})".replace("%", "%%")
        ## default=None marks "not given", so that a preset's value survives unless the flag is typed.
        if field.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(getattr(field.type, "__name__", field.type), str)
            parser.add_argument(flag, type=kind, choices=CHOICES.get(field.name), default=None, help=text)
    args = parser.parse_args(argv)
    values = {**dataclasses.asdict(Config()), **PRESETS[args.preset]}
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "preset"})
    if args.study and args.epochs is not None:  # a typed --epochs fixes the study's epochs: no sizing
        if args.study_minutes:
            raise UserError("--study got both --epochs and --study-minutes: give --epochs N to fix the epochs, or --study-minutes M to size them.")
        values["study_minutes"] = 0.0
    cfg = Config(**values)
    check_config(cfg)
    return cfg


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
    need(cfg.img_size >= 1 and cfg.patch_size >= 1 and cfg.img_size % cfg.patch_size == 0,
         f"--img-size ({cfg.img_size}) must be a positive multiple of --patch-size ({cfg.patch_size}).")
    need(cfg.embed_dim >= 4 and cfg.decoder_dim >= 4 and cfg.embed_dim % 4 == 0 and cfg.decoder_dim % 4 == 0,
         "--embed-dim and --decoder-dim must be positive multiples of 4 (2D sin-cos position embeddings).")
    need(cfg.num_heads >= 1 and cfg.decoder_heads >= 1, "--num-heads and --decoder-heads must be at least 1.")
    need(cfg.embed_dim % cfg.num_heads == 0, f"--embed-dim ({cfg.embed_dim}) must be divisible by --num-heads ({cfg.num_heads}).")
    need(cfg.decoder_dim % cfg.decoder_heads == 0,
         f"--decoder-dim ({cfg.decoder_dim}) must be divisible by --decoder-heads ({cfg.decoder_heads}).")
    need(int(min(cfg.embed_dim, cfg.decoder_dim) * cfg.mlp_ratio) >= 1, f"--mlp-ratio must be positive, got {cfg.mlp_ratio}.")
    need(cfg.depth >= 1 and cfg.decoder_depth >= 1, "--depth and --decoder-depth must be at least 1.")
    need(cfg.decoder != "unet" or cfg.decoder_depth >= cfg.depth // 2,
         f"the unet decoder merges one skip per two encoder blocks, so --decoder-depth must be at least "
         f"{cfg.depth // 2} for --depth {cfg.depth} (or use --decoder mae).")
    need(0.0 < cfg.mask_ratio < 1.0 and int((cfg.img_size // cfg.patch_size) ** 2 * (1 - cfg.mask_ratio)) >= 1,
         f"--mask-ratio must be in (0, 1) and leave at least one visible patch, got {cfg.mask_ratio}.")
    need(cfg.dataset in (*BUILT_IN, *CIFAR, *IDX) or cfg.dataset.startswith("folder:"),  # before the out-dir's lock creates it
         f"unknown dataset '{cfg.dataset}': use {', '.join((*BUILT_IN, *CIFAR, *IDX))} or folder:PATH.")
    need(0.0 < cfg.crop_min <= 1.0, f"--crop-min must be in (0, 1], got {cfg.crop_min}.")
    need(cfg.epochs >= 1 and cfg.batch_size >= 1, "--epochs and --batch-size must be at least 1.")
    need(cfg.max_steps >= 0 and cfg.train_limit >= 0, "--max-steps and --train-limit cannot be negative.")
    need(cfg.base_lr > 0 and cfg.probe_lr > 0, "--base-lr and --probe-lr must be positive.")
    need(cfg.min_lr >= 0 and cfg.weight_decay >= 0, "--min-lr and --weight-decay cannot be negative.")
    need(0.0 <= cfg.beta2 < 1.0, f"--beta2 must be in [0, 1), got {cfg.beta2}.")
    need(0 <= cfg.warmup_epochs <= cfg.epochs, f"--warmup-epochs must be in [0, --epochs={cfg.epochs}].")
    need(0 <= cfg.feature_block <= cfg.depth, f"--feature-block must be in [0, --depth={cfg.depth}] (0 = last).")
    need(cfg.knn_k >= 1 and cfg.knn_t > 0, "--knn-k must be at least 1 and --knn-t positive.")
    need(cfg.probe_epochs >= 1, f"--probe-epochs must be at least 1, got {cfg.probe_epochs}.")
    need(cfg.eval_train >= 0 and cfg.eval_test >= 0, "--eval-train and --eval-test cannot be negative (0 = all).")
    need(cfg.threads >= 0, f"--threads must be 0 (automatic) or a positive count, got {cfg.threads}.")
    need(cfg.dist_timeout > 0, f"--dist-timeout must be a positive number of minutes, got {cfg.dist_timeout}.")
    need(cfg.log_every >= 1 and cfg.ckpt_every >= 1 and cfg.eval_every >= 0 and cfg.ckpt_minutes > 0,
         "--log-every and --ckpt-every must be at least 1, --eval-every at least 0, --ckpt-minutes positive.")
    alphas = alpha_settings(cfg)
    need(all(0.0 < a <= 1.0 for a in alphas), f"every alpha_min must be in (0, 1], got {alphas}.")
    need(cfg.study_workers >= 1 and cfg.study_minutes >= 0, "--study-workers must be at least 1 and --study-minutes not negative.")
    if cfg.study:
        need(not cfg.benchmark, "--study runs its own benchmark first; drop --benchmark.")
        study_arms(cfg)  # a bad --study-arms is refused here
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


# =============================================================================================
# Plumbing: data loaders (uint8 tensors (N, C, H, W) + int64 labels, held on the device)
# skip on a first read; read only if you change the data (copies of probe.py's, tested identical)
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


# =============================================================================================
# Plumbing: files (checkpoints, features, JSON), devices and several GPUs (torchrun + DDP)
# skip on a first read; read only if you change what is saved or how processes cooperate
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


def save_features(path, train_features, train_labels, test_features, test_labels, meta):
    """The features file probe.py reads (.npz): train_features (N, D) float32, train_labels (N,)
    int64, test_features (M, D) float32, test_labels (M,) int64, plus metadata: config (JSON text),
    feature (what the vectors are), alpha_min, seed, classes."""
    atomic_write(path, lambda f: np.savez(
        f, train_features=train_features.cpu().numpy(), train_labels=train_labels.cpu().numpy(),
        test_features=test_features.cpu().numpy(), test_labels=test_labels.cpu().numpy(),
        **{k: np.asarray(v) for k, v in meta.items()}))


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


def save_checkpoint(path, model, optimizer, state, cfg, alpha_min, seed):
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                 "config": dataclasses.asdict(cfg), "alpha_min": alpha_min, "seed": seed,
                 "rng": torch.get_rng_state()}, path)


def read_checkpoint(path, cfg, alpha_min, seed):
    """The checkpoint at path, if it is one of this run's: readable as tensors only, and trained with
    the same settings (TRAJECTORY_KEYS, alpha_min, seed); otherwise one sentence."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = ckpt["config"], ckpt["alpha_min"], ckpt["seed"]
    except Exception as e:  # truncated, not a checkpoint, or a pickle that asks for code (refused by weights_only)
        raise UserError(f"{path} is not a readable checkpoint of this script ({type(e).__name__}); delete it or use "
                        f"another --out-dir.") from None
    changed = [k for k in TRAJECTORY_KEYS if saved[0].get(k) != getattr(cfg, k)]
    if changed or saved[1:] != (alpha_min, seed):
        raise UserError(f"{path} was trained with other settings ({', '.join(changed) or 'alpha_min/seed'}); "
                        f"resume with the same flags or use another --out-dir.")
    return ckpt


def load_checkpoint(path, model, optimizer, cfg, alpha_min, seed):
    ckpt = read_checkpoint(path, cfg, alpha_min, seed)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    return ckpt["state"]


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
# Main
# the whole run: parse, load, train every (alpha_min, seed), report
# =============================================================================================

def main(argv=None):
    cfg = parse_config(argv)
    if cfg.study:  # the study: arms x seeds as worker processes, each in its own folder under --out-dir
        with out_dir_lock(cfg.out_dir):
            return run_study(cfg)
    if cfg.benchmark and cfg.study_eval:  # one of the study's benchmark workers
        return study_benchmark(cfg)
    device = setup_distributed(cfg)  # cuda:LOCAL_RANK under torchrun; pick_device(cfg.device) otherwise
    if device.type == "cpu":
        threads, why = set_cpu_threads(cfg.threads)
        if rank_and_world()[0] == 0:
            print(f"CPU threads: {threads} ({why})")
    if cfg.benchmark:
        return run_benchmark(cfg, device)
    ## Only the first process writes files, so only it holds the out-dir's lock.
    with out_dir_lock(cfg.out_dir) if rank_and_world()[0] == 0 else contextlib.nullcontext():
        return run_experiment(cfg, device)


def run_experiment(cfg, device):
    rank, world_size = rank_and_world()
    check_out_dir(cfg.out_dir, SCRIPT, dataclasses.asdict(cfg), OUT_DIR_KEYS)
    alphas, seeds = alpha_settings(cfg), parse_seeds(cfg.seeds)
    parts = load_dataset_once_per_node(cfg)
    ## Every process holds the whole training set as uint8 on its GPU (CIFAR-10: 150 MB; fine for
    ## CIFAR-size data, and the crops are still computed only for its own slice of each batch).
    data = to_device(parts, device, cfg.train_limit)
    if cfg.knn_k > len(data["train_x"]):
        raise UserError(f"--knn-k {cfg.knn_k} asks for more neighbours than the {len(data['train_x'])} training images; lower it.")
    ## The arms of the comparison: optionally the paper's baseline (the vanilla MAE: standard decoder,
    ## final LayerNorm, alpha_min 1), then one arm per alpha_min with the decoder chosen by --decoder
    ## (the authors' skip decoder by default), all with the same seeds, data and schedule.
    arms = [("vanilla MAE", dataclasses.replace(cfg, decoder="mae", final_norm=True), 1.0, "vanilla")] if cfg.vanilla else []
    arms += [(f"alpha_min={a:.4g}", cfg, a, f"alpha{a:.4g}") for a in alphas]
    runs = [(arm, seed, os.path.join(cfg.out_dir, f"{arm[-1]}_seed{seed}")) for arm in arms for seed in seeds]
    found = [(arm, seed, d) for arm, seed, d in runs if os.path.exists(os.path.join(d, "ckpt.pt"))]
    if found and not cfg.resume:  # refused before anything is written
        raise UserError(f"{found[0][2]}/ckpt.pt already exists: pass --resume to continue it, or choose another --out-dir.")
    for (_, arm_cfg, alpha_min, _), seed, run_dir in found:  # a checkpoint that cannot be resumed stops us now, not later
        read_checkpoint(os.path.join(run_dir, "ckpt.pt"), arm_cfg, alpha_min, seed)
    if rank == 0:  # only the first process prints and writes files
        print(f"{cfg.dataset}: {len(data['train_x'])} train / {len(data['test_x'])} test images of shape "
              f"{tuple(data['train_x'].shape[1:])}, {len(data['classes'])} classes; device {device}"
              f"{f' x {world_size} processes' if world_size > 1 else ''}; "
              f"settings {', '.join(a[0] for a in arms)}; seeds {seeds}")
        if cfg.resume and len(found) < len(runs):
            print(f"--resume: no checkpoint yet for {len(runs) - len(found)} of the {len(runs)} runs; those start from scratch")
        write_json(os.path.join(cfg.out_dir, "config.json"), {"script": SCRIPT, **dataclasses.asdict(cfg)})
    results = []
    for (setting, arm_cfg, alpha_min, _), seed, run_dir in runs:
        results.append({"setting": setting, **train_run(arm_cfg, data, alpha_min, seed, run_dir, device)})
    if cfg.untrained:  # the control row: each seed's encoder as initialised, before any training step
        results += [{"setting": "untrained encoder", **untrained_reference(cfg, data, seed, device)} for seed in seeds]
    pixel_gib = 4 * (len(data["train_x"]) + len(data["test_x"])) * data["train_x"].shape[1] * cfg.img_size ** 2 / 2**30
    if cfg.pixels and pixel_gib > PIXEL_ROW_MAX_GIB:
        if rank == 0:
            print(f"no raw-pixel row: the flattened pixels would take {pixel_gib:.1f} GiB (--no-pixels skips it quietly)")
    elif cfg.pixels:  # reference row: the same evaluation on raw pixels, what any feature must beat
        results.append({"setting": "raw pixels", **pixel_reference(cfg, data)})
    if rank == 0:
        print(f"\n{cfg.dataset}, {describe_feature(cfg)}{' (vanilla MAE: after its final LayerNorm)' if cfg.vanilla else ''}; "
              f"k-NN: DINO protocol, T={cfg.knn_t}; linear probe: {describe_probe(cfg)}\n{results_table(results)}")
        print(verdict(results, data["test_y"]))
        summary = {"config": dataclasses.asdict(cfg), "device": str(device), "torch": torch.__version__,
                   "processes": world_size,
                   "runs": [{k: v for k, v in r.items() if k not in ("recon", "pca")} for r in results]}
        write_json(os.path.join(cfg.out_dir, "results.json"), summary)
        if cfg.json:
            write_json(cfg.json, summary)
        if cfg.plots:
            save_plots(results, cfg.out_dir, data["test_y"])
            print(f"plots: {cfg.out_dir}/curves.png, recon.png, pca.png, feature_norms.png")
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
