"""Read the samples of one tar shard as its members arrive: memory holds one member, whatever the shard size.

A sample is the run of consecutive members that share a key (webdataset's rule: the key is the name up to the first
dot of its last path part; the suffix after it is lower-cased). Samples before `start` are counted from their headers
alone: their bodies are skipped (seek on local files, read and discarded on `pipe:` and URLs) and never decoded.

One reader for every archive we meet: plain ustar (our writer, webdataset's TarWriter, `tar`), pax and GNU long-name
headers (long paths), gzip-compressed shards. A damaged shard (bad header checksum, garbage, truncation, a duplicate
member) keeps the samples before the damage, drops the one in progress there (it may be incomplete) and the rest,
with a warning naming the shard and where it breaks: `tarfile` in stream mode ends silently at a bad header, which
would lose the rest of a shard without a word.
"""
import gzip
import hashlib
import io
import os
import re
import struct
import warnings
import zlib
from typing import Generator, Iterator

from webdataset import gopen

from ssl_vit.errors import SslVitError

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
# name, [mode uid gid], size, [mtime], checksum, type flag, [link name, magic + version, owner, devices], prefix
_HEADER = struct.Struct("100s24x12s12x8sc100x8x80x155s12x")
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_METADATA = re.compile(r"__[^/]*__($|/)")  # webdataset's tar iterator skips these (`__index__/...`, `__meta__`)
_SKIP_CHUNK = 1 << 20


class Damage(Exception):
    """The archive cannot be read past this point."""


class Checksum:
    """sha256 and size of every byte read from a shard (`iter_samples(..., checksum=)` then reads it to the end)."""

    def __init__(self):
        self.digest, self.size = hashlib.sha256(), 0

    def update(self, data: bytes) -> None:
        self.digest.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def iter_samples(url: str, start: int = 0, stop: int | None = None, checksum: Checksum | None = None,
                 strict: bool = False) -> Generator[dict, None, int]:
    """Samples `start` ≤ i < `stop` of a shard as `{"__key__", "__url__", suffix: bytes}`, in tar order; returns the
    number of samples the shard holds (up to `stop`; a damaged shard's intact ones). With `checksum`, every byte of
    the shard passes through it, in the same single read. Damage is a warning (training goes on with the other
    shards), or with `strict` an SslVitError (inspecting and indexing must not count half a shard)."""
    stream = _open(url, checksum)
    index, sample, finished = -1, None, False
    try:
        for name, size in _members(stream):
            match = _KEY_SUFFIX.match(name)
            if match is None or _is_metadata(name):
                stream.skip(size + -size % BLOCK)
                continue
            key, suffix = match.group(1), match.group(2).lower()
            if sample is None or key != sample["__key__"]:
                if sample is not None and index >= start:
                    yield sample
                index += 1
                if stop is not None and index >= stop:
                    return index  # the rest is not read: a `pipe:` command ends on a broken pipe, which is no error
                sample = {"__key__": key, "__url__": url}
            if suffix in sample:
                raise Damage(f"duplicate file name {name}")
            if index < start:
                sample[suffix] = None
                stream.skip(size)
            else:
                sample[suffix] = stream.read_exactly(size)
            stream.skip(-size % BLOCK)
        finished = True
        if sample is not None and index >= start:
            yield sample
        if checksum is not None:
            stream.drain()
        return index + 1
    except Damage as e:
        finished = True
        done = max(0, index - start)  # the sample in progress may be incomplete: dropped
        message = f"shard {url} is truncated or corrupt after {done} samples ({e})"
        if strict:
            raise SslVitError(message) from None
        warnings.warn(f"{message}; the rest of this shard is skipped", RuntimeWarning, stacklevel=2)
        return max(0, index)
    finally:
        stream.close(url, check=finished)


def member_ranges(url: str) -> Iterator[tuple[str, str, int, int]]:
    """(key, suffix, offset, size) of each member of a plain (uncompressed) tar shard: the byte range of its body,
    for a later ranged read of that member alone. Headers only: bodies are skipped (seeked over in local files).
    A gzip shard has no such ranges: SslVitError."""
    stream = _open(url)
    if isinstance(stream.raw, gzip.GzipFile):
        stream.close(url, check=False)
        raise SslVitError(f"shard {url} is gzip-compressed: its members have no byte ranges to read one by one")
    finished = False
    try:
        for name, size in _members(stream):
            match = _KEY_SUFFIX.match(name)
            if match is not None and not _is_metadata(name):
                yield match.group(1), match.group(2).lower(), stream.position, size
            stream.skip(size + -size % BLOCK)
        finished = True
    except Damage as e:
        raise SslVitError(f"shard {url} is truncated or corrupt ({e})") from None
    finally:
        stream.close(url, check=finished)


def read_shard(url: str) -> list[dict]:
    """All samples of a (small) shard; training and evaluation stream with `iter_samples` instead."""
    return list(iter_samples(url))


def _is_metadata(name: str) -> bool:
    if not name.startswith("__"):  # every member of every sample passes here: the cheap test first
        return False
    return ("/" not in name and name.endswith("__")) or bool(_METADATA.match(name))


def _members(stream: "_Stream") -> Iterator[tuple[str, int]]:
    """(name, size) of each regular file; the caller reads or skips its body (and the padding)."""
    long_name = None
    while True:
        header = stream.read_block()
        if header == _ZERO_BLOCK:
            return
        if header is None:  # every tar writer ends the archive with zero blocks: without them, it was cut here
            raise Damage(f"no end-of-archive blocks: cut at byte {stream.position}")
        if header[257:262] != b"ustar":
            raise Damage(f"unreadable tar header at byte {stream.position - BLOCK}")
        name, size, checksum, kind, prefix = _HEADER.unpack_from(header)
        _check_checksum(header, checksum, stream.position - BLOCK)
        size = _number(size, stream.position - BLOCK)
        if kind in (b"x", b"L"):  # pax record or GNU long name: names the next member
            body = stream.read_exactly(size)
            stream.skip(-size % BLOCK)
            long_name = _pax_path(body) if kind == b"x" else body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind not in (b"0", b"\0"):  # directories, links, global pax headers, ...
            stream.skip(size + (-size % BLOCK))
            long_name = None
            continue
        if long_name is None:
            name = name.split(b"\0", 1)[0]
            if header[262:263] == b"\0" and prefix[0]:  # POSIX ustar keeps long paths' folders in the prefix field
                name = prefix.split(b"\0", 1)[0] + b"/" + name
            long_name = name.decode("utf-8", "surrogateescape")
        yield long_name, size
        long_name = None


_OCTAL = re.compile(rb"[ \0]*([0-7]+)[ \0]*")  # writers pad numbers with NULs or spaces on either side


def _check_checksum(header: bytes, field: bytes, where: int) -> None:
    """The stored checksum is the byte sum of the header with its own field read as spaces. Adler-32's low half is
    1 + that byte sum modulo 65,521, computed in C: Python's sum() over the 512 bytes was a fifth of the time to read
    a small sample. A damaged header passes only if its byte sum moved by a multiple of 65,521 (one byte moves it by
    at most 255)."""
    digits = _OCTAL.fullmatch(field)
    if digits is None:
        raise Damage(f"bad tar header checksum at byte {where}")
    expected = int(digits.group(1), 8) + sum(field) - 8 * 0x20  # the header's byte sum as stored
    if (expected + 1) % 65521 != zlib.adler32(header) & 0xFFFF:
        raise Damage(f"bad tar header checksum at byte {where}")


def _number(field: bytes, where: int) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    digits = _OCTAL.fullmatch(field)
    if digits is None:
        if field.strip(b"\0 "):
            raise Damage(f"unreadable tar header at byte {where}")
        return 0
    return int(digits.group(1), 8)


def _pax_path(body: bytes) -> str | None:
    """The `path` record of a pax extended header ("<length> path=<value>\\n" records)."""
    pos = 0
    while pos < len(body):
        length = int(body[pos:body.index(b" ", pos)])
        record = body[body.index(b" ", pos) + 1:pos + length - 1]
        if record.startswith(b"path="):
            return record[5:].decode("utf-8", "surrogateescape")
        pos += length
    return None


class _Stream:
    """Exact reads and skips over an opened shard, counting bytes (for messages)."""

    def __init__(self, raw, size: int | None = None):
        self.raw, self.position, self.size = raw, 0, size  # size: a local file's, which skips by seeking

    def read_block(self) -> bytes | None:
        block = self.raw.read(BLOCK)
        return self._complete(block, BLOCK, "the tar header", self.position) if block else None

    def read_exactly(self, n: int) -> bytes:
        return self._complete(self.raw.read(n), n, "the member", self.position - BLOCK)

    def _complete(self, data: bytes, n: int, inside: str, at: int) -> bytes:
        """`data` topped up to `n` bytes (a pipe may return less per read); fewer is truncation."""
        if len(data) < n:
            data += self._more(n - len(data))
        if len(data) < n:
            raise Damage(f"truncated inside {inside} at byte {at}")
        self.position += n
        return data

    def skip(self, n: int) -> None:
        if n <= 0:
            return
        if self.size is not None:
            if self.position + n > self.size:
                raise Damage(f"truncated inside the member at byte {self.position}")
            self.raw.seek(n, 1)
            self.position += n
            return
        while n:
            n -= len(self.read_exactly(min(n, _SKIP_CHUNK)))

    def drain(self) -> None:
        while self.raw.read(_SKIP_CHUNK):
            pass

    def _more(self, n: int) -> bytes:
        parts = []
        while n:
            chunk = self.raw.read(n)
            if not chunk:
                break
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def close(self, url: str, check: bool) -> None:
        try:
            self.raw.close()
        except Exception as e:  # a failed `pipe:` command reports its exit status here, or on a read
            if check:
                raise failure(url, e) from None


def failure(url: str, error: Exception) -> SslVitError:
    """A shard that could not be read, in one line: webdataset's message for a failed `pipe:` command holds its
    arguments' reprs ("(('cmd',), {'shell': True, ...}): exit 1 (read)"), so only the exit status is kept."""
    status = re.search(r"exit (-?\d+)", str(error))
    return SslVitError(f"cannot read shard {url}: " + (f"its command exited with status {status.group(1)}" if status
                                                       else str(error)))


def _open(url: str, checksum: Checksum | None = None) -> _Stream:
    try:
        raw = gopen(url, "rb")
    except FileNotFoundError:
        raise SslVitError(f"missing shard: {url}") from None
    except OSError as e:
        raise SslVitError(f"cannot open shard {url}: {e}") from None
    if checksum is not None:  # every byte is read (no seeking), through the checksum
        raw = io.BufferedReader(_RawAdapter(raw, url, checksum), _SKIP_CHUNK)
        return _Stream(gzip.GzipFile(fileobj=raw, mode="rb") if raw.peek(2)[:2] == b"\x1f\x8b" else raw)
    if not hasattr(raw, "peek"):  # `pipe:` and URL streams
        raw = io.BufferedReader(_RawAdapter(raw, url), _SKIP_CHUNK)
    if raw.peek(2)[:2] == b"\x1f\x8b":
        return _Stream(gzip.GzipFile(fileobj=raw, mode="rb"))
    try:
        return _Stream(raw, os.fstat(raw.fileno()).st_size)
    except (AttributeError, OSError, io.UnsupportedOperation):  # not a local file
        return _Stream(raw)


class _RawAdapter(io.RawIOBase):
    """A read()-only stream as a raw stream, so that io.BufferedReader can peek at its first bytes; optionally
    passing every byte through a checksum."""

    def __init__(self, stream, url: str, checksum: Checksum | None = None):
        self.stream, self.url, self.checksum = stream, url, checksum

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self.stream.read(len(buffer))
        except OSError as e:  # webdataset's `pipe:` reports a failed command here, or on close
            raise failure(self.url, e) from None
        buffer[:len(data)] = data
        if self.checksum is not None:
            self.checksum.update(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            super().close()
            self.stream.close()
