"""SSL vs supervised on the same data and budget: shards → pretrain each method → features → k-NN / linear probe →
report. Every stage writes its result into the run folder and is skipped when re-run; a failing stage is named and
what finished is kept.

    ssl-vit compare --recipe recipes/compare_cifar10_subset.yaml
"""
import json
import time
from pathlib import Path

import torch
from torch import nn

from ssl_vit.pipelines.compare_config import CompareConfig
from ssl_vit.atomic_io import write_json_atomic
from ssl_vit.errors import SslVitError


class StageRunner:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.timings: dict[str, float] = {}

    def run(self, name: str, done: Path, fn):
        """Run `fn` unless `done` exists; returns `done`'s JSON when it is a .json file."""
        if done.exists():
            print(f"[skip] {name}: done ({done})", flush=True)
        else:
            print(f"[run ] {name}", flush=True)
            t0 = time.perf_counter()
            try:
                fn()
            except SslVitError as e:
                raise SslVitError(f"stage '{name}' failed: {e} (finished stages are kept in {self.out_dir})") \
                    from None
            except Exception as e:
                raise SslVitError(f"stage '{name}' failed: {type(e).__name__}: {e} (finished stages are kept in "
                                  f"{self.out_dir})") from e
            self.timings[name] = time.perf_counter() - t0
        return json.loads(done.read_text()) if done.suffix == ".json" else None


def shards_for(source: str, out_prefix: Path, max_count: int) -> str:
    """An index.json for `source`: itself when it is one, else shards written once into the run folder."""
    from ssl_vit.data.writer import write_shards

    if source.endswith(".json"):
        return source
    index = Path(f"{out_prefix}-index.json")
    if not index.exists():
        write_shards(source, str(out_prefix), max_count=max_count, seed=0, workers=2, progress=True)
    return str(index)


class RawPixels(nn.Module):
    """A 'backbone' whose CLS feature is the flattened normalised image: the raw-pixel k-NN floor."""

    num_prefix_tokens = 1

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, None, :]  # [B, 1, 3·H·W]


def pretrain(cfg: CompareConfig, method: str, train_index: str, out: Path) -> None:
    from ssl_vit.config import load_recipe
    from ssl_vit.train.trainer import Trainer

    steps = cfg.budget.images // cfg.budget.batch_size
    recipe = load_recipe(cfg.recipes[method], [*cfg.overrides, f"data.train={train_index}", f"train.out_dir={out}",
                                               f"train.steps={steps}", "train.epochs=0", "train.resume=auto",
                                               f"data.batch_size={cfg.budget.batch_size}"])
    Trainer(recipe).fit()


def random_init(cfg: CompareConfig, out: Path) -> None:
    from accelerate.utils import set_seed

    from ssl_vit.config import load_recipe
    from ssl_vit.methods import backbone_spec
    from ssl_vit.models.backbone import create_backbone
    from ssl_vit.models.export import export_backbone

    recipe = load_recipe(cfg.recipes[cfg.methods[0]], [*cfg.overrides, "train.steps=1", "train.epochs=0"])
    set_seed(recipe.seed)
    spec = backbone_spec(recipe)
    out.mkdir(parents=True, exist_ok=True)
    export_backbone(create_backbone(spec), spec, out / "backbone.safetensors", extra_meta={"method": "random_init"})
    write_json_atomic(out / "summary.json", {"method": "random_init", "steps": 0, "images_seen": 0, "train_seconds": 0.0,
                                      "images_per_s": None})


def extract(cfg: CompareConfig, model_dir: Path | None, source: str, out: Path) -> None:
    from ssl_vit.eval.features import extract_features
    from ssl_vit.loading import load_backbone

    e = cfg.eval
    if model_dir is None:
        model, image_size = RawPixels(), raw_image_size(cfg)
    else:
        model, meta = load_backbone(model_dir)
        image_size = int(meta["img_size"])
    extract_features(model, source, out, image_size=image_size, resize=e.resize or None, pooling="cls",
                     batch_size=e.batch_size, num_workers=e.num_workers,
                     meta={"backbone": str(model_dir) if model_dir else "raw_pixels"})


def raw_image_size(cfg: CompareConfig) -> int:
    from ssl_vit.config import load_recipe

    return load_recipe(cfg.recipes[cfg.methods[0]], [*cfg.overrides, "train.steps=1", "train.epochs=0"]).model.img_size


def evaluate(cfg: CompareConfig, feats: Path, out: Path) -> None:
    from ssl_vit.eval.feature_cache import load_features
    from ssl_vit.eval.knn import knn_classify
    from ssl_vit.eval.linear_probe import linear_probe

    train, test = load_features(feats / "train"), load_features(feats / "test")
    result = {"knn": knn_classify(train.features, train.labels, test.features, test.labels, ks=cfg.eval.knn_k,
                                  temperature=cfg.eval.knn_temperature)}
    if cfg.eval.linear_probe:
        result["linear_probe"] = linear_probe(train, test, lrs=cfg.eval.probe_lrs, epochs=cfg.eval.probe_epochs,
                                              seed=0)
    write_json_atomic(out, result)


def finetune(cfg: CompareConfig, model_dir: Path, indexes: dict, out: Path) -> None:
    from ssl_vit.commands.finetune import finetune as run_finetune
    from ssl_vit.config import load_recipe

    steps = max(1, cfg.eval.finetune_images // cfg.budget.batch_size)
    recipe = load_recipe(cfg.eval.finetune_recipe, [
        *cfg.overrides, f"model.init={model_dir}", f"data.train={indexes['train']}", f"data.eval={indexes['test']}",
        f"train.out_dir={out}", f"train.steps={steps}", "train.epochs=0", "train.resume=auto",
        f"data.batch_size={cfg.budget.batch_size}"])
    run_finetune(recipe, cfg.eval.finetune_recipe)


def run_compare(cfg: CompareConfig) -> dict:
    from ssl_vit.pipelines.report import write_report

    torch.manual_seed(0)
    out = Path(cfg.out_dir)
    stages = StageRunner(out)
    indexes = {}
    for split in ("train", "test"):
        prefix = out / "shards" / split
        index = Path(f"{prefix}-index.json") if not getattr(cfg.source, split).endswith(".json") \
            else Path(getattr(cfg.source, split))
        stages.run(f"shards:{split}", index,
                   lambda s=split, p=prefix: shards_for(getattr(cfg.source, s), p, cfg.source.shard_max_count))
        indexes[split] = str(index)
    models = {}
    for method in cfg.methods:
        model_dir = out / "models" / method
        stages.run(f"pretrain:{method}", model_dir / "summary.json",
                   lambda m=method, d=model_dir: pretrain(cfg, m, indexes["train"], d))
        models[method] = model_dir
    if cfg.random_init:
        models["random_init"] = out / "models" / "random_init"
        stages.run("random_init", models["random_init"] / "summary.json",
                   lambda: random_init(cfg, models["random_init"]))
    rows = dict(models)
    if cfg.eval.raw_pixels:
        rows["raw_pixels"] = None
    for name, model_dir in rows.items():
        for split in ("train", "test"):
            folder = out / "features" / name / split
            stages.run(f"features:{name}:{split}", folder / "meta.json",
                       lambda d=model_dir, s=split, f=folder: extract(cfg, d, indexes[s], f))
        stages.run(f"evaluate:{name}", out / "eval" / f"{name}.json",
                   lambda n=name: evaluate(cfg, out / "features" / n, out / "eval" / f"{n}.json"))
        if cfg.eval.finetune and model_dir is not None:
            ft_dir = out / "finetune" / name
            stages.run(f"finetune:{name}", ft_dir / "finetune_eval.json",
                       lambda d=model_dir, f=ft_dir: finetune(cfg, d, indexes, f))
    return write_report(cfg, out, rows, indexes)
