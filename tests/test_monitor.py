"""k-NN monitoring during pretraining, through `ssl-vit pretrain`: the logged score is the k-NN of the exported
backbone (DINO: the teacher) on the monitor set, and monitoring leaves training bit for bit as it was."""
import json
from pathlib import Path

import numpy as np
import pytest

from ssl_vit.cli import main
from ssl_vit.errors import SslVitError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "dino.out_dim=256", "dino.hidden_dim=64",
        "dino.bottleneck_dim=32", "views.num_local=2", "train.steps=4", "train.epochs=0", "data.batch_size=16",
        "data.num_workers=0", "train.progress=false", "train.log_with=[]", "train.log_every=2",
        "data.eval_resize=32"]


def pretrain(out, train_shards, *extra):
    assert main(["pretrain", "--recipe", str(ROOT / "recipes" / "dino_vit_tiny_cifar10.yaml"), *TINY,
                 f"data.train={train_shards}", f"train.out_dir={out}", *extra]) == 0
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_monitored_knn_is_the_exported_teachers_and_changes_nothing(train_shards, test_shards, tmp_path):
    from ssl_vit.eval.feature_cache import load_features
    from ssl_vit.eval.knn import knn_classify

    watched = pretrain(tmp_path / "watched", train_shards, "train.monitor_every=3", f"data.monitor={test_shards}")
    plain = pretrain(tmp_path / "plain", train_shards)
    assert [e["step"] for e in watched] == [2, 3, 4] and [e["step"] for e in plain] == [2, 4]
    assert "monitor_knn_top1" in watched[1] and all("monitor_knn_top1" not in e for e in (watched[0], watched[2]))
    assert [e["loss"] for e in watched if e["step"] != 3] == [e["loss"] for e in plain]  # same draws, same steps

    last = pretrain(tmp_path / "last", train_shards, "train.monitor_every=4", f"data.monitor={test_shards}")[-1]
    assert main(["features", "--backbone", str(tmp_path / "last"), "--shards", str(test_shards), "--out",
                 str(tmp_path / "feats"), "--resize", "32", "--workers", "0", "--no-progress"]) == 0
    fs = load_features(tmp_path / "feats")
    x, y = np.asarray(fs.features), fs.labels  # rows in key order, as the monitor keeps them
    expected = knn_classify(x[0::2], y[0::2], x[1::2], y[1::2], ks=[20])["k"]["20"]["top1"]
    assert last["monitor_knn_top1"] == pytest.approx(expected, abs=0.21)  # at most one of 500 queries flips
    assert last["monitor_seconds"] > 0


def test_monitoring_without_a_monitor_set_is_named(train_shards, tmp_path, capsys):
    assert main(["pretrain", "--recipe", str(ROOT / "recipes" / "dino_vit_tiny_cifar10.yaml"), *TINY,
                 f"data.train={train_shards}", f"train.out_dir={tmp_path}", "train.monitor_every=2"]) == 2
    assert "data.monitor" in capsys.readouterr().err
    with pytest.raises(SslVitError, match="data.monitor"):
        from ssl_vit.eval.monitor import KnnMonitor
        KnnMonitor(str(train_shards).replace("train", "nothing"), 32)
