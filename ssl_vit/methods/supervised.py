"""Supervised baseline and fine-tuning: the same timm ViT with timm's linear head, trained with label-smoothed
cross-entropy and optional mixup (Zhang et al. 2018) / cutmix (Yun et al. 2019) through `timm.data.Mixup` (DeiT
recipe, Touvron et al. 2021, Sec. 6). With `model.init` it starts from a pretrained backbone (copied in by
`ssl_vit.loading.method_from_recipe`) and, with `optim.layer_decay` < 1, trains with layer-wise lr decay: MAE's
end-to-end fine-tuning (He et al. 2021, App. A.3)."""
import contextlib
from dataclasses import replace

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.optim import param_groups_layer_decay

from ssl_vit.method_settings import SettingsError, SupervisedConfig
from ssl_vit.errors import SslVitError
from ssl_vit.losses.classification import classification_loss, top1_accuracy
from ssl_vit.methods.base import BuildContext, Method
from ssl_vit.models.backbone import BackboneSpec, create_backbone


@contextlib.contextmanager
def numpy_global_seed(seed: int):
    """Run a block under numpy's global RNG seeded with `seed`, then put the caller's global state back."""
    saved = np.random.get_state()
    np.random.seed(seed % 2 ** 32)
    try:
        yield
    finally:
        np.random.set_state(saved)


class Supervised(Method):
    """Classification of `batch['views'][0]` against `batch['label']`; logs top-1 accuracy on the batch.

    `acc` compares the logits with the batch's hard labels (not the mixed targets), so with mixup/cutmix it is the
    accuracy on the mixed images against each image's own label.
    """

    def __init__(self, backbone: BackboneSpec, num_classes: int, settings: SupervisedConfig | None = None,
                 layer_decay: float = 1.0, **changes):
        """`settings` (the recipe's `supervised` section; its defaults when None), with `changes` to single fields."""
        super().__init__()
        s = replace(settings or SupervisedConfig(), **changes)
        s.check(backbone)
        if num_classes < 2:
            raise SettingsError(f"data.num_classes: supervised training needs ≥ 2 classes, got {num_classes} (set it, "
                              "or train from shards whose index.json lists the classes)")
        self.encoder = create_backbone(backbone, num_classes=num_classes)
        self.layer_decay = layer_decay
        self.num_classes, self.label_smoothing = num_classes, s.label_smoothing
        self.mixup = None
        if (s.mixup > 0 or s.cutmix > 0) and s.mixup_prob > 0:
            self.mixup = Mixup(mixup_alpha=s.mixup, cutmix_alpha=s.cutmix, prob=s.mixup_prob,
                               label_smoothing=s.label_smoothing, num_classes=num_classes)

    @classmethod
    def from_recipe(cls, recipe, spec: BackboneSpec, context: BuildContext) -> "Supervised":
        return cls(spec, context.num_classes, recipe.supervised, layer_decay=recipe.optim.layer_decay)

    def classifier(self) -> torch.nn.Module:
        return self.encoder

    def param_groups(self, weight_decay: float) -> list[dict]:
        """With `layer_decay` < 1 (fine-tuning; BEiT, Bao et al. 2021; MAE App. A.3): timm's layer-wise groups, the
        lr of layer i of L scaled by layer_decay^(L + 1 − i) — the head at full lr, the patch embedding lowest."""
        if self.layer_decay == 1.0:
            return super().param_groups(weight_decay)
        groups = param_groups_layer_decay(self.encoder, weight_decay=weight_decay, layer_decay=self.layer_decay,
                                          no_weight_decay_list=self.encoder.no_weight_decay())
        for group in groups:
            group["wd_scale"] = 1.0 if group["weight_decay"] > 0 else 0.0
        return groups

    def _labels(self, batch: dict) -> torch.Tensor:
        labels = batch["label"]
        if (labels < 0).any():
            raise SslVitError("supervised training needs labels: the batch has unlabeled samples (label -1); "
                              "train from shards written from a labelled ImageFolder tree")
        if (labels >= self.num_classes).any():
            raise SslVitError(f"data.num_classes: a label {int(labels.max())} is ≥ num_classes={self.num_classes}")
        return labels

    def _mix(self, imgs: torch.Tensor, labels: torch.Tensor, seed: int):
        """(mixed images, soft targets [B, C]). timm's Mixup pairs images and needs an even batch: in an odd one (an
        odd per-process batch, or one the device path dropped an undecodable image from) the last image is left
        unmixed, its target the smoothed one-hot, rather than ending the run."""
        even = imgs.shape[0] - imgs.shape[0] % 2
        mixed, targets = imgs[:even], labels[:even]
        if even:
            # timm's Mixup draws λ and boxes from numpy's *global* RNG; seeding it with the caller's seed for just
            # this call makes a resumed run mix exactly as the uninterrupted one and leaves the caller's RNG alone.
            with numpy_global_seed(seed):
                mixed, targets = self.mixup(imgs[:even].clone(), labels[:even])  # Mixup mixes in place
        if even == imgs.shape[0]:
            return mixed, targets
        last = mixup_target(labels[even:], self.num_classes, 1.0, self.label_smoothing)
        return torch.cat([mixed, imgs[even:]]), torch.cat([targets.reshape(-1, self.num_classes), last])

    def forward(self, batch: dict, sched: dict, seed: int) -> dict:
        imgs, labels = batch["views"][0], self._labels(batch)
        targets = labels
        if self.mixup is not None and self.training:
            imgs, targets = self._mix(imgs, labels, seed)  # targets: [B, C] soft
        logits = self.encoder(imgs)  # [B, num_classes]
        loss = classification_loss(logits, targets, self.label_smoothing)
        return {"loss": loss, "acc": top1_accuracy(logits, labels)}
