"""Nothing a run writes is ever lost to another run, a signal or a full disk (mae_decay.py).

Each case on real files and real processes: an out-dir of another script or of other settings is
refused before a single file changes; two runs into one out-dir cannot both write (a lock, and a
stale lock taken over); SIGTERM sent to a real child process checkpoints, exits 143 with one line,
and --resume then reproduces the uninterrupted run bit for bit; a full (tiny tmpfs) filesystem
gives one sentence and leaves the previous checkpoint whole; a read-only --data-dir that already
holds the data is accepted. CPU only; files only under tmp_path (and a tmpfs mounted there, where
the machine lets the test mount one)."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import mae_decay as m  # noqa: E402

TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "4", "--num-heads", "2",
        "--decoder-dim", "32", "--decoder-depth", "2", "--decoder-heads", "2", "--batch-size", "32",
        "--base-lr", "2e-3", "--warmup-epochs", "0.5", "--probe-epochs", "3", "--eval-every", "0",
        "--no-plots", "--no-pixels", "--device", "cpu", "--log-every", "1", "--alpha-min", "1.0",
        "--train-limit", "64", "--epochs", "1"]


def tree(root):
    """Every file under root with its size and modification time: what a refused command must not change."""
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(root) for f in files}


def one_error(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def finished_run(tmp_path, name="out", *extra):
    out = tmp_path / name
    assert m.cli(TINY + ["--out-dir", str(out)] + list(extra)) == 0
    return out


# --- whose out-dir is it? -------------------------------------------------------------------

def test_config_json_names_the_script_and_the_settings(tmp_path):
    out = finished_run(tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["script"] == "mae_decay.py" and config["epochs"] == 1 and config["alpha_min"] == "1.0"
    assert not (out / ".lock").exists()  # released at the end


@pytest.mark.parametrize("config", [
    {"script": "diffusion_decay.py", "epochs": 1},  # stamped by another script
    {"script": "mae_decay.py --study", "epochs": 1},  # a study's out-dir: its runs live in sub-folders
    {"skips": "on", "time_dist": "uniform", "epochs": 1},  # an older, unstamped config.json of another script
    ["not", "a", "config"],
])
@pytest.mark.parametrize("resume", [False, True])
def test_an_out_dir_of_another_script_is_refused_before_anything_changes(tmp_path, capsys, config, resume):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    (out / "results.json").write_text('{"runs": []}')
    before = tree(tmp_path)
    assert m.cli(TINY + ["--out-dir", str(out)] + (["--resume"] if resume else [])) == 2
    assert "holds a run of" in one_error(capsys) and tree(tmp_path) == before


def test_a_study_into_a_plain_runs_out_dir_is_refused_before_anything_changes(tmp_path, capsys):
    out = finished_run(tmp_path)
    capsys.readouterr()
    before = tree(tmp_path)
    assert m.cli(TINY + ["--out-dir", str(out), "--study", "--study-arms", "1.0,0.7", "--seeds", "0,1"]) == 2
    assert "holds a run of mae_decay.py (see its config.json)" in one_error(capsys) and tree(tmp_path) == before


@pytest.mark.parametrize("changed", [["--epochs", "2"], ["--mask-ratio", "0.5"], ["--alpha-min", "0.7"], ["--seeds", "1"]])
def test_other_settings_are_refused_before_config_json_is_rewritten(tmp_path, capsys, changed):
    out = finished_run(tmp_path)
    capsys.readouterr()
    before = tree(tmp_path)
    assert m.cli(TINY + ["--out-dir", str(out), "--resume"] + changed) == 2
    error = one_error(capsys)
    assert "holds a run with other settings" in error and f"--{changed[0][2:]}" in error and tree(tmp_path) == before


def test_the_same_settings_resume_and_evaluation_knobs_may_change(tmp_path, capsys):
    out = finished_run(tmp_path)
    assert m.cli(TINY + ["--out-dir", str(out), "--resume", "--knn-k", "5"]) == 0  # evaluation only: allowed
    assert json.loads((out / "config.json").read_text())["knn_k"] == 5


@pytest.mark.parametrize("content", ["garbage", "pickle"])
def test_an_unreadable_or_malicious_checkpoint_is_refused_before_config_json_is_rewritten(tmp_path, capsys, content):
    out = finished_run(tmp_path)
    ckpt = out / "alpha1_seed0" / "ckpt.pt"
    if content == "garbage":
        ckpt.write_bytes(b"not a checkpoint")
    else:  # a pickle that would run code: weights_only refuses it; we say so in our words
        torch.save({"config": {}, "payload": Evil()}, ckpt)
    capsys.readouterr()
    before = tree(tmp_path)
    assert m.cli(TINY + ["--out-dir", str(out), "--resume"]) == 2
    error = one_error(capsys)
    assert "is not a readable checkpoint of this script" in error and "weights_only" not in error
    assert tree(tmp_path) == before


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


# --- one run at a time ----------------------------------------------------------------------

def test_a_live_lock_is_refused_and_a_dead_one_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{m.socket.gethostname()} {sleeper.pid}")
        before = tree(tmp_path)
        assert m.cli(TINY + ["--out-dir", str(out)]) == 2
        error = one_error(capsys)
        assert "is in use by another run" in error and str(sleeper.pid) in error and tree(tmp_path) == before
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone (and reaped): its lock is taken over, saying so, and released at the end
    assert m.cli(TINY + ["--out-dir", str(out)]) == 0
    assert f"taking over the lock of process {sleeper.pid}" in capsys.readouterr().out
    assert not (out / ".lock").exists() and (out / "results.json").exists()


def test_two_runs_at_once_the_second_is_refused(tmp_path):
    out = tmp_path / "out"
    with m.out_dir_lock(str(out)):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "mae_decay.py")] + TINY + ["--out-dir", str(out)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert proc.returncode == 2 and "is in use by another run" in proc.stderr and "Traceback" not in proc.stderr
        assert os.listdir(out) == [".lock"]
    assert os.listdir(out) == []


# --- SIGTERM --------------------------------------------------------------------------------

def test_sigterm_checkpoints_exits_143_and_resume_reproduces_the_run(tmp_path):
    """A real SIGTERM to a real child process, sent once it is training (a step's loss is logged;
    before that it would end with "not during a training step"), then --resume: the losses equal an uninterrupted run's, bit for bit."""
    flags = TINY[:-4] + ["--train-limit", "256", "--epochs", "6", "--ckpt-every", "100", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    script = [sys.executable, os.path.join(ROOT, "mae_decay.py")]
    full = subprocess.run(script + flags + ["--out-dir", str(tmp_path / "full")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen(script + flags + ["--out-dir", str(tmp_path / "part")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    err = ""
    while "loss=" not in err and time.time() < deadline:  # a progress line with a loss: a step is done
        err += proc.stderr.read(1)
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    err += rest
    assert proc.returncode == 143, err
    last = [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert last.startswith("interrupted (SIGTERM) at step ") and "--resume" in last
    step = int(last.split("at step ")[1].split("/")[0])
    assert 0 < step < 48  # it stopped mid-run, between two steps
    resumed = subprocess.run(script + flags + ["--out-dir", str(tmp_path / "part"), "--resume"], capture_output=True,
                             text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    runs = [json.loads((tmp_path / name / "results.json").read_text())["runs"][0] for name in ("full", "part")]
    assert runs[0]["losses"] == runs[1]["losses"] and runs[0]["knn"] == runs[1]["knn"]  # bit for bit


# --- full disk, read-only data --------------------------------------------------------------

def test_a_full_disk_is_one_sentence_and_the_previous_checkpoint_stays_whole(small_fs):
    path = str(small_fs / "ckpt.pt")
    small = {"step": 1, "weights": torch.arange(1000.0)}
    m.atomic_save(small, path)
    with pytest.raises(m.UserError, match=r"could not write .*ckpt.pt \(No space left on device\); free some disk space"):
        m.atomic_save({"step": 2, "weights": torch.zeros(200_000)}, path)  # 800 KB into 256 KiB
    assert os.listdir(small_fs) == ["ckpt.pt"]  # no temporary file left
    assert torch.equal(torch.load(path, weights_only=True)["weights"], small["weights"])
    with pytest.raises(m.UserError, match="No space left on device"):
        m.write_json(str(small_fs / "results.json"), {"x": "y" * 400_000})
    assert os.listdir(small_fs) == ["ckpt.pt"]


def test_a_full_disk_during_training_ends_with_one_line(small_fs, capsys):
    assert m.cli(TINY + ["--out-dir", str(small_fs / "out")]) == 2
    err = capsys.readouterr().err
    error = err.replace("\r", "\n").splitlines()[-1]  # after the progress bar, one line
    assert error.startswith("error: could not write") and "No space left on device" in error and "Traceback" not in err
    assert not [f for f in os.listdir(small_fs / "out") if ".tmp" in f]


def test_a_read_only_data_dir_that_holds_cifar_is_accepted(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(data)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        folder = data / "cifar-10-batches-py"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            with open(folder / name, "wb") as f:
                m.pickle.dump({b"data": rng.integers(0, 256, (40, 3072), dtype=np.uint8),
                               b"labels": rng.integers(0, 10, 40).tolist()}, f)
        subprocess.run(["mount", "-o", "remount,ro", str(data)], check=True)
        assert not os.access(data, os.W_OK)  # read-only even for root
        flags = TINY[:-4] + ["--dataset", "cifar10", "--data-dir", str(data), "--no-download", "--img-size", "16",
                             "--train-limit", "64", "--epochs", "1", "--out-dir", str(tmp_path / "out")]
        assert m.cli(flags) == 0, capsys.readouterr().err
        assert dataclasses.asdict(m.parse_config(flags))["data_dir"] == str(data)
    finally:
        subprocess.run(["umount", str(data)], check=False)


def test_an_out_dir_that_cannot_be_created_is_one_sentence(tmp_path, capsys):
    (tmp_path / "afile").write_text("a regular file")
    with pytest.raises(m.UserError, match=r"could not create .*afile/out/.lock \(Not a directory\); choose another"):
        with m.out_dir_lock(str(tmp_path / "afile" / "out")):
            pass
    if os.path.isdir("/proc") and os.access("/proc", os.W_OK):  # root: /proc looks writable but refuses new folders
        assert m.cli(TINY + ["--out-dir", "/proc/no-such-run"]) == 2
        assert "could not create /proc/no-such-run/.lock" in one_error(capsys)
