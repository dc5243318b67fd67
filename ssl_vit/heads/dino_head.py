"""The DINO projection head (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Sec. 3.1, "Network architecture": "a 3-layer multi-layer perceptron (MLP) with hidden dimension 2048 followed by
l2 normalization and a weight normalized fully connected layer with K dimensions". The last layer is
w_k = g_k v_k / ||v_k|| (Salimans & Kingma 2016, Eq. 2); with `norm_last_layer` the gains g_k stay frozen at 1, so
the K outputs are cosine similarities between the bottleneck feature and K unit-norm prototypes.
"""
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ssl_vit.losses.precision import autocast_off


def _mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int, use_bn: bool) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(d_in, d_out))
        if use_bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP (GELU) → bottleneck → L2-normalise → weight-normalised linear layer without bias (DINO Sec. 3.1).

    `nlayers` counts the linear layers before the bottleneck output (3 in the paper). `last_layer` is the layer of
    `out_dim` prototypes; DINO's last-layer freeze (`DINO.before_optimizer_step`) finds it by that name.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        for key, value in dict(in_dim=in_dim, out_dim=out_dim, hidden_dim=hidden_dim,
                               bottleneck_dim=bottleneck_dim, nlayers=nlayers).items():
            if int(value) < 1:
                raise ValueError(f"DINOHead: {key} must be ≥ 1, got {value}")
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
        self.mlp.apply(self._init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0  # [out_dim, 1]
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        # The reference initialisation: truncated normal (std 0.02) weights, zero biases.
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # [N, bottleneck_dim]
        # The prototypes' layer runs in float32 under bf16 autocast. Its outputs are cosines in [-1, 1] that the loss
        # divides by τ_t = 0.04 (0.02 in the CIFAR recipe): bf16 rounds a cosine near 1 by up to 2^-9, ±0.05 (±0.1)
        # in the teacher's softmax exponent, up to 5-10 % off a target probability (at initialisation, cosines < 0.3:
        # 1.7 % / 3.3 % measured on the top-10 targets). The reference code's fp16 rounds 8x finer. Cost at ViT-S/16,
        # K = 65536, 2 + 10 crops: 1.3 GFLOP per image in float32 against ~125 GFLOP in bf16, 6-8 % of an H100 step,
        # and float32 logits (4 bytes × K per view row).
        with autocast_off(x.device.type):
            x = nn.functional.normalize(x.float(), dim=-1, p=2)
            return self.last_layer(x)  # [N, out_dim] float32
