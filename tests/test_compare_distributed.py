"""`ssl-vit compare` under a real two-process `accelerate launch` (gloo): the stages that write files run on the main
process while the other waits, pretraining and features use both, and the report has a single-process run's rows."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ssl_vit.cli"]
TINY = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "mae.decoder_depth=1", "mae.decoder_dim=32",
        "mae.decoder_heads=2", "train.progress=false", "data.num_workers=0", "train.monitor_every=3",
        "data.shuffle_buffer=64"]
# Rows of models that were not trained here come out the same to the digit; trained ones are other runs on two
# processes (each rank draws its own masks and crops: README, "bitwise equality is promised for an unchanged shape").
SAME_IN_EVERY_ROW = ("fraction", "num_labels", "labels_digest", "model", "method", "weights", "pretrain_labels",
                     "images_seen", "knn_k", "probe_selection")
UNTRAINED = ("random_init", "raw_pixels")


def small_split(src: Path, out: Path, per_class: int) -> Path:
    """The first `per_class` images of each class of a bundled ImageFolder tar, as a new .tar.gz image source."""
    with tarfile.open(src) as tar, tarfile.open(out, "w:gz") as small:
        taken: dict[str, int] = {}
        for member in sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name):
            cls = member.name.split("/")[0]
            if taken.get(cls, 0) < per_class:
                taken[cls] = taken.get(cls, 0) + 1
                small.addfile(member, tar.extractfile(member))
    return out


def compare(out: Path, train: Path, test: Path, *extra: str, launch: bool, timeout: int = 240):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    args = ["compare", "--recipe", str(ROOT / "recipes" / "compare_cifar10_subset.yaml"), f"out_dir={out}",
            f"source.train={train}", f"source.test={test}", "source.shard_max_count=50", "methods=[mae, supervised]",
            "eval.label_fractions=[0.1, 1.0]", "budget.images=128", "budget.batch_size=64", "eval.probe_epochs=2",
            "eval.batch_size=100", "eval.num_workers=0", "overrides=[" + ", ".join(TINY) + "]", *extra]
    cmd = LAUNCH if launch else [sys.executable, "-m", "ssl_vit.cli"]
    return subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def shard_digests(index: Path) -> list[tuple]:
    return [(s["samples"], s["sha256"]) for s in json.loads(index.read_text())["shards"]]


@pytest.mark.slow
def test_two_process_comparison_has_the_single_process_rows(bundled_train, bundled_test, tmp_path):
    train = small_split(bundled_train, tmp_path / "train.tar.gz", 20)  # 200 images
    test = small_split(bundled_test, tmp_path / "test.tar.gz", 10)     # 100 images
    single = compare(tmp_path / "one", train, test, launch=False)
    assert single.returncode == 0, single.stderr[-3000:]
    two = compare(tmp_path / "two", train, test, launch=True)
    assert two.returncode == 0, two.stderr[-3000:]

    # every stage announced once (by the main process), the tables printed once
    runs = [line for line in two.stdout.splitlines() if line.startswith("[run ]")]
    assert len(runs) == len(set(runs)) and "[run ] shards:train" in runs and "[run ] pretrain:mae" in runs, runs
    assert two.stdout.count("### 10% of the labels") == 1
    # the files written once, by one process: the same shards, labelled subsets and subset shards as one process
    for index in ("shards/train-index.json", "shards/test-index.json", "labels/f0.1/shards-index.json"):
        assert shard_digests(tmp_path / "two" / index) == shard_digests(tmp_path / "one" / index), index
    assert (json.loads((tmp_path / "two" / "labels" / "subsets.json").read_text()) ==
            json.loads((tmp_path / "one" / "labels" / "subsets.json").read_text()))
    # pretraining ran on both processes; the supervised runs (train.keep_best) scored their last step at the end (no
    # monitored step in a 2-step run: both ranks entered that scoring's barrier) and kept it
    for model in ("mae", "supervised-f0.1", "supervised-f1"):
        summary = json.loads((tmp_path / "two" / "models" / model / "summary.json").read_text())
        assert summary["world_size"] == 2
        assert ("kept" in summary) == model.startswith("supervised")
        if "kept" in summary:
            assert summary["kept"]["step"] == summary["kept"]["last_step"] == 2
    assert "train.keep_best" in (tmp_path / "two" / "report.md").read_text()

    rows_one = json.loads((tmp_path / "one" / "report.json").read_text())["rows"]
    rows_two = json.loads((tmp_path / "two" / "report.json").read_text())["rows"]
    assert [(r["fraction"], r["model"]) for r in rows_two] == [(f, m) for f in (0.1, 1.0)
                                                               for m in ("mae", "supervised", *UNTRAINED)]
    for one, two_row in zip(rows_one, rows_two):
        assert {k: two_row[k] for k in SAME_IN_EVERY_ROW} == {k: one[k] for k in SAME_IN_EVERY_ROW}
        if one["model"] in UNTRAINED:
            assert two_row["knn"] == one["knn"] and two_row["linear_top1"] == one["linear_top1"], one["model"]
        else:
            assert 0 <= two_row["knn_top1"] <= 100 and 0 <= two_row["linear_top1"] <= 100
    for png in ("label_efficiency.png", "comparison.png", "retrieval.png", "attention.png"):
        assert (tmp_path / "two" / png).stat().st_size > 1000

    # Run again with a source that cannot be read: the finished stages are skipped, and the main process's failure
    # in a stage it runs alone ends both processes with its one-line message instead of leaving one in a barrier.
    failed = compare(tmp_path / "two", train, test, f"source.unlabeled={tmp_path / 'missing.tar.gz'}", launch=True,
                     timeout=120)
    assert failed.returncode != 0
    assert "[skip] shards:train" in failed.stdout and "[run ] shards:unlabeled" in failed.stdout
    message = f"error: stage 'shards:unlabeled' failed: source not found: {tmp_path / 'missing.tar.gz'}"
    assert failed.stderr.count(message) == 2, failed.stderr[-3000:]  # each rank's (their lines may interleave)
