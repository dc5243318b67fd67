"""The comparison recipe (`recipes/compare_<data>.yaml`): which data, which methods, what budget, which evaluations."""
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ssl_vit.config import Recipe, _check, apply_file, apply_override, load_recipe, method_settings, parse_override
from ssl_vit.errors import SslVitError
from ssl_vit.eval.label_subsets import check_fractions
from ssl_vit.eval.linear_probe import DEFAULT_LRS


TRAINING_KEYS = {f.name for f in dataclasses.fields(Recipe)}  # model, views, optim, train, ...


@dataclass
class SourceConfig:
    train: str = "data/cifar10_subset/train.tar.gz"   # image source (ImageFolder tree/tar, CSV/JSONL) or index.json
    test: str = "data/cifar10_subset/test.tar.gz"
    unlabeled: str = ""                               # extra images without labels for MAE/DINO only ("": none)
    val: str = ""                                     # labelled images every choice is made on ("": carved
                                                      # from train, see val_fraction); never the test set
    val_fraction: float = 0.1                         # share of each class of train held out as the validation
                                                      # split when no `val` is given (0: no validation split)
    monitor: str = ""                                 # labelled images scored by k-NN during pretraining when the
                                                      # recipes set train.monitor_every ("": the validation split,
                                                      # else the test set): curves, and the checkpoint a recipe
                                                      # with train.keep_best exports (never on the test set)
    shard_max_count: int = 500                        # samples per shard when shards are written


@dataclass
class BudgetConfig:
    images: int = 60000                               # images seen by every pretraining run (the fair budget)
    batch_size: int = 128
    mode: str = "images"                              # images: every method sees `images`; flops: every method
                                                      # trains until it has spent the same training compute
    gflops: float = 0.0                               # flops mode: that compute per run in GFLOPs (0: `images` at
                                                      # the cost per image of `reference`)
    reference: str = ""                               # flops mode: the method whose cost per image prices `images`
                                                      # ("": the labelled baseline, else the first method)


@dataclass
class EvalConfig:
    label_fractions: list = field(default_factory=lambda: [0.01, 0.1, 1.0])  # labelled share of the train set
    label_seed: int = 0                               # which samples are labelled (the same for every model)
    label_draws: int = 3                              # independent labelled draws at each fraction < 1 (draw d
                                                      # uses seed label_seed + d; each nested across fractions)
    seeds: int = 1                                    # pretraining seeds per method (`--thorough`: 3)
    knn_k: list = field(default_factory=lambda: [10, 20, 100, 200])  # those larger than a fraction's bank are dropped
    knn_temperature: float = 0.07
    linear_probe: bool = True
    probe_epochs: int = 100
    probe_lrs: list = field(default_factory=lambda: list(DEFAULT_LRS))
    raw_pixels: bool = True                           # a raw-pixel k-NN row: the floor any backbone should beat
    batch_size: int = 256
    num_workers: int = 1
    crop_pct: float = 0.875                           # centre crop / resized shorter side (1.0: the whole image)
    finetune: bool = False                            # also fine-tune every backbone end to end (slow)
    finetune_recipe: str = "recipes/finetune_vit_tiny_cifar10.yaml"
    finetune_images: int = 20000                      # images seen by each fine-tuning run


@dataclass
class CompareConfig:
    name: str = "cifar10_subset"
    out_dir: str = "runs/compare_cifar10_subset"
    methods: list = field(default_factory=lambda: ["mae", "dino", "supervised"])
    recipes: dict = field(default_factory=dict)        # method → training recipe path
    overrides: list = field(default_factory=list)      # key=value applied to every training recipe
    method_overrides: dict = field(default_factory=dict)  # method → [key=value] for that method's recipe only
    random_init: bool = True                           # add an untrained backbone row
    source: SourceConfig = field(default_factory=SourceConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    backbones: dict = field(default_factory=dict)      # extra rows: name → timm:NAME, local-dir:PATH, an export...
    budgets: dict = field(default_factory=dict)        # named budgets for `--budget NAME`: name → [key=value]


def load_compare_recipe(path, overrides: list[str] | None = None) -> CompareConfig:
    cfg = CompareConfig()
    apply_file(cfg, path)
    try:
        training = []  # `model.img_size=64` on the command line: a key of every training recipe
        for text in overrides or []:
            key, value = parse_override(text)
            if key.split(".")[0] in TRAINING_KEYS:
                training.append(text)
            else:
                apply_override(cfg, (key, value))
        cfg.overrides = [*cfg.overrides, *training]
    except SslVitError as e:
        raise SslVitError(f"{path}: {e}") from None
    for method, extra in cfg.method_overrides.items():
        _check(method in cfg.recipes, f"method_overrides.{method}", f"is not a method of `recipes` {sorted(cfg.recipes)}")
        _check(isinstance(extra, list) and all(isinstance(x, str) for x in extra), f"method_overrides.{method}",
               "expected a list of key=value")
    for method in cfg.methods:
        _check(method in cfg.recipes, "recipes", f"no training recipe for method {method!r}")
        _check(Path(cfg.recipes[method]).is_file(), f"recipes.{method}", f"file not found: {cfg.recipes[method]}")
    _check(cfg.budget.images >= cfg.budget.batch_size, "budget.images", "must be at least one batch")
    check_budget_and_draws(cfg)
    _check(all(isinstance(k, int) and k > 0 for k in cfg.eval.knn_k), "eval.knn_k", "must be positive integers")
    cfg.eval.label_fractions = check_fractions(cfg.eval.label_fractions)
    _check(0 < cfg.eval.crop_pct <= 1, "eval.crop_pct", f"must be in (0, 1], got {cfg.eval.crop_pct}")
    taken = {*cfg.methods, "random_init", "raw_pixels"}
    for name, source in cfg.backbones.items():
        _check(name not in taken, f"backbones.{name}", "is already a row of the comparison: choose another name")
        _check(isinstance(source, str) and source, f"backbones.{name}", "expected a backbone (timm:NAME, "
               "timm-random:NAME, local-dir:PATH, hf-hub:ID, a run folder or an export)")
    for method in cfg.methods:
        training_recipe(cfg, method)  # a bad training key is named now, not after an hour of pretraining
    if cfg.eval.finetune:
        _check(Path(cfg.eval.finetune_recipe).is_file(), "eval.finetune_recipe",
               f"file not found: {cfg.eval.finetune_recipe}")
        _check(cfg.eval.finetune_images >= cfg.budget.batch_size, "eval.finetune_images", "must be at least one batch")
    return cfg


def training_recipe(cfg: CompareConfig, method: str, run: dict | None = None):
    """The training recipe of `method` with the comparison's overrides, then `run` ({dotted key: value}, what one run
    sets); without `run`, read for its settings (the keys only a run needs may be missing)."""
    return load_recipe(cfg.recipes[method], [*cfg.overrides, *cfg.method_overrides.get(method, []),
                                             *(run or {}).items()], for_run=run is not None)


def needs_labels(cfg: CompareConfig, method: str) -> bool:
    """Whether `method`'s recipe trains on labels (the supervised baseline): it then sees only a fraction's labels."""
    return method_settings(training_recipe(cfg, method)).needs_labels


def eval_resize(cfg: CompareConfig, image_size: int) -> int:
    """The shorter side images are resized to before the centre crop of `image_size` (every row, fine-tuning too)."""
    return round(image_size / cfg.eval.crop_pct)


def check_budget_and_draws(cfg: CompareConfig) -> None:
    """The keys of the comparison's error bars, validation split and compute budget."""
    b, e, src = cfg.budget, cfg.eval, cfg.source
    _check(b.mode in ("images", "flops"), "budget.mode", f"must be 'images' or 'flops', got {b.mode!r}")
    _check(isinstance(b.gflops, (int, float)) and b.gflops >= 0, "budget.gflops", "must be a number >= 0")
    _check(not b.reference or b.reference in cfg.methods, "budget.reference",
           f"{b.reference!r} is not one of the methods {cfg.methods}")
    for key, value in (("eval.label_draws", e.label_draws), ("eval.seeds", e.seeds)):
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, key,
               f"must be an integer >= 1, got {value!r}")
    _check(isinstance(src.val_fraction, (int, float)) and 0 <= src.val_fraction < 1, "source.val_fraction",
           f"must be in [0, 1), got {src.val_fraction!r}")


def apply_budget(path, overrides: list[str], name: str) -> list[str]:
    """`--budget NAME`: the key=value list the recipe's `budgets.NAME` holds, before the command line's own."""
    cfg = load_compare_recipe(path, overrides)
    _check(name in cfg.budgets, "budgets", f"no budget named {name!r} in {path} (it has {sorted(cfg.budgets)})")
    extra = cfg.budgets[name]
    _check(isinstance(extra, list) and all(isinstance(x, str) for x in extra), f"budgets.{name}",
           "expected a list of key=value")
    return [*extra, *overrides]


def reference_method(cfg: CompareConfig) -> str:
    """The method whose cost per image prices `budget.images` in flops mode."""
    return cfg.budget.reference or next((m for m in cfg.methods if needs_labels(cfg, m)), cfg.methods[0])
