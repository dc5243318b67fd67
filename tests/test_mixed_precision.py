"""Mixed precision: every loss is computed in float32 with autocast off, so that a bf16 run trains on the same numbers
as a float32 one up to the backbone's own bf16 rounding. CPU bf16 autocast stands in for the GPU's."""
import copy
import math
from pathlib import Path

import pytest
import torch

from ssl_vit.config import load_recipe
from ssl_vit.losses.classification import classification_loss
from ssl_vit.losses.dino_loss import DINOLoss, sinkhorn_knopp
from ssl_vit.losses.mae_loss import mae_loss
from ssl_vit.methods import build_method

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "train.steps=10", "train.epochs=0"]
DINO_TINY = ["dino.out_dim=256", "dino.hidden_dim=64", "dino.bottleneck_dim=32"]
PAPER_HEAD = ["dino.use_bn_in_head=false", "dino.teacher_temp=0.04", "dino.warmup_teacher_temp=0.04"]
# case: recipe, overrides, and the relative tolerances of the loss and the gradient norm of one step in bf16 against
# float32. They hold what the backbone's and head's own bf16 matmuls leave, measured over 6 inputs (loss / gradient
# norm): MAE 2.5e-4 / 8e-5, supervised 1.8e-4 / 1.5e-3, DINO with Sinkhorn-Knopp 1.6e-4 / 3.4e-3, DINO with centring
# 1.7e-3 / 1.7e-2 (its sharp targets at τ_t = 0.04 amplify the backbone's rounding; the same with the loss rounded).
# A loss computed in bf16 is off by up to 2^-9 relative: 2.7e-3 (supervised), 1.3e-2 (Sinkhorn-Knopp) measured.
CASES = {
    "mae": ("mae_vit_tiny_cifar10.yaml", ["mae.decoder_depth=1", "mae.decoder_dim=64", "mae.decoder_heads=2"],
            1e-3, 1e-3),
    "dino-center": ("dino_vit_tiny_cifar10.yaml", DINO_TINY + PAPER_HEAD + ["dino.centering=center"], 5e-3, 5e-2),
    "dino-sinkhorn": ("dino_vit_tiny_cifar10.yaml", DINO_TINY + PAPER_HEAD + ["dino.centering=sinkhorn_knopp"],
                      1e-3, 1e-2),
    "supervised-mixup": ("supervised_vit_tiny_cifar10.yaml", ["supervised.mixup=0.8", "supervised.cutmix=1.0"],
                         1e-3, 1e-2),
}
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def build(case: str, *extra: str, seed: int = 0):
    name, overrides = CASES[case][:2]
    recipe = load_recipe(ROOT / "recipes" / name, TINY + overrides + list(extra))
    torch.manual_seed(seed)
    method = build_method(recipe, num_classes=10, num_global_views=2)
    sched = {name: f(0) for name, f in method.schedules(10, 5).items()}
    return method.train(), {"lr": 1e-3, "wd": 0.0, **sched}


def batch_of(case: str, seed: int, batch: int = 8) -> dict:
    gen = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch, 3, 32, 32, generator=gen)]
    if case.startswith("dino"):
        views += [torch.randn(batch, 3, 32, 32, generator=gen)] + [torch.randn(batch, 3, 16, 16, generator=gen)
                                                                  for _ in range(2)]
    return {"views": views, "label": torch.randint(0, 10, (batch,), generator=gen)}


def loss_and_grad_norm(method, batch: dict, sched: dict, bf16: bool) -> tuple[float, float]:
    """One training step's loss and gradient norm, the way the trainer computes them (a fresh copy: DINO's centre
    moves)."""
    method = copy.deepcopy(method)
    with torch.autocast(**BF16, enabled=bf16):
        out = method(batch, sched, seed=1234)
    out["loss"].backward()
    grads = [p.grad for p in method.parameters() if p.grad is not None]
    return out["loss"].item(), torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_step_matches_float32(case):
    method, sched = build(case)
    loss_rtol, grad_rtol = CASES[case][2:]
    for seed in range(4):
        batch = batch_of(case, seed)
        loss32, grad32 = loss_and_grad_norm(method, batch, sched, bf16=False)
        loss16, grad16 = loss_and_grad_norm(method, batch, sched, bf16=True)
        assert loss16 == pytest.approx(loss32, rel=loss_rtol), f"input {seed}"
        assert grad16 == pytest.approx(grad32, rel=grad_rtol), f"input {seed}"


@pytest.mark.parametrize("centering", ["center", "sinkhorn_knopp"])
def test_dino_loss_under_bf16_is_not_quantised(centering):
    """Small changes of the input move the loss: bf16's spacing between 4 and 8 (1/32) would leave it on a grid.
    The CIFAR recipe's own head (BatchNorm, τ_t = 0.02), as in the run that showed it."""
    method, sched = build("dino-center", "dino.use_bn_in_head=true", "dino.teacher_temp=0.02",
                          "dino.warmup_teacher_temp=0.02", f"dino.centering={centering}")
    base = batch_of("dino-center", 0)
    nudge = batch_of("dino-center", 1)
    losses = []
    for i in range(16):
        views = [v + 2e-3 * i * n for v, n in zip(base["views"], nudge["views"])]
        with torch.no_grad(), torch.autocast(**BF16):
            losses.append(copy.deepcopy(method)({"views": views}, sched)["loss"].item())
    assert len(set(losses)) >= 15, losses
    assert sum((32 * x).is_integer() for x in losses) <= 1, losses


def test_losses_are_float32_and_equal_inside_and_outside_autocast():
    """The loss functions themselves: bf16 inputs under autocast give exactly the float32 loss of the same values."""
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 8, 256, generator=gen), torch.randn(2, 8, 256, generator=gen)
    pred, target = torch.randn(8, 64, 48, generator=gen), torch.randn(8, 64, 48, generator=gen)
    mask = (torch.rand(8, 64, generator=gen) < 0.75).float()
    logits, soft = torch.randn(8, 10, generator=gen), torch.softmax(torch.randn(8, 10, generator=gen), -1)
    as_bf16 = [t.bfloat16() for t in (student, teacher, pred, target, logits, soft)]
    rounded = [t.float() for t in as_bf16]
    for centering in ("center", "sinkhorn_knopp"):
        loss = DINOLoss(256, centering=centering)
        with torch.autocast(**BF16):
            got = loss(as_bf16[0], as_bf16[1], teacher_temp=0.04)["loss"]
        assert got.dtype == torch.float32
        assert got == DINOLoss(256, centering=centering)(rounded[0], rounded[1], teacher_temp=0.04)["loss"]
    with torch.autocast(**BF16):
        targets = sinkhorn_knopp(as_bf16[1].flatten(0, 1), 0.04)
    assert targets.dtype == torch.float32 and torch.equal(targets, sinkhorn_knopp(rounded[1].flatten(0, 1), 0.04))
    with torch.autocast(**BF16):
        got = [mae_loss(as_bf16[2], as_bf16[3], mask), classification_loss(as_bf16[4], as_bf16[5]),
               classification_loss(as_bf16[4], torch.arange(8) % 10, label_smoothing=0.1)]
    want = [mae_loss(rounded[2], rounded[3], mask), classification_loss(rounded[4], rounded[5]),
            classification_loss(rounded[4], torch.arange(8) % 10, label_smoothing=0.1)]
    assert [g.dtype for g in got] == [torch.float32] * 3
    assert torch.equal(torch.stack(got), torch.stack(want))


def test_dino_head_prototypes_run_in_float32():
    """The last layer's logits (cosines to the prototypes) are not rounded to bf16 before the temperature."""
    from ssl_vit.heads.dino_head import DINOHead

    torch.manual_seed(0)
    head = DINOHead(64, out_dim=256, hidden_dim=64, bottleneck_dim=32)
    x = torch.randn(8, 64)
    with torch.autocast(**BF16):
        out = head(x)
        bottleneck = torch.nn.functional.normalize(head.mlp(x).float(), dim=-1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, head.last_layer(bottleneck), rtol=0, atol=1e-6)


# -- the non-finite guard covers the gradients --------------------------------------------------------------------
def trainer_with_inf_gradient_at(step: int, shards, out, *extra):
    """A tiny MAE trainer whose first patch-embedding gradient is +inf at optimizer step `step` (a backward hook):
    the loss stays finite."""
    from ssl_vit.train.trainer import Trainer

    recipe = load_recipe(ROOT / "recipes" / "mae_vit_tiny_cifar10.yaml", [
        f"data.train={shards}", f"train.out_dir={out}", "train.steps=4", "train.epochs=0", "data.batch_size=8",
        "model.depth=1", "mae.decoder_depth=1", "mae.decoder_dim=64", "mae.decoder_heads=2", "train.log_every=1",
        "train.progress=false", "train.log_with=[]", "data.num_workers=0", *extra])
    trainer = Trainer(recipe)
    weight = trainer.method.encoder.patch_embed.proj.weight
    weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("inf")) if trainer.step == step else g)
    return trainer, weight


def test_a_finite_loss_with_an_inf_gradient_skips_the_update(train_shards, tmp_path, capsys):
    from ssl_vit.train.run_log import read_log

    trainer, weight = trainer_with_inf_gradient_at(2, train_shards, tmp_path, "train.on_nonfinite=skip",
                                                   "optim.clip_grad=0")
    summary = trainer.fit()
    assert summary["skipped_steps"] == 1
    assert trainer.optimizer.state[weight]["step"] == 3  # AdamW updated at 3 of the 4 steps
    assert torch.isfinite(weight).all()
    log = read_log(tmp_path / "log.jsonl")
    assert [e["skipped_steps"] for e in log] == [0, 0, 1, 1]
    assert all(0 <= e["data_wait_frac"] <= 1 for e in log)
    assert all(math.isfinite(e["loss"]) for e in log)  # the loss stayed finite: only the gradient was not
    assert log[2]["grad_norm"] == float("inf") and all(0 < e["grad_norm"] < 1e3 for e in log if e is not log[2])
    assert "non-finite gradient norm" in capsys.readouterr().out


def test_an_inf_gradient_stops_the_run_by_default(train_shards, tmp_path):
    from ssl_vit.errors import SslVitError

    trainer, weight = trainer_with_inf_gradient_at(1, train_shards, tmp_path, "optim.clip_grad=1.0")
    with pytest.raises(SslVitError, match=r"non-finite gradient norm \(loss [0-9.]+, gradient norm inf\) at step 1"):
        trainer.fit()
    assert trainer.optimizer.state[weight]["step"] == 1


RANK_SCRIPT = '''
import json, sys
import torch
from ssl_vit.config import load_recipe
from ssl_vit.train.trainer import Trainer

out = sys.argv[1]
trainer = Trainer(load_recipe(sys.argv[2], sys.argv[3:]))
weight = trainer.method.encoder.patch_embed.proj.weight
if trainer.acc.process_index == 1:  # an inf in rank 1's gradient after the gradients were averaged: rank 0's is finite
    before = trainer.method.before_optimizer_step
    def inject(step, sched):
        before(step, sched)
        if step == 1:
            weight.grad[0] = float("inf")
    trainer.method.before_optimizer_step = inject
summary = trainer.fit()
json.dump({"world": trainer.acc.num_processes, "skipped": summary["skipped_steps"],
           "updates": int(trainer.optimizer.state[weight]["step"]), "weight": weight.detach().double().sum().item()},
          open(f"{out}/rank{trainer.acc.process_index}.json", "w"))
'''


@pytest.mark.slow
def test_two_processes_agree_to_skip_when_one_has_an_inf_gradient(train_shards, tmp_path):
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "inf_on_rank1.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path),
           str(ROOT / "recipes" / "mae_vit_tiny_cifar10.yaml"), f"data.train={train_shards}",
           f"train.out_dir={tmp_path / 'run'}", "train.steps=3", "train.epochs=0", "data.batch_size=8",
           "model.depth=1", "mae.decoder_depth=1", "mae.decoder_dim=64", "mae.decoder_heads=2",
           "train.on_nonfinite=skip", "train.progress=false", "train.log_with=[]", "data.num_workers=0"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert [(r["skipped"], r["updates"]) for r in ranks] == [(1, 2), (1, 2)]  # both skipped step 1, together
    assert ranks[0]["weight"] == ranks[1]["weight"]  # and stayed in step


# -- data wait and step time with the device drained ----------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="shows the drain by its failure where there is no CUDA device")
def test_step_timer_drains_the_device_at_timed_steps_only():
    import time

    from ssl_vit.train.step_timer import StepTimer

    timer = StepTimer(torch.device("cuda"))
    timer.start(exact=False)  # an untimed step never touches the device
    time.sleep(0.02)
    timer.data_ready()
    time.sleep(0.02)
    step, wait = timer.stop()
    assert step >= wait + 0.02 and wait >= 0.02
    with pytest.raises((RuntimeError, AssertionError)):  # a timed step synchronises: here, no CUDA to synchronise
        timer.start(exact=True)
    cpu = StepTimer(torch.device("cpu"))
    cpu.start(exact=True)  # on the CPU a timed step is a plain clock read
    cpu.data_ready()
    assert cpu.stop()[0] >= 0
