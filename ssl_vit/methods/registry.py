"""One entry per method: its recipe section (a `MethodSettings` dataclass in config.py: defaults, checks, whether it
needs labels, its view preset, its settings counted in epochs) and its constructor. Adding a method is its own file,
its settings class and one line here; nothing else asks for a method by name."""
from dataclasses import dataclass
from typing import Callable

from ssl_vit.config import METHODS, Recipe, method_settings
from ssl_vit.errors import SslVitError
from ssl_vit.method_settings import DINOConfig, MAEConfig, MethodSettings, SupervisedConfig
from ssl_vit.methods.base import BuildContext, Method
from ssl_vit.methods.dino import DINO
from ssl_vit.methods.distill import build_supervised, student_backbone
from ssl_vit.methods.mae import MAE
from ssl_vit.models.backbone import BackboneSpec


@dataclass(frozen=True)
class MethodEntry:
    settings: type[MethodSettings]                                 # its recipe section (recipe.<name>)
    build: Callable[[Recipe, BackboneSpec, BuildContext], Method]  # a freshly initialised method
    # the backbone it trains and exports, from the recipe's (a distilled student: the ViT with a distillation token)
    backbone: Callable[[Recipe, BackboneSpec], BackboneSpec] = lambda recipe, spec: spec

    @property
    def needs_labels(self) -> bool:
        return self.settings.needs_labels

    @property
    def views(self) -> str:
        return self.settings.views


REGISTRY: dict[str, MethodEntry] = {
    "mae": MethodEntry(MAEConfig, MAE.from_recipe),
    "dino": MethodEntry(DINOConfig, DINO.from_recipe),
    "supervised": MethodEntry(SupervisedConfig, build_supervised, student_backbone),
}
assert tuple(REGISTRY) == METHODS, f"the registry {tuple(REGISTRY)} and the recipe's sections {METHODS} differ"


def method_entry(name: str) -> MethodEntry:
    if name not in REGISTRY:
        raise SslVitError(f"method: must be one of {', '.join(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def backbone_spec(recipe: Recipe) -> BackboneSpec:
    m = recipe.model
    overrides = {k: v for k, v in dict(depth=m.depth, embed_dim=m.embed_dim, num_heads=m.num_heads).items() if v}
    overrides.update(m.kwargs)
    spec = BackboneSpec(name=m.name, img_size=m.img_size, patch_size=m.patch_size, drop_path_rate=m.drop_path_rate,
                        dynamic_img_size=method_settings(recipe).multi_size_views, kwargs=overrides)
    return method_entry(recipe.method).backbone(recipe, spec)


def build_method(recipe: Recipe, num_classes: int = 0, num_global_views: int = 2,
                 load_classifier: Callable | None = None) -> Method:
    """The recipe's method, freshly initialised (weights from disk: ssl_vit/loading.py)."""
    context = BuildContext(num_classes=num_classes, num_global_views=num_global_views,
                           load_classifier=load_classifier)
    return method_entry(recipe.method).build(recipe, backbone_spec(recipe), context)
