"""Backbones by name through `timm.create_model`: an adapter, never a fork of timm's ViT code."""
from dataclasses import asdict, dataclass, field

import timm
from torch import nn

from ssl_vit.errors import SslVitError


@dataclass
class BackboneSpec:
    """What is needed to rebuild a backbone: a timm model name plus the keyword arguments that differ.

    `kwargs` holds architecture overrides such as depth, embed_dim, num_heads (e.g. a 2-block, 64-wide test ViT).
    """

    name: str = "vit_tiny_patch16_224"
    img_size: int = 224
    patch_size: int = 16
    drop_path_rate: float = 0.0
    dynamic_img_size: bool = False
    kwargs: dict = field(default_factory=dict)

    def create_kwargs(self) -> dict:
        return dict(img_size=self.img_size, patch_size=self.patch_size, drop_path_rate=self.drop_path_rate,
                    dynamic_img_size=self.dynamic_img_size, **self.kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


def create_backbone(spec: BackboneSpec, num_classes: int = 0, **extra) -> nn.Module:
    """A randomly initialised timm ViT; `num_classes=0` gives the pooled features (CLS token) as output."""
    if spec.name not in timm.list_models():
        raise SslVitError(f"model.name: unknown timm model {spec.name!r}")
    try:
        model = timm.create_model(spec.name, pretrained=False, num_classes=num_classes,
                                  **spec.create_kwargs(), **extra)
    except (TypeError, AssertionError, ValueError) as e:
        raise SslVitError(f"model: timm could not build {spec.name!r} with {spec.create_kwargs()}: {e}") from None
    if not hasattr(model, "patch_embed") or not hasattr(model, "blocks"):
        raise SslVitError(f"model.name: {spec.name!r} is not a ViT (no patch_embed/blocks)")
    return model


def patch_size_of(model: nn.Module) -> int:
    return model.patch_embed.patch_size[0]
