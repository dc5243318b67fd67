"""Start a model from a pretrained backbone (fine-tuning): copy every backbone weight, leave the new head alone."""
from pathlib import Path

from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from ssl_vit.errors import SslVitError


def load_pretrained_backbone(model: nn.Module, path) -> dict:
    """Copy the backbone at `path` (export, run folder or checkpoint; see eval/backbones.py) into the timm ViT
    `model`, resampling the position embeddings when the image size differs. Only the classifier head may stay
    uninitialised; any other missing or extra weight is an error naming `path`. Returns the backbone's metadata."""
    from ssl_vit.eval.backbones import load_eval_backbone

    if not Path(path).exists():
        raise SslVitError(f"model.init: no pretrained backbone at {path}")
    source, meta = load_eval_backbone(path)
    if source.embed_dim != model.embed_dim or len(source.blocks) != len(model.blocks):
        raise SslVitError(f"model.init: {path} is a {len(source.blocks)}-block, {source.embed_dim}-wide ViT; the "
                          f"recipe builds {len(model.blocks)} blocks, {model.embed_dim} wide")
    state = checkpoint_filter_fn(source.state_dict(), model)
    head = {name for name, _ in model.get_classifier().named_parameters(prefix="head")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise SslVitError(f"model.init: {path} does not fit the recipe's model: "
                          f"{str(e).strip().splitlines()[-1][:200]}") from None
    stray = sorted(set(missing) - head) + sorted(unexpected)
    if stray:
        raise SslVitError(f"model.init: {path} does not fit the recipe's model: {stray[0]} "
                          f"({len(stray)} weights missing or unexpected)")
    return meta

