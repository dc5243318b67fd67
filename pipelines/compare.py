"""SSL vs supervised on the same data and budget, at several fractions of labels: shards → labelled subsets →
pretrain (MAE/DINO once on every training image without labels; the supervised baseline once per fraction, on that
fraction's labelled images only, same image budget) → features → k-NN / linear probe per fraction, the fraction's
labelled images as the bank and the probe's training set → report. Every stage writes its result into the run folder
and is skipped when re-run; a failing stage is named and what finished is kept. Under `accelerate launch`
pretraining, features and fine-tuning use every process, the other stages run on the main one (pipelines/stages.py).

    ssl-vit compare --recipe recipes/compare_cifar10_subset.yaml
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ssl_vit.pipelines.compare_config import CompareConfig, eval_resize, needs_labels, training_recipe
from ssl_vit.pipelines.stages import StageRunner
from ssl_vit.atomic_io import write_json_atomic
from ssl_vit.errors import SslVitError
from ssl_vit.models.backbone import default_pooling


def shards_for(source: str, out_prefix: Path, max_count: int, unlabeled: bool = False) -> str:
    """An index.json for `source`: itself when it is one, else shards written once into the run folder."""
    from ssl_vit.data.writer import write_shards

    if source.endswith(".json"):
        return source
    index = Path(f"{out_prefix}-index.json")
    if not index.exists():
        write_shards(source, str(out_prefix), max_count=max_count, seed=0, workers=2, progress=True,
                     unlabeled=unlabeled)
    return str(index)


class RawPixels(nn.Module):
    """A 'backbone' whose CLS feature is the flattened normalised image: the raw-pixel k-NN floor."""

    num_prefix_tokens = 1

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, None, :]  # [B, 1, 3·H·W]


@dataclass(frozen=True)
class Row:
    """One line of a fraction's table: `name` in the table, `model` the features/<model> folder, `source` the
    backbone they are extracted from (anything `load_backbone` takes; None: raw pixels)."""
    name: str
    model: str
    source: str | None
    trained_on: int = 0        # labelled images its pretraining saw


def with_same_warmup(load, run: dict, index, full_index: str):
    """The recipe `load(run)` gives, its warm-up kept at the full training set's number of steps: on a labelled
    subset an epoch is fewer steps, and every fraction's run should have the same schedule and differ only in its
    images. `index` may be a list of sources (SSL on all images), which is no subset."""
    from ssl_vit.data.sources import expand_source
    from ssl_vit.train.trainer import epoch_length

    recipe = load(run)
    if not isinstance(index, str) or index == full_index or recipe.optim.warmup_epochs <= 0:
        return recipe
    full, subset = (epoch_length(recipe, expand_source(i)) for i in (full_index, index))
    return load({**run, "optim.warmup_epochs": recipe.optim.warmup_epochs * full / subset})


def run_settings(cfg: CompareConfig, method: str, train_source, out: Path, indexes: dict, images: int) -> dict:
    """The recipe keys that one training run of the comparison sets: its data, its folder, its length (`images`
    seen) and the evaluation resize of `method`'s image size."""
    image_size = training_recipe(cfg, method).model.img_size
    return {"data.train": train_source, "train.out_dir": str(out), "train.epochs": 0, "train.resume": "auto",
            "train.steps": max(1, images // cfg.budget.batch_size), "data.batch_size": cfg.budget.batch_size,
            "data.monitor": indexes["monitor"], "data.eval_resize": eval_resize(cfg, image_size)}


def pretrain(cfg: CompareConfig, method: str, train_source, out: Path, indexes: dict) -> None:
    from ssl_vit.loading import method_from_recipe
    from ssl_vit.train.trainer import Trainer

    run = run_settings(cfg, method, train_source, out, indexes, cfg.budget.images)
    Trainer(with_same_warmup(lambda r: training_recipe(cfg, method, r), run, train_source, indexes["train"]),
            build=method_from_recipe).fit()


def random_init(cfg: CompareConfig, out: Path) -> None:
    from accelerate.utils import set_seed

    from ssl_vit.methods import backbone_spec
    from ssl_vit.models.backbone import create_backbone
    from ssl_vit.models.export import export_backbone

    recipe = training_recipe(cfg, cfg.methods[0])
    set_seed(recipe.seed)
    spec = backbone_spec(recipe)
    out.mkdir(parents=True, exist_ok=True)
    export_backbone(create_backbone(spec), spec, out / "backbone.safetensors", extra_meta={"method": "random_init"})
    write_json_atomic(out / "summary.json", {"method": "random_init", "steps": 0, "images_seen": 0,
                                             "train_seconds": 0.0, "images_per_s": None})


def extract(cfg: CompareConfig, backbone: str | None, source: str, out: Path) -> None:
    """Features of `backbone` (None: raw pixels at the training recipes' size) at its own input size."""
    from ssl_vit.eval.features import extract_features
    from ssl_vit.loading import load_backbone

    e = cfg.eval
    if backbone is None:
        model, image_size = RawPixels(), training_recipe(cfg, cfg.methods[0]).model.img_size
    else:
        model, meta = load_backbone(backbone)
        image_size = int(meta["img_size"])
    extract_features(model, source, out, image_size=image_size, resize=eval_resize(cfg, image_size),
                     pooling=default_pooling(model),
                     batch_size=e.batch_size, num_workers=e.num_workers,
                     meta={"backbone": str(backbone) if backbone else "raw_pixels"})


def keys_digest(keys: list[str]) -> str:
    """Names a labelled subset in every result computed from it (the same subset for every model)."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def evaluate(cfg: CompareConfig, feats: Path, keys: list[str], out: Path) -> None:
    """k-NN and the linear probe with only the labelled samples `keys` of the train features as bank/training set."""
    import numpy as np

    from ssl_vit.eval.feature_cache import FeatureSet, load_features
    from ssl_vit.eval.knn import knn_classify
    from ssl_vit.eval.linear_probe import linear_probe

    train, test = load_features(feats / "train"), load_features(feats / "test")
    row_of = {k: i for i, k in enumerate(train.keys)}
    missing = [k for k in keys if k not in row_of]
    if missing:
        raise SslVitError(f"{feats / 'train'}: labelled sample {missing[0]} is not in the feature cache "
                          f"({len(missing)} of {len(keys)} missing)")
    rows = np.sort(np.asarray([row_of[k] for k in keys], dtype=np.int64))
    bank = FeatureSet(np.asarray(train.features[rows]), train.labels[rows], [train.keys[i] for i in rows], train.meta)
    ks = [k for k in cfg.eval.knn_k if k <= len(bank)]
    if not ks:
        raise SslVitError(f"eval.knn_k: every k {cfg.eval.knn_k} is larger than the {len(bank)} labelled samples")
    result = {"num_labels": len(bank), "labels_digest": keys_digest(bank.keys),
              "knn": knn_classify(bank.features, bank.labels, test.features, test.labels, ks=ks,
                                  temperature=cfg.eval.knn_temperature)}
    if cfg.eval.linear_probe:
        result["linear_probe"] = linear_probe(bank, test, lrs=cfg.eval.probe_lrs, epochs=cfg.eval.probe_epochs,
                                              seed=0)
    write_json_atomic(out, result)


def finetune(cfg: CompareConfig, model_dir: Path, train_index: str, indexes: dict, out: Path) -> None:
    from ssl_vit.config import load_recipe
    from ssl_vit.loading import method_from_recipe
    from ssl_vit.train.finetune import finetune as run_finetune

    run = {**run_settings(cfg, cfg.methods[0], train_index, out, indexes, cfg.eval.finetune_images),
           "model.init": str(model_dir), "data.eval": indexes["test"]}
    recipe = with_same_warmup(lambda r: load_recipe(cfg.eval.finetune_recipe, [*cfg.overrides, *r.items()]), run,
                              train_index, indexes["train"])
    run_finetune(recipe, cfg.eval.finetune_recipe, build=method_from_recipe)


def write_source_shards(cfg: CompareConfig, out: Path, stages: StageRunner) -> dict:
    """{"train", "test", "monitor"[, "unlabeled"]: index.json}: given indexes as they are, image sources written
    once (the monitor set is the test set unless the recipe names one)."""
    indexes = {}
    for split in ("train", "test", "unlabeled", "monitor"):
        source = getattr(cfg.source, split)
        if not source:
            continue
        prefix = out / "shards" / split
        index = Path(source) if source.endswith(".json") else Path(f"{prefix}-index.json")
        stages.run(f"shards:{split}", index,
                   lambda s=source, p=prefix, u=split == "unlabeled": shards_for(s, p, cfg.source.shard_max_count, u))
        indexes[split] = str(index)
    indexes.setdefault("monitor", indexes["test"])
    return indexes


def labelled_subsets(cfg: CompareConfig, indexes: dict, out: Path, stages: StageRunner) -> dict[float, dict]:
    """{fraction: {"keys", "index"}}: the labelled samples of each fraction and, where a labelled method or
    fine-tuning trains on them, shards holding only those (the full training shards at fraction 1)."""
    from ssl_vit.eval.label_subsets import fraction_tag, label_table, subset_shards, write_subsets

    def choose():
        keys, labels = label_table(indexes["train"])
        write_subsets(out / "labels" / "subsets.json", keys, labels, cfg.eval.label_fractions, cfg.eval.label_seed)

    def drop_outdated():
        record = json.loads(path.read_text())
        if record["seed"] != cfg.eval.label_seed:
            raise SslVitError(f"{path} holds the labelled subsets of eval.label_seed={record['seed']}, not "
                              f"{cfg.eval.label_seed}: their models and results are in {out}; choose another out_dir")
        if any(f"{f:g}" not in record["fractions"] for f in cfg.eval.label_fractions):
            path.unlink()  # a new fraction: the subsets are a function of the seed, the old ones come out the same

    path = out / "labels" / "subsets.json"
    if path.is_file():
        stages.on_main(drop_outdated)
    record = stages.run("labels:subsets", path, choose)
    trains = cfg.eval.finetune or any(needs_labels(cfg, m) for m in cfg.methods)
    subsets, superset = {}, None
    for f in sorted(cfg.eval.label_fractions, reverse=True):  # nested: a smaller subset's images come from a larger
        keys = record["fractions"][f"{f:g}"]["keys"]
        index = indexes["train"]
        if f < 1 and trains:
            folder = out / "labels" / fraction_tag(f)
            stages.run(f"labels:shards:{fraction_tag(f)}", folder / "shards-index.json",
                       lambda k=keys, d=folder, s=superset: subset_shards(indexes["train"], k, d, cfg.budget.batch_size,
                                                                          cfg.source.shard_max_count, superset=s))
            index, superset = str(folder / "shards-index.json"), folder
        subsets[f] = {"keys": keys, "index": index}
    return {f: subsets[f] for f in cfg.eval.label_fractions}


def pretrain_all(cfg: CompareConfig, indexes: dict, subsets: dict, out: Path, stages: StageRunner) -> dict:
    """{fraction: [Row]}: each method's model(s), then the floors (random init, raw pixels)."""
    from ssl_vit.eval.label_subsets import fraction_tag

    ssl_data = [indexes["train"], indexes["unlabeled"]] if "unlabeled" in indexes else indexes["train"]
    rows = {f: [] for f in subsets}
    for method in cfg.methods:
        labelled = needs_labels(cfg, method)
        for f, subset in (subsets.items() if labelled else [(None, None)]):
            name = f"{method}-{fraction_tag(f)}" if labelled else method
            folder = out / "models" / name
            data = subset["index"] if labelled else ssl_data
            stages.run(f"pretrain:{name}", folder / "summary.json",
                       lambda m=method, d=folder, s=data: pretrain(cfg, m, s, d, indexes), together=True)
            for g in ([f] if labelled else rows):
                rows[g].append(Row(method, name, str(folder), len(subset["keys"]) if labelled else 0))
    floors = []
    if cfg.random_init:
        stages.run("random_init", out / "models" / "random_init" / "summary.json",
                   lambda: random_init(cfg, out / "models" / "random_init"))
        floors.append(Row("random_init", "random_init", str(out / "models" / "random_init")))
    if cfg.eval.raw_pixels:
        floors.append(Row("raw_pixels", "raw_pixels", None))
    backbones = [Row(name, name, source) for name, source in cfg.backbones.items()]
    return {f: [*f_rows, *backbones, *floors] for f, f_rows in rows.items()}


def run_compare(cfg: CompareConfig) -> dict:
    from ssl_vit.eval.label_subsets import fraction_tag
    from ssl_vit.pipelines.report import write_report

    torch.manual_seed(0)
    out = Path(cfg.out_dir)
    stages = StageRunner(out)
    indexes = write_source_shards(cfg, out, stages)
    subsets = labelled_subsets(cfg, indexes, out, stages)
    rows = pretrain_all(cfg, indexes, subsets, out, stages)
    for row in {row.model: row for f_rows in rows.values() for row in f_rows}.values():
        for split in ("train", "test"):
            folder = out / "features" / row.model / split
            stages.run(f"features:{row.model}:{split}", folder / "meta.json",
                       lambda b=row.source, s=split, f=folder: extract(cfg, b, indexes[s], f), together=True)
    for f, f_rows in rows.items():
        tag, keys = fraction_tag(f), subsets[f]["keys"]
        for row in f_rows:
            stages.run(f"evaluate:{tag}:{row.name}", out / "eval" / tag / f"{row.name}.json",
                       lambda r=row, t=tag: evaluate(cfg, out / "features" / r.model, keys,
                                                     out / "eval" / t / f"{r.name}.json"))
            if cfg.eval.finetune and row.name not in ("raw_pixels", *cfg.backbones):  # the recipe's architecture
                ft_dir = out / "finetune" / tag / row.name
                stages.run(f"finetune:{tag}:{row.name}", ft_dir / "finetune_eval.json",
                           lambda r=row, d=ft_dir, i=subsets[f]["index"]: finetune(cfg, r.source, i, indexes, d),
                           together=True)
    return stages.on_main(lambda: write_report(cfg, out, rows, indexes))
