"""One kind of augmented view (`ViewSpec`) and the multi-view transform that draws and makes them.

Every random choice comes from torch's CPU generator (drawn in `params.draw_params` before decoding, then applied by
`cpu_views` or `gpu_views`), so a reader that seeds torch per sample (restoring its state afterwards) gets the same
views on every run and after a resume. timm's RandAugment is the exception — it draws from Python's `random` and
NumPy — so `TorchSeededRandAugment` reseeds both from torch for each call and restores them afterwards.
"""
import dataclasses
import random
import re
import types
import typing
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import str_to_pil_interp

from ssl_vit.config import _coerce as coerce_recipe_value
from ssl_vit.errors import SslVitError
from ssl_vit.transforms.cpu_views import RESIZE_MODES, decode_for_views, make_view
from ssl_vit.transforms.gpu_views import encode_for_device
from ssl_vit.transforms.normalize import MEAN
from ssl_vit.transforms.params import draw_params

CROPS = ("rrc", "center")
PROBABILITIES = ("flip", "color_jitter", "grayscale", "blur", "solarize")
EVAL_CROP_RATIO = 0.875
# timm's config string: rand, then dash-separated sections m<int> n<int> p<float> mstd<float> mmax<int> inc<0|1> t<name>
RANDAUGMENT_RE = re.compile(r"rand(-(m\d+|n\d+|p\d*\.?\d+|mstd\d*\.?\d+|mmax\d+|inc[01]|t[a-z0-9]+))*")


@dataclass(frozen=True)
class ViewSpec:
    """How to draw one kind of view; `count` views of it per image.

    Crops follow the papers' recipes: MAE (He et al., 2022, Sec. 4 and App. A.1) uses RandomResizedCrop with scale
    (0.2, 1) and a flip; DINO (Caron et al., 2021, Sec. 3.1 "multi-crop" and App. "data augmentation") adds colour
    jitter (p 0.8, strengths 0.4/0.4/0.2/0.1), grayscale (p 0.2), Gaussian blur and solarization per view, from BYOL
    (Grill et al., 2020, App. B, Table 6). `crop="center"` is the evaluation transform: resize the shorter side to
    `resize` (0: size / 0.875) and centre-crop `size`. `global_view` marks DINO's global views, the ones its teacher
    sees too; they come first (sizes cannot tell them apart: a local crop may be as large as a global one).
    """
    size: int
    count: int = 1
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    color_jitter: float = 0.0
    jitter_strength: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    grayscale: float = 0.0
    blur: float = 0.0
    solarize: float = 0.0
    randaugment: str = ""
    crop: str = "rrc"
    resize: int = 0
    interpolation: str = "bicubic"
    global_view: bool = False

    def __post_init__(self):
        values = checked_view_values({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "ViewSpec")
        for name, value in values.items():
            object.__setattr__(self, name, value)  # lists from YAML become tuples, ints become floats

    @classmethod
    def from_dict(cls, d, where: str = "views[0]") -> "ViewSpec":
        """A spec from a recipe mapping; unknown keys, wrong types and bad values fail naming `where.key`."""
        if not isinstance(d, dict):
            raise SslVitError(f"{where}: expected a mapping of view keys (size, count, scale, ...), got {d!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in known:
                raise SslVitError(f"unknown view key '{where}.{key}' (known: {', '.join(known)})")
        if "size" not in d:
            raise SslVitError(f"{where}.size: missing (the output side length in pixels)")
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        return cls(**checked_view_values({**defaults, **d}, where))

    @property
    def resize_to(self) -> int:
        """The shorter side before a centre crop."""
        return self.resize or round(self.size / EVAL_CROP_RATIO)

    @property
    def blur_kernel(self) -> int:
        """About 10 % of the view side, odd, at least 3 (23 px at 224, as in BYOL/SimCLR)."""
        return max(3, int(self.size * 0.1) | 1)


def coerce(value, typ, where: str):
    """`value` checked against a type hint: the recipe schema's scalar and list checks, plus fixed-length
    `tuple[float, ...]` and `X | None` (preset options)."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return None if value is None else coerce(value, args[0], where)
    if typing.get_origin(typ) is tuple:
        n = len(typing.get_args(typ))
        numbers = coerce_recipe_value(value, tuple, where)
        if len(numbers) != n:
            raise SslVitError(f"{where}: expected a list of {n} numbers, got {value!r}")
        return numbers
    return coerce_recipe_value(value, typ, where)


def check_scale(scale: tuple[float, float], where: str) -> None:
    if not 0 < scale[0] <= scale[1] <= 1:
        raise SslVitError(f"{where}: need 0 < min <= max <= 1 (fractions of the image area), got {list(scale)}")


def check_size(size: int, where: str) -> None:
    if size <= 0:
        raise SslVitError(f"{where}: must be > 0 pixels, got {size}")


def checked_view_values(values: dict, where: str) -> dict:
    """Type-checked and range-checked ViewSpec field values; the first problem raises naming `where.field`."""
    hints = typing.get_type_hints(ViewSpec)
    v = {name: coerce(value, hints[name], f"{where}.{name}") for name, value in values.items()}
    check_size(v["size"], f"{where}.size")
    if v["count"] < 1:
        raise SslVitError(f"{where}.count: must be >= 1, got {v['count']}")
    check_scale(v["scale"], f"{where}.scale")
    if not 0 < v["ratio"][0] <= v["ratio"][1]:
        raise SslVitError(f"{where}.ratio: need 0 < min <= max (aspect ratios), got {list(v['ratio'])}")
    for name in PROBABILITIES:
        if not 0 <= v[name] <= 1:
            raise SslVitError(f"{where}.{name}: a probability must be in [0, 1], got {v[name]}")
    b, c, s, h = v["jitter_strength"]
    if min(b, c, s) < 0 or not 0 <= h <= 0.5:
        raise SslVitError(f"{where}.jitter_strength: need brightness, contrast, saturation >= 0 and hue in "
                          f"[0, 0.5], got {list(v['jitter_strength'])}")
    if v["crop"] not in CROPS:
        raise SslVitError(f"{where}.crop: must be one of {', '.join(CROPS)}, got {v['crop']!r}")
    if v["resize"] < 0 or (v["crop"] == "center" and 0 < v["resize"] < v["size"]):
        raise SslVitError(f"{where}.resize: must be 0 (size / {EVAL_CROP_RATIO}) or >= size {v['size']}, "
                          f"got {v['resize']}")
    if v["interpolation"] not in RESIZE_MODES:
        raise SslVitError(f"{where}.interpolation: must be one of {', '.join(RESIZE_MODES)}, "
                          f"got {v['interpolation']!r}")
    if v["blur"] > 0 and v["size"] < 2:
        raise SslVitError(f"{where}.blur: a blurred view needs size >= 2, got size {v['size']}")
    if v["randaugment"] and not RANDAUGMENT_RE.fullmatch(v["randaugment"]):
        raise SslVitError(f"{where}.randaugment: {v['randaugment']!r} is not a timm RandAugment string like "
                          "'rand-m9-mstd0.5' (sections m n p mstd mmax inc t), or '' for off")
    return v


class TorchSeededRandAugment:
    """timm's RandAugment (Cubuk et al., 2020, Sec. 3) with its Python/NumPy randomness drawn from torch's RNG."""

    def __init__(self, config: str, size: int, mean, interpolation: str):
        hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(min(255, round(255 * m)) for m in mean),
                   "interpolation": str_to_pil_interp(interpolation)}
        self.config, self.op = config, rand_augment_transform(config, hparams)

    def __call__(self, img: Image.Image) -> Image.Image:
        seed = int(torch.randint(0, 2 ** 31 - 1, ()))
        python_state, numpy_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.op(img)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def __repr__(self):
        return f"TorchSeededRandAugment({self.config!r})"


class MultiViewTransform:
    """Views of one image as uint8 [3, S, S] tensors, in spec order, each spec repeated `count` times (DINO's
    multi-crop, Caron et al., 2021, Sec. 3.1: 2 global views then the local ones).

    The image may be lazily opened (`ssl_vit.data.samples.open_image`: header read, pixels not decoded): the views'
    choices are drawn first, then the JPEG is decoded at the smallest scale they allow (see cpu_views). With
    `decode="gpu"` a lazily opened JPEG that nvJPEG decodes is not decoded here at all: the result is its bytes (or,
    above a pixel limit, its pixels at a reduced scale) with the drawn choices (`gpu_views.EncodedViews`), decoded and
    augmented a batch at a time on the device; other images get their views here (`gpu_views.encode_for_device`). An
    unreadable image raises BadSample naming the sample.
    """

    def __init__(self, specs: list[ViewSpec], decode: str = "cpu"):
        if not specs:
            raise SslVitError("views: need at least one view spec")
        if decode not in ("cpu", "gpu"):
            raise SslVitError(f"view transform decode must be cpu or gpu (resolve auto first), got {decode!r}")
        self.specs, self.decode = list(specs), decode
        self.randaugments = [TorchSeededRandAugment(s.randaugment, s.size, MEAN, s.interpolation) if s.randaugment
                             else None for s in self.specs]
        self.sizes = [s.size for s in self.specs for _ in range(s.count)]

    @property
    def num_views(self) -> int:
        return len(self.sizes)

    def __call__(self, image: Image.Image):
        if not isinstance(image, Image.Image):
            raise SslVitError(f"view transform: expected a PIL image, got {type(image).__name__}")
        rows = [draw_params(spec, spec.count, *image.size) for spec in self.specs]
        if self.decode == "gpu":
            return encode_for_device(image, self.specs, rows, lambda pixels, scale: self._views(pixels, scale, rows))
        return self._views(*decode_for_views(image, self.specs, rows), rows)

    def _views(self, pixels: torch.Tensor, scale: int, rows: list[np.ndarray]) -> list[torch.Tensor]:
        return [make_view(pixels, scale, spec, row, ra)
                for spec, r, ra in zip(self.specs, rows, self.randaugments) for row in r]
