"""The streaming reader: shards → (rank, worker) split → block shuffle → decode → views → batches.

Every (rank, DataLoader worker) pair is one *slot*. The dataset itself assigns work to slots, so accelerate must not
shard or dispatch the loader again (the trainer builds the DataLoader itself and moves batches to the device).

Training (`mode="train"`): endless. In epoch e the shard order is a permutation seeded by (seed, e); slot s takes
every (world·workers)-th shard from position s. A slot reads `group_size` shards at a time and emits their samples in
a permutation seeded by (seed, e, slot, group): a shuffle buffer whose state is a pure function of the position
(epoch, group, offset), so a resumed run continues the same stream exactly. Augmentation randomness is seeded by
(seed, epoch, sample key) in torch's CPU generator (restored after each batch), so it does not depend on which
process decodes a sample.

Evaluation (`mode="eval"`): every sample exactly once, in shard order, with its key; shards are dealt round-robin
to slots, so slots may hold unequal counts (the feature extractor gathers variable-length results).

Batches are formed inside the worker (`DataLoader(batch_size=None)`); each carries its slot's position, so the
trainer knows where every worker stands. A worker hands over `batches_per_transfer` batches at a time: every transfer
from a worker process costs ~1 ms in the worker and ~1 ms in the main process whatever its size, which for small
images (a 64-image batch of 32-px crops takes ~45 ms to make) is a few per cent of the machine; so batches of small
views travel in groups of at least TRANSFER_BYTES (batches of 224-px views travel alone). The DataLoader hands
out transfers from workers in a fixed round-robin order; on resume the logical worker ids are rotated, and the worker
that was in the middle of a transfer first sends the rest of it, so that the batch sequence continues where it
stopped.
"""
import contextlib
import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from ssl_vit.data.samples import BadSample, decode_image, decode_label, read_shard
from ssl_vit.data.sources import ShardList, expand_source
from ssl_vit.errors import SslVitError

log = logging.getLogger("ssl_vit.data")

MIN_SAMPLES_BEFORE_SKIP_CHECK = 100
TRANSFER_BYTES = 3 << 20  # with workers, batches of views are handed over in groups of at least this size
MAX_BATCHES_PER_TRANSFER = 8


def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, identical across processes and Python runs (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def permutation(n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator).tolist()


@dataclass
class Position:
    """Where one slot stands: the next sample is `offset` in group `group` of epoch `epoch`."""

    epoch: int = 0
    group: int = 0
    offset: int = 0

    def as_list(self) -> list[int]:
        return [self.epoch, self.group, self.offset]


@dataclass
class StreamState:
    """Resume state of one rank: batches consumed, each logical worker's position after its last batch, and how many
    batches a worker hands over at a time (the round-robin unit)."""

    batches: int = 0
    workers: dict[int, list[int]] = field(default_factory=dict)
    batches_per_transfer: int = 1

    def to_dict(self) -> dict:
        return {"batches": self.batches, "workers": {str(k): v for k, v in self.workers.items()},
                "batches_per_transfer": self.batches_per_transfer}

    @classmethod
    def from_dict(cls, d: dict) -> "StreamState":
        return cls(int(d["batches"]), {int(k): list(v) for k, v in d["workers"].items()},
                   int(d.get("batches_per_transfer", 1)))

    def update(self, batch: dict) -> None:
        """Record a consumed batch (call in the main process, in consumption order)."""
        self.batches += 1
        self.workers[int(batch["_worker"])] = list(batch["_position"])


def collate(items: list[tuple[list[torch.Tensor], int, str]]) -> dict:
    """Views stacked to [B, 3, H, W] tensors; labels and keys as lists.

    Every tensor a DataLoader worker returns crosses to the main process through its own shared-memory handshake
    (~1 ms each), so labels travel as a list and StreamLoader makes the tensor. default_collate stacks straight into
    shared memory inside a worker, saving a copy per batch."""
    views = [default_collate(list(v)) for v in zip(*(item[0] for item in items))]
    return {"views": views, "label": [item[1] for item in items], "key": [item[2] for item in items]}


class ShardStream(IterableDataset):
    """Batches of views from WebDataset shards for one rank; see the module docstring for the guarantees."""

    def __init__(self, source, transform: Callable, batch_size: int, *, mode: str = "train", seed: int = 0,
                 group_size: int = 1, rank: int = 0, world_size: int = 1, max_skip_fraction: float = 0.01,
                 num_workers: int = 0):
        if mode not in ("train", "eval"):
            raise SslVitError(f"stream mode must be 'train' or 'eval', got {mode!r}")
        if batch_size < 1:
            raise SslVitError(f"batch size must be ≥ 1, got {batch_size}")
        self.shards: ShardList = source if isinstance(source, ShardList) else expand_source(source)
        self.transform, self.batch_size, self.mode, self.seed = transform, batch_size, mode, seed
        self.group_size, self.rank, self.world_size = max(1, group_size), rank, world_size
        self.max_skip_fraction, self.num_workers = max_skip_fraction, max(0, num_workers)
        sizes = getattr(transform, "sizes", None)  # MultiViewTransform's view sizes
        self.start = StreamState(batches_per_transfer=batches_per_transfer(batch_size, sizes) if self.num_workers
                                 else 1)
        slots = self.world_size * max(1, self.num_workers)
        if mode == "train" and len(self.shards.shards) < slots:
            raise SslVitError(f"{len(self.shards.shards)} shards cannot feed {self.world_size} processes × "
                              f"{max(1, self.num_workers)} workers = {slots} readers; write more, smaller shards "
                              "(ssl-vit shards write --max-count) or use fewer workers")

    def resume_from(self, state: StreamState | dict) -> None:
        """Continue from `state` (it keeps the transfer size it was written with, so the sequence continues)."""
        self.start = state if isinstance(state, StreamState) else StreamState.from_dict(state)

    @property
    def batches_per_transfer(self) -> int:
        return self.start.batches_per_transfer

    def _logical_worker(self) -> tuple[int, int, int]:
        """(logical worker id, number of workers, batches in this worker's first transfer)."""
        info = get_worker_info()
        workers = info.num_workers if info else 1
        if info and workers != max(1, self.num_workers):
            raise SslVitError(f"stream built for {self.num_workers} workers runs in a loader with {workers}")
        physical = info.id if info else 0
        transfers_done, batches_into_transfer = divmod(self.start.batches, self.batches_per_transfer)
        first = self.batches_per_transfer - (batches_into_transfer if physical == 0 else 0)
        return (physical + transfers_done) % workers, workers, first

    def __iter__(self):
        """Lists of batches: one transfer from this worker each."""
        worker, workers, first_transfer = self._logical_worker()
        slot, num_slots = self.rank * workers + worker, self.world_size * workers
        samples = self._train_samples(slot, num_slots, worker) if self.mode == "train" else \
            self._eval_samples(slot, num_slots)
        return self._transfers(self._batches(samples, worker), first_transfer)

    def _transfers(self, batches, first: int):
        size, transfer = first, []
        for batch in batches:
            transfer.append(batch)
            if len(transfer) == size:
                yield transfer
                size, transfer = self.batches_per_transfer, []
        if transfer:
            yield transfer

    # -- sample streams: yield (raw sample, epoch, position after it) -------------------------------------------
    def shard_order(self, epoch: int, slot: int, num_slots: int) -> list[int]:
        order = permutation(len(self.shards.shards), stable_seed(self.seed, "shards", epoch))
        return order[slot::num_slots]

    def _train_samples(self, slot: int, num_slots: int, worker: int):
        position = Position(*self.start.workers.get(worker, [0, 0, 0]))
        epoch, first_group, first_offset = position.epoch, position.group, position.offset
        while True:
            mine = self.shard_order(epoch, slot, num_slots)
            groups = [mine[i:i + self.group_size] for i in range(0, len(mine), self.group_size)]
            for g in range(first_group, len(groups)):
                group = [s for i in groups[g] for s in read_shard(self.shards.shards[i].url)]
                order = permutation(len(group), stable_seed(self.seed, "group", epoch, slot, g))
                for offset in range(first_offset, len(order)):
                    yield group[order[offset]], epoch, Position(epoch, g, offset + 1)
                first_offset = 0
            epoch, first_group = epoch + 1, 0

    def _eval_samples(self, slot: int, num_slots: int):
        for i in range(slot, len(self.shards.shards), num_slots):
            for offset, sample in enumerate(read_shard(self.shards.shards[i].url)):
                yield sample, 0, Position(0, i, offset + 1)

    # -- decoding and batching --------------------------------------------------------------------------------
    def _decode(self, sample: dict, epoch: int):
        image, label = decode_image(sample), decode_label(sample)
        torch.default_generator.manual_seed(stable_seed(self.seed, "views", epoch, sample["__key__"]))
        views = self.transform(image)
        return (views if isinstance(views, (list, tuple)) else [views]), label, sample["__key__"]

    def _batches(self, samples, worker: int):
        samples, counts = iter(samples), [0, 0]  # seen, skipped
        while True:
            with caller_rng_kept():
                items, position = self._fill(samples, counts)
            if len(items) == self.batch_size:
                yield self._emit(items, worker, position, *counts)
                continue
            self._check_skips(*counts, final=True)
            if items and self.mode == "eval":
                yield self._emit(items, worker, position, *counts)
            return

    def _fill(self, samples, counts: list[int]) -> tuple[list, Position | None]:
        """Decode samples until a batch is full or the stream ends; `counts` (seen, skipped) is updated in place."""
        items, position = [], None
        for sample, epoch, position in samples:
            counts[0] += 1
            try:
                items.append(self._decode(sample, epoch))
            except BadSample as e:
                counts[1] += 1
                log.warning("skipped: %s", e)
                self._check_skips(*counts)
                continue
            if len(items) == self.batch_size:
                break
        return items, position

    def _emit(self, items, worker: int, position: Position, seen: int, skipped: int) -> dict:
        batch = collate(items)
        batch.update(_worker=worker, _position=position.as_list(), _seen=seen, _skipped=skipped)
        return batch

    def _check_skips(self, seen: int, skipped: int, final: bool = False) -> None:
        if skipped and (seen >= MIN_SAMPLES_BEFORE_SKIP_CHECK or final) and skipped > self.max_skip_fraction * seen:
            raise SslVitError(f"{skipped} of {seen} samples were unreadable ({skipped / seen:.1%} > "
                              f"max_skip_fraction {self.max_skip_fraction:.1%}); see the warnings above for "
                              "shards and keys")

    def samples_per_epoch(self) -> int | None:
        return self.shards.num_samples


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


def batches_per_transfer(batch_size: int, view_sizes: list[int] | None) -> int:
    """How many batches a worker hands over at once: enough for TRANSFER_BYTES of float32 RGB views (1 where the
    view sizes are unknown)."""
    if not view_sizes:
        return 1
    batch_bytes = batch_size * sum(3 * 4 * size * size for size in view_sizes)
    return max(1, min(MAX_BATCHES_PER_TRANSFER, math.ceil(TRANSFER_BYTES / batch_bytes)))


def steps_per_epoch(num_samples: int | None, global_batch: int) -> int | None:
    return None if num_samples is None else max(1, math.floor(num_samples / global_batch))
