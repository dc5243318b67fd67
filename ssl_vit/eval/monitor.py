"""k-NN during pretraining: how good the backbone's features are as training goes (DINO: the teacher).

A small labelled set (`data.monitor`) is decoded once through the evaluation view and kept as uint8 pixels (a
thousand 224-px images: 150 MB). Every `train.monitor_every` steps the main process embeds it with the current
backbone and scores the weighted k-NN of the DINO protocol (eval/knn.py), the rows at odd positions (in key order)
against those at even positions: no image is its own neighbour. Evaluation mode draws no random numbers, so a
monitored run trains exactly as an unmonitored one.
"""
import time

import numpy as np
import torch
from torch import nn

from ssl_vit.errors import SslVitError
from ssl_vit.eval.feature_cache import require_labels
from ssl_vit.eval.features import eval_transform, pooled_features
from ssl_vit.eval.knn import knn_classify
from ssl_vit.models.backbone import default_pooling
from ssl_vit.transforms import normalize

BATCH = 256


class KnnMonitor:
    def __init__(self, source, image_size: int, resize: int | None = None, k: int = 20, temperature: float = 0.07):
        from ssl_vit.data.stream import ShardStream

        try:
            stream = ShardStream(source, eval_transform(image_size, resize), BATCH, mode="eval")
        except SslVitError as e:
            raise SslVitError(f"data.monitor: {e}") from None
        pixels, labels, keys = [], [], []
        for transfer in stream:
            for batch, _ in transfer:
                pixels.append(batch["views"][0])  # [B, 3, H, W] uint8
                labels += batch["label"]
                keys += batch["key"]
        if len(keys) < 4:
            raise SslVitError(f"data.monitor: {source} holds {len(keys)} readable samples; k-NN monitoring needs a "
                              "few hundred")
        require_labels(labels, "data.monitor", "k-NN monitoring", cache=source)
        order = torch.from_numpy(np.argsort(np.asarray(keys), kind="stable"))
        self.pixels = torch.cat(pixels)[order]
        self.labels = np.asarray(labels, dtype=np.int64)[order.numpy()]
        self.k, self.temperature = min(k, len(keys) // 2), temperature

    @torch.no_grad()
    def __call__(self, backbone: nn.Module, device: torch.device) -> dict:
        """{"monitor_knn_top1": %, "monitor_seconds": s} of `backbone` (left in the mode it was in)."""
        t0 = time.perf_counter()
        was_training = backbone.training
        backbone.eval()
        pooling = default_pooling(backbone)
        feats = torch.cat([pooled_features(backbone, normalize(self.pixels[i:i + BATCH].to(device)), pooling).cpu()
                           for i in range(0, len(self.pixels), BATCH)]).numpy()  # [N, D]
        backbone.train(was_training)
        result = knn_classify(feats[0::2], self.labels[0::2], feats[1::2], self.labels[1::2], ks=[self.k],
                              temperature=self.temperature)
        return {"monitor_knn_top1": result["k"][str(self.k)]["top1"], "monitor_seconds": time.perf_counter() - t0}


def knn_monitor(recipe) -> KnnMonitor:
    """The monitor of a training recipe: `data.monitor` through its evaluation view (`data.eval_resize`)."""
    return KnnMonitor(recipe.data.monitor, recipe.model.img_size, recipe.data.eval_resize or None)
