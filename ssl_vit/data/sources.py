"""Turn a user's shard source into a list of shard URLs (with sample counts where an index knows them).

Accepted: an `index.json` written by `ssl-vit shards write` (a file ending in `.json`), a brace pattern
(`shards/train-{000000..000009}.tar`), a glob (`shards/train-*.tar`), a `pipe:` command (`pipe:aws s3 cp
s3://bucket/train-{000000..000099}.tar -`, brace-expanded into one command per shard), a local path, or a list of
any of these (a YAML list, or a comma-free Python list).
"""
import glob
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from ssl_vit.errors import SslVitError


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: int | None = None  # known when the source is an index.json


@dataclass
class ShardList:
    shards: list[Shard]
    classes: list[str] | None = None

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.shards]

    @property
    def num_samples(self) -> int | None:
        counts = [s.num_samples for s in self.shards]
        return None if any(c is None for c in counts) else sum(counts)


def _from_index(path: str) -> ShardList:
    from ssl_vit.data.index import read_index

    index = read_index(path)
    folder = Path(path).parent
    shards = []
    for entry in index["shards"]:
        url = entry["name"] if "://" in entry["name"] else str(folder / entry["name"])
        if not Path(url).exists():
            raise SslVitError(f"missing shard: {url} (listed in {path})")
        shards.append(Shard(url, int(entry["samples"])))
    return ShardList(shards, index.get("classes"))


def _expand_one(source: str) -> ShardList:
    source = source.strip()
    if not source:
        raise SslVitError("empty shard source")
    if source.startswith("pipe:"):
        return ShardList([Shard(url) for url in braceexpand.braceexpand(source)])
    if "://" in source:  # http(s), s3, gs: webdataset's gopen handles these URLs
        return ShardList([Shard(url) for url in braceexpand.braceexpand(source)])
    if source.endswith(".json"):
        if not Path(source).is_file():
            raise SslVitError(f"missing shard index: {source}")
        return _from_index(source)
    shards, missing = [], []
    for pattern in braceexpand.braceexpand(source):
        if any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise SslVitError(f"shard pattern matches nothing: {pattern}")
            shards += [Shard(m) for m in matches]
        elif not Path(pattern).is_file():
            missing.append(pattern)
        else:
            shards.append(Shard(pattern))
    if missing:
        more = f" (and {len(missing) - 1} more of {len(missing) + len(shards)})" if len(missing) > 1 else ""
        raise SslVitError(f"missing shard: {missing[0]}{more}")
    return ShardList(shards)


def expand_source(source) -> ShardList:
    """Expand a source (or a list of sources) into shards; raises a one-line SslVitError naming what is missing."""
    if isinstance(source, (list, tuple)):
        parts = [_expand_one(str(s)) for s in source]
    elif isinstance(source, (str, Path)):
        parts = [_expand_one(str(source))]
    else:
        raise SslVitError(f"shard source must be a string or a list, got {type(source).__name__}")
    shards = [s for part in parts for s in part.shards]
    if not shards:
        raise SslVitError(f"empty shard list: {source!r}")
    classes = next((p.classes for p in parts if p.classes), None)
    return ShardList(shards, classes)
