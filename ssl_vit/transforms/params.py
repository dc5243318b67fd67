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
    """[count, NUM_PARAMS] choices for `count` views of `spec` from a `width` × `height` image."""
    u = torch.rand(count, NUM_UNIFORMS, dtype=torch.float64).numpy()
    p = np.zeros((count, NUM_PARAMS))
    p[:, [X, Y, W, H]] = crop_boxes(u, spec, width, height)
    p[:, FLIP] = u[:, _U_FLIP] < spec.flip
    p[:, JITTER] = u[:, _U_JITTER] < spec.color_jitter
    p[:, ORDER:ORDER + 4] = np.argsort(u[:, _U_ORDER:_U_ORDER + 4], axis=1)  # a uniform random permutation
    b, c, s, h = spec.jitter_strength
    low = np.array([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
    high = np.array([1 + b, 1 + c, 1 + s, h])
    p[:, BRIGHTNESS:HUE + 1] = low + (high - low) * u[:, _U_FACTORS:_U_FACTORS + 4]
    p[:, GRAY] = u[:, _U_GRAY] < spec.grayscale
    p[:, BLUR] = u[:, _U_BLUR] < spec.blur
    p[:, SIGMA] = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, _U_SIGMA]
    p[:, SOLARIZE] = u[:, _U_SOLARIZE] < spec.solarize
    return p


def crop_boxes(u: np.ndarray, spec, width: int, height: int) -> np.ndarray:
    """[n, 4] boxes (x, y, w, h) in source pixels: torchvision's RandomResizedCrop.get_params, or the whole image
    for a centre-crop spec (which is resized and cropped as a whole, see cpu_views)."""
    n = len(u)
    if spec.crop == "center":
        return np.tile([0.0, 0.0, width, height], (n, 1))
    area = width * height
    target = area * (spec.scale[0] + (spec.scale[1] - spec.scale[0]) * u[:, _U_CROP:_U_POS:2])  # [n, tries]
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, _U_CROP + 1:_U_POS:2])
    w, h = np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    w, h = w[rows, first], h[rows, first]
    fw, fh = fallback_box(width, height, spec.ratio)
    found = fits.any(axis=1)
    w, h = np.where(found, w, fw), np.where(found, h, fh)
    y = np.where(found, np.floor(u[:, _U_POS] * (height - h + 1)), (height - h) // 2)
    x = np.where(found, np.floor(u[:, _U_POS + 1] * (width - w + 1)), (width - w) // 2)
    return np.stack([x, y, w, h], axis=1)


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
