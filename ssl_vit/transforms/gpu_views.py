"""The device path: workers read bytes and draw the views' choices; a batch of JPEGs is decoded and augmented on the
device (`torchvision.io.decode_jpeg(..., device="cuda")`: nvJPEG), with the choices of `params.draw_params`.

In the worker (`encode_for_device`), per sample: a JPEG that nvJPEG decodes (`jpeg_header.device_decodable`, read
from the header) travels as its bytes; one above MAX_DEVICE_PIXELS is decoded on the CPU at the largest DCT scale its
boxes allow and travels as those pixels; anything else — not a JPEG (PNG, ...), truncated (no end-of-image marker),
CMYK/YCCK, 12-bit, arithmetic-coded — has its views made on the CPU there, as the CPU path makes them (an unreadable
image is then a BadSample the stream counts and skips). Batches count both kinds (`cpu_decoded`, `cpu_reduced`).

Per batch, in the main process (`device_views`): the images are decoded and resampled in chunks (`device_resample`:
planned from the header sizes, each within a memory budget), the resampled views kept as uint8; then each view spec's
colour jitter, grayscale, blur and solarize (`color.augment`, PIL's 8-bit arithmetic) run on that spec's views in
slices. An image neither nvJPEG nor PIL decodes is dropped from the batch and reported (`DeviceViews.unreadable`):
the loader counts it as a skipped sample, within `data.max_skip_fraction`, as the CPU path does. The same numbers
make the same views as the CPU path up to differences between JPEG decoders; every function runs on any torch device,
so tests run the code the GPU runs on CPU tensors.
"""
import io
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg

from ssl_vit.config import DECODE_MODES
from ssl_vit.errors import SAMPLE_INFO, BadSample, plain
from ssl_vit.errors import SslVitError
from ssl_vit.transforms import params as P
from ssl_vit.transforms.color import augment, needs_augment
from ssl_vit.transforms.cpu_views import complete_jpeg, decode_for_views, quiet_torchvision_io, views_draft_scale
from ssl_vit.transforms.device_resample import (AUGMENT_PIXELS, FILTER_SUPPORT, MAX_DEVICE_PIXELS, pad, plan_chunks,
                                               plan_sizes, resample, view_groups)
from ssl_vit.transforms.jpeg_header import device_decodable
from ssl_vit.transforms.normalize import normalize, normalize_views

# Device types `data.decode: gpu` runs on. Tests add "cpu" to run the device path's own code on CPU tensors through
# the trainer; users get it on CUDA only.
DEVICE_PATH_TYPES = ("cuda",)


def gpu_supported(spec) -> bool:
    """Random-resized crops with bicubic or bilinear resampling and no RandAugment (a PIL-only op)."""
    return spec.crop == "rrc" and not spec.randaugment and spec.interpolation in FILTER_SUPPORT


def resolve_decode(mode: str, device: torch.device, specs: list) -> str:
    """`data.decode` → "cpu" or "gpu". `auto` is "cpu" on every device: no GPU measurement in bench/results/ shows
    the device path faster yet (README, "Views at ImageNet size"); `gpu` must be asked for."""
    if mode not in DECODE_MODES:
        raise SslVitError(f"data.decode: must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    if mode == "gpu":
        if device.type not in DEVICE_PATH_TYPES:
            raise SslVitError(f"data.decode: gpu needs a CUDA device, this process runs on {device.type}")
        if not all(gpu_supported(s) for s in specs):
            raise SslVitError("data.decode: gpu makes random-resized crops (bicubic or bilinear) without "
                              "RandAugment; these views need data.decode: cpu")
        return "gpu"
    return "cpu"


# -- in the worker --------------------------------------------------------------------------------------------------
@dataclass
class EncodedViews:
    """One sample for the device path: its JPEG bytes (`scale` 1), or the uint8 pixels [H·W·3] of the image decoded
    on the CPU at 1/`scale`; `height` × `width` on the device; its views' choices [V, NUM_PARAMS] in source pixels."""
    data: np.ndarray
    params: np.ndarray
    height: int
    width: int
    scale: int
    name: str


class WorkerViews(list):
    """The uint8 views [3, S, S] of a device-path sample made on the CPU in the worker, and why: "unsupported" (no
    JPEG nvJPEG takes) or "reduced" (above MAX_DEVICE_PIXELS even at the smallest DCT scale its boxes allow)."""

    def __init__(self, views, reason: str):
        super().__init__(views)
        self.reason = reason


def encode_for_device(image: Image.Image, specs: list, rows: list[np.ndarray], make_views) -> "EncodedViews | list":
    """What the worker hands on for a lazily opened image with its views' choices `rows` (see the module docstring).
    `make_views(pixels, scale)` makes its views on the CPU; an unreadable image raises BadSample."""
    data, params = complete_jpeg(image), np.concatenate(rows)
    name = image.info.get(SAMPLE_INFO, "an image")
    if data is None or not device_decodable(data):
        return WorkerViews(make_views(*decode_for_views(image, specs, rows)), "unsupported")
    placed = device_image_size(image.size, specs, rows)
    if placed is not None and placed[2] == 1:
        return EncodedViews(np.frombuffer(data, np.uint8), params, *placed, name)
    pixels, scale = decode_for_views(image, specs, rows)  # [3, H, W] at the largest DCT scale the boxes allow
    if placed is None or (*pixels.shape[1:], scale) != placed:
        return WorkerViews(make_views(pixels, scale), "reduced")
    return EncodedViews(pixels.permute(1, 2, 0).numpy().reshape(-1), params, *placed, name)


def device_image_size(size: tuple[int, int], specs: list, rows: list[np.ndarray]) -> tuple[int, int, int] | None:
    """(height, width, DCT scale) of a device-decodable JPEG of `size` (width, height) on the device: as it is up to
    MAX_DEVICE_PIXELS, else decoded in the worker at the scale the CPU path would use for these views (`rows`);
    None where even that leaves it above MAX_DEVICE_PIXELS (the worker then makes its views)."""
    width, height = size
    if width * height <= MAX_DEVICE_PIXELS:
        return height, width, 1
    scale = views_draft_scale(size, specs, rows)
    height, width = -(-height // scale), -(-width // scale)  # libjpeg's scaled sizes round up
    return (height, width, scale) if scale > 1 and height * width <= MAX_DEVICE_PIXELS else None


@dataclass
class EncodedBatch:
    """A batch on its way to the device: the images' bytes or pixels end to end (one tensor: each tensor that leaves a
    worker costs a shared-memory handshake), their sizes, scales and choices, and the views the worker made."""
    size: int
    data: torch.Tensor          # uint8 [total bytes]
    offsets: np.ndarray         # [E + 1]
    sizes: np.ndarray           # [E, 2] height, width on the device
    scales: np.ndarray          # [E] 1: JPEG bytes; s > 1: pixels decoded at 1/s
    params: np.ndarray          # [E, V, NUM_PARAMS]
    encoded: np.ndarray         # [E] positions in the batch
    names: list                 # [E] "sample KEY of URL"
    decoded: list               # V tensors [F, 3, S, S] uint8 (empty where F = 0)
    decoded_index: np.ndarray   # [F]
    specs: tuple                # per view
    counts: dict = field(default_factory=dict)  # {"cpu_decoded": ..., "cpu_reduced": ...} samples


def collate_views(items: list, specs: list | None = None):
    """Per-sample transform outputs → what a batch carries: V stacked uint8 tensors [B, 3, S, S], or an
    EncodedBatch where the transform made them for the device path (then `specs` are the transform's specs)."""
    if not any(isinstance(item, (EncodedViews, WorkerViews)) for item in items):
        return [default_collate(v) for v in zip(*items)]  # stacks straight into shared memory inside a worker
    encoded = [i for i, item in enumerate(items) if isinstance(item, EncodedViews)]
    decoded = [i for i, item in enumerate(items) if not isinstance(item, EncodedViews)]
    flat = tuple(s for s in specs for _ in range(s.count))
    data = [items[i].data for i in encoded]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in data])]).astype(np.int64)
    views = [default_collate(v) for v in zip(*(items[i] for i in decoded))]
    reasons = [getattr(items[i], "reason", "") for i in decoded]
    reduced = sum(items[i].scale > 1 for i in encoded) + reasons.count("reduced")
    return EncodedBatch(
        len(items), torch.from_numpy(np.concatenate(data) if data else np.zeros(0, np.uint8)), offsets,
        np.array([(items[i].height, items[i].width) for i in encoded], dtype=np.int64).reshape(-1, 2),
        np.array([items[i].scale for i in encoded], dtype=np.int64),
        np.stack([items[i].params for i in encoded]) if encoded else np.zeros((0, len(flat), P.NUM_PARAMS)),
        np.asarray(encoded, dtype=np.int64), [items[i].name for i in encoded], views,
        np.asarray(decoded, dtype=np.int64), flat,
        {"cpu_decoded": reasons.count("unsupported"), "cpu_reduced": reduced})


# -- on the device --------------------------------------------------------------------------------------------------
@dataclass
class DeviceViews:
    """A batch's views on the device: V tensors [B', 3, S, S] for the B' samples kept, the batch positions dropped
    with why (images neither nvJPEG nor PIL decodes: counted skips), and how its samples were decoded."""
    views: list
    unreadable: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)


def views_to_device(views, device: torch.device) -> DeviceViews:
    """A batch's views on `device`, normalised: stacked uint8 views are moved and normalised, an EncodedBatch is
    decoded and augmented there."""
    if not isinstance(views, EncodedBatch):
        return DeviceViews(normalize_views(views, device))
    made = device_views(views, device)
    made.views = [normalize(v) for v in made.views]
    return made


def device_views(batch: EncodedBatch, device: torch.device) -> DeviceViews:
    """uint8 views [B', 3, S, S] on `device` of the samples that decode (see the module docstring)."""
    made, unreadable, by_pil = resampled_views(batch, device)
    augment_per_spec(made, torch.from_numpy(batch.params).to(device), batch.specs)
    failed = sorted(int(batch.encoded[e]) for e in unreadable)
    keep = torch.from_numpy(np.setdiff1d(np.arange(batch.size), failed)).to(device) if failed else None
    encoded = torch.from_numpy(batch.encoded).to(device)
    decoded_index = torch.from_numpy(batch.decoded_index).to(device)
    views = []
    for v, spec in enumerate(batch.specs):
        full = torch.empty(batch.size, 3, spec.size, spec.size, dtype=torch.uint8, device=device)
        full[encoded] = made[v]
        if len(decoded_index):
            full[decoded_index] = batch.decoded[v].to(device)
        views.append(full if keep is None else full[keep])
    counts = {"cpu_decoded_samples": batch.counts.get("cpu_decoded", 0) + by_pil,
              "cpu_reduced_samples": batch.counts.get("cpu_reduced", 0)}
    return DeviceViews(views, {int(batch.encoded[e]): message for e, message in unreadable.items()}, counts)


def resampled_views(batch: EncodedBatch, device: torch.device) -> tuple[list, dict, int]:
    """(V uint8 tensors [E, 3, S, S] of the encoded samples' resampled views, {sample: why} for those that did not
    decode, how many PIL decoded), a chunk of images at a time (`device_resample.plan_chunks`)."""
    heights, widths = plan_sizes(batch.sizes)
    plan = plan_chunks(heights, widths, batch.specs, batch.size)
    params = torch.tensor(batch.params, device=device)  # [E, V, NUM_PARAMS] float64, a copy
    scales = torch.from_numpy(batch.scales).to(device, torch.float64).view(-1, 1)
    params[..., [P.X, P.Y, P.W, P.H]] /= scales.unsqueeze(-1)  # boxes in the pixels the device holds
    made = [torch.zeros(len(heights), 3, s.size, s.size, dtype=torch.uint8, device=device) for s in batch.specs]
    unreadable, by_pil = {}, 0
    for chunk in plan.chunks:
        images, failed, pil = decode_chunk(batch, chunk, device)
        unreadable.update(failed)
        by_pil += pil
        kept = [e for e in chunk if e in images]
        if not kept:
            continue
        padded, chunk_heights, chunk_widths = pad([images.pop(e) for e in kept], device)
        rows = params[kept]
        for index, spec in view_groups(batch.specs):
            out = resample(padded, chunk_heights, chunk_widths, rows[:, index], spec)  # [n, G, 3, S, S] uint8
            for k, v in enumerate(index):
                made[v][kept] = out[:, k]
        del padded
    return made, unreadable, by_pil


def decode_chunk(batch: EncodedBatch, chunk: list[int], device) -> tuple[dict, dict, int]:
    """({e: uint8 [3, H, W] on `device`}, {e: why} for images that decode neither on the device nor with PIL, how many
    PIL decoded): the chunk's JPEGs in one decode call (one per image if that call fails), its pixels uploaded."""
    images, failed, by_pil = {}, {}, 0
    jpegs = [e for e in chunk if batch.scales[e] == 1]
    for e in chunk:
        if batch.scales[e] > 1:
            height, width = (int(n) for n in batch.sizes[e])
            pixels = batch.data[batch.offsets[e]:batch.offsets[e + 1]].view(height, width, 3)
            images[e] = pixels.to(device).permute(2, 0, 1)
    data = [batch.data[batch.offsets[e]:batch.offsets[e + 1]] for e in jpegs]
    with quiet_torchvision_io():
        try:
            images.update(zip(jpegs, decode_jpeg(data, mode=ImageReadMode.RGB, device=device) if data else []))
            return images, failed, by_pil
        except RuntimeError:
            pass
        for e, chunk_data in zip(jpegs, data):
            try:
                images[e] = decode_jpeg(chunk_data, mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                try:
                    images[e] = decode_with_pil(chunk_data, device)
                    by_pil += 1
                except BadSample as e_bad:
                    failed[e] = f"corrupt image in {batch.names[e]}: {e_bad}"
    return images, failed, by_pil


def decode_with_pil(chunk: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [3, H, W] on `device` from PIL's decoder; BadSample (the reason) where it fails too."""
    try:
        with Image.open(io.BytesIO(chunk.numpy().tobytes())) as img:
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).to(device)  # [3, H, W]
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadSample(f"neither the device's JPEG decoder nor PIL decodes it ({plain(e)})") from None


def spec_views(specs: tuple) -> list[tuple[list[int], object]]:
    """The flat view indices of each view spec, in order: each spec is augmented with its own switches."""
    groups = []
    for v, spec in enumerate(specs):
        if v and spec is specs[v - 1]:
            groups[-1][0].append(v)
        else:
            groups.append(([v], spec))
    return groups


def augment_per_spec(made: list[torch.Tensor], params: torch.Tensor, specs: tuple) -> None:
    """Colour jitter, grayscale, blur and solarize, in place on the uint8 views `made` [E, 3, S, S], with each
    spec's drawn choices `params` [E, V, NUM_PARAMS], in slices of at most AUGMENT_PIXELS view pixels."""
    for index, spec in spec_views(specs):
        if not needs_augment(spec):
            continue
        step = max(1, AUGMENT_PIXELS // (spec.size * spec.size))
        for v in index:
            for start in range(0, len(made[v]), step):
                views = made[v][start:start + step]
                views.copy_(augment(views.float(), params[start:start + step, v], spec.blur_kernel))
