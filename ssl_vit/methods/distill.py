"""DeiT-style distillation (Touvron et al. 2021, Sec. 4): a student ViT with a distillation token (timm's
`deit_*_distilled_*` family, or the recipe's plain `vit_*` given one: ssl_vit/models/distilled.py, its pretrained
weights moved in by `model.init`) learns the labels through its class token and a frozen teacher classifier's outputs
through its distillation token; evaluation and export use the average of the two heads, as DeiT does (timm's
`VisionTransformerDistilled` averages them outside training).

`supervised.distill.teacher` names the teacher (a fine-tuned run here, or `timm:<name>`); `ssl_vit.loading` loads it
and hands it in: the teacher stays in eval mode, without gradients, and is not trained.
"""
import torch
from torch import nn

from ssl_vit.errors import SslVitError
from ssl_vit.losses.classification import top1_accuracy
from ssl_vit.losses.distill import hard_distillation_loss, soft_distillation_loss
from ssl_vit.methods.base import BuildContext
from ssl_vit.methods.supervised import Supervised
from ssl_vit.models.backbone import BackboneSpec
from ssl_vit.models.distilled import distilled_spec


class DistilledSupervised(Supervised):
    """Supervised training of a DeiT student against labels and a frozen teacher (Sec. 4, Eq. 2 soft / Eq. 3 hard)."""

    def __init__(self, backbone: BackboneSpec, num_classes: int, settings, teacher: nn.Module,
                 layer_decay: float = 1.0):
        super().__init__(backbone, num_classes, settings, layer_decay=layer_decay)
        self.encoder.set_distilled_training(True)
        distill = settings.distill
        self.kind, self.tau, self.alpha = distill.kind, distill.tau, distill.alpha
        self.teacher = teacher.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: its dropout, drop path and BatchNorm statistics never train
        return self

    def forward(self, batch: dict, sched: dict, seed: int) -> dict:
        imgs, labels = batch["views"][0], self._labels(batch)
        targets = labels
        if self.mixup is not None and self.training:
            imgs, targets = self._mix(imgs, labels, seed)  # the teacher sees the same mixed images
        out = self.encoder(imgs)  # training: (class head [B, C], distillation head [B, C]); eval: their mean
        if not isinstance(out, tuple):
            return {"loss": torch.nn.functional.cross_entropy(out.float(), labels), "acc": top1_accuracy(out, labels)}
        cls_logits, dist_logits = out
        with torch.no_grad():
            teacher_logits = self.teacher(imgs)  # [B, C]
        if self.kind == "hard":
            loss = hard_distillation_loss(cls_logits, dist_logits, targets, teacher_logits, self.alpha,
                                          self.label_smoothing)
        else:
            loss = soft_distillation_loss(cls_logits, dist_logits, targets, teacher_logits, self.alpha, self.tau,
                                          self.label_smoothing)
        mean = (cls_logits + dist_logits) / 2
        return {"loss": loss, "acc": top1_accuracy(mean, labels),
                "teacher_agreement": top1_accuracy(dist_logits, teacher_logits.argmax(dim=-1))}


def student_backbone(recipe, spec: BackboneSpec) -> BackboneSpec:
    """The backbone the `supervised` method trains (and exports): with a teacher, the recipe's ViT with a
    distillation token."""
    return distilled_spec(spec) if recipe.supervised.distill.teacher else spec


def build_supervised(recipe, spec: BackboneSpec, context: BuildContext) -> Supervised:
    """The `supervised` method: a plain classifier, or a distilled student when `supervised.distill.teacher` is set."""
    distill = recipe.supervised.distill
    if not distill.teacher:
        return Supervised.from_recipe(recipe, spec, context)
    if context.load_classifier is None:
        raise SslVitError("supervised.distill.teacher: this caller cannot load a teacher (build through "
                          "ssl_vit.loading.method_from_recipe)")
    teacher = context.load_classifier(distill.teacher, context.num_classes)
    return DistilledSupervised(spec, context.num_classes, recipe.supervised, teacher,
                               layer_decay=recipe.optim.layer_decay)
