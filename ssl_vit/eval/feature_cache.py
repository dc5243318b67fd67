"""The feature cache: one folder per (backbone, evaluation set) that k-NN, the linear probe and retrieval read.

Layout: `features.npy` float32 [N, D] (memory-mappable), `labels.npy` int64 [N] (-1 = no label), `keys.json`
(the N sample keys, sorted), `keys.npy` (the same keys as UTF-8 bytes, fixed width: read by row, memory-mapped, by
`index build` at any N; caches written before it existed have keys.json only), `meta.json` ({"backbone", "pooling":
"cls"|"avg"|"cls+avg", "last_blocks", "image_size", "resize", "dim", "num", "source", "shards" (absolute URLs),
"classes", "num_processes", ...}). Written atomically: a crash leaves either the previous cache or the new one,
never half of one.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssl_vit.atomic_io import atomic_dir
from ssl_vit.errors import SslVitError
from ssl_vit.eval import POOLINGS

FILES = ("features.npy", "labels.npy", "keys.json", "meta.json")


@dataclass
class FeatureSet:
    """Rows of `features`, `labels` and `keys` describe the same sample; `meta` says how they were made."""
    features: np.ndarray  # [N, D] float32
    labels: np.ndarray  # [N] int64, -1 = no label
    keys: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def has_all_labels(self) -> bool:
        return bool(len(self.labels)) and bool((np.asarray(self.labels) >= 0).all())


def require_labels(labels, name: str, needed_for: str, cache=None) -> None:
    """A one-line error when any of `labels` is -1 (a sample without a label), naming the feature cache if given."""
    labels = np.asarray(labels)
    missing = int((labels < 0).sum())
    if missing:
        where = f" in feature cache {cache}" if cache else ""
        raise SslVitError(f"{name} labels missing{where}: {missing} samples have label -1, out of {len(labels)}; "
                          f"{needed_for} needs a label for every sample (unlabeled features serve retrieval: "
                          "ssl-vit index build)")


def save_features(folder, features, labels, keys, meta=None) -> Path:
    """Write a cache to `folder` (replacing one already there); rows are reordered so that keys are sorted."""
    folder = Path(folder)
    feats, labs, keys = _validated(np.asarray(features), np.asarray(labels), list(keys), str(folder))
    order = sorted(range(len(keys)), key=keys.__getitem__)
    if order != list(range(len(keys))):
        feats, labs, keys = feats[order], labs[order], [keys[i] for i in order]
    meta = {**(meta or {}), "dim": int(feats.shape[1]), "num": int(feats.shape[0])}
    if meta.get("pooling", "cls") not in POOLINGS:
        raise SslVitError(f"{folder}: meta pooling {meta['pooling']!r} is not one of {', '.join(POOLINGS)}")

    with atomic_dir(folder) as tmp:
        np.save(tmp / "features.npy", np.ascontiguousarray(feats, dtype=np.float32))
        np.save(tmp / "labels.npy", labs.astype(np.int64))
        write_keys(tmp, encode_keys(keys))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    return folder


def encode_keys(keys) -> np.ndarray:
    """Keys as a fixed-width UTF-8 bytes array [N] (byte order = code-point order = Python's str order)."""
    return np.array([str(key).encode("utf-8") for key in keys], dtype=bytes) if len(keys) else np.zeros(0, "S1")


def write_keys(folder: Path, keys: np.ndarray, chunk: int = 1 << 20) -> None:
    """`keys.npy` and `keys.json` (byte for byte what json.dumps of the str list writes) from sorted bytes keys.

    Keys of printable ASCII without quote or backslash (every key our writer and img2dataset make) are joined as
    bytes, ~20x faster than decoding and dumping 10^8 Python strings; any other key takes json.dumps."""
    np.save(folder / "keys.npy", keys)
    if not _json_plain(keys, chunk):
        (folder / "keys.json").write_text(json.dumps([key.decode("utf-8") for key in keys.tolist()]))
        return
    with open(folder / "keys.json", "wb") as f:
        f.write(b"[")
        for start in range(0, len(keys), chunk):
            f.write((b", " if start else b"") + b'"' + b'", "'.join(keys[start:start + chunk].tolist()) + b'"')
        f.write(b"]")


_PLAIN = np.zeros(256, bool)
_PLAIN[0x20:0x7F] = True
_PLAIN[[0, ord('"'), ord("\\")]] = [True, False, False]  # 0: numpy's padding of shorter keys


def _json_plain(keys: np.ndarray, chunk: int) -> bool:
    return all(_PLAIN[np.frombuffer(keys[start:start + chunk].tobytes(), np.uint8)].all()
               for start in range(0, len(keys), chunk))


def read_keys(folder) -> np.ndarray:
    """The cache's keys by row: `keys.npy` memory-mapped (or, for a cache without it, encoded from keys.json)."""
    folder = Path(folder)
    if (folder / "keys.npy").is_file():
        return _load_npy(folder / "keys.npy", "r")
    return encode_keys(_load_json(folder / "keys.json"))


def _validated(features: np.ndarray, labels: np.ndarray, keys: list, where: str):
    if features.ndim != 2:
        raise SslVitError(f"{where}: features must be a 2-D array [N, D], got shape {features.shape}")
    if features.shape[0] == 0:
        raise SslVitError(f"empty evaluation set: {where}")
    if labels.ndim != 1 or not len(labels) == len(keys) == features.shape[0]:
        raise SslVitError(f"{where}: features has {features.shape[0]} rows, labels {labels.shape}, "
                          f"keys {len(keys)}: they must agree")
    if not np.issubdtype(labels.dtype, np.integer):
        raise SslVitError(f"{where}: labels must be integers, got {labels.dtype}")
    if len(set(keys)) != len(keys):
        raise SslVitError(f"{where}: sample keys are not unique")
    return features.astype(np.float32, copy=False), labels, [str(k) for k in keys]


def load_features(folder, mmap: bool = True) -> FeatureSet:
    """Read a cache written by `save_features`; `mmap=True` leaves the features on disk until rows are read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SslVitError(f"feature cache {folder} does not exist (expected a folder with {', '.join(FILES)})")
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise SslVitError(f"feature cache {folder} is missing {', '.join(missing)}")
    features = _load_npy(folder / "features.npy", "r" if mmap else None)
    labels = np.asarray(_load_npy(folder / "labels.npy", None))
    keys, meta = _load_json(folder / "keys.json"), _load_json(folder / "meta.json")
    if not isinstance(keys, list) or not isinstance(meta, dict):
        raise SslVitError(f"feature cache {folder}: keys.json must hold a list and meta.json an object")
    _validated(features, labels, keys, str(folder))
    if features.dtype != np.float32:
        raise SslVitError(f"{folder / 'features.npy'}: expected float32, got {features.dtype}")
    if meta.get("dim", features.shape[1]) != features.shape[1]:
        raise SslVitError(f"{folder / 'meta.json'}: dim {meta['dim']} but features.npy has {features.shape[1]} columns")
    return FeatureSet(features, labels.astype(np.int64, copy=False), keys, meta)


def open_rows(folder):
    """(features [N, D] memmap, keys [N] bytes, labels [N] int64 memmap, meta) of a cache, read by row: no list of
    N keys is built (`load_features` validates and returns them as str); shapes and dtypes are checked."""
    folder = Path(folder)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise SslVitError(f"feature cache {folder} is missing {', '.join(missing)}"
                          f"{'' if folder.is_dir() else ' (the folder does not exist)'}")
    features = _load_npy(folder / "features.npy", "r")
    labels = _load_npy(folder / "labels.npy", "r")
    keys, meta = read_keys(folder), _load_json(folder / "meta.json")
    if features.ndim != 2 or features.dtype != np.float32 or not features.shape[0]:
        raise SslVitError(f"{folder / 'features.npy'}: expected a non-empty float32 [N, D] array, got "
                          f"{features.dtype} {features.shape}")
    if labels.shape != (len(features),) or keys.shape != (len(features),) or not isinstance(meta, dict):
        raise SslVitError(f"feature cache {folder}: {len(features)} feature rows but labels {labels.shape}, "
                          f"keys {keys.shape}: they must agree")
    return features, keys, labels.astype(np.int64, copy=False), meta


def vectors_by_key(folders, keys) -> tuple:
    """(features [n, D] of `keys`, [meta] of the caches) from one or more caches (each sorted by key: a binary
    search per key, no key list in memory); an unknown key is a one-line error naming it."""
    opened = [open_rows(folder) for folder in folders]
    return lookup_vectors(opened, keys, folders), [meta for *_, meta in opened]


def lookup_vectors(opened: list, keys, folders) -> np.ndarray:
    """features [n, D] of `keys` in caches already opened with `open_rows` (a server opens them once)."""
    wanted = encode_keys(list(keys))
    found = [None] * len(wanted)
    for features, cache_keys, _, _ in opened:
        at = np.minimum(np.searchsorted(cache_keys, wanted), len(cache_keys) - 1)
        for i in np.flatnonzero(cache_keys[at] == wanted):
            found[i] = features[at[i]] if found[i] is None else found[i]
    unknown = [key for key, row in zip(keys, found) if row is None]
    if unknown:
        raise SslVitError(f"{', '.join(map(str, folders))}: no sample with key {unknown[0]!r}")
    return np.stack(found).astype(np.float32) if found else np.zeros((0, 0), np.float32)


def _load_npy(path: Path, mmap_mode):
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise SslVitError(f"{path}: not a readable .npy array ({e})") from None


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise SslVitError(f"{path}: not valid JSON ({e})") from None
