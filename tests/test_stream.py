"""The streaming reader on real shards: exactly-once splits, exact resume, bad input."""
import json
import warnings
from itertools import islice
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2.functional as TF
import webdataset as wds

from conftest import ROOT, jpeg_bytes, read_tar_images
from ssl_vit.cli import main
from ssl_vit.data.loader import StreamLoader
from ssl_vit.data.sources import expand_source
from ssl_vit.data.stream import ShardStream, rank_share
from ssl_vit.errors import SslVitError
from ssl_vit.train.run_log import read_log


def _crop(img) -> torch.Tensor:
    """A random 16-px crop drawn from torch's generator, as a view's is (torchvision's RandomResizedCrop cost 5x as
    much: 35 s of the suite's CPU went into it, and these tests check which samples come, not their views)."""
    pixels = TF.pil_to_tensor(img)
    top, left = (torch.randint(0, n - 15, ()).item() for n in pixels.shape[1:])
    return pixels[:, top:top + 16, left:left + 16].float().div_(255)


def two_views(img):
    return [_crop(img), _crop(img)]


two_views.sizes = [16, 16]  # as MultiViewTransform: with workers, batches of small views travel several at a time


def index_keys(index_path: Path) -> dict[str, int]:
    """Every key and label in the shards, read with plain webdataset (independent of our reader)."""
    urls = expand_source(str(index_path)).urls
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    out = {s["__key__"]: int(s["cls"]) for s in dataset}
    return out


def collect(stream: ShardStream, workers: int) -> list[dict]:
    return list(StreamLoader(stream))


@pytest.mark.parametrize("world,workers", [(2, 2), (1, 0), (3, 1)])
def test_eval_mode_every_sample_exactly_once(test_shards, world, workers):
    expected = index_keys(test_shards)
    assert len(expected) == 1000
    seen = {}
    for rank in range(world):
        stream = ShardStream(str(test_shards), two_views, 64, mode="eval", rank=rank, world_size=world,
                             num_workers=workers)
        for batch in collect(stream, workers):
            for key, label in zip(batch["key"], batch["label"].tolist()):
                assert key not in seen, f"{key} seen twice"
                seen[key] = label
    assert seen == expected  # complete, with the right labels


def test_eval_labels_and_images_match_source(test_shards, bundled_test):
    """Keys map back to source files (json metadata); decoded pixels equal the source JPEG's."""
    import io

    import numpy as np
    from PIL import Image

    source = read_tar_images(bundled_test)
    stream = ShardStream(str(test_shards), lambda im: [TF.pil_to_tensor(im).float()], 50, mode="eval")
    urls = expand_source(str(test_shards)).urls
    meta = {s["__key__"]: json.loads(s["json"]) for s in wds.WebDataset(urls, shardshuffle=False)}
    checked = 0
    for batch in collect(stream, 0):
        for key, label, img in zip(batch["key"], batch["label"].tolist(), batch["views"][0]):
            src_bytes, src_label = source[Path(meta[key]["path"]).parts[-2] + "/" + Path(meta[key]["path"]).name]
            assert label == src_label
            ref = np.asarray(Image.open(io.BytesIO(src_bytes)).convert("RGB")).transpose(2, 0, 1)
            assert np.array_equal(img.numpy(), ref)
            checked += 1
    assert checked == 1000


def epoch_keys(index: Path, world: int, workers: int, micro_batch: int, epochs: int, *, seed: int = 3,
               shuffle_buffer: int = 300) -> list[list[str]]:
    """Keys trained on in each epoch (each rank's batches [e·P, (e+1)·P), P = samples // global batch)."""
    num_samples = expand_source(str(index)).num_samples
    per_epoch = num_samples // (world * micro_batch)
    by_epoch = [[] for _ in range(epochs)]
    for rank in range(world):
        stream = ShardStream(str(index), two_views, micro_batch, mode="train", seed=seed, rank=rank,
                             world_size=world, num_workers=workers, shuffle_buffer=shuffle_buffer)
        for i, batch in enumerate(islice(StreamLoader(stream), epochs * per_epoch)):
            by_epoch[i // per_epoch] += batch["key"]
    return by_epoch


def test_train_mode_split_disjoint_and_complete(train_shards):
    """2 ranks × 2 workers: each epoch's steps hold every sample exactly once (5,000 = 25 global batches of 200)."""
    expected = set(index_keys(train_shards))
    for keys in epoch_keys(train_shards, world=2, workers=2, micro_batch=100, epochs=2):
        assert len(keys) == len(set(keys)) == len(expected) == 5000
        assert set(keys) == expected


@pytest.fixture(scope="module")
def seven_shards(tmp_path_factory, bundled_test) -> Path:
    """The bundled test split (1,000 images) as 7 shards: 7 does not divide among 4 or 3 readers."""
    from ssl_vit.data.writer import write_shards

    out = tmp_path_factory.mktemp("seven") / "s"
    write_shards(str(bundled_test), str(out), max_count=143, seed=0, workers=1, progress=False)
    return Path(f"{out}-index.json")


@pytest.mark.parametrize("world,workers", [(2, 2), (1, 3)])
def test_every_sample_once_per_epoch_for_any_shard_count(seven_shards, world, workers):
    """7 shards on 2 processes × 2 workers (and 1 × 3): epochs of 992 distinct samples (31 batches of 32; the 8
    left over differ from epoch to epoch), shards split between readers."""
    expected = set(index_keys(seven_shards))
    assert len(expected) == 1000 and len(expand_source(str(seven_shards)).shards) == 7
    epochs = epoch_keys(seven_shards, world=world, workers=workers, micro_batch=32 // world, epochs=3)
    for keys in epochs:
        assert len(keys) == len(set(keys)) == 992 and set(keys) <= expected
    assert len({frozenset(expected - set(keys)) for keys in epochs}) == 3  # the leftovers move


def test_train_mode_shuffles_across_epochs_and_seeds(train_shards):
    def first_batch(seed):
        stream = ShardStream(str(train_shards), two_views, 32, mode="train", seed=seed, num_workers=0)
        return next(iter(StreamLoader(stream)))["key"]

    assert first_batch(1) == first_batch(1)
    assert first_batch(1) != first_batch(2)
    labels = next(iter(StreamLoader(ShardStream(str(train_shards), two_views, 64, seed=0))))["label"]
    assert len(set(labels.tolist())) >= 5  # shuffled: a batch mixes classes


def run_stream(index: Path, n: int, states=None, first_batch=0, workers=2, world=1, rank=0, micro_batch=48):
    stream = ShardStream(str(index), two_views, micro_batch, mode="train", seed=7, num_workers=workers,
                         shuffle_buffer=700, world_size=world, rank=rank)
    if states is not None:
        stream.resume_from(json.loads(json.dumps(states)), first_batch)  # as stored in a checkpoint
    loader = StreamLoader(stream)
    out = [(b["key"], b["views"][0].sum().item(), b["views"][1].sum().item()) for b in islice(loader, n)]
    return out, loader.state.to_dict()


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_reader_continues_the_same_sequence(train_shards, workers):
    """Across an epoch boundary (5,000 samples = 104 batches of 48): same keys and same augmentations."""
    straight, _ = run_stream(train_shards, 120, workers=workers)
    first, state = run_stream(train_shards, 61, workers=workers)
    if workers:  # stopped in the middle of a worker's transfer: that worker first sends the rest of it
        assert 61 % state["layout"]["per_transfer"] != 0
    rest, _ = run_stream(train_shards, 59, [state], 61, workers=workers)
    assert first + rest == straight
    # Not trivially equal: a fresh (non-resumed) stream restarts instead.
    restarted, _ = run_stream(train_shards, 59, workers=workers)
    assert restarted != rest


def test_seven_shards_on_four_readers_resume_exactly(seven_shards):
    """Shards split between readers: a resume on the same layout continues each rank's batches exactly."""
    for rank in range(2):
        straight, _ = run_stream(seven_shards, 40, workers=2, world=2, rank=rank, micro_batch=16)
        first, state = run_stream(seven_shards, 13, workers=2, world=2, rank=rank, micro_batch=16)
        states = [state if r == rank else run_stream(seven_shards, 13, workers=2, world=2, rank=r,
                                                     micro_batch=16)[1] for r in range(2)]
        rest, _ = run_stream(seven_shards, 27, states, 13, workers=2, world=2, rank=rank, micro_batch=16)
        assert first + rest == straight


def test_resume_on_another_layout_keeps_each_epoch_exact(seven_shards):
    """2 processes × 2 workers stopped mid-epoch, resumed as 1 process × 3 workers (and that resumed again as
    2 × 1 within the same epoch): the epoch's samples exactly once, none lost; then whole epochs as usual."""
    per_epoch = 1000 // 32
    first = [run_stream(seven_shards, 11, workers=2, world=2, rank=r, micro_batch=16) for r in range(2)]
    states = [state for _, state in first]
    second, state = run_stream(seven_shards, 9, states, 11, workers=3, micro_batch=32)
    third = [run_stream(seven_shards, 2 * per_epoch - 20, [state], 20, workers=1, world=2, rank=r,
                        micro_batch=16)[0] for r in range(2)]
    epoch_0 = [k for out, _ in first for keys, *_ in out for k in keys] + [k for keys, *_ in second for k in keys]
    epoch_0 += [k for out in third for keys, *_ in out[:per_epoch - 20] for k in keys]
    epoch_1 = [k for out in third for keys, *_ in out[per_epoch - 20:] for k in keys]
    for keys in (epoch_0, epoch_1):
        assert len(keys) == len(set(keys)) == 992


# -- bad input ------------------------------------------------------------------------------------------------
def write_tar(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def good(i: int) -> dict:
    return {"__key__": f"k{i:05d}", "jpg": jpeg_bytes((i % 255, 10, 10)), "cls": str(i % 3)}


def test_corrupt_and_imageless_samples_are_skipped_counted_and_named(tmp_path, caplog):
    samples = [good(i) for i in range(300)]
    samples[5]["jpg"] = b"\xff\xd8 not a jpeg"
    samples[9] = {"__key__": "k00009", "cls": "1"}  # no image
    path = write_tar(tmp_path / "bad-000000.tar", samples)
    stream = ShardStream(str(path), two_views, 50, mode="eval", max_skip_fraction=0.05)
    with caplog.at_level("WARNING", logger="ssl_vit.data"):
        loader = StreamLoader(stream)
        keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) == 298 and "k00005" not in keys and "k00009" not in keys
    assert loader.skip_counts() == (300, 2)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "k00005" in messages and "k00009" in messages and "bad-000000.tar" in messages


def test_too_many_skips_stop_the_run(tmp_path):
    samples = [good(i) for i in range(200)]
    for s in samples[:20]:
        s["jpg"] = b"garbage"
    path = write_tar(tmp_path / "bad-000000.tar", samples)
    stream = ShardStream(str(path), two_views, 10, mode="eval", max_skip_fraction=0.05)
    with pytest.raises(SslVitError, match="unreadable.*max_skip_fraction"):
        list(StreamLoader(stream))


def test_skip_counts_and_budget_continue_after_a_resume(tmp_path, capsys):
    """One shard read in tar order (shuffle window 1, batches of 8): samples 0-9 and 60-61 are corrupt. Steps 1-4
    read 0-41 (10 skipped of 42: over 5 %, but under the 100 samples the budget waits for); resumed to step 12,
    the run has seen 100 samples by step 11, 12 of them skipped: the 5 % budget over the whole run stops it there,
    though the resumed part alone (2 of 58) is within it. With a lax budget the log counts all 12."""
    samples = [good(i) for i in range(200)]
    for i in [*range(10), 60, 61]:
        samples[i]["jpg"] = b"\xff\xd8 not a jpeg"
    shard = write_tar(tmp_path / "bad-000000.tar", samples)
    out = tmp_path / "run"

    def pretrain(steps: int, budget: float) -> int:
        return main(["pretrain", "--recipe", str(ROOT / "recipes" / "mae_vit_tiny_cifar10.yaml"),
                     f"data.train={shard}", "data.samples_per_epoch=200", "data.batch_size=8", "data.num_workers=0",
                     "data.shuffle_buffer=1", f"data.max_skip_fraction={budget}", f"train.out_dir={out}",
                     "train.resume=auto", f"train.steps={steps}", "train.epochs=0", "train.log_every=1",
                     "train.progress=false", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
                     "mae.decoder_depth=1", "mae.decoder_dim=32", "mae.decoder_heads=2"])

    def skipped_at_last_step() -> tuple[int, int]:
        last = read_log(out / "log.jsonl")[-1]
        return last["step"], last["skipped_samples"]

    assert pretrain(4, 0.05) == 0
    assert skipped_at_last_step() == (4, 10)
    capsys.readouterr()
    assert pretrain(12, 0.05) == 2  # resumed at step 4
    err = capsys.readouterr().err
    assert "12 of 100 samples were unreadable" in err and "max_skip_fraction 5.0%" in err, err
    assert pretrain(12, 0.5) == 0  # resumed at step 4 again (the stopped run wrote no checkpoint)
    assert skipped_at_last_step() == (12, 12)


def test_skip_counts_of_another_number_of_ranks_are_shared_out():
    counts = [[105, 7], [98, 4]]  # (seen, skipped) of two ranks
    assert rank_share(counts, 1, 2) == (98, 4)
    assert rank_share(counts, 0, 1) == (203, 11)
    shares = [rank_share(counts, r, 3) for r in range(3)]
    assert shares == [(68, 4), (68, 4), (67, 3)] and tuple(map(sum, zip(*shares))) == (203, 11)


def test_truncated_tar_ends_that_shard_with_a_warning(tmp_path):
    full = write_tar(tmp_path / "t-000000.tar", [good(i) for i in range(100)])
    data = full.read_bytes()
    cut = tmp_path / "t-000001.tar"
    cut.write_bytes(data[: len(data) // 2])
    stream = ShardStream([str(full), str(cut)], two_views, 25, mode="eval")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [k for batch in StreamLoader(stream) for k in batch["key"]]
    assert 100 < len(keys) < 200  # all of the good shard, part of the truncated one
    assert any("t-000001.tar" in str(w.message) and "truncated" in str(w.message) for w in caught)


def test_missing_sources_are_one_line_errors(tmp_path):
    write_tar(tmp_path / "nope-000000.tar", [good(0)])
    with pytest.raises(SslVitError, match=r"missing shard: .*nope-000001\.tar"):
        expand_source(str(tmp_path / "nope-{000000..000001}.tar"))
    with pytest.raises(SslVitError, match=r"missing shard: .*gone-000000\.tar \(and 2 more of 3\)"):
        expand_source(str(tmp_path / "gone-{000000..000002}.tar"))
    with pytest.raises(SslVitError, match="matches nothing"):
        expand_source(str(tmp_path / "none-*.tar"))
    with pytest.raises(SslVitError, match="empty shard list"):
        expand_source([])
    with pytest.raises(SslVitError, match="missing shard index"):
        expand_source(str(tmp_path / "index.json"))


def test_too_few_uncounted_shards_for_readers_is_an_error_not_a_hang(tmp_path):
    path = write_tar(tmp_path / "one-000000.tar", [good(i) for i in range(10)])
    with pytest.raises(SslVitError, match="1 shards without sample counts cannot feed 2 processes × 2 workers"):
        ShardStream(str(path), two_views, 4, mode="train", world_size=2, num_workers=2)


def test_pipe_urls_stream_through_a_command(tmp_path):
    for s in range(2):
        write_tar(tmp_path / f"p-{s:06d}.tar", [good(s * 10 + i) for i in range(10)])
    stream = ShardStream(f"pipe:cat {tmp_path}/p-{{000000..000001}}.tar", two_views, 5, mode="eval")
    keys = [k for batch in StreamLoader(stream) for k in batch["key"]]
    assert sorted(keys) == [f"k{i:05d}" for i in range(20)]


def test_a_corrupt_image_is_warned_about_once_in_plain_words(tmp_path, caplog):
    """Three epochs read by two workers (which read ahead): one warning for the corrupt sample, without reprs."""
    samples = [good(i) for i in range(60)]
    samples[7]["jpg"] = b"not an image at all"
    samples[8] = {"__key__": "k00008", "cls": "1", "txt": b"caption"}  # no image
    for s in range(2):
        write_tar(tmp_path / f"c-{s:06d}.tar", samples[s * 30:(s + 1) * 30])
    stream = ShardStream(str(tmp_path / "c-*.tar"), two_views, 8, num_workers=2, max_skip_fraction=0.1)
    with caplog.at_level("WARNING", logger="ssl_vit.data"):
        loader = StreamLoader(stream)
        batches = list(islice(loader, 3 * 58 // 8))
    messages = [r.getMessage() for r in caplog.records]
    assert len(batches) == 21 and loader.skip_counts()[1] >= 4  # both skipped in two epochs at least
    assert sum("k00007" in m for m in messages) == 1 and sum("k00008" in m for m in messages) == 1
    assert not any("object at 0x" in m or "[" in m for m in messages), messages
    assert any("corrupt image in sample k00007 of" in m and "c-000000.tar" in m for m in messages)
