"""Building FAISS indexes in bounded memory, as FAISS's own tools and autofaiss do: train the coarse quantizer and the
PQ codebooks on a sample, then add the vectors a chunk at a time from memory-mapped feature caches; a cache written
in several parts (the ranks of a `features --per-rank` run, or jobs over shards of the pile) is added part by part,
each part to a copy of the one trained index, and the copies are merged (`merge_from`), so no step needs the
vectors of two parts at once.

Peak memory: the trained index (growing to its codes: N·m bytes for IVF-PQ, N·D·4 for flat/IVF-flat/HNSW, plus
N·D·4 or N·D for a flat or SQ8 `refine`) + one chunk of ADD_CHUNK rows + the training sample (TRAIN_POINTS_PER_CENTROID
× the largest codebook, at most `train_size` rows), never the N × D matrix or a copy of it.

The training sample is chosen by a hash of each key, not by row: the same keys (and so the same trained index)
whichever way the cache is split into parts, so an index built from parts equals one built from the whole cache.
"""
import math
import mmap
from dataclasses import dataclass

import numpy as np

from ssl_vit.errors import SslVitError
from ssl_vit.eval import faiss_utils
from ssl_vit.eval.faiss_utils import faiss

KINDS = ("flat", "ivf", "hnsw", "ivfpq")
METRICS = ("cosine", "ip", "l2")
REFINES = ("flat", "sq8")
MIN_POINTS_PER_CENTROID = 39  # FAISS k-means warns below this many training points per centroid
TRAIN_POINTS_PER_CENTROID = 64  # FAISS samples at most 256 per centroid; 64 keeps 10^8-row builds' samples small
DEFAULT_K_FACTOR = 32  # refine: candidates re-ranked per result (8 missed 40 % of self-queries in tight clusters)


@dataclass
class Part:
    """Rows of one feature cache (or one in-memory array): features [n, D] (a memmap is read a chunk at a time),
    keys as UTF-8 bytes [n] (sorted when `sorted_keys`), labels int64 [n]."""
    features: np.ndarray
    keys: np.ndarray
    labels: np.ndarray
    sorted_keys: bool = True

    def __len__(self) -> int:
        return int(self.features.shape[0])


class ConcatRows:
    """The rows of several 1-D arrays (memmaps) as one, without concatenating them: an int or a slice inside one
    array reads that array only; an index array gathers; `np.asarray` concatenates (only where a caller needs all)."""

    def __init__(self, arrays: list):
        self.arrays = list(arrays)
        self.bounds = np.cumsum([0] + [len(a) for a in self.arrays])
        kinds = {a.dtype.kind for a in self.arrays}
        self.dtype = np.dtype(f"S{max(a.dtype.itemsize for a in self.arrays)}") if kinds == {"S"} \
            else np.result_type(*self.arrays)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __array__(self, dtype=None, copy=None):
        return np.concatenate([np.asarray(a, dtype=self.dtype) for a in self.arrays]).astype(dtype or self.dtype,
                                                                                           copy=False)

    def __getitem__(self, item):
        if isinstance(item, slice) and item.step in (None, 1):
            start, stop, _ = item.indices(len(self))
            part = int(np.searchsorted(self.bounds, start, side="right")) - 1
            if part >= 0 and stop <= self.bounds[part + 1]:
                return self.arrays[part][start - self.bounds[part]:stop - self.bounds[part]]
            return np.asarray(self)[item]
        if np.isscalar(item) or (isinstance(item, np.ndarray) and item.ndim == 0):
            i = int(item) + (len(self) if int(item) < 0 else 0)
            part = int(np.searchsorted(self.bounds, i, side="right")) - 1
            return self.arrays[part][i - self.bounds[part]]
        ids = np.asarray(item)
        out = np.empty(ids.shape, self.dtype)
        part = np.searchsorted(self.bounds, ids, side="right") - 1
        for p in np.unique(part):
            mine = part == p
            out[mine] = self.arrays[p][ids[mine] - self.bounds[p]]
        return out

    def save(self, path, chunk: int = 1 << 20) -> None:
        """As one .npy array, written a chunk at a time."""
        out = np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=(len(self),))
        for array, start in zip(self.arrays, self.bounds):
            for offset in range(0, len(array), chunk):
                rows = array[offset:offset + chunk]
                out[start + offset:start + offset + len(rows)] = rows
        out.flush()


def default_nlist(n: int) -> int:
    """About 4·sqrt(N) inverted lists, but no more than N / 39 so k-means has enough points per centroid."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // MIN_POINTS_PER_CENTROID))


def default_pq_m(dim: int) -> int:
    """The largest divisor of `dim` that is at most min(64, dim / 4): sub-vectors of >= 4 dims, <= 64 bytes."""
    return max([m for m in range(1, max(1, min(64, dim // 4)) + 1) if dim % m == 0] or [1])


def resolve_params(kind: str, n: int, dim: int, *, nlist=None, m=None, nbits=8, hnsw_m=32, metric="cosine",
                   nprobe=None, ef_search=64, refine=None, k_factor=DEFAULT_K_FACTOR, train_size=None) -> dict:
    """Every build parameter with its default filled in and checked (one-line errors)."""
    if kind not in KINDS:
        raise SslVitError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if metric not in METRICS:
        raise SslVitError(f"index metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if refine not in (None, *REFINES):
        raise SslVitError(f"refine must be one of {', '.join(REFINES)}, got {refine!r}")
    params = {"metric": metric}
    if kind == "hnsw":
        params.update(hnsw_m=int(hnsw_m), ef_search=int(ef_search))
    if kind in ("ivf", "ivfpq"):
        nlist = default_nlist(n) if nlist is None else int(nlist)
        if not 1 <= nlist <= n:
            raise SslVitError(f"nlist={nlist} must be between 1 and the number of vectors ({n})")
        params.update(nlist=nlist, nprobe=max(1, min(nlist, int(nprobe or round(math.sqrt(nlist))))))
    if kind == "ivfpq":
        params.update(m=_check_pq(n, dim, default_pq_m(dim) if m is None else int(m), int(nbits)), nbits=int(nbits))
    if refine:
        if kind != "ivfpq":
            raise SslVitError(f"refine re-ranks compressed distances: it applies to ivfpq, not {kind}")
        params.update(refine=refine, k_factor=max(1, int(k_factor)))
    centroids = max(params.get("nlist", 0), 2 ** params["nbits"] if kind == "ivfpq" else 0)
    if centroids or refine == "sq8":
        default = TRAIN_POINTS_PER_CENTROID * max(centroids, 1)
        params["train_size"] = min(n, max(centroids, int(train_size or default)))
    return params


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


def empty_index(kind: str, dim: int, params: dict):
    """The untrained, empty FAISS index that `params` (from resolve_params) describe (refine layer excluded)."""
    metric = faiss.METRIC_L2 if params["metric"] == "l2" else faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlat(dim, metric)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], metric)
        index.hnsw.efSearch = params["ef_search"]
        return index
    quantizer = faiss.IndexFlat(dim, metric)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], metric)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["m"], params["nbits"], metric)
    index.own_fields = True  # the index deletes its quantizer: clones and merges stay valid
    quantizer.this.disown()
    index.nprobe = params["nprobe"]
    return index


def refine_layer(dim: int, params: dict):
    """The finer storage `refine` re-ranks with: the vectors themselves (flat) or 8-bit scalar codes (sq8)."""
    metric = faiss.METRIC_L2 if params["metric"] == "l2" else faiss.METRIC_INNER_PRODUCT
    if params["refine"] == "flat":
        return faiss.IndexFlat(dim, metric)
    return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, metric)


def key_hash(keys: np.ndarray) -> np.ndarray:
    """uint64 [n] hash of bytes keys (a polynomial over the bytes, then splitmix64's finaliser); trailing padding
    bytes are zero and add nothing, so a key hashes the same in arrays of any width."""
    width = keys.dtype.itemsize
    u8 = np.frombuffer(np.ascontiguousarray(keys).tobytes(), np.uint8).reshape(len(keys), width)  # [n, W]
    powers = np.array([pow(1099511628211, j, 1 << 64) for j in range(width)], np.uint64)
    with np.errstate(over="ignore"):
        h = (u8.astype(np.uint64) * powers).sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def training_sample(parts: list, size: int, metric: str, chunk: int = faiss_utils.ADD_CHUNK) -> np.ndarray:
    """About `size` rows [S, D] chosen by key hash (at least `size` when N allows: the threshold is the size-th
    smallest hash), in key order, prepared for the metric (normalised for cosine)."""
    total = sum(len(p) for p in parts)
    hashes = [np.concatenate([key_hash(p.keys[s:s + chunk]) for s in range(0, len(p), chunk)]) for p in parts]
    every = np.concatenate(hashes)
    cut = np.partition(every, size - 1)[size - 1] if size < total else np.iinfo(np.uint64).max
    chosen = [np.flatnonzero(h <= cut) for h in hashes]  # rows of each part, ascending
    order = np.argsort(np.concatenate([p.keys[rows] for p, rows in zip(parts, chosen)]), kind="stable")
    part_of = np.concatenate([np.full(len(rows), i) for i, rows in enumerate(chosen)])[order]
    row_of = np.concatenate(chosen)[order]
    sample = np.empty((len(order), parts[0].features.shape[1]), np.float32)  # [S, D], in key order
    for i, part in enumerate(parts):
        mine = np.flatnonzero(part_of == i)
        by_row = mine[np.argsort(row_of[mine], kind="stable")]  # sample positions in file order
        rows = row_of[by_row]
        for lo, hi in zip(np.searchsorted(rows, np.arange(0, len(part), chunk)),
                          np.searchsorted(rows, np.arange(chunk, len(part) + chunk, chunk))):
            sample[by_row[lo:hi]] = part.features[rows[lo:hi]]  # rows of one chunk of the file at a time
            release(part.features)
        release(part.keys)
    if metric == "cosine":
        faiss.normalize_L2(sample)
    return sample


def prepare(x: np.ndarray, metric: str) -> np.ndarray:
    x = faiss_utils.as_float32_2d(x, "index features")
    return faiss_utils.normalized(x) if metric == "cosine" else np.ascontiguousarray(x, dtype=np.float32)


def iter_chunks(part: Part, metric: str, chunk: int = faiss_utils.ADD_CHUNK):
    """The part's rows as prepared float32 chunks [c, D] (a memmap is read one chunk at a time, and its pages
    leave this process's RSS after each chunk)."""
    for start in range(0, len(part), chunk):
        yield prepare(part.features[start:start + chunk], metric)
        release(part.features)


def release(array) -> None:
    """Drop the pages of a memory-mapped array from this process (MADV_DONTNEED; they stay in the page cache):
    read pages of a file mapping count in RSS, so a pass over a 6 GB cache would otherwise end with 6 GB of RSS."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def build_parts(parts: list, kind: str, params: dict, chunk: int = faiss_utils.ADD_CHUNK):
    """A filled FAISS index over `parts` in order (ids: rows of part 0, then of part 1, ...).

    Trained once on the sample; each part is added to a copy of the trained index and merged into the first
    (IVF and flat: `merge_from`); HNSW's graph cannot be merged, so its parts are added to the one index in turn.
    A `refine` layer stores the vectors (or SQ8 codes) in the same id order and re-ranks `k_factor` × k candidates.
    `index build --train-only / --trained` and `index merge` run the same three steps on several machines."""
    trained, sample = train(parts, kind, params, chunk)
    if kind == "hnsw":
        for part in parts:
            add_rows(trained, part, params, chunk)
        merged = trained
    else:
        merged = merge([add_rows(faiss.clone_index(trained), part, params, chunk) for part in parts], kind, params)
    if not params.get("refine"):
        return merged
    dim = parts[0].features.shape[1]
    fine = refine_layer(dim, params)
    if not fine.is_trained:
        fine.train(sample)
    for part in parts:
        add_rows(fine, part, params, chunk)
    index = faiss.IndexRefine(merged, fine)
    index.own_fields = index.own_refine_index = True
    merged.this.disown()
    fine.this.disown()
    index.k_factor = params["k_factor"]
    return index


def train(parts: list, kind: str, params: dict, chunk: int = faiss_utils.ADD_CHUNK):
    """(the trained, empty index, the training sample or None): only the sample's rows of the parts are read."""
    trained = empty_index(kind, parts[0].features.shape[1], params)
    sample = training_sample(parts, params["train_size"], params["metric"], chunk) if "train_size" in params \
        else None
    if not trained.is_trained:
        trained.train(sample)
    return trained, sample


def add_rows(index, part: Part, params: dict, chunk: int = faiss_utils.ADD_CHUNK):
    """`index` with the part's rows added a chunk at a time (ids continue from index.ntotal)."""
    for rows in iter_chunks(part, params["metric"], chunk):
        index.add(rows)
    return index


def merge(pieces: list, kind: str, params: dict):
    """The pieces (filled copies of one trained index) as one: ids of piece 0, then of piece 1, ..."""
    if kind == "hnsw":
        raise SslVitError("HNSW graphs cannot be merged: build an HNSW index from all parts in one process")
    merged = pieces[0]
    for piece in pieces[1:]:
        merged.merge_from(piece, merged.ntotal if kind in ("ivf", "ivfpq") else 0)  # flat: ids are positions
    if kind in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(merged).nprobe = params["nprobe"]
    return merged
