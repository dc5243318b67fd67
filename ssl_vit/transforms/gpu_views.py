"""The device path: workers read bytes and draw the views' choices; a batch of JPEGs is decoded and augmented on the
device (`torchvision.io.decode_jpeg(..., device="cuda")`: nvJPEG), with the choices of `params.draw_params`.

Per batch, in the main process (`device_views`): decode all JPEGs in one call; resample each box to its view size
with PIL's filter weights (antialiased bicubic/bilinear, the box's support clipped to the image, as PIL's
`resize(box=...)` does on the CPU path) as two batched matrix products per chunk of images, the flip folded into the
column weights; then colour jitter in the drawn order, grayscale, Gaussian blur and solarize (`color.augment`, PIL's
8-bit arithmetic) on the whole batch of views; then normalisation. The same numbers make the same views as the CPU
path up to differences between JPEG decoders — tests compare both paths on CPU tensors. Every function runs on any
torch device, so the CPU tests exercise the code the GPU runs.

Per-sample fallback to the CPU path, inside the worker: an image that is not a JPEG (PNG, ...), or a JPEG whose data
does not end with its end-of-image marker (truncated: a full decode then decides between views and a counted skip).
A JPEG the device decoder refuses in the main process is decoded with PIL there, and augmented with the others.
"""
import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg

from ssl_vit.config import DECODE_MODES
from ssl_vit.errors import SslVitError
from ssl_vit.transforms import params as P
from ssl_vit.transforms.color import augment, needs_augment
from ssl_vit.transforms.cpu_views import complete_jpeg, quiet_torchvision_io
from ssl_vit.transforms.normalize import normalize, normalize_views

FILTER_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}
CHUNK = 32  # images resampled together, padded to the largest of them


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
    data = complete_jpeg(image)
    return None if data is None else EncodedViews(np.frombuffer(data, np.uint8), np.concatenate(rows))


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
    if not encoded:  # default_collate stacks straight into shared memory inside a DataLoader worker
        return [default_collate(v) for v in zip(*items)]
    decoded = [i for i, item in enumerate(items) if not isinstance(item, EncodedViews)]
    data = [items[i].data for i in encoded]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in data])])
    views = [default_collate(v) for v in zip(*(items[i] for i in decoded))]
    return EncodedBatch(len(items), torch.from_numpy(np.concatenate(data)), offsets,
                        np.stack([items[i].params for i in encoded]), np.asarray(encoded), views,
                        np.asarray(decoded, dtype=np.int64), tuple(s for s in specs for _ in range(s.count)))


# -- on the device --------------------------------------------------------------------------------------------------
def views_to_device(views, device: torch.device) -> list[torch.Tensor]:
    """A batch's views on `device`, normalised: stacked uint8 views are moved and normalised, an EncodedBatch is
    decoded and augmented there."""
    if isinstance(views, EncodedBatch):
        return [normalize(v) for v in device_views(views, device)]
    return normalize_views(views, device)


def decode_jpegs(batch: EncodedBatch, device: torch.device) -> list[torch.Tensor]:
    """uint8 [3, H, W] images on `device`: one decode call for the batch, one per image if that call fails."""
    chunks = [batch.data[a:b] for a, b in zip(batch.offsets[:-1], batch.offsets[1:])]
    with quiet_torchvision_io():
        try:
            return decode_jpeg(chunks, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            images = []
            for chunk in chunks:
                try:
                    images.append(decode_jpeg(chunk, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    images.append(decode_with_pil(chunk, device))
            return images


def decode_with_pil(chunk: torch.Tensor, device: torch.device) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(chunk.numpy().tobytes())) as img:
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).to(device)  # [3, H, W]
    except Exception as e:  # PIL raises many types for corrupt data
        raise SslVitError(f"a JPEG in this batch decodes neither on {device} nor with PIL ({e}); "
                          "set data.decode: cpu to skip such samples") from None


def device_views(batch: EncodedBatch, device: torch.device) -> list[torch.Tensor]:
    """V float views [B, 3, S, S] in 0..255 on `device` (normalise them once, after). Images are resampled in chunks
    of CHUNK of similar size (sorted by area), each chunk padded to its largest image: one pair of batched matrix
    products per chunk and view size, and padding memory bounded by the chunk."""
    images = decode_jpegs(batch, device)  # uint8 [3, H, W] each
    params = torch.from_numpy(batch.params).to(device)  # [E, V, NUM_PARAMS] float64
    groups = view_groups(batch.specs)
    made = [torch.empty(len(images), len(index), 3, spec.size, spec.size, device=device) for index, spec in groups]
    order = sorted(range(len(images)), key=lambda e: images[e].shape[1] * images[e].shape[2])
    for start in range(0, len(order), CHUNK):
        chosen = order[start:start + CHUNK]
        padded, heights, widths = pad([images[e] for e in chosen], device)
        rows = params[chosen]
        for (index, spec), out in zip(groups, made):
            out[chosen] = resample(padded, heights, widths, rows[:, index], spec)
    views = [None] * len(batch.specs)
    encoded = torch.from_numpy(batch.encoded).to(device)
    for (index, spec), out in zip(groups, made):
        if needs_augment(spec):
            rows = params[:, index].flatten(0, 1)  # [E·G, NUM_PARAMS]
            out = augment(out.flatten(0, 1), rows, spec.blur_kernel).unflatten(0, (len(images), len(index)))
        for k, v in enumerate(index):
            full = torch.empty(batch.size, 3, spec.size, spec.size, device=device)
            full[encoded] = out[:, k]
            if len(batch.decoded_index):
                full[torch.from_numpy(batch.decoded_index).to(device)] = batch.decoded[v].to(device).float()
            views[v] = full
    return views


def pad(images: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float [n, 3, Hmax, Wmax] zero-padded, heights [n], widths [n])."""
    heights = torch.tensor([img.shape[1] for img in images], device=device)
    widths = torch.tensor([img.shape[2] for img in images], device=device)
    padded = torch.zeros(len(images), 3, int(heights.max()), int(widths.max()), device=device)
    for i, img in enumerate(images):
        padded[i, :, :img.shape[1], :img.shape[2]] = img
    return padded, heights, widths


def view_groups(specs: tuple) -> list[tuple[list[int], object]]:
    """Views made together: those of one size and filter (their blur kernel is the same)."""
    groups = {}
    for v, spec in enumerate(specs):
        groups.setdefault((spec.size, spec.interpolation), []).append(v)
    return [(index, specs[index[0]]) for index in groups.values()]


def resample(padded: torch.Tensor, heights, widths, rows: torch.Tensor, spec) -> torch.Tensor:
    """[n, G, 3, S, S]: the boxes `rows` [n, G, NUM_PARAMS] of the images `padded` [n, 3, Hmax, Wmax] (each
    `heights` × `widths`) resampled as PIL's resize(box=...) does it, flipped where drawn; rounded to 8 bits after
    each pass, as PIL's passes are. The weights are zero past each image, so the padding never contributes."""
    x, y, w, h = (rows[..., c] for c in (P.X, P.Y, P.W, P.H))  # [n, G]
    (n, groups), size, (height, width) = rows.shape[:2], spec.size, padded.shape[2:]
    weights_y = filter_weights(y, y + h, heights[:, None], height, size, spec.interpolation)  # [n, G, S, Hmax]
    weights_x = filter_weights(x, x + w, widths[:, None], width, size, spec.interpolation)  # [n, G, S, Wmax]
    weights_x = torch.where((rows[..., P.FLIP] > 0)[..., None, None], weights_x.flip(-2), weights_x)
    columns = padded.permute(0, 2, 1, 3).reshape(n, height, 3 * width)  # [n, Hmax, 3·Wmax]
    tall = round_8bit(torch.bmm(weights_y.reshape(n, groups * size, height), columns))  # [n, G·S, 3·Wmax]
    tall = tall.view(n * groups, size, 3, width).transpose(1, 2).reshape(n * groups, 3 * size, width)
    out = round_8bit(torch.bmm(tall, weights_x.reshape(n * groups, size, width).transpose(1, 2)))  # [n·G, 3·S, S]
    return out.view(n, groups, 3, size, size)


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
