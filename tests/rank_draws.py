"""Run by test_train.py under a two-process `accelerate launch`: builds the Trainer from a recipe, then writes to
`out` (rank 0) the world size, each rank's parameter checksum and each rank's output of the backbone in training
mode on the same input — with drop path, equal outputs mean equal masks.

    accelerate launch ... tests/rank_draws.py OUT RECIPE [key=value ...]
"""
import json
import sys

import torch

from ssl_vit.cli import end_process_group
from ssl_vit.config import load_recipe
from ssl_vit.train.trainer import Trainer


def main(out: str, recipe: str, *overrides: str) -> None:
    trainer = Trainer(load_recipe(recipe, list(overrides)))
    acc, backbone = trainer.acc, trainer.method.backbone().train()
    size = trainer.recipe.model.img_size
    images = torch.linspace(-1, 1, 2 * 3 * size * size, device=acc.device).view(2, 3, size, size)
    with torch.no_grad():
        features = backbone(images)  # [2, D]
    checksum = torch.stack([sum(p.double().sum() for p in trainer.method.parameters())])
    gathered = acc.gather(features.unsqueeze(0)).cpu()  # [world, 2, D]
    checksums = acc.gather(checksum.to(acc.device)).cpu()  # [world]
    if acc.is_main_process:
        with open(out, "w") as f:
            json.dump({"world_size": acc.num_processes, "checksums": checksums.tolist(),
                       "features": gathered.tolist()}, f)
    end_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
