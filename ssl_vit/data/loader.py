"""DataLoader over a ShardStream that tracks the stream position in the main process."""
import logging
import math

import torch
from torch.utils.data import DataLoader

from ssl_vit.data.stream import ShardStream, StreamState
from ssl_vit.errors import SslVitError
from ssl_vit.transforms.gpu_views import DeviceViews, views_to_device

log = logging.getLogger("ssl_vit.data")


def move_to(batch: dict, device: torch.device) -> tuple[dict, DeviceViews]:
    """(the batch on `device`, its uint8 views normalised there, how they were made). JPEG bytes are decoded there
    (`gpu_views`); a sample whose image does not decode there is dropped from views, labels and keys alike."""
    made = views_to_device(batch["views"], device)
    out = {**batch, "views": made.views}
    label, keys = batch["label"], batch["key"]
    if made.unreadable:
        keep = [i for i in range(len(keys)) if i not in made.unreadable]
        label, out["key"] = label[keep], [keys[i] for i in keep]
    out["label"] = label.to(device, non_blocking=device.type == "cuda")
    return out, made


def as_made(transfer: list[dict]) -> list[dict]:
    """The stream's batches as it made them. The DataLoader's default (`default_convert`) would walk every label and
    key of every batch looking for NumPy arrays: ~5 µs per sample, 1 % of the time it takes to make a 32-px view."""
    return transfer


class StreamLoader:
    """Iterates batches of a ShardStream (workers in a fixed round-robin order) and records what was consumed.

    `state` is the resume state of this rank after the last batch handed out; `skip_counts()` sums the per-worker
    seen/skipped counters and the samples the device path dropped here. A skipped sample is warned about once, when
    the batch it was skipped from is consumed (not when a worker reads ahead, nor again in a later epoch).
    `prefetch_factor` is in batches per worker (at least two transfers). `decode_counts()`: how the device path
    decoded the samples handed out by this process (empty on the CPU path).
    """

    def __init__(self, stream: ShardStream, *, device: torch.device | None = None, prefetch_factor: int = 4):
        self.stream, self.device = stream, device or torch.device("cpu")
        num_workers = stream.num_workers  # the stream plans its slots for these workers: one number, one place
        start = stream.start
        self.state = StreamState(start.batches, dict(start.workers), start.layout, start.resplit)
        self._counts: dict[int, tuple[int, int]] = {}
        self._device_skipped = 0
        self._decode_counts: dict[str, int] = {}
        self._warned: set[str] = set()
        transfers_ahead = max(2, math.ceil(prefetch_factor / stream.batches_per_transfer))
        self.loader = DataLoader(stream, batch_size=None, collate_fn=as_made, num_workers=num_workers,
                                 prefetch_factor=transfers_ahead, pin_memory=self.device.type == "cuda",
                                 persistent_workers=False) if num_workers else None

    def __iter__(self):
        # Starting workers draws their base seed from the global RNG; fork it so that a resumed run's model-side
        # randomness (dropout, drop path) continues exactly as in an uninterrupted run.
        # Without workers the stream is read in this process directly: the DataLoader would only add ~17 µs a sample
        # (bench/results/README.md).
        with torch.random.fork_rng(devices=[]):
            transfers = iter(self.loader if self.loader is not None else self.stream)
        try:
            for transfer in transfers:
                for batch, meta in transfer:
                    self.state.update(meta)
                    self._counts[meta.worker] = (meta.seen, meta.skipped)
                    self._warn(meta.bad)
                    # the budget over this rank's whole run, the counts a resumed run restored included
                    self.stream._check_skips(*self.skip_counts())
                    batch["label"] = torch.tensor(batch["label"], dtype=torch.long)
                    batch, made = move_to(batch, self.device)
                    self._count_device_decoding(made, len(batch["key"]) + len(made.unreadable))
                    yield batch
        finally:
            # Workers end here, also when an error from one of them is on its way up: a traceback would otherwise
            # keep them alive, and they ignore the signals that end a run (train/preemption.py).
            shutdown = getattr(transfers, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _warn(self, messages: list[str]) -> None:
        for message in messages:
            if message not in self._warned:
                self._warned.add(message)
                log.warning("skipped: %s", message)

    def _count_device_decoding(self, made: DeviceViews, batch_size: int) -> None:
        """Count a batch's device-path decoding; its unreadable samples are skips within data.max_skip_fraction."""
        for name, count in made.counts.items():
            self._decode_counts[name] = self._decode_counts.get(name, 0) + count
        if not made.unreadable:
            return
        self._device_skipped += len(made.unreadable)
        self._warn(list(made.unreadable.values()))
        if len(made.unreadable) == batch_size:
            raise SslVitError(f"all {batch_size} samples of a batch are unreadable (first: "
                              f"{next(iter(made.unreadable.values()))}); see the warnings above")
        self.stream._check_skips(*self.skip_counts())

    def skip_counts(self) -> tuple[int, int]:
        """(samples seen, samples skipped) by this rank since the run began: the counts a resume restored, the
        workers' counts and the samples the device path dropped in this process (what a checkpoint saves)."""
        restored_seen, restored_skipped = self.stream.restored_skips  # before a resume
        seen = restored_seen + sum(c[0] for c in self._counts.values())
        skipped = restored_skipped + sum(c[1] for c in self._counts.values()) + self._device_skipped
        return seen, skipped

    def decode_counts(self) -> dict[str, int]:
        """{"cpu_decoded_samples": ..., "cpu_reduced_samples": ...} on the device path (empty on the CPU path): samples
        decoded on the CPU since this process started (no JPEG nvJPEG takes — CMYK/YCCK, PNG, truncated —, or one it
        refused that PIL decoded), and images above gpu_views' pixel limit decoded at a reduced scale in a worker."""
        return dict(self._decode_counts)
