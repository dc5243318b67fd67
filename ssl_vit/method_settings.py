"""The methods' recipe sections: one settings dataclass per method (`recipe.mae`, `recipe.dino`,
`recipe.supervised`), the only place its defaults and range checks are written; the method's constructor takes the
object. The class attributes describe the method to the trainer and the comparison (labels, view preset, settings
counted in epochs); ssl_vit/methods/registry.py pairs each class with its constructor. Light (no torch): recipes
load without the methods."""
from dataclasses import dataclass, field
from typing import ClassVar

from ssl_vit.errors import SslVitError

DINO_CENTERINGS = ("center", "sinkhorn_knopp")
DISTILL_KINDS = ("hard", "soft")


class SettingsError(SslVitError, ValueError):
    """A setting out of range, named by its recipe key: a recipe's one-line error, and the ValueError a method's
    constructor raises when it is handed the value directly."""


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise SettingsError(f"{key}: {message}")


class MethodSettings:
    """A method's recipe section (`recipe.<section>`): its fields are the method's settings with their defaults (the
    only ones: the method's constructor takes this object) and `check` their ranges. The class attributes describe
    the method to the trainer and the comparison; ssl_vit/methods/registry.py pairs the class with its constructor."""
    section: ClassVar[str]
    needs_labels: ClassVar[bool] = False      # trains on labelled samples only
    views: ClassVar[str] = "mae"              # the view preset when the recipe names none
    multi_size_views: ClassVar[bool] = False  # views of several sizes: the backbone takes any size it can tile
    fine_tunes: ClassVar[bool] = False        # may start from model.init, with optim.layer_decay
    epoch_keys: ClassVar[tuple] = ()          # its settings counted in epochs
    ranges: ClassVar[tuple] = ()              # (keys, rule, test) for each group of settings

    def check(self, model=None) -> None:
        """Impossible values, each named by its key (a SettingsError); with `model` (anything with img_size and
        patch_size: the recipe's model section or a BackboneSpec) also the checks that depend on the backbone."""
        for keys, rule, ok in self.ranges:
            for key in keys:
                value = getattr(self, key)
                _check(ok(value), f"{self.section}.{key}", f"{rule}, got {value}")


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches MAE's encoder sees: `int(L * (1 - mask_ratio))`, as in the reference code."""
    return int(num_patches * (1 - mask_ratio))


@dataclass
class MAEConfig(MethodSettings):  # He et al. 2021, Table 1 / Sec. 4
    section: ClassVar[str] = "mae"
    views: ClassVar[str] = "mae"
    ranges: ClassVar[tuple] = ((("mask_ratio",), "must be in [0, 1)", lambda v: 0.0 <= v < 1.0),
                               (("decoder_depth", "decoder_dim", "decoder_heads"), "must be ≥ 1", lambda v: v >= 1))
    mask_ratio: float = 0.75
    decoder_depth: int = 8
    decoder_dim: int = 512
    decoder_heads: int = 16
    norm_pix_loss: bool = True

    def check(self, model=None) -> None:
        super().check()
        if model is None:
            return
        _check(self.decoder_dim % self.decoder_heads == 0, "mae.decoder_dim",
               f"{self.decoder_dim} is not divisible by mae.decoder_heads={self.decoder_heads}")
        patches = (model.img_size // model.patch_size) ** 2
        visible = num_visible(patches, self.mask_ratio)
        _check(visible < patches, "mae.mask_ratio", f"{self.mask_ratio} masks none "
               f"of the {patches} patches; the loss would be empty (use a ratio ≥ {1 / max(patches, 1):.4f})")
        _check(visible > 0, "mae.mask_ratio", f"{self.mask_ratio} masks all of the "
               f"{patches} patches; the encoder would see nothing (use a ratio ≤ {1 - 1 / max(patches, 1):.4f})")


@dataclass
class DINOConfig(MethodSettings):  # Caron et al. 2021, Sec. 3 and App. (main_dino.py defaults)
    section: ClassVar[str] = "dino"
    views: ClassVar[str] = "dino"
    multi_size_views: ClassVar[bool] = True
    epoch_keys: ClassVar[tuple] = ("warmup_teacher_temp_epochs", "freeze_last_layer_epochs")
    ranges: ClassVar[tuple] = (
        (("out_dim", "hidden_dim", "bottleneck_dim"), "must be ≥ 1", lambda v: v >= 1),
        (("student_temp", "teacher_temp", "warmup_teacher_temp"), "must be positive", lambda v: v > 0),
        (("warmup_teacher_temp_epochs", "freeze_last_layer_epochs"), "must be ≥ 0", lambda v: v >= 0),
        (("center_momentum", "momentum_teacher"), "must be in [0, 1]", lambda v: 0.0 <= v <= 1.0),
        (("centering",), f"must be {' or '.join(DINO_CENTERINGS)}", lambda v: v in DINO_CENTERINGS))
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    use_bn_in_head: bool = False     # BatchNorm in the head's MLP (the reference's --use_bn_in_head)
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    center_momentum: float = 0.9
    centering: str = "center"        # one of DINO_CENTERINGS: "sinkhorn_knopp" is DINOv2's
    momentum_teacher: float = 0.996
    freeze_last_layer_epochs: float = 1


@dataclass
class DistillConfig:  # DeiT (Touvron et al. 2021, Sec. 4): a distillation token taught by a frozen classifier
    teacher: str = ""                # "": no distillation; a classifier's run/checkpoint folder or timm:<name>
    kind: str = "hard"               # hard (Eq. 3: the teacher's argmax as a label) | soft (Eq. 2: KL at tau)
    tau: float = 1.0                 # soft: temperature (the paper's soft runs: 3.0)
    alpha: float = 0.5               # weight of the distillation term (Eq. 3: 1/2; the paper's soft λ: 0.1)

    def check(self) -> None:
        _check(self.kind in DISTILL_KINDS, "supervised.distill.kind",
               f"must be {' or '.join(DISTILL_KINDS)}, got {self.kind!r}")
        _check(self.tau > 0, "supervised.distill.tau", f"must be positive, got {self.tau}")
        _check(0.0 <= self.alpha <= 1.0, "supervised.distill.alpha", f"must be in [0, 1], got {self.alpha}")


@dataclass
class SupervisedConfig(MethodSettings):  # DeiT recipe (Touvron et al. 2021, Sec. 6)
    section: ClassVar[str] = "supervised"
    needs_labels: ClassVar[bool] = True
    views: ClassVar[str] = "supervised"
    fine_tunes: ClassVar[bool] = True
    ranges: ClassVar[tuple] = ((("label_smoothing",), "must be in [0, 1)", lambda v: 0.0 <= v < 1.0),
                               (("mixup", "cutmix"), "must be ≥ 0", lambda v: v >= 0),
                               (("mixup_prob",), "must be in [0, 1]", lambda v: 0.0 <= v <= 1.0))
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0          # probability of mixing a batch at all (mixup or cutmix)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def check(self, model=None) -> None:
        super().check()
        self.distill.check()
