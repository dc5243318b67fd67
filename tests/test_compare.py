"""A miniature comparison end to end through `ssl-vit compare`: every stage, the report files, resumability."""
import json
from pathlib import Path

import pytest
from PIL import Image

from ssl_vit.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "compare_cifar10_subset.yaml")
TINY = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "mae.decoder_depth=1", "mae.decoder_dim=64",
        "mae.decoder_heads=2", "dino.out_dim=256", "dino.hidden_dim=64", "dino.bottleneck_dim=32",
        "train.progress=false", "data.num_workers=1"]


def compare_args(out, train, test, *extra):
    overrides = "[" + ", ".join(TINY) + "]"
    return ["compare", "--recipe", RECIPE, f"out_dir={out}", f"source.train={train}", f"source.test={test}",
            f"overrides={overrides}", "budget.images=256", "budget.batch_size=64", "eval.probe_epochs=3",
            "eval.finetune=true", "eval.finetune_images=128", "eval.batch_size=250", *extra]


@pytest.mark.slow
def test_miniature_comparison_end_to_end(train_shards, bundled_test, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(compare_args(out, train_shards, bundled_test)) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    rows = {row["model"]: row for row in report["rows"]}
    assert list(rows) == ["mae", "dino", "supervised", "random_init", "raw_pixels"]
    for name in ("mae", "dino", "supervised"):
        assert rows[name]["images_seen"] == 256 == report["budget_images"]  # the same budget for every method
        assert rows[name]["method"] == name and rows[name]["train_seconds"] > 0
        assert 0 <= rows[name]["finetune_top1"] <= 100
    for name, row in rows.items():
        assert 0 <= row["knn_top1"] <= row["knn_top5"] <= 100, name
        assert 0 <= row["linear_top1"] <= 100, name
    assert rows["raw_pixels"]["finetune_top1"] is None
    # The test split was written into shards by the pipeline: every test image evaluated once.
    test_meta = json.loads((out / "features" / "mae" / "test" / "meta.json").read_text())
    assert test_meta["num"] == 1000 and test_meta["skipped"] == 0

    # report.md's table and the printed table say what report.json says.
    md = (out / "report.md").read_text()
    for row in report["rows"]:
        line = next(l for l in md.splitlines() if l.startswith(f"| {row['model']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[6] == f"{row['knn_top1']:.1f}" and cells[8] == f"{row['linear_top1']:.1f}", line
        assert line in printed
    for png in ("comparison.png", "retrieval.png", "attention.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100

    # Re-running skips every finished stage and reproduces the same report.
    assert main(compare_args(out, train_shards, bundled_test)) == 0
    printed = capsys.readouterr().out
    assert "[run ]" not in printed and printed.count("[skip]") >= 20
    assert json.loads((out / "report.json").read_text())["rows"] == report["rows"]


def test_failing_stage_is_named_and_finished_stages_are_kept(train_shards, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(compare_args(out, train_shards, tmp_path / "missing.tar.gz", "methods=[mae]"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "stage 'shards:test' failed" in err and "missing.tar.gz" in err and "\n" not in err, err


def test_bad_comparison_recipe_names_the_key(tmp_path, capsys):
    assert main(["compare", "--recipe", RECIPE, "budget.imagez=5"]) == 2
    assert "budget.imagez" in capsys.readouterr().err
    assert main(["compare", "--recipe", RECIPE, "methods=[mae, byol]"]) == 2
    assert "byol" in capsys.readouterr().err


def test_the_comparison_probes_the_probes_own_lr_grid():
    from ssl_vit.eval.linear_probe import DEFAULT_LRS
    from ssl_vit.pipelines.compare_config import load_compare_recipe

    assert load_compare_recipe(RECIPE).eval.probe_lrs == list(DEFAULT_LRS)
