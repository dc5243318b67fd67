"""Elastic resume at web scale: re-splitting an epoch over new readers in memory that grows with shards and readers,
not samples; and the same shares as the per-sample definition (every sample of an epoch once, none lost)."""
import random
import time
import tracemalloc

import pytest

from ssl_vit.data.epochs import EpochPlan, Layout, resplit_state, window_order


# -- the definition, one Python int per sample (what the re-split computed before it worked on intervals) ----------
def reference_work(counts, seed, layout: Layout, resplit: dict | None, epoch: int, slot: int) -> list[int]:
    """Epoch-sequence indices slot `slot` reads in `epoch`, in reading order."""
    if resplit and epoch in (resplit["epoch"], resplit["epoch"] + 1):
        old_layout, old_resplit = Layout(**resplit["old_layout"]), resplit["old_resplit"]
        positions = {int(s): p for s, p in resplit["old_positions"].items()}
        taken = {i for s, p in positions.items()
                 for i in reference_consumed(counts, seed, old_layout, old_resplit, epoch, s, p)}
        if epoch == resplit["epoch"]:  # what the old readers were given and had not consumed
            given = {i for s in positions for i in reference_work(counts, seed, old_layout, old_resplit, epoch, s)}
        else:  # the next epoch, less what old readers had already taken of it
            given = set(range(sum(counts)))
        left = sorted(given - taken)
        first = max(resplit["first_batch"], epoch * layout.batches_per_epoch)
    else:
        left, first = list(range(sum(counts))), epoch * layout.batches_per_epoch
    end = (epoch + 1) * layout.batches_per_epoch
    sizes = [layout.batches(s % layout.workers, first, end) * layout.micro_batch for s in range(layout.num_slots)]
    start = sum(sizes[:slot])
    return left[start:start + sizes[slot]]


def reference_consumed(counts, seed, layout, resplit, epoch, slot, position) -> list[int]:
    at_epoch, count = position
    mine = reference_work(counts, seed, layout, resplit, epoch, slot)
    if at_epoch != epoch:
        return mine if at_epoch > epoch else []
    full, offset = divmod(count, layout.window)
    taken = mine[:full * layout.window]
    if offset:
        length = min(layout.window, len(mine) - full * layout.window)
        order = window_order(seed, epoch, slot, full, length)[:offset]
        taken += [mine[full * layout.window + i] for i in order]
    return taken


def expanded(plan: EpochPlan, epoch: int, slot: int) -> list[int]:
    return [i for a, b in plan.work(epoch, slot) for i in range(a, b)]


def random_layout(rng: random.Random, global_batch: int, samples: int) -> Layout:
    world = rng.choice([w for w in (1, 2, 3, 4) if global_batch % w == 0])
    micro = global_batch // world
    return Layout(world, rng.randint(1, 3), micro, rng.randint(1, 2), rng.randint(3, 40), samples // global_batch)


def stopped_positions(rng: random.Random, plan: EpochPlan, epoch: int, first_batch: int, exact: bool) -> dict:
    """Where each slot stands: `exact`, after the rank batches before `first_batch` (as a checkpoint records);
    otherwise anywhere in `epoch`, or already in the next (a reader that finished its share)."""
    lay, positions = plan.layout, {}
    since = epoch * lay.batches_per_epoch  # the rank batch the slots' shares of `epoch` start at
    if plan.resplit is not None:
        since = max(since, plan.resplit.first_batch)
    for slot in range(lay.num_slots):
        length = sum(b - a for a, b in plan.work(epoch, slot))
        if exact:
            count = lay.batches(slot % lay.workers, since, first_batch) * lay.micro_batch
            positions[slot] = [epoch, count] if count < length else [epoch + 1, 0]
        else:
            positions[slot] = [epoch + 1, rng.randint(0, 3)] if rng.random() < 0.15 else [epoch, rng.randint(0, length)]
    return positions


@pytest.mark.parametrize("case", range(12))
def test_resplit_equals_the_per_sample_definition(case):
    rng = random.Random(case)
    counts = [rng.randint(1, 60) for _ in range(rng.randint(3, 14))]
    global_batch, exact = rng.choice([4, 6, 12]), case % 2 == 0
    seed, epoch = case, rng.randint(0, 2)
    layout = random_layout(rng, global_batch, sum(counts))
    resplit, first_batch = None, epoch * layout.batches_per_epoch + rng.randint(0, layout.batches_per_epoch - 1)
    for resume in range(2):  # resumed on another layout, then again (the second re-split reads the first)
        plan = EpochPlan(len(counts), counts, seed, layout, resplit)
        positions = stopped_positions(rng, plan, epoch, first_batch, exact)
        resplit, epoch = resplit_state(counts, seed, layout, positions, resplit, first_batch)
        old_layout, layout = layout, random_layout(rng, global_batch, sum(counts))
        plan = EpochPlan(len(counts), counts, seed, layout, resplit)
        for e in (epoch, epoch + 1, epoch + 2):
            shares = [expanded(plan, e, slot) for slot in range(layout.num_slots)]
            assert shares == [reference_work(counts, seed, layout, resplit, e, slot)
                              for slot in range(layout.num_slots)], (case, e)
            # no sample twice in an epoch: the new shares, and what the old readers had consumed of it
            consumed = [i for s, p in positions.items()
                        for i in reference_consumed(counts, seed, old_layout, resplit["old_resplit"], e, s, p)]
            seen = [i for share in shares for i in share] + consumed
            assert len(seen) == len(set(seen)) and set(seen) <= set(range(sum(counts)))
            if exact and e == epoch and resume == 0:  # none lost: the epoch's steps, one global batch each
                assert len(seen) == layout.batches_per_epoch * global_batch, (case, e)
        first_batch = max(first_batch, epoch * layout.batches_per_epoch) + rng.randint(0, 3)


def resplit_cost(samples_per_shard: int) -> tuple[float, int, int]:
    """(seconds, peak traced bytes, pieces) of resuming 32 processes × 8 workers as 64 × 4 over 100,000 shards,
    the old readers stopped a third into the epoch, each inside a 2,000-sample shuffle window: the
    state the ranks compute, then the pieces of three new slots of this epoch and one of the next (the work each
    DataLoader worker does)."""
    shards = 100_000
    counts = [samples_per_shard] * shards
    per_epoch = shards * samples_per_shard // 2048
    old = Layout(world=32, workers=8, micro_batch=64, per_transfer=1, window=2000, batches_per_epoch=per_epoch)
    new = Layout(world=64, workers=4, micro_batch=32, per_transfer=1, window=2000, batches_per_epoch=per_epoch)
    first_batch = per_epoch // 3 + 7
    positions = {slot: [0, old.batches(slot % old.workers, 0, first_batch) * 64] for slot in range(old.num_slots)}
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        record, epoch = resplit_state(counts, 0, old, positions, None, first_batch)
        plan = EpochPlan(shards, counts, 0, new, record)
        pieces = [plan.pieces(epoch, slot) for slot in (0, 1, new.num_slots - 1)] + [plan.pieces(epoch + 1, 5)]
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert all(pieces)
    return seconds, peak, sum(len(p) for p in pieces)


def test_resplitting_a_billion_sample_epoch_takes_megabytes():
    """10^9 samples (100,000 shards × 10,000, counts only): one entry per sample would be 8 GB per worker. The
    re-split stays under 128 MiB and takes the time and memory of 10^7 samples on the same shards and readers."""
    big_seconds, big_peak, big_pieces = resplit_cost(10_000)
    small_seconds, small_peak, _ = resplit_cost(100)
    assert big_peak < 128 * 2**20, big_peak
    assert big_peak < 1.5 * small_peak and big_seconds < 4 * small_seconds + 1, (big_peak, small_peak,
                                                                                 big_seconds, small_seconds)
    assert big_pieces > 3  # a real plan: the slots' shares are pieces of shards (each split by the old readers)
