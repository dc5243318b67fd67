"""`ssl-vit features` under a real two-process `accelerate launch` writes the same cache as one process; the
vectorised merge of the ranks' parts writes the bytes the plain per-row merge wrote."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_vit.errors import SslVitError
from ssl_vit.eval.feature_cache import load_features, read_keys
from ssl_vit.eval.features import merge_parts, write_part
from ssl_vit.models.backbone import BackboneSpec, create_backbone
from ssl_vit.models.export import export_backbone


def features_args(backbone, shards, out, workers: int) -> list[str]:
    return ["features", "--backbone", str(backbone), "--shards", str(shards), "--out", str(out),
            "--pooling", "cls+avg", "--batch-size", "64", "--workers", str(workers), "--no-progress"]


@pytest.mark.slow
def test_two_process_extraction_equals_single_process(test_shards, tmp_path):
    torch.manual_seed(0)
    spec = BackboneSpec(img_size=32, patch_size=4, kwargs=dict(depth=2, embed_dim=64, num_heads=2))
    backbone = export_backbone(create_backbone(spec), spec, tmp_path / "backbone.safetensors")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "ssl_vit.cli",
                             *features_args(backbone, test_shards, tmp_path / "single", workers=1)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    # `--cpu --num_processes 2` would start one process; `--multi_gpu` with ACCELERATE_USE_CPU starts two gloo ranks
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ssl_vit.cli"]
    ddp = subprocess.run(launch + features_args(backbone, test_shards, tmp_path / "ddp", workers=2),
                         env=env, capture_output=True, text=True, timeout=400)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    one, two = load_features(tmp_path / "single"), load_features(tmp_path / "ddp")
    assert one.meta["num_processes"] == 1 and two.meta["num_processes"] == 2
    assert not (tmp_path / "ddp.parts").exists()
    expected = json.loads(test_shards.read_text())
    assert len(two.keys) == len(set(two.keys)) == sum(s["samples"] for s in expected["shards"]) == 1000
    assert two.keys == one.keys == sorted(one.keys)
    np.testing.assert_array_equal(two.labels, one.labels)
    assert two.dim == one.dim == 128
    np.testing.assert_allclose(two.features, one.features, rtol=0, atol=1e-5)


def reference_merge(out_dir: Path, parts_dir: Path, parts: list, info: dict) -> None:
    """The merge as written before it was vectorised (one Python sort over all keys, rows stacked one by one): the
    independent reference for the cache's bytes."""
    keys = [k for p in parts for k in p["keys"]]
    sources = [(r, i) for r, p in enumerate(parts) for i in range(len(p["keys"]))]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    labels = [p["labels"][i] for p in parts for i in range(len(p["keys"]))]
    dim = parts[0]["dim"]
    meta = {**info, "dim": dim, "num": len(keys), "skipped": sum(p["skipped"] for p in parts),
            "num_processes": len(parts)}
    maps = [np.fromfile(parts_dir / f"rank{r}.f32", np.float32).reshape(-1, dim) for r in range(len(parts))]
    out_dir.mkdir()
    features = np.lib.format.open_memmap(out_dir / "features.npy", mode="w+", dtype=np.float32,
                                         shape=(len(keys), dim))
    features[:] = np.stack([maps[r][i] for r, i in (sources[j] for j in order)])
    features.flush()
    del features
    np.save(out_dir / "labels.npy", np.asarray([labels[j] for j in order], dtype=np.int64))
    (out_dir / "keys.json").write_text(json.dumps([keys[j] for j in order]))
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))


@pytest.mark.parametrize("keys_kind", ["plain", "unicode"])
def test_vectorised_merge_writes_the_reference_bytes(tmp_path, keys_kind):
    rng = np.random.default_rng(0)
    names = [f"shard{i % 7:03d}/img_{i:06d}" for i in rng.permutation(3000)]
    if keys_kind == "unicode":  # escapes and non-ASCII take json.dumps; short keys pad with NULs in keys.npy
        names[:4] = ['qu"ote', "back\\slash", "ünïcode/日本", "a"]
    dim, parts = 6, []
    parts_dir = tmp_path / "parts"
    parts_dir.mkdir()
    for rank, share in enumerate([names[:1700], names[1700:], []]):  # uneven, and one rank with nothing
        rows = rng.normal(size=(len(share), dim)).astype(np.float32)
        rows.tofile(parts_dir / f"rank{rank}.f32")
        labels = rng.integers(-1, 10, len(share)).tolist()
        parts.append({"keys": share, "labels": labels, "dim": dim, "skipped": rank})
        write_part(parts_dir, rank, share, labels, dim if share else None, rank)
    info = {"pooling": "cls", "source": "x", "classes": ["a"]}
    merge_parts(tmp_path / "merged", parts_dir, range(3), info, num_processes=3, chunk=256)
    reference_merge(tmp_path / "reference", parts_dir, parts, info)
    for name in ("features.npy", "labels.npy", "keys.json", "meta.json"):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    cache = load_features(tmp_path / "merged")
    assert [k.decode() for k in read_keys(tmp_path / "merged")] == cache.keys == sorted(names)


def test_merge_names_a_duplicate_key(tmp_path):
    for rank, share in enumerate([["a", "b"], ["c", "b"]]):
        np.zeros((2, 3), np.float32).tofile(tmp_path / f"rank{rank}.f32")
        write_part(tmp_path, rank, share, [0, 0], 3, 0)
    with pytest.raises(SslVitError, match="duplicate sample keys in src \\(first 'b'\\)"):
        merge_parts(tmp_path / "out", tmp_path, range(2), {"source": "src"}, num_processes=2)
