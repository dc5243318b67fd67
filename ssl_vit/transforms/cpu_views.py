"""The CPU path: one image → uint8 views, decoding no more pixels than the views need.

The boxes are drawn from the image header (`params.draw_params`), then the JPEG is decoded once: at full size by
torchvision's libjpeg-turbo binding (PIL's pixels, straight into a tensor), or at the largest DCT scale (1/2, 1/4,
1/8: PIL's `draft`, libjpeg-turbo's scaled IDCT) that still leaves every box at least as many pixels as its view has.
Each box is resampled to its view by torch's antialiased uint8 kernels (a port of PIL's resampling: the same weights,
±1 grey level, about twice as fast as PIL's `resize`). The colour ops are the PIL calls torchvision makes on PIL
images (ImageEnhance for brightness, contrast and saturation, "L" for grayscale) without torchvision's per-call
dispatch; the hue shift goes through OpenCV's 8-bit HSV (PIL's conversion costs ~10× more; the two differ by 0.3
grey levels on average) and the Gaussian blur through OpenCV's separable filter (torchvision's kernel, truncated at
`color.TRUNCATE_SIGMAS`, reflect padding). Views stay uint8 [3, S, S]; normalisation happens once per batch
(`normalize.normalize_views`). The device path runs the same arithmetic as tensor ops (`color.augment`).

Decoding at 1/2 where every box keeps ≥ 2× its view's side makes those views 0.6-2.3 % less sharp (mean horizontal
gradient, scikit-image photographs, boxes 2-3× the view) than resampling the full decode; at ~500×375 px it rarely
applies (a 224-px view needs a ≥ 448-px box).

An evaluation view (`crop="center"`) is made exactly as torchvision's Resize + CenterCrop make it on a PIL image, so
features match those computed before this path existed.
"""
import contextlib
import warnings

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageEnhance
from torchvision.io import ImageReadMode, decode_jpeg

from ssl_vit.data.samples import SAMPLE_INFO, BadSample
from ssl_vit.transforms import params as P
from ssl_vit.transforms.color import SOLARIZE_THRESHOLD, blur_radius

cv2.setNumThreads(1)  # one image at a time per loader process: OpenCV's own pool would only oversubscribe the cores

RESIZE_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact"}  # nearest-exact: PIL's
END_OF_IMAGE = b"\xff\xd9"


def decode_for_views(image: Image.Image, specs: list, rows: list[np.ndarray]) -> tuple[torch.Tensor, int]:
    """(the decoded image, uint8 [3, H, W], its DCT scale s): pixel (i, j) of it covers source pixels [s·i, s·i + s).
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
        rgb = np.array(image if image.mode == "RGB" else image.convert("RGB"))  # [H, W, 3], writable
        return torch.from_numpy(rgb).permute(2, 0, 1), scale
    except Exception as e:  # PIL and torchvision raise many types for corrupt data
        raise BadSample(f"corrupt image in {image.info.get(SAMPLE_INFO, 'an image')}: {e}") from None


def complete_jpeg(image: Image.Image) -> bytes | None:
    """The bytes of a lazily opened JPEG that ends with its end-of-image marker; None otherwise (not a JPEG, already
    decoded, or truncated: PIL's decoder then decides between pixels and an error, as it always did)."""
    if image.format != "JPEG" or not getattr(image, "tile", None) or getattr(image, "fp", None) is None:
        return None
    data = image.fp.getvalue()  # open_image opens over an in-memory buffer, which PIL keeps until it decodes
    return data if data.rstrip(b"\0").endswith(END_OF_IMAGE) else None


def decode_full(data: bytes) -> torch.Tensor:
    """A full-size JPEG decode through torchvision's libjpeg-turbo: PIL's pixels (checked on every test photograph)
    as uint8 [3, H, W], stored pixel by pixel ([H, W, 3] in memory), 10-20 % faster than PIL's decode."""
    with quiet_torchvision_io():
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


@contextlib.contextmanager
def quiet_torchvision_io():
    """torchvision 0.29 deprecates its image decoders (for TorchCodec) with a warning per call; they remain the
    libjpeg-turbo and nvJPEG bindings this package uses."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io")
        yield


def make_view(pixels: torch.Tensor, scale: int, spec, row: np.ndarray, randaugment=None) -> torch.Tensor:
    """One uint8 view [3, S, S] of `spec` from `pixels` (decoded at DCT scale 1/`scale`) with the choices in `row`,
    stored pixel by pixel ([S, S, 3] in memory: the batch's stacking lays it out): the box resampled to the view
    size (or the evaluation resize + centre crop), flipped, RandAugment-ed, colour-jittered, grayscaled, blurred and
    solarized."""
    if spec.crop == "center":
        view = pil_to_view(center_view(Image.fromarray(pixels.permute(1, 2, 0).numpy()), spec))
    else:
        view = resample_box(pixels, row[[P.X, P.Y, P.W, P.H]] / scale, spec)
    if row[P.FLIP]:
        view = view.flip(-1)
    if randaugment is not None or row[P.JITTER] or row[P.GRAY]:
        image = Image.fromarray(view.permute(1, 2, 0).numpy())
        if randaugment is not None:
            image = randaugment(image)
        if row[P.JITTER]:
            image = color_jitter(image, row)
        if row[P.GRAY]:
            image = image.convert("L").convert("RGB")
        view = pil_to_view(image)
    if row[P.BLUR]:
        view = gaussian_blur(view, row[P.SIGMA], spec.blur_kernel)
    if row[P.SOLARIZE]:
        view = torch.where(view >= SOLARIZE_THRESHOLD, 255 - view, view)
    return view


def pil_to_view(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def center_view(image: Image.Image, spec) -> Image.Image:
    """The evaluation view: torchvision's Resize of the shorter side, then CenterCrop."""
    interpolation = TF.InterpolationMode(spec.interpolation)
    return TF.center_crop(TF.resize(image, [spec.resize_to], interpolation=interpolation), [spec.size])


def resample_box(pixels: torch.Tensor, box: np.ndarray, spec) -> torch.Tensor:
    """The box (x, y, w, h in decoded pixels, rounded to whole ones) resampled to [3, S, S]."""
    height, width = pixels.shape[-2:]
    x0, y0 = min(int(round(box[0])), width - 1), min(int(round(box[1])), height - 1)
    x1 = max(x0 + 1, min(width, int(round(box[0] + box[2]))))
    y1 = max(y0 + 1, min(height, int(round(box[1] + box[3]))))
    crop = pixels[:, y0:y1, x0:x1].unsqueeze(0).contiguous(memory_format=torch.channels_last)  # the fast kernels'
    mode = RESIZE_MODES[spec.interpolation]
    return F.interpolate(crop, size=(spec.size, spec.size), mode=mode, antialias=mode != "nearest-exact")[0]


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
            view = Image.fromarray(shift_hue(np.asarray(view), factor))
    return view


def shift_hue(view: np.ndarray, factor: float) -> np.ndarray:
    """torchvision's `adjust_hue` for PIL images: rotate the 8-bit HSV hue by `factor` of a turn (wrapping)."""
    hsv = cv2.cvtColor(view, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.int32(factor * 255).astype(np.uint8)  # wraps around, as it should
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def gaussian_blur(view: torch.Tensor, sigma: float, kernel_size: int) -> torch.Tensor:
    """A view blurred with torchvision's Gaussian kernel of `kernel_size` taps, truncated (`color.blur_radius`)."""
    radius = blur_radius(sigma, kernel_size)
    if radius == 0:
        return view
    taps = 2 * radius + 1
    blurred = cv2.GaussianBlur(np.ascontiguousarray(view.permute(1, 2, 0).numpy()), (taps, taps), sigmaX=sigma,
                               sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
    return torch.from_numpy(blurred).permute(2, 0, 1)
