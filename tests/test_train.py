"""The trainer through its public entry points: `ssl-vit pretrain` and `accelerate launch -m ssl_vit.train`."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import close_gate, open_gate, wait_at_gate
from ssl_vit.cli import main
from ssl_vit.train.run_log import read_log

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "train.progress=false", "train.log_every=1",
        "data.num_workers=1"]
METHOD_ARGS = {
    "mae": ["mae.decoder_depth=1", "mae.decoder_dim=64", "mae.decoder_heads=2"],
    # A 30-step run learns measurably with the paper's teacher-temperature warm-up and a 1-epoch frozen last layer.
    "dino": ["dino.out_dim=512", "dino.hidden_dim=128", "dino.bottleneck_dim=32", "views.num_local=2",
             "dino.teacher_temp=0.07", "dino.warmup_teacher_temp_epochs=2", "dino.freeze_last_layer_epochs=1",
             "optim.warmup_epochs=1"],
    "supervised": [],
}


def recipe_for(method: str) -> str:
    return str(ROOT / "recipes" / f"{method}_vit_tiny_cifar10.yaml")


def pretrain_args(method, shards, out, steps, extra=()):
    return ["pretrain", "--recipe", recipe_for(method), f"data.train={shards}", f"train.out_dir={out}",
            f"train.steps={steps}", "train.epochs=0", *TINY, *METHOD_ARGS[method], *extra]


@pytest.mark.parametrize("method", ["mae", "dino", "supervised"])
def test_loss_falls_on_real_data(method, train_shards, tmp_path):
    out = tmp_path / method
    assert main(pretrain_args(method, train_shards, out, 30, ["data.batch_size=64"])) == 0
    # DINO's loss rises while the teacher temperature warms up; what the student reduces is its KL to the teacher.
    key = "student_kl" if method == "dino" else "loss"
    losses = [row[key] for row in read_log(out / "log.jsonl") if "loss" in row]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.95 * first, (method, first, last)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["images_seen"] == 30 * 64
    assert (out / "backbone.safetensors").is_file() and (out / "checkpoints" / "latest").is_file()
    assert list((out / "tensorboard").iterdir())


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "ssl_vit.cli", *map(str, args)]


@pytest.mark.slow
def test_killed_and_resumed_run_logs_the_same_losses(gated_shards, tmp_path):
    """kill -9 after a checkpoint, resume: per-step losses equal (bitwise) those of an uninterrupted run. The run
    reads gated shards (conftest.GATE): 9 tickets of 40 samples give it one transfer of 8 batches of 32 (a window of
    64 first) and a checkpoint at step 5, then it waits at the gate, where it is killed: it cannot have finished."""
    shards, gate = gated_shards
    steps, extra = 16, ["data.batch_size=32", "train.checkpoint_every=5", "data.shuffle_buffer=64"]
    straight = tmp_path / "straight"
    open_gate(gate)
    assert main(pretrain_args("mae", shards, straight, steps, extra)) == 0

    resumed = tmp_path / "resumed"
    close_gate(gate, 1, 9)
    proc = subprocess.Popen(cli(*pretrain_args("mae", shards, resumed, steps, extra)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pointer = resumed / "checkpoints" / "latest"
    try:
        wait_at_gate(proc, gate, pointer.exists)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        open_gate(gate)
    killed_at = int(pointer.read_text().split("-")[1])
    assert killed_at == 5
    assert main(pretrain_args("mae", shards, resumed, steps, [*extra, "--resume"])) == 0

    a = [(r["step"], r["loss"]) for r in read_log(straight / "log.jsonl")]
    b = [(r["step"], r["loss"]) for r in read_log(resumed / "log.jsonl")]
    assert len(a) == steps and a == b


def test_nonfinite_loss_stops_with_the_step(train_shards, tmp_path, capsys):
    out = tmp_path / "nan"
    args = pretrain_args("supervised", train_shards, out, 5, ["optim.base_lr=1e30", "data.batch_size=16"])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "at step" in err


def test_mismatched_checkpoint_is_a_clear_error(train_shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(pretrain_args("mae", train_shards, out, 2, ["data.batch_size=16"])) == 0
    args = pretrain_args("mae", train_shards, out, 4, ["data.batch_size=16", "model.embed_dim=96", "--resume"])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "ckpt-00000002" in err
    assert "model.embed_dim 64 in the checkpoint, 96 in this recipe" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_process_accelerate_launch_sees_disjoint_data(train_shards, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ssl_vit.train",
           "--recipe", recipe_for("mae"), f"data.train={train_shards}", f"train.out_dir={out}", "train.steps=6",
           "train.epochs=0", "data.batch_size=32", "train.audit_keys=true", *TINY, *METHOD_ARGS["mae"]]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    ranks = [[json.loads(line) for line in (out / "audit" / f"rank{r}.jsonl").read_text().splitlines()]
             for r in range(2)]
    keys = [[k for row in rank for k in row["keys"]] for rank in ranks]
    assert [len(k) for k in keys] == [6 * 16, 6 * 16]  # 16 per process per step
    assert not set(keys[0]) & set(keys[1])
    assert len(set(keys[0])) == len(keys[0])


@pytest.mark.slow
def test_each_process_draws_its_own_drop_path_masks_from_the_same_weights(train_shards, tmp_path):
    out = tmp_path / "draws.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tests" / "rank_draws.py"), str(out), recipe_for("mae"), f"data.train={train_shards}",
           f"train.out_dir={tmp_path / 'run'}", "train.steps=1", "train.epochs=0", "data.batch_size=32",
           "model.drop_path_rate=0.5", *TINY, *METHOD_ARGS["mae"]]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    draws = json.loads(out.read_text())
    assert draws["world_size"] == 2
    assert draws["checksums"][0] == draws["checksums"][1]
    first, second = draws["features"]
    assert first != second


def test_resume_is_a_flag_and_the_checkpoint_folder_its_own_option(train_shards, tmp_path, capsys):
    out = tmp_path / "run"
    first = pretrain_args("mae", train_shards, out, 2, ["data.batch_size=16"])
    assert main(first) == 0
    rest = [a for a in first[3:] if not a.startswith("train.steps=")]
    # What follows --resume is an override, as in `ssl-vit pretrain --recipe r.yaml --resume train.epochs=2`.
    assert main([*first[:3], "--resume", "train.steps=3", *rest]) == 0
    assert f"resumed from {out / 'checkpoints' / 'ckpt-00000002'} at step 2" in capsys.readouterr().out
    assert main([*first[:3], "--resume-from", str(out / "checkpoints" / "ckpt-00000002"), "train.steps=4", *rest]) == 0
    assert f"resumed from {out / 'checkpoints' / 'ckpt-00000002'} at step 2" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert [row["step"] for row in read_log(out / "log.jsonl")] == [1, 2, 3, 4]
    with pytest.raises(SystemExit):
        main([*first, "--resume", "--resume-from", str(out)])


@pytest.mark.parametrize("verb", ["pretrain", "finetune"])
def test_resume_options_parse_the_same_in_both_training_verbs(verb):
    from ssl_vit.cli import build_parser

    parse = build_parser().parse_args
    args = parse([verb, "--recipe", "r.yaml", "--resume", "train.epochs=2"])
    assert (args.resume, args.overrides) == ("auto", ["train.epochs=2"])
    args = parse([verb, "--recipe", "r.yaml", "--resume-from", "runs/x/checkpoints/ckpt-00000010", "train.epochs=2"])
    assert (args.resume, args.overrides) == ("runs/x/checkpoints/ckpt-00000010", ["train.epochs=2"])
    assert parse([verb, "--recipe", "r.yaml"]).resume is None


def test_run_records_its_recipe_and_logs_through_accelerate_trackers(train_shards, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    extra = ["data.batch_size=16", "train.progress=true", "train.log_every=2"]
    assert main(pretrain_args("supervised", train_shards, out, 4, extra)) == 0
    # stderr is not a terminal here: a plain line per logged step instead of a progress bar
    lines = [line.split() for line in capsys.readouterr().err.splitlines() if " step " in line]
    assert [words[:4] for words in lines] == [["supervised", "pretrain", "step", "2/4"],
                                              ["supervised", "pretrain", "step", "4/4"]]
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == json.loads((out / "recipe.json").read_text())
    events = EventAccumulator(str(out / "tensorboard" / "ssl_vit"))
    events.Reload()
    logged = {row["step"]: row["loss"] for row in read_log(out / "log.jsonl")}
    assert {s.step: pytest.approx(s.value) for s in events.Scalars("train/loss")} == logged
    assert main(pretrain_args("supervised", train_shards, out, 4, ["train.log_with=[tensorbord]"])) == 2
    assert "train.log_with: unknown tracker 'tensorbord'" in capsys.readouterr().err


def test_architecture_check_covers_timm_kwargs_and_older_checkpoints():
    from ssl_vit.train.checkpoint import architecture_differences

    swin = {"method": "dino", "model": {"name": "swin_tiny_patch4_window7_224", "kwargs": {"window_size": 4}}}
    other = {"method": "dino", "model": {"name": "swin_tiny_patch4_window7_224", "kwargs": {"window_size": 2}}}
    assert architecture_differences(swin, other) == [
        "model.kwargs {'window_size': 4} in the checkpoint, {'window_size': 2} in this recipe"]
    older = {"method": "mae", "model": {"name": "vit_tiny_patch16_224"}}  # written before model.kwargs existed
    assert architecture_differences(older, {"method": "mae", "model": {"name": "vit_tiny_patch16_224",
                                                                       "kwargs": {}}}) == []
