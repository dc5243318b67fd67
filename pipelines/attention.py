"""What the attention figure plots, computed from the trained models: a ViT's last-block CLS→patch self-attention
(DINO teacher) and MAE reconstructions rebuilt from the latest training checkpoint. Drawing lives in figures.py."""
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ssl_vit.errors import SslVitError


@torch.no_grad()
def last_block_cls_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Self-attention of the CLS token on the patch tokens in each head of the last block, as the DINO paper plots it
    (Caron et al. 2021, Fig. 1 and Sec. 4.2.1): softmax_j(q_cls · k_j / sqrt(d)) over all tokens (Vaswani et al.
    2017, Eq. 1), restricted to the patches → [B, H, gh, gw].

    timm's `Attention` never exposes its weights (the fused path has none), so a pre-hook captures the block's
    attention input (the norm1 output) and the weights are recomputed with the block's own `qkv`, q/k norms and
    scale; the model itself is not modified."""
    attn = _last_attention(model)
    captured = {}
    handle = attn.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0]))
    try:
        model.forward_features(images)
    finally:
        handle.remove()
    x = captured["x"]  # [B, N, C]
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, N, d]
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, 1, N]
    patches = weights[:, :, 0, model.num_prefix_tokens:]  # [B, H, L]
    p = model.patch_embed.patch_size
    grid = (images.shape[-2] // p[0], images.shape[-1] // p[1])
    if grid[0] * grid[1] != patches.shape[-1]:
        raise SslVitError(f"attention: {patches.shape[-1]} patch tokens do not form the {grid[0]}x{grid[1]} grid of "
                          f"a {images.shape[-2]}x{images.shape[-1]} image")
    return patches.reshape(b, attn.num_heads, *grid)  # [B, H, gh, gw]


def _last_attention(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    needed = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")
    if attn is None or not all(hasattr(attn, name) for name in needed) or not hasattr(model, "num_prefix_tokens"):
        raise SslVitError(f"attention: {type(model).__name__} is not a timm ViT whose last block has a standard "
                          "`attn` (qkv, num_heads, head_dim, scale)")
    return attn


def attention_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Head-mean CLS attention upsampled (nearest: one flat square per patch) to the image size → [B, H_img, W_img],
    each map scaled to [0, 1] so that one colour map reads the same on every image."""
    maps = last_block_cls_attention(model, images).mean(dim=1, keepdim=True)  # [B, 1, gh, gw]
    maps = torch.nn.functional.interpolate(maps, size=images.shape[-2:], mode="nearest")[:, 0]  # [B, H, W]
    low = maps.amin(dim=(1, 2), keepdim=True)
    high = maps.amax(dim=(1, 2), keepdim=True)
    return (maps - low) / (high - low).clamp_min(1e-12)


def load_mae_method(run_dir: Path) -> nn.Module:
    """The whole MAE method of `run_dir`'s latest checkpoint, in eval mode: the reconstructions need the decoder,
    which the exported backbone leaves out."""
    from ssl_vit.loading import load_method

    method, meta = load_method(run_dir)
    if meta["method"] != "mae":
        raise SslVitError(f"{run_dir}: expected an MAE run, its recipe says method {meta['method']!r}")
    return method


@torch.no_grad()
def dino_panels(run_dir: Path, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [0, 1] as [B, S, S, 3], head-mean CLS attention [B, S, S]) for the backbone exported in `run_dir`
    (for DINO that is the teacher, the network the paper visualises)."""
    from ssl_vit.eval.features import eval_pixels
    from ssl_vit.loading import load_backbone
    from ssl_vit.transforms import denormalize

    model, meta = load_backbone(run_dir)
    batch = eval_pixels(images, int(meta["img_size"]), int(meta["img_size"]))
    return denormalize(batch).permute(0, 2, 3, 1), attention_maps(model, batch)


@torch.no_grad()
def mae_panels(run_dir: Path, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(masked input, reconstruction, fraction masked); images [B, S, S, 3] in [0, 1]: removed patches grey in the
    input; the reconstruction shows the visible pixels plus the predicted masked patches, as in the MAE paper."""
    from ssl_vit.eval.features import eval_pixels
    from ssl_vit.transforms import denormalize

    method = load_mae_method(run_dir)
    batch = eval_pixels(images, method.img_size[0], method.img_size[0])
    pred, mask = method.reconstruct(batch)  # [B, 3, S, S] each; mask 1 on removed patches
    visible = denormalize(batch) * (1 - mask)
    masked = visible + 0.5 * mask
    recon = visible + denormalize(pred) * mask
    return masked.permute(0, 2, 3, 1), recon.permute(0, 2, 3, 1), float(mask.mean())
