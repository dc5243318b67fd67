"""`index build --kind auto`: choose the index family and its parameters under a memory budget by measuring, as
autofaiss does, recall@k against exact search and the search time on a held-out sample of the cache.

Method: a key-hash sample of the cache (eval/index_build.training_sample) is split into held-out queries and a
tuning base of up to `tune_size` rows. Each family whose estimated size at the full N fits `max_memory` is built
over the base and swept over its search parameter (IVF nprobe, HNSW efSearch) until recall@k against exact search
on the base reaches `target_recall`. Flat wins when it fits and its search time, scaled from the base to N, is at
most `max_latency_ms` per query; otherwise the fastest candidate that reaches the target (or, when none does, the
one with the best recall). IVF lists and nprobe are scaled from the base to N by the fraction of lists probed.
Recall and time are those measured on the base (exact at N when N fits in the base); the report says which.
"""
import math
import re
import time

import numpy as np

from ssl_vit.errors import SslVitError
from ssl_vit.eval.faiss_utils import faiss
from ssl_vit.eval.index_build import default_nlist, empty_index, iter_chunks, resolve_params, training_sample

SIZE_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
              "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
EF_SWEEP = (16, 32, 64, 128, 256, 512)
PQ_BYTES = (64, 32, 16, 8)  # PQ code sizes tried, largest first (m sub-quantizers of 8 bits)
FINAL_EXACT_MAX = 2_000_000  # the built index's recall is checked against exact search over all rows up to this N


def parse_size(text: str) -> int:
    """'2GB', '512MiB', '1.5 gb' or a byte count -> bytes (GB = 10^9, GiB = 2^30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if match is None or match.group(2).lower() not in SIZE_UNITS:
        raise SslVitError(f"--max-memory {text!r}: expected a size such as 2GB, 512MB or 1GiB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def estimated_bytes(kind: str, n: int, dim: int, params: dict) -> int:
    """The index's size in RAM at n vectors (codes + ids + coarse centroids + graph links + refine codes)."""
    size = {"flat": n * dim * 4, "hnsw": n * (dim * 4 + params.get("hnsw_m", 32) * 2 * 4 + 8),
            "ivf": n * (dim * 4 + 8), "ivfpq": n * (params.get("m", 0) + 8)}[kind]
    size += params.get("nlist", 0) * dim * 4
    size += {"flat": n * dim * 4, "sq8": n * dim}.get(params.get("refine"), 0)
    return int(size)


def choose(parts: list, max_memory: int, *, target_recall: float = 0.9, k: int = 10, metric: str = "cosine",
           num_queries: int = 500, tune_size: int = 50_000, max_latency_ms: float = 10.0):
    """(kind, build params at N, report, held-out queries) for the parts' rows under `max_memory` bytes."""
    n, dim = sum(len(p) for p in parts), int(parts[0].features.shape[1])
    if n < 2 * k + 2:
        raise SslVitError(f"--kind auto needs more than {2 * k + 2} vectors to measure recall@{k}, got {n}")
    num_queries = min(num_queries, n // 5)
    sample = training_sample(parts, min(n, num_queries + tune_size), metric)
    held = np.random.default_rng(0).permutation(len(sample))
    queries, base = sample[held[:num_queries]], sample[np.sort(held[num_queries:])]
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    exact = faiss.IndexFlat(dim, faiss_metric)
    exact.add(base)
    t0 = time.perf_counter()
    truth = exact.search(queries, k)[1]
    flat_ms = (time.perf_counter() - t0) / len(queries) * 1000 * n / len(base)
    report = {"num": n, "dim": dim, "max_memory": max_memory, "target_recall": target_recall, "k": k,
              "measured_on": {"base": len(base), "queries": len(queries)},
              "max_latency_ms": max_latency_ms, "candidates": []}
    flat = {"kind": "flat", "params": {}, "bytes": estimated_bytes("flat", n, dim, {}), "recall": 1.0,
            "ms_per_query": flat_ms}
    report["candidates"].append(flat)
    if flat["bytes"] <= max_memory and flat_ms <= max_latency_ms:
        report["chosen"] = flat
        return "flat", {"metric": metric}, report, queries
    for kind, params in candidates(n, len(base), dim, max_memory):
        row = sweep(kind, params, base, queries, truth, k, metric, target_recall)
        row["bytes"] = estimated_bytes(kind, n, dim, row["params"])
        report["candidates"].append(row)
    fitting = [c for c in report["candidates"] if c["bytes"] <= max_memory]
    if not fitting:
        raise SslVitError(f"no index of {n} x {dim} fits --max-memory {max_memory / 1e9:.2f} GB (smallest: "
                          f"{min(c['bytes'] for c in report['candidates']) / 1e9:.2f} GB)")
    good = [c for c in fitting if c["recall"] >= target_recall]
    best = min(good, key=lambda c: c["ms_per_query"]) if good else max(fitting, key=lambda c: c["recall"])
    report["chosen"] = {**best, "reached_target": bool(good)}
    return best["kind"], {"metric": metric, **best["params"]}, report, queries


def final_check(index, parts: list, queries, k: int = 10) -> dict:
    """recall@k and search time of the built `index` (a RetrievalIndex) on the held-out queries, against exact
    search over every row (chunked brute force, merged in a FAISS result heap); skipped above FINAL_EXACT_MAX."""
    n = sum(len(p) for p in parts)
    if n > FINAL_EXACT_MAX:
        return {"skipped": f"N={n} > {FINAL_EXACT_MAX}: recall as measured on the tuning base"}
    metric = faiss.METRIC_L2 if index.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    heap = faiss.ResultHeap(len(queries), k, keep_max=index.metric != "l2")
    offset = 0
    for part in parts:
        for rows in iter_chunks(part, index.metric):
            scores, ids = faiss.knn(queries, rows, min(k, len(rows)), metric=metric)
            heap.add_result(np.ascontiguousarray(scores), np.ascontiguousarray(ids + offset))
            offset += len(rows)
    heap.finalize()
    t0 = time.perf_counter()
    found = index.search(queries, k)[1]
    ms = (time.perf_counter() - t0) / len(queries) * 1000
    recall = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, heap.I)]))
    return {"recall": recall, "ms_per_query": ms, "queries": len(queries), "exact_over": n}


def candidates(n: int, base: int, dim: int, max_memory: int):
    """(kind, params at the base's size) of the families worth measuring under the budget at N."""
    out = []
    if estimated_bytes("hnsw", n, dim, {"hnsw_m": 32}) <= max_memory:
        out.append(("hnsw", {"hnsw_m": 32}))
    nlist_n, nlist_base = default_nlist(n), default_nlist(base)
    if estimated_bytes("ivf", n, dim, {"nlist": nlist_n}) <= max_memory:
        out.append(("ivf", {"nlist": nlist_base}))
    for code in PQ_BYTES:
        m = max([d for d in range(1, code + 1) if dim % d == 0 and dim // d >= 2] or [1])
        if estimated_bytes("ivfpq", n, dim, {"m": m, "nlist": nlist_n}) > max_memory or base < 256:
            continue
        refine = "sq8" if estimated_bytes("ivfpq", n, dim, {"m": m, "nlist": nlist_n, "refine": "sq8"}) \
            <= max_memory else None
        out.append(("ivfpq", {"nlist": nlist_base, "m": m, "nbits": 8, "refine": refine}))
        break
    return [(kind, {**params, "scale_nlist": nlist_n / max(nlist_base, 1)}) for kind, params in out]


def sweep(kind: str, params: dict, base, queries, truth, k: int, metric: str, target: float) -> dict:
    """Build `kind` over the base; raise its search parameter until recall@k reaches `target` (or runs out):
    {"kind", "params" (at N), "recall", "ms_per_query", "sweep": [[value, recall, ms], ...]}."""
    scale = params.pop("scale_nlist")
    resolved = resolve_params(kind, len(base), base.shape[1], metric=metric,
                              **{key: v for key, v in params.items() if v is not None})
    index = empty_index(kind, base.shape[1], resolved)
    if resolved.get("refine"):
        fine = faiss.IndexScalarQuantizer(base.shape[1], faiss.ScalarQuantizer.QT_8bit, index.metric_type)
        index = faiss.IndexRefine(index, fine)
        index.k_factor = float(resolved["k_factor"])
    index.train(base)
    index.add(base)
    values = EF_SWEEP if kind == "hnsw" else [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= resolved["nlist"]]
    rows = []
    for value in values:
        search = search_parameters(kind, value, resolved)
        t0 = time.perf_counter()
        found = index.search(queries, k, params=search)[1]
        ms = (time.perf_counter() - t0) / len(queries) * 1000
        recall = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, truth)]))
        rows.append([value, recall, ms])
        if recall >= target:
            break
    value, recall, ms = rows[-1]
    at_n = {key: v for key, v in resolved.items() if key not in ("metric", "train_size")}
    if kind == "hnsw":
        at_n["ef_search"] = value
    else:
        at_n["nlist"] = max(1, int(round(resolved["nlist"] * scale)))
        at_n["nprobe"] = max(1, min(at_n["nlist"], int(math.ceil(value * scale))))
    return {"kind": kind, "params": at_n, "recall": recall, "ms_per_query": ms, "sweep": rows}


def search_parameters(kind: str, value: int, resolved: dict):
    if kind == "hnsw":
        params = faiss.SearchParametersHNSW()
        params.efSearch = value
        return params
    params = faiss.SearchParametersIVF()
    params.nprobe = value
    if not resolved.get("refine"):
        return params
    refine = faiss.IndexRefineSearchParameters()
    refine.k_factor, refine.base_index_params = float(resolved["k_factor"]), params
    refine.referenced = params
    return refine
