"""The random choices of a view, drawn before any pixel is decoded: both view paths apply the same numbers.

`draw_params(spec, count, width, height)` draws, from torch's CPU generator (which the stream seeds per sample), the
crop box, flip, colour jitter (apply, order, factors), grayscale, blur (apply, sigma) and solarize choices of `count`
views of an image whose header says it is `width` × `height`, as rows of a float64 array (columns below). The CPU
path (`cpu_views`) applies one row at a time (torch, PIL, OpenCV); the device path (`device_views`) a batch of rows
with tensor ops. Drawing first is what lets the CPU path decode at a reduced scale (the boxes are known before
decoding) and the device path leave decoding to the GPU (workers only read bytes and draw these numbers).

The distributions are torchvision's (v0.19+): `RandomResizedCrop.get_params` (10 tries of an area fraction and a
log-uniform aspect ratio, then a centre crop of the clamped ratio), `RandomApply`/`RandomHorizontalFlip`/
`RandomGrayscale`/`RandomSolarize` as `u < p`, `ColorJitter` (uniform factors, uniform random order) and
`GaussianBlur` (sigma uniform in BLUR_SIGMA). All uniforms of a view come from one `torch.rand` call.
"""
import math

import numpy as np
import torch

X, Y, W, H, FLIP, JITTER, ORDER, BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAY, BLUR, SIGMA, SOLARIZE = (
    0, 1, 2, 3, 4, 5, 6, 10, 11, 12, 13, 14, 15, 16, 17)
NUM_PARAMS = 18  # ORDER spans columns 6-9: the jitter ops (0 brightness, 1 contrast, 2 saturation, 3 hue) in order
BLUR_SIGMA = (0.1, 2.0)
CROP_TRIES = 10
_U_CROP, _U_POS = 0, 2 * CROP_TRIES  # uniform columns: (area, log ratio) per try, then y and x positions
_U_FLIP, _U_JITTER, _U_ORDER, _U_FACTORS, _U_GRAY, _U_BLUR, _U_SIGMA, _U_SOLARIZE = 22, 23, 24, 28, 32, 33, 34, 35
NUM_UNIFORMS = 36
DRAFT_SCALES = (8, 4, 2, 1)  # JPEG DCT scaling (libjpeg): decode at 1/8, 1/4, 1/2 or full size


def draw_params(spec, count: int, width: int, height: int) -> np.ndarray:
    """[count, NUM_PARAMS] choices for `count` views of `spec` from a `width` × `height` image. Plain Python per view:
    a handful of numbers, where NumPy's per-call overhead made drawing 6× slower (45 vs 8 µs for one view)."""
    b, c, s, h = spec.jitter_strength
    low, high = (max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h), (1 + b, 1 + c, 1 + s, h)
    uniforms = torch.rand(count, NUM_UNIFORMS, dtype=torch.float64).tolist()
    rows = [view_params(u, spec, width, height, low, high) for u in uniforms]
    return np.array(rows, dtype=np.float64).reshape(count, NUM_PARAMS)


def view_params(u: list[float], spec, width: int, height: int, low, high) -> list:
    """One view's row from its NUM_UNIFORMS uniforms; `low`/`high` bound the jitter factors."""
    order = sorted(range(4), key=lambda k: u[_U_ORDER + k])  # a uniform random permutation
    factors = [lo + (hi - lo) * u[_U_FACTORS + k] for k, (lo, hi) in enumerate(zip(low, high))]
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[_U_SIGMA]
    return [*crop_box(u, spec, width, height), u[_U_FLIP] < spec.flip, u[_U_JITTER] < spec.color_jitter, *order,
            *factors, u[_U_GRAY] < spec.grayscale, u[_U_BLUR] < spec.blur, sigma, u[_U_SOLARIZE] < spec.solarize]


def crop_box(u: list[float], spec, width: int, height: int) -> tuple:
    """(x, y, w, h) in source pixels: torchvision's RandomResizedCrop.get_params, or the whole image for a
    centre-crop spec (which is resized and cropped as a whole, see cpu_views)."""
    if spec.crop == "center":
        return 0, 0, width, height
    area, (low, high) = width * height, spec.scale
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    for i in range(_U_CROP, _U_POS, 2):  # (area, log ratio) per try
        target = area * (low + (high - low) * u[i])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[i + 1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return math.floor(u[_U_POS + 1] * (width - w + 1)), math.floor(u[_U_POS] * (height - h + 1)), w, h
    w, h = fallback_box(width, height, spec.ratio)
    return (width - w) // 2, (height - h) // 2, w, h


def fallback_box(width: int, height: int, ratio) -> tuple[int, int]:
    """torchvision's centre-crop fallback: the whole image, its aspect ratio clamped into `ratio`."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return width, int(round(width / min(ratio)))
    if in_ratio > max(ratio):
        return int(round(height * max(ratio))), height
    return width, height


def draft_scale(boxes: np.ndarray, sizes: np.ndarray) -> int:
    """The largest DCT scale 1/s at which every box [n, (x, y, w, h)] keeps at least its view's side `sizes` [n]
    in pixels both ways, so no view is made from fewer pixels than it has."""
    shortest = float(np.min(np.minimum(boxes[:, 2], boxes[:, 3]) / sizes))
    return next((s for s in DRAFT_SCALES if shortest >= s), 1)
