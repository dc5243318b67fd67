"""The DINO self-distillation loss (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Student probabilities P_s(x) = softmax(g_s(x) / τ_s) (Eq. 1); teacher probabilities are centred and sharpened,
P_t(x) = softmax((g_t(x) − c) / τ_t) (Sec. 3.1, "Avoiding collapse"); the loss is the cross-entropy
H(P_t(x), P_s(x')) = −Σ_k P_t(x)_k log P_s(x')_k over every pair of a teacher global view x and a *different*
student view x' (Eq. 3), averaged over pairs and samples as in the reference code. After the loss, the centre moves
towards the batch mean of the teacher logits: c ← m c + (1 − m) mean_i g_t(x_i) (Eq. 4), the mean taken over every
teacher row on every process.

`centering="sinkhorn_knopp"` replaces centring by three Sinkhorn-Knopp iterations over the batch, as DINOv2 does
(Oquab et al. 2023, Sec. 4; from SwAV, Caron et al. 2020): the teacher targets become the soft assignment of the
batch's rows to the K prototypes with equal total mass per prototype. Equipartition holds from the first step
instead of being approached through an EMA, so a short run does not spend its steps escaping a collapsed teacher. The
centre is then neither used nor updated (`kl_to_center` becomes KL(p̄ ‖ uniform), ~0 by construction).
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from ssl_vit.losses.precision import float32_math


def _all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
@float32_math
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets [N, K] from logits [N, K] (the rows of every process form one batch): exp(logits / temp)
    rescaled so that each prototype (column) holds 1/K of the batch's mass and each row sums to 1 (exactly after the
    last iteration). In log space: at temperature 0.04, exp() of logits a few units apart underflows float32."""
    log_q = logits / temp
    k, n = log_q.shape[1], log_q.shape[0] * _world_size()
    for _ in range(iterations):
        log_q = log_q - _global_logsumexp_over_rows(log_q) - math.log(k)  # every prototype: mass 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(n)  # every row: mass 1/N
    return (log_q + math.log(n)).exp()


def _global_logsumexp_over_rows(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 0 of `x` [N, K] stacked from all processes.  # [1, K]"""
    top = _all_reduce(x.max(dim=0, keepdim=True).values.clone(), dist.ReduceOp.MAX if dist.is_available() else None)
    return top + _all_reduce((x - top).exp().sum(dim=0, keepdim=True)).log()


def _global_mean(rows: torch.Tensor) -> torch.Tensor:
    """Mean over rows of `rows` [N, K] on all processes (all-reduced when torch.distributed runs).  # [K]"""
    return _all_reduce(rows.sum(dim=0)) / (rows.shape[0] * _world_size())


@dataclass
class TeacherTargets:
    """What the student is trained towards: teacher probabilities `probs` [G, B, K] and two diagnostics over all of
    them (see `DINOLoss`), so that the micro-batches of one step can share targets computed over the whole step."""
    probs: torch.Tensor
    teacher_entropy: torch.Tensor
    kl_to_center: torch.Tensor

    def split(self, sizes: list[int]) -> list["TeacherTargets"]:
        """One `TeacherTargets` per consecutive run of `sizes` samples; the diagnostics are shared."""
        return [replace(self, probs=p) for p in self.probs.split(sizes, dim=1)]


class DINOLoss(nn.Module):
    """Centred, sharpened teacher vs. student cross-entropy over pairs of different views (DINO Eq. 1, 3, 4).

    `forward(student, teacher, teacher_temp)` takes logits `student` [V, B, K] (views in order: the G global
    views first, then the local ones) and `teacher` [G, B, K] (global views only; teacher view g and student view g
    are the same crop, so that pair is skipped). It is `student_loss(student, teacher_targets(teacher, teacher_temp))`
    and returns a dict of tensors:

    - `loss`: the mean of H(P_t(x_g), P_s(x_v)) over the G·V − G pairs with g ≠ v and over the batch.
    - `teacher_entropy`: mean over teacher rows of the entropy −Σ_k P_t,k log P_t,k (nats). It tends to ln K when
      the teacher output becomes uniform (the collapse that centring alone causes) and to 0 when it becomes one-hot
      (the collapse that sharpening alone causes; Sec. 5.3, Fig. 7).
    - `student_kl`: `loss − teacher_entropy`, the mean KL(P_t ‖ P_s) over the pairs: the part of the loss the student
      can reduce. Early in a run the loss itself rises while the teacher temperature warms up; this should fall.
    - `kl_to_center`: KL(p̄ ‖ q), with p̄ the mean over teacher rows of P_t and q = softmax(c / τ_t) the teacher's
      distribution for the centre itself. It is 0 when the batch's mean teacher distribution is what the centre
      alone would give (e.g. every logit vector flat across dimensions, the uniform collapse), and large when
      centring flattens a dimension that dominates every output.

    Both diagnostics use the centre before this call's update. The centre (a buffer, saved in checkpoints) is
    updated by `teacher_targets`, only in training mode.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "center"):
        super().__init__()
        if centering not in ("center", "sinkhorn_knopp"):
            raise ValueError(f"DINOLoss: centering must be 'center' or 'sinkhorn_knopp', got {centering!r}")
        if out_dim < 1 or student_temp <= 0 or not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"DINOLoss: need out_dim ≥ 1, student_temp > 0 and center_momentum in [0, 1], got "
                             f"{out_dim}, {student_temp}, {center_momentum}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(out_dim))

    def _check(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        if student.ndim != 3 or teacher.ndim != 3:
            raise ValueError(f"DINOLoss: expected student [V, B, K] and teacher [G, B, K] logits, got "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        (v, b, k), (g, bt, kt) = student.shape, teacher.shape
        if (b, k) != (bt, kt) or k != self.out_dim:
            raise ValueError(f"DINOLoss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must "
                             f"share batch size and out_dim={self.out_dim}")
        if not 1 <= g <= v or v < 2:
            raise ValueError(f"DINOLoss: need ≥ 2 student views and 1..{v} teacher views, got V={v}, G={g}")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, teacher_temp: float) -> dict:
        self._check(student, teacher)
        return self.student_loss(student, self.teacher_targets(teacher, teacher_temp))

    @torch.no_grad()
    @float32_math  # softmax at temperature 0.04 over bf16 logits, and the centre's EMA, lose too much in bf16
    def teacher_targets(self, teacher: torch.Tensor, teacher_temp: float) -> TeacherTargets:
        """P_t of the teacher logits `teacher` [G, B, K]: centred and sharpened (Eq. 4), or Sinkhorn-Knopp; then, in
        training mode, the centre moves towards these logits' mean."""
        if teacher_temp <= 0:
            raise ValueError(f"DINOLoss: teacher_temp must be positive, got {teacher_temp}")
        g, b = teacher.shape[:2]
        teacher = teacher.detach()
        if self.centering == "sinkhorn_knopp":
            pt = sinkhorn_knopp(teacher.flatten(0, 1), teacher_temp).unflatten(0, (g, b))  # [G, B, K]
            log_pt = pt.clamp_min(1e-30).log()
        else:
            log_pt = F.log_softmax((teacher - self.center) / teacher_temp, dim=-1)  # [G, B, K]
            pt = log_pt.exp()
        entropy = -(pt * log_pt).sum(dim=-1).mean()
        mean_pt = pt.mean(dim=(0, 1))  # [K]
        log_q = F.log_softmax(self.center / teacher_temp, dim=-1)
        kl = (mean_pt * (mean_pt.clamp_min(1e-30).log() - log_q)).sum()
        if self.training and self.centering == "center":
            self.update_center(teacher.flatten(0, 1))
        return TeacherTargets(pt, entropy, kl)

    @float32_math  # under autocast the einsum below would run in bf16 and round the loss to multiples of 1/32
    def student_loss(self, student: torch.Tensor, targets: TeacherTargets) -> dict:
        """The cross-entropy of the student logits `student` [V, B, K] to `targets` (probs [G, B, K])."""
        self._check(student, targets.probs)
        pt, g, v, b = targets.probs, targets.probs.shape[0], student.shape[0], student.shape[1]
        log_ps = F.log_softmax(student / self.student_temp, dim=-1)  # [V, B, K]
        # Cross-entropy of every (teacher view, student view) pair in one contraction.
        ce = -torch.einsum("gbk,vbk->gv", pt, log_ps) / b  # [G, V]
        pairs = ~torch.eye(g, v, dtype=torch.bool, device=ce.device)
        loss = ce[pairs].mean()
        entropy = targets.teacher_entropy
        return {"loss": loss, "teacher_entropy": entropy, "student_kl": loss.detach() - entropy,
                "kl_to_center": targets.kl_to_center}

    @torch.no_grad()
    def update_center(self, teacher_rows: torch.Tensor) -> None:
        """Eq. 4: EMA of the teacher logits' batch mean (over all processes). `teacher_rows`: [N, K]."""
        batch_center = _global_mean(teacher_rows.to(self.center.dtype))
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)

    @property
    def max_entropy(self) -> float:
        """ln K: the loss and the teacher entropy of a uniform (collapsed) teacher."""
        return math.log(self.out_dim)
