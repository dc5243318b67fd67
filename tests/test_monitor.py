"""k-NN monitoring during pretraining, through `ssl-vit pretrain`: the logged score is the k-NN of the exported
backbone (DINO: the teacher) on the monitor set, and monitoring leaves training bit for bit as it was."""
import json
import warnings
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


def tiny_backbone():
    import torch

    from ssl_vit.models.backbone import BackboneSpec, create_backbone

    torch.manual_seed(0)
    return create_backbone(BackboneSpec(img_size=32, patch_size=8, kwargs=dict(depth=1, embed_dim=32, num_heads=2)))


def shard_order(index) -> list[tuple[str, int]]:
    """(key, label) of every sample in shard order, read with plain tarfile (an independent reader)."""
    import tarfile

    meta = json.loads(Path(index).read_text())
    rows = []
    for shard in meta["shards"]:
        with tarfile.open(Path(index).parent / shard["name"]) as tar:
            rows += [(m.name.rsplit(".", 1)[0], int(tar.extractfile(m).read())) for m in tar if m.name.endswith(".cls")]
    return rows


def test_monitor_is_bounded_class_balanced_and_decoded_at_its_first_call(test_shards):
    import torch

    from ssl_vit.eval.monitor import KnnMonitor

    monitor = KnnMonitor(test_shards, 32, resize=32, max_samples=205)  # 20 of each of the 10 classes
    assert monitor.pixels is None  # the constructor reads the index only
    first = monitor(tiny_backbone(), torch.device("cpu"))
    assert first["monitor_samples"] == 200 and first["monitor_unreadable"] == 0 and first["monitor_load_seconds"] > 0
    assert np.bincount(monitor.labels).tolist() == [20] * 10
    expected = {}
    for key, label in shard_order(test_shards):  # the first 20 of each class in shard order
        expected.setdefault(label, []).append(key) if len(expected.get(label, [])) < 20 else None
    assert monitor.keys == sorted(k for keys in expected.values() for k in keys)
    again = monitor(tiny_backbone(), torch.device("cpu"))
    assert "monitor_load_seconds" not in again and again["monitor_knn_top1"] == first["monitor_knn_top1"]


def test_monitor_stops_reading_once_every_class_is_full(test_shards, tmp_path):
    """The second shard is garbage: a monitor whose classes fill up within the first shard never reads it."""
    import shutil

    import torch

    from ssl_vit.eval.monitor import KnnMonitor

    for path in Path(test_shards).parent.glob("test-*"):
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "test-000001.tar").write_bytes(b"not a tar" * 1000)
    small = KnnMonitor(tmp_path / "test-index.json", 32, resize=32, max_samples=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading the garbage shard would warn
        assert small(tiny_backbone(), torch.device("cpu"))["monitor_samples"] == 40
    with pytest.warns(RuntimeWarning, match="test-000001.tar is truncated or corrupt"):
        everything = KnnMonitor(tmp_path / "test-index.json", 32, resize=32)(tiny_backbone(), torch.device("cpu"))
    assert everything["monitor_samples"] == 750  # the other three shards of 250
    with pytest.raises(SslVitError, match="train.monitor_samples=5 is fewer than the 10 classes"):
        KnnMonitor(test_shards, 32, resize=32, max_samples=5)(tiny_backbone(), torch.device("cpu"))


def test_monitor_samples_through_pretrain(train_shards, test_shards, tmp_path, capsys):
    log = pretrain(tmp_path / "run", train_shards, "train.monitor_every=2", "train.monitor_samples=100",
                   f"data.monitor={test_shards}")
    assert [e.get("monitor_samples") for e in log] == [100, 100]
    assert "monitor_load_seconds" in log[0] and "monitor_load_seconds" not in log[1]
    assert main(["pretrain", "--recipe", str(ROOT / "recipes" / "dino_vit_tiny_cifar10.yaml"), *TINY,
                 f"data.train={train_shards}", f"train.out_dir={tmp_path / 'bad'}", "train.monitor_every=2",
                 f"data.monitor={test_shards}", "train.monitor_samples=2"]) == 2
    assert "train.monitor_samples: must be ≥ 4" in capsys.readouterr().err


# -- FAISS GPU resources: one per process -------------------------------------------------------------------------
def test_per_process_cache_makes_once_and_again_in_a_forked_child():
    import os

    from ssl_vit.eval.faiss_utils import per_process

    made = []
    get = per_process(lambda: made.append(object()) or made[-1])
    first = get()
    assert all(get() is first for _ in range(5)) and len(made) == 1
    pid = os.fork()
    if pid == 0:  # a child (a DataLoader worker): CUDA state does not survive a fork, so it makes its own
        os._exit(10 + len(made) if get() is not first else 0)
    assert os.waitpid(pid, 0)[1] >> 8 == 12
    assert get() is first and len(made) == 1


def test_faiss_gpu_resources_are_made_in_one_place_and_cached():
    """Nothing in the package makes FAISS GPU resources but the per-process factory, so no call path (k-NN monitor,
    features → k-NN, indexes) makes them per call; with a FAISS GPU build, two indexes share them."""
    from ssl_vit.eval import faiss_utils

    makers = [(path, line) for path in sorted((ROOT / "ssl_vit").rglob("*.py")) + sorted((ROOT / "pipelines").glob(
        "*.py")) for line in path.read_text().splitlines() if "StandardGpuResources(" in line]
    assert [(p.name, line.strip()) for p, line in makers] == [("faiss_utils.py", "return faiss.StandardGpuResources()")]
    assert faiss_utils.gpu_resources.__wrapped__  # made through per_process
    if faiss_utils.gpu_available():
        bank = np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32)
        a, b = (faiss_utils.flat_ip_index(bank, "faiss-gpu") for _ in range(2))
        assert a.referenced_objects[0] is b.referenced_objects[0] is faiss_utils.gpu_resources()
