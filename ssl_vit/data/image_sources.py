"""Input images for `ssl-vit shards write`: list them (with labels and byte sizes), read their bytes, make them RGB.

Sources: an ImageFolder tree (`SRC/<class>/.../<image>`; class index = sorted folder names), a tar of such a tree
(.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz; one shared top folder such as `train/` is stripped), or a CSV/JSONL list of
`path,label` (relative paths resolve against the list's folder; labels are all integers or else class names, which
map to their sorted order). Hidden files and folders (`.DS_Store`, `._x.jpg`, `__MACOSX/`) are ignored.
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


@dataclass(frozen=True)
class SourceImage:
    ref: str        # shown to users and stored in the plan: relative to SRC (folder, tar) or as written in the list
    label: int
    size: int       # bytes of the source image, for planning shard sizes
    location: tuple  # (file, offset, length); offset None: the whole file


@dataclass
class SourceSet:
    images: list[SourceImage]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (ref, reason), found while listing


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


@contextmanager
def open_source(src, scratch: Path):
    """Yield the SourceSet of `src`; a compressed tar is decompressed once to `scratch`, removed on exit."""
    src = Path(src)
    if not src.exists():
        raise SslVitError(f"source not found: {src}")
    name = src.name.lower()
    try:
        if src.is_dir():
            yield _list_folder(src)
        elif name.endswith(".csv"):
            yield _list_csv(src)
        elif name.endswith((".jsonl", ".ndjson")):
            yield _list_jsonl(src)
        elif name.endswith(TAR_SUFFIXES) or tarfile.is_tarfile(src):
            yield _list_tar(_uncompressed_tar(src, scratch), src)
        else:
            raise SslVitError(f"unsupported source {src}: expected an image folder, a .tar/.tar.gz/.tgz of one, "
                              "or a .csv/.jsonl list of path,label")
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


def _list_folder(root: Path) -> SourceSet:
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = [p.name for p in root.iterdir() if p.is_file() and is_image_name(p.name)]
    if loose:
        warnings.warn(f"{root}: ignored {len(loose)} image(s) outside class folders (e.g. {sorted(loose)[0]})",
                      RuntimeWarning)
    files = []  # (ref, label, path)
    for label, class_dir in enumerate(class_dirs):
        for folder, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [(Path(folder, n).relative_to(root).as_posix(), label, Path(folder, n))
                      for n in sorted(filenames) if is_image_name(n)]
    images, skipped = _stat_files(files)
    found = {label for _, label, _ in files}
    empty = [f"{d.name} ({label})" for label, d in enumerate(class_dirs) if label not in found]
    if not images:
        raise SslVitError(f"no images in {root}: expected {root}/<class>/<image> with an extension among "
                          f"{' '.join(IMAGE_EXTENSIONS)}")
    if empty:
        warnings.warn(f"{root}: class folder(s) without images get no samples: {', '.join(empty)}", RuntimeWarning)
    return SourceSet(images, [d.name for d in class_dirs], skipped)


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


def _list_tar(tar_path: Path, src: Path) -> SourceSet:
    try:
        with tarfile.open(tar_path, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SslVitError(f"cannot read tar {src}: {e}") from None
    entries = []
    for m in members:
        parts = [p for p in m.name.split("/") if p not in ("", ".")]
        if parts and is_image_name(parts[-1]) and not any(p.startswith(".") or p == "__MACOSX" for p in parts):
            entries.append((parts, m))
    while entries and all(len(p) >= 3 and p[0] == entries[0][0][0] for p, _ in entries):
        entries = [(p[1:], m) for p, m in entries]  # one shared top folder (e.g. `train/`) is not a class
    loose = [p for p, _ in entries if len(p) == 1]
    if loose:
        warnings.warn(f"{src}: ignored {len(loose)} image(s) outside class folders (e.g. {loose[0][0]})",
                      RuntimeWarning)
    entries = sorted(((p, m) for p, m in entries if len(p) >= 2), key=lambda e: e[0])
    if not entries:
        raise SslVitError(f"no images in {src}: expected members <class>/<image> with an extension among "
                          f"{' '.join(IMAGE_EXTENSIONS)}")
    classes = sorted({p[0] for p, _ in entries})
    label_of = {name: i for i, name in enumerate(classes)}
    images = [SourceImage("/".join(p), label_of[p[0]], m.size, (str(tar_path), m.offset_data, m.size))
              for p, m in entries]
    return SourceSet(images, classes)


def _list_csv(path: Path) -> SourceSet:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            for column in ("path", "label"):
                if column not in header:
                    raise SslVitError(f"{path}: CSV header lacks column '{column}' (header: {','.join(header)})")
            ip, il = header.index("path"), header.index("label")
            rows = []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) <= max(ip, il):
                    raise SslVitError(f"{path}:{reader.line_num}: row has {len(row)} fields, header has "
                                      f"{len(header)}")
                rows.append((f"{path}:{reader.line_num}", row[ip].strip(), row[il].strip()))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SslVitError(f"cannot read CSV {path}: {e}") from None
    return _from_rows(path, rows)


def _list_jsonl(path: Path) -> SourceSet:
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
                if not isinstance(obj, dict):
                    raise SslVitError(f"{where}: expected an object with keys 'path' and 'label'")
                for key in ("path", "label"):
                    if key not in obj:
                        raise SslVitError(f"{where}: object lacks key '{key}'")
                if not isinstance(obj["path"], str):
                    raise SslVitError(f"{where}: 'path' must be a string")
                rows.append((where, obj["path"].strip(), obj["label"]))
    except (OSError, UnicodeDecodeError) as e:
        raise SslVitError(f"cannot read JSONL {path}: {e}") from None
    return _from_rows(path, rows)


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


def _from_rows(list_file: Path, rows: list[tuple]) -> SourceSet:
    if not rows:
        raise SslVitError(f"no images in {list_file}: the list has no rows")
    for where, path, _ in rows:
        if not path:
            raise SslVitError(f"{where}: empty path")
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
