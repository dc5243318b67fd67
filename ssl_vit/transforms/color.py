"""The pixel ops after the crop, on a stack of views: colour jitter, grayscale, Gaussian blur, solarize.

The device path calls `augment` on a whole batch of views: float tensors [N, 3, S, S] holding 8-bit values, with the
choices of `params.draw_params`. The arithmetic is PIL's, which the torchvision ops on PIL images (the reference
pipelines) run: ImageEnhance blends in float32 and truncates to 8 bits (about -0.5 grey level per op, which a plain
float version would not reproduce), "L" is ITU-R 601-2 luma in 16-bit fixed point, hue is a shift of PIL's 8-bit
HSV, wrapping at 256. The Gaussian blur is torchvision's kernel (`kernel_size` taps, sigma drawn in BLUR_SIGMA)
truncated at 4 sigma (< 7e-5 of its mass), separable, reflect-padded, rounded to 8 bits; torchvision convolves with
the full 2-D kernel (~40 ms for one 224-px view on a CPU core). The CPU path (`cpu_views`) makes the same ops one
view at a time with OpenCV, which are faster than these tensor ops on one image's views.

Each op runs on the views that drew it only (one op call per op and jitter position, whatever N).
"""
import math

import torch
import torch.nn.functional as F

from ssl_vit.transforms import params as P

SOLARIZE_THRESHOLD = 128  # on the 0..255 scale, as PIL's ImageOps.solarize in the DINO code
TRUNCATE_SIGMAS = 4


def needs_augment(spec) -> bool:
    return spec.color_jitter > 0 or spec.grayscale > 0 or spec.blur > 0 or spec.solarize > 0


def augment(x: torch.Tensor, rows: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Views [N, 3, S, S] (float, 8-bit values; modified in place) with their choices `rows` [N, NUM_PARAMS]:
    colour jitter in the drawn order, grayscale, blur, solarize."""
    jitter = rows[:, P.JITTER] > 0
    for position in range(4):
        op = rows[:, P.ORDER + position]
        for index, apply in enumerate((brightness, contrast, saturation, hue)):
            chosen = torch.nonzero(jitter & (op == index)).flatten()
            if len(chosen):
                x[chosen] = apply(x[chosen], rows[chosen, P.BRIGHTNESS + index].float().view(-1, 1, 1, 1))
    chosen = torch.nonzero(rows[:, P.GRAY] > 0).flatten()
    if len(chosen):
        x[chosen] = luma(x[chosen]).expand(-1, 3, -1, -1)
    chosen = torch.nonzero(rows[:, P.BLUR] > 0).flatten()
    if len(chosen):
        x[chosen] = gaussian_blur(x[chosen], rows[chosen, P.SIGMA], kernel_size).round_().clamp_(0, 255)
    chosen = torch.nonzero(rows[:, P.SOLARIZE] > 0).flatten()
    if len(chosen):
        views = x[chosen]
        x[chosen] = torch.where(views >= SOLARIZE_THRESHOLD, 255 - views, views)
    return x


def truncated(x: torch.Tensor) -> torch.Tensor:
    """What ImagingBlend stores: clipped to 0..255, then cast to UINT8 (truncation)."""
    return x.clamp_(0, 255).floor_()


def luma(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, S, S] 8-bit luma of 8-bit [N, 3, S, S]: PIL's "L" conversion (exact in float32: sums < 2^24)."""
    r, g, b = x.unbind(dim=1)
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536).unsqueeze(1)


def brightness(x, factor):
    """ImageEnhance.Brightness: a blend with black."""
    return truncated(x * factor)


def contrast(x, factor):
    """ImageEnhance.Contrast: a blend with the mean luma, rounded to an integer."""
    mean = torch.floor(luma(x).double().mean(dim=(1, 2, 3), keepdim=True) + 0.5).float()
    return truncated(mean + factor * (x - mean))


def saturation(x, factor):
    """ImageEnhance.Color: a blend with the luma image."""
    gray = luma(x)
    return truncated(gray + factor * (x - gray))


def hue(x, factor):
    """torchvision's `adjust_hue` on PIL images: PIL's 8-bit HSV (rgb2hsv truncates), hue + int(255·factor)
    wrapping at 256, back to RGB (hsv2rgb rounds)."""
    r, g, b = x.unbind(dim=1)  # [N, S, S] each
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(chroma > 0, chroma, 1.0)
    rc, gc, bc = ((value - c) / safe for c in (r, g, b))
    h = torch.where(r == value, bc - gc, torch.where(g == value, 2.0 + rc - bc, 4.0 + gc - rc))
    h8 = torch.where(chroma > 0, torch.floor(torch.remainder(h.double() / 6.0 + 1.0, 1.0) * 255).float(), 0.0)
    s8 = torch.floor(chroma / torch.where(value > 0, value, 1.0) * 255)
    h8 = torch.remainder(h8 + torch.trunc(factor.view(-1, 1, 1) * 255), 256)
    sector = torch.floor(h8 * 6.0 / 255.0)
    f, fs = h8 * 6.0 / 255.0 - sector, s8 / 255.0
    p, q, t = (torch.floor(value * (1.0 - k) + 0.5).clamp_(0, 255) for k in (fs, fs * f, fs * (1.0 - f)))  # C round()
    table = torch.stack([torch.stack(c) for c in ((value, t, p), (q, value, p), (p, value, t), (p, q, value),
                                                  (t, p, value), (value, p, q))])  # [6, 3, N, S, S]
    sector = sector.long().remainder_(6)
    rgb = torch.gather(table, 0, sector.expand(1, 3, *sector.shape))[0].transpose(0, 1)  # [N, 3, S, S]
    return torch.where((s8 == 0).unsqueeze(1), value.unsqueeze(1), rgb)


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """[N, 2r + 1] normalised Gaussian weights, one row per sigma (torchvision's `_get_gaussian_kernel1d`)."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma.device)
    weights = torch.exp(-0.5 * (x / sigma.float().view(-1, 1)) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


def blur_radius(sigma: float, kernel_size: int) -> int:
    """Taps each side of the centre: the kernel truncated at TRUNCATE_SIGMAS·sigma, at most kernel_size // 2."""
    return min(kernel_size // 2, math.ceil(TRUNCATE_SIGMAS * sigma))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of float images [N, C, H, W] with per-image sigma [N], reflect padding, the kernel
    truncated (`blur_radius` of the largest sigma), as shifted multiply-adds."""
    radius = blur_radius(float(sigma.max()), kernel_size)
    if radius == 0:
        return x
    weights = gaussian_kernels(sigma.to(x.device), radius).view(len(x), 1, 1, -1, 1)  # [N, 1, 1, taps, 1]
    height, width = x.shape[-2:]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    rows = padded[..., :width] * weights[:, :, :, 0]  # [N, C, H + 2r, W]
    for i in range(1, 2 * radius + 1):
        rows.addcmul_(padded[..., i:i + width], weights[:, :, :, i])
    out = rows[..., :height, :] * weights[:, :, :, 0]  # [N, C, H, W]
    for i in range(1, 2 * radius + 1):
        out.addcmul_(rows[..., i:i + height, :], weights[:, :, :, i])
    return out
