"""Linear probe on frozen cached features: a grid of linear heads (lr x pooling) trained in one pass.

He et al., "Masked Autoencoders Are Scalable Vision Learners" (MAE, CVPR 2022), App. A.2: linear probing puts a
BatchNorm without affine parameters before the linear classifier. Oquab et al., "DINOv2" (2023), Sec. 7 / eval
code: many linear heads (learning rate x pooling) share one pass over the features and the best is kept.

Optimizer: SGD, momentum 0.9, cosine lr to 0, as DINO's and DINOv2's linear evaluation: the lr grid is on SGD's
scale (1e-3 .. 0.3), and after the affine-free BatchNorm every input dimension is standardised, so SGD is well
conditioned; AdamW would need a different grid and its per-weight scaling buys nothing on a convex problem.
Selection uses the *training* features only; the test set is read only after the choice is made (`_select`
never receives it); validation top-1 ties go to the lower validation loss. With enough labels per class (every class
gives at least one sample to a `val_fraction` split) the grid is scored on one stratified hold-out split and the
chosen head is reported as trained on the remaining 1 - val_fraction (no refit). With few labels per class (1 % of a
small dataset: a handful of images per class) one split would hold out nothing or a single image, so the grid is
scored by stratified k-fold cross-validation (k = the smallest class's count, at most 5: with 5 images per class,
leave one image of every class out per fold) and the chosen (lr, pooling) is refit on all of them. With a single
image in some class nothing can be held out: the grid is not scored and FIXED_LR is used.
"""
import math
import time

import numpy as np
import torch
from torch import nn

from ssl_vit.errors import SslVitError
from ssl_vit.eval import faiss_utils
from ssl_vit.eval.feature_cache import FeatureSet, require_labels

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
MAX_FOLDS = 5
FIXED_LR = 1e-2  # no selection possible (one labelled image in some class): the middle of the default grid


def linear_probe(train: FeatureSet, test: FeatureSet, lrs=DEFAULT_LRS, epochs=100, batch_size=256,
                 val_fraction=0.1, seed=0, weight_decay=0.0, num_threads=None, device=None,
                 return_predictions=False) -> dict:
    """Train the grid on `train`, choose by validation top-1, report the chosen head's test top-1/top-5 (%).

    With meta pooling "cls+avg" (features = [cls ‖ avg]) the grid also spans the cls, avg and cls+avg slices.
    Returns {"best_lr", "best_pooling", "val_top1", "test_top1", "test_top5", "grid": {lr: val_top1} (full
    features), "pooling_grid": {pooling: {lr: val_top1}}, "epochs", "optimizer", "num_train", "num_val", ...}.
    The grid trains on `device` (default: the accelerator when there is one), the training features held there.
    With `return_predictions`, also "test_predictions": the chosen head's top-1 class per test image (int64 [N]).
    """
    t_start = time.perf_counter()
    lrs = _check_args(train, test, lrs, epochs, batch_size, val_fraction)
    slices = pooling_slices(train.meta, train.dim)
    num_classes = int(train.labels.max()) + 1
    device = faiss_utils.torch_device(device)
    opts = dict(epochs=epochs, batch_size=batch_size, seed=seed, weight_decay=weight_decay)
    with faiss_utils.thread_limit(num_threads):
        folds = selection_folds(train.labels, val_fraction, seed)
        choice = _select(train, folds, lrs, slices, num_classes, opts, device)
        test_top1, test_top5, predictions = _evaluate(choice["head"], test, num_classes, device)
    full = next(reversed(slices))
    extra = {"test_predictions": predictions} if return_predictions else {}
    return {**extra, "best_lr": choice["lr"], "best_pooling": choice["pooling"], "val_top1": choice["val_top1"],
            "test_top1": test_top1, "test_top5": test_top5, "grid": choice["grid"].get(full),
            "pooling_grid": choice["grid"], "selection": choice["selection"], "epochs": epochs,
            "batch_size": batch_size, "weight_decay": weight_decay, "optimizer": "sgd(momentum=0.9), cosine lr",
            "num_train": choice["num_train"], "num_val": choice["num_val"], "num_test": len(test),
            "num_classes": num_classes, "seed": seed, "device": device.type, "seconds": time.perf_counter() - t_start}


def pooling_slices(meta: dict, dim: int) -> dict:
    """{pooling name: column slice}; the last entry is always the full feature vector. For "cls+avg" features
    are [cls ‖ avg], where cls may be the CLS tokens of the last `meta["last_blocks"]` blocks concatenated."""
    pooling = meta.get("pooling", "cls")
    if pooling != "cls+avg":
        return {pooling: slice(0, dim)}
    blocks = int(meta.get("last_blocks", 1))
    if blocks < 1 or dim % (blocks + 1):
        raise SslVitError(f"meta pooling is cls+avg with last_blocks={blocks} but the feature dim {dim} is not "
                          f"divisible by {blocks + 1} (expected [cls x {blocks} ‖ avg])")
    split = dim // (blocks + 1) * blocks
    return {"cls": slice(0, split), "avg": slice(split, dim), "cls+avg": slice(0, dim)}


def stratified_split(labels, val_fraction: float, seed: int):
    """(fit indices, val indices), sorted: round(val_fraction * n_c) samples of each class go to validation,
    keeping at least one of the class in the fit part."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        take = min(int(round(val_fraction * len(members))), len(members) - 1)
        val.extend(members[:take].tolist())
    val = np.sort(np.asarray(val, dtype=np.int64))
    fit = np.setdiff1d(np.arange(len(labels)), val)
    if len(val) == 0:
        raise SslVitError(f"val_fraction={val_fraction} leaves no validation samples out of {len(labels)}: "
                          "raise it or provide more training features")
    return fit, val


def selection_folds(labels, val_fraction: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(fit indices, val indices)] the grid is scored on: one `stratified_split` when every class gives it a
    validation sample; else stratified k-fold (each class's samples in a seeded order, dealt round-robin to
    k = min(smallest class, MAX_FOLDS) folds); [] when some class has a single sample (nothing to hold out)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    if round(val_fraction * smallest) >= 1:
        return [stratified_split(labels, val_fraction, seed)]
    if smallest < 2:
        return []
    k = min(smallest, MAX_FOLDS)
    fold_of = np.empty(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold_of[members] = np.arange(len(members)) % k
    return [(np.flatnonzero(fold_of != j), np.flatnonzero(fold_of == j)) for j in range(k)]


class ProbeGrid(nn.Module):
    """One affine-free BatchNorm per pooling slice (shared by that slice's heads: it has no parameters, so
    sharing equals one copy each) followed by one linear head per learning rate."""

    def __init__(self, slices: dict, lrs, num_classes: int, generator: torch.Generator):
        super().__init__()
        self.slices, self.lrs = dict(slices), tuple(lrs)
        self.norms = nn.ModuleDict({name: nn.BatchNorm1d(s.stop - s.start, affine=False)
                                    for name, s in self.slices.items()})
        self.heads = nn.ModuleDict()
        for name, s in self.slices.items():
            heads = nn.ModuleList(nn.Linear(s.stop - s.start, num_classes) for _ in self.lrs)
            for head in heads:
                nn.init.normal_(head.weight, std=0.01, generator=generator)
                nn.init.zeros_(head.bias)
            self.heads[name] = heads

    def forward(self, x) -> dict:
        """x: [B, D] -> {(pooling, lr index): logits [B, C]}."""
        out = {}
        for name, s in self.slices.items():
            z = self.norms[name](x[:, s])  # [B, d]
            for i, head in enumerate(self.heads[name]):
                out[(name, i)] = head(z)
        return out

    def param_groups(self, weight_decay: float) -> list:
        return [{"params": list(self.heads[name][i].parameters()), "lr": lr, "base_lr": lr,
                 "weight_decay": weight_decay} for name in self.slices for i, lr in enumerate(self.lrs)]


def cosine_factor(step: int, total_steps: int) -> float:
    """lr multiplier at `step`: 1 -> 0 along half a cosine."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def _select(train: FeatureSet, folds, lrs, slices, num_classes, opts, device) -> dict:
    """The best (pooling, lr) by validation top-1 summed over `folds` (ties: lower validation loss, then the
    earlier grid entry) and its head: from the one fold's grid, or refit on every row after cross-validation."""
    every_row = np.arange(len(train))
    if not folds:
        name = next(reversed(slices))
        grid = _fit_grid(train, every_row, (FIXED_LR,), slices, num_classes, opts, device)
        return {"pooling": name, "lr": FIXED_LR, "val_top1": None, "grid": {}, "selection": "fixed lr (a class has "
                "one labelled sample)", "head": (slices[name], nn.Sequential(grid.norms[name], grid.heads[name][0])),
                "num_train": len(train), "num_val": 0}
    correct, loss, seen = {}, {}, 0
    for fit_idx, val_idx in folds:
        grid = _fit_grid(train, fit_idx, lrs, slices, num_classes, opts, device)
        for key, (n, total) in _score(grid, train, val_idx, device).items():
            correct[key] = correct.get(key, 0) + n
            loss[key] = loss.get(key, 0.0) + total
        seen += len(val_idx)
    scores = {key: 100.0 * n / seen for key, n in correct.items()}
    order = list(scores)
    best = max(order, key=lambda key: (scores[key], -loss[key], -order.index(key)))
    name, i = best
    if len(folds) > 1:
        grid = _fit_grid(train, every_row, lrs, slices, num_classes, opts, device)
    selection = "hold-out split" if len(folds) == 1 else f"{len(folds)}-fold cross-validation, refit on all"
    return {"pooling": name, "lr": lrs[i], "val_top1": scores[best], "selection": selection,
            "head": (slices[name], nn.Sequential(grid.norms[name], grid.heads[name][i])),
            "grid": {p: {f"{lr:g}": scores[(p, j)] for j, lr in enumerate(lrs)} for p in slices},
            "num_train": len(folds[0][0]) if len(folds) == 1 else len(train), "num_val": seen}


def _fit_grid(train: FeatureSet, rows, lrs, slices, num_classes, opts, device) -> "ProbeGrid":
    x = torch.from_numpy(np.asarray(train.features[rows], dtype=np.float32)).to(device)
    y = torch.from_numpy(np.asarray(train.labels[rows], dtype=np.int64)).to(device)
    if len(x) < 2:
        raise SslVitError(f"linear probe needs at least 2 training samples after the validation split, got {len(x)}")
    generator = torch.Generator().manual_seed(opts["seed"])
    grid = ProbeGrid(slices, lrs, num_classes, generator).to(device)
    _train(grid, x, y, opts, generator)
    return grid


def _score(grid: "ProbeGrid", train: FeatureSet, rows, device) -> dict:
    """{(pooling, lr index): (correct, summed cross-entropy)} of every head on `rows`."""
    xv = torch.from_numpy(np.asarray(train.features[rows], dtype=np.float32)).to(device)
    yv = torch.from_numpy(np.asarray(train.labels[rows], dtype=np.int64)).to(device)
    out = {}
    grid.eval()
    with torch.no_grad():
        for start in range(0, len(xv), 4096):
            y = yv[start:start + 4096]
            for key, logits in grid(xv[start:start + 4096]).items():
                n, total = out.get(key, (0, 0.0))
                out[key] = (n + int((logits.argmax(1) == y).sum()),
                            total + float(nn.functional.cross_entropy(logits, y, reduction="sum")))
    return out


def _train(grid: ProbeGrid, x, y, opts, generator) -> None:
    batch_size = min(opts["batch_size"], len(x))
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = opts["epochs"] * steps_per_epoch
    optimizer = torch.optim.SGD(grid.param_groups(opts["weight_decay"]), momentum=0.9)
    grid.train()
    step = 0
    for _ in range(opts["epochs"]):
        order = torch.randperm(len(x), generator=generator).to(x.device)  # the CPU generator: same order anywhere
        for start in range(0, len(x), batch_size):
            rows = order[start:start + batch_size]
            if len(rows) < 2:  # BatchNorm needs two samples for batch statistics
                continue
            factor = cosine_factor(step, total)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            logits = grid(x[rows])
            loss = sum(nn.functional.cross_entropy(out, y[rows]) for out in logits.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # heads share no parameters: each gets the gradient of its own loss
            optimizer.step()
            step += 1


def _evaluate(head, test: FeatureSet, num_classes: int, device):
    """Test top-1/top-5 (%) of the chosen (slice, BatchNorm + linear) head; the only place test labels are read."""
    columns, module = head
    labels = np.asarray(test.labels, dtype=np.int64)
    if labels.max() >= num_classes:
        raise SslVitError(f"test labels go up to {int(labels.max())} but the training features only have "
                          f"{num_classes} classes")
    module.eval()
    top1 = top5 = 0
    predictions = np.empty(len(test), dtype=np.int64)
    with torch.no_grad():
        for start in range(0, len(test), 4096):
            x = torch.from_numpy(np.array(test.features[start:start + 4096], dtype=np.float32)).to(device)
            y = torch.from_numpy(labels[start:start + 4096]).to(device)
            logits = module(x[:, columns])  # [b, C]
            top = logits.topk(min(5, num_classes), dim=1).indices  # [b, 5]
            predictions[start:start + len(y)] = top[:, 0].cpu().numpy()
            top1 += int((top[:, 0] == y).sum())
            top5 += int((top == y[:, None]).any(1).sum())
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test), predictions


def _check_args(train: FeatureSet, test: FeatureSet, lrs, epochs, batch_size, val_fraction) -> tuple:
    for name, fs in (("train", train), ("test", test)):
        if len(fs) == 0:
            raise SslVitError(f"empty evaluation set: {name} features")
        require_labels(fs.labels, name, "the linear probe")
    if train.dim != test.dim:
        raise SslVitError(f"train features have dim {train.dim} but test features have dim {test.dim}")
    lrs = tuple(float(lr) for lr in lrs)
    if not lrs or min(lrs) <= 0:
        raise SslVitError(f"lrs must be a non-empty list of positive learning rates, got {lrs}")
    if epochs < 1 or batch_size < 2:
        raise SslVitError(f"epochs must be >= 1 and batch_size >= 2, got {epochs} and {batch_size}")
    if not 0 < val_fraction < 1:
        raise SslVitError(f"val_fraction must be in (0, 1), got {val_fraction}")
    return lrs
