"""The trainer's data contract through its entry points: epochs need a known length, resuming on another number of
processes and workers keeps each epoch exact, unlabeled shards are refused where labels are needed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_vit.cli import main
from test_train import METHOD_ARGS, TINY, pretrain_args, recipe_for


def test_epoch_settings_need_a_known_epoch(train_shards, tmp_path, capsys):
    """Shards without an index (a glob) have no sample counts: a setting counted in epochs would stretch to the whole
    run, so it is an error naming the setting and both ways out; data.samples_per_epoch is one of them."""
    pattern = str(Path(train_shards).parent / "train-*.tar")
    args = pretrain_args("mae", pattern, tmp_path / "mae", 3, ["data.batch_size=16", "optim.warmup_epochs=1"])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "optim.warmup_epochs=1 counts epochs" in err and "ssl-vit shards index" in err
    assert "data.samples_per_epoch" in err

    dino = pretrain_args("dino", pattern, tmp_path / "dino", 3, ["data.batch_size=16", "optim.warmup_epochs=0"])
    assert main(dino) == 2
    assert "dino.warmup_teacher_temp_epochs=2 counts epochs" in capsys.readouterr().err

    assert main([*args, "data.samples_per_epoch=5000"]) == 0
    log = [json.loads(line) for line in (tmp_path / "mae" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["epoch"] == pytest.approx(3 / (5000 // 16))
    no_epochs = pretrain_args("mae", pattern, tmp_path / "steps", 3, ["data.batch_size=16", "optim.warmup_epochs=0"])
    assert main(no_epochs) == 0  # train.steps alone needs no epoch


def test_indexed_count_and_samples_per_epoch_must_agree(train_shards, tmp_path, capsys):
    args = pretrain_args("mae", train_shards, tmp_path / "x", 2, ["data.batch_size=16", "data.samples_per_epoch=10"])
    assert main(args) == 2
    assert "index counts 5000 samples" in capsys.readouterr().err


@pytest.fixture(scope="module")
def seven_shards(tmp_path_factory, bundled_test) -> Path:
    from ssl_vit.data.writer import write_shards

    out = tmp_path_factory.mktemp("seven") / "s"
    write_shards(str(bundled_test), str(out), max_count=143, seed=0, workers=1, progress=False)
    return Path(f"{out}-index.json")


def audit(out: Path, rank: int) -> dict[int, list[str]]:
    rows = [json.loads(line) for line in (out / "audit" / f"rank{rank}.jsonl").read_text().splitlines()]
    return {row["step"]: row["keys"] for row in rows}


@pytest.mark.slow
def test_resume_on_another_number_of_processes_and_workers(seven_shards, tmp_path):
    """1 process × 2 workers checkpointed mid-epoch, resumed as 2 processes × 1 worker with 2 accumulation steps
    (gloo): the audit keys show each epoch's samples exactly once (7 shards of ~143, batch 32: 31 steps per epoch)."""
    out = tmp_path / "run"
    common = ["data.batch_size=32", "train.audit_keys=true", "data.shuffle_buffer=100", *TINY[:-1]]
    assert main(pretrain_args("mae", seven_shards, out, 10, [*common, "data.num_workers=2"])) == 0

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ssl_vit.train",
           "--recipe", recipe_for("mae"), f"data.train={seven_shards}", f"train.out_dir={out}", "train.steps=40",
           "train.epochs=0", *common, "data.num_workers=1", "optim.accum_steps=2", *METHOD_ARGS["mae"],
           "train.resume=auto"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "at step 10" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 40

    first, ranks = audit(out, 0), [audit(out, 0), audit(out, 1)]
    steps = {s: [k for rank in ranks for k in rank.get(s, [])] for s in range(40)}
    assert all(len(steps[s]) == 32 for s in range(40)), "every step trains on one global batch"
    assert sorted(first)[:10] == list(range(10))
    epoch_0 = [k for s in range(31) for k in steps[s]]
    epoch_1 = [k for s in range(31, 40) for k in steps[s]]
    assert len(epoch_0) == len(set(epoch_0)) == 992
    assert len(epoch_1) == len(set(epoch_1)) == 9 * 32
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 41))


def test_supervised_training_refuses_unlabeled_shards(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(40):
        Image.new("RGB", (32, 32), (i * 5, 100, 200 - i * 4)).save(folder / f"img{i:03d}.jpg")
    assert main(["shards", "write", str(folder), str(tmp_path / "sh" / "photos"), "--max-count", "10",
                 "--no-progress", "--unlabeled"]) == 0
    index = tmp_path / "sh" / "photos-index.json"
    capsys.readouterr()
    assert main(pretrain_args("supervised", index, tmp_path / "sup", 2, ["data.batch_size=8"])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "photos-index.json" in err and "unlabeled" in err
    pattern = str(tmp_path / "sh" / "photos-*.tar")  # no index: found when the first sample is read
    args = pretrain_args("supervised", pattern, tmp_path / "sup2", 2,
                         ["data.batch_size=8", "optim.warmup_epochs=0", "data.num_classes=10"])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "has no label" in err and "photos-00000" in err and len(err.splitlines()) == 1
    assert main(pretrain_args("mae", index, tmp_path / "mae", 2, ["data.batch_size=8"])) == 0
