"""View presets from the papers, and `views_from_recipe`: a recipe's `views` value → list of ViewSpec.

A recipe names a preset (`views: dino`), a preset with options (`{preset: dino, global_size: 32, local_size: 16,
num_local: 4}`: 32-px CIFAR needs no code change), or an explicit list of view mappings (ViewSpec fields).
"""
import inspect
import typing

from ssl_vit.errors import SslVitError
from ssl_vit.transforms.views import ViewSpec, check_scale, check_size, coerce

DINO_JITTER = {"color_jitter": 0.8, "jitter_strength": (0.4, 0.4, 0.2, 0.1), "grayscale": 0.2, "flip": 0.5}


def mae_views(size: int = 224) -> list[ViewSpec]:
    """MAE (He et al., 2022, App. A.1): one RandomResizedCrop (0.2, 1) + flip, bicubic."""
    check_size(size, "views.size")
    return [ViewSpec(size, scale=(0.2, 1.0), flip=0.5, interpolation="bicubic")]


def dino_views(global_size: int = 224, local_size: int = 96, num_local: int = 10,
               global_scale: tuple[float, float] = (0.4, 1.0),
               local_scale: tuple[float, float] = (0.05, 0.4), blur: bool = True) -> list[ViewSpec]:
    """DINO multi-crop (Caron et al., 2021, Sec. 3.1; official `DataAugmentationDINO`): two global views (marked
    `global_view`), the first always blurred, the second blurred with p 0.1 and solarized with p 0.2; `num_local`
    local views blurred with p 0.5; all with flip, colour jitter p 0.8 (0.4, 0.4, 0.2, 0.1) and grayscale p 0.2.
    `blur=False` drops the Gaussian blur, as CIFAR-scale recipes do: at 32 px the blur kernel is 3 px wide."""
    check_size(global_size, "views.global_size")
    check_size(local_size, "views.local_size")
    if local_size > global_size:
        raise SslVitError(f"views.local_size: local crops ({local_size} px) must not be larger than the global crops "
                          f"(views.global_size {global_size} px)")
    if num_local < 0:
        raise SslVitError(f"views.num_local: must be >= 0, got {num_local}")
    check_scale(global_scale, "views.global_scale")
    check_scale(local_scale, "views.local_scale")
    def blur_p(p: float) -> float:
        return p if blur else 0.0

    views = [ViewSpec(global_size, scale=global_scale, blur=blur_p(1.0), global_view=True, **DINO_JITTER),
             ViewSpec(global_size, scale=global_scale, blur=blur_p(0.1), solarize=0.2, global_view=True, **DINO_JITTER)]
    if num_local:
        views.append(ViewSpec(local_size, count=num_local, scale=local_scale, blur=blur_p(0.5), **DINO_JITTER))
    return views


def supervised_views(size: int = 224, randaugment: str = "") -> list[ViewSpec]:
    """Supervised ViT training (DeiT, Touvron et al., 2021, Table 9): RandomResizedCrop (0.08, 1) + flip, optional
    RandAugment such as 'rand-m9-mstd0.5-inc1'."""
    check_size(size, "views.size")
    return [ViewSpec.from_dict({"size": size, "scale": (0.08, 1.0), "flip": 0.5, "randaugment": randaugment},
                               where="views")]


def eval_views(size: int = 224, resize: int | None = None) -> list[ViewSpec]:
    """Evaluation: resize the shorter side to `resize` (None: size / 0.875) and centre-crop `size`; no randomness."""
    check_size(size, "views.size")
    if resize is not None and resize < size:
        raise SslVitError(f"views.resize: must be >= views.size {size}, got {resize}")
    return [ViewSpec(size, crop="center", resize=resize or 0, flip=0.0)]


PRESETS = {"mae": mae_views, "dino": dino_views, "supervised": supervised_views, "eval": eval_views}


def _preset(name, options: dict) -> list[ViewSpec]:
    if name not in PRESETS:
        raise SslVitError(f"views.preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    fn = PRESETS[name]
    hints = typing.get_type_hints(fn)
    known = [p for p in inspect.signature(fn).parameters]
    kwargs = {}
    for key, value in options.items():
        if key not in known:
            raise SslVitError(f"unknown view key 'views.{key}' for preset {name!r} (known: preset, {', '.join(known)})")
        kwargs[key] = coerce(value, hints[key], f"views.{key}")
    return fn(**kwargs)


def views_from_recipe(value) -> list[ViewSpec]:
    """A recipe's `views`: a preset name, {preset: name, **options}, or a list of view mappings (or ViewSpecs)."""
    if isinstance(value, str):
        return _preset(value, {})
    if isinstance(value, dict):
        if "preset" not in value:
            raise SslVitError(f"views: a mapping needs 'preset' (one of {', '.join(PRESETS)}); for explicit views "
                              f"give a list of view mappings; got keys {sorted(value)}")
        return _preset(value["preset"], {k: v for k, v in value.items() if k != "preset"})
    if isinstance(value, (list, tuple)) and value:
        return [v if isinstance(v, ViewSpec) else ViewSpec.from_dict(v, where=f"views[{i}]")
                for i, v in enumerate(value)]
    raise SslVitError(f"views: expected a preset name ({', '.join(PRESETS)}), {{preset: name, ...}} or a non-empty "
                      f"list of view mappings, got {value!r}")


def global_view_count(specs: list[ViewSpec]) -> int:
    """How many views are global (`global_view`, counted with `count`): the first ones, all of one size."""
    flags = [spec.global_view for spec in specs]
    first = flags.index(False) if False in flags else len(flags)
    if any(flags[first:]):
        raise SslVitError(f"views[{flags.index(True, first)}]: a global view (global_view: true) must come before "
                          f"every local view")
    sizes = sorted({spec.size for spec in specs[:first]})
    if len(sizes) > 1:
        raise SslVitError(f"views: the global views (global_view: true) must share one size, got {sizes}")
    return sum(spec.count for spec in specs[:first])
