"""Backbone export as safetensors + JSON sidecar, loadable by plain timm:

    timm.create_model(meta["model_name"], pretrained=True, pretrained_cfg_overlay=dict(file=path),
                      num_classes=0, **meta["create_kwargs"])

The file holds exactly the state dict of `timm.create_model(..., num_classes=0)` (no classifier keys), so timm's
loader, which drops classifier keys and loads non-strictly when num_classes differs from the model's default
pretrained config, finds every weight it needs; `ssl_vit.loading.load_backbone` loads strictly and names the first
mismatch.
"""
import json
import os
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ssl_vit.errors import SslVitError
from ssl_vit.models.backbone import BackboneSpec

META_KEY = "ssl_vit"


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
    state = {k: v for k, v in model.state_dict().items() if k in expected or not k.startswith("head.")}
    problem = first_mismatch(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise SslVitError(f"export {path}: the model does not match backbone {spec.name!r} {create_kwargs}: {problem}")
    tensors = {k: state[k].detach().to("cpu", copy=True).contiguous() for k in expected}
    meta = {"model_name": spec.name, "img_size": spec.img_size, "patch_size": spec.patch_size,
            "create_kwargs": create_kwargs, "num_features": int(ref.num_features), "spec": spec.to_dict(),
            **(extra_meta or {})}
    text = json.dumps(meta, indent=2, sort_keys=True, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: text})
    os.replace(tmp, path)
    sidecar = path.with_suffix(".json")
    sidecar.with_name(sidecar.name + ".tmp").write_text(text + "\n")
    os.replace(sidecar.with_name(sidecar.name + ".tmp"), sidecar)
    return path


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
