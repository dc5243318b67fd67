"""Read raw samples from one tar shard and decode them to RGB images.

A truncated or unreadable tar ends that shard with a warning; a corrupt image or a sample without an image is a
`BadSample` that the stream counts and skips.

Plain uncompressed ustar archives (what `ssl-vit shards write`, webdataset's TarWriter and `tar` with short names
produce) take a fast path: one `struct` unpack per member header, checksums verified in one numpy pass, and members
grouped into samples without a dict per member. Python's `tarfile`, which webdataset's iterator uses, spends ~60 µs
parsing each member header, and webdataset's `group_by_keys` another ~4 µs per member; with three members per sample
that was a third of the time it takes to decode and crop a 32-px JPEG (the fast path: ~19 µs per sample, reading the
file included). Archives it does not cover (compression, pax or GNU extension headers) go to webdataset's
`tar_file_iterator` and `group_by_keys`; tests check that both paths give the same samples. A damaged plain archive is
reported with where it breaks — `tarfile` in stream mode ends silently at a header with a bad checksum, which would
lose the rest of a shard without a word.
"""
import io
import json
import logging
import re
import struct
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
        grouped = group_members(members, url)
    except NotPlainUstar:
        grouped, damage = group_by_keys(dict(f, __url__=url) for f in tar_file_iterator(io.BytesIO(data))), None
    samples = []
    try:
        samples.extend(grouped)
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
# name, [mode uid gid], size, [mtime checksum], type flag, [link name], magic + version, [owner, devices], prefix;
# checksums are checked for all headers at once (_bad_checksums)
_HEADER = struct.Struct("100s24x12s20xc100x8s80x155s12x")
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key, then all extensions


def plain_ustar_members(data: bytes) -> tuple[list[tuple[str, bytes]], str | None]:
    """(name, bytes) of each regular file of an uncompressed ustar archive, skipping directories and the metadata
    files webdataset skips, and what is damaged where (None if nothing): members from a truncated body or a corrupt
    header on are dropped. Raises NotPlainUstar for anything else (compression, pax or GNU extension headers)."""
    end, pos = len(data), 0
    members, damage = [], None
    offsets, members_before = [], []  # per header
    if end == 0 or data[257:262] != b"ustar":
        raise NotPlainUstar
    unpack_header = _HEADER.unpack_from
    while pos + _BLOCK <= end:
        name, size, kind, magic, prefix = unpack_header(data, pos)
        if magic[:5] != b"ustar":
            if data[pos:pos + _BLOCK] != _ZERO_BLOCK:  # a zero block ends the archive
                damage = f"unreadable tar header at byte {pos}"
            break
        if kind[0] in _GENERAL_READER_TYPES:
            raise NotPlainUstar
        try:
            size = int(size.rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            damage = f"unreadable tar header at byte {pos}"
            break
        offsets.append(pos)
        members_before.append(len(members))
        body, pos = pos + _BLOCK, pos + _BLOCK + (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if pos > end:
            damage = f"truncated inside the member at byte {body - _BLOCK}"
            break
        if kind in (b"0", b"\0"):
            name = name.split(b"\0", 1)[0]
            if magic[5:6] == b"\0" and prefix[0]:  # GNU headers ("ustar  ") have no prefix field
                name = prefix.split(b"\0", 1)[0] + b"/" + name
            name = name.decode("utf-8", "surrogateescape")
            if "__" not in name or not _is_metadata(name):
                members.append((name, data[body:body + size]))
    else:
        if pos < end:
            damage = f"truncated inside the tar header at byte {pos}"
    bad = _bad_checksums(data, offsets)
    if len(bad):
        members, damage = members[:members_before[bad[0]]], f"bad tar header checksum at byte {offsets[bad[0]]}"
    return members, damage


def _bad_checksums(data: bytes, offsets: list[int]) -> np.ndarray:
    """Indices of the headers whose stored checksum (octal digits, then NUL/space) is not the byte sum of the header
    with the checksum field read as spaces. All headers at once: doing this in Python costs more than parsing the rest
    of a header. Headers start on 512-byte blocks, so they are rows of the archive seen as a [blocks, 512] array."""
    if not offsets:
        return np.zeros(0, np.int64)
    blocks = np.frombuffer(data, np.uint8, count=len(data) // _BLOCK * _BLOCK).reshape(-1, _BLOCK)
    headers = blocks[np.asarray(offsets) // _BLOCK]
    field = headers[:, 148:156].astype(np.int64)
    actual = headers.sum(1, dtype=np.int64) - field.sum(1) + 8 * ord(" ")
    is_digit = (field >= ord("0")) & (field <= ord("7"))
    digits_after = np.cumsum(is_digit[:, ::-1], axis=1)[:, ::-1] - is_digit  # place value of each digit
    stored = (is_digit * (field - ord("0")) * 8 ** digits_after).sum(1)
    well_formed = (np.diff(is_digit.astype(np.int8), axis=1) > 0).sum(1) <= (~is_digit[:, 0]).astype(int)
    return np.flatnonzero((stored != actual) | ~well_formed)


def group_members(members: list[tuple[str, bytes]], url: str):
    """Samples from consecutive members with the same key: what webdataset's `group_by_keys` yields for them (same
    key/suffix split, lower-cased suffix, ValueError on a duplicate), without a dict per member."""
    sample = None
    for name, value in members:
        match = _KEY_SUFFIX.match(name)
        if match is None:
            continue
        key, suffix = match.group(1), match.group(2).lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if suffix in sample:
            raise ValueError(f"{name}: duplicate file name in tar file {suffix} {sample.keys()}")
        sample[suffix] = value
    if sample is not None:
        yield sample


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
