"""Benchmark our training step against a plain torch loop on the same model; prints JSON.

For MAE, DINO and supervised: images/s of `Trainer` steps (schedules, accelerate's backward/autocast, the method
hooks, EMA, logging values) vs a plain loop (forward, backward, AdamW step, zero_grad) over the same nn.Module, the
same in-memory batch and precision, measured in the same run, alternating rounds to share the machine's noise.
For the supervised baseline the plain loop uses a bare `timm.create_model` + cross-entropy, independent of our code.
Target ≥ 0.95.

    python tools/bench_train.py [--steps 20] [--batch 64] [--depth 6] [--size 32 --patch 4] [--index INDEX.json]
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ssl_vit.config import load_recipe  # noqa: E402
from ssl_vit.train.trainer import Trainer  # noqa: E402

from bench_common import ROOT, bundled_shards  # noqa: E402


def make_trainer(method: str, index: str, out: Path, args) -> Trainer:
    overrides = [f"data.train={index}", f"train.out_dir={out}", "train.steps=1000", "train.epochs=0",
                 f"data.batch_size={args.batch}", f"model.depth={args.depth}", f"model.img_size={args.size}",
                 f"model.patch_size={args.patch}", "train.progress=false", "data.num_workers=0"]
    return Trainer(load_recipe(ROOT / "recipes" / f"{method}_vit_tiny_cifar10.yaml", overrides))


def batch_in_memory(trainer: Trainer) -> dict:
    return next(iter(trainer.loader))


def ours(trainer: Trainer, batch: dict, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        sched = trainer._apply_schedules()
        trainer._train_step([dict(batch)], sched)
        trainer.step += 1
    return steps * len(batch["key"]) / (time.perf_counter() - t0)


def plain_method(model, batch: dict, steps: int, sched: dict) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    t0 = time.perf_counter()
    for step in range(steps):
        loss = model(batch, sched, seed=step)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * len(batch["key"]) / (time.perf_counter() - t0)


def plain_timm_supervised(trainer: Trainer, batch: dict, steps: int) -> float:
    r = trainer.recipe.model
    model = timm.create_model(r.name, img_size=r.img_size, patch_size=r.patch_size, depth=r.depth,
                              num_classes=len(trainer.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, labels = batch["views"][0], batch["label"]
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * len(images) / (time.perf_counter() - t0)


def bench(method: str, index: str, tmp: Path, args) -> dict:
    trainer = make_trainer(method, index, tmp / method, args)
    batch = batch_in_memory(trainer)
    sched = {name: float(f(0)) for name, f in trainer.schedules.items()}
    reference = (lambda: plain_timm_supervised(trainer, batch, args.steps)) if method == "supervised" else \
        (lambda: plain_method(trainer.method, batch, args.steps, sched))
    ours(trainer, batch, 2), reference()  # warm-up
    rates = {"ours": [], "plain": []}
    for _ in range(args.rounds):
        rates["ours"].append(ours(trainer, batch, args.steps))
        rates["plain"].append(reference())
    best = {k: max(v) for k, v in rates.items()}
    return {"ours_images_per_s": round(best["ours"], 1), "plain_images_per_s": round(best["plain"], 1),
            "ratio": round(best["ours"] / best["plain"], 3), "rounds": rates,
            "reference": "timm.create_model + F.cross_entropy + AdamW" if method == "supervised"
            else "the same nn.Module: forward, backward, AdamW step"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--methods", nargs="+", default=["mae", "dino", "supervised"])
    p.add_argument("--index", help="shards to read the batch from (default: the bundled subset, written here)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        index = args.index or bundled_shards(tmp / "train", max_count=500, workers=2)
        results = {"device": "cpu", "threads": torch.get_num_threads(), "batch": args.batch, "depth": args.depth,
                   "img_size": args.size, "patch": args.patch,
                   "methods": {m: bench(m, index, tmp, args) for m in args.methods}}
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
