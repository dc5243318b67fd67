"""`index build` in bounded memory from memory-mapped caches: the parts of a real two-process `features --per-rank`
run give the same results as one index over the whole cache; `--refine` puts an indexed image first; numpy memory
stays far below the feature matrix."""
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_vit.cli import main
from ssl_vit.eval.feature_cache import load_features, open_rows, save_features
from ssl_vit.eval.index_build import ConcatRows, Part
from ssl_vit.eval.retrieval import RetrievalIndex
from ssl_vit.models.backbone import BackboneSpec, create_backbone
from ssl_vit.models.export import export_backbone


@pytest.fixture(scope="module")
def rank_parts(tmp_path_factory, test_shards):
    """The test shards' features from a real 2-process `features --per-rank` run (out/part-00000, out/part-00001),
    and `whole`: the same rows saved as one cache."""
    root = tmp_path_factory.mktemp("index_parts")
    torch.manual_seed(0)
    spec = BackboneSpec(img_size=32, patch_size=4, kwargs=dict(depth=2, embed_dim=64, num_heads=2))
    backbone = export_backbone(create_backbone(spec), spec, root / "backbone.safetensors")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ssl_vit.cli"]
    run = subprocess.run(launch + ["features", "--backbone", str(backbone), "--shards", str(test_shards),
                                   "--out", str(root / "parts"), "--per-rank", "--batch-size", "64",
                                   "--workers", "1", "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    parts = sorted((root / "parts").iterdir())
    assert [p.name for p in parts] == ["part-00000", "part-00001"] and not (root / "parts.parts").exists()
    caches = [load_features(p) for p in parts]
    assert [c.meta["num_processes"] for c in caches] == [2, 2] and [c.meta["part"] for c in caches] == [0, 1]
    assert all(c.keys == sorted(c.keys) for c in caches) and not set(caches[0].keys) & set(caches[1].keys)
    save_features(root / "whole", np.concatenate([c.features for c in caches]),
                  np.concatenate([c.labels for c in caches]), caches[0].keys + caches[1].keys, caches[0].meta)
    return root, parts


def neighbours(index_dir: Path, queries, k: int = 10):
    index = RetrievalIndex.load(index_dir)
    scores, ids = index.search(queries, k)
    return scores, [[key for key, _ in index.lookup(row)] for row in ids]


def assert_same_results(index_dir: Path, whole_dir: Path, cache: Path) -> list:
    """Every cached row queried against both indexes: the same keys in the same order, the same scores; returns the
    whole index's keys."""
    queries = load_features(cache).features
    scores, keys = neighbours(index_dir, queries)
    scores_whole, keys_whole = neighbours(whole_dir, queries)
    assert keys == keys_whole
    np.testing.assert_allclose(scores, scores_whole, rtol=0, atol=1e-5)
    return keys_whole


@pytest.mark.slow
@pytest.mark.parametrize("kind, options", [("flat", []), ("ivfpq", ["--nlist", "8", "--m", "16", "--nbits", "6",
                                                                   "--refine", "flat"]),
                                           ("ivf", ["--nlist", "8", "--nprobe", "2"])])
def test_parts_of_a_two_process_run_index_as_the_whole_cache(rank_parts, tmp_path, kind, options):
    root, parts = rank_parts
    common = ["index", "build", "--kind", kind, *options]
    assert main(common + ["--features", *map(str, parts), "--out", str(tmp_path / "from_parts")]) == 0
    assert main(common + ["--features", str(root / "whole"), "--out", str(tmp_path / "whole")]) == 0
    keys_whole = assert_same_results(tmp_path / "from_parts", tmp_path / "whole", root / "whole")
    meta = json.loads((tmp_path / "from_parts" / "meta.json").read_text())
    assert meta["key_runs"] == [0, len(load_features(parts[0])), 1000] and meta["num"] == 1000
    assert meta["source"]["features"] == [str(p.resolve()) for p in parts]
    index = RetrievalIndex.load(tmp_path / "from_parts")
    some = [keys_whole[i][0] for i in (0, 500, 999)]
    assert [index.key(i) for i in index.find(some + ["no-such-key"])[:3]] == some
    assert index.find(["no-such-key"]).tolist() == [-1]


def test_refine_puts_an_indexed_item_first(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32))
    x = (centres[rng.integers(0, 20, 3000)] + 0.15 * rng.normal(size=(3000, 32))).astype(np.float32)
    keys = [f"k{i:05d}" for i in range(len(x))]
    save_features(tmp_path / "c", x, np.zeros(len(x), np.int64), keys, {"pooling": "cls"})
    base = ["index", "build", "--features", str(tmp_path / "c"), "--kind", "ivfpq", "--nlist", "16",
            "--m", "4", "--nbits", "6"]
    assert main(base + ["--out", str(tmp_path / "pq")]) == 0
    assert main(base + ["--refine", "flat", "--k-factor", "64", "--out", str(tmp_path / "fine")]) == 0
    assert main(base + ["--refine", "sq8", "--out", str(tmp_path / "sq8")]) == 0
    queries = x[:300]
    first = {name: RetrievalIndex.load(tmp_path / name).search(queries, 5) for name in ("pq", "fine", "sq8")}
    assert (first["pq"][1][:, 0] == np.arange(300)).mean() < 0.8  # compressed distances miss the item itself
    np.testing.assert_array_equal(first["fine"][1][:, 0], np.arange(300))
    np.testing.assert_allclose(first["fine"][0][:, 0], 1.0, atol=1e-5)
    assert (first["sq8"][1][:, 0] == np.arange(300)).mean() > 0.95
    params = json.loads((tmp_path / "fine" / "meta.json").read_text())["params"]
    assert params["refine"] == "flat" and params["k_factor"] == 64


def test_build_reads_the_cache_a_chunk_at_a_time(tmp_path):
    """With 4,096-row chunks, numpy's allocations (traced) stay under a quarter of the 41 MB matrix: no normalised
    copy of it, no training on every row (FAISS's own memory, the index itself, is not traced)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80_000, 128)).astype(np.float32)
    save_features(tmp_path / "c", x, np.zeros(len(x), np.int64), [f"k{i:06d}" for i in range(len(x))],
                  {"pooling": "cls"})
    del x
    features, keys, labels, _ = open_rows(tmp_path / "c")

    tracemalloc.start()
    RetrievalIndex.build_from_parts([Part(features, keys, labels)], "ivfpq", chunk=4096, nlist=32, m=16, nbits=6)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.25 * features.nbytes, peak


def test_keys_and_labels_stay_the_caches_memmaps_until_saved(tmp_path):
    parts = []
    for i, keys in enumerate([["a", "c", "e"], ["b", "dd"]]):
        save_features(tmp_path / f"p{i}", np.eye(3, 4, i, dtype=np.float32)[:len(keys)], np.arange(len(keys)) + i,
                      keys, {"pooling": "cls"})
        features, rows, labels, _ = open_rows(tmp_path / f"p{i}")
        parts.append(Part(features, rows, labels))
    index = RetrievalIndex.build_from_parts(parts, "flat")
    assert isinstance(index.keys, ConcatRows) and all(isinstance(a, np.memmap) for a in index.keys.arrays)
    assert index.keys[3] == b"b" and list(index.keys[1:3]) == [b"c", b"e"] and list(index.keys[[4, 0]]) == [b"dd", b"a"]
    assert index.find(["dd", "a", "c", "zz"]).tolist() == [4, 0, 1, -1]
    index.save(tmp_path / "ix")
    loaded = RetrievalIndex.load(tmp_path / "ix")
    assert loaded.keys.tolist() == [b"a", b"c", b"e", b"b", b"dd"] and loaded.labels.tolist() == [0, 1, 2, 1, 2]
    assert loaded.lookup([4, -1]) == [("dd", 2), (None, None)]


@pytest.mark.slow
def test_train_once_fill_each_part_apart_and_merge_equals_the_whole(rank_parts, tmp_path):
    """FAISS's three steps as three commands (each part filled by a command that reads only that part)."""
    root, parts = rank_parts
    options = ["--kind", "ivfpq", "--nlist", "8", "--m", "16", "--nbits", "6"]
    assert main(["index", "build", "--features", *map(str, parts), "--out", str(tmp_path / "trained"),
                 "--train-only", *options]) == 0
    assert RetrievalIndex.load(tmp_path / "trained").index.ntotal == 0
    for i, part in enumerate(parts):
        assert main(["index", "build", "--features", str(part), "--trained", str(tmp_path / "trained"),
                     "--out", str(tmp_path / f"filled{i}"), *options]) == 0
    assert main(["index", "merge", str(tmp_path / "filled0"), str(tmp_path / "filled1"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert main(["index", "build", "--features", str(root / "whole"), "--out", str(tmp_path / "whole"),
                 *options]) == 0
    assert_same_results(tmp_path / "merged", tmp_path / "whole", root / "whole")
    merged = json.loads((tmp_path / "merged" / "meta.json").read_text())
    assert merged["num"] == 1000 and merged["source"]["image_table"] == 1000  # thumbnails of the merged index
    assert merged["source"]["features"] == [str(p.resolve()) for p in parts]
    assert main(["index", "build", "--features", str(parts[1]), "--out", str(tmp_path / "flat")]) == 0
    err = main(["index", "merge", str(tmp_path / "filled0"), str(tmp_path / "flat"), "--out", str(tmp_path / "x")])
    assert err == 2 and not (tmp_path / "x").exists()  # not filled from the same trained index
    assert main(["index", "build", "--features", str(parts[0]), "--out", str(tmp_path / "y"), "--train-only",
                 "--kind", "hnsw"]) == 2  # HNSW graphs cannot be merged: refused
