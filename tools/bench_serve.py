"""Benchmark `ssl-vit serve` over loopback HTTP against the same searches done in-process in one loop; prints JSON.

Two image sizes (`--image-size`, both by default), each its own index served on a free 127.0.0.1 port:
- 32 px: the bundled CIFAR-10 test subset (1000 images) and a random-init 4-block, 128-wide ViT (the CIFAR recipes'
  size, about 1 ms per image): per-request HTTP cost is of the order of the embedding;
- 224 px: 256 JPEG crops of scikit-image's photographs at ImageNet size (long side 500 px, tools/make_photo_shards)
  and a random-init ViT-S/16 (timm's vit_small_patch16_224): the embedding is the cost, as for a real model.
At each concurrency (1, 4, 16 by default) image uploads (multipart, as the page sends them) and key queries are sent
by that many client threads, each over one keep-alive connection as browsers and HTTP client sessions do (bounded:
--requests per level, --max-seconds per level): queries/s, p50/p99 latency, and the CPU milliseconds per query of
the server and this client together. The reference, in this process on the same machine: the same upload bytes
decoded, embedded and searched in one loop, one at a time and in batches of the highest concurrency (the server's
best case: one forward pass per batch), and key queries likewise, each at 1 thread and at torch's default (every
core), the faster counting. Served and in-process alternate in rounds
(--rounds) so that a busy neighbour on a shared machine slows both; the ratios are of the best round of each side,
with each round's own ratio beside them. Target: image queries/s at concurrency 16 >= 0.8x the in-process batched
rate.

    python tools/bench_serve.py
    python tools/bench_serve.py --image-size 32 --requests 64 --concurrency 1 4 --rounds 1   # a quicker check
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
import threading
import time
import urllib.parse
from importlib import metadata
from pathlib import Path

import numpy as np

from bench_common import ROOT, alternate, cpu_seconds
from make_photo_shards import make_photo_shards

BOUNDARY = "bench-serve-boundary"
TARGET = 0.8
# per image size: the backbone (random init), the images indexed and the requests per level by default
SETUPS = {32: {"backbone": dict(img_size=32, patch_size=4, kwargs=dict(depth=4, embed_dim=128, num_heads=4)),
               "images": "bundled CIFAR-10 test subset (32-px JPEGs)", "samples": 1000, "requests": 256},
          224: {"backbone": dict(name="vit_small_patch16_224", img_size=224, patch_size=16),
                "images": "JPEG crops of scikit-image's photographs, long side 500 px (tools/make_photo_shards.py)",
                "samples": 256, "requests": 64}}
PHOTO_SIDE = 500


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, nargs="+", default=sorted(SETUPS), choices=sorted(SETUPS))
    p.add_argument("--samples", type=int, help="images indexed (default: 1000 at 32 px, 256 at 224 px)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int,
                   help="requests per concurrency level and query kind (default: 256 at 32 px, 64 at 224 px)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="per level and kind: stop sending after this")
    p.add_argument("--rounds", type=int, default=3, help="served and in-process measured in turn this many times")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch-window-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int,
                   help="torch and FAISS threads of both sides (OMP_NUM_THREADS for the server; default: the "
                        "server's own, and the in-process reference the best of 1 and torch's default)")
    p.add_argument("--server-torch-threads", type=int, default=0,
                   help="the server's --torch-threads alone (default 0: its own default); the reference is unchanged")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_index(root: Path, image_size: int, samples: int, seed: int) -> Path:
    """Shards, a random-init backbone of the size's setup, its feature cache and a flat index (the CLI's path)."""
    import torch

    from ssl_vit.cli import main
    from ssl_vit.data.index import shard_path_for
    from ssl_vit.data.writer import write_shards
    from ssl_vit.models.backbone import BackboneSpec, create_backbone
    from ssl_vit.models.export import export_backbone

    if image_size == 32:
        write_shards(str(ROOT / "data" / "cifar10_subset" / "test.tar.gz"), str(root / "shards"), max_count=samples,
                     seed=seed, workers=1, progress=False)
        shards = str(shard_path_for(root / "shards", 0))  # the first shard: `samples` images
    else:
        shards = make_photo_shards(root / "photos", count=samples, max_count=samples, seed=seed, workers=1,
                                   long_side=PHOTO_SIDE)
    torch.manual_seed(seed)
    spec = BackboneSpec(**SETUPS[image_size]["backbone"])
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


class Client:
    """One keep-alive HTTP connection per client thread (reopened if the server closed it)."""

    def __init__(self, port: int):
        self.port, self.local = port, threading.local()

    def post(self, path: str, body: bytes = b"", headers=None) -> dict:
        for attempt in (0, 1):
            conn = getattr(self.local, "conn", None) or http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            self.local.conn = conn
            try:
                conn.request("POST", path, body=body or None, headers=headers or {})
                response = conn.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                self.local.conn = None
                if attempt:
                    raise
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {data[:200]!r}")
        return json.loads(data)

    def stats(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", "/stats")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def upload(self, image: bytes, k: int) -> dict:
        body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()
        return self.post(f"/search?k={k}", body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})

    def key(self, key: str, k: int) -> dict:
        return self.post(f"/search?k={k}&key={urllib.parse.quote(key)}")


def load(send, items: list, concurrency: int, max_seconds: float) -> dict:
    """Send `items` with `concurrency` client threads until done or `max_seconds`: queries/s, p50/p99 ms and the CPU
    ms per query of this process and its children (the server) over the same span."""
    deadline = time.perf_counter() + max_seconds

    def one(item):
        if time.perf_counter() > deadline:
            return None
        t0 = time.perf_counter()
        send(item)
        return time.perf_counter() - t0

    t0, cpu0 = time.perf_counter(), cpu_seconds()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = [s for s in pool.map(one, items) if s is not None]
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    ms = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "queries_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "cpu_ms_per_query": 1000 * cpu / len(latencies)}


@contextlib.contextmanager
def serving(index_dir: Path, cfg):
    """The port of `ssl-vit serve` over `index_dir`, a child process, warmed up by a burst of uploads."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(cfg.threads)} if cfg.threads else {})}
    server = subprocess.Popen([sys.executable, "-m", "ssl_vit.cli", "serve", "--index", str(index_dir),
                               "--host", "127.0.0.1", "--port", "0", "--batch-window-ms", str(cfg.batch_window_ms),
                               "--max-batch", str(max(cfg.concurrency)), "--torch-threads",
                               str(cfg.server_torch_threads)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env=env)
    try:
        line = server.stdout.readline()
        if not line.startswith("serving index"):
            raise SystemExit(f"the server did not start: {line!r}")
        yield int(line.rsplit(":", 1)[1].strip().rstrip("/"))
    finally:
        server.terminate()
        server.wait(timeout=30)


def served_round(client: Client, images: list, keys: list, cfg) -> dict:
    out = {}
    for c in cfg.concurrency:
        before = client.stats()
        upload = load(lambda data: client.upload(data, cfg.k), images, c, cfg.max_seconds)
        after = client.stats()
        upload["mean_embed_batch"] = (upload["requests"] / max(1, after["embed_batches"] - before["embed_batches"]))
        out[f"concurrency={c}"] = {"upload": upload,
                                   "key": load(lambda key: client.key(key, cfg.k), keys, c, cfg.max_seconds)}
    return out


class InProcess:
    """The server's work without the server, in this process: decode + embed + search per upload, one at a time
    and in batches; cached vector + search per key. Measured at each of `threads` (torch and FAISS intra-op
    threads): the reference is the best of them, since torch's default (every core) collapses on cores that other
    processes keep busy (measured here at 224 px: 6.5 vs 13 uploads/s batched, 1 thread the faster)."""

    def __init__(self, index_dir: Path, images: list, keys: list, batch: int, k: int, threads: list):
        from ssl_vit.eval.feature_cache import lookup_vectors, open_rows
        from ssl_vit.eval.index_queries import index_caches, query_embedder
        from ssl_vit.eval.retrieval import RetrievalIndex
        from ssl_vit.serve.engine import decode_upload

        self.index = RetrievalIndex.load(index_dir)
        self.embed, caches = query_embedder(self.index.source, self.index.dim, index_dir), index_caches(self.index)
        opened = [open_rows(folder) for folder in caches]
        self.vectors_of = lambda batch_keys: lookup_vectors(opened, batch_keys, caches)
        self.decode = lambda data: decode_upload(data, 10 ** 8)
        self.images, self.keys, self.batch, self.k, self.threads = images, keys, batch, k, threads
        self.embed([self.decode(images[0])] * batch)  # warm-up at the batch size

    def round(self) -> dict:
        """{name: {"queries_per_s", "cpu_ms_per_query", "threads"}}: each the best of the thread counts."""
        import faiss
        import torch

        out = {}
        for threads in self.threads:
            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
            for name, row in self._measured().items():
                if name not in out or row["queries_per_s"] > out[name]["queries_per_s"]:
                    out[name] = {**row, "threads": threads}
        return out

    def _measured(self) -> dict:
        out = {}
        out["upload_one_at_a_time"] = self._rate(len(self.images), lambda: [
            self.index.search(self.embed([self.decode(data)]), self.k) for data in self.images])
        out[f"upload_batched_{self.batch}"] = self._rate(len(self.images), lambda: [
            self.index.search(self.embed([self.decode(d) for d in self.images[start:start + self.batch]]), self.k)
            for start in range(0, len(self.images), self.batch)])
        out["key_one_at_a_time"] = self._rate(len(self.keys), lambda: [
            self.index.search(self.vectors_of([key]), self.k) for key in self.keys])
        return out

    @staticmethod
    def _rate(count: int, work) -> dict:
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        work()
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        return {"queries_per_s": count / wall, "cpu_ms_per_query": 1000 * cpu / count}


def measure(cfg, index_dir: Path, requests: int) -> dict:
    """Served and in-process rounds in turn over one server; the ratios of their best rounds."""
    images, keys = queries(index_dir, requests, cfg.seed)
    top, batch = f"concurrency={max(cfg.concurrency)}", max(cfg.concurrency)
    with serving(index_dir, cfg) as port:
        client = Client(port)
        server_threads = client.stats()["torch_threads"]
        with concurrent.futures.ThreadPoolExecutor(batch) as pool:  # warm-up: every batch size up to the largest
            list(pool.map(lambda data: client.upload(data, cfg.k), images[:2 * batch]))
        import torch

        threads = [cfg.threads] if cfg.threads else sorted({1, torch.get_num_threads()})
        reference = InProcess(index_dir, images, keys, batch, cfg.k, threads)
        served, in_process = alternate(cfg.rounds, lambda: served_round(client, images, keys, cfg), reference.round)
    best = {level: {kind: max((r[level][kind] for r in served), key=lambda row: row["queries_per_s"])
                    for kind in ("upload", "key")} for level in served[0]}
    best_ref = {name: max(r[name]["queries_per_s"] for r in in_process) for name in in_process[0]}
    per_round = [s[top]["upload"]["queries_per_s"] / r[f"upload_batched_{batch}"]["queries_per_s"]
                 for s, r in zip(served, in_process)]
    ratio = best[top]["upload"]["queries_per_s"] / best_ref[f"upload_batched_{batch}"]
    return {"upload_bytes_mean": float(np.mean([len(d) for d in images])),
            "server_torch_threads": server_threads,
            "in_process_threads_tried": threads, "served_best": best,
            "in_process_best_per_s": best_ref,
            "ratio_upload_top_concurrency_over_in_process_batched": ratio,
            "ratio_upload_top_concurrency_over_in_process_batched_per_round": per_round,
            "ratio_upload_concurrency_1_over_in_process_one_at_a_time":
                best[f"concurrency={min(cfg.concurrency)}"]["upload"]["queries_per_s"]
                / best_ref["upload_one_at_a_time"],
            "ratio_key_top_concurrency_over_in_process":
                best[top]["key"]["queries_per_s"] / best_ref["key_one_at_a_time"],
            "meets_target": ratio >= TARGET, "rounds": {"served": served, "in_process": in_process}}


def versions() -> dict:
    names = ("torch", "timm", "faiss-cpu", "fastapi", "starlette", "uvicorn", "uvloop", "httptools",
             "python-multipart")
    found = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def main(argv=None) -> int:
    cfg = parse_args(argv)
    result = {"config": vars(cfg), "target": TARGET, "cores": len(os.sched_getaffinity(0)), "versions": versions(),
              "load_average_before": os.getloadavg(), "sizes": {}}
    for size in cfg.image_size:
        setup = SETUPS[size]
        samples, requests = cfg.samples or setup["samples"], cfg.requests or setup["requests"]
        root = Path(tempfile.mkdtemp(prefix=f"bench_serve_{size}_"))
        try:
            index_dir = make_index(root, size, samples, cfg.seed)
            result["sizes"][str(size)] = {"images": setup["images"], "backbone": setup["backbone"],
                                          "samples": samples, "requests": requests,
                                          **measure(cfg, index_dir, requests)}
        finally:
            shutil.rmtree(root, ignore_errors=True)
    result["load_average_after"] = os.getloadavg()
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
