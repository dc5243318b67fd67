"""Method registry: recipe → freshly initialised Method (weights from disk: ssl_vit/loading.py). The trainer only sees
the `Method` contract (methods/base.py)."""
from dataclasses import asdict

from ssl_vit.config import Recipe
from ssl_vit.errors import SslVitError
from ssl_vit.models.backbone import BackboneSpec


def backbone_spec(recipe: Recipe) -> BackboneSpec:
    m = recipe.model
    overrides = {k: v for k, v in dict(depth=m.depth, embed_dim=m.embed_dim, num_heads=m.num_heads).items() if v}
    return BackboneSpec(name=m.name, img_size=m.img_size, patch_size=m.patch_size, drop_path_rate=m.drop_path_rate,
                        dynamic_img_size=recipe.method == "dino", kwargs=overrides)


def build_method(recipe: Recipe, num_classes: int = 0, num_global_views: int = 2):
    spec = backbone_spec(recipe)
    if recipe.method == "mae":
        from ssl_vit.methods.mae import MAE

        return MAE(spec, **asdict(recipe.mae))
    if recipe.method == "dino":
        from ssl_vit.methods.dino import DINO

        if num_global_views < 1:
            raise SslVitError(f"num_global_views: DINO needs ≥ 1 global view (views marked global_view: true, as the "
                              f"dino preset marks them), got {num_global_views}")
        return DINO(spec, num_global=num_global_views, **asdict(recipe.dino))
    if recipe.method == "supervised":
        from ssl_vit.methods.supervised import Supervised

        if num_classes < 2:
            raise SslVitError("data.num_classes: supervised training needs ≥ 2 classes (set it, or train from "
                              "shards whose index.json lists the classes)")
        return Supervised(spec, num_classes=num_classes, layer_decay=recipe.optim.layer_decay,
                          **asdict(recipe.supervised))
    raise SslVitError(f"method: unknown method {recipe.method!r}")
