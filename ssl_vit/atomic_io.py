"""Atomic writes, the one place for them: a reader (or a crash) never sees a partial file or folder under its final
name. Files: `atomic_path` (any writer given a path: torch.save, safetensors, timm), `atomic_write` (an open file),
`write_text_atomic`, `write_json_atomic`. Folders: `atomic_dir`, or `replace_dir` for a temporary folder that
several processes fill."""
import json
import os
import shutil
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


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(folder: Path) -> None:
    """Every file below `folder` and the folder itself on disk."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            fsync_file(path)
    fsync_dir(folder)


@contextmanager
def atomic_path(path):
    """Yield `path.tmp` (removed first if a failed run left it) for the block to write; on success fsync it and
    rename it over `path`. After a failure the `.tmp` stays behind for the next run to overwrite."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    yield tmp
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextmanager
def atomic_write(path, mode: str = "wb"):
    """`atomic_path`, opened for writing."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_text_atomic(path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json_atomic(path, obj) -> None:
    """`obj` as indented JSON at `path`, never partial; the parent folder is created."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(obj, indent=1) + "\n")
    except OSError as e:
        raise SslVitError(f"cannot write {path}: {e}") from None


def replace_dir(tmp: Path, folder: Path) -> None:
    """Rename `tmp` onto `folder`; a directory cannot be renamed onto a non-empty one, so move the old aside."""
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.rename(folder, old)
    os.rename(tmp, folder)
    fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(folder):
    """Yield an empty temporary folder beside `folder` (created with its parents); on success fsync what the block
    wrote and swap it in for `folder` (`replace_dir`)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:  # its name holds this process's id: no later run would reuse or remove it
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_tree(tmp)
    replace_dir(tmp, folder)
