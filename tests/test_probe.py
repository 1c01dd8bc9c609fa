"""Tests for probe.py: k-NN against a brute-force loop; the linear probe on data built so that its
answer is known (separable, shuffled, best epoch != final epoch, a train/test shift that only train
statistics keep); accuracy additive over disjoint test sets; effective rank against closed forms
(an uneven spectrum, a removed mean) and a direct SVD; the subspace projection; every user error
(bad flags from a table, bad files among good ones, image folders) as one sentence that touches
nothing; and agreement with the copies in mae_decay.py. Deterministic, CPU only, files only under
tmp_path."""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mae_decay  # noqa: E402
import probe  # noqa: E402


def random_features(n_train=300, n_test=100, dim=8, classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n_train, dim, generator=gen), torch.randint(0, classes, (n_train,), generator=gen),
            torch.randn(n_test, dim, generator=gen), torch.randint(0, classes, (n_test,), generator=gen))


def brute_force_knn(train_x, train_y, test_x, ks, temperature, num_classes):
    """One query at a time, one neighbour at a time, in float64: the protocol written out longhand.
    Returns ({k: predictions}, {k: decided}), where decided[i] is False for a query whose answer
    float32 rounding may legitimately change (see NEAR_TIE)."""
    train = train_x.double().numpy()
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    labels = train_y.tolist()
    predictions, decided = {k: [] for k in ks}, {k: [] for k in ks}
    for query in test_x.double().numpy():
        sims = train @ (query / np.linalg.norm(query))
        order = np.argsort(-sims, kind="stable")
        nearest = order[:max(ks)].tolist()
        for k in ks:
            votes = [0.0] * num_classes
            for i in nearest[:k]:
                votes[labels[i]] += 1.0 if math.isinf(temperature) else math.exp(sims[i] / temperature)
            predictions[k].append(votes.index(max(votes)))  # ties -> smallest label, as torch's argmax
            top2 = sorted(votes)[-2:]
            boundary = sims[order[k - 1]] - sims[order[k]] if k < len(sims) else math.inf
            exact_votes = math.isinf(temperature)  # integer counts: ties are exact, broken by the label
            decided[k].append((exact_votes or top2[1] - top2[0] > NEAR_TIE * top2[1]) and boundary > NEAR_TIE)
    return ({k: torch.tensor(p) for k, p in predictions.items()},
            {k: torch.tensor(d) for k, d in decided.items()})


## The code under test works in float32: a cosine similarity carries ~1e-7 of rounding that depends on
## BLAS, thread count and CPU model, and exp(sim / T) turns it into ~1e-7 / T relative error in a vote
## (1.5e-6 at T = 0.07). A query whose k-th and (k+1)-th neighbours are closer than that, or whose two
## best classes' votes are, has no machine-independent answer; 1e-4 is 60x that bound. Every other
## query must match exactly, and the near ties must stay rare (or the test would test nothing).
NEAR_TIE = 1e-4


def assert_same_where_decided(got, expected, decided):
    assert len(got) == len(expected) and decided.float().mean() > 0.95
    assert torch.equal(got[decided], expected[decided])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one thread is fastest, and immune to a busy machine's other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- k-NN -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n_test", [1, 10_000])
@pytest.mark.parametrize("temperature", [0.07, 0.5, math.inf])
def test_knn_matches_brute_force(n_test, temperature):
    train_x, train_y, test_x, _ = random_features(n_test=n_test, seed=n_test)
    ks = [1, 7, 20, 50]
    predictions = probe.knn_predict(train_x, train_y, test_x, k=ks, temperature=temperature, num_classes=5)
    expected, decided = brute_force_knn(train_x, train_y, test_x, ks, temperature, 5)
    for k in ks:
        assert len(predictions[k]) == n_test
        assert_same_where_decided(predictions[k], expected[k], decided[k])
    # one int k gives the same as the list, and chunking changes nothing (other matrix shapes: other
    # last bits, so again only where the answer is decided)
    chunked = probe.knn_predict(train_x, train_y, test_x, k=20, temperature=temperature, chunk=7)
    assert_same_where_decided(chunked, predictions[20], decided[20])


def test_smallest_knn_temperature_is_where_the_votes_overflow():
    """check_config's bound on --knn-t is tight: just above it, 200 votes exp(1 / T) of identical
    features (similarity 1) still sum to a finite float32 and the majority wins; just below, the
    float32 sum is inf (every class would tie), and check_config refuses it."""
    bound = 1 / (math.log(torch.finfo(torch.float32).max) - math.log(200))
    x, labels = torch.ones(300, 4), torch.tensor([0] * 100 + [1] * 200)
    assert probe.knn_predict(x, labels, x[:3], k=200, temperature=bound * 1.001).tolist() == [1, 1, 1]
    assert torch.isinf(torch.full((200,), 1 / (bound * 0.999)).exp().sum())
    probe.check_config(probe.Config(knn_t=bound * 1.001), ["x.npz"])
    with pytest.raises(probe.UserError, match="overflow float32"):
        probe.check_config(probe.Config(knn_t=bound * 0.999), ["x.npz"])


# --- linear probe ---------------------------------------------------------------------------

def separable(n, dim=20, classes=4, seed=0):
    """Labels = argmax of a fixed linear map, keeping only points with a clear margin."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(dim, classes, generator=torch.Generator().manual_seed(123))
    x = torch.randn(8 * n, dim, generator=gen)
    scores = (x @ weights).sort(1).values
    keep = (scores[:, -1] - scores[:, -2]) > 2.0
    x = x[keep][:n]
    return x, (x @ weights).argmax(1)


def test_linear_probe_separable_and_shuffled():
    train_x, train_y = separable(2000, seed=0)
    test_x, test_y = separable(1000, seed=1)
    assert probe.linear_probe(train_x, train_y, test_x, test_y, epochs=30, lr=1e-2, batch_size=256) >= 0.99
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))]
    chance = probe.linear_probe(train_x, shuffled, test_x, test_y, epochs=30, lr=1e-2, batch_size=256)
    assert abs(chance - (test_y == test_y.mode().values).float().mean().item()) < 0.1  # near the majority-class rate
    assert chance < 0.45


def test_linear_probe_deterministic_and_full_batch():
    train_x, train_y = separable(500, seed=2)
    test_x, test_y = separable(300, seed=3)
    run = lambda **kw: probe.linear_probe(train_x, train_y, test_x, test_y, **{"epochs": 200, "lr": 5e-2, **kw})
    assert run(seed=1, batch_size=64, epochs=10) == run(seed=1, batch_size=64, epochs=10)
    assert run(batch_size=len(train_x)) >= 0.97  # full batch: one step per epoch
    assert run(batch_size=len(train_x)) == run(batch_size=10 * len(train_x))


class RecordingCosine(torch.optim.lr_scheduler.CosineAnnealingLR):
    """linear_probe's own scheduler, recording the head's (weight, bias) after every step: lets a test
    watch the test accuracy of every epoch of the very run whose number linear_probe returns."""
    snapshots = []

    def step(self, *args, **kwargs):
        super().step(*args, **kwargs)
        weight, bias = (p.detach().clone() for p in self.optimizer.param_groups[0]["params"])
        RecordingCosine.snapshots.append((weight, bias))


def test_linear_probe_reports_the_final_epoch_not_the_best(monkeypatch):
    """Data built so that the test accuracy is 1 early in training and 0 at the end. Train, two classes
    mirrored through the origin: +1 = 90 points at (3, 0) and 10 at (0.1, 1). The bulk pulls the head
    toward the class-mean direction (mostly x1) first; the logistic loss then keeps pushing toward the
    margin of the 10 rare points, a direction mostly along x2. The test points (1, -0.5) (class +1)
    and (-1, 0.5) (class -1) are on the right side of the first direction and the wrong side of the
    second. Full batch at lr 0.1 for 20 epochs makes the turn happen inside the run."""
    positive = torch.tensor([[3.0, 0.0]] * 90 + [[0.1, 1.0]] * 10)
    train_x, train_y = torch.cat([positive, -positive]), torch.tensor([1] * 100 + [0] * 100)
    test_x, test_y = torch.tensor([[1.0, -0.5]] * 10 + [[-1.0, 0.5]] * 10), torch.tensor([1] * 10 + [0] * 10)
    RecordingCosine.snapshots = []
    monkeypatch.setattr(torch.optim.lr_scheduler, "CosineAnnealingLR", RecordingCosine)
    reported = probe.linear_probe(train_x, train_y, test_x, test_y, epochs=20, lr=0.1, batch_size=len(train_x))
    ## The test side of the same run, epoch by epoch (full batch: one step per epoch), standardised by
    ## the train statistics as the probe does. Accuracies are multiples of 1/20: exact comparisons.
    z = (test_x - train_x.mean(0)) / train_x.std(0)
    after_steps = RecordingCosine.snapshots[1:]  # the scheduler also steps once when it is built, before training
    per_epoch = [((z @ weight.T + bias).argmax(1) == test_y).float().mean().item() for weight, bias in after_steps]
    assert len(per_epoch) == 20 and max(per_epoch) == 1.0 and per_epoch[-1] == 0.0  # the construction holds
    assert reported == per_epoch[-1] == 0.0  # the final epoch, not the best (1.0)


def test_linear_probe_standardises_by_train_statistics_only():
    """Train: x0 = -1 (class 0) or +1 (class 1), plus a pure-noise x1. Test: the same classes, x0 shifted
    by +3 (2 and 4). With the train statistics the shift survives: every test point lies beyond the
    learned boundary near 0 and is called class 1, accuracy exactly 1/2. Standardising with the test
    statistics would remove the shift (x0 back to -1 and +1) and score 1."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 2
    train_x = torch.stack([2.0 * labels - 1, torch.randn(400, generator=gen)], 1)
    test_x = torch.stack([2.0 * labels[:100] - 1 + 3, torch.randn(100, generator=gen)], 1)
    accuracy = probe.linear_probe(train_x, labels, test_x, labels[:100], epochs=30, lr=1e-2, batch_size=64)
    assert accuracy == 0.5
    assert probe.linear_probe(train_x, labels, train_x[:100], labels[:100], epochs=30, lr=1e-2, batch_size=64) == 1.0


def test_accuracy_is_additive_over_disjoint_test_sets():
    """Nothing about the test set feeds back into the evaluation, so each test sample is scored alone:
    the number correct on A + B is the number correct on A plus that on B, exactly. Correct counts are
    integers and a float32 mean of at most 2**24 zeros and ones is exact before the division, so
    round(accuracy * n) recovers each count exactly."""
    train_x, train_y, test_x, test_y = random_features(n_train=400, n_test=300, dim=12, classes=4, seed=3)
    test_x[120:] += 0.7  # the parts differ in their statistics: anything computed from the test set would differ too
    correct = lambda accuracy, n: round(accuracy * n)
    parts = [(0, 300), (0, 120), (120, 300)]
    probes = [probe.linear_probe(train_x, train_y, test_x[a:b], test_y[a:b], epochs=5, lr=1e-2, batch_size=64) for a, b in parts]
    assert correct(probes[0], 300) == correct(probes[1], 120) + correct(probes[2], 180)
    knns = [probe.knn_accuracies(train_x, train_y, test_x[a:b], test_y[a:b], [1, 10, 50], 0.07, 4) for a, b in parts]
    for k in (1, 10, 50):
        assert correct(knns[0][k], 300) == correct(knns[1][k], 120) + correct(knns[2][k], 180)


# --- effective rank -------------------------------------------------------------------------

def test_effective_rank_properties():
    gen = torch.Generator().manual_seed(0)
    gaussian = torch.randn(20_000, 16, generator=gen)
    assert 15.5 < probe.effective_rank(gaussian) <= 16
    u = torch.linalg.qr(torch.randn(500, 7, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(30, 7, generator=gen, dtype=torch.float64))[0]
    rank_7 = 3.0 * u @ v.T  # (500, 30), seven equal non-zero singular values
    assert probe.effective_rank(rank_7) == pytest.approx(7.0, abs=1e-4)
    assert probe.effective_rank(1e4 * gaussian) == pytest.approx(probe.effective_rank(gaussian), rel=1e-9)
    assert probe.effective_rank(gaussian.numpy()) == probe.effective_rank(gaussian)


def with_singular_values(values, n=50, dim=8, seed=0, centred_rows=False):
    """An (n, dim) float64 matrix whose singular values are exactly `values` (then zeros):
    U diag(values) V^T with orthonormal U (n, r) and V (dim, r) from QR. centred_rows=True makes U's
    columns orthogonal to the all-ones vector, so the matrix's column means are exactly zero."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n, len(values), generator=gen, dtype=torch.float64)
    u = torch.linalg.qr(u - u.mean(0) if centred_rows else u)[0]
    v = torch.linalg.qr(torch.randn(dim, len(values), generator=gen, dtype=torch.float64))[0]
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


def erank_by_hand(singular_values):
    """exp(entropy) of p_i = s_i / sum_j s_j, written out with math, skipping zeros (0 log 0 = 0)."""
    total = sum(singular_values)
    return math.exp(-sum(s / total * math.log(s / total) for s in singular_values if s > 0))


## Tolerance of the effective-rank tests: effective_rank takes log(p + eps), eps = 1e-7, which lowers
## the entropy by sum_i p_i * eps / p_i = r * eps for r non-zero singular values, so the result is
## erank * exp(-r * eps): a relative shift of at most r * 1e-7 (4e-7 for four values, 1.6e-6 for
## sixteen), while float64 SVD errors are ~1e-15 relative. Hence rel=2e-6.
ERANK_TOLERANCE = 2e-6


def test_effective_rank_of_an_uneven_spectrum():
    """Singular values 4, 2, 1, 0.5: exp(entropy) = 3.1171; their squares (the variances) would give
    2.0629, a uniform spectrum 4; a flat spectrum cannot tell these conventions apart, this one can."""
    assert erank_by_hand([4, 2, 1, 0.5]) == pytest.approx(3.1171, abs=5e-5)  # the number quoted in the issue
    assert erank_by_hand([16, 4, 1, 0.25]) == pytest.approx(2.0629, abs=5e-5)  # what squaring would give
    z = with_singular_values([4, 2, 1, 0.5])
    assert probe.effective_rank(z) == pytest.approx(erank_by_hand([4, 2, 1, 0.5]), rel=ERANK_TOLERANCE)
    assert probe.effective_rank(z.float()) == pytest.approx(3.1171, abs=5e-4)  # float32 input: ~1e-7 relative SVD error
    assert probe.effective_rank(3.0 * z) == pytest.approx(probe.effective_rank(z), rel=1e-12)


def test_centred_effective_rank_removes_the_mean():
    """A common mean added to every row adds a large singular value to the uncentred spectrum; the
    centred rank subtracts it and finds the spectrum underneath (4, 2, 1, 0.5: 3.1171) exactly."""
    centred = with_singular_values([4, 2, 1, 0.5], centred_rows=True)
    assert torch.allclose(centred.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-15)
    shifted = centred + 10.0 * torch.linspace(-1, 1, 8, dtype=torch.float64)  # the same mean row everywhere
    assert probe.effective_rank(shifted, center=True) == pytest.approx(erank_by_hand([4, 2, 1, 0.5]), rel=ERANK_TOLERANCE)
    assert probe.effective_rank(shifted) < 2.5  # uncentred: dominated by the mean's singular value


def test_centred_effective_rank_matches_a_direct_computation():
    """On random data with a mean: numpy's SVD of X - mean(X) and the entropy written out by hand."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 16, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 16, dtype=torch.float64) + 2.0
    direct = np.linalg.svd((x - x.mean(0)).numpy(), compute_uv=False)
    assert probe.effective_rank(x, center=True) == pytest.approx(erank_by_hand(direct.tolist()), rel=ERANK_TOLERANCE)
    uncentred = np.linalg.svd(x.numpy(), compute_uv=False)
    assert probe.effective_rank(x) == pytest.approx(erank_by_hand(uncentred.tolist()), rel=ERANK_TOLERANCE)


# --- subspace probe -------------------------------------------------------------------------

def data_with_variances(variances, n=400, seed=0):
    """(n, D) data whose train covariance has exactly these eigenvalues, in a random rotation."""
    gen = torch.Generator().manual_seed(seed)
    dim = len(variances)
    columns = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    columns = torch.linalg.qr(columns - columns.mean(0))[0] * math.sqrt(n - 1)  # centred, orthogonal, unit variance
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0]
    return (columns * torch.tensor(variances, dtype=torch.float64).sqrt()) @ rotation.T + 5.0


@pytest.mark.parametrize("side,percent,count", [("top", 30, 3), ("top", 90, 9), ("bottom", 20, 2), ("bottom", 100, 10)])
def test_subspace_keeps_exactly_the_requested_variance(side, percent, count):
    x = data_with_variances([1.0] * 10)
    mean, variances, vectors = probe.principal_directions(x)
    index, kept = probe.subspace_directions(variances, side, percent)
    assert len(index) == count and kept == pytest.approx(percent / 100, abs=1e-9)
    projected = probe.project(x, mean, vectors[:, index]).double()
    assert projected.var(0).sum() / x.var(0).sum() == pytest.approx(percent / 100, abs=1e-6)


def test_subspace_top_and_bottom_pick_the_right_directions():
    variances = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.125]
    x = data_with_variances(variances)
    mean, found, vectors = probe.principal_directions(x)
    assert torch.allclose(found, torch.tensor(variances, dtype=torch.float64), atol=1e-9)
    total = sum(variances)
    for side, percent in [("top", 50), ("top", 80), ("bottom", 5), ("bottom", 20)]:
        index, kept = probe.subspace_directions(found, side, percent)
        ordered = variances if side == "top" else variances[::-1]
        fractions = np.cumsum(ordered) / total
        assert kept == pytest.approx(fractions[len(index) - 1]) and kept >= percent / 100 - 1e-12
        assert len(index) == 1 or fractions[len(index) - 2] < percent / 100  # the fewest directions that do it
        projected = probe.project(x, mean, vectors[:, index]).double()
        spectrum = torch.linalg.eigvalsh(torch.cov(projected.T)).flip(0)  # the projection keeps exactly these
        chosen = sorted((variances[i] for i in index.tolist()), reverse=True)
        assert torch.allclose(spectrum[:len(chosen)], torch.tensor(chosen, dtype=torch.float64), atol=1e-5)
        assert spectrum[len(chosen):].abs().max() < 1e-5 if len(chosen) < len(variances) else True


# --- the command line: files, table, JSON, errors ------------------------------------------

def write_features(path, arrays):
    if str(path).endswith(".npz"):
        np.savez(path, **{key: np.asarray(value) for key, value in arrays.items()})
    else:
        torch.save({key: torch.as_tensor(np.asarray(value)) for key, value in arrays.items()}, path)
    return str(path)


def good_arrays(seed=0):
    train_x, train_y = separable(300, dim=10, classes=3, seed=seed)
    test_x, test_y = separable(100, dim=10, classes=3, seed=seed + 1)
    return {"train_features": train_x.numpy(), "train_labels": train_y.numpy(),
            "test_features": test_x.numpy(), "test_labels": test_y.numpy(), "alpha_min": np.float64(0.6)}


FAST = ["--knn-k", "5,20", "--probe-epochs", "20", "--probe-lr", "3e-2", "--probe-batch-size", "64"]


def test_main_table_json_and_formats(tmp_path, capsys):
    npz = write_features(tmp_path / "a.npz", good_arrays(0))
    pt = write_features(tmp_path / "b.pt", good_arrays(0))
    out = tmp_path / "results.json"
    assert probe.main([npz, pt, *FAST, "--subspace", "top:90,bottom:20", "--majority",
                       "--json", str(out), "--plot", str(tmp_path / "spectrum.png")]) == 0
    table = capsys.readouterr().out
    assert "knn@5" in table and "maj@20" in table and "top:90" in table and "bottom:20" in table
    assert "erank_c" in table and "linear probe: standard (features standardised by train statistics" in table
    results = json.loads(out.read_text())
    assert [r["input"] for r in results] == [npz, pt]
    npz_result, pt_result = results
    for key in ("knn", "knn_majority", "linear_probe", "effective_rank", "effective_rank_centered", "subspace"):
        assert npz_result[key] == pt_result[key]  # the same arrays in both formats give the same numbers
    train_x = torch.as_tensor(good_arrays(0)["train_features"])
    assert npz_result["effective_rank"] == probe.effective_rank(train_x)
    assert npz_result["effective_rank_centered"] == probe.effective_rank(train_x, center=True)
    assert npz_result["effective_rank_centered"] != npz_result["effective_rank"]
    for row in npz_result["subspace"].values():  # projections are centred: both ranks agree to rounding
        assert row["effective_rank_centered"] == pytest.approx(row["effective_rank"], rel=1e-6)
    assert set(npz_result["knn"]) == {"5", "20"} and 0.9 < npz_result["linear_probe"] <= 1
    assert npz_result["metadata"] == {"alpha_min": 0.6} and npz_result["settings"]["knn_t"] == 0.07
    assert npz_result["subspace"]["top:90"]["variance_kept"] >= 0.9
    assert (tmp_path / "spectrum.png").stat().st_size > 1000
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]  # atomic writes leave nothing behind


def test_main_pixels_shapes_one_object(tmp_path, monkeypatch):
    monkeypatch.setattr(probe, "make_shapes", lambda n, size, seed: mae_decay.make_shapes(n // 50, 8, seed))
    out = tmp_path / "pixels.json"
    assert probe.main(["--pixels", "shapes", *FAST, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["input"] == "pixels:shapes" and result["dim"] == 3 * 8 * 8 and result["num_train"] == 200


def test_authors_probe_is_one_flag_away_and_named_in_the_table(tmp_path, capsys):
    """--probe authors runs linear_probe(..., **AUTHORS_PROBE) exactly (raw features, lr 1e-2, weight
    decay 0.01, batch 256, 200 epochs); the table and the JSON say which probe made the number."""
    arrays = good_arrays(0)
    shifted = {**arrays, "train_features": 3 * arrays["train_features"] + 2, "test_features": 3 * arrays["test_features"] + 2}
    path = write_features(tmp_path / "a.npz", shifted)
    out = tmp_path / "a.json"
    code, table, _ = run_main([path, "--knn-k", "5", "--probe", "authors", "--json", str(out)], capsys)
    assert code == 0 and "linear probe: the decay paper's authors' (raw features, AdamW lr 0.01 with weight decay 0.01, batch 256" in table
    result = json.loads(out.read_text())
    tensors = [torch.as_tensor(shifted[key]) for key in probe.FEATURE_KEYS]
    assert result["linear_probe"] == probe.linear_probe(*tensors, seed=0, num_classes=3, **probe.AUTHORS_PROBE)
    assert result["linear_probe"] != probe.linear_probe(*tensors, seed=0, num_classes=3)  # not the standard probe
    assert "authors'" in result["settings"]["probe_protocol"] and result["settings"]["probe"] == "authors"
    assert result["settings"]["probe_protocol"].endswith("weight decay 0.01")


def break_arrays(change):
    arrays = good_arrays()
    change(arrays)
    return arrays


ERRORS = {
    "missing key": (lambda a: a.pop("test_labels"), "lacks test_labels"),
    "mismatched lengths": (lambda a: a.update(train_labels=a["train_labels"][:-1]), "rows but"),
    "mismatched dimensions": (lambda a: a.update(test_features=a["test_features"][:, :3]), "dimensions"),
    "NaN": (lambda a: a["train_features"].__setitem__((3, 2), np.nan), "NaN or infinite"),
    "inf": (lambda a: a["test_features"].__setitem__((0, 0), np.inf), "NaN or infinite"),
    "float labels": (lambda a: a.update(train_labels=a["train_labels"] + 0.5), "integer class ids"),
    "unseen class": (lambda a: a["test_labels"].__setitem__(0, 7), "never appear in train_labels"),
    "string features": (lambda a: a.update(train_features=np.array(["a"] * 300)), "numeric array"),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_user_errors_are_one_sentence(name, tmp_path, capsys):
    change, phrase = ERRORS[name]
    path = write_features(tmp_path / "bad.npz", break_arrays(change))
    assert probe.main([path, *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert phrase in err and err.startswith("error: ") and err.count("\n") == 0 and "Traceback" not in err


def tree(root):
    """Every file and folder under root with its size and modification time: equal trees mean that
    nothing was created, changed or removed."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
    return found


## Bad command lines: (the flags after one good features file "ok.npz", a phrase the error must hold).
## Run in a folder that also holds a regular file "afile" and a folder "adir" to aim paths at.
BAD_FLAGS = [
    (["--knn-k", "ten"], "--knn-k"),
    (["--knn-k", "0,10"], "at least 1"),
    (["--knn-k", ","], "--knn-k"),
    (["--knn-k", "400"], "only 300 training samples"),  # known once the file is read, still before computing
    (["--knn-t", "0"], "--knn-t"),
    (["--knn-t", "-0.1"], "--knn-t"),
    (["--knn-t", "nan"], "--knn-t"),
    (["--knn-t", "inf"], "--knn-t"),
    (["--knn-t", "warm"], "invalid float value"),
    (["--knn-t", "0.01"], "overflow float32"),
    (["--probe-epochs", "-1"], "--probe-epochs"),
    (["--probe-epochs", "2.5"], "invalid int value"),
    (["--probe-lr", "0"], "--probe-lr"),
    (["--probe-lr", "-1e-3"], "--probe-lr"),
    (["--probe-lr", "inf"], "--probe-lr"),
    (["--probe-batch-size", "-8"], "--probe-batch-size"),
    (["--img-size", "0"], "--img-size"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2 ** 64)], "--seed"),
    (["--device", "tpu"], "--device"),
    (["--subspace", "middle:50"], "--subspace items"),
    (["--subspace", "top:0"], "--subspace items"),
    (["--subspace", "bottom:101"], "--subspace items"),
    (["--subspace", "top:half"], "--subspace items"),
    (["--pixels", "imagenet"], "--pixels must be"),
    (["--pixels", "folder:no_such_folder"], "there is no folder"),
    (["--pixels", "cifar10", "--data-dir", "afile"], "is a file"),
    (["--pixels", "cifar10", "--data-dir", "afile/data"], "is a file"),
    (["--pixels", "cifar10", "--data-dir", ""], "--data-dir is empty"),
    (["--json", "afile/results.json"], "is a file, not a folder"),
    (["--json", "afile/deeper/results.json"], "is a file, not a folder"),
    (["--json", "adir"], "is a folder"),
    (["--json", "new/"], "is a folder"),
    (["--json", "ok.npz"], "one of the inputs"),
    (["--plot", "afile/spectrum.png"], "is a file, not a folder"),
    (["--plot", "adir"], "is a folder"),
    (["--json", "same", "--plot", "same"], "the same file"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--majority=yes"], "--majority"),
]


def run_main(argv, capsys):
    """probe.main in-process, as the command line runs it: (exit code, stdout, stderr)."""
    try:
        code = probe.main(argv)
    except SystemExit as e:  # argparse's --help
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(err, phrase):
    """Exactly one `error: ...` line holding the phrase (beside, at most, tqdm's progress bars), no traceback."""
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and phrase in errors[0], err
    assert all("it/s" in line for line in lines if line not in errors), err  # anything else is a progress bar
    assert "Traceback" not in err


@pytest.mark.parametrize("argv,phrase", BAD_FLAGS, ids=[" ".join(argv) for argv, _ in BAD_FLAGS])
def test_bad_flags_are_one_sentence_and_touch_nothing(argv, phrase, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_features("ok.npz", good_arrays())
    (tmp_path / "afile").write_text("a regular file\n")
    (tmp_path / "adir").mkdir()
    before = tree(tmp_path)
    code, _, err = run_main(["ok.npz", *argv], capsys)
    assert code == 2
    assert_one_error(err, phrase)
    assert tree(tmp_path) == before


def test_nothing_to_evaluate(capsys):
    code, _, err = run_main([], capsys)
    assert code == 2
    assert_one_error(err, "nothing to evaluate")


def test_help_shows_the_real_defaults_by_section(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    out = " ".join(out.split())  # argparse wraps lines at the terminal width
    assert "(default: 10,20,100,200)" in out and "(default: 0.07)" in out and "(default: True)" in out
    assert "p% of the variance" in out  # the literal % that used to crash --help
    for section in ("input", "k-NN (DINO protocol):", "linear probe:", "analysis:", "system:"):
        assert section in out
    assert all("--" + field.name.replace("_", "-") in out for field in dataclasses.fields(probe.Config))


def test_real_command_line_bad_flag(tmp_path):
    """One bad flag through a real process, as a user runs it: exit status 2 from sys.exit(main()),
    one line on stderr, nothing created (one subprocess: a few seconds of torch import)."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "probe.py")
    done = subprocess.run([sys.executable, script, "x.npz", "--knn-t", "warm"], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and done.stdout == ""
    assert_one_error(done.stderr, "--knn-t")
    assert os.listdir(tmp_path) == []


def test_one_bad_file_keeps_the_good_results(tmp_path, capsys):
    good = write_features(tmp_path / "good.npz", good_arrays(0))
    bad = write_features(tmp_path / "bad.npz", break_arrays(lambda a: a.pop("test_labels")))
    other = write_features(tmp_path / "other.pt", good_arrays(2))
    out, plot = tmp_path / "results.json", tmp_path / "spectrum.png"
    code, table, err = run_main([good, bad, str(tmp_path / "missing.npz"), other, *FAST, "--json", str(out),
                                 "--plot", str(plot)], capsys)
    assert code == 2
    errors = err.strip().splitlines()
    assert len(errors) == 2 and "Traceback" not in err
    assert errors[0].startswith(f"error: {bad}") and "lacks test_labels" in errors[0]
    assert errors[1].startswith("error: ") and "missing.npz does not exist" in errors[1]
    assert good in table and other in table and "bad.npz: not evaluated" in table
    results = json.loads(out.read_text())
    assert [r["input"] for r in results] == [good, bad, str(tmp_path / "missing.npz"), other]
    assert results[0]["linear_probe"] > 0.9 and results[3]["linear_probe"] > 0.9
    assert "lacks test_labels" in results[1]["error"] and "knn" not in results[1]
    assert plot.stat().st_size > 1000


def test_ctrl_c_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    path = write_features(tmp_path / "ok.npz", good_arrays())
    before = tree(tmp_path)

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(probe, "evaluate", interrupted)
    code, _, err = run_main([path, "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "s.png")], capsys)
    assert code == 130 and err.strip().splitlines() == ["interrupted; only the files reported as written were written"]
    assert tree(tmp_path) == before


def test_default_ks_are_limited_to_the_train_size_typed_ks_are_not(tmp_path, capsys):
    """The k policy shared by every script: the default list keeps the ks that fit; a k the user
    typed must fit; an input too small for any k is refused."""
    arrays = good_arrays()
    small = {**arrays, "train_features": arrays["train_features"][:50], "train_labels": arrays["train_labels"][:50]}
    path = write_features(tmp_path / "small.npz", small)
    out = tmp_path / "small.json"
    code, table, _ = run_main([path, "--probe-epochs", "0", "--json", str(out)], capsys)
    assert code == 0 and set(json.loads(out.read_text())["knn"]) == {"10", "20"}
    row = next(line for line in table.splitlines() if line.startswith(path + " ")).split()
    assert row[4:6] == ["-", "-"]  # knn@100 and knn@200: too few training samples
    code, _, err = run_main([path, "--probe-epochs", "0", "--knn-k", "10,60"], capsys)
    assert code == 2
    assert_one_error(err, "only 50 training samples, too few for --knn-k 10,60")
    tiny = write_features(tmp_path / "tiny.npz", {**small, "train_features": small["train_features"][:5],
                                                   "train_labels": small["train_labels"][:5]})
    code, _, err = run_main([tiny, "--probe-epochs", "0"], capsys)
    assert code == 2
    assert_one_error(err, "only 5 training samples")


def test_integral_float_labels_and_missing_file(tmp_path, capsys):
    arrays = break_arrays(lambda a: a.update(train_labels=a["train_labels"].astype(np.float32)))
    assert probe.main([write_features(tmp_path / "f.npz", arrays), *FAST]) == 0  # 0.0, 1.0, 2.0 are class ids
    assert probe.main([str(tmp_path / "missing.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_large_class_ids_are_renumbered_and_give_the_same_numbers(tmp_path, capsys):
    """Class ids {0, 7, 10**9} used to ask for a 10**9-column vote table (160 GB): they are renumbered
    0..2 in sorted order, with one line saying so, and every number equals the compact labels' run."""
    compact = good_arrays(0)
    ids = np.array([0, 7, 10 ** 9])
    sparse = {**compact, "train_labels": ids[compact["train_labels"]], "test_labels": ids[compact["test_labels"]]}
    results = {}
    for name, arrays in (("compact", compact), ("sparse", sparse)):
        out = tmp_path / f"{name}.json"
        code, printed, _ = run_main([write_features(tmp_path / f"{name}.npz", arrays), *FAST, "--majority",
                                     "--subspace", "top:90", "--json", str(out)], capsys)
        assert code == 0
        results[name] = (json.loads(out.read_text()), printed)
    (sparse_result, printed), (compact_result, compact_printed) = results["sparse"], results["compact"]
    assert "class ids {0, 7, 1000000000} renumbered 0..2, keeping their sorted order" in printed
    assert "renumbered" not in compact_printed
    assert sparse_result["metadata"]["renumbered_class_ids"] == [0, 7, 10 ** 9]
    for key in ("knn", "knn_majority", "linear_probe", "subspace"):  # same process, same arrays: bit-identical
        assert sparse_result[key] == compact_result[key], key
    assert sparse_result["linear_probe"] > 0.9


def test_one_class_warns_that_accuracy_means_nothing(tmp_path, capsys):
    arrays = good_arrays(0)
    one_class = {**arrays, "train_labels": np.full(300, 4), "test_labels": np.full(100, 4)}
    code, printed, _ = run_main([write_features(tmp_path / "one.npz", one_class), *FAST], capsys)
    warnings = [line for line in printed.splitlines() if "warning" in line]
    assert code == 0 and len(warnings) == 1 and "one class" in warnings[0] and "100 % and means nothing" in warnings[0]
    code, printed, _ = run_main([write_features(tmp_path / "three.npz", arrays), *FAST], capsys)
    assert code == 0 and "warning" not in printed


class NotAnArray:
    """A class instance: what a pickle may hold besides tensors (and where a malicious one runs code)."""


class RunsCode:
    """Unpickling this runs os.makedirs(path): a harmless stand-in for a malicious pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


def test_pickled_objects_are_refused_in_one_sentence_of_ours(tmp_path, capsys):
    """torch.load(weights_only=True) refuses a class instance with eight lines that suggest
    weights_only=False; the user gets one sentence of ours instead, and no code runs."""
    marker = tmp_path / "code_ran"
    arrays = {key: torch.as_tensor(value) for key, value in good_arrays(0).items()}
    torch.save({**arrays, "extra": NotAnArray()}, tmp_path / "instance.pt")
    torch.save({**arrays, "train_features": RunsCode(str(marker))}, tmp_path / "malicious.pt")
    np.savez(tmp_path / "objects.npz", **{**good_arrays(0), "train_labels": np.array([NotAnArray()] * 300, dtype=object)})
    for name in ("instance.pt", "malicious.pt", "objects.npz"):
        code, _, err = run_main([str(tmp_path / name), *FAST], capsys)
        assert code == 2
        assert_one_error(err, f"{tmp_path / name} holds a Python object other than arrays, numbers and strings")
        assert "weights_only" not in err and "could run code" in err
    assert not marker.exists()


# --- image folders (--pixels folder:PATH) ----------------------------------------------------

def write_images(root, layout, seed=0, ext="png"):
    """layout {split: {class: count}}: random 12x18 RGB images, written with matplotlib."""
    import matplotlib.image
    rng = np.random.default_rng(seed)
    for split, classes in layout.items():
        for cls, count in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                matplotlib.image.imsave(root / split / cls / f"{i}.{ext}", rng.integers(0, 256, (12, 18, 3), dtype=np.uint8))


LAYOUT = {"train": {"cat": 3, "dog": 2}, "val": {"cat": 1, "dog": 2}}


def test_image_folder_cache_lives_outside_the_dataset_and_follows_its_contents(tmp_path, monkeypatch):
    root, data_dir = tmp_path / "images", tmp_path / "data"
    write_images(root, LAYOUT)
    load = lambda size=8: probe.load_dataset(f"folder:{root}", str(data_dir), size=size)
    dataset = tree(root)
    parts = load()
    assert parts["train"][0].shape == (5, 3, 8, 8) and parts["train"][0].dtype == np.uint8
    assert parts["train"][1].tolist() == [0, 0, 0, 1, 1] and parts["test"][1].tolist() == [0, 1, 1]
    assert tree(root) == dataset  # nothing written inside the dataset folder
    cache_folder = data_dir / "image_folder_cache"
    assert [p.name.endswith("_8px.pt") for p in cache_folder.iterdir()] == [True]
    # unchanged folder: the cache answers and no image is decoded
    with monkeypatch.context() as patch:
        patch.setattr(probe, "load_image_resized", lambda path, size: pytest.fail("decoded an image of a cached folder"))
        assert np.array_equal(load()["train"][0], parts["train"][0])
    # a new class, a deleted image, an edited image: each one rebuilds the cache
    write_images(root, {"train": {"eel": 2}, "val": {"eel": 1}}, seed=1)
    assert load()["train"][1].tolist() == [0, 0, 0, 1, 1, 2, 2]
    (root / "val" / "dog" / "1.png").unlink()
    assert load()["test"][1].tolist() == [0, 1, 2]
    import matplotlib.image
    edited = root / "train" / "cat" / "0.png"
    stat = edited.stat()
    matplotlib.image.imsave(edited, np.full((12, 18, 3), 77, dtype=np.uint8))
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # a new mtime, whatever the clock's resolution
    assert (load()["train"][0][0] == 77).all()
    assert len(list(cache_folder.iterdir())) == 1  # one cache per folder and size, replaced in place
    assert load(size=6)["train"][0].shape == (7, 3, 6, 6) and len(list(cache_folder.iterdir())) == 2


def test_image_folder_bad_cache_is_rebuilt_and_unwritable_cache_is_skipped(tmp_path, capsys):
    root = tmp_path / "images"
    write_images(root, LAYOUT)
    first = probe.load_dataset(f"folder:{root}", str(tmp_path / "data"), size=8)
    (cache,) = (tmp_path / "data" / "image_folder_cache").iterdir()
    cache.write_bytes(b"garbage")
    again = probe.load_dataset(f"folder:{root}", str(tmp_path / "data"), size=8)
    assert np.array_equal(again["train"][0], first["train"][0]) and "unreadable" in capsys.readouterr().out
    (tmp_path / "afile").write_text("a regular file\n")
    unwritable = probe.load_dataset(f"folder:{root}", str(tmp_path / "afile"), size=8)  # no cache folder can go there
    assert np.array_equal(unwritable["train"][0], first["train"][0])
    assert "continuing without it" in capsys.readouterr().out


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def symlink_loop(path):
    """path becomes a symbolic link to itself: opening or stat-ing it fails with ELOOP."""
    os.symlink(os.path.basename(path), path)


FOLDER_ERRORS = {  # name: (damage done to a good folder, the path the sentence must name, a phrase)
    "symlink loop named like an image": (lambda r: symlink_loop(r / "train/cat/loop.png"), "train/cat/loop.png",
                                         "cannot be read (Too many levels of symbolic links)"),
    "dangling symlink": (lambda r: os.symlink("gone.png", r / "val/dog/link.png"), "val/dog/link.png", "cannot be read"),
    "empty train": (lambda r: [os.rename(r / "train" / c, r / f"away_{c}") for c in ("cat", "dog")], "train",
                    "holds no class folders; put each class's images in"),
    "empty val": (lambda r: [os.rename(r / "val" / c, r / f"away_{c}") for c in ("cat", "dog")], "val",
                  "holds no class folders named like those of"),
    "no val or test": (lambda r: os.rename(r / "val", r / "validation"), "", "and val/<class>/ (or test/<class>/) folders"),
    "not an image": (lambda r: (r / "train/cat/1.png").write_bytes(b"not a png"), "train/cat/1.png", "could not be read"),
    "truncated png": (lambda r: truncate(r / "val/dog/0.png"), "val/dog/0.png", "could not be read"),
    "truncated jpeg": (lambda r: truncate(r / "train/dog/0.jpg"), "train/dog/0.jpg", "could not be read"),
    "empty train class": (lambda r: (r / "train/fox").mkdir(), "train/fox", "holds no images"),
    "val class of non-images": (lambda r: [p.rename(p.with_suffix(".txt")) for p in (r / "val/cat").iterdir()],
                                "val/cat", "holds no images"),
    "val class not in train": (lambda r: write_images(r, {"val": {"owl": 1}}), "val/owl", "no class folder"),
}


@pytest.mark.parametrize("name", sorted(FOLDER_ERRORS))
def test_image_folder_errors_name_the_file_or_folder(name, tmp_path, capsys):
    damage, culprit, phrase = FOLDER_ERRORS[name]
    root = tmp_path / "images"
    write_images(root, LAYOUT)
    write_images(root, {"train": {"dog": 1}}, seed=2, ext="jpg")  # train/dog/0.jpg beside the PNGs
    damage(root)
    code, _, err = run_main(["--pixels", f"folder:{root}", "--img-size", "8", "--data-dir", str(tmp_path / "data"),
                             "--knn-k", "1", "--probe-epochs", "0"], capsys)
    assert code == 2
    assert_one_error(err, phrase)
    assert str(root / culprit) in err


# --- the copies in mae_decay.py -------------------------------------------------------------

def test_mae_decay_copies_give_the_same_numbers():
    train_x, train_y, test_x, test_y = random_features(n_train=500, n_test=200, dim=16, seed=5)
    for temperature in (0.07, math.inf):
        ours = probe.knn_predict(train_x, train_y, test_x, k=[1, 10, 20], temperature=temperature)
        theirs = mae_decay.knn_predict(train_x, train_y, test_x, k=[1, 10, 20], temperature=temperature)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    for batch_size in (64, len(train_x)):
        args = (train_x, train_y, test_x, test_y)
        assert (probe.linear_probe(*args, epochs=5, lr=1e-2, batch_size=batch_size, seed=3)
                == mae_decay.linear_probe(*args, epochs=5, lr=1e-2, batch_size=batch_size, seed=3))
    assert probe.effective_rank(train_x) == mae_decay.effective_rank(train_x)
    assert probe.effective_rank(train_x, center=True) == mae_decay.effective_rank(train_x, center=True)


# that every copied definition is verbatim is tests/test_copies.py's job; here, that the copies give the same numbers


def test_built_in_shapes_identical():
    ours, theirs = probe.make_shapes(64, 16, seed=3), mae_decay.make_shapes(64, 16, seed=3)
    assert np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1])


def test_reads_the_features_file_mae_decay_writes(tmp_path):
    train_x, train_y, test_x, test_y = random_features(n_train=120, n_test=40, dim=6, classes=3, seed=9)
    path = str(tmp_path / "features.npz")
    mae_decay.save_features(path, train_x, train_y, test_x, test_y,
                            {"config": json.dumps({"alpha_min": 0.6}), "alpha_min": 0.6, "seed": 0, "classes": ["a", "b", "c"]})
    arrays, metadata = probe.read_features_file(path)
    assert torch.equal(arrays["train_features"], train_x) and torch.equal(arrays["test_labels"], test_y)
    assert metadata["classes"] == ["a", "b", "c"] and metadata["alpha_min"] == 0.6
