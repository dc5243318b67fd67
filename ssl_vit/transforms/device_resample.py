"""Resampling on the device, a chunk of images at a time, within a memory budget fixed before anything is decoded.

A batch of 128 phone photographs (12-50 MP) is 4.6-19 GB of uint8 pixels: decoding it at once, or padding a chunk
of it to its largest image in float32, would end on an out-of-memory error at the first such batch. So the worker
reduces every image above MAX_DEVICE_PIXELS on the CPU (a reduced-scale JPEG decode, `cpu_views.decode_for_views`)
before it travels, and the main process decodes and resamples the rest in chunks planned from their header sizes:
`plan_chunks` fills each chunk, in order of orientation and area, while `chunk_bytes` — the peak of the code below on
that chunk, counted from its tensors' shapes — stays within CHUNK_BYTES. Each chunk's resampled views are stored as
uint8 (`round_8bit` makes them whole numbers), and the colour ops run on slices of at most AUGMENT_PIXELS view pixels.
`ChunkPlan.peak_bytes` bounds what one batch holds on the device at any time, and a test holds it for 128 phone
photos under 2 GB.

The resampling is PIL's `resize(box=...)` (the CPU path's numbers): antialiased bicubic/bilinear filter weights over
each box, clipped to the image, as two batched matrix products per view size, rounded to 8 bits after each pass.
"""
from dataclasses import dataclass

import numpy as np
import torch

from ssl_vit.transforms import params as P

FILTER_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}
MAX_DEVICE_PIXELS = 16_000_000  # larger images are reduced in the worker (a 48 MP photo decodes at 1/2 to 1/8)
CHUNK_BYTES = 1 << 30  # the working set of one chunk of images on the device
AUGMENT_PIXELS = 1 << 21  # view pixels (S² per view) colour-augmented at once
AUGMENT_BYTES_PER_PIXEL = 160  # colour.augment's peak per view pixel: 84-89 B measured on CPU with every op drawn
WEIGHT_BYTES = 36  # per filter weight [S, L]: float64 t and two bicubic pieces, the float32 result, the flip's copy


@dataclass(frozen=True)
class ChunkPlan:
    """Chunks of a batch's images (indices into it) decoded and resampled together, and what each holds at its peak.

    `views_bytes`: the batch's views as uint8 (resampled, then placed in batch order) and float32 (normalised, the
    model's input), held throughout.
    `augment_bytes`: the colour ops' peak on one slice of views."""
    chunks: list
    chunk_bytes: list
    views_bytes: int
    augment_bytes: int

    @property
    def peak_bytes(self) -> int:
        """An upper bound of the device memory one batch's views take at any time."""
        return self.views_bytes + max([self.augment_bytes, *self.chunk_bytes])


def view_groups(specs) -> list[tuple[list[int], object]]:
    """Views resampled together: those of one size and filter (indices into the flat list of views, a spec)."""
    groups = {}
    for v, spec in enumerate(specs):
        groups.setdefault((spec.size, spec.interpolation), []).append(v)
    return [(index, specs[index[0]]) for index in groups.values()]


def chunk_bytes(heights, widths, groups) -> int:
    """Peak bytes of `resample_chunk` on images heights × widths with the view groups `groups`: the decoded uint8
    images or one group's filter weights and products, on top of the float32 padded chunk [n, Hmax, 3, Wmax]."""
    n, height, width = len(heights), max(heights), max(widths)
    decoded = sum(3 * h * w for h, w in zip(heights, widths))
    padded = 12 * n * height * width
    work = 0
    for index, spec in groups:
        rows = n * len(index) * spec.size  # filter rows of the group: [n, G, S]
        weights = WEIGHT_BYTES * rows * max(height, width) + 4 * rows * (height + width)
        products = 2 * 12 * rows * width + 12 * rows * spec.size  # first pass and its transposed copy; the views
        work = max(work, weights + products)
    return padded + max(decoded, work)


def plan_chunks(heights, widths, specs, batch_size: int | None = None) -> ChunkPlan:
    """The chunks `device_views` decodes and resamples for images heights × widths (from their headers) of a batch
    of `batch_size` samples (default: these images) with views `specs` (one per view, repeats included): images in
    order of (orientation, area), a chunk grown while its `chunk_bytes` stays within CHUNK_BYTES (an image alone is
    always a chunk: the worker bounds its size)."""
    groups = view_groups(specs)
    order = sorted(range(len(heights)), key=lambda e: (heights[e] > widths[e], heights[e] * widths[e]))
    chunks, sizes, chunk = [], [], []
    for e in order:
        grown = chunk + [e]
        cost = chunk_bytes([heights[i] for i in grown], [widths[i] for i in grown], groups)
        if chunk and cost > CHUNK_BYTES:
            chunks.append(chunk)
            sizes.append(chunk_bytes([heights[i] for i in chunk], [widths[i] for i in chunk], groups))
            grown = [e]
        chunk = grown
    if chunk:
        chunks.append(chunk)
        sizes.append(chunk_bytes([heights[i] for i in chunk], [widths[i] for i in chunk], groups))
    view_pixels = sum(3 * s.size * s.size for s in specs)
    largest_view = max(s.size * s.size for s in specs)
    augment = AUGMENT_BYTES_PER_PIXEL * max(AUGMENT_PIXELS, largest_view)
    batch = len(heights) if batch_size is None else batch_size
    return ChunkPlan(chunks, sizes, batch * view_pixels * (1 + 1 + 4), augment)


def pad(images: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float32 [n, Hmax, 3, Wmax] zero-padded — the layout the first matrix product reads —, heights [n],
    widths [n]) of uint8 images [3, H, W]."""
    heights = torch.tensor([img.shape[1] for img in images], device=device)
    widths = torch.tensor([img.shape[2] for img in images], device=device)
    padded = torch.zeros(len(images), int(heights.max()), 3, int(widths.max()), device=device)
    for i, img in enumerate(images):
        padded[i, :img.shape[1], :, :img.shape[2]] = img.permute(1, 0, 2)
    return padded, heights, widths


def resample(padded: torch.Tensor, heights, widths, rows: torch.Tensor, spec) -> torch.Tensor:
    """uint8 [n, G, 3, S, S]: the boxes `rows` [n, G, NUM_PARAMS] (in the images' pixels) of the images `padded`
    [n, Hmax, 3, Wmax] (each `heights` × `widths`) resampled as PIL's resize(box=...) does it, flipped where drawn;
    rounded to 8 bits after each pass, as PIL's passes are. The weights are zero past each image, so the padding
    never contributes."""
    x, y, w, h = (rows[..., c] for c in (P.X, P.Y, P.W, P.H))  # [n, G]
    (n, groups), size, (height, width) = rows.shape[:2], spec.size, (padded.shape[1], padded.shape[3])
    weights_y = filter_weights(y, y + h, heights[:, None], height, size, spec.interpolation)  # [n, G, S, Hmax]
    weights_x = filter_weights(x, x + w, widths[:, None], width, size, spec.interpolation)  # [n, G, S, Wmax]
    flipped = rows[..., P.FLIP] > 0
    weights_x[flipped] = weights_x[flipped].flip(-2)
    columns = padded.view(n, height, 3 * width)  # [n, Hmax, 3·Wmax]
    tall = round_8bit(torch.bmm(weights_y.reshape(n, groups * size, height), columns))  # [n, G·S, 3·Wmax]
    del weights_y
    tall = tall.view(n * groups, size, 3, width).transpose(1, 2).reshape(n * groups, 3 * size, width)
    out = round_8bit(torch.bmm(tall, weights_x.reshape(n * groups, size, width).transpose(1, 2)))  # [n·G, 3·S, S]
    return out.to(torch.uint8).view(n, groups, 3, size, size)


def round_8bit(x: torch.Tensor) -> torch.Tensor:
    """What PIL stores after a resampling pass (rounded, clipped), in place."""
    return x.add_(0.5).floor_().clamp_(0, 255)


def filter_weights(start, end, in_size, padded: int, out_size: int, interpolation: str) -> torch.Tensor:
    """float32 [..., out_size, padded] resampling weights of PIL's `precompute_coeffs` (Resample.c) for source
    intervals [start, end) (any shape [...]) of images `in_size` pixels long: antialiased (the filter widens with the
    scale), the window clipped to the image, rows normalised; zero past `in_size`. Computed in float64, in place
    where it can be (see WEIGHT_BYTES)."""
    scale = ((end - start) / out_size).unsqueeze(-1)  # [..., 1]
    filter_scale = torch.clamp(scale, min=1.0)
    support = (FILTER_SUPPORT[interpolation] * filter_scale).unsqueeze(-1)
    out = torch.arange(out_size, dtype=torch.float64, device=scale.device)
    center = (start.unsqueeze(-1) + (out + 0.5) * scale).unsqueeze(-1)  # [..., S, 1]
    lo = torch.clamp(torch.trunc(center - support + 0.5), min=0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), in_size.unsqueeze(-1).unsqueeze(-1))
    i = torch.arange(padded, dtype=torch.float64, device=scale.device)
    t = (i - center + 0.5).div_(filter_scale.unsqueeze(-1)).abs_()  # [..., S, padded]
    if interpolation == "bicubic":  # PIL's a = -0.5: (1.5t - 2.5)t² + 1 below 1, ((-0.5t + 2.5)t - 4)t + 2 below 2
        weights = (t * 1.5).sub_(2.5).mul_(t).mul_(t).add_(1).masked_fill_(t >= 1, 0)
        far = (t * -0.5).add_(2.5).mul_(t).sub_(4).mul_(t).add_(2).masked_fill_((t < 1) | (t >= 2), 0)
        weights.add_(far)
        del far
    else:
        weights = t.neg().add_(1).clamp_(min=0)
    del t
    weights.mul_((i >= lo) & (i < hi))
    total = weights.sum(dim=-1, keepdim=True)
    return weights.div_(torch.where(total == 0, torch.ones_like(total), total)).float()


def plan_sizes(sizes: np.ndarray) -> tuple[list[int], list[int]]:
    """(heights, widths) as Python ints from an array [E, 2] of (height, width)."""
    return [int(h) for h in sizes[:, 0]], [int(w) for w in sizes[:, 1]]
