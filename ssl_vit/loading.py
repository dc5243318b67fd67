"""Models from what runs leave behind, in one place: an exported backbone (`backbone.safetensors`), a run folder, a
training checkpoint (`ckpt-<step>/`), a timm name or a timm / Hugging Face model folder → a backbone (what evaluation
uses) or a whole method; and a recipe → a method that starts from `model.init` (fine-tuning).

Sources by prefix: `timm:<name>` (timm's pretrained weights, from the local timm/HF cache or the hub),
`timm-random:<name>` (the architecture, randomly initialised: a floor for that backbone), `local-dir:<folder>` (a
folder as timm's `save_for_hf` writes it: config.json + model.safetensors; our exports are such folders too) and
`hf-hub:<id>` (the same from the Hugging Face Hub). A backbone whose config asks for another mean/std than the one
our views are normalised with gets it folded into its patch embedding (exact: the patch embedding is linear).

Methods never load weights themselves: `build_method` gives a freshly initialised one, and this module fills it (and
hands a distillation teacher to the method that names one). The trainer never imports this module: callers that
train from weights on disk pass it `method_from_recipe`.
"""
import contextlib
import json
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from huggingface_hub import constants as hub_constants
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from ssl_vit.config import Recipe, _apply
from ssl_vit.errors import SslVitError, load_error_detail
from ssl_vit.methods import backbone_spec, build_method
from ssl_vit.methods.base import Method
from ssl_vit.models.backbone import backbone_family, patch_size_of
from ssl_vit.models.distilled import has_distillation_token, with_distillation_token
from ssl_vit.models.export import CLASSIFIER_KEYS, META_KEY, first_mismatch, read_backbone_meta, reference_model
from ssl_vit.train.checkpoint import find_checkpoint
from ssl_vit.transforms.normalize import MEAN, STD

EXPORT = "backbone.safetensors"
TIMM_PREFIX = "timm:"
# name prefix → (timm.create_model's name prefix, load pretrained weights)
TIMM_SOURCES = {TIMM_PREFIX: ("", True), "timm-random:": ("", False), "local-dir:": ("local-dir:", True),
                "hf-hub:": ("hf-hub:", True)}


def timm_source(source) -> str | None:
    """The prefix of `source` when timm builds it (a name, a local folder or a Hub id), else None."""
    return next((prefix for prefix in TIMM_SOURCES if str(source).startswith(prefix)), None)


def load_backbone(source) -> tuple[nn.Module, dict]:
    """`source`: an export, a run folder holding one, a checkpoint folder (the method's `backbone()`: DINO's teacher)
    or `timm:<name>`. Returns (model in eval mode, metadata with at least model_name, img_size and patch_size)."""
    prefix = timm_source(source)
    if prefix is not None:
        return _from_timm(prefix, str(source)[len(prefix):])
    path = Path(source)
    if path.is_dir() and (path / EXPORT).is_file():
        path = path / EXPORT
    if path.is_file():
        return _from_export(path)
    if (path / "trainer.json").is_file():
        method, meta = load_method(path)
        return method.backbone().eval(), meta
    raise SslVitError(f"backbone {path}: no such file or folder (expected {EXPORT}, a run folder with one, a "
                      f"checkpoint folder or one of {', '.join(p + '...' for p in TIMM_SOURCES)})")


def source_name(source) -> str:
    """How to record where a backbone came from: a timm name, folder or Hub id as given, a path resolved."""
    return str(source) if timm_source(source) else str(Path(source).resolve())


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
    method = build_method(recipe, num_classes=recipe.data.num_classes or len(state.get("classes") or []),
                          load_classifier=load_classifier)
    try:
        method.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as e:
        raise SslVitError(f"checkpoint {weights} does not match its recipe's model: {load_error_detail(e)}") \
            from None
    spec = backbone_spec(recipe)
    meta = {"model_name": spec.name, "img_size": spec.img_size, "patch_size": spec.patch_size,
            "method": recipe.method, "step": state.get("step"), "classes": state.get("classes")}
    return method.eval(), meta


def method_from_recipe(recipe: Recipe, num_classes: int = 0, num_global_views: int = 2) -> Method:
    """`build_method` (a distillation teacher loaded by `load_classifier`), then the pretrained backbone `model.init`
    (if set) copied into the method's backbone."""
    method = build_method(recipe, num_classes=num_classes, num_global_views=num_global_views,
                          load_classifier=load_classifier)
    if recipe.model.init:
        init_backbone(method.backbone(), recipe.model.init)
    return method


TEACHER_KEY = "supervised.distill.teacher"


def load_classifier(source, num_classes: int) -> nn.Module:
    """A trained classifier (normalised images → logits over `num_classes`), in eval mode: a distillation teacher.
    `source`: a run or checkpoint folder of a run that trains one (supervised, fine-tuned, distilled), or
    `timm:<name>` with its own head. An export is headless: it cannot teach."""
    prefix = timm_source(source)
    if prefix is not None:
        model, _ = _from_timm(prefix, str(source)[len(prefix):], num_classes=None)
    else:
        path = Path(source)
        if not (path / "trainer.json").is_file() and not (path / "checkpoints").is_dir():
            raise SslVitError(f"{TEACHER_KEY}: {source} is no run or checkpoint folder (a teacher needs its "
                              "classifier head, which an exported backbone does not keep)")
        method, meta = load_method(path)
        model = method.classifier()
        if model is None:
            raise SslVitError(f"{TEACHER_KEY}: {source} is a {meta['method']} run, which trains no classifier "
                              "(fine-tune it first: ssl-vit finetune --init RUN)")
    classes = getattr(model, "num_classes", 0)
    if classes != num_classes:
        raise SslVitError(f"{TEACHER_KEY}: {source} classifies {classes} classes, the training data has "
                          f"{num_classes}")
    return model.eval()


def init_backbone(model: nn.Module, source) -> dict:
    """Copy the backbone at `source` (anything `load_backbone` takes) into the timm ViT `model`, resampling the
    position embeddings when the image size differs. Only the classifier head may stay as it was; any other missing
    or extra weight is an error naming `source`. A plain ViT into a DeiT student gains the student's distillation
    token first (ssl_vit/models/distilled.py). Returns the backbone's metadata."""
    if not timm_source(source) and not Path(source).exists():
        raise SslVitError(f"model.init: no pretrained backbone at {source}")
    pretrained, meta = load_backbone(source)
    if has_distillation_token(model) and not has_distillation_token(pretrained):  # a plain ViT into a DeiT student
        pretrained = with_distillation_token(pretrained, model)
    head = {name for name in model.state_dict() if name.startswith(CLASSIFIER_KEYS)}  # head(.fc), head_dist
    if type(pretrained) is not type(model) or pretrained.num_features != model.num_features or \
            len(pretrained.state_dict()) != len(model.state_dict()) - len(head):
        raise SslVitError(f"model.init: {source} is a {describe(pretrained)}; the recipe builds a {describe(model)}")
    state = pretrained.state_dict()
    if hasattr(model, "pos_embed"):  # a ViT's position embeddings resampled to the recipe's grid
        state = checkpoint_filter_fn(state, model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise SslVitError(f"model.init: {source} does not fit the recipe's model: {load_error_detail(e)}") from None
    stray = sorted(set(missing) - head) + sorted(unexpected)
    if stray:
        raise SslVitError(f"model.init: {source} does not fit the recipe's model: {stray[0]} "
                          f"({len(stray)} weights missing or unexpected)")
    return meta


def describe(model: nn.Module) -> str:
    """'VisionTransformer, 384-wide, 12 blocks' (the features' width; depth: blocks or Swin stages)."""
    depth = f"{len(model.blocks)} blocks" if hasattr(model, "blocks") else f"{len(model.layers)} stages"
    return f"{type(model).__name__}, {model.num_features}-wide, {depth}"


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


def _from_timm(prefix: str, name: str, num_classes: int | None = 0) -> tuple[nn.Module, dict]:
    """A timm backbone, headless (`num_classes=0`) or with its own head (None): `name` from its registry, a local
    folder or the Hub, with or without its weights."""
    timm_prefix, pretrained = TIMM_SOURCES[prefix]
    if timm_prefix == "local-dir:" and not (Path(name) / "config.json").is_file():
        raise SslVitError(f"backbone {prefix}{name}: no config.json in that folder (timm's save_for_hf layout: "
                          "config.json + model.safetensors)")
    if not timm_prefix and not timm.is_model(name.split(".")[0]):
        raise SslVitError(f"backbone {prefix}{name}: timm could not load it: no such model in timm's registry")
    if not timm_prefix:
        backbone_family(name)  # a family ssl_vit evaluates, or one line naming the model
    head = {} if num_classes is None else {"num_classes": num_classes}
    with hub_or_cache(pretrained and timm_prefix != "local-dir:") as online:
        try:
            model = timm.create_model(timm_prefix + name, pretrained=pretrained, **head)
        except Exception as e:  # timm, huggingface_hub and requests raise many types for "not there" and "no network"
            if not online and pretrained and timm_prefix != "local-dir:":
                raise SslVitError(f"backbone {prefix}{name}: the Hugging Face Hub is unreachable from here and its "
                                  "weights are not in the local cache") from None
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise SslVitError(f"backbone {prefix}{name}: timm could not load it ({type(e).__name__}: {first})") \
                from None
    if not hasattr(model, "patch_embed"):
        raise SslVitError(f"backbone {prefix}{name}: not a ViT (no patch_embed)")
    cfg = model.pretrained_cfg
    meta = {"model_name": model.default_cfg.get("architecture", name), "img_size": int(model.patch_embed.img_size[0]),
            "patch_size": patch_size_of(model), "method": "timm", "source": prefix + name,
            "pretrained": pretrained}
    if timm_prefix == "local-dir:":  # our export: its metadata (method, step, classes, ...) says more
        meta.update(json.loads((Path(name) / "config.json").read_text()).get(META_KEY, {}))
    if pretrained:
        match_normalisation(model, cfg.get("mean", MEAN), cfg.get("std", STD))
    return model.eval(), meta


@contextlib.contextmanager
def hub_or_cache(uses_hub: bool):
    """Yields whether the Hub is asked. Where it does not answer, weights come straight from the local cache
    (huggingface_hub's offline mode, for this call only): asking it would retry for about 45 s first."""
    if not uses_hub or hub_constants.HF_HUB_OFFLINE or _answers(hub_constants.ENDPOINT):
        yield uses_hub and not hub_constants.HF_HUB_OFFLINE
        return
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        hub_constants.HF_HUB_OFFLINE = False


def _answers(url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@torch.no_grad()
def match_normalisation(model: nn.Module, mean, std) -> None:
    """Make `model`, trained on images normalised with (`mean`, `std`), take images normalised with ours (MEAN, STD).

    Our views give x = (p - M) / S; the model wants (p - m) / s = x · S/s + (M - m)/s, per channel. The patch
    embedding is a convolution without padding, so the scale goes into its weights and the shift into its bias."""
    mean, std = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    ours_mean, ours_std = torch.tensor(MEAN, dtype=torch.float64), torch.tensor(STD, dtype=torch.float64)
    if torch.allclose(mean, ours_mean) and torch.allclose(std, ours_std):
        return
    if hasattr(model.patch_embed, "backbone"):
        raise SslVitError(f"backbone {model.default_cfg.get('architecture')}: a hybrid ViT trained on images "
                          f"normalised with mean {mean.tolist()}, std {std.tolist()}; its ResNet stem (padded, "
                          "weight-standardised convolutions) cannot be adapted exactly to ours")
    proj = model.patch_embed.proj
    weight = proj.weight.double()  # [D, 3, p, p]
    scale, shift = ours_std / std, (ours_mean - mean) / std  # [3]
    bias = (proj.bias.double() if proj.bias is not None else 0) + (weight * shift.view(1, 3, 1, 1)).sum((1, 2, 3))
    proj.weight.copy_(weight * scale.view(1, 3, 1, 1))
    if proj.bias is None:
        proj.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=proj.weight.dtype))
    proj.bias.copy_(bias)
