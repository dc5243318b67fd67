"""The device view path (`data.decode: gpu`) run on CPU tensors through stream → StreamLoader → Trainer.

No GPU is lent here, so the tests add "cpu" to `gpu_views.DEVICE_PATH_TYPES` (the device types the device path is
offered on): the workers then hand on JPEG bytes and the main process decodes, resamples and augments them with the
device path's own code, on the CPU. What differs on a GPU is only the decoder (nvJPEG instead of libjpeg-turbo).
"""
import io
import json
import subprocess
import sys
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
from ssl_vit.transforms import MultiViewTransform, dino_views, mae_views
from ssl_vit.transforms import device_resample as R
from ssl_vit.transforms import gpu_views
from ssl_vit.transforms import params as P

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
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["images_seen"] == sum(steps)  # images trained on, not steps x batch


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
    whole = write_shards(tmp_path / "whole", dataset(8, corrupt=[4, 5]), per_shard=8)
    whole_batch = "all 2 samples of a batch are unreadable .first: corrupt image in sample k00004 "
    with pytest.raises(SslVitError, match=whole_batch):
        list(loader_over(whole, 2, 1.0))


# -- what the worker hands on -------------------------------------------------------------------------------------
def patched(data: bytes, marker: bytes, offset: int, value: bytes) -> bytes:
    """`data` with the bytes at `offset` after the first `marker` replaced by `value`."""
    out = bytearray(data)
    at = out.index(marker) + offset
    out[at:at + len(value)] = value
    return bytes(out)


def with_adobe_marker(data: bytes, transform: int) -> bytes:
    """A JPEG with an Adobe APP14 segment (version 100, no flags, `transform`) after its start-of-image marker."""
    payload = b"Adobe" + (100).to_bytes(2, "big") + bytes(4) + bytes([transform])
    return data[:2] + b"\xff\xee" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def test_the_header_tells_which_jpegs_the_device_decoder_takes():
    from ssl_vit.transforms.jpeg_header import device_decodable, read_frame

    rgb, cmyk = photo(0), photo(0, mode="CMYK")
    assert read_frame(cmyk).adobe_transform == 0 and len(read_frame(cmyk).sampling) == 4
    takes = {"baseline": rgb, "grey": photo(0, mode="L"), "progressive": progressive(photo(0)),
             "adobe ycbcr": with_adobe_marker(rgb, 1)}
    refuses = {"cmyk": cmyk, "ycck": patched(cmyk, b"Adobe", 11, b"\x02"),
               "adobe rgb": with_adobe_marker(rgb, 0), "12-bit": patched(rgb, b"\xff\xc0", 4, b"\x0c"),
               "arithmetic": patched(rgb, b"\xff\xc0", 1, b"\xc9"), "lossless": patched(rgb, b"\xff\xc0", 1, b"\xc3"),
               "luma 3x1": patched(rgb, b"\xff\xc0", 11, b"\x31"), "png": photo(0, fmt="PNG"),
               "header only": rgb[:rgb.index(b"\xff\xc0") + 6], "not an image": b"\xff\xd8 garbage"}
    assert {name: device_decodable(data) for name, data in takes.items()} == dict.fromkeys(takes, True)
    assert {name: device_decodable(data) for name, data in refuses.items()} == dict.fromkeys(refuses, False)


def progressive(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, format="JPEG", progressive=True)
    return buf.getvalue()


def sample(data: bytes, key: str = "s0") -> dict:
    return {"jpg": data, "__key__": key, "__url__": "memory"}


def test_cmyk_views_are_made_in_the_worker_as_the_cpu_path_makes_them():
    from ssl_vit.data.samples import open_image

    specs, data = mae_views(32), photo(3, mode="CMYK")
    torch.manual_seed(0)
    made = MultiViewTransform(specs, decode="gpu")(open_image(sample(data)))
    torch.manual_seed(0)
    reference = MultiViewTransform(specs)(open_image(sample(data)))
    assert isinstance(made, gpu_views.WorkerViews) and made.reason == "unsupported"
    assert all(torch.equal(a, b) for a, b in zip(made, reference))
    batch = gpu_views.collate_views([made], specs)
    assert batch.counts == {"cpu_decoded": 1, "cpu_reduced": 0} and len(batch.encoded) == 0
    assert torch.equal(gpu_views.device_views(batch, torch.device("cpu")).views[0][0], reference[0])


# -- device memory bounded by design ------------------------------------------------------------------------------
PHONE_SENSORS = [(4032, 3024), (4080, 3072), (5472, 3648), (8000, 6000), (8160, 6120), (8064, 6048)]  # 12-50 MP
DEVICE_BUDGET = 2_000_000_000  # bytes one batch's views may take on the device


def phone_batch_sizes(n: int, specs) -> tuple[list[int], list[int], int]:
    """(heights, widths) on the device of n phone photos in mixed orientation, and how many the worker reduced: each
    image's views drawn as the stream draws them, its size decided by the worker's own rule."""
    torch.manual_seed(0)
    rng, heights, widths, reduced = np.random.default_rng(0), [], [], 0
    for i in range(n):
        width, height = PHONE_SENSORS[rng.integers(len(PHONE_SENSORS))]
        if rng.random() < 0.5:
            width, height = height, width
        rows = [P.draw_params(spec, spec.count, width, height) for spec in specs]
        placed = gpu_views.device_image_size((width, height), specs, rows)
        assert placed is not None, (width, height)
        heights.append(placed[0])
        widths.append(placed[1])
        reduced += placed[2] > 1
    return heights, widths, reduced


@pytest.mark.parametrize("views", [mae_views(224), dino_views(224, 96, 10)], ids=["mae", "dino"])
def test_a_batch_of_128_phone_photos_stays_within_the_device_budget(views):
    """The code's own chunk plan for 128 photos of 12-50 MP: every chunk within CHUNK_BYTES, the batch's peak under
    2 GB. Decoding them at once would hold 4.6-19 GB of uint8 pixels, and one float32 pad per 32 images 20-60 GB."""
    specs = tuple(s for s in views for _ in range(s.count))
    heights, widths, reduced = phone_batch_sizes(128, views)
    assert reduced > 0 and max(h * w for h, w in zip(heights, widths)) <= R.MAX_DEVICE_PIXELS
    plan = R.plan_chunks(heights, widths, specs, 128)
    assert sorted(e for chunk in plan.chunks for e in chunk) == list(range(128))
    assert max(plan.chunk_bytes) <= R.CHUNK_BYTES, max(plan.chunk_bytes)
    assert plan.peak_bytes < DEVICE_BUDGET, plan.peak_bytes
    assert all(cost == R.chunk_bytes([heights[e] for e in chunk], [widths[e] for e in chunk], R.view_groups(specs))
               for chunk, cost in zip(plan.chunks, plan.chunk_bytes))


def test_device_views_follow_the_plan_and_chunks_change_no_pixel(monkeypatch):
    """device_views decodes the chunks of plan_chunks, in order; a small budget (many chunks) makes the same views
    as one chunk for the whole batch."""
    from ssl_vit.data.samples import open_image

    specs, transform = dino_views(64, 32, 2), MultiViewTransform(dino_views(64, 32, 2), decode="gpu")
    items = []
    for i in range(10):
        torch.manual_seed(i)
        size = (96 + 16 * i, 80) if i % 2 else (72, 100 + 8 * i)  # mixed sizes and orientations
        items.append(transform(open_image(sample(photo(i, size=size)))))
    batch = gpu_views.collate_views(items, specs)
    whole = gpu_views.device_views(batch, torch.device("cpu")).views
    decoded, decode_chunk = [], gpu_views.decode_chunk
    monkeypatch.setattr(gpu_views, "decode_chunk", lambda b, chunk, d: decoded.append(list(chunk)) or
                        decode_chunk(b, chunk, d))
    monkeypatch.setattr(R, "CHUNK_BYTES", 4_000_000)
    chunked = gpu_views.device_views(batch, torch.device("cpu")).views
    plan = R.plan_chunks(*R.plan_sizes(batch.sizes), batch.specs, batch.size)
    assert len(plan.chunks) >= 3 and decoded == plan.chunks
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def test_images_above_the_pixel_limit_are_reduced_in_the_worker(monkeypatch):
    """A JPEG above MAX_DEVICE_PIXELS travels as its pixels at the CPU path's DCT scale, and the device makes the
    CPU path's views from them (the same decode: equal up to the two resampling implementations)."""
    from ssl_vit.data.samples import open_image

    monkeypatch.setattr(gpu_views, "MAX_DEVICE_PIXELS", 100 * 100)
    specs, data = mae_views(32), photo(5, size=(400, 300))
    torch.manual_seed(0)
    made = MultiViewTransform(specs, decode="gpu")(open_image(sample(data)))
    torch.manual_seed(0)
    reference = MultiViewTransform(specs)(open_image(sample(data)))
    assert isinstance(made, gpu_views.EncodedViews) and made.scale > 1
    assert (made.height, made.width) == (-(-300 // made.scale), -(-400 // made.scale))
    assert made.data.size == 3 * made.height * made.width  # pixels, not JPEG bytes
    batch = gpu_views.collate_views([made], specs)
    assert batch.counts == {"cpu_decoded": 0, "cpu_reduced": 1}
    view = gpu_views.device_views(batch, torch.device("cpu")).views[0][0]
    assert (view.float() - reference[0].float()).abs().mean() < 1.0


MEASURE_PEAK = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
from test_device_path import photo, sample
from ssl_vit.data.samples import open_image
from ssl_vit.transforms import MultiViewTransform, mae_views
from ssl_vit.transforms import device_resample as R, gpu_views as G


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


torch.set_num_threads(1)
specs = mae_views(224)
transform, items = MultiViewTransform(specs, decode="gpu"), []
for i in range(4):
    torch.manual_seed(i)
    items.append(transform(open_image(sample(photo(i, size=(1000, 750) if i % 2 else (750, 1000))))))
batch = G.collate_views(items, specs)
G.device_views(G.collate_views(items[:1], specs), torch.device("cpu"))  # libraries' own buffers, once
heights, widths = R.plan_sizes(batch.sizes)
alone = max(R.chunk_bytes([h], [w], R.view_groups(batch.specs)) for h, w in zip(heights, widths))
for budget in (alone, 10 ** 12):  # about one image a chunk, then all in one
    R.CHUNK_BYTES = budget
    plan = R.plan_chunks(*R.plan_sizes(batch.sizes), batch.specs, batch.size)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident size starts again from the current one
    before = status("VmRSS")
    G.device_views(batch, torch.device("cpu"))
    print(len(plan.chunks), max(plan.chunk_bytes) + plan.views_bytes, status("VmHWM") - before)
"""


def test_the_plan_bounds_the_memory_the_device_code_takes():
    """The device code run on CPU tensors in a fresh process (MAE views: no colour ops): the growth of its peak
    resident memory stays within the plan's largest chunk plus the batch's views, with a budget of about one image
    per chunk and without one (one chunk, which takes more: the measurement sees the chunks). Large allocations come
    from the OS (mmap) and go back when freed, so the peak resident size follows the peak of live tensors."""
    run = subprocess.run([sys.executable, "-c", MEASURE_PEAK, str(Path(__file__).parent)], capture_output=True,
                         text=True, check=True)
    (chunks, bound, grown), (one, whole_bound, whole_grown) = (
        [int(v) for v in line.split()] for line in run.stdout.splitlines() if line.strip())
    assert chunks >= 3 and one == 1 and bound < whole_bound
    assert grown <= bound and whole_grown <= whole_bound, (grown, bound, whole_grown, whole_bound)
    assert whole_grown > 1.5 * grown, (grown, whole_grown)
