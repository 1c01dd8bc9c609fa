"""Nothing a run writes is lost to another run, a signal or a full disk: diffusion_decay.py, probe.py
and linear_theory.py (tests/test_outdir_safety.py checks mae_decay.py the same way).

Each case on real files and real processes: an out-dir of another script or of other settings is
refused before a single file changes; an unreadable or malicious checkpoint is refused before
config.json is rewritten; two runs into one out-dir cannot both write (a lock, and a stale lock taken
over); SIGTERM sent to a real child process ends it with one line and exit code 143 (a training run
checkpoints first, and --resume then reproduces the uninterrupted run bit for bit); a full (tiny
tmpfs) filesystem gives one sentence and leaves the previous file whole. CPU only; files only under
tmp_path (and a tmpfs mounted there, where the machine lets the test mount one)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import diffusion_decay as d  # noqa: E402
import linear_theory as lt  # noqa: E402
import probe  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is as fast as two and does not fight other work
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
BASE = ["--img-size", "8", "--patch-size", "2", "--embed-dim", "32", "--depth", "4", "--num-heads", "2",
        "--batch-size", "32", "--base-lr", "4e-3", "--warmup-epochs", "0.5", "--probe-epochs", "3", "--eval-every", "0",
        "--fd-samples", "48", "--ref-epochs", "1", "--sample-steps", "2", "--feature-t", "0", "--no-plots",
        "--device", "cpu", "--log-every", "1", "--train-limit", "64", "--epochs", "1"]
TINY = BASE + ["--skips", "on", "--alpha-min", "1.0"]
STUDY = BASE + ["--study", "--dataset", "shapes", "--no-download"]  # typed flags win over the study's CIFAR-10 settings
RUN = "skipson_alpha1_seed0"  # the one run folder of TINY


def tree(root):
    """Every file under root with its size and modification time: what a refused command must not change."""
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(root) for f in files}


def one_error(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished TINY run, made once; each test works on its own copy (copy_run)."""
    out = tmp_path_factory.mktemp("diffusion") / "out"
    assert d.cli(TINY + ["--out-dir", str(out)]) == 0
    return out


def copy_run(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


# --- diffusion_decay.py: whose out-dir is it? -----------------------------------------------

def test_config_json_names_the_script_and_the_settings(finished):
    config = json.loads((finished / "config.json").read_text())
    assert config["script"] == "diffusion_decay.py" and config["skips"] == "on" and config["alpha_min"] == "1.0"
    assert not (finished / ".lock").exists()  # released at the end


@pytest.mark.parametrize("config", [
    {"script": "mae_decay.py", "epochs": 1},  # stamped by another script
    {"mask_ratio": 0.75, "decoder": "skip", "epochs": 1},  # an older, unstamped config.json of mae_decay.py
    ["not", "a", "config"],
])
@pytest.mark.parametrize("study", [False, True])
@pytest.mark.parametrize("resume", [False, True])
def test_an_out_dir_of_another_script_is_refused_before_anything_changes(tmp_path, capsys, config, study, resume):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    (out / "results.json").write_text('{"runs": []}')
    before = tree(tmp_path)
    assert d.cli((STUDY if study else TINY) + ["--out-dir", str(out)] + (["--resume"] if resume else [])) == 2
    assert "holds a run of" in one_error(capsys) and tree(tmp_path) == before


@pytest.mark.parametrize("changed", [["--epochs", "2"], ["--time-dist", "logit-normal"], ["--alpha-min", "0.5"],
                                     ["--skips", "off"], ["--seeds", "1"], ["--alpha-eff", "0.5"]])
def test_other_settings_are_refused_before_config_json_is_rewritten(finished, tmp_path, capsys, changed):
    out = copy_run(finished, tmp_path)
    before = tree(tmp_path)
    flags = (BASE + ["--skips", "on"] if changed[0] == "--alpha-eff" else TINY) + changed  # --alpha-eff: instead of --alpha-min
    assert d.cli(flags + ["--out-dir", str(out), "--resume"]) == 2
    error = one_error(capsys)
    assert "holds a run with other settings" in error and f"--{changed[0][2:]}" in error and tree(tmp_path) == before


def test_a_study_is_refused_in_a_plain_runs_out_dir(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    before = tree(tmp_path)
    assert d.cli(STUDY + ["--out-dir", str(out), "--resume"]) == 2
    assert "holds a run with other settings" in one_error(capsys) and tree(tmp_path) == before


def test_the_same_settings_resume_and_evaluation_knobs_may_change(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    assert d.cli(TINY + ["--out-dir", str(out), "--resume", "--knn-k", "5"]) == 0  # evaluation only: allowed
    assert json.loads((out / "config.json").read_text())["knn_k"] == 5


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("content", ["garbage", "pickle"])
@pytest.mark.parametrize("file", ["ckpt", "fd_reference"])
def test_an_unreadable_or_malicious_file_is_refused_before_config_json_is_rewritten(finished, tmp_path, capsys,
                                                                                   content, file):
    out = copy_run(finished, tmp_path)
    path = out / RUN / "ckpt.pt" if file == "ckpt" else out / "fd_reference_shapes_8px.pt"
    if content == "garbage":
        path.write_bytes(b"not a checkpoint")
    else:  # a pickle that would run code: weights_only refuses it; we say so in our words
        torch.save({"config": {}, "payload": Evil()}, path)
    before = tree(tmp_path)
    assert d.cli(TINY + ["--out-dir", str(out), "--resume"]) == 2
    error = one_error(capsys)
    assert ("is not a readable checkpoint of this script" if file == "ckpt" else "is unreadable") in error
    assert "weights_only" not in error and tree(tmp_path) == before


# --- diffusion_decay.py: one run at a time --------------------------------------------------

@pytest.mark.parametrize("study", [False, True])
def test_a_live_lock_is_refused_and_a_dead_one_taken_over(tmp_path, capsys, study):
    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{d.socket.gethostname()} {sleeper.pid}")
        before = tree(tmp_path)
        assert d.cli((STUDY if study else TINY) + ["--out-dir", str(out)]) == 2
        error = one_error(capsys)
        assert "is in use by another run" in error and str(sleeper.pid) in error and tree(tmp_path) == before
    finally:
        sleeper.kill()
        sleeper.wait()
    if study:
        return  # the study takes the lock as above; taking over a dead one is the same code, run below
    # the holder is gone (and reaped): its lock is taken over, saying so, and released at the end
    assert d.cli(TINY + ["--out-dir", str(out)]) == 0
    assert f"taking over the lock of process {sleeper.pid}" in capsys.readouterr().out
    assert not (out / ".lock").exists() and (out / "results.json").exists()


def test_two_runs_at_once_the_second_is_refused(tmp_path):
    out = tmp_path / "out"
    with d.out_dir_lock(str(out)):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "diffusion_decay.py")] + TINY + ["--out-dir", str(out)],
                              capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 2 and "is in use by another run" in proc.stderr and "Traceback" not in proc.stderr
        assert os.listdir(out) == [".lock"]
    assert os.listdir(out) == []


# --- diffusion_decay.py: SIGTERM ------------------------------------------------------------

def test_sigterm_checkpoints_exits_143_and_resume_reproduces_the_run(tmp_path):
    """A real SIGTERM to a real child process, sent once it is training (a step's loss is logged),
    then --resume: the losses and the evaluation equal an uninterrupted run's, bit for bit."""
    flags = TINY + ["--train-limit", "512", "--epochs", "3", "--ckpt-every", "100"]  # 48 steps
    script = [sys.executable, os.path.join(ROOT, "diffusion_decay.py")]
    full = subprocess.run(script + flags + ["--out-dir", str(tmp_path / "full")], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen(script + flags + ["--out-dir", str(tmp_path / "part")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    err = ""
    while "loss=" not in err and time.time() < deadline:  # a progress line with a loss: a step is done
        err += proc.stderr.read(1)
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    err += rest
    assert proc.returncode == 143, err
    last = [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert last.startswith("interrupted (SIGTERM) at step ") and "--resume" in last and "Traceback" not in err
    step = int(last.split("at step ")[1].split("/")[0])
    assert 0 < step < 48  # it stopped mid-run, between two steps
    assert not (tmp_path / "part" / ".lock").exists()
    resumed = subprocess.run(script + flags + ["--out-dir", str(tmp_path / "part"), "--resume"], capture_output=True,
                             text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    runs = [json.loads((tmp_path / name / "results.json").read_text())["runs"][0] for name in ("full", "part")]
    assert runs[0]["losses"] == runs[1]["losses"] and len(runs[0]["losses"]) == 48  # bit for bit
    assert (runs[0]["knn"], runs[0]["fd"]) == (runs[1]["knn"], runs[1]["fd"])


# --- full disk --------------------------------------------------------------------------------

def fill(folder, leave=0):
    """Fills the filesystem of folder with one file, to the last byte it takes, then frees `leave` bytes."""
    with open(os.path.join(folder, "filler"), "wb", buffering=0) as f:
        for size in (4096, 512, 1):
            try:
                while True:
                    f.write(b"x" * size)
            except OSError:
                pass
        f.truncate(max(0, f.tell() - leave))


def test_diffusion_full_disk_is_one_sentence_and_the_previous_checkpoint_stays_whole(small_fs):
    path = str(small_fs / "ckpt.pt")
    small = {"step": 1, "weights": torch.arange(1000.0)}
    d.atomic_save(small, path)
    with pytest.raises(d.UserError, match=r"could not write .*ckpt.pt \(No space left on device\); free some disk space"):
        d.atomic_save({"step": 2, "weights": torch.zeros(200_000)}, path)  # 800 KB into 256 KiB
    assert os.listdir(small_fs) == ["ckpt.pt"]  # no temporary file left
    assert torch.equal(torch.load(path, weights_only=True)["weights"], small["weights"])


def test_diffusion_full_disk_during_a_run_ends_with_one_line(small_fs, capsys):
    assert d.cli(TINY + ["--out-dir", str(small_fs / "out")]) == 2  # the reference CNN's cache alone is ~390 KB
    err = capsys.readouterr().err
    error = err.replace("\r", "\n").splitlines()[-1]  # after the progress bar, one line
    assert error.startswith("error: could not write") and "No space left on device" in error and "Traceback" not in err
    assert not [f for f in os.listdir(small_fs / "out") if ".tmp" in f or f in ("config.json", ".lock")]


def features_file(path, n=300, dim=10, seed=0):
    gen = np.random.default_rng(seed)
    np.savez(path, train_features=gen.normal(size=(n, dim)).astype(np.float32), train_labels=gen.integers(0, 3, n),
             test_features=gen.normal(size=(n // 3, dim)).astype(np.float32), test_labels=gen.integers(0, 3, n // 3))
    return str(path)


@pytest.mark.parametrize("output", ["--json", "--plot"])
def test_probe_full_disk_is_one_sentence_and_the_previous_file_stays_whole(small_fs, tmp_path, capsys, output):
    features = features_file(tmp_path / "f.npz")
    target = small_fs / ("results.json" if output == "--json" else "spectra.png")
    argv = [features, "--knn-k", "5", "--probe-epochs", "2", output, str(target)]
    assert probe.main(argv) == 0
    previous = target.read_bytes()
    fill(small_fs)
    capsys.readouterr()
    assert probe.main(argv) == 2
    error = one_error(capsys)
    assert error.startswith(f"error: could not write {target} (No space left on device)") and "is intact" in error
    assert target.read_bytes() == previous and sorted(os.listdir(small_fs)) == sorted(["filler", target.name])


LT_ALIGN = ["align", "--img-size", "8", "--train-limit", "200", "--ks", "4", "--corruptions", "none", "--device", "cpu"]


def test_linear_theory_full_disk_is_one_sentence_and_the_previous_file_stays_whole(small_fs, capsys):
    out = small_fs / "out"
    assert lt.main(LT_ALIGN + ["--out-dir", str(out)]) == 0
    previous = {name: (out / name).read_bytes() for name in ("alignment.json", "alignment.png")}
    assert json.loads(previous["alignment.json"])["script"] == "linear_theory.py"
    fill(small_fs, leave=8192)  # room for the lock file, not for the figure
    capsys.readouterr()
    assert lt.main(LT_ALIGN + ["--out-dir", str(out)]) == 2
    error = one_error(capsys)
    assert error.startswith("error: could not write") and "No space left on device" in error and "is intact" in error
    assert {name: (out / name).read_bytes() for name in previous} == previous
    assert sorted(os.listdir(out)) == ["alignment.json", "alignment.png"]  # no temporary file, no lock left


@pytest.mark.parametrize("script", ["diffusion_decay.py", "linear_theory.py"])
def test_a_full_disk_when_taking_the_lock_is_one_sentence_and_leaves_no_lock(small_fs, capsys, script):
    fill(small_fs)
    out = small_fs / "out"
    if script == "diffusion_decay.py":
        assert d.cli(TINY + ["--out-dir", str(out)]) == 2
    else:
        assert lt.main(LT_ALIGN + ["--out-dir", str(out)]) == 2
    error = one_error(capsys)
    assert error.startswith(f"error: could not write {out}/.lock (No space left on device)"), error
    assert not out.exists() or os.listdir(out) == []  # an empty lock left behind would refuse the next run as "in use by process 0"


# --- linear_theory.py: one run at a time, never into a training run's out-dir -----------------

def test_linear_theory_two_runs_into_one_out_dir_the_second_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    with lt.out_dir_lock(str(out)):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "linear_theory.py")] + LT_ALIGN + ["--out-dir", str(out)],
                              capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 2 and "is in use by another run" in proc.stderr and proc.stderr.count("\n") == 1
        assert os.listdir(out) == [".lock"]
    assert os.listdir(out) == []
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sleeper.kill()
    sleeper.wait()
    (out / ".lock").write_text(f"{lt.socket.gethostname()} {sleeper.pid}")  # left by a process that is gone
    assert lt.main(LT_ALIGN + ["--out-dir", str(out)]) == 0
    assert f"taking over the lock of process {sleeper.pid}" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["alignment.json", "alignment.png"]


@pytest.mark.parametrize("config", [{"script": "diffusion_decay.py"}, {"mask_ratio": 0.75}, ["not", "a", "dict"]])
def test_linear_theory_refuses_a_training_runs_out_dir_before_anything_changes(tmp_path, capsys, config):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    before = tree(tmp_path)
    assert lt.main(LT_ALIGN + ["--out-dir", str(out)]) == 2
    error = one_error(capsys)
    assert "holds a run of" in error and ("diffusion_decay.py" in error or "another program" in error)
    assert tree(tmp_path) == before


# --- probe.py and linear_theory.py: SIGTERM ---------------------------------------------------

def test_probe_sigterm_ends_with_one_line_and_exit_143(tmp_path):
    features = features_file(tmp_path / "big.npz", n=6000, dim=64)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "probe.py"), features, "--probe-epochs", "5000",
                             "--json", str(tmp_path / "r.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    assert "6000 train and 2000 test samples" in proc.stdout.readline()  # evaluating now
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err == "terminated (SIGTERM); only the files reported as written were written\n", err
    assert not (tmp_path / "r.json").exists()


def test_linear_theory_sigterm_ends_with_one_line_and_exit_143(tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "linear_theory.py"), "verify"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().startswith("verify on")  # started computing
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.count("\n") == 1 and err.startswith("terminated (SIGTERM)"), err
