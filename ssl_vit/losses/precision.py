"""Losses in float32 whatever the autocast around them (bf16/fp16 mixed precision).

The trainer runs the whole method under autocast, so a loss written with plain torch ops inherits it: a matmul or
einsum inside the loss (DINO's cross-entropy contraction) runs in bf16 and rounds its result to bf16's 8 significant
bits — at a DINO loss between 4 and 8 every value is then a multiple of 1/32. `float32_math` turns autocast off for
the body of a loss and lifts its floating-point tensor arguments to (at least) float32; gradients still flow back to
the bf16 activations through the casts.
"""
import functools

import torch


def at_least_float32(x):
    """A floating-point tensor in float32 (float64 stays); anything else unchanged."""
    if torch.is_tensor(x) and x.is_floating_point():
        return x.to(torch.promote_types(x.dtype, torch.float32))
    return x


def autocast_off(device_type: str):
    """A context in which no autocast is active for `device_type` ('cpu', 'cuda', ...)."""
    return torch.autocast(device_type=device_type, enabled=False)


def float32_math(fn):
    """Decorate a function (or method) of tensors: its body runs with autocast off, tensor arguments in float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
        device_type = tensors[0].device.type if tensors else "cpu"
        with autocast_off(device_type):
            return fn(*(at_least_float32(a) for a in args), **{k: at_least_float32(v) for k, v in kwargs.items()})

    return wrapper
