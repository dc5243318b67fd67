"""Load the backbone an evaluation runs on: an exported backbone, a run folder, or a training checkpoint."""
import json
from pathlib import Path

from torch import nn

from ssl_vit.errors import SslVitError


def load_eval_backbone(path) -> tuple[nn.Module, dict]:
    """`path`: `backbone.safetensors` (export), a run folder containing one, or a checkpoint folder `ckpt-<step>/`
    (for DINO the teacher is used). Returns (model in eval mode, metadata with at least img_size)."""
    from ssl_vit.models.export import load_backbone

    path = Path(path)
    if path.is_dir() and (path / "backbone.safetensors").is_file():
        path = path / "backbone.safetensors"
    if path.is_file():
        model, meta = load_backbone(path)
        return model.eval(), meta
    if path.is_dir() and (path / "trainer.json").is_file():
        return _from_checkpoint(path)
    raise SslVitError(f"no backbone at {path} (expected backbone.safetensors, a run folder or a checkpoint folder)")


def _from_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    from safetensors.torch import load_file

    from ssl_vit.config import Recipe, _apply
    from ssl_vit.methods import backbone_spec, build_method

    state = json.loads((path / "trainer.json").read_text())
    recipe = Recipe()
    _apply(recipe, state["recipe"], "")
    recipe.model.init = ""  # the checkpoint holds the weights; the fine-tuning start point need not exist any more
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise SslVitError(f"checkpoint {path} has no model.safetensors")
    method = build_method(recipe, num_classes=recipe.data.num_classes or len(state.get("classes") or []))
    try:
        method.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as e:
        raise SslVitError(f"checkpoint {weights} does not match its recipe's model: "
                          f"{str(e).strip().splitlines()[-1][:200]}") from None
    spec = backbone_spec(recipe)
    meta = {"model_name": spec.name, "img_size": spec.img_size, "patch_size": spec.patch_size,
            "method": recipe.method, "step": state["step"], "classes": state.get("classes")}
    return method.backbone().eval(), meta
