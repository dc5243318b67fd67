"""`ssl-vit index query`: image files embedded as the index's features were find themselves; the result grid;
one-line errors for bad images, backbones and dims."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vit.cli import main
from ssl_vit.data.samples import IMAGE_KEYS, read_shard
from ssl_vit.data.sources import expand_source
from ssl_vit.eval.feature_cache import save_features
from ssl_vit.eval.retrieval import GRID_CELL_PX, GRID_ROW_PX
from ssl_vit.models.backbone import BackboneSpec, create_backbone
from ssl_vit.models.export import export_backbone


def tiny_backbone(path: Path, embed_dim: int = 64) -> Path:
    torch.manual_seed(0)
    spec = BackboneSpec(img_size=32, patch_size=4, kwargs=dict(depth=2, embed_dim=embed_dim, num_heads=2))
    return export_backbone(create_backbone(spec), spec, path, extra_meta={"method": "mae"})


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, test_shards):
    """A flat cosine index of the test shards' features (resize 40: not the default, so it must be recorded)."""
    root = tmp_path_factory.mktemp("index_query")
    backbone = tiny_backbone(root / "backbone.safetensors")
    assert main(["features", "--backbone", str(backbone), "--shards", str(test_shards), "--out", str(root / "feats"),
                 "--pooling", "avg", "--resize", "40", "--workers", "1", "--no-progress"]) == 0
    assert main(["index", "build", "--features", str(root / "feats"), "--out", str(root / "ix")]) == 0
    return root


def stored_image(test_shards, tmp_path, position: int) -> tuple[Path, str]:
    """The image bytes of one indexed sample, written to a file exactly as the shard stores them; (file, key)."""
    sample = read_shard(expand_source(str(test_shards)).urls[0])[position]
    ext = next(k for k in IMAGE_KEYS if k in sample)
    path = tmp_path / f"query{position}.{ext}"
    path.write_bytes(sample[ext])
    return path, sample["__key__"]


def results(out: str) -> dict:
    """{query: [(rank, score, label, key)]} from the printed tables."""
    tables, query = {}, None
    for line in out.splitlines():
        if line.startswith("query "):
            query = line[len("query "):-1]
            tables[query] = []
        elif query is not None and line.split()[0].isdigit():
            rank, score, label, key = line.split()
            tables[query].append((int(rank), float(score), label, key))
    return tables


def test_query_image_finds_itself_with_class_names(indexed, test_shards, tmp_path, capsys):
    classes = json.loads(test_shards.read_text())["classes"]
    image, key = stored_image(test_shards, tmp_path, 3)
    capsys.readouterr()
    assert main(["index", "query", "--index", str(indexed / "ix"), "--image", str(image), "-k", "3"]) == 0
    table = results(capsys.readouterr().out)[str(image)]
    assert [row[0] for row in table] == [1, 2, 3]
    assert table[0][3] == key and table[0][1] == pytest.approx(1.0, abs=1e-4)
    assert table[1][1] < 0.9999  # the next result is another image, not a tie
    assert all(label in classes for _, _, label, _ in table)
    meta = json.loads((indexed / "ix" / "meta.json").read_text())["source"]
    assert meta["resize"] == 40 and meta["pooling"] == "avg" and meta["image_size"] == 32 and meta["classes"] == classes


def test_grid_has_one_row_per_query_and_default_k(indexed, test_shards, tmp_path, capsys):
    images = [stored_image(test_shards, tmp_path, i) for i in (0, 7)]
    argv = ["index", "query", "--index", str(indexed / "ix"), "--grid", str(tmp_path / "grid.png")]
    capsys.readouterr()
    assert main(argv + [arg for path, _ in images for arg in ("--image", str(path))]) == 0
    tables = results(capsys.readouterr().out)
    assert [tables[str(path)][0][3] for path, _ in images] == [key for _, key in images]
    assert all(len(table) == 10 for table in tables.values())
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.format == "PNG" and grid.size == ((1 + 10) * GRID_CELL_PX, 2 * GRID_ROW_PX)


def test_query_by_key_uses_the_indexed_cache(indexed, test_shards, tmp_path, capsys):
    _, key = stored_image(test_shards, tmp_path, 5)
    capsys.readouterr()
    assert main(["index", "query", "--index", str(indexed / "ix"), "--key", key, "--k", "2",
                 "--grid", str(tmp_path / "keys.png")]) == 0
    table = results(capsys.readouterr().out)[key]
    assert table[0][3] == key and table[0][1] == pytest.approx(1.0, abs=1e-5) and len(table) == 2
    with Image.open(tmp_path / "keys.png") as grid:
        assert grid.size == (3 * GRID_CELL_PX, GRID_ROW_PX)


def error_of(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    return err


def test_bad_images_backbones_and_dims_are_one_line_errors(indexed, tmp_path, capsys):
    query = ["index", "query", "--index", str(indexed / "ix")]
    missing = tmp_path / "nope.jpg"
    assert str(missing) in error_of(query + ["--image", str(missing)], capsys)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert f"image file {text} is not a readable image" in error_of(query + ["--image", str(text)], capsys)

    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(good)
    err = error_of(query + ["--image", str(good), "--backbone", str(tmp_path / "none.safetensors")], capsys)
    assert f"backbone {tmp_path / 'none.safetensors'} does not exist" in err
    wide = tiny_backbone(tmp_path / "wide.safetensors", embed_dim=32)
    err = error_of(query + ["--image", str(good), "--backbone", str(wide)], capsys)
    assert f"index {indexed / 'ix'} holds 64-d features but backbone {wide} gives 32-d" in err
    err = error_of(query + ["--image", str(good), "--backbone", "timm-random:vit_tiny_patch16_224"], capsys)
    assert f"backbone timm-random:vit_tiny_patch16_224 takes 224-px images; index {indexed / 'ix'} holds " \
           "features of 32-px images" in err  # a timm name is a backbone, not a missing file
    with pytest.raises(SystemExit):  # --image and --key exclude each other (argparse usage error)
        main(query + ["--image", str(good), "--key", "x"])

    rng = np.random.default_rng(0)  # a cache saved by hand records no backbone or view
    save_features(tmp_path / "bare", rng.normal(size=(50, 8)).astype(np.float32), np.zeros(50, np.int64),
                  [f"k{i}" for i in range(50)], {"pooling": "cls"})
    assert main(["index", "build", "--features", str(tmp_path / "bare"), "--out", str(tmp_path / "bare_ix")]) == 0
    err = error_of(["index", "query", "--index", str(tmp_path / "bare_ix"), "--image", str(good)], capsys)
    assert f"index {tmp_path / 'bare_ix'} does not record how its features were made" in err
