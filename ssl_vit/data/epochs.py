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
and none is lost; the order differs from an uninterrupted run. The re-split works on intervals of the epoch's sample
sequence (`Spans`), never on one entry per sample: its memory and time grow with the shards and readers (and the
shuffle window a reader stopped in), so an epoch of 10^9 samples re-splits in every DataLoader worker in megabytes.
"""
import bisect
from dataclasses import asdict, dataclass, field

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
        self._starts: dict[int, list[int]] = {}

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
        if epoch not in self._starts:  # every slot's share of the epoch, computed once (a resume asks for all)
            self._starts[epoch] = np.cumsum([0, *self.shares(epoch * self.layout.batches_per_epoch, epoch)]).tolist()
        starts = self._starts[epoch]
        return [(starts[slot], starts[slot + 1])]

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

    def consumed(self, epoch: int, slot: int, position: list[int]) -> "Spans":
        """The epoch-sequence indices a slot at `position` (epoch, samples consumed) has consumed of `epoch`: every
        window before the one it stands in, and the part of that window its shuffled order has emitted."""
        at_epoch, count = position
        work = Spans.of(self.work(epoch, slot))
        if at_epoch != epoch:
            return work if at_epoch > epoch else Spans.empty()
        window = self.layout.window
        full, offset = divmod(count, window)
        done = work.take(0, full * window)
        if offset:
            length = min(window, work.total - full * window)
            order = window_order(self.seed, epoch, slot, full, length)[:offset]
            done = done.union(Spans.points(work.at(full * window + np.asarray(order, dtype=np.int64))))
        return done


class Spans:
    """A set of epoch-sequence indices as sorted, disjoint half-open intervals [starts[i], ends[i]): what re-splitting
    an epoch works on, so that its memory grows with the readers and shards, never with the samples (an epoch of
    10^9 samples as index arrays is 8 GB)."""

    def __init__(self, starts, ends):
        self.starts, self.ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)

    @classmethod
    def empty(cls) -> "Spans":
        return cls([], [])

    @classmethod
    def of(cls, intervals) -> "Spans":
        """Intervals in any order, possibly touching or overlapping (empty ones dropped)."""
        pairs = np.asarray([(a, b) for a, b in intervals if b > a], dtype=np.int64).reshape(-1, 2)
        return cls.empty().union(cls(pairs[:, 0], pairs[:, 1]))

    @classmethod
    def points(cls, values: np.ndarray) -> "Spans":
        return cls.empty().union(cls(values, values + 1))

    @classmethod
    def union_of(cls, sets: list["Spans"]) -> "Spans":
        merged = cls(np.concatenate([s.starts for s in sets] or [[]]), np.concatenate([s.ends for s in sets] or [[]]))
        return cls.empty().union(merged)

    @property
    def total(self) -> int:
        return int((self.ends - self.starts).sum())

    def intervals(self) -> list[tuple[int, int]]:
        return list(zip(self.starts.tolist(), self.ends.tolist()))

    def union(self, other: "Spans") -> "Spans":
        return self._combine(other, np.logical_or)

    def minus(self, other: "Spans") -> "Spans":
        return self._combine(other, lambda mine, theirs: mine & ~theirs)

    def _combine(self, other: "Spans", keep) -> "Spans":
        """The points where `keep(in self, in other)` holds, by one sweep over both sets' boundaries."""
        xs = np.concatenate([self.starts, self.ends, other.starts, other.ends])
        if not len(xs):
            return Spans.empty()
        n, m = len(self.starts), len(other.starts)
        mine = np.concatenate([np.ones(n), -np.ones(n), np.zeros(2 * m)]).astype(np.int64)
        theirs = np.concatenate([np.zeros(2 * n), np.ones(m), -np.ones(m)]).astype(np.int64)
        order = np.argsort(xs, kind="stable")
        xs, mine, theirs = xs[order], np.cumsum(mine[order]), np.cumsum(theirs[order])
        last = np.append(xs[1:] != xs[:-1], True)  # the state after every boundary at one x has been crossed
        xs, inside = xs[last], keep(mine[last] > 0, theirs[last] > 0)[:-1]  # inside[i]: on [xs[i], xs[i+1])
        if not inside.any():
            return Spans.empty()
        before, after = np.append(False, inside[:-1]), np.append(inside[1:], False)
        return Spans(xs[:-1][inside & ~before], xs[1:][inside & ~after])

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The indices at `positions` (0-based) of the set read in increasing order."""
        ends = np.cumsum(self.ends - self.starts)
        i = np.searchsorted(ends, positions, side="right")
        return self.starts[i] + positions - (ends[i] - (self.ends[i] - self.starts[i]))

    def take(self, first: int, count: int) -> "Spans":
        """The `count` indices from position `first` on (fewer where the set ends), as spans."""
        lengths = self.ends - self.starts
        before = np.cumsum(lengths) - lengths  # position of each span's first index
        lo, hi = first, first + count
        keep = (before + lengths > lo) & (before < hi)
        starts = self.starts[keep] + np.maximum(lo - before[keep], 0)
        ends = self.starts[keep] + np.minimum(hi - before[keep], lengths[keep])
        return Spans(starts, ends)


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
    _left: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # epoch → Spans

    @classmethod
    def from_dict(cls, d: dict, counts: list[int], seed: int) -> "Resplit":
        return cls(int(d["epoch"]), int(d["first_batch"]), Layout(**d["old_layout"]),
                   {int(k): list(v) for k, v in d["old_positions"].items()}, d.get("old_resplit"), counts, seed)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "first_batch": self.first_batch, "old_layout": self.old_layout.to_dict(),
                "old_positions": {str(k): v for k, v in self.old_positions.items()}, "old_resplit": self.old_resplit}

    def left(self, epoch: int) -> Spans:
        """The samples of `epoch` no old slot consumed: in `self.epoch`, what the old slots were given and had not
        consumed; in the next, the whole epoch less what old slots had already taken from it. Computed once."""
        if epoch not in self._left:
            old = EpochPlan(len(self.counts), self.counts, self.seed, self.old_layout, self.old_resplit)
            slots = sorted(self.old_positions.items())
            taken = Spans.union_of([old.consumed(epoch, slot, position) for slot, position in slots])
            if epoch == self.epoch:
                base = Spans.union_of([Spans.of(old.work(epoch, slot)) for slot, _ in slots])
            else:
                base = Spans([0], [sum(self.counts)])
            self._left[epoch] = base.minus(taken)
        return self._left[epoch]

    def work(self, epoch: int, slot: int, layout: Layout) -> list[tuple[int, int]]:
        left = self.left(epoch)
        new = EpochPlan(len(self.counts), self.counts, self.seed, layout)
        sizes = new.shares(max(self.first_batch, epoch * layout.batches_per_epoch), epoch)
        return left.take(sum(sizes[:slot]), sizes[slot]).intervals()


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
