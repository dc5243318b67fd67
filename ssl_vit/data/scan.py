"""`ssl-vit shards index`: our index (`ssl_vit.data.index`) for WebDataset shards that other tools wrote.

img2dataset (`<key>.jpg` + `<key>.json` + `<key>.txt`, no `cls`), webdataset's `TarWriter`/`ShardWriter` and the like
come without sample counts, so a stream over them knows neither its epoch length nor its ETA. Scanning each shard
(in a process pool) gives per shard the samples the loader will use, the bytes and sha256 of what was read, and the
labels: the set is labelled when every sample has one (`cls`, as the loader reads it), with classes "0".."max".
Samples stream member by member through the loader's own tar reader (memory: one member, whatever the shard size),
which passes every byte through the checksum in the same read (a `pipe:` command runs once).
Samples without an image (or with an unreadable label) are the ones the loader skips: counted as skipped, not as
samples. A damaged shard is an error: an index that counts only its first half would be wrong.
"""
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from ssl_vit.data.index import INDEX_FORMAT, write_index
from ssl_vit.data.samples import IMAGE_KEYS, BadSample, decode_label, image_key
from ssl_vit.data.tar_reader import Checksum, iter_samples
from ssl_vit.data.sources import expand_source, is_remote
from ssl_vit.data.writer import mp_context
from ssl_vit.errors import SslVitError

DEFAULT_WORKERS = 4  # reading is mostly waiting on storage (or a `pipe:` command), not on the CPU


def index_shards(pattern, out, *, workers: int = DEFAULT_WORKERS, progress: bool = True) -> dict:
    """Scan the shards of `pattern` (brace pattern, glob, list, `pipe:` URL) and write their index to `out`."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise SslVitError(f"workers must be an integer >= 0, got {workers!r}")
    urls = expand_source(pattern).urls
    out = Path(out)
    if out.suffix != ".json":
        raise SslVitError(f"index path {out} must end in .json (shard sources read an index by that suffix)")
    with tqdm(total=len(urls), unit="shard", desc=f"index {out.name}", disable=not progress) as bar:
        scans = _scan_all(urls, workers, bar)
    index = _index(str(pattern), out, scans)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_index(out, index)
    return index


def _scan_all(urls: list[str], workers: int, bar: tqdm) -> list[dict]:
    """Scans in shard order; the bar counts finished shards."""
    if workers <= 1 or len(urls) == 1:
        scans = []
        for url in urls:
            scans.append(scan_shard(url))
            bar.update(1)
        return scans
    scans = []
    with mp_context(__name__).Pool(min(workers, len(urls))) as pool:
        for scan in pool.imap(scan_shard, urls):
            scans.append(scan)
            bar.update(1)
    return scans


def scan_shard(url: str) -> dict:
    """{"url", "samples", "bytes", "sha256", "labels": {label: count} (-1: no label), "skipped": count}."""
    checksum, labels, skipped = Checksum(), Counter(), 0
    try:
        for sample in iter_samples(url, checksum=checksum, strict=True):  # one read: samples and checksum
            try:
                if image_key(sample) is None:
                    raise BadSample("no image")
                labels[max(decode_label(sample), -1)] += 1
            except (BadSample, ValueError):  # the loader skips these samples too
                skipped += 1
    except SslVitError as e:
        if "truncated or corrupt" in str(e):
            raise SslVitError(f"cannot index a damaged shard: {e}") from None
        raise
    return {"url": url, "samples": sum(labels.values()), "bytes": checksum.size, "sha256": checksum.hexdigest(),
            "labels": dict(labels), "skipped": skipped}


def _index(source: str, out: Path, scans: list[dict]) -> dict:
    labels = Counter()
    for scan in scans:
        labels.update(scan["labels"])
    total, unlabeled = sum(labels.values()), labels.get(-1, 0)
    if total == 0:
        raise SslVitError(f"no samples with an image in {source} ({len(scans)} shard(s), image extensions "
                          f"{' '.join(IMAGE_KEYS)})")
    labeled = unlabeled == 0
    num_classes = max(labels) + 1 if labeled else 0
    index = {"format": INDEX_FORMAT,
             "shards": [_entry(s, out.parent) for s in scans],
             "num_samples": total, "labeled": labeled, "classes": [str(i) for i in range(num_classes)],
             "class_counts": [labels.get(i, 0) for i in range(num_classes)],
             "source": source, "skipped": sum(s["skipped"] for s in scans)}
    if 0 < unlabeled < total:
        index["unlabeled_samples"] = unlabeled
    return index


def _entry(scan: dict, folder: Path) -> dict:
    entry = {"name": shard_name(scan["url"], folder), "samples": scan["samples"], "bytes": scan["bytes"],
             "sha256": scan["sha256"]}
    if scan["skipped"]:
        entry["skipped"] = scan["skipped"]
    return entry


def shard_name(url: str, folder: Path) -> str:
    """A local shard under the index's folder by its relative path, another local one by its absolute path, and a
    URL or `pipe:` command as given."""
    if is_remote(url):
        return url
    path = Path(url).resolve()
    try:
        return path.relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(path)

