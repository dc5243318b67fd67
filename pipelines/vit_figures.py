"""The ViT paper's pictures for any backbone (Dosovitskiy et al. 2021, Fig. 7): position-embedding similarity (centre),
mean attention distance per head against depth (right), and attention rollout (Abnar & Zuidema 2020) beside the
last-block CLS attention. `inspect_backbone` writes them for one backbone (`ssl-vit inspect-model`);
`row_figures` for every row of a comparison. A figure that does not exist for a backbone (a Swin has no absolute
position embeddings and attends within windows) is a note, not an error."""
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from ssl_vit.errors import SslVitError
from ssl_vit.eval.features import eval_pixels
from ssl_vit.figure_io import save_png
from ssl_vit.loading import load_backbone
from ssl_vit.models.backbone import token_grid
from ssl_vit.models.pos_embed import sincos_2d
from ssl_vit.pipelines.attention import attention_rollout, last_block_cls_attention, mean_attention_distance
from ssl_vit.transforms import denormalize

DPI = 120
GAP = 0.06  # between the cells of a row drawn on one axes (a cell is 1)
FIGURES = ("position_embedding", "attention_distance", "attention_rollout")
SINCOS_NOTE = "MAE's are fixed 2-D sin-cos: the grid shows by construction, not learnt"


@torch.no_grad()
def position_similarity(model: nn.Module) -> torch.Tensor:
    """Cosine similarity of each patch position's embedding with every other's (prefix tokens' rows left out) →
    [gh, gw, gh, gw]: entry [i, j] is the map of position (i, j) against the whole grid."""
    pos = getattr(model, "pos_embed", None)
    if pos is None:
        raise SslVitError(f"position embeddings: {type(model).__name__} has none (a Swin adds a relative position "
                          "bias inside each window)")
    gh, gw = token_grid(model)
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    patches = pos[0, prefix:].float()  # [L, D]
    if patches.shape[0] != gh * gw:
        raise SslVitError(f"position embeddings: {patches.shape[0]} rows for a {gh}x{gw} patch grid")
    unit = torch.nn.functional.normalize(patches, dim=-1)
    return (unit @ unit.T).reshape(gh, gw, gh, gw)


def is_sincos(model: nn.Module) -> bool:
    """Whether the patch position embeddings are MAE's fixed 2-D sin-cos ones (read from the weights themselves)."""
    pos = getattr(model, "pos_embed", None)
    if pos is None or pos.shape[-1] % 4:
        return False
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    return torch.allclose(pos[0, prefix:].float(), sincos_2d(pos.shape[-1], token_grid(model)), atol=1e-5)


def position_similarity_png(sim: torch.Tensor, path: Path, title: str) -> None:
    """A grid of small maps, one per patch position (row i, column j): its similarity to every position. The maps are
    tiled into one picture, a blank line between them, on one axes: one axes per map took ~0.6 s a figure at 8x8
    and grows with the grid (196 axes at 14x14)."""
    gh, gw = sim.shape[:2]
    tiles = torch.nn.functional.pad(sim.float(), (0, 1, 0, 1), value=float("nan"))  # [gh, gw, gh+1, gw+1]
    mosaic = tiles.permute(0, 2, 1, 3).reshape(gh * (gh + 1), gw * (gw + 1))[:-1, :-1].numpy()
    fig = Figure(figsize=(max(4.5, min(0.45 * gw, 9) + 1.8), max(4.0, min(0.45 * gh, 9) + 0.8)))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(mosaic, vmin=-1, vmax=1, cmap=cmap, interpolation="nearest")
    step = max(1, gw // 8), max(1, gh // 8)  # at most ~8 tick labels a side
    ax.set_xticks([j * (gw + 1) + (gw - 1) / 2 for j in range(0, gw, step[0])], range(1, gw + 1, step[0]))
    ax.set_yticks([i * (gh + 1) + (gh - 1) / 2 for i in range(0, gh, step[1])], range(1, gh + 1, step[1]))
    ax.tick_params(length=0, labelsize=8)
    ax.set(xlabel="input patch column", ylabel="input patch row")
    for side in ax.spines.values():
        side.set_visible(False)
    fig.colorbar(image, ax=ax, shrink=0.8, label="cosine similarity")
    fig.suptitle(title, fontsize=9)
    save_png(fig, path, dpi=DPI)


def attention_distance_png(distances: dict[str, torch.Tensor], path: Path, image_size: int) -> None:
    """Per backbone, every head's mean attention distance (pixels) against its block's depth (Fig. 7 right)."""
    fig = Figure(figsize=(3.4 * len(distances), 3.0))
    axes = np.asarray(fig.subplots(1, len(distances), squeeze=False))[0]
    for ax, (name, dist) in zip(axes, distances.items()):
        depth, heads = dist.shape
        for h in range(heads):
            ax.scatter(np.arange(1, depth + 1), dist[:, h].numpy(), s=12, color=f"C{h % 10}")
        ax.set(xlabel="network depth (block)", ylabel="mean attention distance (px)", title=name,
               ylim=(0, image_size * 0.75), xticks=range(1, depth + 1))
    fig.tight_layout()
    save_png(fig, path, dpi=DPI)


def rollout_png(pixels: torch.Tensor, cls_attention: torch.Tensor, rollout: torch.Tensor, path: Path,
                title: str) -> None:
    """Rows of: the image, its last-block CLS attention (head mean) and its attention rollout, both overlaid. Each
    row is one axes with three unit cells (0.12 s for 4 rows; an axes per cell took 0.18 s)."""
    size = pixels.shape[-1]
    upsample = lambda maps: torch.nn.functional.interpolate(maps[:, None], size=(size, size), mode="nearest")[:, 0]  # noqa: E731
    maps = [upsample(cls_attention), upsample(rollout)]
    images = denormalize(pixels).permute(0, 2, 3, 1).numpy()
    fig = Figure(figsize=(6.3, 2.1 * len(images) + 0.5))
    axes = np.asarray(fig.subplots(len(images), 1, squeeze=False))[:, 0]
    names = ("image", "CLS attention\n(last block, head mean)", "attention rollout\n(all blocks)")
    for r, (ax, image) in enumerate(zip(axes, images)):
        for c, heat in enumerate((None, maps[0][r], maps[1][r])):
            cell = (c * (1 + GAP), c * (1 + GAP) + 1, 1, 0)  # extent: left, right, bottom, top
            ax.imshow(image, extent=cell, interpolation="nearest")
            if heat is not None:
                ax.imshow(heat.numpy(), extent=cell, cmap="inferno", alpha=0.6, interpolation="nearest")
            if r == 0:
                ax.text(cell[0] + 0.5, -0.04, names[c], ha="center", va="bottom", fontsize=9)
        ax.set(xlim=(0, 3 + 2 * GAP), ylim=(1, 0), xticks=[], yticks=[])
        for side in ax.spines.values():
            side.set_visible(False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    save_png(fig, path, dpi=DPI)


def inspect_backbone(model: nn.Module, meta: dict, images: list, out_dir: Path, name: str) -> dict:
    """The three figures of `model` into `out_dir` ({figure: PNG path, or the note saying why it does not exist});
    `images` (PIL, may be empty) are the evaluation images the attention figures use."""
    out_dir = Path(out_dir)
    written, size = {}, int(meta["img_size"])
    kind = f"\n({SINCOS_NOTE})" if is_sincos(model) else \
        " (random init)" if meta.get("pretrained") is False else " (learnt)"
    title = f"{name}: position embedding similarity{kind}"
    written["position_embedding"] = _figure(out_dir / "position_embedding.png", lambda p: position_similarity_png(
        position_similarity(model), p, title))
    if not images:
        return {**written, **{key: "no evaluation images given" for key in FIGURES[1:]}}
    pixels = eval_pixels(images, size, size)
    written["attention_distance"] = _figure(out_dir / "attention_distance.png", lambda p: attention_distance_png(
        {name: mean_attention_distance(model, pixels)}, p, size))
    written["attention_rollout"] = _figure(out_dir / "attention_rollout.png", lambda p: rollout_png(
        pixels, last_block_cls_attention(model, pixels).mean(dim=1), attention_rollout(model, pixels)[1], p, name))
    return written


def _figure(path: Path, draw) -> str:
    try:
        draw(path)
        return str(path)
    except SslVitError as e:
        return str(e)


def row_figures(models: dict, images: list, out_dir: Path) -> dict:
    """`inspect_backbone` for every trained row ({name: run folder}) into `out_dir/<name>/`, and every row's
    attention distances side by side in `out_dir/attention_distance.png` → {name: {figure: path or note}}."""
    results, distances, size = {}, {}, 0
    for name, folder in models.items():
        if folder is None:
            continue
        try:
            model, meta = load_backbone(folder)
        except SslVitError as e:
            results[name] = {"backbone": str(e)}
            continue
        results[name] = inspect_backbone(model, meta, images, Path(out_dir) / name, name)
        if images and Path(results[name]["attention_distance"]).is_file():
            size = int(meta["img_size"])
            distances[name] = mean_attention_distance(model, eval_pixels(images, size, size))
    if distances:
        attention_distance_png(distances, Path(out_dir) / "attention_distance.png", size)
    return results


def report_lines(results: dict, out: Path) -> list[str]:
    """The report's section for `row_figures`' results (paths relative to the report in `out`)."""
    lines = ["", "## What each model learnt about position and attention", "",
             "Dosovitskiy et al. 2021, Fig. 7: each patch position's position-embedding similarity with every other "
             f"(learnt embeddings show the 2-D grid when they have learnt it; {SINCOS_NOTE}); mean attention distance "
             "per head against depth on the test images; attention rollout (Abnar & Zuidema 2020) beside the "
             "last-block CLS attention.", ""]
    if (Path(out) / "vit_figures" / "attention_distance.png").is_file():
        lines += ["![attention distance](vit_figures/attention_distance.png)", ""]
    for name, figures in results.items():
        lines.append(f"### {name}")
        for figure, where in figures.items():
            shown = Path(where).is_file()
            lines.append(f"![{name} {figure}]({Path(where).relative_to(out)})" if shown else f"- {figure}: {where}")
        lines.append("")
    return lines
