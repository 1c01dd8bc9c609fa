"""Tests for mae_decay.py's study (--study): the paired-difference rule against hand-made numbers,
the budget arithmetic against a hand count, the authors' probe schedule against their formula, and
the whole study end to end on the CPU (2 arms x 2 seeds x 1 epoch, 2 worker processes), its table
and JSON checked against a recomputation from each run's own results.json."""
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import mae_decay as m  # noqa: E402
import probe  # noqa: E402

TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "4", "--num-heads", "2",
        "--decoder-dim", "32", "--decoder-depth", "2", "--decoder-heads", "2", "--batch-size", "32",
        "--base-lr", "2e-3", "--warmup-epochs", "0.5", "--probe-epochs", "3", "--eval-every", "0",
        "--no-plots", "--device", "cpu", "--log-every", "1", "--train-limit", "256"]


# --------------------------------------------------------------------------- the verdict rule

def test_paired_difference_pairs_by_seed_and_applies_the_two_standard_error_rule():
    # diffs 0.10, 0.12, 0.11 on seeds 0, 1, 2 (dict order shuffled): mean 0.11, std 0.01, se 0.01/sqrt(3)
    arm = {2: 0.61, 0: 0.60, 1: 0.62}
    base = {0: 0.50, 1: 0.50, 2: 0.50, 7: 0.9}  # seed 7 has no partner and must be ignored
    d = m.paired_difference(arm, base)
    assert d["seeds"] == [0, 1, 2]
    assert d["mean"] == pytest.approx(0.11) and d["std"] == pytest.approx(0.01) and d["se"] == pytest.approx(0.01 / math.sqrt(3))
    assert d["beyond_noise"]
    # diffs +0.1, -0.1, +0.02: mean 0.0067, far inside 2 standard errors
    assert not m.paired_difference({0: 0.1, 1: -0.1, 2: 0.02}, {0: 0.0, 1: 0.0, 2: 0.0})["beyond_noise"]
    # n = 2: beyond exactly when both differences share a sign and are within a factor 3 (|d1+d2| > 2|d1-d2|)
    assert m.paired_difference({0: 0.29, 1: 0.1}, {0: 0.0, 1: 0.0})["beyond_noise"]
    assert not m.paired_difference({0: 0.31, 1: 0.1}, {0: 0.0, 1: 0.0})["beyond_noise"]
    # one seed: no spread, so never beyond it
    one = m.paired_difference({0: 0.9}, {0: 0.1})
    assert one["mean"] == pytest.approx(0.8) and math.isnan(one["std"]) and not one["beyond_noise"]


def fake_run(arm, seed, **metrics):
    values = {key: 0.5 for key, _, _ in m.STUDY_METRICS} | metrics
    blocks = {p: [{"block": b, "knn": 0.1 * b, "knn_centered": 0.1, "linear_probe": 0.2} for b in (1, 2)] for p in ("mean", "cls")}
    return {"arm": arm, "seed": seed, "metrics": values, "blocks": blocks}


def test_study_report_verdict_on_hand_made_numbers():
    # k-NN: skip 0.7 is 0.05 above vanilla on both seeds (beyond); probe: +0.1 / -0.1 (within);
    # against the skip control (alpha_min 1) the k-NN difference is 0.05 / 0.0 (ratio > 3: within)
    runs = [fake_run("vanilla MAE", 0, knn=0.50, linear_probe=0.5), fake_run("vanilla MAE", 1, knn=0.55, linear_probe=0.5),
            fake_run("skip, alpha_min=1", 0, knn=0.50), fake_run("skip, alpha_min=1", 1, knn=0.60),
            fake_run("skip, alpha_min=0.7", 0, knn=0.55, linear_probe=0.6), fake_run("skip, alpha_min=0.7", 1, knn=0.60, linear_probe=0.4)]
    text, comparisons = m.study_report(runs, None, 20)
    pairs = [(c["arm"], c["baseline"]) for c in comparisons]
    assert pairs == [("skip, alpha_min=1", "vanilla MAE"), ("skip, alpha_min=0.7", "vanilla MAE"),
                     ("skip, alpha_min=0.7", "skip, alpha_min=1")]
    decay_vs_vanilla = comparisons[1]["differences"]
    assert decay_vs_vanilla["knn"]["mean"] == pytest.approx(0.05) and decay_vs_vanilla["knn"]["beyond_noise"]
    assert decay_vs_vanilla["linear_probe"]["mean"] == pytest.approx(0.0) and not decay_vs_vanilla["linear_probe"]["beyond_noise"]
    assert not comparisons[2]["differences"]["knn"]["beyond_noise"]
    verdict = next(line for line in text.splitlines() if line.startswith("skip, alpha_min=0.7 vs vanilla MAE"))
    beyond, within = verdict.split("; within it")
    assert "k-NN@20 +0.0500" in beyond and "linear probe" not in beyond and "linear probe" in within
    assert "no difference beyond the seed spread" in next(l for l in text.splitlines() if l.startswith("skip, alpha_min=0.7 vs skip"))
    assert "vanilla MAE: k-NN@20 best at block 2 (0.2000), last block 0.2000" in text  # fake blocks: k-NN 0.1, 0.2
    row = next(line for line in text.splitlines() if line.startswith("vanilla MAE "))
    assert row.split()[2:4] == ["2", "0.5250+-0.0354"]  # 2 seeds; mean +- sample std of 0.50 and 0.55


# --------------------------------------------------------------------------- the budget

def test_size_study_picks_the_largest_plan_that_reaches_the_minimum_epochs():
    # every run: 10 s start + epochs * 2 steps * 0.5 s + 4 s final evaluation = 14 + epochs s
    timing = {a: {"start": 10.0, "ms_per_step": 500.0, "final_eval_seconds": 4.0, "periodic_eval_seconds": 1.0, "concurrent": 2}
              for a in ("A", "B", "C", "D")}
    arms = [(a, a.lower(), {}) for a in ("A", "B", "C", "D")]
    # 2 workers; 4 arms x 3 seeds = 12 runs = 6 rounds: 6 * (14 + E) <= 300 -> E <= 36
    plan_arms, plan_seeds, epochs, lines = m.size_study(timing, arms, [0, 1, 2], 2, 2, 300, (30, 50), 0)
    assert (len(plan_arms), plan_seeds, epochs) == (4, [0, 1, 2], 36)
    # 200 s: 12 runs would get 19 epochs, 9 runs (5 rounds) 26: too few; 4 arms x 2 seeds (4 rounds): 36
    plan_arms, plan_seeds, epochs, _ = m.size_study(timing, arms, [0, 1, 2], 2, 2, 200, (30, 50), 0)
    assert (len(plan_arms), plan_seeds, epochs) == (4, [0, 1], 36)
    # plenty of time: clamped at 50 epochs
    assert m.size_study(timing, arms, [0, 1, 2], 2, 2, 10_000, (30, 50), 0)[2] == 50
    # periodic evaluations count (every 10 epochs + the one at epoch 0): 14 + E + (E // 10 + 1) per run
    assert m.size_study(timing, arms, [0, 1, 2], 2, 2, 300, (30, 50), 10)[2] == 32
    # 30 epochs fit no plan: the smallest (3 arms x 2 seeds, 3 rounds) gets 3 * (14 + E) <= 100 -> 19 epochs,
    # never fewer than a third of the floor, and a line says so
    plan_arms, plan_seeds, epochs, lines = m.size_study(timing, arms, [0, 1, 2], 2, 2, 100, (30, 50), 0)
    assert (len(plan_arms), plan_seeds, epochs) == (3, [0, 1], 19) and "NOT within the budget at 30 epochs" in lines[-1]
    assert m.size_study(timing, arms, [0, 1, 2], 2, 2, 50, (30, 50), 0)[2] == 10
    assert m.size_study(timing, arms, [0, 1, 2], 2, 2, 50, (30, 50), 0, shortest=12)[2] == 12  # e.g. the warm-up epochs


def test_makespan_is_the_greedy_schedule():
    assert m.study_makespan([5, 5, 5, 5], 2) == 10
    assert m.study_makespan([10, 1, 1, 1], 2) == 10
    assert m.study_makespan([3, 3, 3], 1) == 9


# --------------------------------------------------------------------------- the authors' probe

def test_authors_probe_runs_their_schedule_weight_decay_and_batches(monkeypatch):
    """Their eval_model: AdamW(params, 1e-2) (weight decay 0.01), batch 256 with the incomplete batch
    dropped, and after epoch e the lr set to 1e-2 * 0.5 * (1 + cos(pi * e / epochs))."""
    seen = []

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append((self.param_groups[0]["lr"], self.param_groups[0]["weight_decay"]))
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(600, 8, generator=gen), torch.randn(50, 8, generator=gen)
    train_y, test_y = (train_x[:, 0] > 0).long(), (test_x[:, 0] > 0).long()
    settings = {**m.AUTHORS_PROBE, "epochs": 5}
    m.linear_probe(train_x, train_y, test_x, test_y, **settings)
    steps = 600 // 256  # 2 full batches per epoch, the 88 left over dropped
    expected = [1e-2 * 0.5 * (1 + math.cos(math.pi * max(e - 1, 0) / 5)) for e in range(5) for _ in range(steps)]
    assert [lr for lr, _ in seen] == pytest.approx(expected, rel=1e-12)
    assert all(wd == 0.01 for _, wd in seen)
    # the defaults are unchanged: the same number as probe.py's copy, which has no such options
    args = (train_x, train_y, test_x, test_y)
    assert m.linear_probe(*args, epochs=3, batch_size=64, seed=2) == probe.linear_probe(*args, epochs=3, batch_size=64, seed=2)


# --------------------------------------------------------------------------- flags

def test_worker_command_line_round_trips_the_config():
    cfg = m.parse_config(TINY + ["--study", "--seeds", "0,1", "--epochs", "3", "--knn-t", "0.1", "--dataset", "shapes"])
    assert cfg.study_minutes == 0.0  # a typed --epochs turns the sizing off
    worker = m.parse_config(m.worker_argv(cfg, alpha_min="0.7", seeds="1"))
    expected = {**vars(cfg), "study": False, "alpha_eff": "", "vanilla": False, "alpha_min": "0.7", "seeds": "1"}
    assert vars(worker) == expected


@pytest.mark.parametrize("flags,message", [
    (["--study", "--benchmark"], "drop --benchmark"),
    (["--study", "--study-arms", "vanilla,1.5"], "--study-arms"),
    (["--study", "--study-arms", "0.7,0.7"], "distinct"),
    (["--study", "--epochs", "3", "--study-minutes", "2"], "both --epochs and --study-minutes"),
    (["--study", "--study-workers", "0"], "--study-workers"),
])
def test_bad_study_flags_give_one_clear_sentence(flags, message):
    with pytest.raises(m.UserError, match=re.escape(message)):
        m.parse_config(TINY + flags)


# --------------------------------------------------------------------------- end to end

def test_study_end_to_end_on_cpu(tmp_path, capsys):
    """The path a GPU run takes: a concurrent benchmark of each arm, the sizing (a budget so small
    that nothing fits: the smallest plan, 2 arms x 2 seeds, at the CPU's floor of 1 epoch), the
    workers, the table. Then --resume of the finished study rebuilds the same table."""
    out = tmp_path / "study"
    flags = TINY + ["--study", "--study-arms", "vanilla,0.7", "--seeds", "0,1", "--study-minutes", "0.01",
                    "--study-workers", "2", "--out-dir", str(out)]
    result = m.main(flags)
    text = (out / "study.txt").read_text()
    summary = json.loads((out / "study.json").read_text())
    assert summary["epochs"] == 1 and summary["seeds"] == [0, 1] and len(summary["runs"]) == 4
    assert "NOT within the budget at 1 epochs" in summary["sizing"][-2]
    for name in ("vanilla_0", "skip0.7_1"):  # one benchmark worker per arm, all timed at once
        bench = json.loads((out / "benchmark" / f"{name}.json").read_text())
        assert bench["ms_per_step"] > 0 and bench["final_eval_seconds"] > bench["periodic_eval_seconds"] > 0
    table = text.split("\n\n")[0].splitlines()[4:]  # after the two heading lines, the column names and the rule
    assert {line[:40].strip(): line[40:].split()[0] for line in table[:2]} == {"vanilla MAE": "2", "skip, alpha_min=0.7": "2"}
    assert table[2].startswith("raw pixels") and len(table) == 3
    for line in ("skip, alpha_min=0.7 - vanilla MAE", "verdict (rule:", "per encoder block: k-NN@20, cls token"):
        assert line in text
    # each worker trained its own arm and seed, under its own folder
    for folder, decoder, final_norm in (("vanilla", "mae", True), ("skip0.7", "unet", False)):
        for seed in (0, 1):
            config = json.loads((out / f"{folder}_seed{seed}" / "config.json").read_text())
            assert (config["decoder"], config["final_norm"], config["seeds"], config["epochs"]) == (decoder, final_norm, str(seed), 1)
    # per-block numbers for every block, both features; block 4 (mean) is the headline feature
    for run in summary["runs"]:
        for pooling in ("mean", "cls"):
            assert [b["block"] for b in run["blocks"][pooling]] == [1, 2, 3, 4]
            for b in run["blocks"][pooling]:
                assert all(0 <= b[k] <= 1 for k in ("knn", "knn_centered", "linear_probe"))
                assert 1 <= b["effective_rank_centered"] <= 32
        assert abs(run["blocks"]["mean"][-1]["knn"] - run["metrics"]["knn"]) <= 0.01
        assert 0 <= run["metrics"]["authors_probe"] <= 1
    # the paired differences, recomputed by hand from each run's own results.json
    own = {}
    for folder in ("vanilla", "skip0.7"):
        for seed in (0, 1):
            runs = json.loads((out / f"{folder}_seed{seed}" / "results.json").read_text())["runs"]
            trained = next(r for r in runs if r["setting"] != "raw pixels")
            own[folder, seed] = {"knn": trained["knn"]["20"], "linear_probe": trained["linear_probe"],
                                 "effective_rank": trained["effective_rank"], "seconds": trained["seconds"],
                                 "authors_probe": trained["study"]["authors_probe"],
                                 "knn_centered": trained["study"]["blocks"]["mean"][-1]["knn_centered"]}
    (comparison,) = summary["comparisons"]
    assert (comparison["arm"], comparison["baseline"]) == ("skip, alpha_min=0.7", "vanilla MAE")
    for key in ("knn", "linear_probe", "effective_rank", "seconds", "authors_probe", "knn_centered"):
        diffs = [own["skip0.7", s][key] - own["vanilla", s][key] for s in (0, 1)]
        got = comparison["differences"][key]
        assert got["diffs"] == pytest.approx(diffs, abs=1e-12)
        assert got["mean"] == pytest.approx(np.mean(diffs), abs=1e-12)
        assert got["std"] == pytest.approx(np.std(diffs, ddof=1), abs=1e-12)
        assert got["beyond_noise"] == (abs(np.mean(diffs)) > 2 * np.std(diffs, ddof=1) / math.sqrt(2))
    assert result["epochs"] == 1
    # a second run refuses to overwrite, --resume finds every run done and rebuilds the same table
    with pytest.raises(m.UserError, match="--resume"):
        m.main(flags)
    again = m.main(flags + ["--resume"])
    assert again["comparisons"] == result["comparisons"] and again["epochs"] == 1


def test_sigterm_to_the_study_checkpoints_its_workers_exits_143_and_resume_finishes(tmp_path):
    """A real SIGTERM to the study's parent process once its workers train: each worker gets one
    SIGINT, checkpoints and stops; the parent says so in one line and exits 143 (SIGTERM); the same
    command with --resume finishes every run and writes the table."""
    import signal
    import subprocess
    import time
    out = tmp_path / "study"
    flags = TINY + ["--study", "--study-arms", "1.0,0.7", "--seeds", "0,1", "--epochs", "20", "--study-workers", "2",
                    "--knn-k", "5", "--no-pixels", "--out-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    script = [sys.executable, os.path.join(ROOT, "mae_decay.py")]
    proc = subprocess.Popen(script + flags, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    logs = [out / f"skip{a}_seed0" / "worker.log" for a in ("1", "0.7")]  # the first two runs: seed 0 of each arm
    deadline = time.time() + 240
    while time.time() < deadline and not all(log.exists() and "loss=" in log.read_text() for log in logs):
        time.sleep(0.5)  # both workers are past their first logged step
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted (SIGTERM): 2 run(s) stopped") and "--resume" in lines[0]
    assert all((log.parent / f"alpha{a}_seed0" / "ckpt.pt").exists() and not (log.parent / "results.json").exists()
               for log, a in zip(logs, ("1", "0.7")))
    assert not (out / "skip1_seed1").exists()  # the queued runs never started
    resumed = subprocess.run(script + flags + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "study.json").exists() and all((log.parent / "results.json").exists() for log in logs)
