"""Training images/s with torch's default intra-op threads (every core) vs the trainer's choice (the cores the loader's
workers leave), idle and with one competing busy process on the machine; prints JSON.

Each run is `ssl-vit pretrain` in a fresh process (the demo CIFAR recipe at a small size, `--workers` loader workers,
OMP_NUM_THREADS unset): "default" pins train.threads to the core count, which is what torch picks by itself; "chosen"
leaves train.threads at 0. The trainer's log records the threads each run used. The two are measured alternately for
`--rounds` rounds and the best images/s of each is reported.

    python tools/bench_threads.py [--method mae] [--steps 40] [--workers 1] [--rounds 2]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import ROOT, bundled_shards
from ssl_vit.threads import available_cores
from ssl_vit.train.run_log import read_log

SMALL = {"mae": ["mae.decoder_depth=2", "mae.decoder_dim=128", "mae.decoder_heads=4"],
         "dino": ["views.num_local=2", "dino.out_dim=1024", "dino.hidden_dim=256", "dino.bottleneck_dim=64"]}


def run(method: str, shards: str, out: Path, steps: int, workers: int, threads: int, batch: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    args = [sys.executable, "-m", "ssl_vit.cli", "pretrain", "--recipe", str(ROOT / "recipes" /
            f"{method}_vit_tiny_cifar10.yaml"), f"data.train={shards}", f"train.out_dir={out}",
            f"train.steps={steps}", "train.epochs=0", f"data.num_workers={workers}", f"data.batch_size={batch}",
            f"train.threads={threads}", "train.progress=false", "train.log_with=[]", "train.log_every=1",
            "optim.warmup_epochs=0", "dino.warmup_teacher_temp_epochs=0", "dino.freeze_last_layer_epochs=0",
            *SMALL[method]]
    subprocess.run(args, check=True, env=env, cwd=ROOT, capture_output=True)
    rows = read_log(out / "log.jsonl")
    rows = rows[min(5, len(rows) - 1):]  # after warm-up
    return {"threads": rows[-1]["threads"], "images_per_s": sum(r["images_per_s"] for r in rows) / len(rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=sorted(SMALL), default="mae")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--index", help="index.json of shards (default: the bundled CIFAR-10 subset, written to a tmp dir)")
    args = p.parse_args(argv)
    cores = available_cores()  # what the trainer's choice starts from
    results = {"method": args.method, "cores": cores, "workers": args.workers, "steps": args.steps,
               "batch": args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.index or bundled_shards(f"{tmp}/shards", max_count=500)
        for load in ("idle", "busy"):
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
            time.sleep(0.5 if busy else 0)
            try:
                best = {}
                for r in range(max(1, args.rounds)):
                    for name, threads in (("default", cores), ("chosen", 0)):
                        got = run(args.method, shards, Path(tmp) / f"{load}-{name}-{r}", args.steps, args.workers,
                                  threads, args.batch)
                        if got["images_per_s"] > best.get(name, {"images_per_s": 0})["images_per_s"]:
                            best[name] = got
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            results[load] = {name: {"threads": b["threads"], "images_per_s": round(b["images_per_s"], 1)}
                             for name, b in best.items()}
            results[load]["chosen_over_default"] = round(best["chosen"]["images_per_s"] /
                                                         best["default"]["images_per_s"], 3)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
