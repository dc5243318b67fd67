"""Choices the comparison makes on its validation split, never on the test set: the k of the headline k-NN (the
probe's lr is chosen on a held-out part of the labelled images, eval/linear_probe.py)."""
import numpy as np

from ssl_vit.eval.feature_cache import FeatureSet
from ssl_vit.eval.knn import knn_classify

FIXED_K = 20  # the headline k without a validation split (the largest k below it when the bank is smaller)


def fixed_k(ks: list[int]) -> int:
    below = [k for k in sorted(ks) if k <= FIXED_K]
    return below[-1] if below else min(ks)


def choose_knn_k(bank: FeatureSet, val: FeatureSet | None, ks: list[int], temperature: float) -> dict:
    """{"k", "by", "val_top1": {k: %}}: the k whose k-NN (bank = the labelled images) scores best on the
    validation images (ties: the smaller k); without validation images the fixed rule."""
    if val is None or len(val) == 0:
        return {"k": fixed_k(ks), "by": f"fixed (k={FIXED_K} or below: no validation split)", "val_top1": None}
    scores = knn_classify(bank.features, bank.labels, np.asarray(val.features), val.labels, ks=ks,
                          temperature=temperature)["k"]
    val_top1 = {k: scores[str(k)]["top1"] for k in sorted(ks)}
    best = max(val_top1, key=lambda k: (val_top1[k], -k))
    return {"k": best, "by": f"validation ({len(val):,} images)", "val_top1": {str(k): v for k, v in val_top1.items()}}
