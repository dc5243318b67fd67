"""Retrieval indexes over cached features: build (flat, IVF, HNSW, IVF-PQ), save/load, search, evaluate, and a
PNG grid of query results.

Index families as in Johnson et al., "Billion-scale similarity search with GPUs" (FAISS, 2019) — IVF and IVF-PQ
(Jégou et al., "Product quantization for nearest neighbor search", TPAMI 2011) — and Malkov & Yashunin,
"Efficient and robust approximate nearest neighbor search using HNSW graphs" (TPAMI 2018).
With metric "cosine" vectors are L2-normalised on the way in (build and query) and scored by inner product.
"""
import json
import time
from pathlib import Path

import numpy as np

from ssl_vit.atomic_io import atomic_dir
from ssl_vit.errors import SslVitError
from ssl_vit.figure_io import save_png
from ssl_vit.eval import faiss_utils
from ssl_vit.eval.faiss_utils import faiss
from ssl_vit.eval.feature_cache import encode_keys, require_labels
from ssl_vit.eval.index_build import (KINDS, METRICS, ConcatRows, Part, build_parts, default_nlist,  # noqa: F401
                                      default_pq_m, resolve_params)

INDEX_FILES = ("index.faiss", "meta.json", "keys.npy", "labels.npy")
BUILD_OPTIONS = ("nlist", "m", "nbits", "hnsw_m", "metric", "nprobe", "ef_search", "refine", "k_factor",
                 "train_size")

def build_index(features, kind: str = "flat", **params):
    """A trained, filled FAISS (CPU) index of `features` [N, D]; ids are row numbers.

    Defaults: nlist ~ 4·sqrt(N) (<= N/39), nprobe ~ sqrt(nlist), ivfpq m = largest divisor of D <= min(64, D/4),
    HNSW efSearch 64 (raised to k at search time); trained on a sample, added in chunks (eval/index_build.py)."""
    return RetrievalIndex.build(features, kind=kind, **params).index


class RetrievalIndex:
    """A FAISS index plus the key and label of each stored id (id = row of the features it was built from, parts
    in order); `source` describes the features it was built from (saved with it; `index build` records the
    backbone, view, pooling, shards and class names, so that image files can be queried and results shown).

    Keys are UTF-8 bytes [N] and labels int64 [N], memory-mapped when loaded: read by row, never N Python strings.
    `key_runs` are the bounds of the id ranges whose keys are sorted (one per cache part), so a key finds its id by
    binary search; an index built from unsorted keys stores their order (`key_order`) instead."""

    def __init__(self, index, keys, labels, kind: str, metric: str, params: dict, source=None, key_runs=None,
                 key_order=None):
        keys = keys if isinstance(keys, (np.ndarray, ConcatRows)) and keys.dtype.kind == "S" \
            else encode_keys(list(keys))
        if len(keys) != index.ntotal or len(labels) != index.ntotal:
            raise SslVitError(f"index holds {index.ntotal} vectors but {len(keys)} keys and {len(labels)} labels")
        self.index, self.kind, self.metric, self.params = index, kind, metric, dict(params)
        self.keys = keys
        self.labels = labels if isinstance(labels, ConcatRows) else np.asarray(labels, dtype=np.int64)
        self.source = dict(source or {})
        self.key_runs = [0, len(keys)] if key_runs is None else [int(b) for b in key_runs]
        self.key_order = key_order

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, features, keys=None, labels=None, kind="flat", **params) -> "RetrievalIndex":
        """Index `features` [N, D]; keys default to row numbers, labels to -1 (unlabelled)."""
        n = len(features)
        if n == 0:
            raise SslVitError("empty evaluation set: no features to index")
        keys = encode_keys([str(i) for i in range(n)] if keys is None else list(keys))
        labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels)
        if len(keys) != n or len(labels) != n:
            raise SslVitError(f"{n} features but {len(keys)} keys and {len(labels)} labels")
        ordered = bool((keys[1:] >= keys[:-1]).all())
        return cls.build_from_parts([Part(features, keys, labels, ordered)], kind, **params)

    @classmethod
    def build_from_parts(cls, parts: list, kind: str = "flat", chunk: int = faiss_utils.ADD_CHUNK,
                         **params) -> "RetrievalIndex":
        """Index the parts' rows in order (ids: part 0's rows, then part 1's, ...), reading `chunk` rows at a time."""
        unknown = sorted(set(params) - set(BUILD_OPTIONS))
        if unknown:
            raise SslVitError(f"unknown index option(s) {', '.join(unknown)}; known: {', '.join(BUILD_OPTIONS)}")
        dims = {int(p.features.shape[1]) for p in parts}
        if len(dims) != 1:
            raise SslVitError(f"feature parts have different dims {sorted(dims)}: one backbone and pooling per index")
        n = sum(len(p) for p in parts)
        resolved = resolve_params(kind, n, dims.pop(), **{k: v for k, v in params.items() if v is not None})
        index = build_parts(parts, kind, resolved, chunk)
        keys = ConcatRows([p.keys for p in parts])  # the caches' memmaps, read by row: nothing concatenated
        labels = ConcatRows([np.asarray(p.labels, dtype=np.int64) for p in parts])
        runs = np.cumsum([0] + [len(p) for p in parts]).tolist()
        order = None if all(p.sorted_keys for p in parts) else np.argsort(np.asarray(keys), kind="stable")
        metric = resolved.pop("metric")
        return cls(index, keys, labels, kind, metric, resolved, key_runs=runs if order is None else None,
                   key_order=order)

    def search(self, queries, k: int, chunk_size: int = faiss_utils.SEARCH_CHUNK, nprobe=None, ef_search=None):
        """(scores [Nq, k], ids [Nq, k]) best first; id -1 where an approximate index found fewer than k.
        `nprobe` / `ef_search` override the index's own for this call (thread-safe)."""
        queries = np.asarray(queries)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise SslVitError(f"query features have dim {queries.shape[-1]} but the index was built with dim "
                              f"{self.dim}: use features from the same backbone and pooling")
        if not 1 <= k <= len(self):
            raise SslVitError(f"k={k} must be between 1 and the number of indexed items ({len(self)})")
        return faiss_utils.search_chunked(self.index, queries, k, chunk_size, normalize=self.metric == "cosine",
                                          params=self.search_params(k, nprobe, ef_search))

    def search_params(self, k: int, nprobe=None, ef_search=None):
        """FAISS per-call parameters (None for flat): nprobe for IVF, efSearch (at least k) for HNSW, k_factor for
        a refine layer. Per call, not set on the index, so that concurrent searches with other values are safe."""
        params = None
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(int(ef_search or self.params["ef_search"]), k)
        elif "nprobe" in self.params:
            params = faiss.SearchParametersIVF()
            params.nprobe = int(nprobe or self.params["nprobe"])
        if "refine" in self.params:
            refine = faiss.IndexRefineSearchParameters()
            refine.k_factor, refine.base_index_params = float(self.params["k_factor"]), params
            refine.referenced = params  # the base parameters must outlive the call's object
            params = refine
        return params

    def key(self, i: int) -> str:
        return self.keys[i].decode("utf-8")

    def lookup(self, ids) -> list:
        """[(key, label)] for each id (label None when unlabelled; (None, None) for the -1 'no result' id)."""
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i < 0:
                out.append((None, None))
            else:
                label = int(self.labels[i])
                out.append((self.key(i), label if label >= 0 else None))
        return out

    def find(self, keys) -> np.ndarray:
        """The id of each key [n] (-1 where the index does not hold it): a binary search per sorted run."""
        wanted = encode_keys(list(keys))
        ids = np.full(len(wanted), -1, np.int64)
        if self.key_order is not None:
            runs, order = [(0, len(self))], np.asarray(self.key_order)
        else:
            runs, order = list(zip(self.key_runs[:-1], self.key_runs[1:])), None
        for lo, hi in runs:
            if hi <= lo:
                continue
            run = self.keys[lo:hi] if order is None else self.keys[order]
            at = np.minimum(np.searchsorted(run, wanted), hi - lo - 1)
            hit = (ids < 0) & (run[at] == wanted)
            ids[hit] = (lo + at[hit]) if order is None else order[at[hit]]
        return ids

    def save(self, folder, arrays: dict | None = None) -> Path:
        """index.faiss + meta.json (kind, dim, metric, params, source, key_runs) + keys.npy and labels.npy (by id),
        key_order.npy when the keys are not sorted runs, and `arrays` ({name: array} saved as name.npy beside)."""
        meta = {"kind": self.kind, "dim": self.dim, "metric": self.metric, "num": len(self), "params": self.params,
                "source": self.source, "key_runs": self.key_runs if self.key_order is None else None}
        with atomic_dir(folder) as tmp:
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            for name, rows in (("keys", self.keys), ("labels", self.labels)):
                (rows if isinstance(rows, ConcatRows) else ConcatRows([rows])).save(tmp / f"{name}.npy")
            if self.key_order is not None:
                np.save(tmp / "key_order.npy", np.asarray(self.key_order))
            for name, array in (arrays or {}).items():
                np.save(tmp / f"{name}.npy", array)
        return Path(folder)

    @classmethod
    def load(cls, folder) -> "RetrievalIndex":
        folder = Path(folder)
        missing = [f for f in INDEX_FILES if not (folder / f).is_file()]
        if missing:
            older = " (written by an older ssl_vit with ids.json: rebuild it with `ssl-vit index build`)" \
                if (folder / "ids.json").is_file() else ""
            raise SslVitError(f"retrieval index {folder} is missing {', '.join(missing)}"
                              f"{'' if folder.is_dir() else ' (the folder does not exist)'}{older}")
        try:
            meta = json.loads((folder / "meta.json").read_text())
            keys = np.load(folder / "keys.npy", mmap_mode="r", allow_pickle=False)
            labels = np.load(folder / "labels.npy", mmap_mode="r", allow_pickle=False)
            order = np.load(folder / "key_order.npy", mmap_mode="r") if (folder / "key_order.npy").is_file() \
                else None
            index = faiss.read_index(str(folder / "index.faiss"))
        except (ValueError, RuntimeError, OSError) as e:
            raise SslVitError(f"retrieval index {folder} is unreadable: {str(e).splitlines()[0]}") from None
        if not isinstance(meta, dict) or not {"kind", "metric", "dim"} <= set(meta) or keys.dtype.kind != "S":
            raise SslVitError(f"retrieval index {folder}: meta.json needs kind, metric, dim and keys.npy bytes keys")
        if index.d != meta["dim"]:
            raise SslVitError(f"{folder}: meta.json says dim {meta['dim']} but index.faiss holds dim {index.d}")
        out = cls(index, keys, labels, meta["kind"], meta["metric"], meta.get("params", {}), meta.get("source"),
                  key_runs=meta.get("key_runs"), key_order=order)
        if "nprobe" in out.params:
            faiss.extract_index_ivf(index).nprobe = int(out.params["nprobe"])
        if "k_factor" in out.params:
            index.k_factor = int(out.params["k_factor"])
        return out


def evaluate(index: RetrievalIndex, queries, query_labels, ks=(1, 5, 10), exclude_self_keys=None) -> dict:
    """Label-based retrieval quality of `index` for labelled `queries`.

    recall@k: fraction of queries with at least one item of the query's label among the top k (the
    "category-level" definition of deep metric learning, e.g. Song et al. 2016). It is not the instance-retrieval
    recall of copy-detection / landmark benchmarks (DINO's copy-detection and Oxford/Paris tables), where only the
    query's own duplicates or landmark count as positives.
    mAP: mean over queries of AP@K on the ranked top-K list (K = max(ks)): sum over ranks i <= K of precision@i
    at each relevant i, divided by min(K, R), R = items of the query's label in the index; so a query scores 1
    only when its first min(K, R) results are all relevant. Queries whose label has no item in the index are
    left out of the mAP (and count as misses in recall@k).
    exclude_self_keys: the key of each query; an index item with that key is dropped from the query's results
    (use it when the queries are the indexed items themselves).
    """
    queries = faiss_utils.as_float32_2d(queries, "query features")
    query_labels = np.asarray(query_labels, dtype=np.int64)
    if len(query_labels) != len(queries):
        raise SslVitError(f"query labels missing: {len(queries)} queries but {len(query_labels)} labels")
    require_labels(query_labels, "query", "label recall")
    labels = np.asarray(index.labels)  # [N]: label-based evaluation reads every label
    if (labels < 0).all():
        raise SslVitError("the index has no labels (built without them): label-based evaluation is impossible")
    ks = tuple(sorted({int(k) for k in ks}))
    big_k, extra = ks[-1], int(exclude_self_keys is not None)
    if ks[0] < 1 or big_k + extra > len(index):
        raise SslVitError(f"ks {ks} must be >= 1 and below the number of indexed items ({len(index)})")
    t0 = time.perf_counter()
    _, ids = index.search(queries, big_k + extra)  # [Nq, K (+1)]
    seconds = time.perf_counter() - t0
    num_classes = int(max(query_labels.max(), labels.max())) + 1
    total_relevant = np.bincount(labels[labels >= 0], minlength=num_classes)[query_labels]  # [Nq]
    if extra:
        ids, own = _drop_self(index, ids, exclude_self_keys, big_k)
        total_relevant = total_relevant - ((own >= 0) & (labels[np.maximum(own, 0)] == query_labels))
    relevant = (ids >= 0) & (labels[np.maximum(ids, 0)] == query_labels[:, None])  # [Nq, K]
    return {"recall@k": {str(k): float(relevant[:, :k].any(1).mean()) for k in ks},
            "mAP": mean_average_precision(relevant, total_relevant), "mAP_at": big_k,
            "queries_per_s": len(queries) / max(seconds, 1e-9), "num_queries": len(queries),
            "search_seconds": seconds}


def _drop_self(index: RetrievalIndex, ids, self_keys, k: int):
    """ids [Nq, K+1] -> ([Nq, K] without each query's own item, [Nq] the id of the query's own item or -1)."""
    if len(self_keys) != len(ids):
        raise SslVitError(f"exclude_self_keys has {len(self_keys)} keys for {len(ids)} queries")
    own = index.find([str(key) for key in self_keys])  # [Nq], -1 where absent
    is_self = (ids == own[:, None]) & (own[:, None] >= 0)  # [Nq, K+1]
    keep = np.argsort(is_self, axis=1, kind="stable")[:, :k]  # non-self results first, order kept
    return np.take_along_axis(ids, keep, axis=1), np.where(own >= 0, own, -1)


def mean_average_precision(relevant, total_relevant) -> float:
    """relevant: bool [Nq, K] ranked results; total_relevant: [Nq] positives in the whole index (see evaluate)."""
    relevant = np.asarray(relevant, dtype=np.float64)
    ranks = np.arange(1, relevant.shape[1] + 1)
    precision = np.cumsum(relevant, axis=1) / ranks  # [Nq, K]: precision@i
    denom = np.minimum(np.asarray(total_relevant), relevant.shape[1])
    has = denom > 0
    if not has.any():
        return 0.0
    ap = (precision * relevant).sum(1)[has] / denom[has]
    return float(ap.mean())


def compare_index_kinds(features, labels, kinds=KINDS, k: int = 10, keys=None, num_queries: int = 1000,
                        seed: int = 0, **params) -> dict:
    """Build each kind over `features` and query it with a seeded sample of the indexed items (self excluded):
    build seconds, queries/s, recall_vs_flat (mean fraction of the exact top-k ids found) and label recall@k/mAP."""
    features = faiss_utils.as_float32_2d(features, "features")
    keys = [str(i) for i in range(len(features))] if keys is None else list(keys)
    rows = np.sort(np.random.default_rng(seed).permutation(len(features))[:num_queries])
    queries, query_keys = features[rows], [keys[i] for i in rows]
    query_labels = np.asarray(labels)[rows]
    results, exact = {}, None
    for kind in ("flat",) + tuple(kd for kd in kinds if kd != "flat"):  # flat first: the exact reference
        t0 = time.perf_counter()
        index = RetrievalIndex.build(features, keys, labels, kind, **params)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, ids = index.search(queries, k)
        search_s = time.perf_counter() - t0
        exact = ids if exact is None else exact
        found = np.mean([len(np.intersect1d(a[a >= 0], b)) / k for a, b in zip(ids, exact)])
        quality = evaluate(index, queries, query_labels, (k,), exclude_self_keys=query_keys)
        results[kind] = {"build_s": build_s, "queries_per_s": len(queries) / max(search_s, 1e-9),
                         "recall_vs_flat": float(found), f"label_recall@{k}": quality["recall@k"][str(k)],
                         "mAP": quality["mAP"], "params": index.params}
    return {"k": k, "num_items": len(features), "num_queries": len(queries), "dim": int(features.shape[1]),
            "kinds": results}


def images_by_key(shard_urls, keys) -> dict:
    """{key: RGB image} for `keys`, read from the shards (scanned in order until every key is found)."""
    from ssl_vit.data.samples import BadSample, decode_image, read_shard

    wanted, found = set(keys), {}
    for url in shard_urls:
        for sample in read_shard(url):
            if sample["__key__"] in wanted and sample["__key__"] not in found:
                try:
                    found[sample["__key__"]] = decode_image(sample)
                except BadSample as e:
                    raise SslVitError(str(e)) from None
        if len(found) == len(wanted):
            return found
    missing = sorted(wanted - set(found))
    raise SslVitError(f"{len(missing)} key(s) (first {missing[0]!r}) are not in the {len(shard_urls)} shards the "
                      f"features were extracted from (first {shard_urls[0] if shard_urls else None})")


GRID_CELL_PX, GRID_ROW_PX, GRID_DPI = 120, 140, 100  # cell width, cell height with its caption


def write_result_grid(rows: list, png) -> Path:
    """A PNG with one row per query: the query image, then its results captioned with score (and label).

    rows: [(query image, query title, [(image, caption), ...])] (matplotlib's Agg canvas; no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = 1 + max(len(results) for _, _, results in rows)
    fig = Figure(figsize=(cols * GRID_CELL_PX / GRID_DPI, len(rows) * GRID_ROW_PX / GRID_DPI), dpi=GRID_DPI)
    FigureCanvasAgg(fig)
    for r, (query, title, results) in enumerate(rows):
        for c, (image, caption) in enumerate([(query, title), *results]):
            ax = fig.add_subplot(len(rows), cols, r * cols + c + 1)
            ax.set_axis_off()
            ax.imshow(np.asarray(image))
            ax.set_title(caption, fontsize=7, color="tab:blue" if c == 0 else "black")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93, wspace=0.08, hspace=0.3)
    return save_png(fig, png)


