"""Evaluation on the accelerator: the probe grid and the k-NN votes run on `faiss_utils.torch_device()` (CUDA when
there is one) with the same results as on the CPU. Without a GPU this checks the CPU half: an explicit CPU device and
the default agree exactly, and the default is the CPU here."""
import numpy as np
import torch

from ssl_vit.eval.faiss_utils import torch_device
from ssl_vit.eval.feature_cache import FeatureSet
from ssl_vit.eval.knn import knn_classify
from ssl_vit.eval.linear_probe import linear_probe


def features(seed: int, n: int = 300, classes: int = 5, dim: int = 16) -> FeatureSet:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(classes, dim))[y] + rng.normal(scale=1.5, size=(n, dim))
    return FeatureSet(x.astype(np.float32), y.astype(np.int64), [f"{i:05d}" for i in range(n)], {"pooling": "cls"})


def test_default_device_is_the_accelerator_when_there_is_one():
    assert torch_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert torch_device("cpu") == torch.device("cpu")


def test_probe_and_knn_give_the_same_results_on_the_default_device_and_the_cpu():
    tolerance = 0.0 if torch_device().type == "cpu" else 1.0  # % top-1: float sums differ in the last bits on a GPU
    train, test = features(0), features(1)
    default = linear_probe(train, test, lrs=(0.01, 0.1), epochs=3, batch_size=64)
    cpu = linear_probe(train, test, lrs=(0.01, 0.1), epochs=3, batch_size=64, device="cpu")
    assert cpu["device"] == "cpu" and default["device"] == torch_device().type
    assert abs(default["test_top1"] - cpu["test_top1"]) <= tolerance and default["best_lr"] == cpu["best_lr"]
    a = knn_classify(train.features, train.labels, test.features, test.labels, ks=(5, 20), return_predictions=True)
    b = knn_classify(train.features, train.labels, test.features, test.labels, ks=(5, 20), return_predictions=True,
                     vote_device="cpu")
    assert all(abs(a["k"][k]["top1"] - b["k"][k]["top1"]) <= tolerance for k in a["k"])
    if tolerance == 0:
        assert all(np.array_equal(a["predictions"][k], b["predictions"][k]) for k in a["k"])
