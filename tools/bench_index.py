"""Benchmark `index build` from a memory-mapped feature cache against FAISS's own index_factory build written
plainly (train on a sample, add in chunks) in the same run, on synthetic clustered vectors; prints JSON.

Per (N, D): build seconds and peak RSS of each side, each in a fresh process (VmHWM: that process's own), ratios
ours / reference (targets: RSS <= 1.2x and build time <= 1.2x the reference, RSS <= 0.5x the feature matrix at 4M),
on the whole process and on the build's own memory (peak minus the RSS after imports: the package imports torch,
~0.7 GB here, before any work), then `index build --kind auto` under --max-memory: its choice, search queries/s and
recall@10.

    python tools/bench_index.py                       # N = 1M and 4M at D = 128 and 384 (add --large for 16M)
    python tools/bench_index.py --n 200000 --dim 128  # what a shared 2-core machine takes in a few minutes
"""
import argparse
import json
import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

CHUNK = 65536


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1_000_000, 4_000_000])
    p.add_argument("--dim", type=int, nargs="+", default=[128, 384])
    p.add_argument("--large", action="store_true", help="also N = 16M")
    p.add_argument("--classes", type=int, default=1000, help="Gaussian clusters of the synthetic vectors")
    p.add_argument("--nlist", type=int, help="IVF lists of both builds (default ~4 sqrt(N))")
    p.add_argument("--m", type=int, help="PQ bytes per vector of both builds (default: the package's)")
    p.add_argument("--max-memory", default="2GB", help="budget of the `auto` build")
    p.add_argument("--queries", type=int, default=1000, help="search queries for queries/s")
    p.add_argument("--no-auto", action="store_true", help="skip the `auto` section")
    p.add_argument("--work-dir", help="where the caches are written (default: a temporary folder, removed)")
    p.add_argument("--threads", type=int, help="FAISS threads of both sides (default: every core)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss would carry the parent's peak across the spawn's exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # not Linux: KiB


def write_cache(folder: Path, n: int, dim: int, classes: int, seed: int) -> None:
    """A feature cache of n clustered vectors, written a chunk at a time (never n x dim in memory)."""
    from ssl_vit.eval.feature_cache import encode_keys, write_keys

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    folder.mkdir(parents=True)
    features = np.lib.format.open_memmap(folder / "features.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, CHUNK):
        rows = min(CHUNK, n - start)
        features[start:start + rows] = centres[rng.integers(0, classes, rows)] + \
            0.5 * rng.standard_normal((rows, dim), dtype=np.float32)
    features.flush()
    del features
    np.save(folder / "labels.npy", np.full(n, -1, np.int64))
    write_keys(folder, encode_keys([f"{i:010d}" for i in range(n)]))
    (folder / "meta.json").write_text(json.dumps({"pooling": "cls", "dim": dim, "num": n}))


def use_threads(threads) -> None:
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)


def build_ours(folder: str, nlist: int, m: int, threads) -> dict:
    """Fresh process: `RetrievalIndex.build_from_parts` over the memory-mapped cache (what `index build` does)."""
    from ssl_vit.eval.feature_cache import open_rows
    from ssl_vit.eval.index_build import Part
    from ssl_vit.eval.retrieval import RetrievalIndex

    use_threads(threads)
    base = peak_rss_mb()
    features, keys, labels, _ = open_rows(folder)
    t0 = time.perf_counter()
    index = RetrievalIndex.build_from_parts([Part(features, keys, labels)], "ivfpq", nlist=nlist, m=m)
    return {"build_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": base,
            "train_size": index.params["train_size"], "ntotal": len(index)}


def build_reference(folder: str, nlist: int, m: int, train_size: int, threads) -> dict:
    """Fresh process: FAISS written plainly, as its wiki's billion-scale recipe: index_factory, train on a random
    sample, add normalised chunks from the memmap."""
    import faiss

    use_threads(threads)
    base = peak_rss_mb()
    x = np.load(Path(folder) / "features.npy", mmap_mode="r")
    t0 = time.perf_counter()
    # "np": no polysemous training (index_factory's default for IVF-PQ), which ours does not do either
    index = faiss.index_factory(x.shape[1], f"IVF{nlist},PQ{m}np", faiss.METRIC_INNER_PRODUCT)
    rows = np.sort(np.random.default_rng(0).choice(len(x), min(train_size, len(x)), replace=False))
    sample = np.ascontiguousarray(x[rows])
    faiss.normalize_L2(sample)
    index.train(sample)
    del sample
    for start in range(0, len(x), CHUNK):
        chunk = np.array(x[start:start + CHUNK])
        faiss.normalize_L2(chunk)
        index.add(chunk)
    return {"build_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": base,
            "ntotal": int(index.ntotal)}


def auto_section(folder: str, max_memory: str, queries: int, threads) -> dict:
    """Fresh process: `index build --kind auto` (the CLI's own path; its table goes to stderr) and its search rate."""
    import argparse as ap
    import contextlib

    from ssl_vit.commands.index_build import choose_kind, open_parts
    from ssl_vit.eval.index_auto import final_check
    from ssl_vit.eval.retrieval import RetrievalIndex

    use_threads(threads)
    parts, _ = open_parts([folder])
    args = ap.Namespace(max_memory=max_memory, target_recall=0.9, metric="cosine", max_latency_ms=10.0)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        kind, params, report, held_out = choose_kind(args, parts)
    tune_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = RetrievalIndex.build_from_parts(parts, kind, **params)
    build_s = time.perf_counter() - t0
    q = np.asarray(parts[0].features[:queries])
    t0 = time.perf_counter()
    index.search(q, 10)
    qps = len(q) / (time.perf_counter() - t0)
    return {"kind": kind, "params": index.params, "tune_s": tune_s, "build_s": build_s, "queries_per_s": qps,
            "recall@10_tuning": report["chosen"]["recall"], "final": final_check(index, parts, held_out),
            "bytes_estimated": report["chosen"]["bytes"], "peak_rss_mb": peak_rss_mb()}


def in_fresh_process(fn, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def bench_one(root: Path, n: int, dim: int, cfg) -> dict:
    from ssl_vit.eval.index_build import default_nlist, default_pq_m, resolve_params

    folder = root / f"cache_{n}_{dim}"
    t0 = time.perf_counter()
    write_cache(folder, n, dim, cfg.classes, cfg.seed)
    nlist, m = cfg.nlist or default_nlist(n), cfg.m or default_pq_m(dim)
    train_size = resolve_params("ivfpq", n, dim, nlist=nlist, m=m)["train_size"]
    out = {"n": n, "dim": dim, "nlist": nlist, "m": m, "train_size": train_size,
           "features_mb": n * dim * 4 / 2 ** 20, "write_cache_s": time.perf_counter() - t0}
    out["reference"] = in_fresh_process(build_reference, str(folder), nlist, m, train_size, cfg.threads)
    out["ours"] = in_fresh_process(build_ours, str(folder), nlist, m, cfg.threads)
    ours, ref = out["ours"], out["reference"]
    out["ratio_build_s"] = ours["build_s"] / ref["build_s"]
    out["ratio_peak_rss"] = ours["peak_rss_mb"] / ref["peak_rss_mb"]
    # the build's own memory: the package's imports (torch, through ssl_vit.threads) come before any work
    out["ratio_build_rss"] = (ours["peak_rss_mb"] - ours["rss_before_mb"]) / \
        max(ref["peak_rss_mb"] - ref["rss_before_mb"], 1e-3)
    out["peak_rss_over_features"] = ours["peak_rss_mb"] / out["features_mb"]
    out["build_rss_over_features"] = (ours["peak_rss_mb"] - ours["rss_before_mb"]) / out["features_mb"]
    if not cfg.no_auto:
        out["auto"] = in_fresh_process(auto_section, str(folder), cfg.max_memory, cfg.queries, cfg.threads)
    shutil.rmtree(folder)
    return out


def main(argv=None) -> int:
    cfg = parse_args(argv)
    sizes = cfg.n + ([16_000_000] if cfg.large else [])
    root = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="bench_index_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        runs = [bench_one(root, n, dim, cfg) for dim in cfg.dim for n in sizes]
    finally:
        if not cfg.work_dir:
            shutil.rmtree(root, ignore_errors=True)
    json.dump({"config": vars(cfg), "runs": runs}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
