"""Random access to shard images by key: a key → (shard, offset, size) table, built once from the tar headers, so
that one image is one ranged read of its member (a seek in a local file, an HTTP Range request for a URL), never a
scan of a shard.

Only plain (uncompressed) tar shards at local paths or http(s) URLs have ranges; `pipe:` commands and gzip shards
do not, and a table over them is refused in one line naming the shard.
"""
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_vit.data.samples import IMAGE_KEYS
from ssl_vit.data.tar_reader import member_ranges
from ssl_vit.errors import SslVitError

HTTP_TIMEOUT_S = 10


def rangeable(url: str) -> bool:
    return url.startswith(("http://", "https://")) or ("://" not in url and not url.startswith("pipe:"))


@dataclass
class ImageTable:
    """keys [n] sorted UTF-8 bytes; ranges [n, 3] int64 (shard number, offset, size) of each key's image member;
    shards: the URLs, the only ones ever read."""
    keys: np.ndarray
    ranges: np.ndarray
    shards: list

    @classmethod
    def build(cls, shards: list) -> "ImageTable":
        """Read every shard's tar headers once (bodies seeked over); the first image member of each key counts."""
        for url in shards:
            if not rangeable(url):
                raise SslVitError(f"shard {url} is a command, not a file or URL: its images cannot be read by range")
        keys, ranges = [], []
        for number, url in enumerate(shards):
            last = None
            for key, suffix, offset, size in member_ranges(url):
                if key != last and suffix.rsplit(".", 1)[-1] in IMAGE_KEYS:
                    keys.append(key.encode("utf-8"))
                    ranges.append((number, offset, size))
                    last = key
        keys = np.array(keys, dtype=bytes) if keys else np.zeros(0, "S1")
        order = np.argsort(keys, kind="stable")
        return cls(keys[order], np.asarray(ranges, np.int64).reshape(-1, 3)[order], list(shards))

    def arrays(self) -> dict:
        """What an index folder stores of the table (`RetrievalIndex.save(..., arrays=)`); the shards are the
        index's own recorded ones."""
        return {"image_keys": self.keys, "image_ranges": self.ranges}

    @classmethod
    def load(cls, folder: Path, shards: list) -> "ImageTable":
        """The table saved with an index (memory-mapped); SslVitError when there is none."""
        folder = Path(folder)
        if not (folder / "image_keys.npy").is_file():
            raise SslVitError(f"index {folder} has no image table (its shards have no byte ranges)")
        return cls(np.load(folder / "image_keys.npy", mmap_mode="r"),
                   np.load(folder / "image_ranges.npy", mmap_mode="r"), list(shards))

    def locate(self, key: str):
        """(shard URL, offset, size) of the key's image, or None when the table does not hold the key."""
        wanted = np.array([key.encode("utf-8")], dtype=bytes)
        at = int(np.searchsorted(self.keys, wanted)[0])
        if at >= len(self.keys) or self.keys[at] != wanted[0]:
            return None
        number, offset, size = (int(v) for v in self.ranges[at])
        return self.shards[number], offset, size

    def read(self, key: str) -> bytes | None:
        """The key's image member bytes in one ranged read, or None for an unknown key."""
        found = self.locate(key)
        return None if found is None else read_range(*found)


def read_range(url: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of a local file or an http(s) URL (one Range request)."""
    try:
        if url.startswith(("http://", "https://")):
            request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-{offset + size - 1}"})
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
                if response.status != 206:
                    raise SslVitError(f"shard {url} ignored a Range request (status {response.status})")
                data = response.read(size)
        else:
            with open(url, "rb") as f:
                f.seek(offset)
                data = f.read(size)
    except (OSError, urllib.error.URLError) as e:
        raise SslVitError(f"cannot read {size} bytes at {offset} of shard {url}: {e}") from None
    if len(data) != size:
        raise SslVitError(f"shard {url} is shorter than the image table says (changed since the index was built?)")
    return data
