"""Speed work kept out of the stream's plain path: batches travel from DataLoader workers in groups (transfers).

Every transfer from a worker process costs ~1 ms in the worker and ~1 ms in the main process whatever its size
(bench/results/README.md), which for small images (a 64-image batch of 32-px crops takes ~45 ms to make) is a few per
cent of the machine; so batches of small views travel in groups of at least TRANSFER_BYTES (batches of 224-px views
travel alone). The DataLoader takes transfers from workers in a fixed round-robin order, so rank batch j comes from
logical worker (j // T) mod W. On resume the logical worker ids are rotated, and the worker that was in the middle of
a transfer first sends the rest of it, so that the batch sequence continues where it stopped.
"""
import math

TRANSFER_BYTES = 3 << 20
MAX_BATCHES_PER_TRANSFER = 8


def batches_per_transfer(batch_size: int, view_sizes: list[int] | None) -> int:
    """How many batches a worker hands over at once: enough for TRANSFER_BYTES of uint8 RGB views (1 where the view
    sizes are unknown)."""
    if not view_sizes:
        return 1
    batch_bytes = batch_size * sum(3 * size * size for size in view_sizes)
    return max(1, min(MAX_BATCHES_PER_TRANSFER, math.ceil(TRANSFER_BYTES / batch_bytes)))


def logical_worker(physical: int, workers: int, batches_done: int, per_transfer: int) -> tuple[int, int]:
    """(logical worker id, batches in its first transfer) of a DataLoader worker after `batches_done` batches."""
    transfers_done, into_transfer = divmod(batches_done, per_transfer)
    first = per_transfer - (into_transfer if physical == 0 else 0)
    return (physical + transfers_done) % workers, first


def in_transfers(batches, first: int, size: int):
    """Lists of batches: `first` batches, then `size` at a time."""
    count, transfer = first, []
    for batch in batches:
        transfer.append(batch)
        if len(transfer) == count:
            yield transfer
            count, transfer = size, []
    if transfer:
        yield transfer
