"""Tests for probe.py: k-NN against a brute-force loop, the linear probe on separable and shuffled
data, effective-rank properties, the subspace projection, every user error, and agreement with the
copies in mae_decay.py. Deterministic, CPU only, a few seconds; files only under tmp_path."""
import inspect
import json
import math
import os
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
    Returns {k: predictions}."""
    train = train_x.double().numpy()
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    labels = train_y.tolist()
    predictions = {k: [] for k in ks}
    for query in test_x.double().numpy():
        sims = train @ (query / np.linalg.norm(query))
        nearest = np.argsort(-sims, kind="stable")[:max(ks)].tolist()
        for k in ks:
            votes = [0.0] * num_classes
            for i in nearest[:k]:
                votes[labels[i]] += 1.0 if math.isinf(temperature) else math.exp(sims[i] / temperature)
            predictions[k].append(votes.index(max(votes)))  # ties -> smallest label, as torch's argmax
    return {k: torch.tensor(p) for k, p in predictions.items()}


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
    expected = brute_force_knn(train_x, train_y, test_x, ks, temperature, 5)
    for k in ks:
        assert len(predictions[k]) == n_test and torch.equal(predictions[k], expected[k])
    # one int k gives the same as the list, and chunking changes nothing
    assert torch.equal(probe.knn_predict(train_x, train_y, test_x, k=20, temperature=temperature, chunk=7), predictions[20])


def test_knn_accepts_numpy_and_gives_the_same():
    train_x, train_y, test_x, _ = random_features()
    as_numpy = probe.knn_predict(train_x.numpy(), train_y.numpy().astype(np.int32), test_x.numpy(), k=20)
    assert torch.equal(as_numpy, probe.knn_predict(train_x, train_y, test_x, k=20))


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
    results = json.loads(out.read_text())
    assert [r["input"] for r in results] == [npz, pt]
    npz_result, pt_result = results
    for key in ("knn", "knn_majority", "linear_probe", "effective_rank", "subspace"):
        assert npz_result[key] == pt_result[key]  # the same arrays in both formats give the same numbers
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


@pytest.mark.parametrize("argv,phrase", [
    (["--knn-k", "400"], "only 300 training samples"),
    (["--subspace", "middle:50"], "--subspace items"),
    (["--knn-k", "ten"], "--knn-k"),
])
def test_bad_flags_are_one_sentence(argv, phrase, tmp_path, capsys):
    path = write_features(tmp_path / "ok.npz", good_arrays())
    assert probe.main([path, "--probe-epochs", "0", *argv]) == 2
    assert phrase in capsys.readouterr().err


def test_integral_float_labels_and_missing_file(tmp_path, capsys):
    arrays = break_arrays(lambda a: a.update(train_labels=a["train_labels"].astype(np.float32)))
    assert probe.main([write_features(tmp_path / "f.npz", arrays), *FAST]) == 0  # 0.0, 1.0, 2.0 are class ids
    assert probe.main([str(tmp_path / "missing.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err


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


COPIED = ["knn_predict", "linear_probe", "AUTHORS_PROBE", "effective_rank", "DATA_HELP", "CIFAR", "IDX", "SYSTEM_DIRS", "md5sum",
          "download", "_ArraysOnly", "read_cifar_batch", "load_cifar", "read_idx", "load_idx", "IMAGE_EXTENSIONS",
          "load_image_resized", "load_folder", "SHAPE_NAMES", "shape_signed_distance", "make_shapes",
          "load_dataset", "atomic_save"]


@pytest.mark.parametrize("name", COPIED)
def test_copied_code_is_verbatim(name):
    ours, theirs = getattr(probe, name), getattr(mae_decay, name)
    if callable(ours):
        strip = lambda source: source.replace("@accepts_arrays\n", "")
        assert strip(inspect.getsource(inspect.unwrap(ours))) == inspect.getsource(inspect.unwrap(theirs))
    else:
        assert ours == theirs


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
