"""Read raw samples from one tar shard and decode them to RGB images.

A truncated or unreadable tar ends that shard with a warning; a corrupt image or a sample without an image is a
`BadSample` that the stream counts and skips.

Members are grouped into samples by webdataset's `group_by_keys`. The members themselves come from a fast path for
plain uncompressed ustar archives (what `ssl-vit shards write`, webdataset's TarWriter and `tar` with short names
produce): Python's `tarfile`, which webdataset's iterator uses, spends ~60 µs parsing each member header, and with
three members per sample that is a third of the time it takes to decode and crop a 32-px JPEG. Archives the fast path
does not cover (compression, pax or GNU extension headers) go to webdataset's `tar_file_iterator`; tests check that
both give the same samples. A damaged plain archive is reported with where it breaks — `tarfile` in stream mode ends
silently at a header with a bad checksum, which would lose the rest of a shard without a word.
"""
import io
import json
import logging
import re
import tarfile
import warnings

import numpy as np
from PIL import Image
from webdataset import gopen
from webdataset.tariterators import group_by_keys, meta_prefix, meta_suffix, tar_file_iterator

from ssl_vit.errors import SslVitError

log = logging.getLogger("ssl_vit.data")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")


class BadSample(Exception):
    """A sample that cannot be used (no image, undecodable image); the reader skips and counts it."""


def read_shard(url: str) -> list[dict]:
    """All samples of one shard as dicts of raw bytes plus `__key__` and `__url__`, in tar order.

    A damaged shard (truncated, corrupt header) keeps the samples before the damage, drops the one in progress there
    (it may be incomplete) and the rest, and says so in a warning naming the shard."""
    data = _read_bytes(url)
    try:
        members, damage = plain_ustar_members(data)
        files = (dict(fname=name, data=value, __url__=url) for name, value in members)
    except NotPlainUstar:
        files, damage = (dict(f, __url__=url) for f in tar_file_iterator(io.BytesIO(data))), None
    samples = []
    try:
        samples.extend(group_by_keys(files))
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        damage = str(e)
    else:
        if damage and samples:
            samples.pop()  # the sample in progress at the damage may be incomplete
    if damage:
        warnings.warn(f"shard {url} is truncated or corrupt after {len(samples)} samples ({damage}); "
                      "the rest of this shard is skipped", RuntimeWarning, stacklevel=2)
    return samples


def _read_bytes(url: str) -> bytes:
    try:
        stream = gopen(url, "rb")
    except FileNotFoundError:
        raise SslVitError(f"missing shard: {url}") from None
    except OSError as e:
        raise SslVitError(f"cannot open shard {url}: {e}") from None
    try:
        return stream.read()
    except OSError as e:
        raise SslVitError(f"cannot read shard {url}: {e}") from None
    finally:
        try:
            stream.close()
        except Exception as e:  # a failed `pipe:` command reports its exit status here
            raise SslVitError(f"reading shard {url} failed: {e}") from None


class NotPlainUstar(Exception):
    """The archive needs the general tar reader."""


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_GENERAL_READER_TYPES = frozenset(b"xgLKSV")  # pax, GNU long names, sparse, volume labels


def plain_ustar_members(data: bytes) -> tuple[list[tuple[str, bytes]], str | None]:
    """(name, bytes) of each regular file of an uncompressed ustar archive, skipping directories and the metadata
    files webdataset skips, and what is damaged where (None if nothing): members from a truncated body or a corrupt
    header on are dropped. Raises NotPlainUstar for anything else (compression, pax or GNU extension headers)."""
    end, pos = len(data), 0
    members, headers, stored_checksums, damage = [], [], [], None  # headers: (offset, members before it)
    if end == 0 or data[257:262] != b"ustar":
        raise NotPlainUstar
    while pos + _BLOCK <= end:
        header = data[pos:pos + _BLOCK]
        if header == _ZERO_BLOCK:
            break
        if header[156] in _GENERAL_READER_TYPES:
            raise NotPlainUstar
        try:
            if header[257:262] != b"ustar":
                raise ValueError
            checksum = int(header[148:156].rstrip(b"\0 ") or b"0", 8)
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            damage = f"unreadable tar header at byte {pos}"
            break
        headers.append((pos, len(members)))
        stored_checksums.append(checksum)
        body, pos = pos + _BLOCK, pos + _BLOCK + (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if pos > end:
            damage = f"truncated inside the member at byte {body - _BLOCK}"
            break
        if header[156:157] in (b"0", b"\0"):
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""  # GNU: no prefix
            name = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")
            if not _is_metadata(name):
                members.append((name, data[body:body + size]))
    else:
        if pos < end:
            damage = f"truncated inside the tar header at byte {pos}"
    if headers:
        bad = np.flatnonzero(_header_checksums(data, [h[0] for h in headers]) != np.asarray(stored_checksums))
        if len(bad):
            offset, before = headers[bad[0]]
            members, damage = members[:before], f"bad tar header checksum at byte {offset}"
    return members, damage


def _header_checksums(data: bytes, offsets: list[int]) -> np.ndarray:
    """The ustar checksum of each header (the byte sum with the checksum field read as spaces), all at once: summing
    512 bytes in Python costs more than parsing the rest of the header."""
    headers = np.frombuffer(data, np.uint8)[np.asarray(offsets)[:, None] + np.arange(_BLOCK)].astype(np.int64)
    return headers.sum(1) - headers[:, 148:156].sum(1) + 8 * ord(" ")


_METADATA = re.compile(r"__[^/]*__($|/)")  # tar_file_iterator's default `skip_meta`


def _is_metadata(name: str) -> bool:
    """The files webdataset's tar iterator skips."""
    return bool(("/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix))
                or _METADATA.match(name))


def decode_image(sample: dict) -> Image.Image:
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise BadSample(f"no image in sample {sample.get('__key__')} of {sample.get('__url__')} "
                        f"(keys: {sorted(k for k in sample if not k.startswith('__'))})")
    try:
        with Image.open(io.BytesIO(sample[key])) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadSample(f"corrupt image in sample {sample['__key__']} of {sample['__url__']}: {e}") from None


def decode_label(sample: dict) -> int:
    """`cls` as an integer, -1 where the sample has no label."""
    if "cls" in sample:
        try:
            return int(sample["cls"].decode().strip())
        except (ValueError, UnicodeDecodeError):
            raise BadSample(f"bad label {sample['cls'][:20]!r} in sample {sample['__key__']} of "
                            f"{sample['__url__']}") from None
    if "json" in sample:
        label = json.loads(sample["json"]).get("label_index")
        if label is not None:
            return int(label)
    return -1
