"""Training compute per image, counted from the model itself: one optimizer step's forward and backward over every
view a method makes of an image (DINO's teacher forward included), divided by the batch size.

torch's FlopCounterMode counts matrix products and convolutions (2 FLOPs per multiply-add), forward and backward,
as the kernels are dispatched; element-wise work (norms, activations, the softmax, the EMA update) is not counted,
as in the scaling-law literature's 6·N·D rule. Attention is counted as two batched matrix products: the fused
scaled-dot-product kernels are not all known to the counter, so counting runs the math kernel, whose products are.
"""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ssl_vit.methods.base import Method


def synthetic_batch(view_sizes: list[int], batch_size: int, num_classes: int) -> dict:
    """A batch of the shapes a method trains on: one normalised [B, 3, S, S] tensor per view, labels in range."""
    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(batch_size, 3, size, size, generator=generator) for size in view_sizes]
    labels = torch.randint(0, max(num_classes, 1), (batch_size,), generator=generator)
    return {"views": views, "label": labels, "key": [f"{i:06d}" for i in range(batch_size)]}


def training_flops_per_image(method: Method, batch: dict, sched: dict) -> dict:
    """{'forward': F, 'backward': B, 'total': F + B} FLOPs per image of one training step of `method` on `batch`.

    The method's parameters get gradients as in training and are left as they were (gradients cleared); nothing
    is stepped. `sched` holds the values the method reads at a step (temperatures, momentum, ...)."""
    batch_size = batch["views"][0].shape[0]
    was_training = method.training
    method.train()
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward_counter:
            prepared = method.prepare_step([batch], sched)[0]
            loss = method(prepared, sched, seed=0)["loss"]
        with FlopCounterMode(display=False) as backward_counter:
            loss.backward()
    method.zero_grad(set_to_none=True)
    method.train(was_training)
    forward = forward_counter.get_total_flops() / batch_size
    backward = backward_counter.get_total_flops() / batch_size
    return {"forward": forward, "backward": backward, "total": forward + backward}
