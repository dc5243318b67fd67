"""Retrieval indexes over cached features: build (flat, IVF, HNSW, IVF-PQ), save/load, search, evaluate, and a
PNG grid of query results.

Index families as in Johnson et al., "Billion-scale similarity search with GPUs" (FAISS, 2019) — IVF and IVF-PQ
(Jégou et al., "Product quantization for nearest neighbor search", TPAMI 2011) — and Malkov & Yashunin,
"Efficient and robust approximate nearest neighbor search using HNSW graphs" (TPAMI 2018).
With metric "cosine" vectors are L2-normalised on the way in (build and query) and scored by inner product.
"""
import json
import math
import time
from pathlib import Path

import numpy as np

from ssl_vit.atomic_io import atomic_dir
from ssl_vit.errors import SslVitError
from ssl_vit.figure_io import save_png
from ssl_vit.eval import faiss_utils
from ssl_vit.eval.faiss_utils import faiss
from ssl_vit.eval.feature_cache import require_labels

KINDS = ("flat", "ivf", "hnsw", "ivfpq")
METRICS = ("cosine", "ip", "l2")
MIN_POINTS_PER_CENTROID = 39  # FAISS k-means warns below this many training points per centroid


def default_nlist(n: int) -> int:
    """About 4·sqrt(N) inverted lists, but no more than N / 39 so k-means has enough points per centroid."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // MIN_POINTS_PER_CENTROID))


def default_pq_m(dim: int) -> int:
    """The largest divisor of `dim` that is at most min(64, dim / 4): sub-vectors of >= 4 dims, <= 64 bytes."""
    return max([m for m in range(1, max(1, min(64, dim // 4)) + 1) if dim % m == 0] or [1])


def build_index(features, kind: str = "flat", *, nlist=None, m=None, nbits=8, hnsw_m=32, metric="cosine",
                nprobe=None, ef_search=64):
    """A trained, filled FAISS (CPU) index of `features` [N, D]; ids are row numbers.

    Defaults: nlist ~ 4·sqrt(N) (<= N/39), nprobe ~ sqrt(nlist), ivfpq m = largest divisor of D <= min(64, D/4),
    HNSW efSearch 64 (raised to k at search time)."""
    index, _ = _build(features, kind, nlist=nlist, m=m, nbits=nbits, hnsw_m=hnsw_m, metric=metric,
                      nprobe=nprobe, ef_search=ef_search)
    return index


def _build(features, kind, *, nlist, m, nbits, hnsw_m, metric, nprobe, ef_search):
    if kind not in KINDS:
        raise SslVitError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if metric not in METRICS:
        raise SslVitError(f"index metric must be one of {', '.join(METRICS)}, got {metric!r}")
    x = _prepare(faiss_utils.as_float32_2d(features, "index features"), metric)
    n, dim = x.shape
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    params = {}
    if kind == "flat":
        index = faiss.IndexFlat(dim, faiss_metric)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(hnsw_m), faiss_metric)
        index.hnsw.efSearch = int(ef_search)
        params = {"hnsw_m": int(hnsw_m), "ef_search": int(ef_search)}
    else:
        nlist = default_nlist(n) if nlist is None else int(nlist)
        if not 1 <= nlist <= n:
            raise SslVitError(f"nlist={nlist} must be between 1 and the number of vectors ({n})")
        quantizer = faiss.IndexFlat(dim, faiss_metric)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss_metric)
        else:
            m = _check_pq(n, dim, default_pq_m(dim) if m is None else int(m), int(nbits))
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, int(nbits), faiss_metric)
            params = {"m": m, "nbits": int(nbits)}
        index.referenced_objects = [quantizer]  # the quantizer must outlive the index
        index.train(x)
        index.nprobe = max(1, min(nlist, int(nprobe or round(math.sqrt(nlist)))))
        params.update(nlist=nlist, nprobe=int(index.nprobe))
    index.add(x)
    return index, params


def _check_pq(n: int, dim: int, m: int, nbits: int) -> int:
    if m < 1 or dim % m:
        raise SslVitError(f"ivfpq: m={m} must divide the feature dim {dim} (divisors: "
                          f"{[d for d in range(1, dim + 1) if dim % d == 0][:12]}...)")
    if not 1 <= nbits <= 16:
        raise SslVitError(f"ivfpq: nbits must be in 1..16, got {nbits}")
    if n < 2 ** nbits:
        raise SslVitError(f"ivfpq with nbits={nbits} needs at least {2 ** nbits} vectors to train, got {n} "
                          "(lower nbits or use kind flat/hnsw)")
    return m


def _prepare(x: np.ndarray, metric: str) -> np.ndarray:
    return faiss_utils.normalized(x) if metric == "cosine" else np.ascontiguousarray(x, dtype=np.float32)


class RetrievalIndex:
    """A FAISS index plus the key and label of each stored id (id = row of the features it was built from);
    `source` describes the features it was built from (saved with it; `index build` records the backbone, view,
    pooling, shards and class names, so that image files can be queried and results shown)."""

    def __init__(self, index, keys, labels, kind: str, metric: str, params: dict, source=None):
        if len(keys) != index.ntotal or len(labels) != index.ntotal:
            raise SslVitError(f"index holds {index.ntotal} vectors but {len(keys)} keys and {len(labels)} labels")
        self.index, self.kind, self.metric, self.params = index, kind, metric, dict(params)
        self.keys, self.labels = list(keys), np.asarray(labels, dtype=np.int64)
        self.source = dict(source or {})

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
        keys = [str(i) for i in range(n)] if keys is None else list(keys)
        labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels)
        if len(keys) != n or len(labels) != n:
            raise SslVitError(f"{n} features but {len(keys)} keys and {len(labels)} labels")
        unknown = sorted(set(params) - set(_BUILD_DEFAULTS))
        if unknown:
            raise SslVitError(f"unknown index option(s) {', '.join(unknown)}; known: {', '.join(_BUILD_DEFAULTS)}")
        metric = params.get("metric", "cosine")
        index, built = _build(features, kind, **{**_BUILD_DEFAULTS, **params})
        return cls(index, keys, labels, kind, metric, built)

    def search(self, queries, k: int, chunk_size: int = faiss_utils.SEARCH_CHUNK):
        """(scores [Nq, k], ids [Nq, k]) best first; id -1 where an approximate index found fewer than k."""
        queries = np.asarray(queries)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise SslVitError(f"query features have dim {queries.shape[-1]} but the index was built with dim "
                              f"{self.dim}: use features from the same backbone and pooling")
        if not 1 <= k <= len(self):
            raise SslVitError(f"k={k} must be between 1 and the number of indexed items ({len(self)})")
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(int(self.params["ef_search"]), k)
        return faiss_utils.search_chunked(self.index, queries, k, chunk_size, normalize=self.metric == "cosine")

    def lookup(self, ids) -> list:
        """[(key, label)] for each id (label None when unlabelled; (None, None) for the -1 'no result' id)."""
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i < 0:
                out.append((None, None))
            else:
                label = int(self.labels[i])
                out.append((self.keys[i], label if label >= 0 else None))
        return out

    def save(self, folder) -> Path:
        """index.faiss + meta.json (kind, dim, metric, params) + ids.json ({"keys", "labels"}: id = position)."""
        meta = {"kind": self.kind, "dim": self.dim, "metric": self.metric, "num": len(self), "params": self.params,
                "source": self.source}
        with atomic_dir(folder) as tmp:
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            (tmp / "ids.json").write_text(json.dumps({"keys": self.keys, "labels": self.labels.tolist()}))
        return Path(folder)

    @classmethod
    def load(cls, folder) -> "RetrievalIndex":
        folder = Path(folder)
        missing = [f for f in ("index.faiss", "meta.json", "ids.json") if not (folder / f).is_file()]
        if missing:
            raise SslVitError(f"retrieval index {folder} is missing {', '.join(missing)}"
                              f"{'' if folder.is_dir() else ' (the folder does not exist)'}")
        try:
            meta = json.loads((folder / "meta.json").read_text())
            ids = json.loads((folder / "ids.json").read_text())
            index = faiss.read_index(str(folder / "index.faiss"))
        except (ValueError, RuntimeError) as e:
            raise SslVitError(f"retrieval index {folder} is unreadable: {str(e).splitlines()[0]}") from None
        if not isinstance(meta, dict) or not isinstance(ids, dict) or \
                not {"kind", "metric", "dim"} <= set(meta) or not {"keys", "labels"} <= set(ids):
            raise SslVitError(f"retrieval index {folder}: meta.json needs kind, metric, dim and ids.json keys, labels")
        if index.d != meta["dim"]:
            raise SslVitError(f"{folder}: meta.json says dim {meta['dim']} but index.faiss holds dim {index.d}")
        out = cls(index, ids["keys"], ids["labels"], meta["kind"], meta["metric"], meta.get("params", {}),
                  meta.get("source"))
        if "nprobe" in out.params:
            faiss.extract_index_ivf(index).nprobe = int(out.params["nprobe"])
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
    if (index.labels < 0).all():
        raise SslVitError("the index has no labels (built without them): label-based evaluation is impossible")
    ks = tuple(sorted({int(k) for k in ks}))
    big_k, extra = ks[-1], int(exclude_self_keys is not None)
    if ks[0] < 1 or big_k + extra > len(index):
        raise SslVitError(f"ks {ks} must be >= 1 and below the number of indexed items ({len(index)})")
    t0 = time.perf_counter()
    _, ids = index.search(queries, big_k + extra)  # [Nq, K (+1)]
    seconds = time.perf_counter() - t0
    num_classes = int(max(query_labels.max(), index.labels.max())) + 1
    total_relevant = np.bincount(index.labels[index.labels >= 0], minlength=num_classes)[query_labels]  # [Nq]
    if extra:
        ids, own = _drop_self(index, ids, exclude_self_keys, big_k)
        total_relevant = total_relevant - ((own >= 0) & (index.labels[np.maximum(own, 0)] == query_labels))
    relevant = (ids >= 0) & (index.labels[np.maximum(ids, 0)] == query_labels[:, None])  # [Nq, K]
    return {"recall@k": {str(k): float(relevant[:, :k].any(1).mean()) for k in ks},
            "mAP": mean_average_precision(relevant, total_relevant), "mAP_at": big_k,
            "queries_per_s": len(queries) / max(seconds, 1e-9), "num_queries": len(queries),
            "search_seconds": seconds}


def _drop_self(index: RetrievalIndex, ids, self_keys, k: int):
    """ids [Nq, K+1] -> ([Nq, K] without each query's own item, [Nq] the id of the query's own item or -1)."""
    if len(self_keys) != len(ids):
        raise SslVitError(f"exclude_self_keys has {len(self_keys)} keys for {len(ids)} queries")
    position = {key: i for i, key in enumerate(index.keys)}
    own = np.array([position.get(str(key), -2) for key in self_keys], dtype=np.int64)  # [Nq]
    is_self = ids == own[:, None]  # [Nq, K+1]
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


_BUILD_DEFAULTS = dict(nlist=None, m=None, nbits=8, hnsw_m=32, metric="cosine", nprobe=None, ef_search=64)
