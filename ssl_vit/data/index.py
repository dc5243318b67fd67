"""The shard index (`OUT-index.json`) and the write plan (`OUT-plan.json`): names, atomic writes, validation.

Index format `ssl_vit.shards/1`:
`{"format", "shards": [{"name", "samples", "bytes", "sha256"}], "num_samples", "labeled", "classes", "class_counts",
"seed", "source", "skipped"}`; shard names are relative to the index file's folder (or absolute paths and URLs, for
shards indexed by `ssl-vit shards index`). An unlabeled set has `"labeled": false`, `classes: []` and
`class_counts: []`; indexes written before the key existed are labelled exactly when they list classes.
"""
import hashlib
import json
from pathlib import Path

from ssl_vit.atomic_io import write_json_atomic
from ssl_vit.errors import SslVitError

INDEX_FORMAT = "ssl_vit.shards/1"
INDEX_KEYS = ("format", "shards", "num_samples", "classes", "class_counts")
SHARD_KEYS = ("name", "samples", "bytes", "sha256")


def index_path_for(out_prefix) -> Path:
    return Path(f"{out_prefix}-index.json")


def plan_path_for(out_prefix) -> Path:
    return Path(f"{out_prefix}-plan.json")


def shard_path_for(out_prefix, i: int) -> Path:
    return Path(f"{out_prefix}-{i:06d}.tar")


def sha256_file(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_index(path, index: dict) -> None:
    write_json_atomic(path, index)


def read_json(path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SslVitError(f"missing {what}: {path}")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SslVitError(f"corrupt {what} {path}: {e}") from None
    if not isinstance(obj, dict):
        raise SslVitError(f"corrupt {what} {path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def index_is_labeled(index: dict) -> bool:
    """Whether every sample of the indexed shards has a label."""
    return bool(index.get("labeled", bool(index["classes"])))


def read_index(path) -> dict:
    """Read and validate an index written by `ssl-vit shards write`; every problem is a one-line SslVitError."""
    index = read_json(path, "shard index")
    missing = [k for k in INDEX_KEYS if k not in index]
    if missing:
        raise SslVitError(f"shard index {path} lacks key(s) {', '.join(missing)}")
    if index["format"] != INDEX_FORMAT:
        raise SslVitError(f"shard index {path}: format {index['format']!r} is not {INDEX_FORMAT!r}")
    if not isinstance(index["shards"], list) or not index["shards"]:
        raise SslVitError(f"shard index {path}: 'shards' must be a non-empty list")
    for i, entry in enumerate(index["shards"]):
        lacking = [k for k in SHARD_KEYS if not isinstance(entry, dict) or k not in entry]
        if lacking:
            raise SslVitError(f"shard index {path}: shards[{i}] lacks key(s) {', '.join(lacking)}")
        if not isinstance(entry["samples"], int) or entry["samples"] < 0:
            raise SslVitError(f"shard index {path}: shards[{i}].samples must be a count, got {entry['samples']!r}")
    total = sum(entry["samples"] for entry in index["shards"])
    if index["num_samples"] != total:
        raise SslVitError(f"shard index {path}: num_samples {index['num_samples']} != {total}, the sum over shards")
    if len(index["class_counts"]) != len(index["classes"]):
        raise SslVitError(f"shard index {path}: {len(index['class_counts'])} class_counts for "
                          f"{len(index['classes'])} classes")
    labeled = index.get("labeled", bool(index["classes"]))
    if not isinstance(labeled, bool) or labeled != bool(index["classes"]):
        raise SslVitError(f"shard index {path}: 'labeled' must be true with classes and false without, got "
                          f"{labeled!r} with {len(index['classes'])} classes")
    return index
