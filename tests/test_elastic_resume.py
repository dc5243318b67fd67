"""Elastic resume that shrinks: a DINO run checkpointed by 2 gloo processes continues on 1. The README promises the
rest of the epoch is re-split over the new readers (no sample seen twice, none lost) and that the optimizer,
schedules and EMA teacher continue from the checkpoint (bitwise equality is promised for an unchanged shape only).

The 2-process run writes a checkpoint at step K on its way to STEPS; the 1-process run starts from that checkpoint
(nothing races), and its trainer is inspected right after the resume, before it trains on."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssl_vit.config import load_recipe
from ssl_vit.data.writer import write_shards
from ssl_vit.loading import method_from_recipe
from ssl_vit.train.run_log import read_log
from ssl_vit.train.trainer import Trainer
from test_resume_methods import DINO
from test_train import recipe_for

STEPS, K, BATCH = 12, 5, 32
COMMON = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "train.progress=false", "train.log_every=1",
          f"data.batch_size={BATCH}", "data.shuffle_buffer=64", "train.log_with=[]", "train.epochs=0",
          f"train.steps={STEPS}", "train.keep_checkpoints=10", f"train.checkpoint_every={K}", "train.audit_keys=true",
          *DINO, "dino.centering=center", "dino.warmup_teacher_temp_epochs=0.3"]  # 31 steps an epoch: 9 warm up


def audit(out: Path, rank: int) -> dict[int, list[str]]:
    rows = [json.loads(line) for line in (out / "audit" / f"rank{rank}.jsonl").read_text().splitlines()]
    return {row["step"]: row["keys"] for row in rows}


@pytest.mark.slow
def test_dino_checkpointed_on_two_processes_continues_on_one(bundled_test, tmp_path):
    shards = tmp_path / "shards" / "test"
    write_shards(str(bundled_test), str(shards), max_count=100, seed=0, workers=1, progress=False)
    index = f"{shards}-index.json"  # 1,000 samples: an epoch is 31 steps of 32, the run stays inside it
    two = tmp_path / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ssl_vit.train",
           "--recipe", recipe_for("dino"), f"data.train={index}", f"train.out_dir={two}", *COMMON,
           "data.num_workers=1"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = two / "checkpoints" / f"ckpt-{K:08d}"
    assert json.loads((checkpoint / "trainer.json").read_text())["world_size"] == 2

    one = tmp_path / "one"
    recipe = load_recipe(recipe_for("dino"), [f"data.train={index}", f"train.out_dir={one}", *COMMON,
                                              "data.num_workers=2", f"train.resume={checkpoint}"])
    trainer = Trainer(recipe, build=method_from_recipe)
    assert trainer.acc.num_processes == 1 and trainer.step == K

    # Everything the checkpoint holds continues: student, EMA teacher, centre, head BatchNorm statistics ...
    saved = load_file(str(checkpoint / "model.safetensors"))
    state = trainer.method.state_dict()
    assert any("teacher" in name for name in saved) and any(name.endswith("center") for name in saved)
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    # ... and the optimizer: AdamW's moments and step counts (K, not a fresh 0; the last layer, frozen for the first
    # steps, counts fewer)
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]
    live = trainer.optimizer.state_dict()["state"]
    assert optimizer.keys() == live.keys() and optimizer
    for index_, moments in optimizer.items():
        for key, value in moments.items():
            assert torch.equal(torch.as_tensor(live[index_][key]), torch.as_tensor(value)), (index_, key)
    counts = {float(moments["step"]) for moments in live.values()}
    assert max(counts) == K and min(counts) > 0, counts

    trainer.fit()
    # the schedules are the same functions of the step: lr, weight decay, teacher temperature and momentum, as logged
    # by the 2-process run at the same steps
    logged_two = {row["step"]: row for row in read_log(two / "log.jsonl")}
    logged_one = {row["step"]: row for row in read_log(one / "log.jsonl")}
    assert sorted(logged_one) == list(range(K + 1, STEPS + 1))
    for step in range(K + 1, STEPS + 1):
        for key in ("lr", "wd", "teacher_temp", "momentum"):
            assert logged_one[step][key] == logged_two[step][key], (step, key)
    assert len({logged_one[s]["teacher_temp"] for s in logged_one}) > 1  # still warming up after the resume

    # The epoch re-split over the new readers: steps < K from the two ranks, steps >= K from the one process;
    # every step one global batch, no sample of the epoch twice.
    before = [k for rank in (0, 1) for s, keys in audit(two, rank).items() if s < K for k in keys]
    after = [k for s, keys in audit(one, 0).items() if s >= K for k in keys]
    assert len(before) == K * BATCH and len(after) == (STEPS - K) * BATCH
    assert len(set(before + after)) == len(before) + len(after), "a sample was seen twice in one epoch"
    assert json.loads((one / "summary.json").read_text())["world_size"] == 1
