"""Augmentation views: specs, the transform built from them (CPU and device paths), normalisation, presets."""
from ssl_vit.transforms.normalize import MEAN, STD, denormalize, normalize
from ssl_vit.transforms.presets import PRESETS, dino_views, eval_views, mae_views, supervised_views, views_from_recipe
from ssl_vit.transforms.gpu_views import resolve_decode
from ssl_vit.transforms.views import MultiViewTransform, TorchSeededRandAugment, ViewSpec

__all__ = ["MEAN", "PRESETS", "STD", "MultiViewTransform", "TorchSeededRandAugment", "ViewSpec", "denormalize",
           "dino_views", "eval_views", "mae_views", "normalize", "resolve_decode", "supervised_views",
           "views_from_recipe"]
