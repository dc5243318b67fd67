"""`ssl-vit shards inspect`: what a set of shards holds (classes, formats, sizes), read from the tars themselves.

`verify` recomputes each shard's sha256 and sample count and compares them with the index; the grid shows the
first N samples with their class names (an unlabeled set: with their keys).
"""
import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ssl_vit.data.index import index_is_labeled, index_path_for, read_index, sha256_file
from ssl_vit.data.samples import BadSample, decode_label, image_key
from ssl_vit.data.sources import is_remote
from ssl_vit.data.tar_reader import Checksum, iter_samples
from ssl_vit.errors import SslVitError
from ssl_vit.figure_io import save_png

TOP_SIZES = 10


@dataclass
class ShardScan:
    """What one tar holds, counted sample by sample (a sample = the members sharing a key)."""

    samples: int = 0
    labels: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)
    firsts: list = field(default_factory=list)  # (image bytes, label, key) of the first samples, for the grid


def resolve_index(source) -> Path:
    """An index.json path, or the index of an OUT prefix (`OUT-index.json`)."""
    path = Path(source)
    if path.suffix == ".json":
        return path
    candidate = index_path_for(source)
    if candidate.is_file():
        return candidate
    raise SslVitError(f"no shard index for {source}: give an index.json or an OUT prefix whose "
                      f"{candidate.name} exists")


def inspect_shards(index_path, *, verify=False, grid_png=None, grid_n=64) -> dict:
    """Counts read from the shards (and, with `verify`, the problems found); writes the grid PNG if asked."""
    if grid_png is not None and (isinstance(grid_n, bool) or not isinstance(grid_n, int) or grid_n < 1):
        raise SslVitError(f"grid size must be a positive integer, got {grid_n!r}")
    path = resolve_index(index_path)
    index = read_index(path)
    want = grid_n if grid_png is not None else 0
    total, problems = ShardScan(), []
    for entry in index["shards"]:
        if is_remote(entry["name"]):
            raise SslVitError(f"shard {entry['name']} (listed in {path}) is not a local file: inspect reads local "
                              "shards only")
        shard = path.parent / entry["name"]
        if verify:
            problems += _verify_shard(shard, entry, total, want)
        else:
            if not shard.is_file():
                raise SslVitError(f"missing shard: {shard} (listed in {path})")
            _merge(total, _scan(shard, want - len(total.firsts)))
    report = _report(path, index, total)
    if verify:
        report["verify"] = {"ok": not problems, "problems": problems}
    if grid_png is not None:
        write_grid(total.firsts, index["classes"], grid_png)
        report["grid"] = {"path": str(grid_png), "samples": len(total.firsts)}
    return report


def _verify_shard(shard: Path, entry: dict, total: ShardScan, want: int) -> list[str]:
    if not shard.is_file():
        return [f"{entry['name']}: missing ({shard})"]
    checksum = Checksum()  # the scan's one read also gives the sha256
    try:
        scan, damage = _scan(shard, want - len(total.firsts), checksum), None
        digest = checksum.hexdigest()
    except SslVitError as e:  # the read stopped at the damage: the digest needs the whole file
        scan, damage, digest = None, f"{entry['name']}: {e}", sha256_file(shard)
    problems = []
    if digest != entry["sha256"]:
        problems.append(f"{entry['name']}: sha256 {digest[:16]}... differs from the index's {entry['sha256'][:16]}...")
    if scan is None:
        return problems + [damage]
    if scan.samples != entry["samples"]:
        problems.append(f"{entry['name']}: {scan.samples} samples in the tar, {entry['samples']} in the index")
    _merge(total, scan)
    return problems


def iter_tar_samples(path, checksum: Checksum | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, sample) in tar order, read by the loader's tar reader (every byte through `checksum`, if given); a
    damaged shard is an SslVitError rather than a silently shorter one."""
    for sample in iter_samples(str(path), checksum=checksum, strict=True):
        yield sample["__key__"], sample


def _scan(shard: Path, keep_first: int, checksum: Checksum | None = None) -> ShardScan:
    scan = ShardScan()
    for key, sample in iter_tar_samples(shard, checksum):
        _count(scan, key, sample, keep_first)
    return scan


def _count(scan: ShardScan, key: str, sample: dict, keep_first: int) -> None:
    """Add one sample (extension -> bytes) to the scan; one without an image is a format, not a sample: the loader
    skips it, and indexes do not count it."""
    ext = image_key(sample)
    if ext is None:
        scan.formats["(no image)"] += 1
        return
    scan.samples += 1
    try:
        label = decode_label(sample)
    except (BadSample, ValueError):  # a `cls` that is no integer, a json that is no JSON: the loader cannot use it
        label = -1
    scan.labels[label] += 1
    scan.formats[ext] += 1
    scan.sizes[_size(sample, ext)] += 1
    if len(scan.firsts) < keep_first:
        scan.firsts.append((sample[ext], label, key))


def _size(sample: dict, ext: str) -> tuple[int, int] | None:
    try:
        w, h = json.loads(sample["json"])["size"]
        return int(w), int(h)
    except (KeyError, ValueError, TypeError):
        pass
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:  # reads the header only
            return img.size
    except Exception:  # an undecodable image has no size; PIL raises many types
        return None


def _merge(total: ShardScan, scan: ShardScan) -> None:
    total.samples += scan.samples
    total.labels.update(scan.labels)
    total.formats.update(scan.formats)
    total.sizes.update(scan.sizes)
    total.firsts += scan.firsts


def _report(path: Path, index: dict, scan: ShardScan) -> dict:
    classes = index["classes"]
    histogram = [{"label": i, "name": name, "count": scan.labels.get(i, 0)} for i, name in enumerate(classes)]
    if scan.labels.get(-1):
        histogram.append({"label": -1, "name": "(no label)", "count": scan.labels[-1]})
    known = [s for s in scan.sizes.elements() if s is not None]
    widths, heights = np.array([s[0] for s in known] or [0]), np.array([s[1] for s in known] or [0])
    common = [[f"{s[0]}x{s[1]}" if s else "undecodable", n] for s, n in scan.sizes.most_common(TOP_SIZES)]
    return {
        "index": str(path),
        "labeled": index_is_labeled(index),
        "shards": len(index["shards"]),
        "num_samples": scan.samples,
        "index_num_samples": index["num_samples"],
        "bytes": sum(int(e["bytes"]) for e in index["shards"]),
        "skipped_at_write": index.get("skipped", 0),
        "classes": histogram,
        "formats": dict(scan.formats.most_common()),
        "sizes": {"most_common": common, "distinct": len(scan.sizes),
                  "width": {"min": int(widths.min()), "max": int(widths.max()), "mean": float(widths.mean())},
                  "height": {"min": int(heights.min()), "max": int(heights.max()), "mean": float(heights.mean())}},
    }


def write_grid(samples: list[tuple[bytes, int, str]], classes: list[str], png) -> None:
    """A PNG grid of (image, label, key) titled with class names, or with keys when the set has no classes
    (matplotlib's Agg canvas; no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not samples:
        raise SslVitError("no images to draw in the grid")
    cols = math.ceil(math.sqrt(len(samples)))
    rows = math.ceil(len(samples) / cols)
    fig = Figure(figsize=(cols * 1.2, rows * 1.35), dpi=100)
    FigureCanvasAgg(fig)
    for i, (data, label, key) in enumerate(samples):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        name = key if not classes else classes[label] if 0 <= label < len(classes) else "(no label)"
        try:
            with Image.open(io.BytesIO(data)) as img:
                ax.imshow(np.asarray(img.convert("RGB")))
        except Exception:  # a corrupt sample is drawn as an empty cell, named so
            name = f"{name} (undecodable)"
        ax.set_title(name, fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95, wspace=0.1, hspace=0.35)
    save_png(fig, png)


def format_report(report: dict) -> str:
    """The report as text lines for the terminal."""
    lines = [f"index: {report['index']}",
             f"shards: {report['shards']}  samples: {report['num_samples']}  "
             f"bytes: {report['bytes'] / 1e6:.2f} MB  skipped at write: {report['skipped_at_write']}"]
    if report["labeled"]:
        lines.append(f"classes ({len(report['classes'])}):")
        width = max((len(c["name"]) for c in report["classes"]), default=4)
        lines += [f"  {c['label']:>4}  {c['name']:<{width}}  {c['count']}" for c in report["classes"]]
    else:
        lines.append("labels: none (unlabeled set)")
    lines.append("formats: " + ", ".join(f"{k} {v}" for k, v in report["formats"].items()))
    sizes = report["sizes"]
    lines.append(f"sizes: {sizes['distinct']} distinct (w {sizes['width']['min']}..{sizes['width']['max']}, "
                 f"h {sizes['height']['min']}..{sizes['height']['max']}); most common: "
                 + ", ".join(f"{s} {n}" for s, n in sizes["most_common"]))
    if "verify" in report:
        v = report["verify"]
        lines.append("verify: OK (sha256 and sample counts match the index)" if v["ok"]
                     else f"verify: FAILED ({len(v['problems'])} problems)")
        lines += [f"  {p}" for p in v["problems"]]
    if "grid" in report:
        lines.append(f"grid: {report['grid']['path']} ({report['grid']['samples']} samples)")
    return "\n".join(lines)
