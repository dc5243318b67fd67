"""`ssl-vit shards write` on the bundled real data, built image folders, CSV/JSONL lists, resume and bad input.

Every check reads the shards back with plain `tarfile` and `hashlib`, independent of the writer.
"""
import errno
import gzip
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, read_tar_images
from ssl_vit.cli import main
from ssl_vit.data.writer import cut_points, parse_size, write_shards
from ssl_vit.errors import SslVitError

KEY = re.compile(r"s[0-9]{9}")


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of one shard, read with tarfile."""
    samples = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def read_all(index: dict, out: Path) -> dict[str, dict[str, bytes]]:
    samples = {}
    for entry in index["shards"]:
        samples.update(read_shard(out.parent / entry["name"]))
    return samples


def image_ext(sample: dict) -> str:
    (ext,) = [e for e in sample if e not in ("cls", "json")]
    return ext


@pytest.fixture(scope="module")
def train_written(tmp_path_factory, bundled_train):
    out = tmp_path_factory.mktemp("w") / "train"
    index = write_shards(str(bundled_train), str(out), max_count=1000, seed=0, workers=2, progress=False)
    return out, index


def test_round_trip_bundled_train(train_written, bundled_train):
    out, index = train_written
    source = read_tar_images(bundled_train)
    assert [e["name"] for e in index["shards"]] == [f"train-{i:06d}.tar" for i in range(5)]
    assert [e["samples"] for e in index["shards"]] == [1000] * 5
    assert index["num_samples"] == 5000 and index["skipped"] == 0 and index["seed"] == 0
    assert index["classes"] == sorted({name.split("/")[0] for name in source})
    assert index["class_counts"] == [500] * 10
    assert json.loads(Path(f"{out}-index.json").read_text()) == index
    seen = Counter()
    for i, entry in enumerate(index["shards"]):
        path = out.parent / entry["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert path.stat().st_size == entry["bytes"]
        shard = read_shard(path)
        assert len(shard) == entry["samples"]
        assert all(KEY.fullmatch(k) and 1000 * i <= int(k[1:]) < 1000 * (i + 1) for k in shard)
        labels = Counter()
        for sample in shard.values():
            assert sorted(sample) == ["cls", "jpg", "json"]
            meta = json.loads(sample["json"])
            src_bytes, src_label = source[meta["path"]]
            assert sample["jpg"] == src_bytes  # RGB JPEGs keep their original bytes
            assert int(sample["cls"].decode("ascii")) == src_label
            assert meta["label"] == index["classes"][src_label]
            assert meta["size"] == [32, 32] and meta["mode"] == "RGB"
            seen[meta["path"]] += 1
            labels[src_label] += 1
        assert len(labels) == 10 and min(labels.values()) >= 60  # shuffled: every shard mixes all classes
    assert seen == Counter({name: 1 for name in source})  # every source image exactly once
    assert not list(out.parent.glob("*.tmp"))


def test_same_seed_is_byte_identical_other_seed_is_not(tmp_path, bundled_test):
    a = write_shards(str(bundled_test), str(tmp_path / "a" / "t"), max_count=300, seed=3, workers=2, progress=False)
    b = write_shards(str(bundled_test), str(tmp_path / "b" / "t"), max_count=300, seed=3, workers=1, progress=False)
    c = write_shards(str(bundled_test), str(tmp_path / "c" / "t"), max_count=300, seed=4, workers=1, progress=False)
    assert [e["samples"] for e in a["shards"]] == [250] * 4  # balanced, none over 300
    for name in (e["name"] for e in a["shards"]):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a == b
    assert [e["sha256"] for e in a["shards"]] != [e["sha256"] for e in c["shards"]]
    paths = {json.loads(s["json"])["path"] for s in read_all(c, tmp_path / "c" / "t").values()}
    assert paths == {json.loads(s["json"])["path"] for s in read_all(a, tmp_path / "a" / "t").values()}


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def gradient(size=(20, 12)) -> np.ndarray:
    y, x = np.mgrid[0:size[1], 0:size[0]]
    return np.stack([x * 12, y * 20, (x + y) * 7], -1).astype(np.uint8)  # [H, W, 3]


def test_image_folder_any_extension_and_mode_becomes_rgb(tmp_path):
    root = tmp_path / "folder"
    rgb = Image.fromarray(gradient())
    save(rgb, root / "cats" / "upper.JPG", format="JPEG")
    save(rgb, root / "cats" / "deep" / "nested.Jpeg", format="JPEG")
    save(rgb.convert("L"), root / "dogs" / "gray.png")
    save(rgb.convert("CMYK"), root / "dogs" / "cmyk.jpg", format="JPEG")
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 4, 8))  # left half fully transparent
    save(rgba, root / "dogs" / "rgba.PNG")
    save(rgb.convert("P"), root / "zebra" / "palette.gif")
    save(rgb, root / "zebra" / "plain.bmp")
    save(rgb, root / "zebra" / "plain.TIFF")
    save(rgb, root / "zebra" / "lossless.webp", lossless=True)
    (root / "zebra" / "notes.txt").write_text("not an image")
    (root / "zebra" / ".DS_Store").write_bytes(b"\0\1")
    index = write_shards(str(root), str(tmp_path / "out" / "f"), max_count=4, workers=1, progress=False)
    assert index["classes"] == ["cats", "dogs", "zebra"]
    assert index["class_counts"] == [2, 3, 4] and index["num_samples"] == 9
    assert [e["samples"] for e in index["shards"]] == [3, 3, 3]
    got = {json.loads(s["json"])["path"]: s for s in read_all(index, tmp_path / "out" / "f").values()}
    assert set(got) == {"cats/upper.JPG", "cats/deep/nested.Jpeg", "dogs/gray.png", "dogs/cmyk.jpg",
                        "dogs/rgba.PNG", "zebra/palette.gif", "zebra/plain.bmp", "zebra/plain.TIFF",
                        "zebra/lossless.webp"}
    decoded = {}
    for path, sample in got.items():
        with Image.open(io.BytesIO(sample[image_ext(sample)])) as img:
            assert img.mode == "RGB", path  # decodes straight to RGB: no conversion needed by readers
            decoded[path] = np.asarray(img)
        meta = json.loads(sample["json"])
        assert int(sample["cls"]) == index["classes"].index(path.split("/")[0]) and meta["label"] == path.split("/")[0]
    exts = {path: image_ext(s) for path, s in got.items()}
    assert exts == {"cats/upper.JPG": "jpg", "cats/deep/nested.Jpeg": "jpg", "dogs/gray.png": "png",
                    "dogs/cmyk.jpg": "jpg", "dogs/rgba.PNG": "png", "zebra/palette.gif": "png",
                    "zebra/plain.bmp": "png", "zebra/plain.TIFF": "png", "zebra/lossless.webp": "webp"}
    modes = {path: json.loads(s["json"])["mode"] for path, s in got.items()}
    assert modes["dogs/gray.png"] == "L" and modes["dogs/cmyk.jpg"] == "CMYK" and modes["dogs/rgba.PNG"] == "RGBA"
    assert modes["zebra/palette.gif"] == "P"
    assert got["cats/upper.JPG"]["jpg"] == (root / "cats" / "upper.JPG").read_bytes()  # already RGB: kept
    assert got["zebra/lossless.webp"]["webp"] == (root / "zebra" / "lossless.webp").read_bytes()
    for lossless in ("zebra/plain.bmp", "zebra/plain.TIFF", "zebra/lossless.webp"):
        assert np.array_equal(decoded[lossless], gradient()), lossless
    gray = np.asarray(rgb.convert("L"))
    assert np.array_equal(decoded["dogs/gray.png"], np.stack([gray] * 3, -1))
    assert (decoded["dogs/rgba.PNG"][:, :4] == 255).all()  # transparent → white background
    assert (decoded["dogs/rgba.PNG"][:, 4:] == [255, 0, 0]).all()
    cmyk_ref = np.asarray(Image.open(root / "dogs" / "cmyk.jpg").convert("RGB"), dtype=np.int16)
    assert np.abs(decoded["dogs/cmyk.jpg"].astype(np.int16) - cmyk_ref).mean() < 3  # re-encoded at quality 95


@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tgz", "w:gz")])
def test_tar_with_a_top_folder(tmp_path, suffix, mode):
    """`tar czf x.tgz train/` archives: the shared top folder is stripped, its sub-folders are the classes."""
    tree = tmp_path / "train"
    save(Image.fromarray(gradient()), tree / "b" / "one.jpg", format="JPEG")
    save(Image.fromarray(gradient()).convert("L"), tree / "a" / "two.png")
    save(Image.fromarray(gradient()), tree / "a" / "._two.png", format="PNG")  # macOS resource fork: hidden
    archive = tmp_path / f"train{suffix}"
    with tarfile.open(archive, mode) as tar:
        tar.add(tree, arcname="./train")
    index = write_shards(str(archive), str(tmp_path / "o"), workers=1, progress=False)
    assert index["classes"] == ["a", "b"] and index["class_counts"] == [1, 1]
    got = {json.loads(s["json"])["path"]: s for s in read_all(index, tmp_path / "o").values()}
    assert set(got) == {"a/two.png", "b/one.jpg"}
    assert got["b/one.jpg"]["jpg"] == (tree / "b" / "one.jpg").read_bytes() and int(got["b/one.jpg"]["cls"]) == 1
    assert not list(tmp_path.glob("*.tmp"))  # the decompressed copy is removed


def test_folder_warning_for_empty_classes(tmp_path):
    """Loose images next to class folders are an error since issue 11: tests/test_unlabeled_sources.py."""
    make_pngs(tmp_path / "src" / "b", 1)
    (tmp_path / "src" / "a").mkdir()
    with pytest.warns(RuntimeWarning) as record:
        index = write_shards(str(tmp_path / "src"), str(tmp_path / "o"), workers=1, progress=False)
    messages = " ".join(str(w.message) for w in record)
    assert "without images get no samples: a (0)" in messages
    assert index["classes"] == ["a", "b"] and index["class_counts"] == [0, 1]


def make_pngs(folder: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        paths.append(save(Image.new("RGB", (6, 6), (i * 20, 0, 0)), folder / f"img{i}.png"))
    return paths


def test_csv_list_with_class_names(tmp_path):
    paths = make_pngs(tmp_path / "imgs", 5)
    rows = ["label,extra,path", "dog,x,imgs/img0.png", "cat,y,imgs/img1.png", "dog,z,imgs/img2.png",
            f"bird,w,{paths[3]}", "cat,v,imgs/img4.png"]  # one absolute path; columns in any order
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    index = write_shards(str(tmp_path / "list.csv"), str(tmp_path / "out" / "c"), workers=1, progress=False)
    assert index["classes"] == ["bird", "cat", "dog"] and index["class_counts"] == [1, 2, 2]
    assert len(index["shards"]) == 1  # 5 tiny images: far below the default 256MB
    samples = read_all(index, tmp_path / "out" / "c").values()
    labels = {json.loads(s["json"])["path"]: (int(s["cls"]), json.loads(s["json"])["label"]) for s in samples}
    assert labels == {"imgs/img0.png": (2, "dog"), "imgs/img1.png": (1, "cat"), "imgs/img2.png": (2, "dog"),
                      str(paths[3]): (0, "bird"), "imgs/img4.png": (1, "cat")}
    by_path = {json.loads(s["json"])["path"]: s["png"] for s in samples}
    assert by_path["imgs/img2.png"] == paths[2].read_bytes()


def test_jsonl_list_with_integer_labels(tmp_path):
    make_pngs(tmp_path / "sub" / "imgs", 3)
    lines = [json.dumps({"path": f"imgs/img{i}.png", "label": lab}) for i, lab in enumerate([3, 0, 3])]
    (tmp_path / "sub" / "list.jsonl").write_text("\n".join(lines) + "\n\n")
    index = write_shards(str(tmp_path / "sub" / "list.jsonl"), str(tmp_path / "j"), workers=1, progress=False)
    assert index["classes"] == ["0", "1", "2", "3"] and index["class_counts"] == [1, 0, 0, 2]
    labels = {json.loads(s["json"])["path"]: int(s["cls"]) for s in read_all(index, tmp_path / "j").values()}
    assert labels == {"imgs/img0.png": 3, "imgs/img1.png": 0, "imgs/img2.png": 3}


def shard_state(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.parent.glob(f"{out.name}-*.tar"))}


def test_resume_keeps_finished_shards_and_rewrites_the_rest(tmp_path, bundled_test):
    out = tmp_path / "r" / "t"
    first = write_shards(str(bundled_test), str(out), max_count=250, workers=1, progress=False)
    before = shard_state(out)
    (out.parent / "t-000002.tar").unlink()
    (out.parent / "t-000002.tar.tmp").write_bytes(b"partial shard from a killed run")
    Path(f"{out}-index.json").unlink()
    time.sleep(0.01)
    again = write_shards(str(bundled_test), str(out), max_count=250, workers=2, progress=False)
    after = shard_state(out)
    assert again == first and set(after) == set(before)
    for name in set(before) - {"t-000002.tar"}:
        assert after[name] == before[name]  # kept shards untouched: same mtime, same bytes
    assert after["t-000002.tar"][1] == before["t-000002.tar"][1]  # the rewritten shard is byte-identical
    assert not list(out.parent.glob("*.tmp"))

    with pytest.raises(SslVitError, match=r"t-plan\.json holds another plan \(seed 0, now 1\).*--overwrite"):
        write_shards(str(bundled_test), str(out), max_count=250, seed=1, workers=1, progress=False)
    assert shard_state(out) == after  # a refused plan touches nothing
    other = write_shards(str(bundled_test), str(out), max_count=500, seed=1, workers=1, progress=False,
                         overwrite=True)
    assert sorted(p.name for p in out.parent.glob("t-*.tar")) == ["t-000000.tar", "t-000001.tar"]
    assert other["seed"] == 1 and json.loads(Path(f"{out}-plan.json").read_text())["max_count"] == 500


def test_existing_shards_without_plan_are_not_adopted(tmp_path, bundled_test):
    out = tmp_path / "t"
    (tmp_path / "t-000000.tar").write_bytes(b"someone else's shard")
    with pytest.raises(SslVitError, match=r"t-000000\.tar exists but .*t-plan\.json does not.*--overwrite"):
        write_shards(str(bundled_test), str(out), max_count=500, workers=1, progress=False)


def test_damaged_kept_shard_is_an_error_on_resume(tmp_path, bundled_test):
    out = tmp_path / "t"
    write_shards(str(bundled_test), str(out), max_count=500, workers=1, progress=False)
    shard = tmp_path / "t-000001.tar"
    shard.write_bytes(shard.read_bytes()[:50_000])
    with pytest.raises(SslVitError, match=r"existing shard .*t-000001\.tar does not hold this plan's samples"):
        write_shards(str(bundled_test), str(out), max_count=500, workers=1, progress=False)


def open_fifo_when_read(fifo: Path, proc: subprocess.Popen, timeout: float = 300) -> int:
    """Wait (on the event, not on a clock) until `proc` opens `fifo` for reading; returns our write end."""
    deadline = time.monotonic() + timeout  # only against a hang: the writer gets there at any speed
    while time.monotonic() < deadline:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader has it open
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
        assert proc.poll() is None, "the writer ended before it reached the blocking image"
        time.sleep(0.01)
    raise AssertionError(f"the writer never opened {fifo}")


def test_killed_write_resumes_to_the_clean_result(tmp_path, bundled_test):
    """SIGKILL a real writer while it is blocked reading one image (a FIFO in its list): the shards before that
    image's shard are complete under their final names, the one being written is not there, the re-run keeps the
    finished ones and gives the clean result."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = []
    for i, (name, (data, _)) in enumerate(sorted(read_tar_images(bundled_test).items())[:400]):
        names.append(f"imgs/{i:03d}.jpg")
        (tmp_path / names[-1]).write_bytes(data)
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    blocking = tmp_path / names[123]
    real = blocking.read_bytes()
    blocking.unlink()
    os.mkfifo(blocking)

    out = tmp_path / "k" / "t"
    code = (f"from ssl_vit.data.writer import write_shards; "
            f"write_shards({str(tmp_path / 'list.txt')!r}, {str(out)!r}, max_count=20, workers=1, progress=False)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, start_new_session=True)
    try:
        fd = open_fifo_when_read(blocking, proc)
        os.killpg(proc.pid, signal.SIGKILL)  # blocked in that image's read: mid-shard, deterministically
        proc.wait()
        os.close(fd)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    plan = json.loads(Path(f"{out}-plan.json").read_text())
    (blocked,) = [e["index"] for e in plan["shards"] if any(ref == names[123] for ref, _ in e["samples"])]
    assert 2 <= blocked < 19  # fixed by the seed: shards before it, and after it
    survivors = shard_state(out)
    assert sorted(survivors) == [f"t-{i:06d}.tar" for i in range(blocked)]  # every finished shard, no partial one
    assert not Path(f"{out}-index.json").exists()

    blocking.unlink()
    blocking.write_bytes(real)
    clean = write_shards(str(tmp_path / "list.txt"), str(tmp_path / "clean" / "t"), max_count=20, workers=1,
                         progress=False)
    expected = {e["name"]: e["sha256"] for e in clean["shards"]}
    for name, (_, data) in survivors.items():
        assert hashlib.sha256(data).hexdigest() == expected[name]  # complete, never partial
    resumed = write_shards(str(tmp_path / "list.txt"), str(out), max_count=20, workers=1, progress=False)
    assert resumed == clean
    assert {k: v for k, v in shard_state(out).items() if k in survivors} == survivors
    assert not list(out.parent.glob("*.tmp"))


def corrupt_folder(root: Path) -> None:
    make_pngs(root / "a", 3)
    (root / "b").mkdir()
    (root / "b" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    buf = io.BytesIO()
    Image.fromarray(gradient((64, 64))).save(buf, format="JPEG")
    (root / "b" / "truncated.jpg").write_bytes(buf.getvalue()[:300])
    save(Image.new("RGB", (5, 5), (0, 9, 0)), root / "b" / "good.png")


def test_corrupt_images_are_skipped_counted_and_named(tmp_path):
    corrupt_folder(tmp_path / "src")
    with pytest.warns(RuntimeWarning) as record:
        index = write_shards(str(tmp_path / "src"), str(tmp_path / "o"), workers=1, progress=False)
    messages = " ".join(str(w.message) for w in record)
    assert "skipped b/garbage.jpg" in messages and "skipped b/truncated.jpg" in messages
    assert index["skipped"] == 2 and index["num_samples"] == 4 and index["class_counts"] == [3, 1]
    assert len(read_all(index, tmp_path / "o")) == 4


def test_csv_row_with_missing_file_is_skipped(tmp_path):
    make_pngs(tmp_path, 2)
    (tmp_path / "l.csv").write_text("path,label\nimg0.png,a\nimg1.png,b\nnope.png,b\n")
    with pytest.warns(RuntimeWarning, match="skipped nope.png"):
        index = write_shards(str(tmp_path / "l.csv"), str(tmp_path / "o"), workers=1, progress=False)
    assert index["skipped"] == 1 and index["num_samples"] == 2 and index["class_counts"] == [1, 1]


@pytest.mark.parametrize("setup,match", [
    (lambda p: None, r"source not found: .*missing_src"),
    (lambda p: (p / "missing_src").mkdir(), r"no images in .*missing_src"),
    (lambda p: ((p / "missing_src" / "cls").mkdir(parents=True), (p / "missing_src" / "cls" / "a.txt").write_text("x")),
     r"no images in .*missing_src"),
])
def test_missing_or_empty_source(tmp_path, setup, match):
    setup(tmp_path)
    with pytest.raises(SslVitError, match=match):
        write_shards(str(tmp_path / "missing_src"), str(tmp_path / "o"), workers=1, progress=False)


@pytest.mark.parametrize("name,text,match", [
    ("l.csv", "file,label\na.png,1\n", r"l\.csv: CSV header lacks column 'path'"),
    ("l.csv", "path,class\na.png,1\n", r"no readable images in .*l\.csv: all 1 listed files"),  # unlabeled list
    ("l.csv", "", r"l\.csv: CSV header lacks column 'path'"),
    ("l.csv", "path,label\n", r"no images in .*l\.csv"),
    ("l.csv", "path,label\na.png,-1\n", r"l\.csv:2: integer labels must be >= 0"),
    ("l.jsonl", '{"path": "a.png"}\n{"path": "b.png", "label": 1}\n', r"l\.jsonl:1: object lacks key 'label'"),
    ("l.jsonl", '{"label": 1}\n', r"l\.jsonl:1: expected an object with key 'path'"),
    ("l.jsonl", '{"path": "a.png", "label": 1}\nnot json\n', r"l\.jsonl:2: not JSON"),
    ("l.jsonl", '{"path": "a.png", "label": 1.5}\n', r"l\.jsonl:1: label must be a class name or an integer"),
])
def test_bad_lists(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(SslVitError, match=match):
        write_shards(str(tmp_path / name), str(tmp_path / "o"), workers=1, progress=False)


def test_all_images_unreadable(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.png").write_bytes(b"not a png")
    with pytest.warns(RuntimeWarning, match="skipped a/x.png"), \
            pytest.raises(SslVitError, match=r"no readable images in .*src: all 1 were skipped"):
        write_shards(str(tmp_path / "src"), str(tmp_path / "o"), workers=1, progress=False)


def test_bad_options(tmp_path, bundled_test):
    for kwargs, match in [({"max_size": "12XB"}, "max size '12XB'"), ({"max_count": 0}, "max count"),
                          ({"max_size": 0}, "must be positive"), ({"workers": -1}, "workers must be an integer >= 0"),
                          ({"seed": -3}, "seed must be an integer >= 0"), ({"max_count": 2.5}, "max count")]:
        with pytest.raises(SslVitError, match=match):
            write_shards(str(bundled_test), str(tmp_path / "o"), progress=False, **kwargs)
    with pytest.raises(SslVitError, match="is a folder"):
        write_shards(str(bundled_test), str(tmp_path), progress=False)
    (tmp_path / "list.lst").write_text("a.png,1\n")
    with pytest.raises(SslVitError, match=r"unsupported source .*list\.lst"):
        write_shards(str(tmp_path / "list.lst"), str(tmp_path / "o"), progress=False)
    (tmp_path / "bad.tar.gz").write_bytes(gzip.compress(b"not a tar" * 100))
    with pytest.raises(SslVitError, match=r"cannot read tar .*bad\.tar\.gz"):
        write_shards(str(tmp_path / "bad.tar.gz"), str(tmp_path / "o"), progress=False)


def test_sizes_and_cut_points():
    assert parse_size("256MB") == 256 * 10**6 and parse_size("1.5 KiB") == 1536 and parse_size(7) == 7
    assert parse_size("3gb") == 3 * 10**9
    assert cut_points([1] * 10, 4, 10**9) == [0, 3, 6, 10]  # 3 shards of 3-4, none over 4
    big = 10**6
    assert cut_points([big] * 10, None, 2 * big + 20 * 512) == [0, 2, 4, 6, 8, 10]
    assert cut_points([5 * big, 1, 1], None, big) == [0, 1, 2, 3]  # an oversized image gets its own shard


def test_size_limit_on_real_data(tmp_path, bundled_test):
    index = write_shards(str(bundled_test), str(tmp_path / "s"), max_size="1MB", workers=1, progress=False)
    assert all(e["bytes"] <= 10**6 for e in index["shards"])
    counts = [e["samples"] for e in index["shards"]]
    assert sum(counts) == 1000 and max(counts) - min(counts) <= 1 and len(counts) >= 4


def test_cli_write_and_bad_source(tmp_path, bundled_test, capsys):
    folder = tmp_path / "src"
    corrupt_folder(folder)
    out = tmp_path / "cli" / "x"
    assert main(["shards", "write", str(folder), str(out), "--max-count", "2", "--no-progress", "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "wrote 3 shards, 4 samples (a 3, b 1)" in captured.out and "skipped 2" in captured.out
    assert "warning: skipped b/garbage.jpg" in captured.err
    assert main(["shards", "write", str(tmp_path / "nope"), str(out), "--no-progress"]) == 2
    assert "error: source not found:" in capsys.readouterr().err
    assert main(["shards", "write", str(folder), str(out), "--max-size", "1TBX", "--no-progress"]) == 2
    assert "error: max size '1TBX'" in capsys.readouterr().err
