"""Tests for diffusion_decay.py's study mode (--study): the pure statistics against independent
statements (the standard library, closed forms, Monte Carlo), the report on hand-made runs, and the
whole study end to end on the CPU at a tiny size."""
import json
import math
import os
import statistics
import sys

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import diffusion_decay as d  # noqa: E402

TINY_STUDY = ["--study", "--study-arms", "plain,decay", "--seeds", "0,1", "--dataset", "shapes", "--img-size", "8",
              "--patch-size", "2", "--embed-dim", "32", "--depth", "4", "--num-heads", "2", "--batch-size", "32",
              "--epochs", "1", "--train-limit", "64", "--fd-samples", "32", "--ref-epochs", "1", "--sample-steps", "1",
              "--feature-t", "0.1", "--probe-epochs", "2", "--knn-k", "5", "--device", "cpu", "--log-every", "1"]


# --------------------------------------------------------------------------- the pure statistics

def test_mean_and_std_is_the_sample_mean_and_sample_std():
    values = [0.25, 1.5, -2.0, 3.125]
    mean, std = d.mean_and_std(values)
    assert mean == pytest.approx(statistics.fmean(values), abs=1e-15)
    assert std == pytest.approx(statistics.stdev(values), abs=1e-15)  # n - 1 in the denominator
    assert d.mean_and_std([4.0]) == (4.0, None)


def test_paired_differences_pair_by_seed_not_by_position():
    arm, baseline = {2: 10.0, 0: 7.0, 1: 5.0}, {0: 6.0, 1: 5.5, 3: 99.0}
    assert d.paired_differences(arm, baseline) == [1.0, -0.5]  # seeds 0 and 1; seeds 2 and 3 have no partner


def test_the_seed_spread_rule_and_its_false_alarm_rate():
    assert d.exceeds_seed_spread([1.0, 1.2]) is True  # mean 1.1, std 0.14
    assert d.exceeds_seed_spread([1.0, -0.4]) is False  # mean 0.3, std 0.99
    assert d.exceeds_seed_spread([0.5]) is None  # one seed: no spread
    assert d.exceeds_seed_spread([0.0, 0.0]) is False and d.exceeds_seed_spread([0.3, 0.3]) is True
    # the docstring's false-alarm rates, for differences that are pure noise: closed forms of Student's t
    # (1 degree of freedom: P(|T| > c) = 1 - 2 atan(c) / pi; 2: 1 - c / sqrt(2 + c^2)), c = 2 sqrt(n) ...
    assert 1 - 2 * math.atan(2 * math.sqrt(2)) / math.pi == pytest.approx(0.22, abs=0.005)
    assert 1 - 2 * math.sqrt(3) / math.sqrt(2 + 12) == pytest.approx(0.074, abs=0.0005)
    # ... and the rule itself on 20,000 noise draws per seed count (binomial standard error <= 0.003)
    noise = np.random.default_rng(0).standard_normal((20_000, 3))
    for n, rate in ((2, 0.22), (3, 0.074)):
        fired = np.mean([d.exceeds_seed_spread(list(row[:n])) for row in noise])
        assert abs(fired - rate) < 0.012, (n, fired)


def test_verdict_line_says_which_differences_exceed_the_spread_in_words():
    line = d.verdict_line("B", "A", [("FD", [-2.0, -2.2]), ("k-NN", [0.01, -0.01])])
    assert line.startswith("B vs A: beyond the seed spread: FD lower by 2.1 (paired std 0.14).")
    assert "Within it (no claim): k-NN (+0 +- 0.014)." in line
    assert "one seed" in d.verdict_line("B", "A", [("FD", [-2.0])])
    assert "beyond the seed spread: nothing" in d.verdict_line("B", "A", [("FD", [1.0, -1.0])])


def fake_run(skips, alpha_min, seed, fd, knn):
    return {"skips": skips, "alpha_min": alpha_min, "seed": seed, "fd": fd, "fd_cfg": fd / 2, "fd_cfg_scale": 1.5,
            "knn": {5: knn}, "knn_k": 5, "linear_probe": knn + 0.1, "effective_rank": 3.0 + seed,
            "effective_rank_centered": 4.0, "last_epoch_loss": 0.5, "seconds": 10.0 + seed}


def test_the_report_of_hand_made_runs():
    arms = [d.STUDY_ARMS[n] for n in ("plain", "skips", "decay")]
    runs = [fake_run(False, 1.0, 0, 30.0, 0.30), fake_run(False, 1.0, 1, 32.0, 0.34),
            fake_run(True, 1.0, 0, 25.0, 0.31), fake_run(True, 1.0, 1, 27.5, 0.33),
            fake_run(True, 0.8, 1, 24.0, 0.36), fake_run(True, 0.8, 0, 22.0, 0.30)]  # seeds out of order on purpose
    text, summary = d.study_report(runs, arms)
    lines = text.splitlines()
    assert lines[2].split()[:6] == ["plain", "DiT", "off", "1", "2", "31.0000+-1.4142"]  # mean +- sample std of 30, 32
    assert "FD (CFG 1.5)" in lines[0] and "15.5000+-0.7071" in lines[2]
    assert [p["arm"] + " - " + p["reference"] for p in summary["pairs"] if p["metric"] == "FD (no guidance)"] == \
        ["+ long skips - plain DiT", "+ long skips + decay - plain DiT", "+ long skips + decay - + long skips"]
    decay = next(p for p in summary["pairs"] if p["metric"] == "FD (no guidance)" and p["reference"] == "plain DiT"
                 and p["arm"].endswith("decay"))
    assert decay["differences"] == [22.0 - 30.0, 24.0 - 32.0] and decay["std"] == 0.0 and decay["exceeds_seed_spread"]
    skips = next(p for p in summary["pairs"] if p["metric"] == "k-NN@5" and p["arm"] == "+ long skips")
    assert skips["differences"] == pytest.approx([0.01, -0.01]) and skips["exceeds_seed_spread"] is False
    assert not any(p["metric"] == "train s" for p in summary["pairs"])  # time is reported, not judged
    assert summary["arms"]["plain DiT"]["train s"] == {"mean": 10.5, "std": pytest.approx(0.7071, abs=1e-4), "values": [10.0, 11.0]}
    assert len(summary["verdicts"]) == 3 and all(f"* {v}" in text for v in summary["verdicts"])
    assert "FD (no guidance) lower by 8" in summary["verdicts"][1]


# --------------------------------------------------------------------------- the command line

def test_study_settings_are_a_layer_that_typed_flags_override():
    cfg = d.parse_config(["--study"])
    assert (cfg.dataset, cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.class_cond) == ("cifar10", 32, 2, 384, 12, True)
    assert (cfg.cfg_scale, cfg.fd_cfg_scale, cfg.epochs, cfg.fd_samples, cfg.seeds) == (1.0, 1.5, 3, 2000, "0,1")
    assert d.comparison(cfg) == [(False, 1.0), (True, 1.0), (True, 0.8)]  # the paper's three rows, baseline first
    assert d.parse_config(["--study", "--epochs", "2"]).epochs == 2
    assert d.parse_config(["--study", "--study-arms", "skips,plain"]).study_arms == "skips,plain"
    with pytest.raises(d.UserError, match="drop --skips and --alpha-min"):
        d.parse_config(["--study", "--skips", "on", "--alpha-min", "0.5"])
    with pytest.raises(d.UserError, match="--study-arms must be"):
        d.parse_config(["--study", "--study-arms", "plain,plain"])
    with pytest.raises(d.UserError, match="--fd-cfg-scale needs"):
        d.parse_config(["--fd-cfg-scale", "1.5"])
    assert "--study --compile --data-dir DATA" in d.__doc__


# --------------------------------------------------------------------------- end to end

def test_the_study_end_to_end_on_cpu(tmp_path, capsys, monkeypatch):
    guidance = []
    real_generation_fd = d.generation_fd

    def generation_fd(model, cfg, *rest):
        guidance.append(cfg.cfg_scale)
        return real_generation_fd(model, cfg, *rest)

    monkeypatch.setattr(d, "generation_fd", generation_fd)
    out = tmp_path / "study"
    results = d.main(TINY_STUDY + ["--out-dir", str(out)])
    text = capsys.readouterr().out
    assert len(results) == 4 and guidance == [1.0, 1.5] * 4  # every run: unguided, then CFG 1.5
    assert "plain DiT" in text and "+ long skips + decay - plain DiT" in text and "* + long skips + decay vs plain DiT:" in text
    assert "FD floor: real vs real" in text and "32 training images vs the 2000 test images" in text
    summary = json.loads((out / "results.json").read_text())
    assert summary["complete"] is True and len(summary["runs"]) == 4
    by_key = {(r["skips"], r["alpha_min"], r["seed"]): r for r in summary["runs"]}
    fd_pair = next(p for p in summary["study"]["pairs"] if p["metric"] == "FD (no guidance)")
    assert fd_pair["differences"] == [by_key[(True, 0.8, s)]["fd"] - by_key[(False, 1.0, s)]["fd"] for s in (0, 1)]
    assert summary["study"]["arms"]["plain DiT"]["FD (CFG 1.5)"]["values"] == [by_key[(False, 1.0, s)]["fd_cfg"] for s in (0, 1)]
    assert summary["study"]["verdicts"][0].startswith("+ long skips + decay vs plain DiT:")
    assert (out / "samples.png").exists() and (out / "curves.png").exists()
    assert summary["config"]["compile_mode"] == "eager" and summary["config"]["study"] is True


def test_a_study_stopped_early_keeps_its_finished_runs(tmp_path, monkeypatch):
    real_train_run, calls = d.train_run, []

    def train_run(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train_run(*args)

    monkeypatch.setattr(d, "train_run", train_run)
    out = tmp_path / "study"
    assert d.cli(TINY_STUDY + ["--out-dir", str(out), "--no-plots"]) == 130
    summary = json.loads((out / "results.json").read_text())
    assert summary["complete"] is False and [(r["skips"], r["seed"]) for r in summary["runs"]] == [(False, 0), (False, 1)]


def test_study_benchmark_times_every_arm_and_projects_the_training_time(capsys):
    result = d.main(TINY_STUDY + ["--benchmark", "--study-arms", "plain,skips,decay"])
    assert list(result["arms"]) == ["plain DiT", "+ long skips", "+ long skips + decay"]
    steps = 2 * 1 * (64 // 32)  # seeds x epochs x steps per epoch, per arm
    assert result["projected_train_seconds"] == pytest.approx(sum(steps * t["ms_per_step"] / 1000 for t in result["arms"].values()))
    assert "study training, projected: 3 arms x 2 seeds x 1 epochs x 2 steps" in capsys.readouterr().out
