"""Linear-probe grid: accuracy on separable data, selection blind to test labels, pooling slices, bad input."""
import json

import numpy as np
import pytest

from ssl_vit.cli import main as cli_main
from ssl_vit.errors import SslVitError
from ssl_vit.eval.feature_cache import FeatureSet, save_features
from ssl_vit.eval.linear_probe import DEFAULT_LRS, cosine_factor, linear_probe, pooling_slices, stratified_split

LRS = (1e-3, 1e-2, 1e-1)


def make_set(rng, centres, n, noise, pooling="cls", extra=None):
    y = rng.integers(0, len(centres), n)
    x = centres[y] + noise * rng.normal(size=(n, centres.shape[1]))
    if extra is not None:
        x = np.concatenate([x, extra(n)], axis=1)
    return FeatureSet(x.astype(np.float32), y.astype(np.int64), [f"{i:05d}" for i in range(n)], {"pooling": pooling})


def test_separable_data_is_solved():
    rng = np.random.default_rng(0)
    centres = 4.0 * rng.normal(size=(5, 16))
    train, test = make_set(rng, centres, 600, 1.0), make_set(rng, centres, 200, 1.0)
    r = linear_probe(train, test, lrs=LRS, epochs=15, batch_size=64, num_threads=1)
    assert r["val_top1"] == 100.0 and r["test_top1"] >= 99.0 and r["test_top5"] == 100.0
    assert r["num_train"] + r["num_val"] == 600 and r["num_val"] == 60 and r["num_test"] == 200
    assert set(r["grid"]) == {"0.001", "0.01", "0.1"} and r["best_lr"] in LRS
    assert r["best_pooling"] == "cls" and list(r["pooling_grid"]) == ["cls"]


def hard_problem(seed=1):
    """Overlapping classes: the grid entries disagree, so the choice is not trivial."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 24))
    return make_set(rng, centres, 500, 1.3), make_set(rng, centres, 200, 1.3)


def test_selection_ignores_test_labels():
    train, test = hard_problem()
    lrs = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    first = linear_probe(train, test, lrs=lrs, epochs=6, batch_size=32, num_threads=1)
    assert len(set(first["grid"].values())) > 1  # the lrs really differ on validation
    shuffled = FeatureSet(test.features, np.random.default_rng(5).permutation(test.labels), test.keys, test.meta)
    second = linear_probe(train, shuffled, lrs=lrs, epochs=6, batch_size=32, num_threads=1)
    assert (second["best_lr"], second["best_pooling"], second["grid"], second["val_top1"]) == \
        (first["best_lr"], first["best_pooling"], first["grid"], first["val_top1"])
    assert second["test_top1"] < first["test_top1"] - 10  # the test labels were really used, after selection
    again = linear_probe(train, test, lrs=lrs, epochs=6, batch_size=32, num_threads=1)
    assert again["grid"] == first["grid"] and again["test_top1"] == first["test_top1"]  # deterministic


def test_cls_avg_caches_grid_over_poolings():
    rng = np.random.default_rng(2)
    centres = 3.0 * rng.normal(size=(4, 8))
    noise = lambda n: rng.normal(size=(n, 8))  # noqa: E731 - the avg half carries no class information
    train = make_set(rng, centres, 400, 1.0, "cls+avg", noise)
    test = make_set(rng, centres, 100, 1.0, "cls+avg", noise)
    r = linear_probe(train, test, lrs=(1e-2, 1e-1), epochs=10, batch_size=64, num_threads=1)
    assert list(r["pooling_grid"]) == ["cls", "avg", "cls+avg"]
    assert r["grid"] == r["pooling_grid"]["cls+avg"]
    assert max(r["pooling_grid"]["avg"].values()) < 60.0  # chance is 25 %
    assert min(r["pooling_grid"]["cls"].values()) > 90.0
    assert r["best_pooling"] in ("cls", "cls+avg") and r["test_top1"] > 90.0


def test_pooling_slices():
    assert pooling_slices({"pooling": "avg"}, 6) == {"avg": slice(0, 6)}
    assert pooling_slices({}, 6) == {"cls": slice(0, 6)}
    assert pooling_slices({"pooling": "cls+avg"}, 6) == {"cls": slice(0, 3), "avg": slice(3, 6),
                                                         "cls+avg": slice(0, 6)}
    # DINO's last-4-blocks CLS concatenation followed by the average pool: [cls x 4 ‖ avg]
    assert pooling_slices({"pooling": "cls+avg", "last_blocks": 4}, 20)["avg"] == slice(16, 20)
    with pytest.raises(SslVitError, match="not divisible"):
        pooling_slices({"pooling": "cls+avg"}, 7)


def test_stratified_split():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20 + [3])
    fit, val = stratified_split(labels, 0.1, seed=3)
    assert np.bincount(labels[val], minlength=4).tolist() == [5, 3, 2, 0]  # a lone sample stays in fit
    assert len(np.intersect1d(fit, val)) == 0 and len(fit) + len(val) == len(labels)
    fit2, val2 = stratified_split(labels, 0.1, seed=3)
    assert val.tolist() == val2.tolist()
    assert stratified_split(labels, 0.1, seed=4)[1].tolist() != val.tolist()
    with pytest.raises(SslVitError, match="no validation samples"):
        stratified_split(np.array([0, 1, 2]), 0.1, seed=0)


def test_cosine_factor():
    assert cosine_factor(0, 100) == 1.0
    assert cosine_factor(50, 100) == pytest.approx(0.5)
    assert cosine_factor(100, 100) == pytest.approx(0.0)
    assert cosine_factor(25, 100) == pytest.approx(0.5 * (1 + np.cos(np.pi / 4)))


def test_bad_input():
    train, test = hard_problem()
    missing = FeatureSet(train.features, np.where(np.arange(len(train)) == 7, -1, train.labels), train.keys, {})
    with pytest.raises(SslVitError, match="train labels missing: 1 samples"):
        linear_probe(missing, test)
    unlabelled = FeatureSet(test.features, np.full(len(test), -1), test.keys, {})
    with pytest.raises(SslVitError, match="test labels missing"):
        linear_probe(train, unlabelled)
    narrow = FeatureSet(test.features[:, :10], test.labels, test.keys, {})
    with pytest.raises(SslVitError, match="dim 24 but test features have dim 10"):
        linear_probe(train, narrow)
    with pytest.raises(SslVitError, match="val_fraction"):
        linear_probe(train, test, val_fraction=0.0)
    with pytest.raises(SslVitError, match="lrs"):
        linear_probe(train, test, lrs=(0.1, -1.0))
    unseen = FeatureSet(test.features, np.full(len(test), 9), test.keys, {})
    with pytest.raises(SslVitError, match="only have 6 classes"):
        linear_probe(train, unseen, lrs=(0.1,), epochs=1)


def test_cli_linear_probe(tmp_path, capsys):
    train, test = hard_problem(3)
    for name, fs in (("train", train), ("test", test)):
        save_features(tmp_path / name, fs.features, fs.labels, fs.keys, {"pooling": "cls"})
    rc = cli_main(["linear-probe", "--train-features", str(tmp_path / "train"), "--test-features",
                   str(tmp_path / "test"), "--lrs", "0.01", "0.1", "--epochs", "3", "--batch-size", "64",
                   "--threads", "1", "--out", str(tmp_path / "probe.json")])
    assert rc == 0
    saved = json.loads((tmp_path / "probe.json").read_text())
    direct = linear_probe(train, test, lrs=(0.01, 0.1), epochs=3, batch_size=64, num_threads=1)
    assert saved["grid"] == direct["grid"] and saved["test_top1"] == direct["test_top1"]
    assert "chosen: pooling cls" in capsys.readouterr().out


def test_cli_default_grid_is_the_probes_own(tmp_path):
    train, test = hard_problem(3)
    for name, fs in (("train", train), ("test", test)):
        save_features(tmp_path / name, fs.features, fs.labels, fs.keys, {"pooling": "cls"})
    assert cli_main(["linear-probe", "--train-features", str(tmp_path / "train"), "--test-features",
                     str(tmp_path / "test"), "--epochs", "1", "--threads", "1", "--out", str(tmp_path / "p.json")]) == 0
    assert list(json.loads((tmp_path / "p.json").read_text())["grid"]) == [f"{lr:g}" for lr in DEFAULT_LRS]


def test_few_labels_per_class_select_by_cross_validation():
    """5 labels per class (1 % of the CIFAR-10 subset): no hold-out split is possible, so 5 folds each leave one
    image of every class out, and the chosen lr is refit on all 5; with one image per class nothing is scored."""
    from ssl_vit.eval.linear_probe import selection_folds

    rng = np.random.default_rng(4)
    centres = 3.0 * rng.normal(size=(4, 16))
    y = np.repeat(np.arange(4), 5)
    folds = selection_folds(y, 0.1, seed=0)
    assert len(folds) == 5
    for fit, val in folds:
        assert np.bincount(y[val], minlength=4).tolist() == [1, 1, 1, 1] and len(np.intersect1d(fit, val)) == 0
    assert sorted(np.concatenate([val for _, val in folds]).tolist()) == list(range(20))
    train = FeatureSet((centres[y] + rng.normal(size=(20, 16))).astype(np.float32), y, [f"{i:02d}" for i in range(20)],
                       {"pooling": "cls"})
    _, test = make_set(rng, centres, 10, 1.0), make_set(rng, centres, 200, 1.0)
    r = linear_probe(train, test, lrs=LRS, epochs=20, batch_size=64, num_threads=1)
    assert r["selection"].startswith("5-fold") and r["num_train"] == 20 and r["num_val"] == 20
    assert r["test_top1"] > 80.0 and set(r["grid"]) == {"0.001", "0.01", "0.1"}

    one_shot = FeatureSet(train.features[::5], y[::5], train.keys[::5], {"pooling": "cls"})
    assert selection_folds(one_shot.labels, 0.1, seed=0) == []
    r = linear_probe(one_shot, test, lrs=LRS, epochs=20, batch_size=64, num_threads=1)
    assert r["selection"].startswith("fixed lr") and r["best_lr"] == 1e-2 and r["grid"] is None


def test_cross_validated_choice_is_refit_on_every_labelled_image():
    """Labels with no structure at all (random features, random classes), scored on the training images themselves:
    only a head that was fit on every image can know all their labels. A head from one fold never saw that fold's
    images (one per class), and on them it can only guess."""
    rng = np.random.default_rng(7)
    y = np.repeat(np.arange(5), 4)  # 4 labels per class: 4-fold cross-validation
    x = rng.normal(size=(20, 64)).astype(np.float32)
    train = FeatureSet(x, y, [f"{i:02d}" for i in range(20)], {"pooling": "cls"})
    r = linear_probe(train, train, lrs=(0.1, 0.3), epochs=60, batch_size=8, num_threads=1)
    assert r["selection"] == "4-fold cross-validation, refit on all" and r["num_train"] == 20
    assert r["val_top1"] <= 60.0  # held-out images of random labels: near chance (20 %)
    assert r["test_top1"] == 100.0  # every image's own label: the refit used all of them

    # With a hold-out split (10 labels per class or more) the head trained on the other 90 % is kept (the README):
    # the held-out images' random labels are unknown to it.
    y = np.repeat(np.arange(5), 20)
    x = rng.normal(size=(100, 64)).astype(np.float32)
    train = FeatureSet(x, y, [f"{i:03d}" for i in range(100)], {"pooling": "cls"})
    r = linear_probe(train, train, lrs=(0.1, 0.3), epochs=60, batch_size=8, num_threads=1)
    assert r["selection"] == "hold-out split" and r["num_train"] == 90 and r["num_val"] == 10
    assert 90.0 <= r["test_top1"] < 100.0
