"""Weighted k-NN classification of frozen features (the DINO protocol).

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO, ICCV 2021), Sec. 4.1 / App.:
features are L2-normalised, each of the k nearest training features (cosine similarity s_i) votes for its class
with weight exp(s_i / T), T = 0.07, and the class with the largest summed vote wins (Wu et al. 2018, Eq. 6).
FAISS does the neighbour search in query chunks; the votes for every k come from the one max(k) search, since the
k nearest neighbours are a prefix of the max(k) nearest.
"""
import time

import numpy as np
import torch

from ssl_vit.errors import SslVitError
from ssl_vit.eval import faiss_utils
from ssl_vit.eval.feature_cache import require_labels

DEFAULT_KS = (10, 20, 100, 200)
VOTE_ELEMENTS = 1 << 22  # rows x classes of one dense vote block (32 MiB in float64)


def knn_classify(train_feats, train_labels, test_feats, test_labels, ks=DEFAULT_KS, temperature=0.07,
                 num_classes=None, chunk_size=faiss_utils.SEARCH_CHUNK, num_threads=None, use_gpu=None,
                 return_predictions=False, vote_device=None) -> dict:
    """Top-1/top-5 accuracy (%) of the exp(sim/T)-weighted k-NN vote for each k in `ks`.

    Ties in the vote go to the smaller class index (for top-1 and for the top-5 cut alike). `num_threads`
    (default: this machine's cores) sets FAISS's OpenMP pool and torch's own pool for the duration of the call.
    Votes are counted on `vote_device` (default: the accelerator when there is one; the same counts anywhere).
    Returns {"k": {"10": {"top1", "top5"}, ...}, "num_train", "num_test", "dim", "num_classes", "temperature",
    "seconds": {"index", "search", "vote", "total"}, "device", "threads"} and, with `return_predictions`,
    "predictions": {"10": int64 [Nq], ...}.
    """
    t_start = time.perf_counter()
    train_feats = faiss_utils.as_float32_2d(train_feats, "train features")
    test_feats = faiss_utils.as_float32_2d(test_feats, "test features")
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    ks = _check_inputs(train_feats, train_labels, test_feats, test_labels, ks, temperature)
    num_classes = _num_classes(train_labels, test_labels, num_classes)
    device = faiss_utils.resolve_device(use_gpu)
    if device == "faiss-gpu" and ks[-1] > faiss_utils.GPU_MAX_K:
        raise SslVitError(f"k={ks[-1]} exceeds the FAISS GPU limit of {faiss_utils.GPU_MAX_K}")

    with faiss_utils.thread_limit(num_threads) as threads:
        t0 = time.perf_counter()
        index = faiss_utils.flat_ip_index(train_feats, device)
        seconds = {"index": time.perf_counter() - t0, "search": 0.0, "vote": 0.0}
        vote_device = faiss_utils.torch_device(vote_device)
        bank_labels = torch.from_numpy(train_labels.astype(np.int64)).to(vote_device)
        votes = _Votes(ks, num_classes, len(test_feats), return_predictions)
        chunks = faiss_utils.iter_search(index, test_feats, ks[-1], chunk_size)
        while True:
            t0 = time.perf_counter()
            chunk = next(chunks, None)
            seconds["search"] += time.perf_counter() - t0
            if chunk is None:
                break
            t0 = time.perf_counter()
            start, sims, ids = chunk
            truth = torch.from_numpy(test_labels[start:start + len(ids)].astype(np.int64)).to(vote_device)
            sims, ids = torch.from_numpy(sims).to(vote_device), torch.from_numpy(ids).to(vote_device)
            votes.add(start, sims, bank_labels[ids], truth, temperature)
            seconds["vote"] += time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start

    n = len(test_feats)
    result = {"k": {str(k): {"top1": 100.0 * votes.top1[i] / n, "top5": 100.0 * votes.top5[i] / n}
                    for i, k in enumerate(ks)},
              "num_train": len(train_feats), "num_test": n, "dim": int(train_feats.shape[1]),
              "num_classes": num_classes, "temperature": float(temperature), "seconds": seconds,
              "device": device, "threads": threads}
    if return_predictions:
        result["predictions"] = {str(k): votes.predictions[i] for i, k in enumerate(ks)}
    return result


class _Votes:
    """Accumulates correct-at-1/at-5 counts (and optionally predictions) per k over query chunks."""

    def __init__(self, ks, num_classes: int, num_queries: int, keep_predictions: bool):
        self.ks, self.num_classes = ks, num_classes
        self.top1, self.top5 = [0] * len(ks), [0] * len(ks)
        self.predictions = [np.empty(num_queries, np.int64) for _ in ks] if keep_predictions else None

    def add(self, start: int, sims, neighbour_labels, truth, temperature: float) -> None:
        """sims, neighbour_labels: [c, kmax] sorted by decreasing similarity; truth: [c]."""
        block = max(1, VOTE_ELEMENTS // self.num_classes)
        weights = (sims.double() / temperature).exp_()  # [c, kmax]; float64 keeps near-ties stable
        for b in range(0, len(truth), block):
            rows = slice(b, b + block)
            self._add_block(start + b, weights[rows], neighbour_labels[rows], truth[rows])

    def _add_block(self, start: int, weights, neighbour_labels, truth) -> None:
        votes = weights.new_zeros(len(truth), self.num_classes)  # [b, C]
        previous = 0
        for i, k in enumerate(self.ks):
            # the k nearest are a prefix of the kmax nearest: add only the new columns
            votes.scatter_add_(1, neighbour_labels[:, previous:k], weights[:, previous:k])
            previous = k
            rank = _rank_of_truth(votes, truth)  # [b], capped at 5
            self.top1[i] += int((rank == 0).sum())
            self.top5[i] += int((rank < 5).sum())
            if self.predictions is not None:
                self.predictions[i][start:start + len(truth)] = votes.argmax(1).cpu().numpy()  # first max: lowest


def _rank_of_truth(votes, truth):
    """Classes ranked before the true class (more votes, or as many and a smaller index), capped at 5.

    A top-5 pass decides most rows; only rows where the true class ties another class inside the top 5, or sits
    on its boundary (e.g. no vote at all, like the classes after it), are counted exactly over all classes."""
    own = votes.gather(1, truth[:, None])  # [b, 1]
    top = votes.topk(min(5, votes.shape[1]), dim=1).values  # [b, 5] descending
    rank = (top > own).sum(1)  # [b]
    exact = ((top == own).sum(1) >= 2) | (own[:, 0] == top[:, -1])
    rows = exact.nonzero()[:, 0]
    if len(rows):
        sub, sub_own = votes[rows], own[rows]  # [r, C], [r, 1]
        lower = torch.arange(votes.shape[1], device=votes.device)[None, :] < truth[rows, None]
        rank[rows] = ((sub > sub_own) | ((sub == sub_own) & lower)).sum(1).clamp_(max=5)
    return rank.clamp_(max=5)


def _check_inputs(train_feats, train_labels, test_feats, test_labels, ks, temperature) -> tuple:
    if train_feats.shape[1] != test_feats.shape[1]:
        raise SslVitError(f"train features have dim {train_feats.shape[1]} but test features have dim "
                          f"{test_feats.shape[1]}: they must come from the same backbone and pooling")
    for name, feats, labels in (("train", train_feats, train_labels), ("test", test_feats, test_labels)):
        if labels.ndim != 1 or len(labels) != len(feats):
            raise SslVitError(f"{name} labels have shape {labels.shape} but there are {len(feats)} {name} features")
        if not np.issubdtype(labels.dtype, np.integer):
            raise SslVitError(f"{name} labels must be integers, got {labels.dtype}")
        require_labels(labels, name, "k-NN")
    try:
        ks = tuple(sorted({int(k) for k in ks}))
    except (TypeError, ValueError):
        raise SslVitError(f"ks must be positive integers, got {ks!r}") from None
    if not ks or ks[0] < 1:
        raise SslVitError(f"ks must be positive integers, got {ks!r}")
    if ks[-1] > len(train_feats):
        raise SslVitError(f"k={ks[-1]} is larger than the train bank ({len(train_feats)} samples)")
    if not temperature > 0:
        raise SslVitError(f"temperature must be > 0, got {temperature}")
    return ks


def _num_classes(train_labels, test_labels, num_classes) -> int:
    needed = int(max(train_labels.max(), test_labels.max())) + 1
    if num_classes is None:
        return needed
    if num_classes < needed:
        raise SslVitError(f"num_classes={num_classes} but labels go up to {needed - 1}")
    return int(num_classes)
