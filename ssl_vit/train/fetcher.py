"""Each step's batches are fetched by a helper thread, so that a rank waiting for data still answers a preemption.

A `pipe:` reader can stall for minutes (a slow or hung object store, a DataLoader worker blocked in its read). Were the
main thread blocked in the DataLoader until the data came, a SIGTERM would go unanswered until the scheduler's SIGKILL
and no checkpoint would be written. Instead the main thread asks for a step's batches and waits for them in slices of
POLL_SECONDS, asking between slices whether it was signalled. Signalled, it waits GRACE_SECONDS more (batches already
on their way arrive in milliseconds: the step is trained, as without a stall) and then stops waiting; the batches in
flight are dropped (the trainer's checkpoint holds the stream position from before the request, so they are read
again on resume). Signalled before it asks, it does not ask.

The thread fetches only on request, never ahead: between requests the loader's position is that of the batches the
trainer consumed. It blocks the preemption signals for its whole life: the DataLoader workers it starts inherit the
mask and stay deaf to the signals that end a run (torch's worker handler would let them die before the checkpoint),
while Python runs the trainer's handler in the main thread, which keeps them unblocked.

Without DataLoader workers the thread decodes in this process, and its per-sample seeding touches torch's CPU
generator: a batch that arrives while a stopped run saves its checkpoint could change the RNG state saved. Remote
shards are read with workers (they also keep decoding off the training process).
"""
import multiprocessing
import queue
import signal
import threading
import time
from typing import Callable

import torch

POLL_SECONDS = 0.05
GRACE_SECONDS = 5.0  # of the 30 s torch elastic leaves before its SIGKILL; a checkpoint write needs the rest


class StepFetcher:
    def __init__(self, loader, signals, device: torch.device):
        self._loader, self._signals, self._device = loader, tuple(signals), device
        self._requests: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._in_flight = False
        self._older_children = set(multiprocessing.active_children())  # the workers are what starts after these
        self._threads = torch.get_num_threads()  # the trainer's choice (threads.py), which a new thread lacks
        self._thread = threading.Thread(target=self._serve, name="ssl_vit-fetch", daemon=True)
        self._thread.start()

    def batches(self, count: int, signalled: Callable[[], bool]) -> list | None:
        """The next `count` batches; None when `signalled()` before they are asked for, or GRACE_SECONDS after it
        turned true while waiting for them."""
        if signalled():
            return None
        if not self._in_flight:
            self._requests.put(count)
            self._in_flight = True
        give_up_at = None
        while True:
            try:
                outcome, value = self._results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if give_up_at is None and signalled():
                    give_up_at = time.monotonic() + GRACE_SECONDS
                if give_up_at is not None and time.monotonic() >= give_up_at:
                    return None
                continue
            self._in_flight = False
            if outcome == "error":
                raise value
            return value

    def close(self) -> None:
        """End the thread and the DataLoader workers. A request still in flight may be stuck in a read that never
        returns: its workers are killed (SIGKILL; they are deaf to SIGTERM, and at exit multiprocessing would wait
        for them forever) and the daemon thread is left to the process's exit."""
        if self._in_flight:
            for worker in set(multiprocessing.active_children()) - self._older_children:
                worker.kill()
            return
        self._requests.put(None)
        self._thread.join()

    def _serve(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, self._signals)
        torch.set_num_threads(self._threads)
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)  # the current device is per thread
        batches = iter(self._loader)
        try:
            while (count := self._requests.get()) is not None:
                try:
                    self._results.put(("ok", [next(batches) for _ in range(count)]))
                except BaseException as e:  # raised in the main thread, which decides what it means
                    self._results.put(("error", e))
                    return
        finally:
            batches.close()  # ends the DataLoader workers (StreamLoader's own cleanup)
