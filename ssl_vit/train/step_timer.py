"""Step time and data wait that mean what they say on an asynchronous device.

CUDA kernels run after the Python that launched them returns. Timed on the host alone, a step's optimizer update
and EMA (launched, not finished) spill into the next step's clock, and the host's wait for the next batch overlaps
device work, so `data_wait_frac` says neither how long the device idled for data nor how long a step took. On a
timed step the device is drained at the three marks: before the batch is fetched (the previous step is finished),
once it is on the device, and after the update. The wait is then the time the device had nothing to do but wait for
the batch, and the step its full time.

Cost: only steps that are logged are timed this way (every `train.log_every`, 10 by default). Each loses the overlap
of one step's tail with the next step's host work: the loop's own Python and the fetch of a batch the loader already
holds (a queue get and a host-to-device copy, ~1-5 ms for a 224-px batch), i.e. below 0.1 % of throughput at 0.3 s
steps logged every 10. The other steps use the host clock only (for images/s on the progress bar and the run's total
time). On the CPU there is nothing to drain: every mark is a plain clock read.
"""
import time

import torch


class StepTimer:
    def __init__(self, device: torch.device):
        self._drain = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self.exact = False
        self._t0 = self._t_data = 0.0

    def _now(self) -> float:
        if self.exact:
            self._drain()
        return time.perf_counter()

    def start(self, exact: bool) -> None:
        """Before the batch is fetched; `exact`: drain the device at every mark of this step."""
        self.exact = exact
        self._t0 = self._now()

    def data_ready(self) -> None:
        """The step's batches have been fetched (and copied to the device)."""
        self._t_data = self._now()

    def stop(self) -> tuple[float, float]:
        """After the optimizer update: (step seconds, seconds spent waiting for the data)."""
        end = self._now()
        return end - self._t0, self._t_data - self._t0
