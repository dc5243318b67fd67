"""Streaming benchmark: memory bounded by the shuffle window, not by the shard; first batch after one window.

Prints JSON (and writes it with --out):
- `memory_mb`: peak memory (MB; the process tree's anonymous memory, each page shared between processes split between
  them, sampled every 100 ms) of one reader (0 workers) and of a 2-worker loader that each read the same number of
  samples from one shard of 64 MB, 256 MB and 1 GB; `memory_ratio_largest_to_smallest` should stay within 1.10 (a reader
  that held whole shards would grow by the difference in shard size). Summed RSS would count a fork's copy-on-write
  pages once per process: a worker, or a library's helper caught between fork and exec, doubled the tree's number;
- `first_batch`: seconds to the first batch from a `pipe:` command that delivers at a limited rate, against the
  time one window and one whole shard take to arrive at that rate;
- `throughput`: loader samples/s (0 workers, after its first batch) against the decode bound (decode + the same
  views + the batch stack and normalisation, as the loader hands batches out, in a plain loop on bytes already in
  memory), on the same samples in the same run.

Shards hold ~110 KB JPEGs of 500×375 (blocks plus noise, quality 90), ImageNet's average size; written once into
--scratch and reused.
"""
import argparse
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

MB = 1 << 20
THROTTLE = ("import sys, time\n"
            "rate, path = float(sys.argv[1]), sys.argv[2]\n"
            "out, start, sent = sys.stdout.buffer, time.perf_counter(), 0\n"
            "with open(path, 'rb') as f:\n"
            "    while chunk := f.read(65536):\n"
            "        try:\n"
            "            out.write(chunk); out.flush()\n"
            "        except BrokenPipeError:  # the reader has what it needs\n"
            "            sys.exit(0)\n"
            "        sent += len(chunk)\n"
            "        time.sleep(max(0.0, sent / rate - (time.perf_counter() - start)))\n")


def jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (47, 63, 3), dtype=np.uint8)
    pixels = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:375, :500]
    pixels = pixels + rng.integers(0, 40, pixels.shape, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def make_shard(path: Path, size_bytes: int) -> tuple[Path, int]:
    """One shard of about `size_bytes` (a few distinct images under distinct keys) and its index (what
    `ssl-vit shards index` writes, so that two workers can split one shard); returns (index, sample count)."""
    from webdataset import TarWriter

    from ssl_vit.atomic_io import atomic_path
    from ssl_vit.data.scan import index_shards

    images = [jpeg(i) for i in range(8)]
    count = max(1, size_bytes // (len(images[0]) + 3 * 512))
    index = path.with_name(path.stem + "-index.json")
    if not path.is_file():
        with atomic_path(path) as tmp, TarWriter(str(tmp), encoder=False) as tar:
            for i in range(count):
                tar.write({"__key__": f"s{i:08d}", "jpg": images[i % len(images)], "cls": b"0"})
    if not index.is_file():
        index_shards(str(path), index, workers=1, progress=False)
    return index, count


def read_samples(url: str, samples: int, workers: int, window: int, batch: int) -> float | None:
    """Read `samples` samples through the stream; returns seconds to the first batch (None when `samples` is 0)."""
    from ssl_vit.data.loader import StreamLoader
    from ssl_vit.data.stream import ShardStream
    from ssl_vit.transforms import MultiViewTransform, mae_views

    stream = ShardStream(url, MultiViewTransform(mae_views(32)), batch, mode="train", seed=0,
                         shuffle_buffer=window, num_workers=workers, batches_per_epoch=None)
    loader = StreamLoader(stream)
    if not samples:  # the process before reading: imports, the stream, no workers yet
        return None
    start, first = time.perf_counter(), None
    for i, _ in enumerate(loader):
        first = first or time.perf_counter() - start
        if (i + 1) * batch >= samples:
            break
    return first


def anonymous_memory(pid: int) -> int:
    """Bytes of a process's anonymous memory, pages shared with other processes split between them (Pss_Anon; Pss
    on kernels without it, which also counts shared libraries). Heap is where a reader that held shards would
    grow; shared libraries are mapped by every torch process on the machine, which would make the number move with
    them."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if line[0].isupper())
    return int(fields.get("Pss_Anon", fields["Pss"]).split()[0]) * 1024


def peak_memory_mb(cmd: list[str]) -> tuple[float, str]:
    """Peak anonymous memory of a command's process tree (see `anonymous_memory`), and its stdout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(anonymous_memory(p.pid) for p in tree))
            except (psutil.Error, OSError):  # a process that ended between the listing and the read
                pass
            time.sleep(0.1)  # each sample reads every process's smaps_rollup (~5 ms): at 20 ms it took ~40 % of a core

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"benchmark child failed: {' '.join(cmd)}")
    if not peak:
        raise SystemExit(f"no memory reading for {' '.join(cmd)}: /proc/<pid>/smaps_rollup (Linux >= 4.14) unreadable")
    return peak / MB, out


def throughput(url: str, samples: int) -> dict:
    from ssl_vit.data.loader import StreamLoader
    from ssl_vit.data.stream import ShardStream
    from ssl_vit.data.tar_reader import iter_samples
    from ssl_vit.transforms import MultiViewTransform, mae_views

    from bench_common import alternate, plain_loop, timed

    specs, batch = mae_views(224), 16
    transform = MultiViewTransform(specs)
    raw = [s for _, s in zip(range(samples), iter_samples(url))]

    def bound() -> float:  # views from bytes in memory, stacked and normalised per batch, in one thread
        n, seconds = plain_loop((raw, specs, batch))
        return n / seconds

    def loader() -> float:  # in this process too (0 workers, one thread); timed from its second batch
        stream = ShardStream(url, transform, batch, mode="train", seed=0, shuffle_buffer=100, batches_per_epoch=None)
        return timed(StreamLoader(stream), len(raw))

    bounds, loaders = alternate(3, bound, loader)
    return {"loader_samples_per_s": round(max(loaders), 1), "decode_bound_samples_per_s": round(max(bounds), 1),
            "ratio": round(max(loaders) / max(bounds), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scratch", default="/tmp/ssl_vit_bench_stream")
    p.add_argument("--sizes-mb", default="64,256,1024", help="shard sizes in MB")
    p.add_argument("--samples", type=int, default=500, help="samples each reader reads (several windows)")
    p.add_argument("--window", type=int, default=100, help="data.shuffle_buffer")
    p.add_argument("--rate-mb-s", type=float, default=20.0, help="the throttled pipe's delivery rate")
    p.add_argument("--batch", type=int, default=32, help="batch size of the readers")
    p.add_argument("--child", nargs=3, metavar=("URL", "WORKERS", "SAMPLES"), help=argparse.SUPPRESS)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    if args.child:
        first = read_samples(args.child[0], int(args.child[2]), int(args.child[1]), args.window, args.batch)
        print(json.dumps({"first_batch_s": first}))
        return

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    shards = {size: scratch / f"shard-{size}mb.tar" for size in sizes}
    made = {size: make_shard(path, size * MB) for size, path in shards.items()}
    indexes, counts = {k: v[0] for k, v in made.items()}, {k: v[1] for k, v in made.items()}
    sample_bytes = shards[sizes[0]].stat().st_size / counts[sizes[0]]
    samples = min(args.samples, min(counts.values()))

    def child(url, workers: int, count: int) -> tuple[float, str]:
        return peak_memory_mb([sys.executable, __file__, "--window", str(args.window), "--batch", str(args.batch),
                               "--child", str(url), str(workers), str(count)])

    memory = {f"workers_{workers}": {f"{size}MB": round(child(indexes[size], workers, samples)[0], 1)
                                     for size in sizes} for workers in (0, 2)}
    ratios = {k: round(v[f"{sizes[-1]}MB"] / v[f"{sizes[0]}MB"], 3) for k, v in memory.items()}
    # What the process holds before reading anything (torch, timm, the stream): the rest is the data path's.
    baseline = round(child(indexes[sizes[0]], 0, 0)[0], 1)

    piped = shards[sizes[min(1, len(sizes) - 1)]]
    rate = args.rate_mb_s * MB
    throttle = scratch / "throttle.py"
    throttle.write_text(THROTTLE)
    _, out = child(f"pipe:{sys.executable} {throttle} {rate} {piped}", 0, 64)
    first = json.loads(out.strip().splitlines()[-1])["first_batch_s"]

    result = {
        "benchmark": "bench_stream", "shard_sample_bytes": round(sample_bytes), "window_samples": args.window,
        "samples_read": samples, "memory_mb": memory, "memory_ratio_largest_to_smallest": ratios,
        "memory_mb_before_reading": baseline,
        "first_batch": {"source": f"pipe: at {args.rate_mb_s} MB/s, {piped.stat().st_size / MB:.0f} MB shard",
                        "first_batch_s": round(first, 2),
                        "window_arrival_s": round(args.window * sample_bytes / rate, 2),
                        "shard_arrival_s": round(piped.stat().st_size / rate, 2)},
        "throughput_224px_mae": throughput(str(shards[sizes[0]]), min(300, samples)),
    }
    result["first_batch"]["ratio_to_shard_arrival"] = round(
        result["first_batch"]["first_batch_s"] / result["first_batch"]["shard_arrival_s"], 3)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
