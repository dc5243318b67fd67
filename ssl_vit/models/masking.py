"""Per-sample random patch masking (He et al. 2021, MAE, Sec. 3 "Masking") and the seeded generators it draws from.

Randomness never comes from the global RNG: every step draws from a generator seeded by (run seed, global step,
rank, micro-batch), so a run resumed at step k draws exactly the masks the uninterrupted run drew at step k.
"""
import numpy as np
import torch
import torch.distributed as dist

from ssl_vit.errors import SslVitError


def current_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def step_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers such as (seed, step, rank, micro_batch) via numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def step_generator(*parts: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded from `step_seed(*parts)`."""
    return torch.Generator(device="cpu").manual_seed(step_seed(*parts))


class StepRandomness:
    """Seeds per-step randomness from (batch['seed'], batch['step'], rank, micro-batch index within the step).

    The micro-batch index counts calls that share one global step (gradient accumulation), so accumulated
    micro-batches draw different masks; it restarts at 0 on every new step, hence also after a resume.
    """

    def __init__(self):
        self._step, self._micro = None, 0

    def seed(self, batch: dict) -> int:
        if "seed" not in batch or "step" not in batch:
            raise SslVitError("batch: needs 'seed' and 'step' (the trainer adds them) to draw reproducible randomness")
        step = int(batch["step"])
        self._micro = self._micro + 1 if step == self._step else 0
        self._step = step
        return step_seed(batch["seed"], step, current_rank(), self._micro)

    def generator(self, batch: dict) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed(batch))


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees: `int(L * (1 - mask_ratio))`, as in the reference code."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(x: torch.Tensor, mask_ratio: float, generator: torch.Generator):
    """Keep a uniformly random subset of `int(L*(1-r))` tokens per sample (argsort of uniform noise).

    x: [N, L, D] patch tokens. Returns
      x_visible   [N, K, D]  the kept tokens, in shuffled order,
      mask        [N, L]     1 where the patch was removed, 0 where kept (in the original patch order),
      ids_restore [N, L]     the inverse permutation that puts [kept, removed] tokens back in patch order.
    The noise is drawn on the CPU generator and then moved to x's device, so masks do not depend on the device.
    """
    n, length, dim = x.shape
    keep = num_visible(length, mask_ratio)
    noise = torch.rand(n, length, generator=generator).to(x.device)  # [N, L]
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the smallest noise values are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]  # [N, K]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))  # [N, K, D]
    mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # [N, L] back in patch order
    return x_visible, mask, ids_restore
