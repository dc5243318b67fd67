"""Augmentation views: specs, the transforms built from them, and the paper presets."""
from ssl_vit.transforms.presets import PRESETS, dino_views, eval_views, mae_views, supervised_views, views_from_recipe
from ssl_vit.transforms.views import (MultiViewTransform, TorchSeededRandAugment, ViewSpec, ViewTransform,
                                      build_view_transform, denormalize, seed_all_view_rngs)

__all__ = ["PRESETS", "MultiViewTransform", "TorchSeededRandAugment", "ViewSpec", "ViewTransform",
           "build_view_transform", "denormalize", "dino_views", "eval_views", "mae_views", "seed_all_view_rngs",
           "supervised_views", "views_from_recipe"]
