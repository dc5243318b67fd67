"""Turn a user's shard source into a list of shard URLs (with sample counts where an index knows them).

Accepted: an `index.json` written by `ssl-vit shards write` (a file ending in `.json`), a brace pattern
(`shards/train-{000000..000009}.tar`), a glob (`shards/train-*.tar`), a `pipe:` command (`pipe:aws s3 cp
s3://bucket/train-{000000..000099}.tar -`, brace-expanded into one command per shard), a local path, or a list of
any of these (a YAML list, or a comma-free Python list).
"""
import glob
from dataclasses import dataclass, field
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
    unlabeled_sources: list[str] = field(default_factory=list)  # indexes that say their samples carry no labels

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.shards]

    @property
    def counts(self) -> list[int] | None:
        """Samples per shard, or None unless every shard's count is known."""
        counts = [s.num_samples for s in self.shards]
        return None if any(c is None for c in counts) else counts

    @property
    def num_samples(self) -> int | None:
        return None if self.counts is None else sum(self.counts)


def _from_index(path: str) -> ShardList:
    from ssl_vit.data.index import index_is_labeled, read_index

    index = read_index(path)
    folder = Path(path).parent
    shards = []
    for entry in index["shards"]:
        url = entry["name"]
        if not is_remote(url):
            url = str(folder / url)  # relative names are relative to the index; absolute ones stay
            if not Path(url).exists():
                raise SslVitError(f"missing shard: {url} (listed in {path})")
        # A shard from another tool may hold samples without an image (`shards index` counts them as skipped): the
        # reader addresses a shard's samples by position among all of them, and the loader skips those.
        shards.append(Shard(url, int(entry["samples"]) + int(entry.get("skipped", 0))))
    return ShardList(shards, index.get("classes"), unlabeled_sources=[] if index_is_labeled(index) else [path])


def is_remote(url: str) -> bool:
    """A `pipe:` command or a URL (http, s3, gs, ...), which webdataset's gopen opens."""
    return url.startswith("pipe:") or "://" in url


def _expand_one(source: str) -> ShardList:
    source = source.strip()
    if not source:
        raise SslVitError("empty shard source")
    if is_remote(source):
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
    return ShardList(shards, classes, [u for p in parts for u in p.unlabeled_sources])
