"""DeiT's distillation losses (Touvron et al. 2021, "Training data-efficient image transformers & distillation
through attention", Sec. 4): the class token's head learns the labels, the distillation token's head the teacher.

Both are computed in float32 with autocast off (`float32_math`), as the other losses are.
"""
import torch
import torch.nn.functional as F

from ssl_vit.losses.classification import classification_loss
from ssl_vit.losses.precision import float32_math


@float32_math
def hard_distillation_loss(cls_logits: torch.Tensor, dist_logits: torch.Tensor, targets: torch.Tensor,
                           teacher_logits: torch.Tensor, alpha: float = 0.5,
                           label_smoothing: float = 0.0) -> torch.Tensor:
    """Eq. 3 with DeiT's weight α: (1 − α) CE(ψ(Z_cls), y) + α CE(ψ(Z_dist), y_t), y_t = argmax_c Z_t (α = ½ is the
    paper's). cls/dist/teacher logits [B, C]; targets: labels [B] or mixup's soft targets [B, C]."""
    teacher_labels = teacher_logits.argmax(dim=-1)  # [B]
    return (1 - alpha) * classification_loss(cls_logits, targets, label_smoothing) + \
        alpha * F.cross_entropy(dist_logits, teacher_labels)


@float32_math
def soft_distillation_loss(cls_logits: torch.Tensor, dist_logits: torch.Tensor, targets: torch.Tensor,
                           teacher_logits: torch.Tensor, alpha: float = 0.5, tau: float = 1.0,
                           label_smoothing: float = 0.0) -> torch.Tensor:
    """Eq. 2, the KL term on the distillation head: (1 − λ) CE(ψ(Z_cls), y) + λ τ² KL(ψ(Z_t/τ) ‖ ψ(Z_dist/τ)),
    λ = `alpha`, the KL summed over classes and averaged over the batch."""
    kl = F.kl_div(F.log_softmax(dist_logits / tau, dim=-1), F.log_softmax(teacher_logits / tau, dim=-1),
                  reduction="batchmean", log_target=True)
    return (1 - alpha) * classification_loss(cls_logits, targets, label_smoothing) + alpha * tau * tau * kl
