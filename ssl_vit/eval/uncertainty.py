"""How far an accuracy, or a difference of two, can be trusted: bootstrap intervals over test images and the spread
over independent runs (label draws × seeds).

A difference between two models is judged paired: both are scored on the same test images (and, over runs, the same
label draws), so the bootstrap resamples test images once for both and keeps what they share out of the spread.
"""
from dataclasses import dataclass

import numpy as np

from ssl_vit.errors import SslVitError


@dataclass(frozen=True)
class Estimate:
    """A value in %, its standard error and a two-sided interval at `level`."""
    value: float
    std: float
    low: float
    high: float
    level: float = 0.95

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.value:+.1f} ± {self.std:.1f}"


def _correct(correct, name: str) -> np.ndarray:
    values = np.asarray(correct)
    if values.ndim != 1 or values.size == 0:
        raise SslVitError(f"{name}: expected a non-empty 1-D array of per-image hits, got shape {values.shape}")
    return values.astype(np.float64)


def _resampled_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of `n_boot` resamples (with replacement) of the rows of `values`, in %; chunked so memory stays small."""
    rng = np.random.default_rng(seed)
    n, out = len(values), np.empty(n_boot)
    chunk = max(1, 2 ** 22 // n)
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        out[start:start + len(idx)] = values[idx].mean(axis=1) * 100
    return out


def _estimate(point: float, boots: np.ndarray, level: float) -> Estimate:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boots, [tail, 100 - tail])
    return Estimate(float(point), float(boots.std(ddof=1)), float(low), float(high), level)


def bootstrap_accuracy(correct, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Accuracy in % of per-image hits `correct` [N] (bool or 0/1), with a percentile bootstrap interval."""
    hits = _correct(correct, "correct")
    return _estimate(hits.mean() * 100, _resampled_means(hits, n_boot, seed), level)


def paired_difference(correct_a, correct_b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Accuracy of A minus accuracy of B in points, both scored on the same N test images ([N] hits each, or
    [runs, N]: one row per label draw / seed, paired across A and B). The bootstrap resamples test images (columns)
    together for A and B; the spread over runs, when there are several, adds in quadrature."""
    a, b = np.atleast_2d(np.asarray(correct_a, dtype=np.float64)), np.atleast_2d(np.asarray(correct_b, dtype=np.float64))
    if a.shape != b.shape or a.size == 0:
        raise SslVitError(f"paired_difference: A and B must be scored on the same runs and test images, got shapes "
                          f"{a.shape} and {b.shape}")
    per_image = (a - b).mean(axis=0)  # [N]: the difference on each test image, averaged over runs
    boots = _resampled_means(per_image, n_boot, seed)
    estimate = _estimate(per_image.mean() * 100, boots, level)
    if len(a) < 2:
        return estimate
    run_std = float((a.mean(axis=1) - b.mean(axis=1)).std(ddof=1) * 100 / np.sqrt(len(a)))
    std = float(np.hypot(estimate.std, run_std))
    z = estimate.value - estimate.low, estimate.high - estimate.value
    scale = std / max(estimate.std, 1e-12)
    return Estimate(estimate.value, std, estimate.value - z[0] * scale, estimate.value + z[1] * scale, level)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of accuracies over runs."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise SslVitError("mean_std: no values")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def encode_hits(correct) -> str:
    """Per-image hits as a '0'/'1' string (report.json keeps them: one character per test image)."""
    return "".join("1" if hit else "0" for hit in np.asarray(correct, dtype=bool).tolist())


def decode_hits(text: str) -> np.ndarray:
    """The bool array `encode_hits` wrote."""
    if not isinstance(text, str) or set(text) - {"0", "1"}:
        raise SslVitError(f"per-image hits: expected a string of 0/1, got {str(text)[:40]!r}")
    return np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")
