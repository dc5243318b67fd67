"""`train.keep_best`, through `ssl-vit pretrain`: the exported backbone is the monitored step with the best k-NN on
data.monitor (not the last step), a resume from a checkpoint keeps that choice, and the comparison refuses to make it
on the test set."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ssl_vit.cli import main
from ssl_vit.errors import SslVitError
from test_train import recipe_for

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
# A lr far above the recipe's on 2-block ViT makes the monitored k-NN go up and down within a few steps.
TINY = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "train.progress=false", "train.log_with=[]",
        "data.num_workers=0", "data.batch_size=32", "train.epochs=0", f"train.steps={STEPS}", "train.log_every=1",
        "optim.base_lr=3e-2", "optim.warmup_epochs=0", "data.eval_resize=32", "train.monitor_every=2",
        "train.monitor_samples=400", "train.keep_best=true", "train.checkpoint_every=1", "train.keep_checkpoints=20"]


def run(out: Path, train_shards, test_shards, *extra) -> dict:
    assert main(["pretrain", "--recipe", recipe_for("supervised"), *TINY, f"data.train={train_shards}",
                 f"data.monitor={test_shards}", f"train.out_dir={out}", *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def monitored(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {row["step"]: row["monitor_knn_top1"] for row in rows if "monitor_knn_top1" in row}


def knn_of_export(out: Path, test_shards) -> float:
    """The monitor's own score (400 class-balanced images, odd rows against even ones) of the exported backbone."""
    from ssl_vit.eval.monitor import KnnMonitor
    from ssl_vit.loading import load_backbone

    backbone, _ = load_backbone(str(out))
    return KnnMonitor(test_shards, 32, resize=32, max_samples=400)(backbone, torch.device("cpu"))["monitor_knn_top1"]


@pytest.fixture(scope="module")
def straight(train_shards, test_shards, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("keep_best") / "straight"
    return out, run(out, train_shards, test_shards)


def test_the_export_is_the_best_monitored_step_not_the_last(straight, test_shards):
    out, summary = straight
    scores = monitored(out)
    assert sorted(scores) == list(range(2, STEPS + 1, 2))
    best = max(scores, key=lambda s: (scores[s], -s))  # the earlier of equal scores
    assert best != STEPS and scores[best] > scores[STEPS], scores  # else this test could not tell best from last
    kept = summary["kept"]
    assert kept == {"by": "monitor_knn_top1", "step": best, "monitor_knn_top1": scores[best], "last_step": STEPS,
                    "last_monitor_knn_top1": scores[STEPS]}
    assert json.loads((out / "backbone.json").read_text())["step"] == best
    assert knn_of_export(out, test_shards) == pytest.approx(scores[best], abs=1e-6)


def test_a_resume_keeps_the_best_it_had_seen(straight, train_shards, test_shards, tmp_path):
    """Resumed after the best step, in another folder: the weights of the best step came with the checkpoint."""
    out, summary = straight
    best = summary["kept"]["step"]
    resumed = tmp_path / "resumed"
    again = run(resumed, train_shards, test_shards, "--resume-from", str(out / "checkpoints" / f"ckpt-{best + 1:08d}"))
    assert again["kept"] == summary["kept"]
    first, second = load_file(str(out / "backbone.safetensors")), load_file(str(resumed / "backbone.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_the_last_step_is_a_candidate_when_it_is_not_a_monitored_one(train_shards, test_shards, tmp_path):
    out = tmp_path / "odd"
    summary = run(out, train_shards, test_shards, "train.steps=3", "train.checkpoint_every=0")
    scores = monitored(out)
    assert list(scores) == [2]
    assert summary["kept"]["last_step"] == 3 and summary["kept"]["last_monitor_knn_top1"] is not None
    assert summary["kept"]["step"] in (2, 3)
    assert knn_of_export(out, test_shards) == pytest.approx(summary["kept"]["monitor_knn_top1"], abs=1e-6)


def test_keep_best_without_monitoring_is_named(train_shards, tmp_path, capsys):
    assert main(["pretrain", "--recipe", recipe_for("supervised"), f"data.train={train_shards}",
                 f"train.out_dir={tmp_path}", "train.keep_best=true"]) == 2
    assert "train.keep_best" in capsys.readouterr().err


def test_the_comparison_never_keeps_a_checkpoint_chosen_on_the_test_set(tmp_path, capsys):
    """Without a validation split the monitor set is the test set: a recipe that keeps its best step is refused."""
    code = main(["compare", "--recipe", str(ROOT / "recipes" / "compare_cifar10_subset.yaml"),
                 "source.val_fraction=0", f"out_dir={tmp_path}", "budget.images=64"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.keep_best" in err and "test set" in err
    assert not (tmp_path / "models").exists()
