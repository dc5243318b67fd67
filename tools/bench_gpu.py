"""GPU benchmark, one prepared script (~5 minutes on an H200); prints JSON and writes it to --out.

Sections, all measured in the same run:
- `matmul`: a bf16 matrix product, the peak the MFU figures are taken against.
- `views`: images/s of the CPU view path (workers decode and augment) and the GPU path (workers read bytes and draw
  the choices; nvJPEG decodes and the device augments), MAE views and DINO multi-crop at 224 px, through a DataLoader
  with the same workers; photographs from tools/make_photo_shards.py.
- `train`: the trainer itself (`Trainer(recipe).fit()`) on the photo shards, MAE ViT-B/16 and DINO ViT-S/16 in
  bf16, with data.decode cpu and gpu: mean data-wait fraction (time waiting for the next batch / step time) and
  images/s from its log. Target: data wait < 5 % with the GPU path.
- `mfu`: the same two training steps on batches already on the device: FLOPs counted by torch's FlopCounterMode for
  one step (forward + backward), divided by the step time and the measured bf16 matmul rate. Target: MAE ≥ 40 %.
- `memory`: the device path on one batch of large photographs (DINO multi-crop, 12 MP: long side 4000 px): its
  chunk plan's peak bytes (`device_resample.plan_chunks`) against torch's measured peak of allocated device memory.
- `knn`: exact k-NN (k = 200) of 50k queries against a 1.28M × 768 bank with torch on the GPU (float32 products,
  TF32 off), against FAISS's exact CPU index on a slice of the queries, extrapolated linearly.

On the GPU machine, with the repository as the working directory and no install: `PYTHONPATH=. python3
tools/bench_gpu.py --out $OUT/gpu.json`. Its image has torch, torchvision, timm, accelerate, scikit-image and PIL,
not webdataset (the shard reader imports it), OpenCV (the CPU view path) nor faiss: carry their wheels (webdataset,
braceexpand, opencv-python-headless; faiss-cpu for the `knn` comparison, which is skipped without it). OpenCV's
wheel (61 MB) and faiss-cpu's (19 MB) together exceed what one call may carry (64 MiB): install OpenCV in a first
call into an ignored folder that stays on the warm machine (`pip install --no-deps --target .gpu_deps ...`), then
run this with `PYTHONPATH=.:.gpu_deps`. `--smoke` runs every section at toy sizes on a CPU in ~1 minute.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssl_vit.config import load_recipe  # noqa: E402
from ssl_vit.data.samples import open_image, read_shard  # noqa: E402
from ssl_vit.data.sources import expand_source  # noqa: E402
from ssl_vit.transforms import MultiViewTransform, dino_views, mae_views, views_from_recipe  # noqa: E402
from ssl_vit.transforms.device_resample import plan_chunks, plan_sizes  # noqa: E402
from ssl_vit.transforms.gpu_views import collate_views, views_to_device  # noqa: E402

from make_photo_shards import make_photo_shards, photo_jpegs  # noqa: E402

SIZES = {  # full run | --smoke
    "matmul": (8192, 256), "photos": (2700, 48), "view_batches": (20, 2), "view_batch": (128, 8),
    "train_steps": (60, 3), "mae_batch": (256, 4), "dino_batch": (128, 4), "mfu_steps": (10, 2),
    "memory_batch": (32, 4), "memory_side": (4000, 600),
    "knn": ((50_000, 1_280_000, 768, 200, 500), (64, 2000, 32, 20, 16)),
}
TINY = {"mae": ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "mae.decoder_depth=1",
                "mae.decoder_dim=32", "mae.decoder_heads=2"],
        "dino": ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "dino.out_dim=64", "dino.hidden_dim=32",
                 "dino.bottleneck_dim=16", "views.num_local=2"]}
RECIPES = {"mae": "mae_vit_base_patch16_in1k.yaml", "dino": "dino_vit_small_patch16_in1k.yaml"}


def size(args, name):
    return SIZES[name][1 if args.smoke else 0]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device, n: int) -> float:
    """bf16 TFLOP/s of an n×n×n product (mean of 10 after 3 warm-ups)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n ** 3 * 10 / (time.perf_counter() - t0) / 1e12


# -- views ----------------------------------------------------------------------------------------------------------
class Samples(torch.utils.data.Dataset):
    """In-memory samples through a view transform, seeded per sample as the stream seeds them."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        torch.default_generator.manual_seed(i)
        return self.transform(open_image(self.samples[i]))


def views_rate(samples, specs, decode: str, device, workers: int, batch: int, batches: int) -> float:
    transform = MultiViewTransform(specs, decode)
    if len(samples) < (batches + 1) * batch:
        raise SystemExit(f"views: {len(samples)} photos cannot fill {batches + 1} batches of {batch} in one pass")
    loader = torch.utils.data.DataLoader(Samples(samples, transform), batch_size=batch, num_workers=workers,
                                         collate_fn=lambda items: collate_views(items, specs), shuffle=True)
    done, t0 = 0, None
    for views in loader:  # one pass, full batches: a restarted pass or a short batch would count as throughput
        out = views_to_device(views, device)
        if t0 is None:  # after the first batch: worker start-up is not throughput
            sync(device)
            t0 = time.perf_counter()
        else:
            done += 1
        if done == batches:
            break
    sync(device)
    del out
    return batches * batch / (time.perf_counter() - t0)


def views_section(args, samples, device) -> dict:
    paths = ["cpu", "gpu"]  # the GPU path's device code runs on any device, so --smoke exercises it on a CPU
    out = {}
    for name, specs in {"mae": mae_views(224), "dino": dino_views(224, 96, 10)}.items():
        rates = {p: views_rate(samples, specs, p, device, args.workers, size(args, "view_batch"),
                               size(args, "view_batches")) for p in paths}
        out[name] = {**{f"{p}_images_per_s": round(r, 1) for p, r in rates.items()},
                     "gpu_over_cpu": round(rates["gpu"] / rates["cpu"], 2)}
    return out


def memory_section(args, device) -> dict:
    """One batch of large photographs (mixed orientation) through the device path: the chunk plan's peak bytes, and
    on CUDA the measured peak of allocated memory while the views are made (the plan is an upper bound of it)."""
    count, side, specs = size(args, "memory_batch"), size(args, "memory_side"), dino_views(224, 96, 10)
    transform, items = MultiViewTransform(specs, "gpu"), []
    for i, (_, data) in enumerate(photo_jpegs(count, seed=1, long_side=side)):
        torch.default_generator.manual_seed(i)
        items.append(transform(open_image({"jpg": data, "__key__": str(i), "__url__": "memory"})))
    batch = collate_views(items, specs)
    plan = plan_chunks(*plan_sizes(batch.sizes), batch.specs, batch.size)
    out = {"photos": count, "long_side": side, "chunks": len(plan.chunks), "planned_peak_bytes": plan.peak_bytes}
    if device.type != "cuda":
        return {**out, "measured_peak_bytes": "skipped: no CUDA device"}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    made = views_to_device(batch, device)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out.update(measured_peak_bytes=torch.cuda.max_memory_allocated() - before, seconds=round(seconds, 3),
               decode_counts=made.counts)
    return out


# -- training -------------------------------------------------------------------------------------------------------
def recipe_for(args, method: str, overrides: list):
    extra = TINY[method] if args.smoke else []
    return load_recipe(ROOT / "recipes" / RECIPES[method], [*overrides, *extra])


def train_section(args, index: str, device, tmp: Path) -> dict:
    from ssl_vit.train.run_log import read_log
    from ssl_vit.train.trainer import Trainer

    out = {}
    for method in ("mae", "dino"):
        for decode in ("cpu", "gpu"):
            key = f"{method}_{decode}"
            if decode == "gpu" and device.type != "cuda":
                out[key] = "skipped: no CUDA device"
                continue
            run = tmp / key
            recipe = recipe_for(args, method, [
                f"data.train={index}", f"data.decode={decode}", f"data.num_workers={args.workers}",
                f"data.batch_size={size(args, method + '_batch')}", "data.shuffle_buffer=256",
                f"train.steps={size(args, 'train_steps')}", "train.epochs=0", "optim.warmup_epochs=0",
                "dino.warmup_teacher_temp_epochs=0", "dino.freeze_last_layer_epochs=0", f"train.out_dir={run}",
                "train.log_every=1", "train.progress=false", "train.log_with=[]", "train.resume="])
            try:
                Trainer(recipe).fit()
            except Exception as e:  # report and go on: the other sections still stand
                out[key] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            rows = read_log(run / "log.jsonl")[min(5, size(args, "train_steps") - 1):]  # after warm-up
            out[key] = {"data_wait_frac": round(float(np.mean([r["data_wait_frac"] for r in rows])), 4),
                        "images_per_s": round(float(np.median([r["images_per_s"] for r in rows])), 1),
                        "threads": rows[-1].get("threads"), "steps_averaged": len(rows),
                        **{k: rows[-1][k] for k in ("skipped_samples", "cpu_decoded_samples", "cpu_reduced_samples")
                           if k in rows[-1]}}
    return out


def mfu_section(args, device, peak_tflops: float) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from ssl_vit.methods import build_method
    from ssl_vit.train.trainer import trainer_schedules
    from ssl_vit.transforms import normalize

    out = {}
    for method in ("mae", "dino"):
        recipe = recipe_for(args, method, ["train.steps=100", "train.epochs=0", "optim.warmup_epochs=0",
                                           "dino.warmup_teacher_temp_epochs=0"])
        batch_size = size(args, method + "_batch")
        specs = views_from_recipe(recipe.views)
        model = build_method(recipe, num_global_views=2).to(device)
        optimizer = torch.optim.AdamW(model.param_groups(recipe.optim.weight_decay), lr=1e-4,
                                      fused=device.type == "cuda")
        sched = {k: float(f(0)) for k, f in {**trainer_schedules(recipe, 100, 100, batch_size),
                                             **model.schedules(100, 100)}.items()}
        views = [normalize(torch.randint(0, 256, (batch_size, 3, s.size, s.size), device=device, dtype=torch.uint8))
                 for s in specs for _ in range(s.count)]
        batch = {"views": views, "label": torch.zeros(batch_size, dtype=torch.long, device=device)}

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                prepared = model.prepare_step([dict(batch)], sched)[0]
                loss = model(prepared, sched, seed=0)["loss"]
            loss.backward()
            model.before_optimizer_step(0, sched)
            optimizer.step()
            model.on_step_end(0, sched)
            optimizer.zero_grad(set_to_none=True)

        with FlopCounterMode(display=False) as counter:
            step()
        for _ in range(2):
            step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(size(args, "mfu_steps")):
            step()
        sync(device)
        seconds = (time.perf_counter() - t0) / size(args, "mfu_steps")
        achieved = counter.get_total_flops() / seconds / 1e12
        out[method] = {"batch": batch_size, "step_s": round(seconds, 4), "tflops": round(achieved, 3),
                       "mfu": round(achieved / peak_tflops, 3), "images_per_s": round(batch_size / seconds, 1)}
    return out


# -- k-NN -------------------------------------------------------------------------------------------------------------
def knn_section(args, device) -> dict:
    queries, bank, dim, k, faiss_queries = size(args, "knn")
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(bank, dim, device=device, generator=generator), dim=1)
    q = torch.nn.functional.normalize(torch.randn(queries, dim, device=device, generator=generator), dim=1)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # exact: float32 products
    sync(device)
    t0 = time.perf_counter()
    for start in range(0, queries, 1024):
        sims, ids = (q[start:start + 1024] @ x.T).topk(k, dim=1)
    sync(device)
    torch_seconds = time.perf_counter() - t0
    torch.backends.cuda.matmul.allow_tf32 = tf32
    out = {"queries": queries, "bank": bank, "dim": dim, "k": k, "torch_seconds": round(torch_seconds, 2),
           "torch_device": device.type}
    if importlib.util.find_spec("faiss") is None:
        return {**out, "faiss": "skipped: faiss is not installed here (carry the faiss-cpu wheel)"}
    import faiss

    index = faiss.IndexFlatIP(dim)
    index.add(x.cpu().numpy())
    t0 = time.perf_counter()
    index.search(q[:faiss_queries].cpu().numpy(), k)
    faiss_seconds = (time.perf_counter() - t0) * queries / faiss_queries
    return {**out, "faiss_cpu_seconds_extrapolated": round(faiss_seconds, 1), "faiss_queries_timed": faiss_queries,
            "faiss_threads": faiss.omp_get_max_threads(), "torch_speedup": round(faiss_seconds / torch_seconds, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy sizes, any device: checks the script runs")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--workers", type=int, default=min(12, max(0, (os.cpu_count() or 1) - 2)))
    p.add_argument("--sections", nargs="+", default=["matmul", "views", "memory", "train", "mfu", "knn"],
                   choices=["matmul", "views", "memory", "train", "mfu", "knn"])
    args = p.parse_args(argv)
    if args.smoke:
        args.workers = 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "smoke": args.smoke,
              "workers": args.workers, "torch": torch.__version__}
    peak = matmul_rate(device, size(args, "matmul"))
    result["matmul"] = {"n": size(args, "matmul"), "bf16_tflops": round(peak, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        photos = size(args, "photos")
        index = make_photo_shards(Path(tmp) / "photos" / "train", count=photos, max_count=max(1, photos // 16), seed=0)
        if "views" in args.sections:
            samples = [s for url in expand_source(index).urls for s in read_shard(url)]
            result["views"] = views_section(args, samples, device)
        if "memory" in args.sections:
            result["memory"] = memory_section(args, device)
        if "train" in args.sections:
            result["train"] = train_section(args, index, device, Path(tmp))
    if "mfu" in args.sections:
        result["mfu"] = mfu_section(args, device, peak)
    if "knn" in args.sections:
        result["knn"] = knn_section(args, device)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
