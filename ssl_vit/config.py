"""Recipes: typed dataclass defaults; a YAML recipe is a short diff on them.

`load_recipe(path, overrides)` rejects unknown keys, wrong types and impossible values with a one-line
SslVitError naming the key (`optim.base_lr: expected a number, got 'fast'`). Nesting is at most two levels.
"""
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ssl_vit.errors import SslVitError
from ssl_vit.method_settings import DINOConfig, MAEConfig, MethodSettings, SupervisedConfig, _check

DECODE_MODES = ("cpu", "gpu", "auto")


@dataclass
class DataConfig:
    train: Any = ""                  # shards: index.json, brace pattern, glob, pipe: URL, or a list of them
    batch_size: int = 64             # global batch: processes × per-process batch × accumulation steps
    num_workers: int = 2             # DataLoader workers per process
    shuffle_buffer: int = 1000       # samples each reader shuffles at a time (its memory: this many raw samples)
    samples_per_epoch: int = 0       # 0: from the shards' index; set it for shards without one (epoch-based keys)
    max_skip_fraction: float = 0.01  # stop once more than this fraction of samples is unreadable
    decode: str = "auto"             # cpu | gpu (nvJPEG) | auto: cpu until a GPU run shows gpu faster (README)
    num_classes: int = 0             # 0: the number of classes in the shards' index.json
    eval: Any = ""                   # fine-tuning: shards the trained classifier is scored on after training
    eval_resize: int = 0             # shorter side before the centre crop at evaluation (0: img_size / 0.875)
    monitor: Any = ""                # small labelled shards scored by k-NN every train.monitor_every steps


@dataclass
class ModelConfig:
    name: str = "vit_small_patch16_224"  # a timm ViT, hybrid ViT (vit_*_r26_*, ...) or Swin (swin_*) name
    img_size: int = 224
    patch_size: int = 16
    drop_path_rate: float = 0.0
    depth: int = 0                   # 0 keeps the timm model's own value
    embed_dim: int = 0
    num_heads: int = 0
    init: str = ""                   # fine-tuning: start from this backbone (anything ssl_vit.loading takes)
    kwargs: dict = field(default_factory=dict)  # more timm arguments, e.g. Swin's {depths, num_heads, window_size}


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4          # lr = base_lr × global_batch / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    weight_decay_end: float = -1.0   # < 0: constant weight decay; else cosine weight_decay → weight_decay_end
    betas: tuple = (0.9, 0.95)
    warmup_epochs: float = 0.0
    clip_grad: float = 0.0           # 0: no clipping
    accum_steps: int = 1
    layer_decay: float = 1.0         # fine-tuning: layer-wise lr decay


@dataclass
class TrainConfig:
    epochs: float = 0.0              # an epoch = the samples listed in the shards' index.json
    steps: int = 0                   # alternative to epochs (optimizer steps)
    out_dir: str = "runs/default"
    checkpoint_every: int = 0        # steps; 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    mixed_precision: str = "auto"    # auto: bf16 on GPU, no on CPU; or no / bf16 / fp16
    resume: str = ""                 # "", "auto" (latest checkpoint in out_dir) or a checkpoint folder
    progress: bool = True
    on_nonfinite: str = "stop"       # stop | skip (roll back this batch's update and count it)
    audit_keys: bool = False         # write the sample keys each process trained on to <out_dir>/audit/
    log_with: list = field(default_factory=lambda: ["tensorboard"])  # accelerate trackers: wandb, mlflow, ...
    threads: int = 0                 # intra-op threads per process; 0: cores left after data.num_workers
    monitor_every: int = 0           # steps between k-NN scores of the backbone on data.monitor; 0: never
    monitor_samples: int = 10000     # at most this many data.monitor images, class-balanced (eval/monitor.py)
    keep_best: bool = False          # export the monitored step with the best data.monitor k-NN (ties: the earlier;
                                     # the last step is scored too), not the last one; holds one CPU copy of the
                                     # backbone, carried in checkpoints. A choice on data.monitor: never the test set


@dataclass
class Recipe:
    method: str = "mae"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    views: Any = ""                  # a preset name, {preset: name, ...options}, a list of view specs; "": the method's
    mae: MAEConfig = field(default_factory=MAEConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


METHODS = tuple(f.name for f in dataclasses.fields(Recipe)
                if isinstance(f.default_factory, type) and issubclass(f.default_factory, MethodSettings))


def method_settings(r: Recipe) -> MethodSettings:
    """The recipe's section for its own method (`recipe.<method>`)."""
    return getattr(r, r.method)


_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_YAML11_TRUE = ("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON")
_YAML11_FALSE = ("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF")


class YamlWord(str):
    """A plain (unquoted) scalar that YAML 1.1 reads as a boolean although it is a word: yes/no/on/off in PyYAML's
    spellings. `train.mixed_precision: no` means the string "no", `train.progress: no` means false: the field's type
    decides, not the parser (`_coerce`). A string field takes the word as written; a boolean field its truth value;
    any other field (Any, lists, mappings) the boolean YAML 1.1 gives it, as before."""

    @property
    def truth(self) -> bool:
        return self in _YAML11_TRUE


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with booleans narrowed to true/false (YAML 1.2's); the other YAML 1.1 words stay
    `YamlWord`s. Quoted scalars are strings as always."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_RecipeLoader.add_implicit_resolver("!yaml11-word", re.compile(r"^(?:yes|Yes|YES|no|No|NO|on|On|ON|off|Off|OFF)$"),
                                    list("yYnNoO"))
_RecipeLoader.add_constructor("!yaml11-word", lambda loader, node: YamlWord(loader.construct_scalar(node)))


def read_yaml(text: str):
    """YAML text as recipe values (see `YamlWord`)."""
    return yaml.load(text, Loader=_RecipeLoader)


def _yaml11_bools(value):
    """`value` with every `YamlWord` in it (nested lists and mappings too) the boolean YAML 1.1 makes of it."""
    if isinstance(value, YamlWord):
        return value.truth
    if isinstance(value, dict):  # a key is a name: `no:` is the key "no"
        return {str(k) if isinstance(k, YamlWord) else k: _yaml11_bools(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_yaml11_bools(v) for v in value)
    return value


def _coerce(value, typ, where: str):
    """Check (and gently convert) a YAML value against a dataclass field type."""
    if typ is Any:
        return _yaml11_bools(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value in _YAML11_TRUE + _YAML11_FALSE:
            return value in _YAML11_TRUE  # YAML 1.1's words, also from a (key, "value") pair
        raise SslVitError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SslVitError(f"{where}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads '3e-4' (no dot) as a string
        raise SslVitError(f"{where}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return str(value)  # a YamlWord as the plain word it is
        raise SslVitError(f"{where}: expected a string, got {value!r}")
    if typ is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            return tuple(float(v) for v in value)
        raise SslVitError(f"{where}: expected a list of numbers, got {value!r}")
    if typ is list:
        if isinstance(value, (list, tuple)):
            return list(_yaml11_bools(value))
        raise SslVitError(f"{where}: expected a list, got {value!r}")
    if typ is dict:
        if isinstance(value, dict):
            return _yaml11_bools(value)
        raise SslVitError(f"{where}: expected a mapping, got {value!r}")
    raise SslVitError(f"{where}: unsupported type {typ}")


def _apply(obj, values: dict, where: str) -> None:
    if not isinstance(values, dict):
        raise SslVitError(f"{where or 'recipe'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    known = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            raise SslVitError(f"unknown recipe key '{path}' (known: {', '.join(sorted(known))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, path)
        elif isinstance(current, dict) and isinstance(value, dict):  # e.g. `views.num_local=2` on a preset dict
            setattr(obj, key, {**current, **_yaml11_bools(value)})
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` text (the command line's) → (dotted key, the value read as YAML)."""
    if "=" not in text:
        raise SslVitError(f"override {text!r} is not key=value (e.g. optim.base_lr=1e-3)")
    key, raw = text.split("=", 1)
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_override(obj, override) -> None:
    """Set one override on the dataclass `obj` (checked like a recipe's keys): `key=value` text, or a
    `(dotted key, value)` pair whose value is set as it is (no text in between)."""
    key, value = parse_override(override) if isinstance(override, str) else override
    for part in reversed(key.split(".")):
        value = {part: value}
    _apply(obj, value, "")


def apply_file(obj, path) -> None:
    """The YAML mapping in the file `path` applied to the dataclass `obj`; errors name the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise SslVitError(f"recipe not found: {path}")
    try:
        values = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise SslVitError(f"{path}:{line} is not valid YAML: {getattr(e, 'problem', e)}") from None
    try:
        _apply(obj, values, "")
    except SslVitError as e:
        raise SslVitError(f"{path}: {e}") from None


def load_recipe(path=None, overrides: list | None = None, for_run: bool = True) -> Recipe:
    """The recipe at `path` (None: the defaults), then `overrides` in order (see `apply_override`). With
    `for_run=False` it is read for its settings: the keys only a run needs (train.steps or train.epochs, data.monitor)
    may still be missing, for a caller that sets them per run."""
    recipe = Recipe()
    if path is not None:
        apply_file(recipe, path)
    for override in overrides or []:
        apply_override(recipe, override)
    if recipe.method in METHODS:
        recipe.views = views_following_img_size(recipe.views or method_settings(recipe).views,
                                                recipe.model.img_size, recipe.model.patch_size)
    validate(recipe, for_run)
    return recipe


def local_crop_size(img_size: int, patch_size: int) -> int:
    """DINO's local crops in the paper's proportion to the global ones (96/224), rounded up to whole patches."""
    return max(1, math.ceil(img_size * 96 / 224 / patch_size)) * patch_size


def views_following_img_size(views, img_size: int, patch_size: int):
    """A preset's view sizes that the recipe leaves out, from `model.img_size` (one knob for a new resolution):
    MAE's, the supervised and the evaluation crop and DINO's global crops are img_size, DINO's local crops
    `local_crop_size`. Sizes a recipe sets, and explicit lists of views, stay as they are."""
    preset = {"preset": views} if isinstance(views, str) else views
    if not isinstance(preset, dict):
        return views
    sizes = {"dino": {"global_size": img_size, "local_size": local_crop_size(img_size, patch_size)}}.get(
        preset.get("preset"), {"size": img_size})
    return {**sizes, **preset}


def validate(r: Recipe, for_run: bool = True) -> None:
    """Impossible values, each named by its key. (Views are validated where they are built, with their index.)"""
    _check(r.method in METHODS, "method", f"must be one of {', '.join(METHODS)}, got {r.method!r}")
    for section in METHODS:  # every section's ranges; the backbone-dependent checks for the recipe's method only
        getattr(r, section).check(r.model if section == r.method else None)
    _check(r.data.batch_size > 0, "data.batch_size", f"must be positive, got {r.data.batch_size}")
    _check(r.data.num_workers >= 0, "data.num_workers", "must be ≥ 0")
    _check(r.data.shuffle_buffer >= 1, "data.shuffle_buffer", f"must be ≥ 1 sample, got {r.data.shuffle_buffer}")
    _check(r.data.samples_per_epoch >= 0, "data.samples_per_epoch", "must be ≥ 0")
    _check(0.0 <= r.data.max_skip_fraction <= 1.0, "data.max_skip_fraction", "must be in [0, 1]")
    _check(r.data.decode in DECODE_MODES, "data.decode", f"must be one of {', '.join(DECODE_MODES)}, "
           f"got {r.data.decode!r}")
    _check(r.train.threads >= 0, "train.threads", "must be ≥ 0 (0: the cores left after the loader's workers)")
    _check(r.train.monitor_every >= 0, "train.monitor_every", "must be ≥ 0 (0: no monitoring)")
    _check(r.train.monitor_samples >= 4, "train.monitor_samples", f"must be ≥ 4, got {r.train.monitor_samples}")
    _check(not (for_run and r.train.monitor_every) or bool(r.data.monitor), "data.monitor",
           "train.monitor_every needs a small labelled shard set to score (data.monitor=INDEX.json)")
    _check(not r.train.keep_best or r.train.monitor_every > 0, "train.keep_best",
           "chooses among the monitored steps: set train.monitor_every (and data.monitor, a validation set)")
    _check(r.optim.accum_steps >= 1, "optim.accum_steps", "must be ≥ 1")
    _check(r.data.batch_size % r.optim.accum_steps == 0, "data.batch_size",
           f"{r.data.batch_size} is not divisible by optim.accum_steps={r.optim.accum_steps}")
    _check(r.optim.base_lr > 0, "optim.base_lr", "must be positive")
    _check(len(r.optim.betas) == 2 and all(0 <= b < 1 for b in r.optim.betas), "optim.betas",
           "must be two numbers in [0, 1)")
    _check(0 < r.optim.layer_decay <= 1, "optim.layer_decay", "must be in (0, 1]")
    _check(not for_run or (r.train.epochs > 0) != (r.train.steps > 0), "train.steps",
           "set exactly one of train.epochs and train.steps (> 0)")
    _check(r.train.mixed_precision in ("auto", "no", "bf16", "fp16"), "train.mixed_precision",
           "must be auto, no, bf16 or fp16")
    _check(r.train.on_nonfinite in ("stop", "skip"), "train.on_nonfinite", "must be stop or skip")
    _check(r.model.img_size % r.model.patch_size == 0, "model.patch_size",
           f"{r.model.patch_size} does not divide model.img_size={r.model.img_size}")
    fine_tuners = ", ".join(m for m in METHODS if getattr(r, m).fine_tunes)
    _check(not r.model.init or method_settings(r).fine_tunes, "model.init",
           f"only the {fine_tuners} method fine-tunes a pretrained backbone (method is {r.method!r})")
    _check(r.optim.layer_decay == 1.0 or method_settings(r).fine_tunes, "optim.layer_decay",
           f"layer-wise lr decay is for fine-tuning (method {fine_tuners}), not {r.method!r}")
    _check(not r.supervised.distill.teacher or method_settings(r) is r.supervised, "supervised.distill.teacher",
           f"distillation trains a supervised student (method: supervised), not {r.method!r}")


def epoch_settings(r: Recipe) -> dict[str, float]:
    """The recipe keys counted in epochs that are set (> 0) for this recipe's method."""
    keys = {"train.epochs": r.train.epochs, "optim.warmup_epochs": r.optim.warmup_epochs}
    settings = method_settings(r)
    keys.update({f"{settings.section}.{key}": getattr(settings, key) for key in settings.epoch_keys})
    return {k: v for k, v in keys.items() if v > 0}


def check_world(r: Recipe, num_processes: int) -> int:
    """The per-process micro-batch size; an error naming data.batch_size when it does not divide."""
    per_step = r.data.batch_size // r.optim.accum_steps
    _check(per_step % num_processes == 0, "data.batch_size",
           f"{r.data.batch_size} (÷ accum_steps {r.optim.accum_steps}) is not divisible by {num_processes} processes")
    return per_step // num_processes
