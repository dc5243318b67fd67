"""Input images for `ssl-vit shards write`: list them (with labels, if any, and byte sizes), read their bytes, make
them RGB.

Sources: an image folder, a tar of one (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz; folders that every member shares, such
as `train/`, are stripped, so a tar of `photos/` reads as `photos`), a `.txt` list of paths (one per line), or a
CSV/JSONL list with a `path` column and an optional `label` column. Relative paths in a list resolve against the
list's folder; labels are all integers or else class names, which map to their sorted order.

A folder (FOLDER_RULE): with `unlabeled`, every image at any depth, without labels. Otherwise its sub-folders are
classes (`SRC/<class>/.../<image>`, class index = sorted folder names) -- unless all its images sit at its top
level, which is read as an unlabeled set (with an `UnlabeledNote`). Loose top-level images next to class folders are
an error: reading them either way would drop something the user meant. Unlabeled images have label -1 and the
SourceSet has no classes. Hidden files and folders (`.DS_Store`, `._x.jpg`, `__MACOSX/`) are ignored.
"""
import bz2
import csv
import gzip
import io
import json
import lzma
import os
import re
import shutil
import tarfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_vit.errors import SslVitError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# Already-RGB images in these formats keep their original bytes, under this extension.
KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
JPEG_QUALITY = 95
_DECOMPRESSORS = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}


class UnlabeledNote(UserWarning):
    """A source read as unlabeled without `--unlabeled` being asked for: worth a note, not a warning."""


@dataclass(frozen=True)
class SourceImage:
    ref: str        # shown to users and stored in the plan: relative to SRC (folder, tar) or as written in the list
    label: int      # -1: unlabeled
    size: int       # bytes of the source image, for planning shard sizes
    location: tuple  # (file, offset, length); offset None: the whole file


@dataclass
class SourceSet:
    images: list[SourceImage]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (ref, reason), found while listing

    @property
    def labeled(self) -> bool:
        return bool(self.classes)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


@contextmanager
def open_source(src, scratch: Path, unlabeled: bool = False):
    """Yield the SourceSet of `src` (without labels when `unlabeled`); a compressed tar is decompressed once to
    `scratch`, removed on exit."""
    src = Path(src)
    if not src.exists():
        raise SslVitError(f"source not found: {src}")
    name = src.name.lower()
    try:
        if src.is_dir():
            yield _list_folder(src, unlabeled)
        elif name.endswith(".txt"):
            yield _from_rows(src, _txt_rows(src), unlabeled)
        elif name.endswith(".csv"):
            yield _from_rows(src, _csv_rows(src), unlabeled)
        elif name.endswith((".jsonl", ".ndjson")):
            yield _from_rows(src, _jsonl_rows(src), unlabeled)
        elif name.endswith(TAR_SUFFIXES) or tarfile.is_tarfile(src):
            yield _list_tar(_uncompressed_tar(src, scratch), src, unlabeled)
        else:
            raise SslVitError(f"unsupported source {src}: expected an image folder, a .tar/.tar.gz/.tgz of one, "
                              "a .txt list of paths, or a .csv/.jsonl list with a path (and label) column")
    finally:
        Path(scratch).unlink(missing_ok=True)


def read_image_bytes(location: tuple) -> bytes:
    path, offset, length = location
    with open(path, "rb") as f:
        if offset is None:
            return f.read()
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise OSError(f"{path} ends inside this member ({len(data)} of {length} bytes)")
    return data


def encode_for_shard(data: bytes) -> tuple[str, bytes, dict]:
    """(extension, bytes, {"size", "mode"}): the original bytes when already RGB in a common format, else RGB
    re-encoded (JPEG q95 for JPEG or CMYK sources, PNG for the lossless rest). Raises on undecodable data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's palette-transparency and EXIF notes are not the user's concern
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a full decode: truncated or corrupt files fail here, not in training
            meta = {"size": list(img.size), "mode": img.mode}
            if img.mode == "RGB" and img.format in KEEP_FORMATS:
                return KEEP_FORMATS[img.format], data, meta
            lossy = img.format in ("JPEG", "MPO") or img.mode == "CMYK"
            rgb = to_rgb(img)
    out = io.BytesIO()
    if lossy:
        rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
    else:
        rgb.save(out, format="PNG")
    return ("jpg" if lossy else "png"), out.getvalue(), meta


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any PIL mode: transparency is composited over white; 16/32-bit grey is scaled to 8 bits."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        pixels = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or pixels.max(initial=0) > 255:
            pixels = pixels / 257.0
        return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _list_folder(root: Path, unlabeled: bool) -> SourceSet:
    files = []  # (parts relative to root, path); top-down, sorted: a class's images stay in the order they had
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        parts = Path(folder).relative_to(root).parts
        files += [((*parts, n), Path(folder, n)) for n in sorted(filenames) if is_image_name(n)]
    class_dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    labeled, classes = _folder_rule(root, [parts for parts, _ in files], unlabeled, class_dirs)
    images, skipped = _stat_files([("/".join(parts), label, path) for (parts, path), label in zip(files, labeled)])
    if not images:
        raise SslVitError(f"no images in {root}: expected {root}/<class>/<image> (or images at any depth with "
                          f"--unlabeled) with an extension among {' '.join(IMAGE_EXTENSIONS)}")
    return SourceSet(images, classes, skipped)


def _folder_rule(src, paths: list[tuple], unlabeled: bool, class_dirs=None) -> tuple[list[int], list[str]]:
    """(label per image path, classes) by the folder rule in the module docstring; `class_dirs` (a folder's
    sub-folders, empty ones included) default to the top folders of the paths."""
    loose = [p[0] for p in paths if len(p) == 1]
    nested = len(paths) - len(loose)
    if loose and not unlabeled:
        if nested:
            tops = len({p[0] for p in paths if len(p) > 1})
            raise SslVitError(f"{src} mixes {len(loose)} loose image(s) at its top level (e.g. {loose[0]}) with "
                              f"{nested} image(s) in {tops} class folder(s): pass --unlabeled to read all "
                              f"{len(paths)} without labels, or move the loose images into class folders")
        warnings.warn(f"{src}: all {len(loose)} images sit at the top level, no class folders: read as an unlabeled "
                      "set", UnlabeledNote)
        unlabeled = True
    if unlabeled or not paths:
        return [-1] * len(paths), []
    classes = class_dirs if class_dirs is not None else sorted({p[0] for p in paths})
    label_of = {name: i for i, name in enumerate(classes)}
    labels = [label_of[p[0]] for p in paths]
    found = set(labels)
    empty = [f"{name} ({i})" for i, name in enumerate(classes) if i not in found]
    if empty:
        warnings.warn(f"{src}: class folder(s) without images get no samples: {', '.join(empty)}", RuntimeWarning)
    return labels, classes


def _uncompressed_tar(src: Path, scratch: Path) -> Path:
    """The tar itself, or (when compressed) a decompressed copy at `scratch`: random access for the workers."""
    with open(src, "rb") as f:
        magic = f.read(6)
    opener = next((fn for prefix, fn in _DECOMPRESSORS.items() if magic.startswith(prefix)), None)
    if opener is None:
        return src
    try:
        with opener(src, "rb") as packed, open(scratch, "wb") as out:
            shutil.copyfileobj(packed, out, 1 << 20)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise SslVitError(f"cannot decompress {src}: {e}") from None
    return Path(scratch)


def _list_tar(tar_path: Path, src: Path, unlabeled: bool) -> SourceSet:
    try:
        with tarfile.open(tar_path, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SslVitError(f"cannot read tar {src}: {e}") from None
    entries = []
    for m in members:
        parts = tuple(p for p in m.name.split("/") if p not in ("", "."))
        if parts and is_image_name(parts[-1]) and not any(p.startswith(".") or p == "__MACOSX" for p in parts):
            entries.append((parts, m))
    while entries and all(len(p) >= 2 and p[0] == entries[0][0][0] for p, _ in entries):
        entries = [(p[1:], m) for p, m in entries]  # a shared top folder (`train/`, `photos/`) is the folder itself
    entries.sort(key=lambda e: e[0])
    if not entries:
        raise SslVitError(f"no images in {src}: expected members <class>/<image> (or images at any depth with "
                          f"--unlabeled) with an extension among {' '.join(IMAGE_EXTENSIONS)}")
    labels, classes = _folder_rule(src, [p for p, _ in entries], unlabeled)
    images = [SourceImage("/".join(p), label, m.size, (str(tar_path), m.offset_data, m.size))
              for (p, m), label in zip(entries, labels)]
    return SourceSet(images, classes)


def _txt_rows(path: Path) -> list[tuple]:
    """(where, path, None) per non-blank line: a plain list of paths has no labels."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [(f"{path}:{n}", line.strip(), None) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SslVitError(f"cannot read list {path}: {e}") from None


def _csv_rows(path: Path) -> list[tuple]:
    """(where, path, label) per row; label None for every row when the header has no `label` column."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if "path" not in header:
                raise SslVitError(f"{path}: CSV header lacks column 'path' (header: {','.join(header)})")
            columns = [header.index("path")] + ([header.index("label")] if "label" in header else [])
            rows = []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) <= max(columns):
                    raise SslVitError(f"{path}:{reader.line_num}: row has {len(row)} fields, header has "
                                      f"{len(header)}")
                cells = [row[i].strip() for i in columns]
                rows.append((f"{path}:{reader.line_num}", cells[0], cells[1] if len(cells) > 1 else None))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SslVitError(f"cannot read CSV {path}: {e}") from None
    return rows


def _jsonl_rows(path: Path) -> list[tuple]:
    """(where, path, label) per object; label None for every row when no object has a `label` key."""
    rows = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SslVitError(f"{path}:{line_no}: not JSON ({e.msg})") from None
                where = f"{path}:{line_no}"
                if not isinstance(obj, dict) or "path" not in obj:
                    raise SslVitError(f"{where}: expected an object with key 'path' (and 'label' for labelled lists)")
                if not isinstance(obj["path"], str):
                    raise SslVitError(f"{where}: 'path' must be a string")
                rows.append((where, obj["path"].strip(), obj.get("label")))
    except (OSError, UnicodeDecodeError) as e:
        raise SslVitError(f"cannot read JSONL {path}: {e}") from None
    with_label = [where for where, _, label in rows if label is not None]
    if with_label and len(with_label) < len(rows):
        first = next(where for where, _, label in rows if label is None)
        raise SslVitError(f"{first}: object lacks key 'label' ({len(with_label)} of {len(rows)} rows have one): "
                          "give every row a label, or none for an unlabeled set")
    return rows


def _label_table(rows: list[tuple]) -> tuple[list[int], list[str]]:
    """Labels as indices plus class names: all-integer labels keep their values, names map to sorted order."""
    for where, _, label in rows:
        if isinstance(label, bool) or not isinstance(label, (int, str)) or label == "":
            raise SslVitError(f"{where}: label must be a class name or an integer, got {label!r}")
    as_ints = [int(label) if isinstance(label, int) or re.fullmatch(r"-?[0-9]+", label) else None
               for _, _, label in rows]
    if all(v is not None for v in as_ints):
        negative = next((rows[i][0] for i, v in enumerate(as_ints) if v < 0), None)
        if negative:
            raise SslVitError(f"{negative}: integer labels must be >= 0")
        return as_ints, [str(i) for i in range(max(as_ints) + 1)]
    classes = sorted({str(label) for _, _, label in rows})
    label_of = {name: i for i, name in enumerate(classes)}
    return [label_of[str(label)] for _, _, label in rows], classes


def _from_rows(list_file: Path, rows: list[tuple], unlabeled: bool) -> SourceSet:
    if not rows:
        raise SslVitError(f"no images in {list_file}: the list has no rows")
    for where, path, _ in rows:
        if not path:
            raise SslVitError(f"{where}: empty path")
    if unlabeled or rows[0][2] is None:
        labels, classes = [-1] * len(rows), []
    else:
        labels, classes = _label_table(rows)
    files = [(ref, label, Path(ref) if Path(ref).is_absolute() else list_file.parent / ref)
             for (_, ref, _), label in zip(rows, labels)]
    images, skipped = _stat_files(files)
    return SourceSet(images, classes, skipped)


def _stat_files(files: list[tuple[str, int, Path]]) -> tuple[list[SourceImage], list[tuple[str, str]]]:
    """Images (with byte sizes) for the files that exist; the rest are skipped with the reason."""
    images, skipped = [], []
    for ref, label, path in files:
        try:
            size = path.stat().st_size
        except OSError as e:
            skipped.append((ref, f"unreadable: {e.strerror} ({path})"))
            continue
        images.append(SourceImage(ref, label, size, (str(path), None, None)))
    return images, skipped
