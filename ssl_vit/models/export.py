"""Backbone export as safetensors + JSON sidecar, loadable by plain timm:

    timm.create_model(meta["model_name"], pretrained=True, pretrained_cfg_overlay=dict(file=path),
                      num_classes=0, **meta["create_kwargs"])

The file holds exactly the state dict of `timm.create_model(..., num_classes=0)` (no classifier keys), so timm's
loader, which drops classifier keys and loads non-strictly when num_classes differs from the model's default
pretrained config, finds every weight it needs; `ssl_vit.loading.load_backbone` loads strictly and names the first
mismatch.

The export's folder is also a timm / Hugging Face model folder, as timm's `save_for_hf` writes one: `config.json`
(architecture, model arguments, input size, mean/std, crop; our metadata under "ssl_vit") and `model.safetensors`
(a hard link to the same bytes), so `timm.create_model("local-dir:FOLDER", pretrained=True)` loads it, and the folder
can be pushed to the Hub as it is. One export per folder.
"""
import json
import os
import shutil
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf
from torch import nn

from ssl_vit.atomic_io import atomic_path, write_text_atomic
from ssl_vit.errors import SslVitError
from ssl_vit.models.backbone import BackboneSpec
from ssl_vit.transforms.normalize import MEAN, STD
from ssl_vit.transforms.views import EVAL_CROP_RATIO  # what `eval_views` crops by default

META_KEY = "ssl_vit"
HF_CONFIG, HF_WEIGHTS = "config.json", "model.safetensors"
CLASSIFIER_KEYS = ("head.", "head_dist.")  # classifier weights an export leaves out (DeiT's distillation head too)


def reference_model(model_name: str, create_kwargs: dict) -> nn.Module:
    """A headless model of this architecture, built on the meta device (shapes only, no memory or init cost)."""
    try:
        with torch.device("meta"):
            return timm.create_model(model_name, pretrained=False, num_classes=0, **create_kwargs)
    except (RuntimeError, TypeError, AssertionError, ValueError) as e:
        raise SslVitError(f"backbone: timm could not build {model_name!r} with {create_kwargs}: {e}") from None


def first_mismatch(expected: dict[str, tuple], found: dict[str, tuple]) -> str | None:
    """The first key (in the model's order) that is missing, has another shape, or is unexpected; None if all match."""
    for key, shape in expected.items():
        if key not in found:
            return f"missing key {key!r}"
        if tuple(found[key]) != tuple(shape):
            return f"key {key!r} has shape {list(found[key])}, the backbone expects {list(shape)}"
    extra = [k for k in found if k not in expected]
    return f"unexpected key {extra[0]!r}" if extra else None


def export_backbone(model: nn.Module, spec: BackboneSpec, path, extra_meta: dict | None = None) -> Path:
    """Save `model`'s backbone weights (classifier head removed) to `path` (.safetensors) plus `path.json`.

    The metadata {"model_name", "img_size", "patch_size", "create_kwargs", "num_features", "spec", **extra_meta}
    goes into the sidecar and into the safetensors header. The file is written to a temporary name and renamed.
    """
    path = Path(path)
    create_kwargs = spec.create_kwargs()
    ref = reference_model(spec.name, create_kwargs)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    state = {k: v for k, v in model.state_dict().items() if k in expected or not k.startswith(CLASSIFIER_KEYS)}
    problem = first_mismatch(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise SslVitError(f"export {path}: the model does not match backbone {spec.name!r} {create_kwargs}: {problem}")
    tensors = {k: state[k].detach().to("cpu", copy=True).contiguous() for k in expected}
    meta = {"model_name": spec.name, "img_size": spec.img_size, "patch_size": spec.patch_size,
            "create_kwargs": create_kwargs, "num_features": int(ref.num_features), "spec": spec.to_dict(),
            **(extra_meta or {})}
    text = json.dumps(meta, indent=2, sort_keys=True, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: text})
    write_text_atomic(path.with_suffix(".json"), text + "\n")
    write_hf_folder(ref, path, create_kwargs, meta)
    return path


def write_hf_folder(ref: nn.Module, path: Path, create_kwargs: dict, meta: dict) -> None:
    """`config.json` and `model.safetensors` (a hard link to `path`, a copy where links are impossible) beside the
    export, as `timm.models.save_for_hf` would write them for these weights."""
    folder = path.parent
    data_config = {"mean": MEAN, "std": STD, "crop_pct": EVAL_CROP_RATIO, "interpolation": "bicubic"}
    with atomic_path(folder / HF_CONFIG) as tmp:
        save_config_for_hf(ref, tmp, model_args=create_kwargs, model_config={META_KEY: meta}, data_config=data_config)
        config = json.loads(tmp.read_text())
        # the architecture's default pretrained config names timm's published weights (tag, licence): not these
        for key in ("tag", "license", "hf_hub_id", "url", "paper_ids", "paper_name", "origin_url", "notes"):
            config["pretrained_cfg"].pop(key, None)
        tmp.write_text(json.dumps(config, indent=2, default=str) + "\n")
    if path.name != HF_WEIGHTS:
        with atomic_path(folder / HF_WEIGHTS) as link:
            try:
                os.link(path, link)
            except OSError:
                shutil.copyfile(path, link)


def read_backbone_meta(path) -> dict:
    """The export metadata: from the safetensors header, else from the JSON sidecar."""
    path = Path(path)
    if not path.is_file():
        raise SslVitError(f"backbone {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise SslVitError(f"backbone {path}: not a readable safetensors file ({e})") from None
    sidecar = path.with_suffix(".json")
    try:
        if META_KEY in header:
            return json.loads(header[META_KEY])
        if sidecar.is_file():
            return json.loads(sidecar.read_text())
    except json.JSONDecodeError as e:
        raise SslVitError(f"backbone {path}: its metadata is not valid JSON ({e})") from None
    raise SslVitError(f"backbone {path}: no ssl_vit metadata in the file and no sidecar {sidecar.name}")
