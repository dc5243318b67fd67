"""What the benchmarks share: the bundled subset as shards, timing a loader after its first batch (wall time, and the
CPU time of the loader's processes), the decode bound's plain loop, and alternating rounds. Imported by the
`tools/bench_*.py` scripts (run as `python tools/X.py`, so this folder is on the path); importing it sets nothing.
"""
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bundled_shards(out_prefix, max_count: int, workers: int = 1) -> str:
    """The bundled CIFAR-10 training subset written as shards at `out_prefix`; returns the index path."""
    from ssl_vit.data.writer import write_shards

    write_shards(str(ROOT / "data" / "cifar10_subset" / "train.tar.gz"), str(out_prefix), max_count=max_count,
                 seed=0, workers=workers, progress=False)
    return f"{out_prefix}-index.json"


def timed(batches, samples: int, count=lambda batch: len(batch["key"])) -> float:
    """Images/s over `samples` images after the first batch (worker start-up and the first window are not
    throughput)."""
    return measured(batches, samples, count)[0]


def measured(batches, samples: int, count=lambda batch: len(batch["key"])) -> tuple[float, float]:
    """(images/s, CPU milliseconds per image) over `samples` images after the first batch. The CPU time is that of
    this process and its child processes (DataLoader workers) over the same span: what the images cost, whatever
    else runs on the machine. `count(batch)` is the batch's image count; it may also consume the batch."""
    t0 = cpu0 = None
    n, iterator = 0, iter(batches)  # held until the end: a loader's workers live as long as its iterator
    for batch in iterator:
        if t0 is None:
            t0, cpu0 = time.perf_counter(), cpu_seconds()
            continue
        n += count(batch)
        if n >= samples:
            break
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return n / wall, 1000 * cpu / n


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants so far (Linux /proc; 0 elsewhere): the
    loader's workers, a server and the embedding process it starts."""
    me, ticks, parents, cpu = os.getpid(), os.sysconf("SC_CLK_TCK"), {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except (OSError, IndexError):
            continue  # a process that ended meanwhile
        pid = int(stat.parent.name)
        parents[pid], cpu[pid] = int(fields[1]), int(fields[11]) + int(fields[12])  # ppid; utime + stime

    def descends(pid: int) -> bool:
        while pid not in (me, 0, 1) and pid in parents:
            pid = parents[pid]
        return pid == me

    return sum(ticks_used for pid, ticks_used in cpu.items() if descends(pid)) / ticks


def plain_loop(payload) -> tuple[int, float]:
    """(samples, seconds) of making the views of raw samples in one thread, stacked and normalised once per batch
    as the loader hands batches out: the loader's work without the loader. `payload` = (raw, specs, batch), one
    argument so that a process pool can map it."""
    import torch

    from ssl_vit.data.samples import open_image
    from ssl_vit.transforms import MultiViewTransform
    from ssl_vit.transforms.gpu_views import collate_views, views_to_device

    raw, specs, batch = payload
    torch.set_num_threads(1)
    transform, cpu = MultiViewTransform(specs), torch.device("cpu")
    t0 = time.perf_counter()
    for start in range(0, len(raw), batch):
        views_to_device(collate_views([transform(open_image(s)) for s in raw[start:start + batch]]), cpu)
    return len(raw), time.perf_counter() - t0


def alternate(rounds: int, *sides) -> list[list]:
    """Each side's results over `rounds` rounds, the sides run in turn within a round: a busy neighbour on a shared
    machine slows whichever runs at the time, and the best round of each side is compared."""
    runs = [[side() for side in sides] for _ in range(max(1, rounds))]
    return [list(results) for results in zip(*runs)]
