"""CUDA-only checks of both training scripts: what changes when the same code runs on a GPU
(bf16 autocast, torch.compile, fused AdamW, non-deterministic kernels, NCCL). Skipped where
PyTorch sees no CUDA GPU, so CI on a CPU machine reports them as skipped.

Each test compares the GPU path with a reference that is known to be right: fp32 eager, the
unfused optimizer, an uninterrupted run, the CPU, a plain one-process run. The tolerances are
derived in the comments next to them.

    python -m pytest -q tests/test_cuda.py          # on a machine with an NVIDIA GPU
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import diffusion_decay as d  # noqa: E402
import mae_decay as m  # noqa: E402
import probe  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")

## Small but not trivial shapes: several heads, 64 tokens, a batch of 16, so that the kernels
## (flash attention, fused AdamW) are the ones a real run uses.
MAE_FLAGS = ["--img-size", "32", "--patch-size", "4", "--embed-dim", "64", "--depth", "4", "--num-heads", "4",
             "--decoder-dim", "64", "--decoder-depth", "2", "--decoder-heads", "4", "--alpha-min", "0.7"]
DIT_FLAGS = ["--img-size", "16", "--patch-size", "2", "--embed-dim", "64", "--depth", "4", "--num-heads", "4",
             "--skips", "on", "--alpha-min", "0.8", "--class-cond"]


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32 in these tests: no TF32 (the scripts switch it on in pick_device)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def randomise(model, seed=1, scale=0.05):
    """Random weights everywhere (the zero-initialised branches included), so that every block
    computes something and a precision or compilation error cannot hide behind a zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen).to(param.device))
    return model


def mae_case(seed=0, random_weights=True):
    """(model, config, loss function of a model) for an MAE (randomised unless told) and a fixed batch."""
    cfg = m.parse_config(MAE_FLAGS)
    torch.manual_seed(seed)
    model = m.build_model(cfg, 0.7, 3).to(CUDA)
    model = randomise(model) if random_weights else model
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.randn(16, 3, 32, 32, generator=gen).to(CUDA)
    noise = torch.rand(16, 64, generator=gen).to(CUDA)
    return model, cfg, lambda net: net(imgs, noise)[0]


def dit_case(seed=0, random_weights=True):
    cfg = d.parse_config(DIT_FLAGS)
    torch.manual_seed(seed)
    model = d.build_model(cfg, 0.8, True, 3, 10).to(CUDA)
    model = randomise(model) if random_weights else model
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(16, 3, 16, 16, generator=gen).to(CUDA)
    noise = torch.randn(16, 3, 16, 16, generator=gen).to(CUDA)
    t = torch.rand(16, generator=gen).to(CUDA)
    y = torch.randint(0, 11, (16,), generator=gen).to(CUDA)
    return model, cfg, lambda net: d.flow_loss(net, x0, noise, t, y)


CASES = {"mae": (m, mae_case), "dit": (d, dit_case)}


# --------------------------------------------------------------------------- precision, compile, optimizer

@pytest.mark.parametrize("random_weights", [True, False], ids=["random-weights", "initialisation"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_autocast_loss_is_finite_and_close_to_fp32(name, random_weights):
    module, case = CASES[name]
    model, _, loss_of = case(random_weights=random_weights)
    with torch.no_grad():
        fp32 = loss_of(model).item()
        with module.autocast(CUDA):
            bf16 = loss_of(model).item()
    ## bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per operation); the loss is a
    ## mean over ~10^4 squared errors, so independent roundings average out and what remains is
    ## the systematic part through a few layers: a few 1e-3. 2e-2 is ten times that and still
    ## catches a wrong cast (fp16 overflow, a lost normalisation), which moves the loss by O(1).
    assert torch.isfinite(torch.tensor(bf16))
    assert abs(bf16 - fp32) <= 2e-2 * abs(fp32), (bf16, fp32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_forward_and_backward_equal_eager(name):
    _, case = CASES[name]
    model, _, loss_of = case()
    eager = loss_of(model)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled = loss_of(torch.compile(model))
    compiled.backward()
    ## Both in fp32 (TF32 off): the compiled kernels fuse and reorder the same sums, which changes
    ## rounding at the 1e-7 level per operation; through a few layers and a mean, 1e-5 relative
    ## for the loss and 1e-3 for the gradients (sums of many such terms, some near zero) leave two
    ## orders of margin, while a wrong graph (a missed decay factor, a dropped skip) is O(1e-1).
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_adamw_step_equals_unfused(name):
    module, case = CASES[name]
    model, cfg, loss_of = case()
    start = [p.detach().clone() for p in model.parameters()]
    fused = module.make_optimizer(model, cfg, CUDA)
    assert fused.defaults["fused"], "on CUDA the scripts use the fused AdamW kernel"
    ## the reference: plain (for-loop) AdamW with the same groups (decay / no decay) and
    ## hyper-parameters, on a copy of the parameters that receives the same gradients
    copies = {p: torch.nn.Parameter(p.detach().clone()) for p in model.parameters()}
    reference = torch.optim.AdamW([{**{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")},
                                    "params": [copies[p] for p in g["params"]], "fused": False, "foreach": False}
                                   for g in fused.param_groups])
    for _ in range(3):
        for opt in (fused, reference):
            opt.zero_grad(set_to_none=True)
        loss_of(model).backward()
        for p, c in copies.items():
            c.grad = p.grad.clone()
        fused.step()
        reference.step()
    ## One AdamW step moves a weight by at most ~lr (1e-3 here); the fused kernel computes the same
    ## formula in fp32 in another order: differences of a few ulp of the weight (~1e-7 relative).
    for p, c in copies.items():
        torch.testing.assert_close(p.detach(), c.detach(), rtol=1e-5, atol=1e-6)
    assert max((p.detach() - t).abs().max().item() for p, t in zip(model.parameters(), start)) > 1e-4  # the steps moved it


# --------------------------------------------------------------------------- resume

def shapes_on_cuda(module, size):
    parts = {"train": module.make_shapes(256, size, seed=0), "test": module.make_shapes(64, size, seed=1),
             "classes": module.SHAPE_NAMES}
    return module.to_device(parts, CUDA)


def train_mae(tmp_path, name, *extra):
    cfg = m.parse_config(MAE_FLAGS + ["--img-size", "16", "--batch-size", "32", "--warmup-epochs", "0.5",
                                      "--probe-epochs", "3", "--eval-every", "0", "--no-plots", "--log-every", "1",
                                      "--out-dir", str(tmp_path / name)] + list(extra))
    return m.train_run(cfg, shapes_on_cuda(m, 16), 0.7, 0, str(tmp_path / name / "run"), CUDA)


def train_dit(tmp_path, name, *extra):
    cfg = d.parse_config(DIT_FLAGS + ["--img-size", "8", "--batch-size", "32", "--warmup-epochs", "0.5",
                                      "--probe-epochs", "3", "--eval-every", "0", "--fd-samples", "48",
                                      "--ref-epochs", "1", "--sample-steps", "2", "--feature-t", "0.1",
                                      "--no-plots", "--log-every", "1", "--out-dir", str(tmp_path / name)] + list(extra))
    data = shapes_on_cuda(d, 8)
    reference = d.reference_network(cfg, data, CUDA)
    return d.train_run(cfg, data, reference, True, 0.8, 0, str(tmp_path / name / "run"), CUDA)


@pytest.mark.parametrize("train", [train_mae, train_dit], ids=["mae", "dit"])
def test_resume_on_cuda_continues_the_uninterrupted_run(tmp_path, train):
    full = train(tmp_path, "full", "--epochs", "2")
    part = train(tmp_path, "part", "--epochs", "2", "--max-steps", "11")
    resumed = train(tmp_path, "part", "--epochs", "2", "--resume")
    assert part["steps"] == 11 and resumed["steps"] == full["steps"] == 16
    exact = resumed["losses"] == full["losses"]
    print(f"\nresume on CUDA is {'bit-exact' if exact else 'not bit-exact'}: max relative loss difference "
          f"{max(abs(a - b) / abs(b) for a, b in zip(resumed['losses'], full['losses'])):.2e}")
    ## All random numbers come from seeded CPU generators, so the data, crops, masks, times and
    ## noise are identical; what may differ is the order of floating-point atomics in CUDA
    ## backward kernels (index/scatter adds), ~1e-7 relative per step in bf16-autocast training,
    ## which 16 steps of a tiny model do not amplify beyond ~1e-5. 1e-3 leaves margin and still
    ## fails on any real resume bug (a lost optimizer state or LR step moves the loss by >1e-2).
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(full["losses"]), rtol=1e-3, atol=0)
    torch.testing.assert_close(torch.tensor(part["losses"]), torch.tensor(full["losses"][:11]), rtol=1e-3, atol=0)


# --------------------------------------------------------------------------- evaluation

@pytest.mark.parametrize("module", [m, d, probe], ids=["mae_decay", "diffusion_decay", "probe"])
def test_evaluation_on_gpu_equals_cpu(module):
    gen = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(10, 64, generator=gen)
    train_y, test_y = torch.randint(0, 10, (3000,), generator=gen), torch.randint(0, 10, (1000,), generator=gen)
    train_x = centres[train_y] + 2 * torch.randn(3000, 64, generator=gen)
    test_x = centres[test_y] + 2 * torch.randn(1000, 64, generator=gen)
    on = lambda *t: [v.to(CUDA) for v in t]  # noqa: E731
    ## k-NN: fp32 cosine similarities agree to ~1e-7 between devices; a prediction can change only
    ## where two neighbours tie to that precision, which continuous random data makes rare: allow
    ## 0.2 % of the 1000 queries (2), expect 0.
    cpu_pred = module.knn_predict(train_x, train_y, test_x, k=[10, 20], num_classes=10)
    gpu_pred = module.knn_predict(*on(train_x, train_y, test_x), k=[10, 20], num_classes=10)
    for k in (10, 20):
        assert (cpu_pred[k] != gpu_pred[k].cpu()).float().mean() <= 0.002
    ## Linear probe: the same seeded initialisation and batch order on both devices; AdamW in fp32
    ## on each, rounding differences ~1e-6 in the weights, so the test accuracy may move by a
    ## sample or two near the decision boundary: 0.5 % of 1000.
    cpu_acc = module.linear_probe(train_x, train_y, test_x, test_y, epochs=5, lr=3e-3, num_classes=10)
    gpu_acc = module.linear_probe(*on(train_x, train_y, test_x, test_y), epochs=5, lr=3e-3, num_classes=10)
    assert abs(cpu_acc - gpu_acc) <= 0.005, (cpu_acc, gpu_acc)
    ## Effective rank: a float64 SVD on both devices, so agreement to ~1e-12 relative.
    for center in (False, True):
        assert module.effective_rank(train_x, center=center) == pytest.approx(
            module.effective_rank(train_x.to(CUDA), center=center), rel=1e-9)


# --------------------------------------------------------------------------- torchrun with NCCL

def run_script(launcher, script, out, extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(launcher + [os.path.join(ROOT, script)] + extra + ["--out-dir", str(out), "--json", f"{out}.json"],
                          capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(f"{out}.json") as f:
        summary = json.load(f)
    return summary


@pytest.mark.parametrize("script,extra", [
    ("mae_decay.py", MAE_FLAGS + ["--img-size", "16", "--batch-size", "64", "--epochs", "2", "--max-steps", "20",
                                  "--eval-every", "0", "--probe-epochs", "1", "--no-plots", "--log-every", "1"]),
    ("diffusion_decay.py", DIT_FLAGS + ["--img-size", "8", "--batch-size", "64", "--epochs", "2", "--max-steps", "20",
                                        "--eval-every", "0", "--probe-epochs", "1", "--no-plots", "--log-every", "1",
                                        "--fd-samples", "100", "--ref-epochs", "1", "--sample-steps", "2"]),
], ids=["mae", "dit"])
def test_torchrun_nccl_one_process_matches_plain_python(tmp_path, script, extra):
    extra = extra + ["--device", "cuda"]
    plain = run_script([sys.executable], script, tmp_path / "plain", extra)
    ddp = run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"],
                     script, tmp_path / "ddp", extra + ["--dist-backend", "nccl"])
    assert ddp["processes"] == 1 and ddp["device"].startswith("cuda")
    a, b = plain["runs"][0]["losses"], ddp["runs"][0]["losses"]
    assert len(a) == len(b) == 20
    print(f"\n{script}: plain vs torchrun/NCCL, max relative loss difference "
          f"{max(abs(x - y) / abs(x) for x, y in zip(a, b)):.2e} ({'bit-exact' if a == b else 'not bit-exact'})")
    ## One process under DDP: the all-reduce averages a single gradient (exact), so the two runs
    ## differ only by the atomics' order in backward kernels (see the resume test): rtol 1e-3.
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-3, atol=0)
