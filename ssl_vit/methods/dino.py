"""DINO: self-distillation with no labels (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers", Algorithm 1, Sec. 3.1 and App. "Implementation details"; reference: facebookresearch/dino).

A student (backbone + DINOHead) sees all views; an EMA teacher of the same architecture sees the global views only;
`DINOLoss` matches the centred, sharpened teacher distribution of each global view to the student distribution of
every other view.
"""
from dataclasses import replace
from functools import partial

import torch
from torch import nn

from ssl_vit.method_settings import DINOConfig
from ssl_vit.errors import SslVitError
from ssl_vit.heads.dino_head import DINOHead
from ssl_vit.losses.dino_loss import DINOLoss, TeacherTargets
from ssl_vit.methods.base import BuildContext, Method
from ssl_vit.models.backbone import BackboneSpec, create_backbone
from ssl_vit.schedules import cosine, linear_warmup_then_constant


class MultiCropNet(nn.Module):
    """Backbone + head over a list of views, as DINO's `MultiCropWrapper`: each run of consecutive views with one
    resolution is concatenated and sent through the backbone in one call; the head then runs once on all CLS
    features."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        feats, start = [], 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(views[start:end])))  # [(end-start)*B, D]
            start = end
        logits = self.head(torch.cat(feats))  # [V*B, K]
        return logits.unflatten(0, (len(views), -1))  # [V, B, K]


TARGETS = "dino_targets"  # the batch entry `prepare_step` adds


def _sched(sched: dict, name: str) -> float:
    if name not in sched:
        raise KeyError(f"sched has no {name!r}: the trainer must evaluate DINO.schedules() every step")
    return float(sched[name])


class DINO(Method):
    """DINO (Caron et al. 2021, Algorithm 1): student θ_s trained on H(P_t, P_s) (Eq. 3); teacher θ_t ← m θ_t +
    (1 − m) θ_s (Sec. 3.1, "Teacher network"), m following a cosine schedule from `momentum_teacher` to 1.

    Views: `batch['views']` lists the `num_global` global views first, then the local views. `backbone()` is the
    teacher's backbone, the one the paper evaluates. Every local crop must be a size the ViT accepts, so the backbone
    is always built with `dynamic_img_size=True`.
    """

    def __init__(self, backbone: BackboneSpec, settings: DINOConfig | None = None, num_global: int = 2, **changes):
        """`settings` (the recipe's `dino` section; its defaults when None), with `changes` to single fields."""
        super().__init__()
        s = replace(settings or DINOConfig(), **changes)
        s.check(backbone)
        if num_global < 1:
            raise SslVitError(f"num_global_views: DINO needs ≥ 1 global view (views marked global_view: true, as "
                              f"the dino preset marks them), got {num_global}")
        self.num_global = num_global
        self.teacher_temp, self.warmup_teacher_temp = s.teacher_temp, s.warmup_teacher_temp
        self.warmup_teacher_temp_epochs = s.warmup_teacher_temp_epochs
        self.momentum_teacher = s.momentum_teacher
        self.freeze_last_layer_epochs = s.freeze_last_layer_epochs
        spec = replace(backbone, dynamic_img_size=True)
        make_head = partial(DINOHead, out_dim=s.out_dim, hidden_dim=s.hidden_dim, bottleneck_dim=s.bottleneck_dim,
                            norm_last_layer=s.norm_last_layer, use_bn=s.use_bn_in_head)
        student = create_backbone(spec)
        self.student = MultiCropNet(student, make_head(student.num_features))
        # The reference teacher has no stochastic depth; its weights start equal to the student's.
        teacher = create_backbone(replace(spec, drop_path_rate=0.0))
        self.teacher = MultiCropNet(teacher, make_head(teacher.num_features))
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.loss = DINOLoss(s.out_dim, student_temp=s.student_temp, center_momentum=s.center_momentum,
                             centering=s.centering)

    @classmethod
    def from_recipe(cls, recipe, spec: BackboneSpec, context: BuildContext) -> "DINO":
        return cls(spec, recipe.dino, num_global=context.num_global_views)

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict:
        """`momentum`: cosine momentum_teacher → 1 over the run; `teacher_temp`: linear warm-up
        warmup_teacher_temp → teacher_temp over `warmup_teacher_temp_epochs` (clipped to the run), then constant;
        `freeze_last_layer`: 1.0 during the first `freeze_last_layer_epochs`, else 0.0."""
        warmup = min(round(self.warmup_teacher_temp_epochs * steps_per_epoch), total_steps)
        frozen_steps = round(self.freeze_last_layer_epochs * steps_per_epoch)
        return {"momentum": partial(cosine, total=total_steps, start=self.momentum_teacher, end=1.0),
                "teacher_temp": partial(linear_warmup_then_constant, warmup_steps=warmup,
                                        start=self.warmup_teacher_temp, end=self.teacher_temp),
                "freeze_last_layer": partial(_before, frozen_steps)}

    def prepare_step(self, batches: list[dict], sched: dict) -> list[dict]:
        """The teacher's targets for all micro-batches of the step at once: with `optim.accum_steps` > 1 the centre
        (or Sinkhorn-Knopp) and the teacher head's BatchNorm then see the step's whole batch, as one large batch
        would, and the centre moves once per optimizer step. (The student head's BatchNorm still normalises each
        micro-batch: holding the whole batch's student activations is what accumulation avoids.)"""
        for batch in batches:
            self._check_views(batch["views"])
        targets = self._teacher_targets([batch["views"] for batch in batches], _sched(sched, "teacher_temp"))
        return [{**batch, TARGETS: t} for batch, t in zip(batches, targets)]

    def forward(self, batch: dict, sched: dict, seed: int | None = None) -> dict:
        """`seed` is unused: DINO draws no randomness of its own (its views come augmented)."""
        if TARGETS not in batch:  # called outside the trainer, which prepares (and checks) the step's batches
            batch = self.prepare_step([batch], sched)[0]
        out = self.loss.student_loss(self.student(batch["views"]), batch[TARGETS])  # student logits [V, B, K]
        return {**out, "teacher_temp": _sched(sched, "teacher_temp"), "momentum": _sched(sched, "momentum")}

    @torch.no_grad()
    def _teacher_targets(self, views_per_batch: list, teacher_temp: float) -> list[TeacherTargets]:
        """One teacher pass over the global views of every micro-batch → targets per micro-batch."""
        sizes = [views[0].shape[0] for views in views_per_batch]
        global_views = [torch.cat([views[g] for views in views_per_batch]) for g in range(self.num_global)]
        teacher = self.teacher(global_views)  # [G, ΣB, K]
        return self.loss.teacher_targets(teacher, teacher_temp).split(sizes)

    def _check_views(self, views) -> None:
        if not isinstance(views, (list, tuple)) or len(views) < max(2, self.num_global):
            n = len(views) if isinstance(views, (list, tuple)) else type(views).__name__
            raise SslVitError(f"batch['views']: DINO needs a list of ≥ {max(2, self.num_global)} views "
                              f"({self.num_global} global first), got {n}")
        shapes = [tuple(v.shape) for v in views]
        if any(len(s) != 4 or s[0] != shapes[0][0] for s in shapes):
            raise SslVitError(f"batch['views']: every view must be [B, 3, H, W] with one B, got {shapes}")
        if len({s[-2:] for s in shapes[:self.num_global]}) != 1:
            raise SslVitError(f"batch['views']: the {self.num_global} global views must share one size, got "
                              f"{shapes[:self.num_global]}")

    def before_optimizer_step(self, step: int, sched: dict) -> None:
        """During the first epoch(s) the prototypes stay fixed (App. "Implementation details"): drop their grads,
        so the optimizer (AdamW skips parameters without a gradient) leaves them, and their weight decay, alone."""
        if _sched(sched, "freeze_last_layer") > 0:
            for param in self.student.head.last_layer.parameters():
                param.grad = None

    @torch.no_grad()
    def on_step_end(self, step: int, sched: dict) -> None:
        """EMA teacher update θ_t ← m θ_t + (1 − m) θ_s for backbone and head (Sec. 3.1, "Teacher network")."""
        m = _sched(sched, "momentum")
        teacher = list(self.teacher.parameters())
        student = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, student, alpha=1.0 - m)

    def backbone(self) -> nn.Module:
        return self.teacher.backbone


def _before(limit: int, step: int) -> float:
    return float(step < limit)
