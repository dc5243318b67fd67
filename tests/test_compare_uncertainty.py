"""The comparison's error bars, validation split and compute budget, through `ssl-vit compare` on a tiny run."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ssl_vit.cli import main
from ssl_vit.eval.feature_cache import load_features
from ssl_vit.eval.knn import knn_classify
from ssl_vit.eval.uncertainty import decode_hits

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "compare_cifar10_subset.yaml")
TINY = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "mae.decoder_depth=1", "mae.decoder_dim=32",
        "mae.decoder_heads=2", "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16",
        "train.progress=false", "data.num_workers=1", "train.monitor_every=2"]  # at the end: what keep_best needs


def tiny_args(out, train, test, *extra):
    return ["compare", "--recipe", RECIPE, f"out_dir={out}", f"source.train={train}", f"source.test={test}",
            "overrides=[" + ", ".join(TINY) + "]", "budget.images=128", "budget.batch_size=64",
            "eval.probe_epochs=2", "eval.probe_lrs=[0.01, 0.1]",  # a grid still to choose from, a third of the fits
            "eval.batch_size=500", "random_init=false", *extra]


@pytest.mark.slow
def test_draws_error_bars_differences_and_validation_choices(train_shards, bundled_test, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = tiny_args(out, train_shards, bundled_test, "methods=[mae, supervised]", "eval.label_fractions=[0.01, 1.0]",
                     "eval.label_draws=2", "eval.knn_k=[1, 10, 20]")
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    # A validation split of 10 % of each class, carved from the training images and never trained on.
    fit, val = (json.loads(Path(report["shards"][s]).read_text()) for s in ("train", "val"))
    assert (fit["num_samples"], val["num_samples"]) == (4500, 500) and val["class_counts"] == [50] * 10
    rows = {(row["fraction"], row["model"]): row for row in report["rows"]}
    assert list(rows) == [(f, m) for f in (0.01, 1.0) for m in ("mae", "supervised", "raw_pixels")]
    for name in ("mae", "supervised", "raw_pixels"):
        assert rows[(0.01, name)]["runs"] == 2 and rows[(1.0, name)]["runs"] == 1  # one draw of every label
        assert rows[(1.0, name)]["num_labels"] == 4500 and rows[(0.01, name)]["num_labels"] == 40
    # Independent draws: different labelled images, each class-balanced; the supervised baseline trains per draw,
    # MAE once.
    draws = [json.loads((out / "labels" / d / "subsets.json").read_text())["fractions"]["0.01"] for d in ("", "d1")]
    assert draws[0]["keys"] != draws[1]["keys"] and draws[0]["per_class"] == draws[1]["per_class"]
    models = sorted(p.name for p in (out / "models").iterdir())
    assert models == ["mae", "supervised-f0.01", "supervised-f0.01-d1", "supervised-f1"]
    # Every run keeps its numbers and its hit on each test image; the cell is their mean ± std.
    runs = [r for r in report["runs"] if r["fraction"] == 0.01 and r["model"] == "mae"]
    assert [r["draw"] for r in runs] == [0, 1]
    for r in runs:
        for score, hits in (("knn_top1", "knn_hits"), ("linear_top1", "linear_hits")):
            assert len(r[hits]) == 1000 and decode_hits(r[hits]).mean() * 100 == pytest.approx(r[score])
        assert r["knn_k_by"].startswith("validation") and set(r["knn_val_top1"]) == {"1", "10", "20"}
        assert r["knn_k"] == max(r["knn_val_top1"], key=lambda k: (r["knn_val_top1"][k], -int(k)))
    # The k was chosen on the validation images: recomputed here from the cached features, bank = draw 0's labels.
    train, val_feats = (load_features(out / "features" / "mae" / s) for s in ("train", "val"))
    rows_of = np.isin(np.asarray(train.keys), draws[0]["keys"])
    recomputed = knn_classify(np.asarray(train.features)[rows_of], train.labels[rows_of], val_feats.features,
                              val_feats.labels, ks=[1, 10, 20])["k"]
    assert {k: v["top1"] for k, v in recomputed.items()} == pytest.approx(runs[0]["knn_val_top1"])
    mean, std = np.mean([r["knn_top1"] for r in runs]), np.std([r["knn_top1"] for r in runs], ddof=1)
    assert rows[(0.01, "mae")]["knn_top1"] == pytest.approx(mean)
    assert rows[(0.01, "mae")]["knn_top1_std"] == pytest.approx(std)
    low, high = rows[(1.0, "mae")]["knn_top1_ci"]
    assert low < rows[(1.0, "mae")]["knn_top1"] < high and high - low > 2  # 1,000 test images: a few points wide
    md = (out / "report.md").read_text()
    assert f"{mean:.1f} ± {std:.1f}" in md and f"[{low:.1f}, {high:.1f}]" in md
    # Paired differences for every pair with a baseline, per metric and fraction, worded from their intervals.
    pairs = {(d["fraction"], d["metric"], d["a"], d["b"]) for d in report["differences"]}
    assert pairs == {(f, m, a, b) for f in (0.01, 1.0) for m in ("knn", "linear")
                     for a, b in (("mae", "supervised"), ("mae", "raw_pixels"), ("supervised", "raw_pixels"))}
    for d in report["differences"]:
        assert d["significant"] == (d["ci"][0] > 0 or d["ci"][1] < 0) and "±" in d["text"]
        assert d["runs"] == (2 if d["fraction"] == 0.01 else 1)
        assert ("beats" in d["text"]) == d["significant"] and d["text"] in md
    assert len(report["goal"]) == 2 and all(("not met" in g) or ("met" in g) for g in report["goal"])
    # Compute: counted per image from the model (here MAE's decoder, as wide as this 1-block encoder, outweighs it)
    gf = report["gflops_per_image"]
    assert gf["mae"]["total"] > 0 and gf["supervised"]["total"] > 0 and rows[(1.0, "raw_pixels")]["train_tflops"] is None
    assert rows[(1.0, "mae")]["train_tflops"] == pytest.approx(gf["mae"]["total"] * 128 / 1e3)
    assert report["budget_mode"] == "images" and "equal images" in report["budget"] and "equal images" in md

    # tools/compare_on_validation.py (how long-budget levers are kept) scores the same validation k-NN from the cache
    # and never opens the test features.
    (out / "features" / "mae" / "test").rename(out / "test-hidden")
    scored = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_on_validation.py"), f"{out}:mae",
                             f"{out}:raw_pixels", "--ks", "1", "10", "20"], capture_output=True, text=True, cwd=ROOT)
    (out / "test-hidden").rename(out / "features" / "mae" / "test")
    assert scored.returncode == 0, scored.stderr[-2000:]
    on_val = json.loads(scored.stdout)["fractions"]
    full = next(r for r in report["runs"] if r["fraction"] == 1.0 and r["model"] == "mae")
    assert on_val["1.0"][f"{out}:mae"]["val_top1"] == pytest.approx(full["knn_val_top1"][full["knn_k"]], abs=0.01)
    assert on_val["0.01"][f"{out}:mae"]["draws"] == 2
    assert set(on_val["0.01"][f"{out}:raw_pixels"]["minus_reference"]) == {"points", "std", "ci95",
                                                                        "beyond_uncertainty"}

    # Re-running skips everything and gives the same report.
    capsys.readouterr()
    assert main(args) == 0
    assert "[run ]" not in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["rows"] == report["rows"]


def test_knn_k_is_chosen_on_validation_never_on_test():
    from ssl_vit.eval.feature_cache import FeatureSet
    from ssl_vit.pipelines.compare_choices import choose_knn_k

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 8))
    bank_labels = np.repeat([0, 1], 20)
    bank = FeatureSet(centres[bank_labels] + rng.normal(scale=2.0, size=(40, 8)), bank_labels,
                      [str(i) for i in range(40)], {})
    # a validation image sitting on a lone mislabelled-looking neighbour: k=1 is wrong, a wider vote right
    val_feats = centres[[0, 1] * 10] + rng.normal(scale=0.5, size=(20, 8))
    val = FeatureSet(val_feats, np.asarray([0, 1] * 10), [str(i) for i in range(20)], {})
    choice = choose_knn_k(bank, val, [1, 20], 0.07)
    assert choice["k"] == max((1, 20), key=lambda k: (choice["val_top1"][str(k)], -k))
    assert choice["by"].startswith("validation (20 images")
    assert choose_knn_k(bank, None, [10, 20, 100], 0.07)["k"] == 20
    assert choose_knn_k(bank, None, [5, 30], 0.07)["k"] == 5


def test_equal_compute_budget_gives_cheaper_methods_more_images():
    from ssl_vit.pipelines.compare_budget import budget_gflops, method_gflops, run_images
    from ssl_vit.pipelines.compare_config import load_compare_recipe

    overrides = ["budget.mode=flops", "budget.images=1000"]  # the demo's backbone and views
    cfg = load_compare_recipe(RECIPE, overrides)
    gflops = {m: method_gflops(cfg, m, 10) for m in cfg.methods}
    assert gflops["mae"]["total"] < gflops["supervised"]["total"] < gflops["dino"]["total"]
    images = {m: run_images(cfg, m, gflops) for m in cfg.methods}
    assert images["supervised"] == 1000  # the reference: budget.images at the labelled baseline's cost
    for m in cfg.methods:
        spent, budget = images[m] * gflops[m]["total"], 1000 * gflops["supervised"]["total"]
        assert budget - gflops[m]["total"] < spent <= budget  # whole images: within one image's cost
    cfg = load_compare_recipe(RECIPE, [*overrides, "budget.gflops=50"])
    assert budget_gflops(cfg, gflops)[0] == 50
    assert run_images(cfg, "mae", gflops) == int(50 / gflops["mae"]["total"])
    assert load_compare_recipe(RECIPE).budget.mode == "images"


def test_bad_budget_draws_and_validation_keys_are_named(capsys):
    for bad, key in (("budget.mode=gpu_hours", "budget.mode"), ("eval.label_draws=0", "eval.label_draws"),
                     ("eval.seeds=1.5", "eval.seeds"), ("source.val_fraction=1", "source.val_fraction"),
                     ("budget.reference=byol", "budget.reference")):
        assert main(["compare", "--recipe", RECIPE, bad]) == 2
        err = capsys.readouterr().err
        assert key in err and err.count("\n") == 1, err
    assert main(["compare", "--recipe", RECIPE, "--budget", "huge"]) == 2
    assert "no budget named 'huge'" in capsys.readouterr().err


def test_named_budget_and_thorough_are_one_flag_away():
    from ssl_vit.pipelines.compare_config import apply_budget, load_compare_recipe

    cfg = load_compare_recipe(RECIPE, apply_budget(RECIPE, [], "medium"))
    assert cfg.budget.images > load_compare_recipe(RECIPE).budget.images
    assert load_compare_recipe(RECIPE, apply_budget(RECIPE, ["budget.images=640"], "long")).budget.images == 640
    assert load_compare_recipe(RECIPE, apply_budget(RECIPE, [], "long")).budget.images == 2 * cfg.budget.images


@pytest.mark.slow
def test_flops_budget_and_pretraining_seeds(train_shards, bundled_test, tmp_path, capsys):
    """budget.mode=flops: each method trains to the same compute; eval.seeds=2: each seed a run of its own."""
    out = tmp_path / "flops"
    args = tiny_args(out, train_shards, bundled_test, "methods=[mae, supervised]", "eval.label_fractions=[1.0]",
                     "eval.linear_probe=false", "budget.mode=flops", "budget.images=640", "eval.seeds=2",
                     "random_init=true", "source.val_fraction=0",
                     "method_overrides={supervised: [train.keep_best=false]}")  # no validation split to choose on
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    gf = {m: report["gflops_per_image"][m]["total"] for m in ("mae", "supervised")}
    seen = {row["model"]: row["images_seen"] for row in report["rows"]}
    budget = 640 * gf["supervised"]  # the reference: budget.images at the labelled baseline's cost
    for m in ("mae", "supervised"):
        steps = max(1, int(budget / gf[m]) // 64)  # whole batches of 64
        assert seen[m] == steps * 64, (m, seen, gf)
    assert report["budget_mode"] == "flops" and "equal compute" in report["budget"]
    assert "budget.mode: flops" in (out / "report.md").read_text()

    assert sorted(p.name for p in (out / "models").iterdir()) == [
        "mae", "mae-s1", "random_init", "random_init-s1", "supervised-f1", "supervised-f1-s1"]
    seeds = [json.loads((out / "models" / m / "recipe.json").read_text())["seed"] for m in ("mae", "mae-s1")]
    assert seeds[1] == seeds[0] + 1
    rows = {row["model"]: row for row in report["rows"]}
    assert (rows["mae"]["runs"], rows["random_init"]["runs"], rows["raw_pixels"]["runs"]) == (2, 2, 1)
    assert "val" not in report["shards"] and rows["mae"]["knn_k_by"].startswith("fixed")  # no validation split
    (vs_pixels,) = [d for d in report["differences"] if d["metric"] == "knn" and d["a"] == "mae"
                    and d["b"] == "raw_pixels"]
    assert vs_pixels["runs"] == 2  # raw pixels, trained by no one, stand beside each seed


def test_thorough_and_budget_flags_expand_to_recipe_keys():
    from types import SimpleNamespace

    from ssl_vit.commands.compare import compare_overrides
    from ssl_vit.pipelines.compare_config import load_compare_recipe

    def cfg(**flags):
        args = SimpleNamespace(**{"recipe": RECIPE, "thorough": False, "budget": None, "overrides": [], **flags})
        return load_compare_recipe(RECIPE, compare_overrides(args))

    assert cfg().eval.seeds == 1 and cfg(thorough=True).eval.seeds == 3
    assert cfg(thorough=True, overrides=["eval.seeds=2"]).eval.seeds == 2  # the explicit key wins
    assert cfg(budget="long").budget.images == 600000
