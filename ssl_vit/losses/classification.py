"""Classification losses for the supervised baseline: label-smoothed cross-entropy (Szegedy et al. 2016, "Rethinking
the Inception Architecture", Sec. 7) and the soft-target cross-entropy used with mixup/cutmix targets."""
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from ssl_vit.losses.precision import float32_math

_soft_ce = SoftTargetCrossEntropy()


@float32_math
def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """logits [B, C]; targets either class indices [B] (smoothed CE) or soft targets [B, C] (already smoothed).
    Computed in float32, autocast off."""
    if targets.ndim == 2:
        return _soft_ce(logits, targets)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


@torch.no_grad()
def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max equals the label."""
    return (logits.argmax(dim=-1) == labels).float().mean().item()
