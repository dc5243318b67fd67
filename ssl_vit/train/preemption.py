"""Preemption: a scheduler's SIGTERM or SIGUSR1 becomes a checkpoint after the same step on every rank.

SLURM and Kubernetes send SIGTERM (SLURM's `--signal` usually SIGUSR1) a while before they kill a job. The handler
only records the signal. At each step boundary, once it has its next batches, every rank calls `stop_agreed()`, one
all-reduced scalar, so all ranks stop after the same step whichever of them was signalled; the trainer then writes
its usual checkpoint and raises `Preempted`, a SystemExit with status 75 (EX_TEMPFAIL, "try again later") for the
batch script to requeue on. A rank still waiting for its batches when it is signalled (a stalled `pipe:` reader)
waits a few seconds more, then gives up on them (train/fetcher.py) and agrees: the checkpoint holds the steps
finished and the stream position before the batches it gave up on, which a resumed run reads again. A rank stalled
in its read hears only its own signal, as schedulers send it to every rank.

Who gets the signal: `accelerate launch --multi_gpu` (torch elastic) forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT —
and SIGUSR1 when PET_SIGNALS_TO_HANDLE lists it — to each rank's process group, then sends SIGKILL after
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 by default); SLURM signals every process of a job step. Either way a
rank's DataLoader workers get it too, and torch's worker handler lets SIGTERM kill them: the rank would then fail on
its next batch before it can save. So the workers are started by a thread that blocks these signals for life
(train/fetcher.py): they inherit the mask and stay deaf to them; the rank ends them when it is done.
"""
import signal
import threading

import torch

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """The run stopped early on a signal, after a checkpoint. Uncaught, the process exits with EXIT_PREEMPTED,
    whichever command ran the trainer; `train.resume=auto` continues the run exactly."""

    def __init__(self, step: int, checkpoint):
        super().__init__(EXIT_PREEMPTED)
        self.step, self.checkpoint = step, checkpoint

    def __str__(self) -> str:
        return f"preempted at step {self.step}: checkpoint {self.checkpoint}; resubmit with train.resume=auto"


class PreemptionWatch:
    """Context manager around a training loop: while inside, SIGTERM/SIGUSR1 only set a flag in this process.

    Handlers can only be set from the main thread; elsewhere (a trainer run in a thread) signals keep their defaults.
    """

    def __init__(self, accelerator, signals=SIGNALS):
        self.acc, self.signals = accelerator, tuple(signals)
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._note) for sig in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _note(self, signum, frame) -> None:
        self.received = signal.Signals(signum)

    def signalled(self) -> bool:
        """Whether this process has received one of the signals (no collective)."""
        return self.received is not None

    def stop_agreed(self) -> bool:
        """Collective (every rank calls it after the same step): True on all ranks once any of them was signalled."""
        if self.acc.num_processes == 1:
            return self.received is not None
        flag = torch.tensor(float(self.received is not None), device=self.acc.device)
        return self.acc.reduce(flag, reduction="sum").item() > 0

    def stopped(self, step: int, checkpoint) -> Preempted:
        """The exception that ends a preempted run; the main process prints its one line."""
        preempted = Preempted(step, checkpoint)
        self.acc.print(preempted)
        return preempted
