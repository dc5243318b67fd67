"""`ssl-vit shards index` on shards that other tools wrote: img2dataset's layout and webdataset's own writers, from a
brace pattern, a glob and a `pipe:` URL, in a process pool and in-process; damaged or missing input named in one line.

The shards are written here with webdataset's `ShardWriter`/`TarWriter` from the bundled CIFAR-10 test images; the
expected counts come from what the test wrote, checksums from hashlib over the files.
"""
import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset
from PIL import Image

from conftest import BUNDLED
from ssl_vit.cli import main
from ssl_vit.data.index import index_is_labeled, read_index
from ssl_vit.data.sources import expand_source

PER_SHARD = 25
NO_IMAGE = {17, 58, 59}  # img2dataset writes json + txt for failed downloads
NOT_IMAGES = ("__key__", "json", "txt")


def bundled_images(n: int) -> list[tuple[bytes, int]]:
    """(JPEG bytes, class index) of n bundled test images, classes interleaved."""
    with tarfile.open(BUNDLED / "test.tar.gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        classes = sorted({m.name.split("/")[0] for m in members})
        members.sort(key=lambda m: (m.name.split("/")[1], m.name))
        return [(tar.extractfile(m).read(), classes.index(m.name.split("/")[0])) for m in members[:n]]


def reencode(data: bytes, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, format=fmt)
    return out.getvalue()


def img2dataset_sample(i: int, data: bytes) -> dict:
    """What img2dataset writes: <key>.jpg + <key>.json + <key>.txt, no cls; here also other image keys."""
    key = f"{i:09d}"
    meta = {"url": f"https://example.com/{key}.jpg", "key": key, "caption": f"photo {i}", "width": 32, "height": 32,
            "status": "success" if i not in NO_IMAGE else "failed_to_download"}
    sample = {"__key__": key, "json": json.dumps(meta).encode(), "txt": f"photo {i}".encode()}
    if i not in NO_IMAGE:
        ext = {3: "JPG", 5: "png", 7: "webp", 9: "jpeg"}.get(i % 10, "jpg")
        sample[ext] = reencode(data, {"png": "PNG", "webp": "WEBP"}[ext]) if ext in ("png", "webp") else data
    return sample


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> tuple[Path, list[dict]]:
    """4 img2dataset-style shards of 25 samples (3 without an image) written by webdataset's ShardWriter."""
    folder = tmp_path_factory.mktemp("foreign")
    samples = [img2dataset_sample(i, data) for i, (data, _) in enumerate(bundled_images(4 * PER_SHARD))]
    with webdataset.ShardWriter(str(folder / "part-%06d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    assert sorted(p.name for p in folder.glob("*.tar")) == [f"part-{i:06d}.tar" for i in range(4)]
    return folder, samples


def expected_shards(folder: Path, samples: list[dict], names) -> list[dict]:
    shards = []
    for j in range(4):
        path = folder / f"part-{j:06d}.tar"
        chunk = samples[j * PER_SHARD:(j + 1) * PER_SHARD]
        entry = {"name": names(path), "samples": sum(1 for s in chunk if set(s) - set(NOT_IMAGES)),
                 "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        skipped = PER_SHARD - entry["samples"]
        shards.append({**entry, "skipped": skipped} if skipped else entry)
    return shards


@pytest.mark.parametrize("how", ["brace", "glob", "pipe", "elsewhere"])
def test_index_img2dataset_shards(foreign, tmp_path, capsys, how):
    folder, samples = foreign
    pattern = {"brace": f"{folder}/part-{{000000..000003}}.tar", "glob": f"{folder}/part-*.tar",
               "pipe": f"pipe:cat {folder}/part-{{000000..000003}}.tar", "elsewhere": f"{folder}/part-*.tar"}[how]
    out = (tmp_path if how == "elsewhere" else folder) / f"{how}-index.json"
    names = {"pipe": lambda p: f"pipe:cat {p}", "elsewhere": str}.get(how, lambda p: p.name)
    workers = ["--workers", "0"] if how == "glob" else []
    assert main(["shards", "index", pattern, "--out", str(out), "--no-progress", *workers]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"indexed 4 shards, 97 samples (unlabeled); index {out}"
    assert captured.err.strip() == ("skipped 3 samples without an image or with an unreadable label "
                                    f"({names(folder / 'part-000000.tar')} 1, {names(folder / 'part-000002.tar')} 2)")
    index = read_index(out)
    assert index["shards"] == expected_shards(folder, samples, names)
    assert index["num_samples"] == 97 and index["skipped"] == 3 and index["source"] == pattern
    assert index["labeled"] is False and index["classes"] == [] and index["class_counts"] == []
    assert "unlabeled_samples" not in index and not index_is_labeled(index)
    if how == "pipe":
        assert main(["shards", "inspect", str(out)]) == 2
        assert "is not a local file: inspect reads local shards only" in capsys.readouterr().err
    else:  # the index is a shard source with known sample counts, and inspect verifies it
        # The stream addresses a shard's samples by position among all of them, image or not (it skips those 3)
        assert expand_source(str(out)).num_samples == 100
        assert main(["shards", "inspect", str(out), "--verify", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        images = [next(k for k in s if k not in NOT_IMAGES) for s in samples if set(s) - set(NOT_IMAGES)]
        formats = Counter(ext.lower() for ext in images)
        assert report["verify"]["ok"] and report["labeled"] is False
        assert report["formats"] == {**formats, "(no image)": 3}


def test_progress_bar_counts_shards(foreign, tmp_path, capsys):
    folder, _ = foreign
    assert main(["shards", "index", f"{folder}/part-*.tar", "--out", str(tmp_path / "i.json"), "--workers", "2"]) == 0
    assert "4/4" in capsys.readouterr().err
    assert main(["shards", "index", f"{folder}/part-*.tar", "--out", str(tmp_path / "j.json"), "--no-progress"]) == 0
    assert "4/4" not in capsys.readouterr().err
    assert read_index(tmp_path / "i.json")["shards"] == read_index(tmp_path / "j.json")["shards"]


def test_labels_all_some_none(tmp_path, capsys):
    """webdataset's TarWriter with an integer cls on every sample: classes 0..max; on some: unlabeled, counted."""
    images = bundled_images(60)
    with webdataset.TarWriter(str(tmp_path / "labelled.tar")) as sink:
        for i, (data, label) in enumerate(images[:40]):
            sink.write({"__key__": f"a{i:04d}", "jpg": data, "cls": label})
    with webdataset.TarWriter(str(tmp_path / "partly.tar")) as sink:
        for i, (data, label) in enumerate(images[40:]):
            sink.write({"__key__": f"b{i:04d}", "jpg": data, **({"cls": label} if i % 4 else {})})
    assert main(["shards", "index", str(tmp_path / "labelled.tar"), "--out", str(tmp_path / "l.json"),
                 "--no-progress"]) == 0
    index = read_index(tmp_path / "l.json")
    counts = [sum(1 for _, label in images[:40] if label == c) for c in range(10)]
    assert index["labeled"] is True and index["classes"] == [str(c) for c in range(10)]
    assert index["class_counts"] == counts and index_is_labeled(index)
    assert "(10 classes)" in capsys.readouterr().out

    assert main(["shards", "index", f"{tmp_path}/{{labelled,partly}}.tar", "--out", str(tmp_path / "p.json"),
                 "--no-progress"]) == 0
    index = read_index(tmp_path / "p.json")
    assert [e["samples"] for e in index["shards"]] == [40, 20] and index["num_samples"] == 60
    assert index["labeled"] is False and index["classes"] == [] and index["unlabeled_samples"] == 5
    assert "(unlabeled: 5 samples lack a cls)" in capsys.readouterr().out


def test_bad_input_is_one_line(foreign, tmp_path, capsys):
    folder, _ = foreign
    data = (folder / "part-000001.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2 + 100])
    cases = [
        (f"{tmp_path}/nothing-*.tar", f"shard pattern matches nothing: {tmp_path}/nothing-*.tar"),
        (f"{tmp_path}/part-{{000000..000001}}.tar", f"missing shard: {tmp_path}/part-000000.tar"),
        (str(tmp_path / "cut.tar"),
         f"cannot index a damaged shard: shard {tmp_path}/cut.tar is truncated or corrupt after"),
        (f"pipe:cat {tmp_path}/absent.tar", f"cannot read shard pipe:cat {tmp_path}/absent.tar"),
    ]
    for pattern, message in cases:
        out = tmp_path / "x-index.json"
        assert main(["shards", "index", pattern, "--out", str(out), "--no-progress", "--workers", "2"]) == 2, pattern
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
        assert not out.exists()
    assert main(["shards", "index", str(tmp_path / "cut.tar"), "--out", str(tmp_path / "x.txt")]) == 2
    assert "must end in .json" in capsys.readouterr().err
