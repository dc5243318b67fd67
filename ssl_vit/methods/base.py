"""The contract between the one trainer and the methods (MAE, DINO, supervised).

The trainer never asks which method it runs. Per optimizer step it:
  1. evaluates `schedules[name](step)` for every schedule (`lr`, `wd` from the trainer, plus `method.schedules()`),
  2. calls `batches = method.prepare_step(batches, sched)` once with all accumulation micro-batches (e.g. DINO's
     teacher targets over the whole step),
  3. calls `out = model(batch, sched, seed)` (the DDP-wrapped method) for each micro-batch, with the micro-batch's
     own seed from (run seed, step, rank, micro-batch index), and backpropagates `out['loss']`,
  4. calls `method.before_optimizer_step(step, sched)` (e.g. DINO cancels last-layer gradients),
  5. clips, steps the optimizer,
  6. calls `method.on_step_end(step, sched)` (e.g. the EMA teacher update).
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class BuildContext:
    """What a method's `from_recipe` needs beyond the recipe: facts of the data and views, and the loader of a
    classifier a recipe names (a distillation teacher: `ssl_vit.loading.load_classifier`; methods never read weights
    from disk themselves)."""
    num_classes: int = 0
    num_global_views: int = 2
    load_classifier: Callable | None = None


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters excluded from weight decay: norms and biases (ndim ≤ 1), position embeddings and tokens."""
    skip = set()
    for name, param in model.named_parameters():
        if param.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "token" in name:
            skip.add(name)
    return skip


class Method(nn.Module, ABC):
    """Base class: subclasses set `self.encoder` (the timm ViT trained) and implement `forward`."""

    @abstractmethod
    def forward(self, batch: dict, sched: dict, seed: int) -> dict:
        """batch: {'views': list[Tensor[B,3,H,W]], 'label': LongTensor[B]}; returns {'loss': Tensor, **float logs}.
        `seed` seeds whatever the method draws at random (MAE's masks, mixup): methods hold no random state."""

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, Callable[[int], float]]:
        """Method-specific schedules (pure functions of the global step), evaluated by the trainer."""
        return {}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Two groups: with and without weight decay. Frozen parameters (e.g. an EMA teacher) are left out.

        Each group carries `wd_scale` (1 or 0) so the trainer can apply a weight-decay schedule.
        """
        skip = no_weight_decay_names(self)
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if name in skip else decay).append(param)
        return [dict(params=decay, weight_decay=weight_decay, wd_scale=1.0),
                dict(params=no_decay, weight_decay=0.0, wd_scale=0.0)]

    @torch.no_grad()
    def prepare_step(self, batches: list[dict], sched: dict) -> list[dict]:
        """Called once per optimizer step with all its micro-batches, before any forward; returns what to forward."""
        return batches

    def before_optimizer_step(self, step: int, sched: dict) -> None:
        """Called after backward, before clipping and the optimizer step."""

    @torch.no_grad()
    def on_step_end(self, step: int, sched: dict) -> None:
        """Called after the optimizer step (EMA updates and the like)."""

    def backbone(self) -> nn.Module:
        """The network that evaluation and export use (DINO: the teacher)."""
        return self.encoder

    def classifier(self) -> nn.Module | None:
        """The trained classifier (backbone + head, images → logits) where the method trains one, else None."""
        return None
