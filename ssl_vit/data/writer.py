"""Write WebDataset tar shards from images: a deterministic plan, shards written in parallel, then the index.

1. List the source images (`image_sources`), shuffle them with the seed and cut the permutation into shards of at
   most `max_count` samples and about `max_size` bytes, balanced to equal counts. This plan depends only on
   (sources, seed, limits) and is stored as `OUT-plan.json` before any shard is written.
2. Worker processes write whole shards: `OUT-000003.tar.tmp`, fsync, rename to `OUT-000003.tar`. A shard under its
   final name is therefore complete, and a re-run keeps it (resume); a different plan is an error unless
   `overwrite`. Keys are `s%09d` by position in the shuffled order (no dots: webdataset splits at the first dot).
3. `OUT-index.json` lists each shard's sample count, size and sha256 (see `ssl_vit.data.index`).

Labelled samples hold `<key>.<ext>`, `<key>.cls` (class index) and `<key>.json` ({"path", "size", "mode", "label"});
unlabeled ones (a source without labels) have no `cls` and no "label" in their json.
"""
import hashlib
import json
import multiprocessing
import os
import queue
import re
import warnings
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import numpy as np
from tqdm import tqdm
from webdataset import TarWriter

from ssl_vit.atomic_io import atomic_write, write_json_atomic
from ssl_vit.data.image_sources import SourceSet, encode_for_shard, open_source, read_image_bytes
from ssl_vit.data.index import INDEX_FORMAT, index_path_for, plan_path_for, read_json, shard_path_for, write_index
from ssl_vit.data.inspect import iter_tar_samples
from ssl_vit.data.samples import BadSample, decode_label
from ssl_vit.data.tar_reader import Checksum
from ssl_vit.errors import SslVitError

PLAN_FORMAT = "ssl_vit.shards-plan/1"
DEFAULT_MAX_SIZE = "256MB"
TAR_BLOCK = 512
SHARD_OVERHEAD = 20 * TAR_BLOCK  # end-of-archive blocks, padded to one tar record
MAX_WARNINGS = 100
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass
class ShardTask:
    path: str
    first_key: int
    items: list[tuple[str, int, tuple]]  # (ref, label, location) in key order; label -1: unlabeled
    classes: list[str]  # [] for an unlabeled set


def write_shards(src, out_prefix, *, max_count=None, max_size=None, seed=0, workers=2, progress=True,
                 overwrite=False, unlabeled=False) -> dict:
    """Write `OUT-000000.tar`, ... plus `OUT-plan.json` and `OUT-index.json`; returns the index dict. `unlabeled`:
    read every image of a folder (or list) without labels (see `image_sources` for the folder rule)."""
    out_prefix = _check_prefix(out_prefix)
    max_size = parse_size(DEFAULT_MAX_SIZE if max_size is None else max_size)
    max_count = None if max_count is None else _check_int("max count", max_count, 1)
    seed, workers = _check_int("seed", seed, 0), _check_int("workers", workers, 0)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    with open_source(src, Path(f"{out_prefix}-source.tar.tmp"), unlabeled) as source:
        if not source.images:
            raise SslVitError(f"no readable images in {src}: all {len(source.skipped)} listed files are unreadable")
        plan, order = make_plan(source, seed, max_count, max_size)
        plan["source"] = str(src)
        _adopt_plan(out_prefix, plan, overwrite)
        tasks = _tasks(out_prefix, plan, order, source)
        with tqdm(total=len(order), unit="img", desc=f"shards {out_prefix.name}", disable=not progress) as bar:
            results = run_tasks(tasks, workers, bar)
    return _finish(src, out_prefix, plan, source, results)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise SslVitError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def parse_size(value) -> int:
    """Bytes from an int or a string like `256MB` (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).upper() not in _SIZE_UNITS:
            raise SslVitError(f"max size {value!r}: expected a size like 256MB (units B, KB, MB, GB, KiB, MiB, GiB)")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        raise SslVitError(f"max size {value!r} must be positive")
    return size


def make_plan(source: SourceSet, seed: int, max_count: int | None, max_size: int) -> tuple[dict, list[int]]:
    """The plan (which images go to which shard, under which keys) and the permutation it cuts."""
    order = np.random.default_rng(seed).permutation(len(source.images)).tolist()
    sizes = [_estimated_bytes(source.images[i]) for i in order]
    bounds = cut_points(sizes, max_count, max_size)
    shards = []
    for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
        images = [source.images[j] for j in order[start:end]]
        shards.append({"index": i, "first_key": start, "count": end - start,
                       "samples": [[img.ref, img.label] for img in images]})
    plan = {"format": PLAN_FORMAT, "seed": seed, "max_count": max_count, "max_size": max_size,
            "classes": source.classes, "num_samples": len(order), "shards": shards}
    return plan, order


def cut_points(sizes: list[int], max_count: int | None, max_size: int) -> list[int]:
    """Boundaries of equal-count chunks (counts differ by at most one) with at most max_count items and at most
    max_size estimated bytes each; the chunk count starts at the lower bound and grows until every chunk fits
    (a single item larger than max_size gets a chunk of its own). Sizes are estimated from the source bytes, so a
    shard of re-encoded images can end up somewhat larger or smaller."""
    n = len(sizes)
    cum = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))])
    budget = max(max_size - SHARD_OVERHEAD, 1)
    k = max(1, -(-n // max_count) if max_count else 1, int(-(-int(cum[-1]) // budget)))
    k = min(k, n)
    while True:
        bounds = (np.arange(k + 1, dtype=np.int64) * n) // k
        worst = int((cum[bounds[1:]] - cum[bounds[:-1]]).max())
        if worst <= budget or k == n:
            return bounds.tolist()
        k = min(n, max(k + 1, int(k * worst / budget)))


def _tasks(out_prefix: Path, plan: dict, order: list[int], source: SourceSet) -> list[ShardTask]:
    tasks = []
    for entry in plan["shards"]:
        start = entry["first_key"]
        images = [source.images[i] for i in order[start:start + entry["count"]]]
        tasks.append(ShardTask(str(shard_path_for(out_prefix, entry["index"])), start,
                               [(img.ref, img.label, img.location) for img in images], source.classes))
    return tasks


def _estimated_bytes(img) -> int:
    """Tar bytes of one sample: a header block per member, data padded to blocks (json ~ path + 80 bytes)."""
    def padded(n):
        return -(-n // TAR_BLOCK) * TAR_BLOCK
    return 3 * TAR_BLOCK + padded(img.size) + padded(2) + padded(len(img.ref) + 80)


def _check_prefix(out_prefix) -> Path:
    text = str(out_prefix)
    prefix = Path(text)
    if not text or text.endswith(("/", os.sep)) or prefix.is_dir():
        raise SslVitError(f"output prefix {text!r} is a folder: give a name prefix inside it, e.g. {prefix / 'train'}")
    return prefix


def _adopt_plan(out_prefix: Path, plan: dict, overwrite: bool) -> None:
    """Store the plan, or check it against the stored one (resume); stale `.tmp` shards are removed."""
    plan_path = plan_path_for(out_prefix)
    ours = re.compile(re.escape(out_prefix.name) + r"-[0-9]{6}\.tar(\.tmp)?")
    outputs = sorted(p for p in out_prefix.parent.iterdir() if ours.fullmatch(p.name))
    if overwrite:
        for path in outputs + [index_path_for(out_prefix)]:
            path.unlink(missing_ok=True)
    elif plan_path.exists():
        difference = _plan_difference(read_json(plan_path, "shard plan"), plan)
        if difference:
            raise SslVitError(f"{plan_path} holds another plan ({difference}); pass --overwrite to rewrite all "
                              "shards of this prefix")
    elif any(p.suffix == ".tar" for p in outputs):
        raise SslVitError(f"{outputs[0]} exists but {plan_path} does not, so it was not written by this plan; "
                          "pass --overwrite to replace it")
    for path in outputs:
        if path.suffix == ".tmp":
            path.unlink(missing_ok=True)  # left by an interrupted run; its shard is rewritten
    write_json_atomic(plan_path, plan)


def _plan_difference(stored: dict, plan: dict) -> str:
    for key in ("format", "seed", "max_count", "max_size", "classes", "num_samples"):
        if stored.get(key) != plan[key]:
            return f"{key} {stored.get(key)!r}, now {plan[key]!r}"
    if stored.get("shards") != plan["shards"]:
        return "the source images or their order differ"
    return ""


def run_tasks(tasks: list[ShardTask], workers: int, bar: tqdm) -> list[dict]:
    """Run shard tasks in order (workers <= 1) or in a process pool; the bar counts samples as they are written."""
    if workers <= 1 or len(tasks) == 1:
        return [run_task(task, bar.update) for task in tasks]
    ctx = mp_context(__name__)
    progress = ctx.Queue()
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(progress,)) as pool:
        pending = pool.map_async(_pool_task, tasks, chunksize=1)
        while not pending.ready():
            _drain(progress, bar, timeout=0.2)
        results = pending.get()
        pool.close()
        pool.join()  # workers exit normally, so their last progress messages are flushed to the queue
    _drain(progress, bar, timeout=0)
    return results


def mp_context(preload: str):
    """forkserver where available: workers fork from a clean single-threaded server that has imported the module
    `preload` once (spawn would re-import torch via webdataset in every worker; fork copies the caller's threads'
    locks)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([preload])
        return ctx
    return multiprocessing.get_context("spawn")


def _drain(progress, bar: tqdm, timeout: float) -> None:
    try:
        bar.update(progress.get(timeout=timeout) if timeout else progress.get_nowait())
        while True:
            bar.update(progress.get_nowait())
    except queue.Empty:
        pass


_worker_progress = None


def _init_worker(progress) -> None:
    global _worker_progress
    _worker_progress = progress


def _pool_task(task: ShardTask) -> dict:
    return run_task(task, _worker_progress.put)


def run_task(task: ShardTask, report) -> dict:
    """Write one shard, or summarize it when it already exists under its final name (resume)."""
    if Path(task.path).exists():
        result = _summarize_existing(task)
        report(len(task.items))
        return result
    return _write_shard(task, report)


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through (no second read of the shard)."""

    def __init__(self, raw):
        self.raw, self.digest, self.count = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.count += len(data)
        return self.raw.write(data)


def _write_shard(task: ShardTask, report) -> dict:
    final = Path(task.path)
    counts, skipped, reported, written = [0] * len(task.classes), [], 0, 0
    try:
        with atomic_write(final) as raw:
            out = _HashingWriter(raw)
            # Fixed mtime/owner: the same plan gives byte-identical shards.
            with TarWriter(out, encoder=False, mtime=0, user="ssl_vit", group="ssl_vit") as tar:
                for j, (ref, label, location) in enumerate(task.items):
                    sample = _sample(task.first_key + j, ref, label, location, task.classes, skipped)
                    if sample is not None:
                        tar.write(sample)
                        written += 1
                        if label >= 0:
                            counts[label] += 1
                    if j + 1 - reported >= 32:
                        report(j + 1 - reported)
                        reported = j + 1
    except OSError as e:
        raise SslVitError(f"cannot write shard {final}: {e}") from None
    report(len(task.items) - reported)
    return {"name": final.name, "samples": written, "bytes": out.count, "sha256": out.digest.hexdigest(),
            "class_counts": counts, "skipped": skipped}


def _sample(key: int, ref: str, label: int, location: tuple, classes: list[str], skipped: list) -> dict | None:
    try:
        ext, data, meta = encode_for_shard(read_image_bytes(location))
    except Exception as e:  # PIL and file reads raise many types; any of them means "unusable image"
        skipped.append((ref, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        return None
    meta = {"path": ref, "size": meta["size"], "mode": meta["mode"]}
    sample = {"__key__": f"s{key:09d}", ext: data}
    if label >= 0:
        meta["label"] = classes[label]
        sample["cls"] = str(label).encode("ascii")
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return sample


def _summarize_existing(task: ShardTask) -> dict:
    """Counts of a shard kept from an earlier run, read from the tar itself."""
    path = Path(task.path)
    counts, keys, checksum = [0] * len(task.classes), set(), Checksum()
    try:
        for key, sample in iter_tar_samples(path, checksum):
            keys.add(key)
            label = decode_label(sample)
            if (label >= 0) != bool(task.classes):
                raise ValueError(f"{key} has {'a' if label >= 0 else 'no'} label, this plan has "
                                 f"{'none' if label >= 0 else 'classes'}")
            if label >= 0:
                counts[label] += 1
    except (SslVitError, BadSample, ValueError, IndexError) as e:
        raise SslVitError(f"existing shard {path} does not hold this plan's samples ({e}); delete it to rewrite "
                          "it, or pass --overwrite") from None
    planned = {f"s{task.first_key + j:09d}": ref for j, (ref, _, _) in enumerate(task.items)}
    if not keys <= planned.keys():
        raise SslVitError(f"existing shard {path} holds keys outside this plan (e.g. {min(keys - planned.keys())}); "
                          "delete it to rewrite it, or pass --overwrite")
    skipped = [(ref, "unreadable when this shard was written") for key, ref in planned.items() if key not in keys]
    return {"name": path.name, "samples": len(keys), "bytes": checksum.size, "sha256": checksum.hexdigest(),
            "class_counts": counts, "skipped": skipped}


def _finish(src, out_prefix: Path, plan: dict, source: SourceSet, results: list[dict]) -> dict:
    skipped = source.skipped + [s for r in results for s in r["skipped"]]
    for ref, reason in skipped[:MAX_WARNINGS]:
        warnings.warn(f"skipped {ref}: {reason}", RuntimeWarning, stacklevel=3)
    if len(skipped) > MAX_WARNINGS:
        warnings.warn(f"skipped {len(skipped) - MAX_WARNINGS} more unreadable images", RuntimeWarning, stacklevel=3)
    total = sum(r["samples"] for r in results)
    if total == 0:
        raise SslVitError(f"no readable images in {src}: all {len(skipped)} were skipped")
    class_counts = np.sum([r["class_counts"] for r in results], axis=0, dtype=np.int64).tolist()
    index = {"format": INDEX_FORMAT,
             "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in results],
             "num_samples": total, "labeled": bool(plan["classes"]), "classes": plan["classes"],
             "class_counts": class_counts,
             "seed": plan["seed"], "source": str(src), "skipped": len(skipped)}
    write_index(index_path_for(out_prefix), index)
    return index
