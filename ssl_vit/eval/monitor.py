"""k-NN during pretraining: how good the backbone's features are as training goes (DINO: the teacher).

A labelled set (`data.monitor`) is scored every `train.monitor_every` steps by the main process: the weighted k-NN
of the DINO protocol (eval/knn.py), the rows at odd positions (in key order) against those at even positions, so no
image is its own neighbour. Evaluation mode draws no random numbers, so a monitored run trains exactly as an
unmonitored one.

Bounded by design: at most `train.monitor_samples` images, class-balanced (each class at most that number divided by
the number of classes: the first ones in shard order; reading stops once every class is full), decoded once through
the evaluation view at the first monitor step — not in the trainer's constructor — and kept as uint8 pixels; their
features are computed a batch at a time. The other processes wait for it in a barrier. At ImageNet scale (10,000
images of ImageNet's 50,000 validation images, ViT-B/16 at 224 px) rank 0 spends, computed:
- once, at the first monitor step: decoding 10,000 JPEGs (~500×375) to 224-px views at 125-200 images/s on one core
  (125 measured on this project's busy 2-core machine): 50-80 s; 1.5 GB of uint8 pixels held from then on (all
  50,000 would be 7.5 GB and 4-7 min, close to the timeout below);
- every monitor step: 10,000 forwards of ViT-B/16 (17.6 GMACs = 35 GFLOP each: 350 TFLOP) at 40-50 % of an H100's
  989 bf16 TFLOP/s: ~0.8 s, plus 1.5 GB host-to-device (~0.1-0.3 s) and an exact 5,000 × 5,000 k-NN (~ms): 1-2 s.
Both stay far below NCCL's default collective timeout (10 min) that the waiting processes are under.
"""
import time

import numpy as np
import torch
from torch import nn

from ssl_vit.errors import BadSample, SslVitError
from ssl_vit.eval.features import eval_transform, pooled_features
from ssl_vit.eval.knn import knn_classify
from ssl_vit.models.backbone import default_pooling
from ssl_vit.transforms import normalize

BATCH = 256
DEFAULT_SAMPLES = 10_000


class KnnMonitor:
    def __init__(self, source, image_size: int, resize: int | None = None, max_samples: int = DEFAULT_SAMPLES,
                 k: int = 20, temperature: float = 0.07):
        """Cheap: reads the shards' index only; the images are chosen and decoded at the first call."""
        from ssl_vit.data.sources import expand_source

        try:
            self.shards = expand_source(source)
        except SslVitError as e:
            raise SslVitError(f"data.monitor: {e}") from None
        if max_samples < 4:
            raise SslVitError(f"train.monitor_samples: k-NN monitoring needs a few hundred images, got {max_samples}")
        self.source, self.max_samples = source, max_samples
        self.transform, self.image_size = eval_transform(image_size, resize), image_size
        self.k, self.temperature = k, temperature
        self.pixels = self.labels = self.order = self.keys = None  # [N, 3, S, S] uint8; the rest in key order
        self.skipped = 0

    def _load(self) -> None:
        """Choose (class-balanced, at most `max_samples`) and decode the monitor images."""
        num_classes = len(self.shards.classes) if self.shards.classes else len(set(self._labels_only()))
        quota = self.max_samples // max(1, num_classes)
        if quota < 1:
            raise SslVitError(f"train.monitor_samples={self.max_samples} is fewer than the {num_classes} classes of "
                              f"data.monitor ({self.source})")
        capacity = min(quota * num_classes, self.shards.num_samples or quota * num_classes)
        pixels = torch.empty(capacity, 3, self.image_size, self.image_size, dtype=torch.uint8)
        labels, keys, taken = [], [], {}
        for sample, label in self._labelled_samples():
            if taken.get(label, 0) >= quota:
                continue
            try:
                pixels[len(keys)] = self._view(sample)
            except BadSample:
                self.skipped += 1
                continue
            taken[label] = taken.get(label, 0) + 1
            labels.append(label)
            keys.append(sample["__key__"])
            if len(keys) == capacity:
                break  # every class is full (or every sample taken): read no further
        if len(keys) < 4:
            raise SslVitError(f"data.monitor: {self.source} holds {len(keys)} readable samples; k-NN monitoring needs "
                              "a few hundred")
        self.pixels = pixels[:len(keys)]
        self.order = np.argsort(np.asarray(keys), kind="stable")
        self.labels = np.asarray(labels, dtype=np.int64)[self.order]
        self.keys = [keys[i] for i in self.order]
        self.k = min(self.k, len(keys) // 2)

    def _labelled_samples(self):
        """(raw sample, label) of every sample with an image, in shard order; an unlabelled one is an error."""
        from ssl_vit.data.samples import decode_label, image_key, iter_samples

        for url in self.shards.urls:
            for sample in iter_samples(url):
                if image_key(sample) is None:
                    self.skipped += 1
                    continue
                try:
                    label = decode_label(sample)
                except BadSample:
                    self.skipped += 1
                    continue
                if label < 0:
                    raise SslVitError(f"data.monitor: sample {sample['__key__']} of {url} has no label; k-NN "
                                      "monitoring needs a label on every sample")
                yield sample, label

    def _labels_only(self) -> list[int]:
        return [label for _, label in self._labelled_samples()]

    def _view(self, sample: dict) -> torch.Tensor:
        """The evaluation view [3, S, S] uint8 of a raw sample; the caller's random state is left as it was."""
        from ssl_vit.data.samples import open_image
        from ssl_vit.data.stream import caller_rng_kept

        with caller_rng_kept():
            return self.transform(open_image(sample))[0]

    @torch.no_grad()
    def __call__(self, backbone: nn.Module, device: torch.device) -> dict:
        """{"monitor_knn_top1": %, "monitor_seconds": s, "monitor_samples": n} of `backbone` (left in the mode it
        was in); the first call also reports `monitor_load_seconds`, the time to choose and decode the images."""
        t0 = time.perf_counter()
        loaded = {}
        if self.pixels is None:
            self._load()
            loaded = {"monitor_load_seconds": time.perf_counter() - t0, "monitor_unreadable": self.skipped}
            t0 = time.perf_counter()
        was_training = backbone.training
        backbone.eval()
        pooling = default_pooling(backbone)
        order = torch.from_numpy(self.order)
        feats = torch.cat([pooled_features(backbone, normalize(self.pixels[order[i:i + BATCH]].to(device)), pooling)
                           .float().cpu() for i in range(0, len(order), BATCH)]).numpy()  # [N, D], key order
        backbone.train(was_training)
        result = knn_classify(feats[0::2], self.labels[0::2], feats[1::2], self.labels[1::2], ks=[self.k],
                              temperature=self.temperature)
        return {"monitor_knn_top1": result["k"][str(self.k)]["top1"], "monitor_seconds": time.perf_counter() - t0,
                "monitor_samples": len(order), **loaded}


def knn_monitor(recipe) -> KnnMonitor:
    """The monitor of a training recipe: `data.monitor` through its evaluation view (`data.eval_resize`), at most
    `train.monitor_samples` images."""
    return KnnMonitor(recipe.data.monitor, recipe.model.img_size, recipe.data.eval_resize or None,
                      max_samples=recipe.train.monitor_samples)
