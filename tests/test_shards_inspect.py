"""`ssl-vit shards inspect` and the index helpers, on shards written from the bundled real test split."""
import hashlib
import json
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import read_tar_images
from ssl_vit.cli import main
from ssl_vit.data.index import index_path_for, read_index, sha256_file, write_index
from ssl_vit.data.inspect import inspect_shards
from ssl_vit.errors import SslVitError


@pytest.fixture
def shard_copy(tmp_path, test_shards) -> Path:
    """A private copy of the session's test shards (4 x 250), safe to corrupt; returns its index path."""
    for path in test_shards.parent.glob("test-*"):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path / test_shards.name


def test_report_counts_match_the_source(test_shards, bundled_test):
    source = read_tar_images(bundled_test)
    expected = Counter(label for _, label in source.values())
    report = inspect_shards(test_shards)
    assert report["shards"] == 4 and report["num_samples"] == 1000 == report["index_num_samples"]
    classes = sorted({name.split("/")[0] for name in source})
    assert [(c["label"], c["name"], c["count"]) for c in report["classes"]] == [
        (i, name, expected[i]) for i, name in enumerate(classes)]
    assert report["formats"] == {"jpg": 1000}
    assert report["sizes"]["most_common"] == [["32x32", 1000]] and report["sizes"]["distinct"] == 1
    assert report["sizes"]["width"] == {"min": 32, "max": 32, "mean": 32.0}
    assert report["bytes"] == sum(p.stat().st_size for p in test_shards.parent.glob("test-*.tar"))
    assert "verify" not in report and "grid" not in report
    prefix = str(test_shards)[: -len("-index.json")]
    assert inspect_shards(prefix) == report  # the OUT prefix finds its index


def test_verify_passes_on_intact_shards(test_shards):
    assert inspect_shards(test_shards, verify=True)["verify"] == {"ok": True, "problems": []}


def flip_byte(shard: Path, offset: int) -> None:
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))


def test_verify_catches_one_flipped_image_byte(shard_copy, capsys):
    shard = shard_copy.parent / "test-000002.tar"
    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".jpg")][100]
    flip_byte(shard, member.offset_data + 200)  # inside the JPEG data: the tar still parses
    report = inspect_shards(shard_copy, verify=True)
    assert not report["verify"]["ok"]
    assert len(report["verify"]["problems"]) == 1
    assert report["verify"]["problems"][0].startswith("test-000002.tar: sha256")
    assert main(["shards", "inspect", str(shard_copy), "--verify"]) == 1
    assert "error: test-000002.tar: sha256" in capsys.readouterr().err


def test_corrupt_tar_header_is_not_a_silently_shorter_shard(shard_copy):
    shard = shard_copy.parent / "test-000001.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[300]
    flip_byte(shard, member.offset + 100)  # in a member header: tarfile alone would just stop reading here
    problems = inspect_shards(shard_copy, verify=True)["verify"]["problems"]
    assert problems[0].startswith("test-000001.tar: sha256")
    assert re.fullmatch(r"test-000001\.tar: shard .*test-000001\.tar is truncated or corrupt after \d+ samples "
                        r"\(.* at byte \d+\)", problems[1])
    with pytest.raises(SslVitError, match=r"test-000001\.tar is truncated or corrupt"):
        inspect_shards(shard_copy)
    shard.write_bytes(shard.read_bytes()[:member.offset])  # truncated at a member boundary
    with pytest.raises(SslVitError, match=r"test-000001\.tar is truncated or corrupt .*no end-of-archive"):
        inspect_shards(shard_copy)


def test_verify_catches_missing_shard_and_wrong_count(shard_copy, capsys):
    (shard_copy.parent / "test-000001.tar").unlink()
    index = read_index(shard_copy)
    index["shards"][3]["samples"] += 1
    index["num_samples"] += 1
    write_index(shard_copy, index)
    problems = inspect_shards(shard_copy, verify=True)["verify"]["problems"]
    assert problems[0].startswith("test-000001.tar: missing")
    assert problems[1] == "test-000003.tar: 250 samples in the tar, 251 in the index"
    assert main(["shards", "inspect", str(shard_copy), "--verify"]) == 1
    err = capsys.readouterr().err
    assert "test-000001.tar: missing" in err and "test-000003.tar: 250 samples" in err
    with pytest.raises(SslVitError, match=r"missing shard: .*test-000001\.tar"):
        inspect_shards(shard_copy)  # without --verify a missing shard is an error too
    assert main(["shards", "inspect", str(shard_copy)]) == 2


def test_grid_png(test_shards, tmp_path):
    png = tmp_path / "sub" / "grid.png"
    report = inspect_shards(test_shards, grid_png=png, grid_n=10)
    assert report["grid"] == {"path": str(png), "samples": 10}
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 200
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    assert pixels.std() > 20  # real images drawn, not a blank canvas
    with pytest.raises(SslVitError, match="grid size must be a positive integer"):
        inspect_shards(test_shards, grid_png=png, grid_n=0)


def test_cli_text_and_json(test_shards, tmp_path, capsys):
    assert main(["shards", "inspect", str(test_shards), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "shards: 4  samples: 1000" in out and "formats: jpg 1000" in out and "verify: OK" in out
    assert "     0  airplane    100" in out
    assert main(["shards", "inspect", str(test_shards), "--json", "--grid", str(tmp_path / "g.png"),
                 "--grid-n", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 1000 and report["grid"]["samples"] == 4 and (tmp_path / "g.png").is_file()
    assert main(["shards", "inspect", str(tmp_path / "nothing")]) == 2
    assert "error: no shard index for" in capsys.readouterr().err


def test_index_helpers(tmp_path, test_shards):
    assert index_path_for("shards/train") == Path("shards/train-index.json")
    shard = test_shards.parent / "test-000000.tar"
    assert sha256_file(shard) == hashlib.sha256(shard.read_bytes()).hexdigest()
    index = read_index(test_shards)
    write_index(tmp_path / "i.json", index)
    assert json.loads((tmp_path / "i.json").read_text()) == index and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("content,match", [
    (None, r"missing shard index: .*i\.json"),
    ("{not json", r"corrupt shard index .*i\.json"),
    ("[1, 2]", r"expected a JSON object"),
    ('{"format": "ssl_vit.shards/1", "shards": []}', r"lacks key\(s\) num_samples, classes, class_counts"),
    ('{"format": "other/2", "shards": [], "num_samples": 0, "classes": [], "class_counts": []}', r"format 'other/2'"),
    ('{"format": "ssl_vit.shards/1", "shards": [{"name": "a.tar"}], "num_samples": 0, "classes": [], '
     '"class_counts": []}', r"shards\[0\] lacks key\(s\) samples, bytes, sha256"),
    ('{"format": "ssl_vit.shards/1", "shards": [{"name": "a.tar", "samples": 3, "bytes": 1, "sha256": "x"}], '
     '"num_samples": 4, "classes": [], "class_counts": []}', r"num_samples 4 != 3"),
])
def test_read_index_errors(tmp_path, content, match):
    if content is not None:
        (tmp_path / "i.json").write_text(content)
    with pytest.raises(SslVitError, match=match):
        read_index(tmp_path / "i.json")
    assert main(["shards", "inspect", str(tmp_path / "i.json")]) == 2
