"""The CPU path: one image → uint8 views, decoding no more pixels than the views need.

The boxes are drawn from the image header (`params.draw_params`), then the JPEG is decoded once: at full size by
torchvision's libjpeg-turbo binding (PIL's pixels, straight into a tensor), or at the largest DCT scale (1/2, 1/4,
1/8: PIL's `draft`, libjpeg-turbo's scaled IDCT) that still leaves every box at least as many pixels as its view has.
Each box is resampled to its view by torch's antialiased uint8 kernels (a port of PIL's resampling: the same weights,
±1 grey level, about twice as fast as PIL's `resize`). The pixel ops after the crop run on the view's [S, S, 3]
uint8 array with OpenCV, reproducing what torchvision's ops on PIL images compute (PIL's 8-bit arithmetic, see
`color`): brightness and contrast as lookup tables of PIL's blend (the same levels), saturation as a blend with
OpenCV's luma (one level apart from PIL's for ~0.1 % of values), grayscale as that luma, the hue shift in OpenCV's
8-bit HSV (PIL's conversion costs ~10× more; the two differ by 0.3 grey levels on average), the Gaussian blur as
OpenCV's separable filter (torchvision's kernel, truncated at `color.TRUNCATE_SIGMAS`, reflect padding) and solarize
as a lookup table: 2.3-2.5× faster than PIL's calls, which also convert every view to PIL's layout and back. Views
stay uint8 [3, S, S]; normalisation happens once per batch (`normalize.normalize_views`). The device path runs the
same arithmetic as tensor ops (`color.augment`).

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
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from ssl_vit.errors import SAMPLE_INFO, BadSample
from ssl_vit.transforms import params as P
from ssl_vit.transforms.color import SOLARIZE_THRESHOLD, blur_radius

cv2.setNumThreads(1)  # one image at a time per loader process: OpenCV's own pool would only oversubscribe the cores

RESIZE_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact"}  # nearest-exact: PIL's
END_OF_IMAGE = b"\xff\xd9"
TRUNCATING_OFFSET = -0.5 + 1 / 1024


def decode_for_views(image: Image.Image, specs: list, rows: list[np.ndarray]) -> tuple[torch.Tensor, int]:
    """(the decoded image, uint8 [3, H, W], its DCT scale s): pixel (i, j) of it covers source pixels [s·i, s·i + s).
    An image that does not decode raises BadSample naming its sample."""
    scale, wanted, full_width = 1, views_draft_scale(image.size, specs, rows), image.width
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


def views_draft_scale(size: tuple[int, int], specs: list, rows: list[np.ndarray]) -> int:
    """The DCT scale 1/s a JPEG of `size` (width, height) is decoded at for the views `rows` of `specs`: the largest
    that leaves every box as many pixels as its view (1: a full decode)."""
    # A box is never larger than the image: one shorter than twice the largest view leaves nothing to draft.
    if any(spec.crop == "center" for spec in specs) or min(size) < 2 * max(spec.size for spec in specs):
        return 1
    boxes = np.concatenate(rows)[:, [P.X, P.Y, P.W, P.H]]
    sizes = np.concatenate([[spec.size] * len(r) for spec, r in zip(specs, rows)])
    return P.draft_scale(boxes, sizes)


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
    size (or the evaluation resize + centre crop), flipped, RandAugment-ed, then the pixel ops (`pixel_ops`)."""
    if spec.crop == "center":
        view = pil_to_view(center_view(Image.fromarray(pixels.permute(1, 2, 0).numpy()), spec))
    else:
        view = resample_box(pixels, row[[P.X, P.Y, P.W, P.H]] / scale, spec)
    if row[P.FLIP]:
        view = view.flip(-1)
    if randaugment is not None:
        view = pil_to_view(randaugment(Image.fromarray(view.permute(1, 2, 0).numpy())))
    if row[P.JITTER] or row[P.GRAY] or row[P.BLUR] or row[P.SOLARIZE]:
        pixels = pixel_ops(np.ascontiguousarray(view.permute(1, 2, 0).numpy()), row, spec.blur_kernel)
        view = torch.from_numpy(pixels).permute(2, 0, 1)
    return view


def pixel_ops(view: np.ndarray, row: np.ndarray, kernel_size: int) -> np.ndarray:
    """A view [S, S, 3] uint8 colour-jittered in the drawn order, grayscaled, blurred and solarized as `row` says."""
    if row[P.JITTER]:
        for op in row[P.ORDER:P.ORDER + 4].astype(int):
            view = JITTER_OPS[op](view, float(row[P.BRIGHTNESS + op]))
    if row[P.GRAY]:
        view = cv2.cvtColor(luma(view), cv2.COLOR_GRAY2RGB)
    if row[P.BLUR]:
        view = gaussian_blur(view, row[P.SIGMA], kernel_size)
    if row[P.SOLARIZE]:
        view = cv2.LUT(view, SOLARIZED)
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


def luma(view: np.ndarray) -> np.ndarray:
    """[S, S] 8-bit luma: OpenCV's ITU-R 601-2 in 14-bit fixed point, PIL's "L" but for 0.13 % of all colours (one
    grey level apart, both ways)."""
    return cv2.cvtColor(view, cv2.COLOR_RGB2GRAY)


def blend_table(base: int, factor: float) -> np.ndarray:
    """PIL's ImageBlend of a constant `base` with every level: base + factor · (level − base) in float32, clipped and
    truncated to 8 bits (the truncation is what makes PIL's jitter ~0.5 grey level darker than float arithmetic)."""
    levels = np.arange(256, dtype=np.float32)
    return np.clip(np.float32(base) + np.float32(factor) * (levels - np.float32(base)), 0, 255).astype(np.uint8)


def brightness(view: np.ndarray, factor: float) -> np.ndarray:
    """ImageEnhance.Brightness: a blend with black (as a lookup table: PIL's numbers exactly)."""
    return cv2.LUT(view, blend_table(0, factor))


def contrast(view: np.ndarray, factor: float) -> np.ndarray:
    """ImageEnhance.Contrast: a blend with the mean luma rounded to an integer (a lookup table)."""
    return cv2.LUT(view, blend_table(int(cv2.mean(luma(view))[0] + 0.5), factor))


def saturation(view: np.ndarray, factor: float) -> np.ndarray:
    """ImageEnhance.Color: a blend with the luma image. OpenCV rounds where PIL truncates; the offset of −0.5 (and a
    hair, so that whole numbers stay whole) truncates: PIL's levels but for ~0.1 % of the values, one apart."""
    gray = cv2.cvtColor(luma(view), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(view, factor, gray, 1 - factor, TRUNCATING_OFFSET)


def shift_hue(view: np.ndarray, factor: float) -> np.ndarray:
    """torchvision's `adjust_hue` for PIL images: rotate the 8-bit HSV hue by `factor` of a turn (wrapping)."""
    hsv = cv2.cvtColor(view, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.int32(factor * 255).astype(np.uint8)  # wraps around, as it should
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def gaussian_blur(view: np.ndarray, sigma: float, kernel_size: int) -> np.ndarray:
    """A view [S, S, 3] blurred with torchvision's Gaussian kernel of `kernel_size` taps, truncated
    (`color.blur_radius`)."""
    radius = blur_radius(sigma, kernel_size)
    if radius == 0:
        return view
    taps = 2 * radius + 1
    return cv2.GaussianBlur(view, (taps, taps), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


JITTER_OPS = (brightness, contrast, saturation, shift_hue)  # the order of params' ORDER indices
SOLARIZED = np.where(np.arange(256) >= SOLARIZE_THRESHOLD, 255 - np.arange(256), np.arange(256)).astype(np.uint8)
