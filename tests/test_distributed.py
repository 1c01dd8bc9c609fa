"""Tests for torchrun / DDP training in mae_decay.py and diffusion_decay.py (CPU, gloo, 2 processes).
The reference is always the one-process run of the same script with the same global batch: the
2-process run must follow its losses, end at its parameters, extract its features, and its
checkpoints must resume in one process as if nothing had happened."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
COMMON = ["--batch-size", "16", "--train-limit", "64", "--eval-every", "0", "--probe-epochs", "1", "--no-plots",
          "--device", "cpu", "--log-every", "1", "--alpha-min", "0.5", "--base-lr", "1e-2", "--warmup-epochs", "0"]
TINY = {  # one setting each; a shapes test set of 2000 images = 4 extraction batches of 512, split 2 + 2
    "mae_decay.py": ["--img-size", "16", "--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--decoder-dim", "32",
                     "--decoder-depth", "1", "--decoder-heads", "2"],
    "diffusion_decay.py": ["--img-size", "8", "--patch-size", "2", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
                           "--skips", "on", "--class-cond", "--ref-epochs", "1", "--sample-steps", "1",
                           "--fd-samples", "600",  # 2 sampling batches of 500, split 1 + 1
                           "--feature-t", "0.1"],  # t > 0: the extraction noise stream must survive the split
}
RUN_DIR = {"mae_decay.py": "alpha0.5_seed0", "diffusion_decay.py": "skipson_alpha0.5_seed0"}


def clean_env(**extra):
    """The environment of a plain `python` run (no torchrun variables), one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def train(script, out_dir, processes, *extra):
    """Runs the script (2 processes under torchrun, or 1 process in this one: the same code with one
    thread, without the cost of starting Python) and returns its JSON summary."""
    json_path = f"{out_dir}.json"
    argv = TINY[script] + COMMON + ["--out-dir", str(out_dir), "--json", json_path] + list(extra)
    if processes == 1:
        import importlib
        sys.path.insert(0, ROOT)
        assert importlib.import_module(script[:-3]).cli(argv) == 0
    else:
        proc = subprocess.run(TORCHRUN + [os.path.join(ROOT, script)] + argv,
                              capture_output=True, text=True, env=clean_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    with open(json_path) as f:
        return json.load(f)["runs"][0]


def model_state(out_dir, script):
    return torch.load(os.path.join(out_dir, RUN_DIR[script], "ckpt.pt"), map_location="cpu", weights_only=True)


def features(out_dir, script):
    with np.load(os.path.join(out_dir, RUN_DIR[script], "features.npz")) as f:
        return {k: f[k] for k in ("train_features", "train_labels", "test_features", "test_labels")}


@pytest.fixture(scope="module", params=sorted(TINY))
def runs(request, tmp_path_factory):
    """Per script: 1 process for 4 steps, 2 processes for 4 steps, and 2 processes for 2 steps
    resumed by 1 process up to step 4."""
    script, tmp = request.param, tmp_path_factory.mktemp(request.param.split(".")[0])
    one = train(script, tmp / "one", 1, "--max-steps", "4")
    two = train(script, tmp / "two", 2, "--max-steps", "4")
    train(script, tmp / "part", 2, "--max-steps", "2")
    resumed = train(script, tmp / "part", 1, "--max-steps", "4", "--resume")
    return {"script": script, "tmp": tmp, "one": one, "two": two, "resumed": resumed}


def test_two_processes_follow_the_one_process_trajectory(runs):
    one, two, script = runs["one"], runs["two"], runs["script"]
    assert len(one["losses"]) == len(two["losses"]) == 4 and two["final_loss"] == two["losses"][3]
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-4, atol=0)
    assert one["losses"][3] != one["losses"][0]  # the run moved: the comparison is not of a constant
    state_one, state_two = model_state(runs["tmp"] / "one", script), model_state(runs["tmp"] / "two", script)
    assert state_two["state"]["step"] == 4
    for key in ["model"] + (["ema"] if "ema" in state_one else []):  # unwrapped modules: same keys, no "module." prefix
        assert state_two[key].keys() == state_one[key].keys()
        for name, value in state_one[key].items():
            torch.testing.assert_close(state_two[key][name], value, rtol=1e-4, atol=1e-6, msg=f"{key}.{name}")
    f_one, f_two = features(runs["tmp"] / "one", script), features(runs["tmp"] / "two", script)
    for name, value in f_one.items():  # gathered in the one-process order (nearly equal weights: nearly equal features)
        assert f_two[name].shape == value.shape, name
        np.testing.assert_allclose(f_two[name], value, rtol=1e-3, atol=1e-4, err_msg=name)


def test_two_process_checkpoint_resumes_in_one_process(runs):
    resumed, one = runs["resumed"], runs["one"]
    assert resumed["steps"] == 4 and len(resumed["losses"]) == 4
    np.testing.assert_allclose(resumed["losses"], one["losses"], rtol=1e-4, atol=0)


def test_distributed_extraction_equals_one_process_extraction(runs):
    # the same weights (the 1-process checkpoint at step 4, continued for 0 steps) evaluated by 2
    # processes: each extracts whole batches of its contiguous shard, the gather restores the order
    script, tmp = runs["script"], runs["tmp"]
    shutil.copytree(tmp / "one", tmp / "again")
    again = train(script, tmp / "again", 2, "--max-steps", "4", "--resume")
    assert again["losses"] == runs["one"]["losses"]
    f_one, f_again = features(tmp / "one", script), features(tmp / "again", script)
    for name, value in f_one.items():
        np.testing.assert_array_equal(f_again[name], value, err_msg=name)
    for key in ("knn", "linear_probe", "effective_rank") + (("fd",) if "fd" in again else ()):
        assert again[key] == runs["one"][key], key


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.parametrize("script,world,flags,message", [  # the checks are shared copies: one script each, but the first
    (script, "2", ["--batch-size", "15"], "--batch-size 15 (the global batch) is not divisible by the 2 processes; use a multiple of 2.")
    for script in sorted(TINY)] + [
    ("mae_decay.py", "4", ["--batch-size", "2"], "4 processes need at least one image each but --batch-size is 2"),
    ("diffusion_decay.py", "1", ["--dist-backend", "nccl"], "--dist-backend nccl needs CUDA GPUs but this run is on cpu"),
    ("mae_decay.py", "2", ["--dist-timeout", "0.03"], "rank 0 of 2 could not start the gloo process group"),  # no peer comes
])
def test_process_setup_errors_are_one_sentence(tmp_path, monkeypatch, capsys, script, world, flags, message):
    # in-process, with the environment torchrun gives rank 0: the checks run before (or, for the
    # missing peer, while) the process group is started, and end in one sentence with exit code 2
    import importlib
    sys.path.insert(0, ROOT)
    module = importlib.import_module(script[:-3])
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port()).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    assert module.cli(["--device", "cpu", "--out-dir", str(tmp_path / "out")] + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_indivisible_batch_under_torchrun(tmp_path, script="mae_decay.py"):
    proc = subprocess.run(TORCHRUN + [os.path.join(ROOT, script), "--device", "cpu", "--batch-size", "15",
                                      "--out-dir", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                          env=clean_env(), timeout=120)
    # each worker ends with the sentence and exit code 2 (torchrun then reports the failed workers itself)
    assert proc.returncode != 0 and "error: --batch-size 15 (the global batch) is not divisible by the 2 processes" in proc.stderr
    assert f'{script}", line' not in proc.stderr and "exitcode  : 2" in proc.stderr  # no traceback from the script


def test_distributed_helpers_are_identical_copies():
    sys.path.insert(0, ROOT)
    import inspect
    import diffusion_decay
    import mae_decay
    for name in ("setup_distributed", "check_world_size", "rank_and_world", "shard", "block_starts", "all_gather_rows",
                 "mean_over_ranks", "load_dataset_once_per_node"):
        assert inspect.getsource(getattr(diffusion_decay, name)) == inspect.getsource(getattr(mae_decay, name)), name
    # one process, no process group: the helpers are the identity
    batch = torch.arange(12).view(6, 2)
    assert mae_decay.rank_and_world() == (0, 1) and torch.equal(mae_decay.shard(batch, 0, 1), batch)
    assert torch.equal(torch.cat([mae_decay.shard(batch, r, 3) for r in range(3)]), batch)
    assert [mae_decay.block_starts(2000, 512, r, 2) for r in range(2)] == [[0, 512], [1024, 1536]]
    assert [mae_decay.block_starts(64, 512, r, 2) for r in range(2)] == [[], [0]]
