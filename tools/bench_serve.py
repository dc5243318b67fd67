"""Benchmark `ssl-vit serve` over loopback HTTP against the same searches done in-process in one loop; prints JSON.

An index of the bundled CIFAR-10 subset's features (a random-init 4-block, 128-wide ViT at 32 px, the CIFAR
recipes' size) is served on a free 127.0.0.1 port. At each concurrency (1, 4, 16 by default) image uploads and
key queries are sent by that many client threads (bounded: --requests per level, --max-seconds per level): queries/s
and p50/p99 latency. The reference, in this process on the same machine: the same uploads decoded, embedded and
searched in one loop, one at a time and in batches of the highest concurrency (the server's best case: one forward
pass per batch); key queries likewise. Target: image queries/s at concurrency 16 >= 0.8x the in-process batched
rate.

    python tools/bench_serve.py
    python tools/bench_serve.py --requests 64 --concurrency 1 4   # a quicker check
"""
import argparse
import concurrent.futures
import contextlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BOUNDARY = "bench-serve-boundary"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=1000, help="images indexed (bundled test split: at most 1000)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=256, help="requests per concurrency level and query kind")
    p.add_argument("--max-seconds", type=float, default=60.0, help="per level and kind: stop sending after this")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch-window-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int,
                   help="torch and FAISS threads of both sides (OMP_NUM_THREADS for the server; default: theirs)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_index(root: Path, samples: int) -> Path:
    """Shards of the bundled subset, a random-init tiny ViT, its feature cache and a flat index (the CLI's path)."""
    import torch

    from ssl_vit.cli import main
    from ssl_vit.models.backbone import BackboneSpec, create_backbone
    from ssl_vit.models.export import export_backbone

    from ssl_vit.data.index import shard_path_for
    from ssl_vit.data.writer import write_shards

    write_shards(str(ROOT / "data" / "cifar10_subset" / "test.tar.gz"), str(root / "shards"), max_count=samples,
                 seed=0, workers=1, progress=False)
    shards = str(shard_path_for(root / "shards", 0))  # the first shard: `samples` images
    torch.manual_seed(0)
    spec = BackboneSpec(img_size=32, patch_size=4, kwargs=dict(depth=4, embed_dim=128, num_heads=4))
    backbone = export_backbone(create_backbone(spec), spec, root / "backbone.safetensors")
    for argv in (["features", "--backbone", str(backbone), "--shards", shards, "--out", str(root / "feats"),
                  "--workers", "0", "--no-progress"],
                 ["index", "build", "--features", str(root / "feats"), "--out", str(root / "ix")]):
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON
            if main(argv) != 0:
                raise SystemExit(f"failed: {argv}")
    return root / "ix"


def queries(index_dir: Path, count: int, seed: int):
    """(image bytes [count], keys [count]): indexed samples' stored images, read through the index's image table."""
    from ssl_vit.data.image_table import ImageTable
    from ssl_vit.eval.retrieval import RetrievalIndex

    index = RetrievalIndex.load(index_dir)
    table = ImageTable.load(index_dir, index.source["shards"])
    rows = np.random.default_rng(seed).choice(len(index), count, replace=len(index) < count)
    keys = [index.key(int(i)) for i in rows]
    return [table.read(key) for key in keys], keys


def post(port: int, path: str, body: bytes = b"", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {data[:200]!r}")
        return json.loads(data)
    finally:
        conn.close()


def upload(port: int, image: bytes, k: int):
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()
    return post(port, f"/search?k={k}", body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


def load(send, items: list, concurrency: int, max_seconds: float) -> dict:
    """Send `items` with `concurrency` client threads until done or `max_seconds`: queries/s, p50/p99 ms."""
    latencies, deadline = [], time.perf_counter() + max_seconds

    def one(item):
        if time.perf_counter() > deadline:
            return None
        t0 = time.perf_counter()
        send(item)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = [s for s in pool.map(one, items) if s is not None]
    wall = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "queries_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def in_process(index_dir: Path, images: list, keys: list, batch: int, k: int) -> dict:
    """The server's work without the server, in one loop: decode + embed + search per upload, one at a time and
    in batches; cached vector + search per key."""
    from ssl_vit.eval.index_queries import index_caches, query_embedder
    from ssl_vit.eval.feature_cache import lookup_vectors, open_rows
    from ssl_vit.eval.retrieval import RetrievalIndex
    from ssl_vit.serve.engine import decode_upload

    index = RetrievalIndex.load(index_dir)
    embed = query_embedder(index, index_dir)
    embed([decode_upload(images[0], 10 ** 8)])  # warm-up
    out = {}
    t0 = time.perf_counter()
    for data in images:
        index.search(embed([decode_upload(data, 10 ** 8)]), k)
    out["upload_one_at_a_time_per_s"] = len(images) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for start in range(0, len(images), batch):
        index.search(embed([decode_upload(d, 10 ** 8) for d in images[start:start + batch]]), k)
    out[f"upload_batched_{batch}_per_s"] = len(images) / (time.perf_counter() - t0)
    caches = index_caches(index)
    opened = [open_rows(folder) for folder in caches]
    t0 = time.perf_counter()
    for key in keys:
        index.search(lookup_vectors(opened, [key], caches), k)
    out["key_one_at_a_time_per_s"] = len(keys) / (time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    cfg = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:
        result = measure(cfg, make_index(root, cfg.samples))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


def measure(cfg, index_dir: Path) -> dict:
    images, keys = queries(index_dir, cfg.requests, cfg.seed)
    server = subprocess.Popen([sys.executable, "-m", "ssl_vit.cli", "serve", "--index", str(index_dir),
                               "--host", "127.0.0.1", "--port", "0", "--batch-window-ms", str(cfg.batch_window_ms),
                               "--max-batch", str(max(cfg.concurrency))],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, **({"OMP_NUM_THREADS": str(cfg.threads)} if cfg.threads else {})})
    try:
        line = server.stdout.readline()
        port = int(line.rsplit(":", 1)[1].strip().rstrip("/"))
        upload(port, images[0], cfg.k)  # warm-up
        served = {}
        for c in cfg.concurrency:
            served[f"concurrency={c}"] = {
                "upload": load(lambda data: upload(port, data, cfg.k), images, c, cfg.max_seconds),
                "key": load(lambda key: post(port, f"/search?k={cfg.k}&key={urllib.parse.quote(key)}"), keys, c,
                            cfg.max_seconds)}
    finally:
        server.terminate()
        server.wait(timeout=30)
    if cfg.threads:
        import faiss
        import torch

        torch.set_num_threads(cfg.threads)
        faiss.omp_set_num_threads(cfg.threads)
    reference = in_process(index_dir, images, keys, max(cfg.concurrency), cfg.k)
    top = served[f"concurrency={max(cfg.concurrency)}"]
    result = {"config": vars(cfg), "served": served, "in_process": reference,
              "ratio_upload_top_concurrency_over_in_process_batched":
                  top["upload"]["queries_per_s"] / reference[f"upload_batched_{max(cfg.concurrency)}_per_s"],
              "ratio_upload_concurrency_1_over_in_process_one_at_a_time":
                  served[f"concurrency={min(cfg.concurrency)}"]["upload"]["queries_per_s"]
                  / reference["upload_one_at_a_time_per_s"],
              "ratio_key_top_concurrency_over_in_process":
                  top["key"]["queries_per_s"] / reference["key_one_at_a_time_per_s"]}
    return result


if __name__ == "__main__":
    sys.exit(main())
