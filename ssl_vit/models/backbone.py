"""Backbones by name through `timm.create_model`: an adapter, never a fork of timm's code.

Three families of the ViT paper's lineage are trained and evaluated: plain ViTs (timm's `vit_*` and `deit_*`,
with a CLS token), hybrid ViTs (a ResNet stem feeding the Transformer, `vit_*_r26_*`, `vit_*_resnet*`; Dosovitskiy
et al. 2021, Sec. 3.1) and Swin Transformers (`swin_*`: shifted windows, a hierarchy and no CLS token; Liu et al.
2021). The family is the timm module that defines the model.
"""
from dataclasses import asdict, dataclass, field

import timm
from torch import nn

from ssl_vit.errors import SslVitError

FAMILIES = {"timm.models.vision_transformer": "vit", "timm.models.deit": "vit",
            "timm.models.vision_transformer_hybrid": "hybrid", "timm.models.swin_transformer": "swin"}


def backbone_family(name: str) -> str:
    """'vit', 'hybrid' or 'swin' for a timm model name (a pretrained tag after '.' is ignored)."""
    arch = str(name).split(".")[0]
    if not timm.is_model(arch):
        raise SslVitError(f"model.name: unknown timm model {name!r}")
    module = timm.models.model_entrypoint(arch).__module__
    if module not in FAMILIES:
        raise SslVitError(f"model.name: {name!r} ({module.rsplit('.', 1)[-1]}) is none of the backbones ssl_vit "
                          "trains: a ViT (vit_*, deit_*), a hybrid ViT (vit_*_r26_*, vit_*_resnet*) or a Swin (swin_*)")
    return FAMILIES[module]


@dataclass
class BackboneSpec:
    """What is needed to rebuild a backbone: a timm model name plus the keyword arguments that differ.

    `kwargs` holds architecture overrides such as depth, embed_dim, num_heads (e.g. a 2-block, 64-wide test ViT; for
    a Swin: depths, num_heads per stage, window_size). A hybrid's `patch_size` is the image stride of one token (the
    stem's stride times the patch on its features): it is checked against the model, not passed to timm.
    """

    name: str = "vit_tiny_patch16_224"
    img_size: int = 224
    patch_size: int = 16
    drop_path_rate: float = 0.0
    dynamic_img_size: bool = False
    kwargs: dict = field(default_factory=dict)

    def create_kwargs(self) -> dict:
        patch = {} if backbone_family(self.name) == "hybrid" else {"patch_size": self.patch_size}
        return dict(img_size=self.img_size, **patch, drop_path_rate=self.drop_path_rate,
                    dynamic_img_size=self.dynamic_img_size, **self.kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


def create_backbone(spec: BackboneSpec, num_classes: int = 0, **extra) -> nn.Module:
    """A randomly initialised timm backbone; `num_classes=0` gives the pooled features (ViT: CLS token; Swin: the
    average of the final feature map) as output."""
    family = backbone_family(spec.name)
    try:
        model = timm.create_model(spec.name, pretrained=False, num_classes=num_classes,
                                  **spec.create_kwargs(), **extra)
    except (TypeError, AssertionError, ValueError, RuntimeError) as e:
        raise SslVitError(f"model: timm could not build {spec.name!r} with {spec.create_kwargs()}: {e}") from None
    grid = tuple(token_grid(model))
    expected = (spec.img_size // spec.patch_size,) * 2
    if family == "hybrid" and grid != expected:
        stride = spec.img_size // max(grid[0], 1)
        raise SslVitError(f"model.patch_size: {spec.name!r} at {spec.img_size} px puts one token on {stride} px "
                          f"({grid[0]}×{grid[1]} tokens); set model.patch_size={stride}")
    return model


def token_grid(model: nn.Module) -> tuple[int, int]:
    """The (rows, cols) of patch tokens the Transformer sees at the model's image size (Swin: at its first stage)."""
    return tuple(model.patch_embed.grid_size)


def has_class_token(model: nn.Module) -> bool:
    """Whether the model's first token is a CLS token (timm's ViTs say so in `num_prefix_tokens`; a Swin has none)."""
    return getattr(model, "num_prefix_tokens", 0) > 0


def default_pooling(model: nn.Module) -> str:
    """The feature a backbone is evaluated with: its CLS token (DINO's protocol), or for a model without one the
    mean of its final tokens (a Swin's own pooled features, as EsViT evaluates them)."""
    return "cls" if has_class_token(model) else "avg"


def patch_size_of(model: nn.Module) -> int:
    """Pixels per patch token side: the patch embedding's patch, times a hybrid's stem stride."""
    return model.patch_embed.img_size[0] // model.patch_embed.grid_size[0]
