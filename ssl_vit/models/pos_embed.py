"""Fixed 2-D sine-cosine position embeddings (He et al. 2021, MAE, Sec. 3 "Encoder"; Vaswani et al. 2017, Sec. 3.5).

For a position `pos` and frequency index i < D/4 the 1-D embedding is
    [sin(pos * ω_i), ..., cos(pos * ω_i), ...],  ω_i = 1 / 10000^(i / (D/4)),
the sines of all frequencies first, then the cosines (the arrangement of the MAE reference code). The 2-D embedding
concatenates the 1-D embedding of the column index (first D/2 channels) with that of the row index (last D/2),
again as the reference code does, so weights stay interchangeable with the official MAE checkpoints.
"""
import torch

from ssl_vit.errors import SslVitError


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding of `positions` [M] → [M, dim], computed in float64."""
    if dim % 2:
        raise SslVitError(f"position embedding: width {dim} must be even for a sin-cos embedding")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega  # [dim/2]
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # [M, dim/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # [M, dim]


def sincos_2d(dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """2-D sin-cos embedding for a (rows, cols) patch grid in row-major order → [(1 +) rows*cols, dim] float32.

    With `cls_token` a zero row is prepended for the class token (the paper's encoder and decoder both do this).
    """
    rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if dim % 4:
        raise SslVitError(f"position embedding: width {dim} must be divisible by 4 for a 2-D sin-cos embedding")
    row_idx, col_idx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")  # [rows, cols] each
    emb = torch.cat([sincos_1d(dim // 2, col_idx.reshape(-1)),
                     sincos_1d(dim // 2, row_idx.reshape(-1))], dim=1)  # [rows*cols, dim]
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)  # [1 + rows*cols, dim]
    return emb.float()
