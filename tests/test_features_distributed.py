"""`ssl-vit features` under a real two-process `accelerate launch` writes the same cache as one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_vit.eval.feature_cache import load_features
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
