"""Exact resume for every method, at trainer level: N steps straight == K steps, a checkpoint, a resume from it, and
N - K more steps — the same per-step losses and the same final state (weights, DINO's EMA teacher, centre and head
BatchNorm statistics, optimizer moments), bitwise. The resume crosses the schedules' turns: DINO's teacher
temperature warm-up and frozen last layer, the lr warm-up, mixup/cutmix draws and drop-path masks.

The checkpoint at step K is the straight run's own (`train.checkpoint_every=K`), written by the same code that writes
a preemption's; the resumed run starts from it in another folder (`--resume-from`), so nothing races."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssl_vit.cli import main
from ssl_vit.config import load_recipe
from ssl_vit.data.writer import write_shards
from ssl_vit.methods import backbone_spec
from ssl_vit.models.backbone import create_backbone
from ssl_vit.models.export import export_backbone
from ssl_vit.train.run_log import read_log
from test_train import recipe_for

ROOT = Path(__file__).resolve().parents[1]
STEPS, K = 8, 3
TINY = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "train.progress=false", "train.log_every=1",
        "data.num_workers=1", "data.batch_size=16", "data.shuffle_buffer=64", "train.log_with=[]",
        "train.epochs=0", f"train.steps={STEPS}", "train.keep_checkpoints=10", f"train.checkpoint_every={K}"]
# 1,000 samples, batch 16: an epoch is 62 steps; 0.05 epoch = 3 steps, 0.1 = 6 steps.
DINO = ["dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.use_bn_in_head=true",
        "views.num_local=2", "dino.warmup_teacher_temp=0.02", "dino.teacher_temp=0.05",
        "dino.warmup_teacher_temp_epochs=0.1", "dino.freeze_last_layer_epochs=0.05", "optim.warmup_epochs=0.05",
        "dino.momentum_teacher=0.9"]
SUPERVISED = ["supervised.mixup=0.8", "supervised.cutmix=1.0", "supervised.mixup_prob=0.5",
              "model.drop_path_rate=0.2", "optim.warmup_epochs=0.05"]


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, bundled_test) -> Path:
    out = tmp_path_factory.mktemp("resume") / "test"
    write_shards(str(bundled_test), str(out), max_count=100, seed=0, workers=1, progress=False)
    return Path(f"{out}-index.json")


def losses(out: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in read_log(out / "log.jsonl")]


def checkpoint_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: the model's state (teacher, centre, BatchNorm buffers included) and the
    optimizer's moments and step counts."""
    tensors = {f"model.{k}": v for k, v in load_file(str(checkpoint / "model.safetensors")).items()}
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    for index, state in optimizer["state"].items():
        for name, value in state.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value)
    return tensors


def assert_resume_is_exact(args: list[str], tmp_path: Path, final_keys=()) -> dict:
    """Run `args` straight, then from its step-K checkpoint in another folder; compare losses and final state."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*args, f"train.out_dir={straight}"]) == 0
    middle = straight / "checkpoints" / f"ckpt-{K:08d}"
    assert main([*args, f"train.out_dir={resumed}", "--resume-from", str(middle)]) == 0
    a, b = losses(straight), losses(resumed)
    assert [step for step, _ in a] == list(range(1, STEPS + 1)) and len(set(loss for _, loss in a)) > 1
    assert b == a[K:], "the resumed run's per-step losses differ from the straight run's"
    end = f"ckpt-{STEPS:08d}"
    first, second = checkpoint_tensors(straight / "checkpoints" / end), checkpoint_tensors(resumed / "checkpoints" / end)
    assert first.keys() == second.keys()
    for key in final_keys:
        assert any(key in name for name in first), (key, sorted(first)[:20])
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, different[:10]
    assert (straight / "backbone.safetensors").read_bytes() == (resumed / "backbone.safetensors").read_bytes()
    return {"straight": straight, "resumed": resumed, "state": first}


@pytest.mark.parametrize("centering", ["center", "sinkhorn_knopp"])
def test_dino_resumes_exactly_with_teacher_centre_head_batchnorm_and_schedules(small_shards, tmp_path, centering):
    args = ["pretrain", "--recipe", recipe_for("dino"), f"data.train={small_shards}", *TINY, *DINO,
            f"dino.centering={centering}"]
    run = assert_resume_is_exact(args, tmp_path, final_keys=["teacher", "running_mean"] +
                                 (["center"] if centering == "center" else []))
    log = {row["step"]: row for row in read_log(run["straight"] / "log.jsonl")}
    # the resume at step K lands inside the schedules' turns: the teacher temperature still warms up after it
    temps = [log[s]["teacher_temp"] for s in range(1, STEPS + 1)]
    assert temps[0] < temps[K] < temps[-1] or temps[0] < temps[K] == temps[-1], temps
    state = run["state"]
    if centering == "center":
        centre = next(v for k, v in state.items() if k.endswith("center"))
        assert centre.abs().sum() > 0  # the EMA centre moved from its zero start, and was carried over


def test_supervised_with_mixup_cutmix_and_drop_path_resumes_exactly(small_shards, tmp_path):
    args = ["pretrain", "--recipe", recipe_for("supervised"), f"data.train={small_shards}", *TINY, *SUPERVISED]
    assert_resume_is_exact(args, tmp_path)


def test_finetuning_resumes_exactly(small_shards, tmp_path):
    recipe = str(ROOT / "recipes" / "finetune_vit_tiny_cifar10.yaml")
    torch.manual_seed(3)
    spec = backbone_spec(load_recipe(recipe, TINY[:3]))
    init = tmp_path / "pretrained" / "backbone.safetensors"
    export_backbone(create_backbone(spec), spec, init, extra_meta={"method": "mae"})
    args = ["finetune", "--recipe", recipe, "--init", str(init), f"data.train={small_shards}",
            f"data.eval={small_shards}", *TINY, "optim.warmup_epochs=0.05", "optim.layer_decay=0.75"]
    assert_resume_is_exact(args, tmp_path)
