"""The CPU path: one image → uint8 views, decoding no more pixels than the views need.

The boxes are drawn from the image header (`params.draw_params`), then the JPEG is decoded once at the largest DCT
scale (1/2, 1/4, 1/8: PIL's `draft`, libjpeg-turbo's scaled IDCT) that still leaves every box at least as many pixels
as its view has (at full size through torchvision's decoder: PIL's pixels, ~40 % faster), and each box is resampled
straight from that image (PIL `resize(box=...)`: crop and resize in one pass, no crop copy). The ops after the crop
are the PIL calls torchvision makes on PIL images (ImageEnhance for brightness, contrast and saturation, an HSV shift
for hue, "L" for grayscale) without torchvision's per-call dispatch, then the blur and solarize of `color` on the
stack of an image's views. Views stay uint8 [3, S, S]; normalisation happens once per batch
(`normalize.normalize_views`). The device path runs the same arithmetic as tensor ops (`color.augment`); here PIL's C
loops are 2-3× faster than torch's CPU kernels on one image's views.

Decoding at 1/2 where every box keeps ≥ 2× its view's side makes those views 0.6-2.3 % less sharp (mean horizontal
gradient, scikit-image photographs, boxes 2-3× the view) than resampling the full decode; at ~500×375 px it rarely
applies (a 224-px view needs a ≥ 448-px box). Making DINO's local crops from a further-reduced copy (Image.reduce)
would save ~6 % of DINO's time but loses 3-4 % sharpness, so it is not done.

An evaluation view (`crop="center"`) is decoded at full size and made exactly as torchvision's Resize + CenterCrop
make it, so features match those computed before this path existed.
"""
import contextlib
import warnings

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageEnhance
from torchvision.io import ImageReadMode, decode_jpeg

from ssl_vit.data.samples import SAMPLE_INFO, BadSample
from ssl_vit.transforms import params as P
from ssl_vit.transforms.color import SOLARIZE_THRESHOLD, gaussian_blur

PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
END_OF_IMAGE = b"\xff\xd9"


def decode_for_views(image: Image.Image, specs: list, rows: list[np.ndarray]) -> tuple[Image.Image, int]:
    """(the decoded RGB image, its DCT scale s): pixel (i, j) of it covers source pixels [s·i, s·i + s).
    An image that does not decode raises BadSample naming its sample."""
    scale = 1
    if all(spec.crop != "center" for spec in specs):
        boxes = np.concatenate(rows)[:, [P.X, P.Y, P.W, P.H]]
        sizes = np.concatenate([[spec.size] * len(r) for spec, r in zip(specs, rows)])
        wanted, full_width = P.draft_scale(boxes, sizes), image.width
        drafted = image.draft("RGB", (image.width // wanted, image.height // wanted)) if wanted > 1 else None
        if drafted is not None:  # a JPEG not decoded yet
            scale = round(full_width / drafted[1][2])
    try:
        data = complete_jpeg(image) if scale == 1 else None
        if data is not None:
            return decode_full(data), 1
        image.load()
        return (image if image.mode == "RGB" else image.convert("RGB")), scale
    except Exception as e:  # PIL and torchvision raise many types for corrupt data
        raise BadSample(f"corrupt image in {image.info.get(SAMPLE_INFO, 'an image')}: {e}") from None


def complete_jpeg(image: Image.Image) -> bytes | None:
    """The bytes of a lazily opened JPEG that ends with its end-of-image marker; None otherwise (not a JPEG, already
    decoded, or truncated: PIL's decoder then decides between pixels and an error, as it always did)."""
    if image.format != "JPEG" or not getattr(image, "tile", None) or getattr(image, "fp", None) is None:
        return None
    data = image.fp.getvalue()  # open_image opens over an in-memory buffer, which PIL keeps until it decodes
    return data if data.rstrip(b"\0").endswith(END_OF_IMAGE) else None


def decode_full(data: bytes) -> Image.Image:
    """A full-size JPEG decode through torchvision's libjpeg-turbo: the same pixels as PIL's (checked on every test
    photograph), in ~60 % of the time (PIL feeds its decoder from Python in chunks)."""
    with quiet_torchvision_io():
        pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())  # [H, W, 3]


@contextlib.contextmanager
def quiet_torchvision_io():
    """torchvision 0.29 deprecates its image decoders (for TorchCodec) with a warning per call; they remain the
    libjpeg-turbo and nvJPEG bindings this package uses."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io")
        yield


def make_views(image: Image.Image, scale: int, spec, rows: np.ndarray, randaugment=None) -> list[torch.Tensor]:
    """The uint8 views [3, S, S] of `spec` from `image` (decoded at DCT scale 1/`scale`), one per row of choices;
    blur and solarize run once on the stack of those views."""
    crops = np.stack([np.asarray(pil_view(image, scale, spec, row, randaugment)) for row in rows])
    views = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()  # [n, 3, S, S]
    blurred = np.flatnonzero(rows[:, P.BLUR])
    if len(blurred):
        sigma = torch.from_numpy(rows[blurred, P.SIGMA])
        views[blurred] = gaussian_blur(views[blurred].float(), sigma, spec.blur_kernel).round_().clamp_(0, 255).to(
            torch.uint8)
    solarized = np.flatnonzero(rows[:, P.SOLARIZE])
    if len(solarized):
        chosen = views[solarized]
        views[solarized] = torch.where(chosen >= SOLARIZE_THRESHOLD, 255 - chosen, chosen)
    return list(views)


def pil_view(image: Image.Image, scale: int, spec, row: np.ndarray, randaugment=None) -> Image.Image:
    """The box resampled to the view size (or the evaluation resize + centre crop), flipped, RandAugment-ed,
    colour-jittered and grayscaled, as PIL images."""
    if spec.crop == "center":
        interpolation = TF.InterpolationMode(spec.interpolation)
        view = TF.center_crop(TF.resize(image, [spec.resize_to], interpolation=interpolation), [spec.size])
    else:
        x, y, w, h = row[[P.X, P.Y, P.W, P.H]] / scale
        view = image.resize((spec.size, spec.size), PIL_FILTERS[spec.interpolation], box=(x, y, x + w, y + h))
    if row[P.FLIP]:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    if randaugment is not None:
        view = randaugment(view)
    if row[P.JITTER]:
        view = color_jitter(view, row)
    if row[P.GRAY]:
        view = view.convert("L").convert("RGB")
    return view


def color_jitter(view: Image.Image, row: np.ndarray) -> Image.Image:
    """torchvision's ColorJitter on a PIL image, with the drawn order and factors."""
    for op in row[P.ORDER:P.ORDER + 4].astype(int):
        factor = float(row[P.BRIGHTNESS + op])
        if op == 0:
            view = Image.blend(Image.new("RGB", view.size), view, factor)  # ImageEnhance.Brightness
        elif op == 1:
            view = ImageEnhance.Contrast(view).enhance(factor)
        elif op == 2:
            view = Image.blend(view.convert("L").convert("RGB"), view, factor)  # ImageEnhance.Color
        else:
            view = shift_hue(view, factor)
    return view


def shift_hue(view: Image.Image, factor: float) -> Image.Image:
    """torchvision's `adjust_hue` for PIL images: rotate the 8-bit HSV hue by `factor` of a turn."""
    hsv = np.array(view.convert("HSV"))
    hsv[..., 0] += np.int32(factor * 255).astype(np.uint8)  # wraps around, as it should
    return Image.fromarray(hsv, "HSV").convert("RGB")
