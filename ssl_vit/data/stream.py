"""The streaming reader: shards → slots (rank × worker) → shuffle window → decode → views → batches.

Every (rank, DataLoader worker) pair is one *slot*. The dataset itself assigns work to slots (`epochs.EpochPlan`), so
accelerate must not shard or dispatch the loader again (the trainer builds the DataLoader itself and moves batches to
the device).

Training (`mode="train"`): endless. A slot reads its pieces of shards for the epoch as the bytes arrive and shuffles
them through a window of `shuffle_buffer` samples: window k is emitted in a permutation seeded by (seed, epoch, slot,
k). Memory is one window of raw samples, whatever the shard size, and the first batch comes after one window has
arrived. A slot's position is (epoch, samples consumed); restoring it re-reads the pieces up to the window it falls
in without decoding anything (seek on local files), so a resumed run continues the same stream exactly.
Augmentation randomness is seeded by (seed, epoch, sample key) in torch's CPU generator (restored after each batch),
so it does not depend on which process decodes a sample.

Evaluation (`mode="eval"`): every sample exactly once, in shard order, with its key; shards are dealt round-robin
to slots, so slots may hold unequal counts (the feature extractor gathers variable-length results).

Batches are formed inside the worker (`DataLoader(batch_size=None)`), next to a `BatchMeta` saying where the slot
stands, and travel in groups (`transfers`).
"""
import contextlib
import logging
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ssl_vit.data.epochs import EpochPlan, Layout, resplit_state, window_order
from ssl_vit.data.samples import BadSample, decode_label, open_image
from ssl_vit.data.sources import ShardList, expand_source
from ssl_vit.data.tar_reader import iter_samples
from ssl_vit.data.transfers import batches_per_transfer, in_transfers, logical_worker
from ssl_vit.errors import SslVitError
from ssl_vit.seeding import stable_seed
from ssl_vit.transforms.gpu_views import EncodedViews, collate_views

log = logging.getLogger("ssl_vit.data")

MIN_SAMPLES_BEFORE_SKIP_CHECK = 100
DEFAULT_SHUFFLE_BUFFER = 1000


@dataclass
class BatchMeta:
    """Where the slot that made a batch stands after it, and the samples it skipped (messages, for warnings)."""

    worker: int
    position: list[int]  # [epoch, samples consumed in that epoch]
    seen: int
    skipped: int
    bad: list[str] = field(default_factory=list)


@dataclass
class StreamState:
    """Resume state of one rank: batches consumed, each logical worker's position after its last batch, and the
    layout (ranks, workers, micro-batch, transfer, window) that wrote it."""

    batches: int = 0
    workers: dict[int, list[int]] = field(default_factory=dict)
    layout: dict | None = None
    resplit: dict | None = None

    def to_dict(self) -> dict:
        return {"batches": self.batches, "workers": {str(k): v for k, v in self.workers.items()},
                "layout": self.layout, "resplit": self.resplit}

    @classmethod
    def from_dict(cls, d: dict) -> "StreamState":
        if "layout" not in d:
            raise SslVitError("stream state from an older ssl_vit (before bounded-memory streaming): restart the run "
                              "or resume it with the version that wrote it")
        return cls(int(d["batches"]), {int(k): list(v) for k, v in d["workers"].items()}, d["layout"],
                   d.get("resplit"))

    def update(self, meta: BatchMeta) -> None:
        """Record a consumed batch (call in the main process, in consumption order)."""
        self.batches += 1
        self.workers[meta.worker] = list(meta.position)


def collate(items: list[tuple[list, int, str]], specs: list | None = None) -> dict:
    """Views stacked to [B, 3, H, W] uint8 tensors (or, for the GPU path, the batch's encoded images and view
    choices); labels and keys as lists.

    Every tensor a DataLoader worker returns crosses to the main process through its own shared-memory handshake
    (~1 ms each), so labels travel as a list and StreamLoader makes the tensor."""
    return {"views": collate_views([item[0] for item in items], specs), "label": [item[1] for item in items],
            "key": [item[2] for item in items]}


class ShardStream(IterableDataset):
    """Batches of views from WebDataset shards for one rank; see the module docstring for the guarantees.

    `batches_per_epoch` (per rank; steps per epoch × accumulation steps) defaults to what one global batch of
    `batch_size × world_size` gives. `require_labels`: a sample without a label is an error naming it."""

    def __init__(self, source, transform: Callable, batch_size: int, *, mode: str = "train", seed: int = 0,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, rank: int = 0, world_size: int = 1,
                 max_skip_fraction: float = 0.01, num_workers: int = 0, batches_per_epoch: int | None = None,
                 require_labels: bool = False):
        if mode not in ("train", "eval"):
            raise SslVitError(f"stream mode must be 'train' or 'eval', got {mode!r}")
        if batch_size < 1:
            raise SslVitError(f"batch size must be ≥ 1, got {batch_size}")
        if shuffle_buffer < 1:
            raise SslVitError(f"data.shuffle_buffer must be ≥ 1 sample, got {shuffle_buffer}")
        self.shards: ShardList = source if isinstance(source, ShardList) else expand_source(source)
        self.transform, self.batch_size, self.mode, self.seed = transform, batch_size, mode, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, max(0, num_workers)
        self.max_skip_fraction, self.require_labels = max_skip_fraction, require_labels
        workers = max(1, self.num_workers)
        counts = self.shards.counts
        if mode == "train" and counts is not None:
            if batches_per_epoch is None:
                batches_per_epoch = self.shards.num_samples // (batch_size * world_size)
            if batches_per_epoch < 1:
                raise SslVitError(f"{self.shards.num_samples} samples cannot fill one global batch of "
                                  f"{batch_size * world_size}: lower data.batch_size or add data")
        elif mode == "train" and len(self.shards.shards) < world_size * workers:
            raise SslVitError(f"{len(self.shards.shards)} shards without sample counts cannot feed {world_size} "
                              f"processes × {workers} workers = {world_size * workers} readers; write an index "
                              "(ssl-vit shards index) so shards can be split, or use fewer workers")
        sizes = getattr(transform, "sizes", None)  # MultiViewTransform's view sizes
        per_transfer = batches_per_transfer(batch_size, sizes) if self.num_workers else 1
        self.layout = Layout(world_size, workers, batch_size, per_transfer, shuffle_buffer,
                             batches_per_epoch if counts is not None else None)
        self.plan = EpochPlan(len(self.shards.shards), counts, seed, self.layout)
        self.start = StreamState(0, {w: [0, 0] for w in range(workers)}, self.layout.to_dict())
        self.restored_skips = (0, 0)  # (seen, skipped) by this rank before a resume: counts and budget continue

    def resume_from(self, states: list[dict], first_batch: int, skip_counts: list | None = None) -> None:
        """Continue from the stream states of every rank of the run that wrote them (and their (seen, skipped)
        counts). The same layout continues exactly; another one (processes, workers, micro-batch, window) re-splits
        the rest of the epoch, and the counts are shared out over the new ranks (their sum kept)."""
        if skip_counts:
            self.restored_skips = rank_share(skip_counts, self.rank, self.world_size)
        old = [StreamState.from_dict(s) for s in states]
        if old[0].layout == self.layout.to_dict() and len(old) == self.world_size:
            self.start = old[self.rank]
            self.plan = EpochPlan(len(self.shards.shards), self.shards.counts, self.seed, self.layout,
                                  self.start.resplit)
            return
        if self.shards.counts is None:
            raise SslVitError("resuming on another number of processes or workers needs shard sample counts: write "
                              "an index for these shards (ssl-vit shards index), or resume with "
                              f"{old[0].layout['world']} processes × {old[0].layout['workers']} workers")
        old_layout = Layout(**old[0].layout)
        positions = {rank * old_layout.workers + w: p for rank, s in enumerate(old) for w, p in s.workers.items()}
        record, epoch = resplit_state(self.shards.counts, self.seed, old_layout, positions, old[0].resplit,
                                      first_batch)
        self.plan = EpochPlan(len(self.shards.shards), self.shards.counts, self.seed, self.layout, record)
        self.start = StreamState(first_batch, {w: [epoch, 0] for w in range(self.layout.workers)},
                                 self.layout.to_dict(), record)

    @property
    def batches_per_transfer(self) -> int:
        return self.layout.per_transfer

    def __iter__(self):
        """Lists of (batch, BatchMeta): one transfer from this worker each."""
        info = get_worker_info()
        workers = info.num_workers if info else 1
        if info and workers != self.layout.workers:
            raise SslVitError(f"stream built for {self.num_workers} workers runs in a loader with {workers}")
        worker, first_transfer = logical_worker(info.id if info else 0, workers, self.start.batches,
                                                self.batches_per_transfer)
        slot = self.rank * workers + worker
        samples = self._train_samples(slot, worker) if self.mode == "train" else \
            self._eval_samples(slot, self.world_size * workers)
        return in_transfers(self._batches(samples, worker), first_transfer, self.batches_per_transfer)

    # -- sample streams: yield (raw sample, epoch, position after it) -------------------------------------------
    def _train_samples(self, slot: int, worker: int):
        epoch, consumed = self.start.workers[worker]
        idle_epochs = 0
        while True:
            pieces = self.plan.pieces(epoch, slot)
            emitted = yield from self._window_shuffled(pieces, epoch, slot, consumed)
            idle_epochs = idle_epochs + 1 if pieces and not emitted and not consumed else 0
            if idle_epochs > 1:
                raise SslVitError(f"shards {', '.join(self.shards.shards[p[0]].url for p in pieces[:3])} gave no "
                                  "samples for two epochs: are they empty, or is their index out of date?")
            epoch, consumed = epoch + 1, 0

    def _window_shuffled(self, pieces, epoch: int, slot: int, consumed: int):
        """The slot's samples of one epoch through the shuffle window, from `consumed` on."""
        size = self.layout.window
        window, offset = divmod(consumed, size)
        samples = self._read(pieces, skip=window * size)
        buffer, emitted = list(islice(samples, size)), 0
        while buffer:
            following = next(samples, None)  # one sample ahead: is this the epoch's last window?
            order = window_order(self.seed, epoch, slot, window, len(buffer))
            first, last = window * size, len(buffer) - 1 if following is None else -1
            for i in range(offset, len(buffer)):
                yield buffer[order[i]], epoch, [epoch + 1, 0] if i == last else [epoch, first + i + 1]
            emitted += len(buffer) - offset
            if following is None:
                return emitted
            buffer = [following, *islice(samples, size - 1)]
            window, offset = window + 1, 0
        return emitted

    def _read(self, pieces, skip: int):
        """Raw samples of the pieces, after skipping `skip` of them undecoded."""
        for shard, start, stop in pieces:
            url = self.shards.shards[shard].url
            if stop is not None and skip >= stop - start:
                skip -= stop - start
                continue
            held = yield from iter_samples(url, start + skip, stop)
            skip = max(0, skip - (held - start)) if stop is None else 0

    def _eval_samples(self, slot: int, num_slots: int):
        for i in range(slot, len(self.shards.shards), num_slots):
            for sample in iter_samples(self.shards.shards[i].url):
                yield sample, 0, [0, 0]

    # -- decoding and batching --------------------------------------------------------------------------------
    def _decode(self, sample: dict, epoch: int):
        image, label = open_image(sample), decode_label(sample)  # decoded by the transform, at the scale it needs
        if label < 0 and self.require_labels:
            raise SslVitError(f"sample {sample['__key__']} of shard {sample['__url__']} has no label (no cls): "
                              "supervised training and fine-tuning need labeled shards")
        torch.default_generator.manual_seed(stable_seed(self.seed, "views", epoch, sample["__key__"]))
        views = self.transform(image)
        return (views if isinstance(views, (list, tuple, EncodedViews)) else [views]), label, sample["__key__"]

    def _batches(self, samples, worker: int):
        samples, counts = iter(samples), [0, 0]  # seen, skipped
        while True:
            with caller_rng_kept():
                items, position, bad = self._fill(samples, counts)
            if len(items) == self.batch_size or (items and self.mode == "eval"):
                yield collate(items, getattr(self.transform, "specs", None)), BatchMeta(worker, position, *counts, bad)
            if len(items) < self.batch_size:
                self._check_skips(*counts, final=True)
                return

    def _fill(self, samples, counts: list[int]) -> tuple[list, list[int] | None, list[str]]:
        """Decode samples until a batch is full or the stream ends; `counts` (seen, skipped) is updated in place."""
        items, position, bad = [], None, []
        for sample, epoch, position in samples:
            counts[0] += 1
            try:
                items.append(self._decode(sample, epoch))
            except BadSample as e:
                counts[1] += 1
                bad.append(str(e))
                self._check_skips(*counts)
                continue
            if len(items) == self.batch_size:
                break
        return items, position, bad

    def _check_skips(self, seen: int, skipped: int, final: bool = False) -> None:
        if skipped and (seen >= MIN_SAMPLES_BEFORE_SKIP_CHECK or final) and skipped > self.max_skip_fraction * seen:
            raise SslVitError(f"{skipped} of {seen} samples were unreadable ({skipped / seen:.1%} > "
                              f"max_skip_fraction {self.max_skip_fraction:.1%}); see the warnings above for "
                              "shards and keys")


def rank_share(counts: list, rank: int, world: int) -> tuple[int, ...]:
    """`rank`'s part of per-rank counters written by another number of ranks: its own on the same number, else an
    even share of their sums (the remainder to the first ranks)."""
    if len(counts) == world:
        return tuple(int(c) for c in counts[rank])
    return tuple(total // world + (rank < total % world) for total in (sum(int(c[i]) for c in counts)
                                                                        for i in range(len(counts[0]))))


@contextlib.contextmanager
def caller_rng_kept():
    """Restore torch's CPU generator after a batch whose views were drawn from it, seeded per sample (every view op
    draws from it; TorchSeededRandAugment reseeds Python's and NumPy's RNGs from it), so the caller's model-side
    randomness does not depend on the data.

    Per-sample seeding uses the CPU generator alone: `torch.manual_seed`/`fork_rng` also reach every accelerator
    backend through lazy calls that record a stack trace each time, ~2.5 ms per sample — more than decoding and
    cropping a 32-px image."""
    state = torch.default_generator.get_state()
    try:
        yield
    finally:
        torch.default_generator.set_state(state)
