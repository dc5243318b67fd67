"""Models from what runs leave behind, in one place: an exported backbone (`backbone.safetensors`), a run folder, a
training checkpoint (`ckpt-<step>/`) or a timm name (`timm:<name>`, timm's pretrained weights) → a backbone (what
evaluation uses) or a whole method; and a recipe → a method that starts from `model.init` (fine-tuning).

Methods never load weights themselves: `build_method` gives a freshly initialised one, and this module fills it.
"""
import json
from pathlib import Path

import timm
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from ssl_vit.config import Recipe, _apply
from ssl_vit.errors import SslVitError
from ssl_vit.methods import backbone_spec, build_method
from ssl_vit.methods.base import Method
from ssl_vit.models.export import first_mismatch, read_backbone_meta, reference_model
from ssl_vit.train.checkpoint import find_checkpoint

EXPORT = "backbone.safetensors"
TIMM_PREFIX = "timm:"


def load_backbone(source) -> tuple[nn.Module, dict]:
    """`source`: an export, a run folder holding one, a checkpoint folder (the method's `backbone()`: DINO's teacher)
    or `timm:<name>`. Returns (model in eval mode, metadata with at least model_name, img_size and patch_size)."""
    if str(source).startswith(TIMM_PREFIX):
        return _from_timm(str(source)[len(TIMM_PREFIX):])
    path = Path(source)
    if path.is_dir() and (path / EXPORT).is_file():
        path = path / EXPORT
    if path.is_file():
        return _from_export(path)
    if (path / "trainer.json").is_file():
        method, meta = load_method(path)
        return method.backbone().eval(), meta
    raise SslVitError(f"backbone {path}: no such file or folder (expected {EXPORT}, a run folder with one, a "
                      f"checkpoint folder or {TIMM_PREFIX}<name>)")


def source_name(source) -> str:
    """How to record where a backbone came from: a timm name as given, a path resolved."""
    return str(source) if str(source).startswith(TIMM_PREFIX) else str(Path(source).resolve())


def load_method(path) -> tuple[Method, dict]:
    """The whole method of a checkpoint folder, or of a run folder's latest checkpoint, in eval mode; with metadata
    {model_name, img_size, patch_size, method, step, classes}."""
    path = Path(path)
    ckpt = path if (path / "trainer.json").is_file() else find_checkpoint(path, "auto")
    if ckpt is None:
        raise SslVitError(f"no checkpoint in {path}/checkpoints")
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise SslVitError(f"checkpoint {ckpt} has no model.safetensors")
    try:
        state = json.loads((ckpt / "trainer.json").read_text())
    except ValueError as e:
        raise SslVitError(f"{ckpt / 'trainer.json'}: not valid JSON ({e})") from None
    recipe = Recipe()
    _apply(recipe, state.get("recipe", {}), "")
    method = build_method(recipe, num_classes=recipe.data.num_classes or len(state.get("classes") or []))
    try:
        method.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as e:
        raise SslVitError(f"checkpoint {weights} does not match its recipe's model: "
                          f"{str(e).strip().splitlines()[-1][:200]}") from None
    spec = backbone_spec(recipe)
    meta = {"model_name": spec.name, "img_size": spec.img_size, "patch_size": spec.patch_size,
            "method": recipe.method, "step": state.get("step"), "classes": state.get("classes")}
    return method.eval(), meta


def method_from_recipe(recipe: Recipe, num_classes: int = 0, num_global_views: int = 2) -> Method:
    """`build_method`, then the pretrained backbone `model.init` (if set) copied into the method's backbone."""
    method = build_method(recipe, num_classes=num_classes, num_global_views=num_global_views)
    if recipe.model.init:
        init_backbone(method.backbone(), recipe.model.init)
    return method


def init_backbone(model: nn.Module, source) -> dict:
    """Copy the backbone at `source` (anything `load_backbone` takes) into the timm ViT `model`, resampling the
    position embeddings when the image size differs. Only the classifier head may stay as it was; any other missing
    or extra weight is an error naming `source`. Returns the backbone's metadata."""
    if not str(source).startswith(TIMM_PREFIX) and not Path(source).exists():
        raise SslVitError(f"model.init: no pretrained backbone at {source}")
    pretrained, meta = load_backbone(source)
    if pretrained.embed_dim != model.embed_dim or len(pretrained.blocks) != len(model.blocks):
        raise SslVitError(f"model.init: {source} is a {len(pretrained.blocks)}-block, {pretrained.embed_dim}-wide "
                          f"ViT; the recipe builds {len(model.blocks)} blocks, {model.embed_dim} wide")
    state = checkpoint_filter_fn(pretrained.state_dict(), model)
    head = {name for name, _ in model.get_classifier().named_parameters(prefix="head")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise SslVitError(f"model.init: {source} does not fit the recipe's model: "
                          f"{str(e).strip().splitlines()[-1][:200]}") from None
    stray = sorted(set(missing) - head) + sorted(unexpected)
    if stray:
        raise SslVitError(f"model.init: {source} does not fit the recipe's model: {stray[0]} "
                          f"({len(stray)} weights missing or unexpected)")
    return meta


def _from_export(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild the timm backbone an export's metadata describes and load its weights strictly."""
    meta = read_backbone_meta(path)
    if "model_name" not in meta or "create_kwargs" not in meta:
        raise SslVitError(f"backbone {path}: metadata lacks 'model_name'/'create_kwargs'")
    ref = reference_model(meta["model_name"], meta["create_kwargs"])
    with safe_open(str(path), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    problem = first_mismatch({k: tuple(v.shape) for k, v in ref.state_dict().items()}, found)
    if problem:
        raise SslVitError(f"backbone {path}: weights do not match {meta['model_name']!r} "
                          f"{meta['create_kwargs']}: {problem}")
    model = timm.create_model(meta["model_name"], pretrained=False, num_classes=0, **meta["create_kwargs"])
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), meta


def _from_timm(name: str) -> tuple[nn.Module, dict]:
    """timm's pretrained weights for `name` (from its hub or the local cache), headless."""
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except (RuntimeError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SslVitError(f"backbone {TIMM_PREFIX}{name}: timm could not load its pretrained weights: {first}") from None
    if not hasattr(model, "patch_embed"):
        raise SslVitError(f"backbone {TIMM_PREFIX}{name}: not a ViT (no patch_embed)")
    meta = {"model_name": name, "img_size": int(model.patch_embed.img_size[0]),
            "patch_size": int(model.patch_embed.patch_size[0]), "method": "timm"}
    return model.eval(), meta
