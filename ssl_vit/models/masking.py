"""Per-sample random patch masking (He et al. 2021, MAE, Sec. 3 "Masking").

Randomness never comes from the global RNG: masks are drawn from the generator the caller passes (the trainer's is
seeded by (run seed, global step, rank, micro-batch), so a run resumed at step k draws exactly the masks the
uninterrupted run drew at step k).
"""
import torch

from ssl_vit.method_settings import num_visible  # the recipe's meaning of mask_ratio


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
