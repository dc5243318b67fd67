"""FAISS plumbing shared by k-NN and retrieval: thread counts, GPU detection, normalisation, chunked search."""
import contextlib
import functools
import os

import numpy as np

from ssl_vit.errors import SslVitError

try:
    import faiss
except ModuleNotFoundError:  # FAISS comes from an extra: faiss-cpu and faiss-gpu-cu12 install the same module
    raise SslVitError("FAISS is not installed: pip install 'ssl_vit[cpu]' (or 'ssl_vit[gpu]' on a CUDA 12 machine)") \
        from None
from ssl_vit.threads import available_cores

# Rows normalised and added (or searched) per FAISS call: bounds the float32 copies we make of user arrays.
ADD_CHUNK = 65536
SEARCH_CHUNK = 16384
GPU_MAX_K = 2048  # FAISS GPU k-selection limit


def torch_device(device=None):
    """`device`, or the accelerator when there is one (CUDA), else the CPU: where evaluation's torch work runs."""
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def thread_limit(num_threads=None):
    """Set FAISS's OpenMP pool and torch's intra-op pool (a separate pool) to `num_threads`; restore on exit."""
    import torch

    n = int(num_threads or available_cores())
    if n < 1:
        raise SslVitError(f"threads must be >= 1, got {num_threads}")
    old_faiss, old_torch = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        faiss.omp_set_num_threads(old_faiss)
        torch.set_num_threads(old_torch)


def gpu_available() -> bool:
    """True when the FAISS GPU build is installed and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def per_process(factory):
    """`factory()` made once per process and then reused; a forked child (a DataLoader worker) makes its own, since
    CUDA state does not survive a fork."""
    made = {}

    @functools.wraps(factory)
    def get():
        pid = os.getpid()
        if pid not in made:
            made.clear()
            made[pid] = factory()
        return made[pid]

    return get


@per_process
def gpu_resources():
    """This process's FAISS GPU resources, shared by every GPU index it builds: streams, a cuBLAS handle, a
    temporary-memory pool (FAISS reserves up to 1.5 GiB of device memory) and 256 MiB of pinned host memory. Made
    per index, all of that would be allocated and freed again at every k-NN call (every monitor step)."""
    return faiss.StandardGpuResources()


def resolve_device(use_gpu=None) -> str:
    """'faiss-gpu' or 'faiss-cpu'; `use_gpu=None` picks the GPU when there is one, True insists on it."""
    if use_gpu is None:
        use_gpu = gpu_available()
    if use_gpu and not gpu_available():
        raise SslVitError("a FAISS GPU index was requested but the FAISS GPU build or a GPU is missing "
                          "(pip install 'ssl_vit[gpu]' on a CUDA machine)")
    return "faiss-gpu" if use_gpu else "faiss-cpu"


def as_float32_2d(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise SslVitError(f"{name}: expected a non-empty 2-D array [N, D], got shape {x.shape}")
    return x.astype(np.float32, copy=False)


def normalized(x: np.ndarray) -> np.ndarray:
    """Row-wise L2-normalised float32 copy (all-zero rows stay zero); never modifies `x` (it may be a memmap)."""
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(out)
    return out


def flat_ip_index(bank, device: str = "faiss-cpu", normalize: bool = True):
    """An exact inner-product index over `bank` (L2-normalised first, so scores are cosine similarities)."""
    bank = as_float32_2d(bank, "bank")
    dim = bank.shape[1]
    if device == "faiss-gpu":
        import torch

        config = faiss.GpuIndexFlatConfig()
        config.device = torch.cuda.current_device() if torch.cuda.is_available() else 0  # this process's GPU
        res = gpu_resources()
        index = faiss.GpuIndexFlatIP(res, dim, config)
        index.referenced_objects = [res]  # the resources must outlive the index
        for start in range(0, bank.shape[0], ADD_CHUNK):
            rows = bank[start:start + ADD_CHUNK]
            index.add(normalized(rows) if normalize else np.ascontiguousarray(rows))
        return index
    index = faiss.IndexFlatIP(dim)
    for start in range(0, bank.shape[0], ADD_CHUNK):
        index.add(np.ascontiguousarray(bank[start:start + ADD_CHUNK]))
    if normalize:  # in the index's own storage: no extra copy of the bank
        stored = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * dim).reshape(index.ntotal, dim)
        faiss.normalize_L2(stored)
    return index


def iter_search(index, queries, k: int, chunk_size: int = SEARCH_CHUNK, normalize: bool = True, params=None):
    """Yield (start, scores [c, k], ids [c, k]) per chunk of `queries`: memory is O(chunk * k), never [Nq, Nbank]."""
    queries = as_float32_2d(queries, "queries")
    if queries.shape[1] != index.d:
        raise SslVitError(f"query features have dim {queries.shape[1]} but the index holds dim {index.d}")
    if chunk_size < 1:
        raise SslVitError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, queries.shape[0], chunk_size):
        rows = queries[start:start + chunk_size]
        rows = normalized(rows) if normalize else np.ascontiguousarray(rows)
        scores, ids = index.search(rows, k, params=params)  # [c, k], [c, k]; params: per-call nprobe/efSearch
        yield start, scores, ids


def search_chunked(index, queries, k: int, chunk_size: int = SEARCH_CHUNK, normalize: bool = True, params=None):
    """All of `iter_search` as two [Nq, k] arrays (scores, ids)."""
    parts = list(iter_search(index, queries, k, chunk_size, normalize, params))
    return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
