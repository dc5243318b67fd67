"""A plain timm ViT given a distillation token (Touvron et al. 2021, Sec. 4): timm's own `VisionTransformerDistilled`
(timm/models/deit.py) built with the ViT's dimensions, never a fork of it.

The architecture is named as timm names it, a `deit_*_distilled_*` entry with the ViT's dimensions as keyword
arguments (`distilled_spec`), so that an export of the student rebuilds with plain `timm.create_model`. A pretrained
ViT's weights move into a student unchanged (`with_distillation_token`); the new token starts as a copy of the CLS
token and its position embedding as the CLS token's: the pretrained blocks have learnt what to do with that token,
whereas a fresh one (timm draws `dist_token` from trunc_normal std .02) would be an input they never saw. The two
tokens part as their heads learn different targets (the labels and the teacher).
"""
import copy
from dataclasses import replace
from functools import lru_cache

import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from ssl_vit.errors import SslVitError, load_error_detail
from ssl_vit.models.backbone import BackboneSpec, backbone_family, create_backbone

DISTILLED_ARCHS = tuple(timm.list_models("deit_*_distilled_*"))  # the names timm builds the class under
COMPARED_PARTS = ("patch_embed", "norm_pre", "blocks", "norm", "fc_norm")


def has_distillation_token(model: nn.Module) -> bool:
    return getattr(model, "dist_token", None) is not None


def distilled_spec(spec: BackboneSpec, key: str = "model.name") -> BackboneSpec:
    """The spec of a DeiT student with the plain ViT `spec`'s dimensions (patch, image size, depth, width, heads, MLP
    ratio, qkv bias) and the recipe's overrides; a spec that already builds one is returned as it is. What the token
    cannot be added to (a Swin, a hybrid, a ViT without a CLS token or with register tokens, or blocks timm's class
    would build otherwise: their reprs are compared) is one line on `key`."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        vit = create_backbone(spec)
    if has_distillation_token(vit):
        return spec
    check_token_layout(vit, spec.name, key)
    block = vit.blocks[0]
    dims = dict(embed_dim=vit.embed_dim, depth=len(vit.blocks), num_heads=block.attn.num_heads,
                mlp_ratio=block.mlp.fc1.out_features / vit.embed_dim, qkv_bias=block.attn.qkv.bias is not None)
    arch = next((a for a in DISTILLED_ARCHS if default_size(a) == (spec.patch_size, dims["embed_dim"],
                                                                   dims["depth"])), DISTILLED_ARCHS[-1])
    student_spec = replace(spec, name=arch, kwargs={**dims, **spec.kwargs})
    with torch.device("meta"):
        student = create_backbone(student_spec)
    for part in COMPARED_PARTS:
        if repr(getattr(student, part)) != repr(getattr(vit, part)):
            raise SslVitError(f"{key}: {spec.name!r}'s {part} differs from that of the DeiT student built with its "
                              f"dimensions ({arch}, {student_spec.kwargs}): timm's distilled class cannot hold it")
    return student_spec


def with_distillation_token(vit: nn.Module, student: nn.Module, key: str = "model.init") -> nn.Module:
    """A headless copy of the DeiT `student`'s architecture holding the plain ViT `vit`'s weights, in eval mode: every
    weight copied, the CLS token and its position embedding also into the distillation token's; timm's checkpoint
    filter then resamples the grid past both prefix tokens (and the patch embedding) where the sizes differ."""
    check_token_layout(vit, vit.default_cfg.get("architecture", type(vit).__name__), key)
    model = copy.deepcopy(student)
    model.reset_classifier(0)
    state = {k: v for k, v in vit.state_dict().items() if not k.startswith("head")}
    pos = state["pos_embed"]  # [1, 1 + L, D]: the CLS token's, then the patches'
    state["pos_embed"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)  # [1, 2 + L, D]: cls, dist, patches
    state["dist_token"] = state["cls_token"].clone()  # [1, 1, D]
    state = checkpoint_filter_fn(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SslVitError(f"{key}: the ViT does not fit the DeiT student: {load_error_detail(e)}") from None
    return model.eval()


def check_token_layout(vit: nn.Module, name: str, key: str) -> None:
    """One line on `key` unless `vit` is a plain ViT with one CLS token whose position embedding is added with the
    patches' (the layout `VisionTransformerDistilled` extends; a Swin, a hybrid's stem, register tokens, DeiT-III's
    separate class embedding or a pooled head are not)."""
    family = backbone_family(name) if timm.is_model(str(name).split(".")[0]) else type(vit).__name__
    if family != "vit":
        why = f"is a {family}"
    elif getattr(vit, "cls_token", None) is None:
        why = "has no CLS token"
    elif vit.num_prefix_tokens != 1:
        why = f"has {vit.num_prefix_tokens} prefix tokens (register tokens)"
    elif vit.no_embed_class or vit.global_pool != "token":
        why = "keeps its CLS token out of the position embedding" if vit.no_embed_class else \
            f"pools its tokens ({vit.global_pool!r}) instead of reading the CLS token"
    else:
        return
    raise SslVitError(f"{key}: a distillation token sits beside a plain ViT's CLS token; {name!r} {why} (use a "
                      "vit_* or deit_* with one CLS token, or deit_*_distilled_*)")


@lru_cache(maxsize=None)
def default_size(arch: str) -> tuple[int, int, int]:
    """(patch, width, depth) of timm's `arch` as registered (so that a DeiT-S-sized student is named deit_small_...)."""
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    return model.patch_embed.patch_size[0], model.embed_dim, len(model.blocks)
