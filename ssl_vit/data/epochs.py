"""Which samples each reader takes in each epoch: every sample once per epoch, for any shard and reader count.

A *slot* is one (rank, DataLoader worker) reader, numbered rank-major. A rank's batches are numbered j = 0, 1, ...
over the whole run; the DataLoader hands them out in transfers of T batches, transfer t from logical worker t mod W.
Epoch e holds each rank's batches [e·P, (e+1)·P), P = steps per epoch × accumulation steps.

Counted sources (every shard's sample count is known from an index): epoch e's sample sequence is the shards in a
permutation seeded by (seed, e), each shard's samples in tar order, numbered 0..N-1. Slot by slot, each takes the
next (its batches in epoch e) × micro-batch samples of it, so an epoch uses steps × global batch samples, each
once; the rest (fewer than a global batch) falls at another place of the next epoch's permutation. Shards need not
divide among readers: a shard may be split between slots, each reading its part and skipping the rest undecoded.

Uncounted sources (a pattern without an index): pass e deals whole shards round-robin to the slots; every shard
once per pass, but slots are not kept in step with each other.

Resuming with another number of processes or workers (counted sources only): the samples of the current epoch that
the old readers had not consumed are cut into the new slots' shares (`Resplit`), and so is the next epoch minus
what old readers had already taken from it; later epochs follow the new layout. No sample is seen twice in an epoch
and none is lost; the order differs from an uninterrupted run.
"""
import bisect
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ssl_vit.seeding import stable_seed

Piece = tuple[int, int, int | None]  # (shard index, first sample, end sample or None: to the end of the shard)


@dataclass(frozen=True)
class Layout:
    """How one run reads: ranks × workers, the micro-batch, batches per transfer, the shuffle window, P."""

    world: int
    workers: int
    micro_batch: int
    per_transfer: int
    window: int
    batches_per_epoch: int | None  # per rank; None for uncounted sources

    @property
    def num_slots(self) -> int:
        return self.world * self.workers

    def batches(self, worker: int, first: int, end: int) -> int:
        """How many of a rank's batches first ≤ j < end logical worker `worker` makes."""
        return max(0, self._below(worker, end) - self._below(worker, first))

    def _below(self, worker: int, n: int) -> int:
        cycle = self.per_transfer * self.workers
        return n // cycle * self.per_transfer + min(max(n % cycle - worker * self.per_transfer, 0), self.per_transfer)

    def to_dict(self) -> dict:
        return asdict(self)


def permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def window_order(seed: int, epoch: int, slot: int, window: int, length: int) -> list[int]:
    """The order in which a slot emits the samples of one shuffle window."""
    return permutation(length, stable_seed(seed, "window", epoch, slot, window))


class EpochPlan:
    """Pure functions of (shard counts, seed, layout, resplit): the pieces of shards each slot reads per epoch."""

    def __init__(self, num_shards: int, counts: list[int] | None, seed: int, layout: Layout,
                 resplit: dict | None = None):
        self.num_shards, self.counts, self.seed, self.layout = num_shards, counts, seed, layout
        self.resplit = Resplit.from_dict(resplit, counts, seed) if resplit else None

    def shard_order(self, epoch: int) -> list[int]:
        return permutation(self.num_shards, stable_seed(self.seed, "shards", epoch))

    def pieces(self, epoch: int, slot: int) -> list[Piece]:
        if self.counts is None:
            order = self.shard_order(epoch)
            return [(shard, 0, None) for shard in order[slot::self.layout.num_slots]]
        return self._to_pieces(epoch, self.work(epoch, slot))

    def work(self, epoch: int, slot: int) -> list[tuple[int, int]]:
        """The slot's samples of the epoch as intervals of the epoch's sample sequence, in reading order."""
        if self.resplit is not None and epoch in (self.resplit.epoch, self.resplit.epoch + 1):
            return self.resplit.work(epoch, slot, self.layout)
        sizes = self.shares(epoch * self.layout.batches_per_epoch, epoch)
        start = sum(sizes[:slot])
        return [(start, start + sizes[slot])]

    def shares(self, first_batch: int, epoch: int) -> list[int]:
        """Samples each slot needs for its batches from rank batch `first_batch` to the end of `epoch`."""
        lay = self.layout
        end = (epoch + 1) * lay.batches_per_epoch
        return [lay.batches(slot % lay.workers, first_batch, end) * lay.micro_batch for slot in range(lay.num_slots)]

    def _to_pieces(self, epoch: int, intervals: list[tuple[int, int]]) -> list[Piece]:
        order = self.shard_order(epoch)
        starts = np.concatenate([[0], np.cumsum([self.counts[s] for s in order])]).tolist()
        pieces = []
        for a, b in intervals:
            i = bisect.bisect_right(starts, a) - 1
            while a < b:
                end = min(b, starts[i + 1])
                if end > a:
                    pieces.append((order[i], a - starts[i], end - starts[i]))
                a, i = end, i + 1
        return pieces

    def consumed(self, epoch: int, slot: int, position: list[int]) -> np.ndarray:
        """Epoch-sequence indices a slot at `position` (epoch, samples consumed) has consumed of `epoch`."""
        at_epoch, count = position
        intervals = self.work(epoch, slot)
        if at_epoch < epoch:
            return np.zeros(0, np.int64)
        indices = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in intervals] or [np.zeros(0, np.int64)])
        if at_epoch > epoch:
            return indices
        window = self.layout.window
        full, offset = divmod(count, window)
        taken = list(range(full * window))
        if offset:
            length = min(window, len(indices) - full * window)
            taken += [full * window + i for i in window_order(self.seed, epoch, slot, full, length)[:offset]]
        return indices[np.asarray(taken, dtype=np.int64)]


@dataclass
class Resplit:
    """The rest of `epoch` (and `epoch`+1) after a resume on another layout, cut into the new slots' shares."""

    epoch: int
    first_batch: int       # the new layout's first rank batch
    old_layout: Layout
    old_positions: dict    # old slot → [epoch, consumed], every old slot
    old_resplit: dict | None
    counts: list[int]
    seed: int

    @classmethod
    def from_dict(cls, d: dict, counts: list[int], seed: int) -> "Resplit":
        return cls(int(d["epoch"]), int(d["first_batch"]), Layout(**d["old_layout"]),
                   {int(k): list(v) for k, v in d["old_positions"].items()}, d.get("old_resplit"), counts, seed)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "first_batch": self.first_batch, "old_layout": self.old_layout.to_dict(),
                "old_positions": {str(k): v for k, v in self.old_positions.items()}, "old_resplit": self.old_resplit}

    def work(self, epoch: int, slot: int, layout: Layout) -> list[tuple[int, int]]:
        old = EpochPlan(len(self.counts), self.counts, self.seed, self.old_layout, self.old_resplit)
        taken = [old.consumed(epoch, s, p) for s, p in sorted(self.old_positions.items())]
        if epoch == self.epoch:  # what the old slots were given and had not consumed
            given = [np.arange(a, b) for s in self.old_positions for a, b in old.work(epoch, s)]
            left = np.setdiff1d(np.concatenate(given), np.concatenate(taken))
        else:  # the next epoch, less what old slots had already taken from it
            left = np.setdiff1d(np.arange(sum(self.counts)), np.concatenate(taken))
        new = EpochPlan(len(self.counts), self.counts, self.seed, layout)
        sizes = new.shares(max(self.first_batch, epoch * layout.batches_per_epoch), epoch)
        start = min(sum(sizes[:slot]), len(left))
        return runs(left[start:start + sizes[slot]])


def runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """Sorted indices as intervals [a, b) of consecutive values."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(indices)]])
    return [(int(indices[a]), int(indices[b - 1]) + 1) for a, b in zip(starts, ends)]


def resplit_state(counts: list[int], seed: int, old_layout: Layout, old_positions: dict,
                  old_resplit: dict | None, first_batch: int) -> tuple[dict, int]:
    """(resplit record, epoch every new slot starts at) for a resume on another layout."""
    old = EpochPlan(len(counts), counts, seed, old_layout, old_resplit)
    normalised = []
    for slot, (epoch, count) in old_positions.items():
        length = sum(b - a for a, b in old.work(epoch, slot))
        normalised.append(epoch + 1 if count >= length else epoch)
    epoch = min(normalised)
    record = {"epoch": epoch, "first_batch": first_batch, "old_layout": old_layout.to_dict(),
              "old_positions": {str(k): list(v) for k, v in old_positions.items()}, "old_resplit": old_resplit}
    return record, epoch
