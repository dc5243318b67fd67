"""Feature extraction: a backbone over evaluation shards → a feature cache (every sample once, in key order).

Each process streams its share of the shards (eval mode), appends float32 rows to its own part file and sorts its
own keys, then the main process merges the sorted runs into a memory-mapped `features.npy` (or, `per_rank`, each
process writes its own part as a cache). Feature memory stays bounded by one batch per process plus one merge chunk,
whatever the number of samples (a million 768-d rows is a 3 GB file, not 3 GB of RAM); the merge holds the keys as
one bytes array and three int64 per row (about 5 GB at 10^8 rows of 24-byte keys). Time, measured on 2 busy cores
with 8 parts of 26-byte keys: 1M rows 2.6 s (the per-row merge before: 97 s), 4M rows 3.6 s; at 10^8 rows about a
minute for the keys (read, merged, written as keys.npy and keys.json) plus the feature bytes copied at disk speed
(154 GB at 384-d: ~5 min at 0.5 GB/s), while the other ranks wait in a barrier (NCCL's default timeout: 10 min).
Beyond that, `per_rank` (`features --per-rank`) writes no merged cache at all: `index build` takes the parts.
`embed_images` embeds image files through the same view and pooling (retrieval queries by image).

Pooling `auto` (the default everywhere) is the CLS token where the model has one and the mean final token where it
has none (a Swin); a cache records the pooling it resolved to, never `auto`, so that queries against an index built
from it embed the same way. A DeiT student's CLS feature is timm's pre-logits: the mean of its class and distillation
tokens, as its two heads are averaged.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from ssl_vit.atomic_io import atomic_dir
from ssl_vit.data.loader import StreamLoader
from ssl_vit.data.samples import BadSample, decode_image
from ssl_vit.data.stream import ShardStream
from ssl_vit.errors import SslVitError
from ssl_vit.eval import AUTO_POOLING as AUTO, POOLINGS
from ssl_vit.models.backbone import default_pooling, has_class_token
from ssl_vit.eval.feature_cache import encode_keys, write_keys
from ssl_vit.threads import use_threads
from ssl_vit.transforms import MultiViewTransform, eval_views, normalize

EMBED_BATCH = 64


def eval_transform(image_size: int, resize: int | None = None) -> MultiViewTransform:
    """The one evaluation view (shorter side to `resize`, centre crop `image_size`) features are extracted with."""
    return MultiViewTransform(eval_views(image_size, resize=resize))


def load_image(path) -> Image.Image:
    """An image file decoded exactly as a shard sample's image is (RGB)."""
    path = Path(path)
    if not path.is_file():
        raise SslVitError(f"image file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SslVitError(f"image file {path} is unreadable: {e.strerror or e}") from None
    try:
        return decode_image({"jpg": data, "__key__": str(path), "__url__": str(path)})  # PIL sniffs the format
    except BadSample:
        raise SslVitError(f"image file {path} is not a readable image") from None


def eval_pixels(images: list, image_size: int, resize: int | None = None) -> torch.Tensor:
    """PIL images → the normalised batch [B, 3, S, S] of their evaluation views."""
    transform = eval_transform(image_size, resize)
    return normalize(torch.stack([transform(img)[0] for img in images]))


def embed_images(model: nn.Module, images: list, *, image_size: int, resize: int | None = None,
                 pooling: str = AUTO, last_blocks: int = 1) -> np.ndarray:
    """[N, D] float32 features of PIL images through the same view and pooling as `extract_features` (CPU)."""
    if model.training:  # a walk over every module: not on each call of a served index
        model.eval()
    return np.concatenate([pooled_features(model, eval_pixels(images[start:start + EMBED_BATCH], image_size, resize),
                                           pooling, last_blocks).numpy()
                           for start in range(0, len(images), EMBED_BATCH)])


def resolve_pooling(model: nn.Module, pooling: str) -> str:
    """The pooling `pooling` names for `model`: `auto` resolved by whether it has a CLS token; others as given."""
    if pooling == AUTO:
        return default_pooling(model)
    if pooling not in POOLINGS:
        raise SslVitError(f"pooling: must be one of {', '.join((AUTO, *POOLINGS))}, got {pooling!r}")
    return pooling


@torch.no_grad()
def pooled_features(model: nn.Module, images: torch.Tensor, pooling: str = AUTO, last_blocks: int = 1):
    """[B, D'] features: CLS and/or mean patch token after the final norm; with `last_blocks` > 1 the CLS tokens
    of the last n blocks are concatenated (DINO's linear protocol for ViT-S), the average pool from the last. A DeiT
    student's CLS feature is the mean of its class and distillation tokens (timm's pre-logits)."""
    pooling = resolve_pooling(model, pooling)
    if not has_class_token(model):  # a Swin: no CLS token, its features are the mean final token
        if pooling != "avg" or last_blocks > 1:
            raise SslVitError(f"pooling: {type(model).__name__} has no CLS token, so pooling {pooling!r} (last_blocks "
                              f"{last_blocks}) does not exist for it: use pooling avg with last_blocks 1")
        tokens = model.forward_features(images)  # [B, h, w, D] (Swin) or [B, L, D]
        return tokens.flatten(1, -2).mean(dim=1).float()  # [B, D]
    prefix = getattr(model, "num_prefix_tokens", 1)
    if last_blocks > 1:
        layers = model.forward_intermediates(images, indices=last_blocks, return_prefix_tokens=True, norm=True,
                                             output_fmt="NLC", intermediates_only=True)
        cls = torch.cat([class_feature(model, p) for _, p in layers], dim=-1)  # [B, n·D]
        patches = layers[-1][0]  # [B, L, D]
    else:
        tokens = model.forward_features(images)  # [B, prefix + L, D]
        cls, patches = class_feature(model, tokens), tokens[:, prefix:]
    parts = {"cls": [cls], "avg": [patches.mean(dim=1)], "cls+avg": [cls, patches.mean(dim=1)]}[pooling]
    return torch.cat(parts, dim=-1).float()


def class_feature(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[B, D] CLS feature of [B, prefix + L, D] tokens: the CLS token, or for a DeiT student the mean of its class
    and distillation tokens, as its heads are averaged (timm's pre-logits)."""
    if getattr(model, "dist_token", None) is not None:
        return (tokens[:, 0] + tokens[:, 1]) / 2
    return tokens[:, 0]


def extract_features(backbone: nn.Module, source, out_dir, *, accelerator=None, image_size: int = 224,
                     resize: int | None = None, pooling: str = AUTO, last_blocks: int = 1, batch_size: int = 128,
                     num_workers: int = 2, meta: dict | None = None, progress: bool = True,
                     per_rank: bool = False) -> Path:
    """Write a feature cache folder (see eval/feature_cache.py) and return its path. Collective under accelerate.

    With `per_rank`, each process writes its own share as a cache `out_dir/part-<rank>` (sorted by key) and nothing
    is gathered on one process: `index build` takes the parts as they are."""
    from accelerate import Accelerator

    acc = accelerator or Accelerator()
    pooling = resolve_pooling(backbone, pooling)  # the cache records what `auto` chose
    use_threads(num_workers)
    out_dir = Path(out_dir)
    parts_dir = out_dir.with_name(out_dir.name + ".parts")
    if acc.is_main_process:
        shutil.rmtree(parts_dir, ignore_errors=True)
        parts_dir.mkdir(parents=True)
        if per_rank:
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)
    acc.wait_for_everyone()
    stream = ShardStream(source, eval_transform(image_size, resize), batch_size, mode="eval", rank=acc.process_index,
                         world_size=acc.num_processes, num_workers=num_workers)
    model = backbone.to(acc.device).eval()
    keys, labels, dim = [], [], None
    rows = open(parts_dir / f"rank{acc.process_index}.f32", "wb")
    bar = tqdm(desc="features", unit="img", disable=not (progress and acc.is_main_process), dynamic_ncols=True)
    loader = StreamLoader(stream, device=acc.device)
    with rows, acc.autocast():
        for batch in loader:
            feats = pooled_features(model, batch["views"][0], pooling, last_blocks).cpu().numpy()  # [B, D]
            dim = feats.shape[1]
            rows.write(np.ascontiguousarray(feats, dtype=np.float32).tobytes())
            keys += batch["key"]
            labels += batch["label"].tolist()
            bar.update(len(batch["key"]) * acc.num_processes)
    bar.close()
    seen, skipped = loader.skip_counts()
    write_part(parts_dir, acc.process_index, keys, labels, dim, skipped)
    info = {"pooling": pooling, "last_blocks": last_blocks, "image_size": image_size, "resize": resize,
            "source": source if isinstance(source, (str, list)) else str(source),
            "shards": [absolute_url(url) for url in stream.shards.urls], "classes": stream.shards.classes,
            **(meta or {})}
    if per_rank:
        merge_parts(out_dir / f"part-{acc.process_index:05d}", parts_dir, [acc.process_index],
                    {**info, "part": acc.process_index}, num_processes=acc.num_processes)
    acc.wait_for_everyone()
    if acc.is_main_process:
        if not per_rank:
            merge_parts(out_dir, parts_dir, range(acc.num_processes), info, num_processes=acc.num_processes)
        shutil.rmtree(parts_dir, ignore_errors=True)
    acc.wait_for_everyone()
    return out_dir


def absolute_url(url: str) -> str:
    """A local shard path made absolute (so a cache or index can find its images from anywhere); URLs unchanged."""
    return url if url.startswith("pipe:") or "://" in url else str(Path(url).resolve())


def write_part(parts_dir: Path, rank: int, keys: list, labels: list, dim, skipped: int) -> None:
    """One process's part beside its rows file: its keys sorted (each rank sorts its own share, in parallel), their
    labels, and `order` (the row of rank{r}.f32 holding each sorted key)."""
    encoded = encode_keys(keys)
    order = np.argsort(encoded, kind="stable")
    np.save(parts_dir / f"rank{rank}.keys.npy", encoded[order])
    np.save(parts_dir / f"rank{rank}.labels.npy", np.asarray(labels, dtype=np.int64)[order])
    np.save(parts_dir / f"rank{rank}.order.npy", order)
    (parts_dir / f"rank{rank}.json").write_text(json.dumps({"num": len(keys), "dim": dim, "skipped": skipped}))


def merge_parts(out_dir: Path, parts_dir: Path, ranks, info: dict, num_processes: int,
                chunk: int = 65536) -> None:
    """Merge per-process parts into the cache format (features.npy, labels.npy, keys.json/.npy, meta.json), sorted
    by key, written into a temporary folder and renamed into place.

    Vectorised for 10^8 rows: the ranks' sorted key runs are merged by one stable argsort (timsort finds the runs:
    O(N log ranks)), and features are copied a chunk of output rows at a time, gathered from each part by index."""
    ranks = list(ranks)
    parts = [json.loads((parts_dir / f"rank{r}.json").read_text()) for r in ranks]
    keys = np.concatenate([np.load(parts_dir / f"rank{r}.keys.npy") for r in ranks])
    if not len(keys):
        raise SslVitError(f"empty evaluation set: no readable samples in {info.get('source')}")
    order = np.argsort(keys, kind="stable")  # [N]: position in the ranks' concatenated sorted runs
    keys = keys[order]
    same = np.flatnonzero(keys[1:] == keys[:-1])
    if len(same):
        raise SslVitError(f"duplicate sample keys in {info.get('source')} (first {keys[same[0]].decode()!r}): "
                          "shards overlap or keys are not unique")
    (dim,) = {p["dim"] for p in parts if p["dim"] is not None}
    labels = np.concatenate([np.load(parts_dir / f"rank{r}.labels.npy") for r in ranks])[order]
    bounds = np.cumsum([0] + [p["num"] for p in parts])  # run r holds positions bounds[r]:bounds[r+1]
    rows = [np.load(parts_dir / f"rank{r}.order.npy") for r in ranks]
    maps = [np.memmap(parts_dir / f"rank{r}.f32", dtype=np.float32, mode="r", shape=(p["num"], dim))
            if p["num"] else None for r, p in zip(ranks, parts)]
    meta = {**info, "dim": dim, "num": len(keys), "skipped": sum(p["skipped"] for p in parts),
            "num_processes": num_processes}
    with atomic_dir(out_dir) as tmp:
        features = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float32, shape=(len(keys), dim))
        for start in range(0, len(keys), chunk):
            source = order[start:start + chunk]
            run = np.searchsorted(bounds, source, side="right") - 1
            block = np.empty((len(source), dim), np.float32)
            for r in np.unique(run):
                mine = run == r
                block[mine] = maps[r][rows[r][source[mine] - bounds[r]]]
            features[start:start + len(source)] = block
        features.flush()
        del features, maps
        np.save(tmp / "labels.npy", labels)
        write_keys(tmp, keys)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
