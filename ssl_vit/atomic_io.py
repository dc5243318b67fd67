"""Atomic file writes: a reader (or a crash) never sees a partial file under its final name."""
import json
import os
from contextlib import contextmanager
from pathlib import Path

from ssl_vit.errors import SslVitError


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path, mode: str = "wb"):
    """Yield `path.tmp` opened for writing; on success flush, fsync and rename it over `path`, so that `path` is
    never partial. After a failure the `.tmp` stays behind for the next run to overwrite."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path, obj) -> None:
    """`obj` as indented JSON at `path`, never partial; the parent folder is created."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
    except OSError as e:
        raise SslVitError(f"cannot write {path}: {e}") from None
