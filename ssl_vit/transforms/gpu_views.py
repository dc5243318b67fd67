"""The device path: workers read bytes and draw the views' choices; a batch of JPEGs is decoded and augmented on the
device (`torchvision.io.decode_jpeg(..., device="cuda")`: nvJPEG), with the choices of `params.draw_params`.

Per batch, in the main process (`device_views`): decode all JPEGs in one call; resample each box to its view size
with PIL's filter weights (antialiased bicubic/bilinear, the box's support clipped to the image, as PIL's
`resize(box=...)` does on the CPU path) as two matrix products per image, the flip folded into the column weights;
then colour jitter in the drawn order, grayscale, Gaussian blur and solarize as tensor ops on the whole batch of
views, with PIL's 8-bit rounding and truncation (ImageEnhance truncates: about -0.5 grey level per op, which a float
version would not reproduce); then normalisation. The same numbers make the same views as the CPU path up to
differences between JPEG decoders — tests compare both paths on CPU tensors. Every function runs on
any torch device, so the CPU tests exercise the code the GPU runs.

Per-sample fallback to the CPU path, inside the worker: an image that is not a JPEG (PNG, ...), or a JPEG whose data
does not end with its end-of-image marker (truncated: a full decode then decides between views and a counted skip).
"""
import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ssl_vit.config import DECODE_MODES
from ssl_vit.errors import SslVitError
from ssl_vit.transforms import params as P
from ssl_vit.transforms.color import augment, needs_augment
from ssl_vit.transforms.normalize import normalize

log = logging.getLogger("ssl_vit.data")

FILTER_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}
END_OF_IMAGE = b"\xff\xd9"
CHUNK = 64  # images whose resampling weights are computed together (bounds their memory)


def gpu_supported(spec) -> bool:
    """Random-resized crops with bicubic or bilinear resampling and no RandAugment (a PIL-only op)."""
    return spec.crop == "rrc" and not spec.randaugment and spec.interpolation in FILTER_SUPPORT


def resolve_decode(mode: str, device: torch.device, specs: list) -> str:
    """`data.decode` → "cpu" or "gpu": auto is gpu on a CUDA device when every view can be made there."""
    if mode not in DECODE_MODES:
        raise SslVitError(f"data.decode: must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    supported = all(gpu_supported(s) for s in specs)
    if mode == "gpu":
        if device.type != "cuda":
            raise SslVitError(f"data.decode: gpu needs a CUDA device, this process runs on {device.type}")
        if not supported:
            raise SslVitError("data.decode: gpu makes random-resized crops (bicubic or bilinear) without "
                              "RandAugment; these views need data.decode: cpu")
    if mode == "auto":
        return "gpu" if device.type == "cuda" and supported else "cpu"
    return mode


# -- in the worker --------------------------------------------------------------------------------------------------
@dataclass
class EncodedViews:
    """One sample for the device path: its JPEG bytes and the drawn choices of its views [V, NUM_PARAMS]."""
    data: np.ndarray
    params: np.ndarray


def encode_views(image: Image.Image, rows: list[np.ndarray]) -> EncodedViews | None:
    """The bytes of a lazily opened, complete JPEG with its views' choices; None where the CPU path must decode."""
    if image.format != "JPEG" or not getattr(image, "tile", None) or getattr(image, "fp", None) is None:
        return None
    data = image.fp.getvalue()  # open_image opens over an in-memory buffer, which PIL keeps until it decodes
    if not data.rstrip(b"\0").endswith(END_OF_IMAGE):
        return None
    return EncodedViews(np.frombuffer(data, np.uint8), np.concatenate(rows))


@dataclass
class EncodedBatch:
    """A batch on its way to the device: the JPEGs' bytes end to end (one tensor: each tensor that leaves a worker
    costs a shared-memory handshake), their choices, and the views of the samples the worker made on the CPU."""
    size: int
    data: torch.Tensor          # uint8 [total bytes]
    offsets: np.ndarray         # [E + 1]
    params: np.ndarray          # [E, V, NUM_PARAMS]
    encoded: np.ndarray         # [E] positions in the batch
    decoded: list               # V tensors [F, 3, S, S] uint8 (empty where F = 0)
    decoded_index: np.ndarray   # [F]
    specs: tuple                # per view


def collate_views(items: list, specs: list | None = None):
    """Per-sample transform outputs → what a batch carries: V stacked uint8 tensors [B, 3, S, S], or an
    EncodedBatch where any sample is an EncodedViews (then `specs` are the transform's specs)."""
    encoded = [i for i, item in enumerate(items) if isinstance(item, EncodedViews)]
    if not encoded:
        return [torch.stack(v) for v in zip(*items)]
    decoded = [i for i, item in enumerate(items) if not isinstance(item, EncodedViews)]
    data = [items[i].data for i in encoded]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in data])])
    views = [torch.stack(v) for v in zip(*(items[i] for i in decoded))]
    return EncodedBatch(len(items), torch.from_numpy(np.concatenate(data)), offsets,
                        np.stack([items[i].params for i in encoded]), np.asarray(encoded), views,
                        np.asarray(decoded, dtype=np.int64), tuple(s for s in specs for _ in range(s.count)))


# -- on the device --------------------------------------------------------------------------------------------------
def views_to_device(views, device: torch.device) -> list[torch.Tensor]:
    """A batch's views on `device`, normalised: stacked uint8 views are moved and normalised, an EncodedBatch is
    decoded and augmented there."""
    from ssl_vit.transforms.normalize import normalize_views

    if isinstance(views, EncodedBatch):
        return [normalize(v) for v in device_views(views, device)]
    return normalize_views(views, device)


def decode_jpegs(batch: EncodedBatch, device: torch.device) -> list[torch.Tensor]:
    """uint8 [3, H, W] images on `device`, one decode call for the batch."""
    from torchvision.io import ImageReadMode, decode_jpeg

    chunks = [batch.data[a:b] for a, b in zip(batch.offsets[:-1], batch.offsets[1:])]
    try:
        return decode_jpeg(chunks, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        raise SslVitError(f"decoding a batch of {len(chunks)} JPEGs on {device} failed ({str(e).splitlines()[0]});"
                          " set data.decode: cpu to decode them with PIL") from None


def device_views(batch: EncodedBatch, device: torch.device) -> list[torch.Tensor]:
    """V float views [B, 3, S, S] in 0..255 on `device` (normalise them once, after)."""
    images = [img.float() for img in decode_jpegs(batch, device)]  # [3, H, W] each
    params = torch.from_numpy(batch.params).to(device)  # [E, V, NUM_PARAMS] float64
    encoded = torch.from_numpy(batch.encoded).to(device)
    out = [None] * len(batch.specs)
    for index, spec in view_groups(batch.specs):
        made = torch.cat([resample(images[c:c + CHUNK], params[c:c + CHUNK][:, index], spec)
                          for c in range(0, len(images), CHUNK)])  # [E, G, 3, S, S]
        if needs_augment(spec):
            rows = params[:, index].flatten(0, 1)  # [E·G, NUM_PARAMS]
            made = augment(made.flatten(0, 1), rows, spec.blur_kernel).unflatten(0, (len(images), len(index)))
        for k, v in enumerate(index):
            full = torch.empty(batch.size, 3, spec.size, spec.size, device=device)
            full[encoded] = made[:, k]
            if len(batch.decoded_index):
                full[torch.from_numpy(batch.decoded_index).to(device)] = batch.decoded[v].to(device).float()
            out[v] = full
    return out


def view_groups(specs: tuple) -> list[tuple[list[int], object]]:
    """Views made together: those of one size and filter (their blur kernel is the same)."""
    groups = {}
    for v, spec in enumerate(specs):
        groups.setdefault((spec.size, spec.interpolation), []).append(v)
    return [(index, specs[index[0]]) for index in groups.values()]


def resample(images: list[torch.Tensor], rows: torch.Tensor, spec) -> torch.Tensor:
    """[E, G, 3, S, S]: the boxes `rows` [E, G, NUM_PARAMS] of `images` ([3, H, W] float each) resampled as PIL's
    resize(box=...) does it, flipped where drawn; rounded to 8 bits after each pass, as PIL's passes are.
    The weights of the E images are computed together (padded to the largest image), the products per image."""
    heights = torch.tensor([img.shape[1] for img in images], device=rows.device).view(-1, 1)
    widths = torch.tensor([img.shape[2] for img in images], device=rows.device).view(-1, 1)
    x, y, w, h = (rows[..., c] for c in (P.X, P.Y, P.W, P.H))  # [E, G]
    weights_y = filter_weights(y, y + h, heights, int(heights.max()), spec.size, spec.interpolation)  # [E,G,S,Hmax]
    weights_x = filter_weights(x, x + w, widths, int(widths.max()), spec.size, spec.interpolation)  # [E,G,S,Wmax]
    weights_x = torch.where((rows[..., P.FLIP] > 0)[..., None, None], weights_x.flip(-2), weights_x)
    out = []
    for e, img in enumerate(images):
        height, width = img.shape[1:]
        tall = round_8bit(torch.matmul(weights_y[e, :, None, :, :height], img))  # [G, 3, S, W]
        out.append(round_8bit(torch.matmul(tall, weights_x[e, :, None, :, :width].transpose(-1, -2))))
    return torch.stack(out)  # [E, G, 3, S, S]


def round_8bit(x: torch.Tensor) -> torch.Tensor:
    """What PIL stores after a resampling pass (rounded, clipped)."""
    return torch.floor(x + 0.5).clamp_(0, 255)


def filter_weights(start, end, in_size, padded: int, out_size: int, interpolation: str) -> torch.Tensor:
    """[..., out_size, padded] resampling weights of PIL's `precompute_coeffs` (Resample.c) for source intervals
    [start, end) (any shape [...]) of images `in_size` pixels long: antialiased (the filter widens with the scale),
    the window clipped to the image, rows normalised; zero past `in_size`."""
    scale = ((end - start) / out_size).unsqueeze(-1)  # [..., 1]
    filter_scale = torch.clamp(scale, min=1.0)
    support = FILTER_SUPPORT[interpolation] * filter_scale
    out = torch.arange(out_size, dtype=torch.float64, device=scale.device)
    center = (start.unsqueeze(-1) + (out + 0.5) * scale).unsqueeze(-1)  # [..., S, 1]
    lo = torch.clamp(torch.trunc(center - support.unsqueeze(-1) + 0.5), min=0)
    hi = torch.minimum(torch.trunc(center + support.unsqueeze(-1) + 0.5), in_size.unsqueeze(-1).unsqueeze(-1))
    i = torch.arange(padded, dtype=torch.float64, device=scale.device)
    t = ((i - center + 0.5) / filter_scale.unsqueeze(-1)).abs()  # [..., S, padded]
    if interpolation == "bicubic":  # PIL's a = -0.5
        weights = torch.where(t < 1, (1.5 * t - 2.5) * t * t + 1,
                              torch.where(t < 2, ((-0.5 * t + 2.5) * t - 4) * t + 2, torch.zeros_like(t)))
    else:
        weights = torch.clamp(1 - t, min=0)
    weights = weights * ((i >= lo) & (i < hi))
    total = weights.sum(dim=-1, keepdim=True)
    return (weights / torch.where(total == 0, torch.ones_like(total), total)).float()
