"""The methods (MAE, DINO, supervised and its DeiT distillation) behind the `Method` contract (methods/base.py); the
trainer only sees that contract. Which recipe builds which method: methods/registry.py."""
from ssl_vit.methods.registry import REGISTRY, backbone_spec, build_method, method_entry  # noqa: F401
