"""MAE reconstruction loss (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners", Sec. 3).

"The loss function computes the mean squared error (MSE) between the reconstructed and original images in the
pixel space. We compute the loss only on masked patches." With `norm_pix_loss` the target of each patch is the patch
normalised by its own mean and standard deviation (Sec. 3, "Reconstruction target"; Table 1c).
"""
import torch

from ssl_vit.losses.precision import float32_math

NORM_PIX_EPS = 1e-6


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[N, C, H, W] → [N, L, p*p*C], patches in row-major order, pixels (row, col, channel) within a patch."""
    n, c, h, w = imgs.shape
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # n c h p w q -> n h w p q c; not einsum: autocast would make it bf16
    return x.reshape(n, gh * gw, p * p * c)  # [N, L, p*p*C]


def unpatchify(patches: torch.Tensor, p: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: [N, L, p*p*C] → [N, C, gh*p, gw*p]."""
    gh, gw = grid
    n = patches.shape[0]
    x = patches.reshape(n, gh, gw, p, p, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # n h w p q c -> n c h p w q
    return x.reshape(n, channels, gh * p, gw * p)


def patch_stats(target_patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std used by norm_pix_loss: [N, L, 1] each.

    The variance is the unbiased one (`Tensor.var`'s default), as in the reference implementation.
    """
    target = target_patches.float()
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + NORM_PIX_EPS) ** 0.5
    return mean, std


@float32_math
def mae_loss(pred: torch.Tensor, target_patches: torch.Tensor, mask: torch.Tensor,
             norm_pix_loss: bool = True) -> torch.Tensor:
    """Mean over masked patches of the per-patch MSE.

    pred, target_patches: [N, L, p*p*C]; mask: [N, L], 1 = removed (the loss counts only these). Computed in float32,
    autocast off.
    """
    target = target_patches
    if norm_pix_loss:
        mean, std = patch_stats(target)
        target = (target - mean) / std
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # [N, L]
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum()
