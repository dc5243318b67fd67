"""The MAE decoder (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners", Sec. 3 "MAE decoder").

"The input to the MAE decoder is the full set of tokens consisting of (i) encoded visible patches, and (ii) mask
tokens ... We add positional embeddings to all tokens in this full set." The decoder is a few timm `Block`s on a
narrower width, followed by a linear projection to the pixels of each patch.
"""
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ssl_vit.models.pos_embed import sincos_2d


def init_mae_weights(module: nn.Module) -> None:
    """The reference initialisation: xavier-uniform Linear weights with zero bias, LayerNorm at identity."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MAEDecoder(nn.Module):
    """Light decoder of MAE (Sec. 3): embed → un-shuffle with mask tokens → + sin-cos pos → blocks → pixels."""

    def __init__(self, grid_size: tuple[int, int], patch_size: int, encoder_dim: int, decoder_dim: int = 512,
                 depth: int = 8, num_heads: int = 16, mlp_ratio: float = 4.0, in_chans: int = 3):
        super().__init__()
        if decoder_dim % num_heads:
            raise ValueError(f"MAEDecoder: decoder_dim {decoder_dim} is not divisible by num_heads {num_heads}")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.embed = nn.Linear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        pos = sincos_2d(decoder_dim, grid_size, cls_token=True).unsqueeze(0)  # [1, 1 + L, Dd]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.Sequential(*[Block(decoder_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                      for _ in range(depth)])
        self.norm = norm_layer(decoder_dim)
        self.pred = nn.Linear(decoder_dim, patch_size ** 2 * in_chans)
        self.apply(init_mae_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent: [N, 1 + K, De] (CLS + visible tokens, shuffled order); ids_restore: [N, L] → [N, L, p*p*C]."""
        x = self.embed(latent)  # [N, 1 + K, Dd]
        n, length = ids_restore.shape
        masked = self.mask_token.to(x.dtype).expand(n, length + 1 - x.shape[1], -1)  # [N, L - K, Dd]
        patches = torch.cat([x[:, 1:], masked], dim=1)  # [N, L, Dd], shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed  # [N, 1 + L, Dd]
        x = self.norm(self.blocks(x))
        return self.pred(x[:, 1:])  # [N, L, p*p*C], CLS dropped
