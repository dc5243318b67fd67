"""What the attention figures plot, computed from the trained models: a ViT's self-attention weights in every block,
its last-block CLS→patch attention (DINO teacher), attention rollout (Abnar & Zuidema 2020), the mean attention
distance per head (Dosovitskiy et al. 2021, Fig. 7 right), and MAE reconstructions rebuilt from the latest training
checkpoint. Drawing lives in figures.py and vit_figures.py."""
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ssl_vit.errors import SslVitError
from ssl_vit.eval.features import eval_pixels
from ssl_vit.loading import load_backbone, load_method
from ssl_vit.models.backbone import patch_size_of
from ssl_vit.transforms import denormalize


@torch.no_grad()
def attention_weights(model: nn.Module, images: torch.Tensor, blocks: slice = slice(None)) -> list[torch.Tensor]:
    """Self-attention weights softmax_j(q_i · k_j / sqrt(d)) (Vaswani et al. 2017, Eq. 1) of each chosen block, per
    head, over all tokens → [[B, H, N, N], ...] (N = prefix tokens + patches).

    timm's `Attention` never exposes its weights (the fused path has none), so pre-hooks capture each block's
    attention input (the norm1 output) and the weights are recomputed with the block's own `qkv`, q/k norms and
    scale; the model itself is not modified."""
    modules = [_attention_of(block, model) for block in _blocks(model)[blocks]]
    captured = {}
    handles = [attn.register_forward_pre_hook(lambda module, args, i=i: captured.__setitem__(i, args[0]))
               for i, attn in enumerate(modules)]
    try:
        model.forward_features(images)
    finally:
        for handle in handles:
            handle.remove()
    weights = []
    for i, attn in enumerate(modules):
        x = captured[i]  # [B, N, C]
        b, n, _ = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, N, d]
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        weights.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1).float())  # [B, H, N, N]
    return weights


def patch_grid(model: nn.Module, images: torch.Tensor, num_patches: int) -> tuple[int, int]:
    """The (rows, cols) of patch tokens for `images` (a hybrid's token is its stem's stride, not its patch)."""
    stride = patch_size_of(model)
    grid = (images.shape[-2] // stride, images.shape[-1] // stride)
    if grid[0] * grid[1] != num_patches:
        raise SslVitError(f"attention: {num_patches} patch tokens do not form the {grid[0]}x{grid[1]} grid of "
                          f"a {images.shape[-2]}x{images.shape[-1]} image")
    return grid


@torch.no_grad()
def last_block_cls_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Self-attention of the CLS token on the patch tokens in each head of the last block, as the DINO paper plots it
    (Caron et al. 2021, Fig. 1 and Sec. 4.2.1), restricted to the patches → [B, H, gh, gw]."""
    weights = attention_weights(model, images, slice(-1, None))[0]  # [B, H, N, N]
    patches = weights[:, :, 0, model.num_prefix_tokens:]  # [B, H, L]
    return patches.reshape(*patches.shape[:2], *patch_grid(model, images, patches.shape[-1]))  # [B, H, gh, gw]


@torch.no_grad()
def attention_rollout(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention rollout (Abnar & Zuidema 2020, Sec. 3): per block the head-mean attention plus the residual,
    Â = ½ A + ½ I, rows renormalised; rolled out as R = Â_L ··· Â_1. Returns (R [B, N, N], whose rows sum to 1, and
    the CLS row on the patches, [B, gh, gw])."""
    rollout = None
    for weights in attention_weights(model, images):
        a = weights.mean(dim=1)  # [B, N, N]
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1])
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    cls = rollout[:, 0, model.num_prefix_tokens:]  # [B, L]
    return rollout, cls.reshape(cls.shape[0], *patch_grid(model, images, cls.shape[-1]))


@torch.no_grad()
def mean_attention_distance(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Mean attention distance in pixels per block and head (Dosovitskiy et al. 2021, Fig. 7 right, App. D.7): for
    each patch query, the distance in the image to every patch it attends to (between patch centres), weighted by
    its attention over the patches (prefix tokens left out, weights renormalised), averaged over queries and images
    → [depth, H]."""
    distances = []
    for weights in attention_weights(model, images):
        patches = weights[:, :, model.num_prefix_tokens:, model.num_prefix_tokens:]  # [B, H, L, L]
        patches = patches / patches.sum(dim=-1, keepdim=True)
        gh, gw = patch_grid(model, images, patches.shape[-1])
        rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        centres = torch.stack([rows.flatten(), cols.flatten()], dim=-1).float() * patch_size_of(model)  # [L, 2]
        pixels = torch.cdist(centres, centres)  # [L, L]
        distances.append((patches * pixels).sum(dim=-1).mean(dim=(0, 2)))  # [H]
    return torch.stack(distances)  # [depth, H]


def _blocks(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not len(blocks) or not hasattr(model, "num_prefix_tokens"):
        raise SslVitError(f"attention: {type(model).__name__} is not a timm ViT with global self-attention blocks "
                          "(a Swin attends within shifted windows): drawn for ViTs and hybrid ViTs")
    return blocks


def _attention_of(block: nn.Module, model: nn.Module) -> nn.Module:
    attn = getattr(block, "attn", None)
    needed = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")
    if attn is None or not all(hasattr(attn, name) for name in needed):
        raise SslVitError(f"attention: {type(model).__name__} is not a timm ViT whose blocks have a standard "
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
    method, meta = load_method(run_dir)
    if not hasattr(method, "reconstruct"):
        raise SslVitError(f"{run_dir}: expected a run whose method reconstructs images (MAE), its recipe says "
                          f"method {meta['method']!r}")
    return method


@torch.no_grad()
def dino_panels(run_dir: Path, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [0, 1] as [B, S, S, 3], head-mean CLS attention [B, S, S]) for the backbone exported in `run_dir`
    (for DINO that is the teacher, the network the paper visualises)."""
    model, meta = load_backbone(run_dir)
    batch = eval_pixels(images, int(meta["img_size"]), int(meta["img_size"]))
    return denormalize(batch).permute(0, 2, 3, 1), attention_maps(model, batch)


@torch.no_grad()
def mae_panels(run_dir: Path, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(masked input, reconstruction, fraction masked); images [B, S, S, 3] in [0, 1]: removed patches grey in the
    input; the reconstruction shows the visible pixels plus the predicted masked patches, as in the MAE paper."""
    method = load_mae_method(run_dir)
    batch = eval_pixels(images, method.img_size[0], method.img_size[0])
    pred, mask = method.reconstruct(batch)  # [B, 3, S, S] each; mask 1 on removed patches
    visible = denormalize(batch) * (1 - mask)
    masked = visible + 0.5 * mask
    recon = visible + denormalize(pred) * mask
    return masked.permute(0, 2, 3, 1), recon.permute(0, 2, 3, 1), float(mask.mean())
