"""Intra-op threads of a process that feeds on DataLoader workers: the cores those workers leave.

torch's default (every core) in the training process oversubscribes the machine once the loader's workers run too.
Measured on 2 cores, MAE demo recipe, 1 worker (issue 15): 423 img/s by default vs 473 with one thread (+12 %;
DINO 117 → 136); with one other busy process on the machine, 185 vs 421 (2.3×). `tools/bench_threads.py` measures it.
"""
import os

from ssl_vit.errors import SslVitError


def available_cores() -> int:
    """The cores this process may run on (the affinity mask, which `os.cpu_count()` ignores)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def choose_threads(num_workers: int, requested: int = 0, *, cores: int | None = None,
                   local_processes: int | None = None, requested_as: str = "train.threads") -> dict:
    """{'threads', 'source', 'cores', 'workers'} for one process: `OMP_NUM_THREADS` when the user set it, else
    `requested` (a recipe's train.threads) when > 0, else this process's share of the cores
    (cores ÷ processes on this node, LOCAL_WORLD_SIZE) less its `num_workers` loader workers, at least 1."""
    cores = cores or available_cores()
    local = local_processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp:
        if not omp.isdigit() or int(omp) < 1:
            raise SslVitError(f"OMP_NUM_THREADS={omp!r} is not a number of threads >= 1")
        threads, source = int(omp), "OMP_NUM_THREADS"
    elif requested > 0:
        threads, source = requested, requested_as
    else:
        threads = max(1, cores // max(1, local) - num_workers)
        source = "cores left after the loader's workers" if num_workers else "every core of this process's share"
    return {"threads": threads, "source": source, "cores": cores, "workers": num_workers}


def use_threads(num_workers: int, requested: int = 0, requested_as: str = "train.threads") -> dict:
    """Set torch's intra-op threads as `choose_threads` says; returns the choice (for the run log)."""
    import torch  # here, not at the top: FAISS-only commands (index build) import this module and never need torch

    choice = choose_threads(num_workers, requested, requested_as=requested_as)
    torch.set_num_threads(choice["threads"])
    return choice
