"""A miniature comparison end to end through `ssl-vit compare`: every stage, the report files, resumability."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_vit.cli import main
from ssl_vit.errors import SslVitError
from ssl_vit.models.backbone import BackboneSpec, create_backbone
from ssl_vit.models.export import export_backbone
from ssl_vit.pipelines import figures
from ssl_vit.pipelines.compare import keys_digest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "compare_cifar10_subset.yaml")
TINY = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "mae.decoder_depth=1", "mae.decoder_dim=64",
        "mae.decoder_heads=2", "dino.out_dim=256", "dino.hidden_dim=64", "dino.bottleneck_dim=32",
        "train.progress=false", "data.num_workers=1", "train.monitor_every=2"]


def compare_args(out, train, test, *extra):
    overrides = "[" + ", ".join(TINY) + "]"
    return ["compare", "--recipe", RECIPE, f"out_dir={out}", f"source.train={train}", f"source.test={test}",
            f"overrides={overrides}", "budget.images=256", "budget.batch_size=64", "eval.probe_epochs=3",
            "eval.probe_lrs=[0.01, 0.1]",  # a grid still to choose from, a third of the default's fits
            "eval.finetune=true", "eval.finetune_images=128", "eval.batch_size=250", *extra]


@pytest.mark.slow
def test_miniature_comparison_end_to_end(train_shards, bundled_test, tmp_path, capsys):
    out = tmp_path / "cmp"
    # a published backbone as a row: any timm folder (here our own export of a 16-px ViT), evaluated at its size
    spec = BackboneSpec(img_size=16, patch_size=8, kwargs=dict(depth=1, embed_dim=32, num_heads=2))
    export_backbone(create_backbone(spec), spec, tmp_path / "published" / "backbone.safetensors")
    args = compare_args(out, train_shards, bundled_test, "eval.label_fractions=[0.01, 1.0]", "eval.label_draws=1",
                        f"backbones={{published: 'local-dir:{tmp_path / 'published'}'}}")
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["label_fractions"] == [0.01, 1.0]
    rows = {(row["fraction"], row["model"]): row for row in report["rows"]}
    names = ["mae", "dino", "supervised", "published", "random_init", "raw_pixels"]
    assert json.loads((out / "features" / "published" / "test" / "meta.json").read_text())["image_size"] == 16
    assert list(rows) == [(f, name) for f in (0.01, 1.0) for name in names]
    subsets = json.loads((out / "labels" / "subsets.json").read_text())["fractions"]
    for f, n in ((0.01, 40), (1.0, 4500)):  # of the 4,500 training images left after the validation split
        for name in names:  # every model evaluated on the same labelled subset
            assert rows[(f, name)]["num_labels"] == n, (f, name)
            assert rows[(f, name)]["labels_digest"] == keys_digest(subsets[f"{f:g}"]["keys"])
        assert rows[(f, "supervised")]["pretrain_labels"] == n and rows[(f, "mae")]["pretrain_labels"] == 0
        for name in ("mae", "dino", "supervised"):
            assert rows[(f, name)]["images_seen"] == 256 == report["budget_images"]  # the same budget everywhere
            assert rows[(f, name)]["method"] == name and rows[(f, name)]["train_seconds"] > 0
            assert 0 <= rows[(f, name)]["finetune_top1"] <= 100
        for name in names:
            row = rows[(f, name)]
            assert 0 <= row["knn_top1"] <= row["knn_top5"] <= 100 and 0 <= row["linear_top1"] <= 100, name
        assert rows[(f, "raw_pixels")]["finetune_top1"] is None and rows[(f, "published")]["finetune_top1"] is None
    # SSL models are pretrained once for every fraction; the supervised baseline once per fraction, on its labels
    assert rows[(0.01, "mae")]["weights"] == rows[(1.0, "mae")]["weights"] == "mae"
    assert rows[(0.01, "supervised")]["weights"] != rows[(1.0, "supervised")]["weights"]
    sup_index = json.loads((out / "labels" / "f0.01" / "shards-index.json").read_text())
    assert sup_index["class_counts"] == [2 * 4] * 10  # 4 labelled images per class, listed twice: ≥ one batch of 64
    assert rows[(0.01, "mae")]["probe_selection"].startswith("4-fold")
    assert rows[(1.0, "mae")]["probe_selection"] == "hold-out split"
    # The test split was written into shards by the pipeline: every test image evaluated once.
    test_meta = json.loads((out / "features" / "mae" / "test" / "meta.json").read_text())
    assert test_meta["num"] == 1000 and test_meta["skipped"] == 0

    # report.md's tables and the printed tables say what report.json says.
    md = (out / "report.md").read_text()
    assert "### 1% of the labels (40 labelled training images" in md and "### 100% of the labels" in md
    tables = md.split("### ")[1:]
    for f, table in zip((0.01, 1.0), tables):
        header = next(l for l in table.splitlines() if l.startswith("| model |"))
        columns = [c.strip() for c in header.strip("|").split("|")]
        knn, linear = columns.index("k-NN top-1"), columns.index("linear-probe top-1")
        for name in names:
            row = rows[(f, name)]
            line = next(l for l in table.splitlines() if l.startswith(f"| {name} |"))
            cells = [c.strip() for c in line.strip("|").split("|")]
            # a cell is the mean, then its spread (± std over runs, or a [95 % interval])
            assert cells[knn].split()[0] == f"{row['knn_top1']:.1f}", line
            assert cells[linear].split()[0] == f"{row['linear_top1']:.1f}", line
            assert line in printed
    # k-NN monitored during pretraining (on the test set, the recipe's default monitor set): the figure's third panel
    for model in ("mae", "dino", "supervised-f0.01"):
        curve = figures.monitor_curve(out / "models" / model)
        assert curve["step"].tolist() == [2, 4] and curve["images"].tolist() == [128, 256], model
        assert all(0 <= v <= 100 for v in curve["top1"])
    with Image.open(out / "comparison.png") as im:
        assert im.size[0] > 1700  # three panels (two are ~1500 px wide)
    for png in ("label_efficiency.png", "comparison.png", "retrieval.png", "attention.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100

    # Re-running skips every finished stage and reproduces the same report.
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[run ]" not in printed and printed.count("[skip]") >= 30
    assert json.loads((out / "report.json").read_text())["rows"] == report["rows"]


def test_failing_stage_is_named_and_finished_stages_are_kept(train_shards, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(compare_args(out, train_shards, tmp_path / "missing.tar.gz", "methods=[mae]"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "stage 'shards:test' failed" in err and "missing.tar.gz" in err and "\n" not in err, err


def stage_files(out: Path) -> dict[str, int]:
    """mtime (ns) of every file the finished stages wrote: shards, the model, its features, the evaluation."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns
            for folder in ("shards", "models", "features", "eval") for p in sorted((out / folder).rglob("*"))
            if p.is_file()}


@pytest.mark.slow
def test_a_failed_run_keeps_its_finished_stages_and_the_rerun_does_not_redo_them(train_shards, bundled_test,
                                                                                 tmp_path, capsys):
    out = tmp_path / "cmp"
    rows = ["methods=[mae]", "random_init=false", "eval.raw_pixels=false", "eval.finetune=false",
            "eval.label_fractions=[1.0]"]
    broken = f"backbones={{broken: 'local-dir:{tmp_path / 'no-such-backbone'}'}}"
    assert main(compare_args(out, train_shards, bundled_test, *rows, broken)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the stages' progress bars
    assert err.startswith("error: stage 'features:broken:train' failed") and "no-such-backbone" in err, err
    finished = stage_files(out)
    for done in ("shards/test-index.json", "models/mae/summary.json", "models/mae/backbone.safetensors",
                 "features/mae/train/meta.json", "features/mae/test/meta.json"):
        assert done in finished, sorted(finished)

    assert main(compare_args(out, train_shards, bundled_test, *rows)) == 0
    printed = capsys.readouterr().out
    for stage in ("shards:test", "pretrain:mae", "features:mae:train", "features:mae:test"):
        assert f"[skip] {stage}:" in printed and f"[run ] {stage}\n" not in printed, stage
    assert "[run ] evaluate:" in printed
    again = stage_files(out)
    assert {name: again[name] for name in finished} == finished  # not one finished file rewritten
    report = json.loads((out / "report.json").read_text())
    assert [(row["fraction"], row["model"]) for row in report["rows"]] == [(1.0, "mae")]


def test_bad_comparison_recipe_names_the_key(tmp_path, capsys):
    assert main(["compare", "--recipe", RECIPE, "budget.imagez=5"]) == 2
    assert "budget.imagez" in capsys.readouterr().err
    assert main(["compare", "--recipe", RECIPE, "methods=[mae, byol]"]) == 2
    assert "byol" in capsys.readouterr().err


def test_the_comparison_probes_the_probes_own_lr_grid():
    from ssl_vit.eval.linear_probe import DEFAULT_LRS
    from ssl_vit.pipelines.compare_config import load_compare_recipe

    assert load_compare_recipe(RECIPE).eval.probe_lrs == list(DEFAULT_LRS)


def test_labelled_subsets_are_nested_class_balanced_and_seeded(train_shards):
    from ssl_vit.eval.label_subsets import label_table, nested_subsets

    keys, labels = label_table(str(train_shards))
    assert len(keys) == 5000 and np.bincount(labels).tolist() == [500] * 10
    subsets = nested_subsets(keys, labels, [1.0, 0.01, 0.1], seed=0)
    assert list(subsets) == [0.01, 0.1, 1.0]
    label_of = dict(zip(keys, labels.tolist()))
    for f, per_class in ((0.01, 5), (0.1, 50), (1.0, 500)):
        assert np.bincount([label_of[k] for k in subsets[f]], minlength=10).tolist() == [per_class] * 10
    assert set(subsets[0.01]) < set(subsets[0.1]) < set(subsets[1.0]) == set(keys)
    assert nested_subsets(keys, labels, [0.01, 0.1], seed=0)[0.01] == subsets[0.01]  # a pure function of the seed
    assert nested_subsets(keys, labels, [0.01], seed=1)[0.01] != subsets[0.01]
    # an imbalanced set: each class keeps the same count, a class smaller than that keeps all it has
    rare = [k for k in keys if label_of[k] != 3 or k in subsets[0.01]]
    small = nested_subsets(rare, [label_of[k] for k in rare], [0.02, 0.5], seed=0)
    counts = {f: np.bincount([label_of[k] for k in ks], minlength=10).tolist() for f, ks in small.items()}
    assert counts[0.02] == [9, 9, 9, 5, 9, 9, 9, 9, 9, 9] and counts[0.5][3] == 5 and counts[0.5][0] == 225
    with pytest.raises(SslVitError, match="eval.label_fractions"):
        nested_subsets(keys, labels, [0.0, 0.5])


def test_one_knob_for_a_new_resolution(train_shards, bundled_test, tmp_path, capsys):
    """`model.img_size=16` on the command line reaches every training recipe; the view sizes follow it (DINO's local
    crops in proportion, rounded up to whole patches), a method's own overrides reach only that method."""
    out = tmp_path / "cmp16"
    args = compare_args(out, train_shards, bundled_test, "model.img_size=16", "model.patch_size=8",
                        "methods=[mae, dino]", "method_overrides={dino: [views.num_local=1]}", "random_init=false",
                        "eval.label_fractions=[1.0]", "eval.linear_probe=false", "eval.finetune=false",
                        "budget.images=128")
    assert main(args) == 0, capsys.readouterr().err
    mae = json.loads((out / "models" / "mae" / "recipe.json").read_text())
    dino = json.loads((out / "models" / "dino" / "recipe.json").read_text())
    assert mae["model"]["img_size"] == dino["model"]["img_size"] == 16 and mae["views"]["size"] == 16
    assert (dino["views"]["global_size"], dino["views"]["local_size"], dino["views"]["num_local"]) == (16, 8, 1)
    assert mae["views"].get("num_local") is None
    for name, dim in (("mae", 64), ("dino", 64), ("raw_pixels", 3 * 16 * 16)):
        meta = json.loads((out / "features" / name / "test" / "meta.json").read_text())
        assert meta["image_size"] == 16 and meta["dim"] == dim, name
    assert main(["compare", "--recipe", RECIPE, "model.imgsize=16"]) == 2
    assert "model.imgsize" in capsys.readouterr().err
    assert main(["compare", "--recipe", RECIPE, "method_overrides={byol: [x=1]}"]) == 2
    assert "method_overrides.byol" in capsys.readouterr().err


def test_ssl_pretrains_on_extra_unlabeled_images_too(train_shards, bundled_test, tmp_path, capsys):
    """`source.unlabeled`: a folder of photos without labels joins MAE/DINO's pretraining data, never the
    supervised baseline's, nor any labelled subset."""
    photos = tmp_path / "photos" / "holiday"
    photos.mkdir(parents=True)
    for i in range(40):
        Image.new("RGB", (40, 30), (i * 6, 255 - i * 6, 90)).save(photos / f"IMG_{i:04d}.jpg")
    out = tmp_path / "cmp"
    args = compare_args(out, train_shards, bundled_test, f"source.unlabeled={tmp_path / 'photos'}",
                        "methods=[mae, supervised]", "random_init=false", "eval.raw_pixels=false",
                        "eval.label_fractions=[0.01]", "eval.linear_probe=false", "eval.finetune=false",
                        "budget.images=128")
    assert main(args) == 0, capsys.readouterr().err
    unlabeled = json.loads((out / "shards" / "unlabeled-index.json").read_text())
    assert unlabeled["labeled"] is False and unlabeled["num_samples"] == 40
    mae = json.loads((out / "models" / "mae" / "recipe.json").read_text())
    supervised = json.loads((out / "models" / "supervised-f0.01" / "recipe.json").read_text())
    # the training images less the validation split carved from them (source.val_fraction), then the unlabeled ones
    assert mae["data"]["train"] == [str(out / "shards" / "split" / "fit" / "shards-index.json"),
                                    str(out / "shards" / "unlabeled-index.json")]
    assert supervised["data"]["train"] == str(out / "labels" / "f0.01" / "shards-index.json")
    # 1 % of the 4,500 training images left after the validation split: 4 of each class's 450
    assert len(json.loads((out / "labels" / "subsets.json").read_text())["fractions"]["0.01"]["keys"]) == 40
