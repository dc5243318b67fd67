"""Queries against a saved index: image files embedded exactly as the index's features were (the backbone, view
and pooling it records), and the feature caches it was built from (for queries by key). Used by `index query` and
`ssl-vit serve`."""
from pathlib import Path

from ssl_vit.errors import SslVitError

# What an index must record to embed an image as its features were (the pooling as resolved: a cache extracted with
# `auto` records cls or avg, never `auto`).
EXTRACTION_KEYS = ("image_size", "resize", "pooling", "last_blocks")


def query_embedder(source: dict, dim: int, where, backbone=None):
    """A function PIL images -> [N, D] features through the backbone, view and pooling the features of index `where`
    were extracted with (its `source` record, features of `dim`; `backbone` overrides the recorded one); one-line
    errors when the index cannot say how, or the backbone does not fit."""
    from ssl_vit.eval.features import embed_images
    from ssl_vit.loading import load_backbone, timm_source

    backbone = backbone or source.get("backbone")
    overridden = backbone != source.get("backbone")
    missing = [key for key in EXTRACTION_KEYS if key not in source] + ([] if backbone else ["backbone"])
    if missing:
        raise SslVitError(f"index {where} does not record how its features were made (no "
                          f"{', '.join(missing)}): rebuild it with `ssl-vit index build` from a cache written by "
                          "`ssl-vit features`")
    if not timm_source(backbone) and not Path(backbone).exists():
        recorded = "" if overridden else f" (recorded in index {where}; pass --backbone)"
        raise SslVitError(f"backbone {backbone} does not exist{recorded}")
    model, meta = load_backbone(backbone)
    how = {key: source[key] for key in EXTRACTION_KEYS}
    if int(meta["img_size"]) != how["image_size"]:  # `features` embeds at the backbone's own size
        raise SslVitError(f"backbone {backbone} takes {meta['img_size']}-px images; index {where} holds "
                          f"features of {how['image_size']}-px images (another backbone made them)")

    def embed(images):
        features = embed_images(model, images, **how)  # [N, D]
        if features.shape[1] != dim:
            raise SslVitError(f"index {where} holds {dim}-d features but backbone {backbone} gives "
                              f"{features.shape[1]}-d ({how['pooling']} pooling, last_blocks {how['last_blocks']})")
        return features

    return embed


def index_caches(index) -> list:
    """The feature cache folders an index was built from (one folder in indexes that recorded a string)."""
    folders = index.source.get("features") or []
    return [folders] if isinstance(folders, str) else list(folders)
