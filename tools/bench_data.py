"""Benchmark the streaming loader against the decode-only bound; prints JSON.

For MAE views and DINO multi-crop, at 0, 1 and 2 DataLoader workers: samples/s of `ShardStream` + `StreamLoader`
(steady state, after the first batch) and, in the same run, the bound: the same bytes decoded and cropped by the
same transform in a plain loop, run in as many processes as the loader uses (0 or 1 worker: one process; 2 workers:
two). Target: loader ≥ 0.9 × bound. On a shared machine single measurements drift by ±10 %, so loader and bound
are measured alternately for `--rounds` rounds and the best rate of each is reported (with every round's figures).

    python tools/bench_data.py [--shards INDEX.json] [--samples 3000] [--rounds 3] [--size 32 --local-size 16]
                               [--num-local 4] [--workers 0 1 2]
"""
import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from ssl_vit.data.loader import StreamLoader  # noqa: E402
from ssl_vit.data.samples import decode_image, read_shard  # noqa: E402
from ssl_vit.data.sources import expand_source  # noqa: E402
from ssl_vit.data.stream import ShardStream  # noqa: E402
from ssl_vit.transforms import MultiViewTransform, dino_views, mae_views  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def view_sets(args) -> dict:
    return {"mae": mae_views(args.size),
            "dino": dino_views(global_size=args.size, local_size=args.local_size, num_local=args.num_local)}


def loader_rate(index: str, transform, workers: int, samples: int, batch: int) -> float:
    stream = ShardStream(index, transform, batch, mode="train", seed=0, num_workers=workers, group_size=1)
    batches, t0, n = iter(StreamLoader(stream, workers)), None, 0
    for batch_ in batches:
        if t0 is None:  # start the clock after the first batch: worker start-up is not throughput
            t0 = time.perf_counter()
            continue
        n += len(batch_["key"])
        if n >= samples:
            break
    return n / (time.perf_counter() - t0)


def _plain_loop(payload) -> tuple[int, float]:
    raw, specs = payload
    torch.set_num_threads(1)
    transform = MultiViewTransform(specs)
    t0 = time.perf_counter()
    for sample in raw:
        transform(decode_image(sample))
    return len(raw), time.perf_counter() - t0


def bound_rate(raw: list[dict], specs, processes: int) -> float:
    if processes <= 1:
        n, seconds = _plain_loop((raw, specs))
        return n / seconds
    parts = [(raw[i::processes], specs) for i in range(processes)]
    with mp.get_context("fork").Pool(processes) as pool:
        t0 = time.perf_counter()
        results = pool.map(_plain_loop, parts)
        wall = time.perf_counter() - t0
    return sum(n for n, _ in results) / wall


def default_shards(tmp: Path) -> str:
    from ssl_vit.data.writer import write_shards

    out = tmp / "bench"
    write_shards(str(ROOT / "data" / "cifar10_subset" / "train.tar.gz"), str(out), max_count=250, seed=0,
                 workers=2, progress=False)
    return f"{out}-index.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="index.json of shards (default: the bundled CIFAR-10 subset, written to a tmp dir)")
    p.add_argument("--samples", type=int, default=3000, help="samples timed per measurement")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--local-size", type=int, default=16)
    p.add_argument("--num-local", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=3, help="alternate loader and bound this many times; report the best")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        index = args.shards or default_shards(Path(tmp))
        raw = [s for url in expand_source(index).urls for s in read_shard(url)][: args.samples]
        results = {"shards": index, "samples_timed": len(raw), "cpu_count": os.cpu_count(), "views": {}}
        for name, specs in view_sets(args).items():
            transform = MultiViewTransform(specs)
            rows = {}
            for workers in args.workers:
                processes, loaders, bounds = max(1, workers), [], []
                for _ in range(max(1, args.rounds)):
                    loaders.append(loader_rate(index, transform, workers, len(raw), args.batch))
                    bounds.append(bound_rate(raw, specs, processes))
                rows[f"workers={workers}"] = {"loader_samples_per_s": round(max(loaders), 1),
                                              "bound_samples_per_s": round(max(bounds), 1), "processes": processes,
                                              "ratio": round(max(loaders) / max(bounds), 3),
                                              "rounds": {"loader": [round(x, 1) for x in loaders],
                                                         "bound": [round(x, 1) for x in bounds]}}
            results["views"][name] = {"num_views": transform.num_views, "sizes": transform.sizes, **rows}
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
