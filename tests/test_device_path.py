"""The device view path (`data.decode: gpu`) run on CPU tensors through stream → StreamLoader → Trainer.

No GPU is lent here, so the tests add "cpu" to `gpu_views.DEVICE_PATH_TYPES` (the device types the device path is
offered on): the workers then hand on JPEG bytes and the main process decodes, resamples and augments them with the
device path's own code, on the CPU. What differs on a GPU is only the decoder (nvJPEG instead of libjpeg-turbo).
"""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ssl_vit.cli import main
from ssl_vit.data.loader import StreamLoader
from ssl_vit.data.stream import ShardStream
from ssl_vit.errors import SslVitError
from ssl_vit.train.run_log import read_log
from ssl_vit.transforms import MultiViewTransform, mae_views
from ssl_vit.transforms import gpu_views

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def device_path_on_cpu(monkeypatch):
    monkeypatch.setattr(gpu_views, "DEVICE_PATH_TYPES", ("cuda", "cpu"))


def photo(i: int, size=(48, 40), mode="RGB", fmt="JPEG") -> bytes:
    """A smooth colour gradient with noise: crops of it differ, as crops of a photograph do."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[:size[1], :size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], np.full(x.shape, 40 * (i % 6))], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def undecodable_jpeg() -> bytes:
    """A JPEG with a valid frame header and end-of-image marker whose Huffman tables are garbage: the worker hands it
    to the device decoder, and neither libjpeg-turbo (torchvision) nor PIL decodes it."""
    data = bytearray(photo(999))
    table = data.index(b"\xff\xc4")
    data[table + 5:table + 21] = b"\xff" * 16
    return bytes(data)


def write_shards(folder: Path, samples: list[dict], per_shard: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(samples), per_shard):
        with wds.TarWriter(str(folder / f"d-{start // per_shard:06d}.tar")) as writer:
            for sample in samples[start:start + per_shard]:
                writer.write(sample)
    return str(folder / f"d-{{000000..{(len(samples) - 1) // per_shard:06d}}}.tar")


def dataset(n: int, corrupt=(), cmyk=()) -> list[dict]:
    samples = [{"__key__": f"k{i:05d}", "jpg": photo(i), "cls": str(i % 3)} for i in range(n)]
    for i in corrupt:
        samples[i]["jpg"] = undecodable_jpeg()
    for i in cmyk:
        samples[i]["jpg"] = photo(i, mode="CMYK")
    return samples


def test_device_path_trains_with_counted_skips_and_cmyk_decoded_in_the_worker(device_path_on_cpu, tmp_path):
    """A real MAE run on the device path: the undecodable JPEG is a counted skip (logged, checkpointed, never trained
    on), the CMYK JPEG is decoded on the CPU in the worker, counted, and trained on; the run finishes."""
    source = write_shards(tmp_path / "shards", dataset(96, corrupt=[5], cmyk=[7]), per_shard=48)
    out = tmp_path / "run"
    args = ["pretrain", "--recipe", str(ROOT / "recipes" / "mae_vit_tiny_cifar10.yaml"), f"data.train={source}",
            f"train.out_dir={out}", "train.steps=8", "train.epochs=0", "optim.warmup_epochs=0", "data.batch_size=16",
            "data.decode=gpu", "data.num_workers=1", "data.shuffle_buffer=32", "data.max_skip_fraction=0.05",
            "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "mae.decoder_depth=1", "mae.decoder_dim=32",
            "mae.decoder_heads=2", "train.progress=false", "train.log_every=1", "train.audit_keys=true",
            "train.checkpoint_every=8"]
    assert main(args) == 0
    rows = [row for row in read_log(out / "log.jsonl") if "loss" in row]
    assert len(rows) == 8 and all(np.isfinite(row["loss"]) for row in rows)
    last = rows[-1]  # 8 steps of 16 from 96 samples: every sample read at least once, some twice
    assert last["skipped_samples"] >= 1 and last["cpu_decoded_samples"] >= 1 and last["cpu_reduced_samples"] == 0
    keys = [k for line in (out / "audit" / "rank0.jsonl").read_text().splitlines() for k in json.loads(line)["keys"]]
    assert "k00005" not in keys and "k00007" in keys
    steps = [len(json.loads(line)["keys"]) for line in (out / "audit" / "rank0.jsonl").read_text().splitlines()]
    assert sum(steps) == 8 * 16 - last["skipped_samples"]  # a skipped sample leaves its batch one short
    stream_state = json.loads(next((out / "checkpoints").glob("ckpt-*/stream-rank0.json")).read_text())
    assert stream_state["skip_counts"][1] == last["skipped_samples"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 8


def loader_over(path: str, batch: int, fraction: float, workers: int = 0) -> StreamLoader:
    transform = MultiViewTransform(mae_views(32), decode="gpu")
    stream = ShardStream(path, transform, batch, mode="eval", max_skip_fraction=fraction, num_workers=workers)
    return StreamLoader(stream, device=torch.device("cpu"))


def test_device_skips_are_counted_named_and_within_the_skip_budget(tmp_path, caplog):
    source = write_shards(tmp_path / "ok", dataset(200, corrupt=[3, 150], cmyk=[4]), per_shard=100)
    loader = loader_over(source, 25, 0.05, workers=1)
    with caplog.at_level("WARNING", logger="ssl_vit.data"):
        batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 198 and "k00003" not in keys and "k00150" not in keys and "k00004" in keys
    assert all(len(b["key"]) == len(b["label"]) == len(b["views"][0]) for b in batches)
    assert loader.skip_counts() == (200, 2)
    assert loader.decode_counts() == {"cpu_decoded_samples": 1, "cpu_reduced_samples": 0}
    messages = [r.getMessage() for r in caplog.records]
    assert any("corrupt image in sample k00003 of" in m and "d-000000.tar" in m and "nor PIL" in m
               for m in messages), messages
    bad = write_shards(tmp_path / "bad", dataset(200, corrupt=range(0, 200, 10)), per_shard=200)
    with pytest.raises(SslVitError, match="unreadable.*max_skip_fraction"):
        list(loader_over(bad, 20, 0.05))
