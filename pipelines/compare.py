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
from ssl_vit.pipelines.compare_budget import run_images, write_flops
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
    draw: int = 0              # which labelled draw it is evaluated on (and a labelled method trained on)
    seed: int = 0              # which pretraining seed (0: the recipe's own seed)


def run_suffix(draw: int, seed: int) -> str:
    """Names one run of a row: '' for the first draw and seed (the single-run layout), else '-d1', '-s2', '-d1-s2'."""
    return (f"-d{draw}" if draw else "") + (f"-s{seed}" if seed else "")


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


def pretrain(cfg: CompareConfig, method: str, train_source, out: Path, indexes: dict, images: int,
             seed: int = 0) -> None:
    from ssl_vit.loading import method_from_recipe
    from ssl_vit.train.trainer import Trainer

    run = {**run_settings(cfg, method, train_source, out, indexes, images),
           "seed": training_recipe(cfg, method).seed + seed}
    Trainer(with_same_warmup(lambda r: training_recipe(cfg, method, r), run, train_source, indexes["train"]),
            build=method_from_recipe).fit()


def random_init(cfg: CompareConfig, out: Path, seed: int = 0) -> None:
    from accelerate.utils import set_seed

    from ssl_vit.methods import backbone_spec
    from ssl_vit.models.backbone import create_backbone
    from ssl_vit.models.export import export_backbone

    recipe = training_recipe(cfg, cfg.methods[0])
    set_seed(recipe.seed + seed)
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
    """k-NN and the linear probe with only the labelled samples `keys` of the train features as bank/training set;
    the headline k chosen on the validation features (when there are), each test image's hit kept for the error
    bars."""
    import numpy as np

    from ssl_vit.eval.feature_cache import FeatureSet, load_features
    from ssl_vit.eval.knn import knn_classify
    from ssl_vit.eval.linear_probe import linear_probe
    from ssl_vit.eval.uncertainty import encode_hits
    from ssl_vit.pipelines.compare_choices import choose_knn_k

    train, test = load_features(feats / "train"), load_features(feats / "test")
    val = load_features(feats / "val") if (feats / "val" / "meta.json").is_file() else None
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
    choice = choose_knn_k(bank, val, ks, cfg.eval.knn_temperature)
    knn = knn_classify(bank.features, bank.labels, test.features, test.labels, ks=ks,
                       temperature=cfg.eval.knn_temperature, return_predictions=True)
    predictions = knn.pop("predictions")
    result = {"num_labels": len(bank), "labels_digest": keys_digest(bank.keys), "knn": knn, "knn_choice": choice,
              "knn_test_hits": encode_hits(predictions[str(choice["k"])] == test.labels)}
    if cfg.eval.linear_probe:
        probe = linear_probe(bank, test, lrs=cfg.eval.probe_lrs, epochs=cfg.eval.probe_epochs, seed=0,
                             return_predictions=True)
        probe["test_hits"] = encode_hits(probe.pop("test_predictions") == test.labels)
        result["linear_probe"] = probe
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
    carve_validation_split(cfg, indexes, out, stages)
    indexes.setdefault("monitor", indexes.get("val", indexes["test"]))
    return indexes


def refuse_choices_on_test(cfg: CompareConfig, indexes: dict) -> None:
    """train.keep_best chooses a checkpoint on the monitor set: never when that is the test set."""
    choosing = [m for m in cfg.methods if training_recipe(cfg, m).train.keep_best]
    if choosing and indexes["monitor"] == indexes["test"]:
        raise SslVitError(f"train.keep_best ({', '.join(choosing)}) would choose checkpoints on the test set: the "
                          "monitor set is the test set here: give source.val, source.val_fraction > 0 or a "
                          "source.monitor that is not source.test, or leave keep_best off (e.g. "
                          f"method_overrides={{{choosing[0]}: [train.keep_best=false]}})")


def carve_validation_split(cfg: CompareConfig, indexes: dict, out: Path, stages: StageRunner) -> None:
    """indexes["val"]: `source.val` as given, else `source.val_fraction` of every class of the training images
    written as shards of their own, the rest becoming indexes["train"] (none when the fraction is 0)."""
    from ssl_vit.eval.label_subsets import carve_validation

    if cfg.source.val:
        prefix = out / "shards" / "val"
        index = Path(cfg.source.val) if cfg.source.val.endswith(".json") else Path(f"{prefix}-index.json")
        stages.run("shards:val", index, lambda: shards_for(cfg.source.val, prefix, cfg.source.shard_max_count))
        indexes["val"] = str(index)
    elif cfg.source.val_fraction > 0:
        folder, full = out / "shards" / "split", indexes["train"]
        stages.run("shards:validation_split", folder / "fit" / "shards-index.json",
                   lambda: carve_validation(full, cfg.source.val_fraction, cfg.eval.label_seed, folder,
                                            cfg.source.shard_max_count))
        indexes["train"], indexes["val"] = str(folder / "fit" / "shards-index.json"), str(folder / "val" /
                                                                                           "shards-index.json")


def labelled_subsets(cfg: CompareConfig, indexes: dict, out: Path, stages: StageRunner) -> dict[float, list]:
    """{fraction: [{"draw", "keys", "index"}, ...]}: the labelled samples of each fraction in each independent draw
    (eval.label_draws below 100 %, one at 100 %) and, where a labelled method or fine-tuning trains on them, shards
    holding only those (the full training shards at fraction 1). Draw d lives in labels/ (d = 0) or labels/d<d>/."""
    from ssl_vit.eval.label_subsets import draw_seeds

    subsets = {f: [] for f in cfg.eval.label_fractions}
    for draw, seed in enumerate(draw_seeds(min(subsets), cfg.eval.label_draws, cfg.eval.label_seed)):
        fractions = [f for f in cfg.eval.label_fractions if draw < len(draw_seeds(f, cfg.eval.label_draws, 0))]
        folder = out / "labels" / (f"d{draw}" if draw else "")
        for f, subset in one_draw(cfg, indexes, fractions, seed, folder, stages).items():
            subsets[f].append({"draw": draw, **subset})
    return subsets


def one_draw(cfg: CompareConfig, indexes: dict, fractions: list, seed: int, folder: Path, stages: StageRunner):
    """{fraction: {"keys", "index"}} of the labelled draw `seed`, nested across `fractions`, written under `folder`
    (labels/ or labels/d<draw>/)."""
    from ssl_vit.eval.label_subsets import fraction_tag, label_table, subset_shards, write_subsets

    def choose():
        keys, labels = label_table(indexes["train"])
        write_subsets(path, keys, labels, fractions, seed)

    def drop_outdated():
        record = json.loads(path.read_text())
        if record["seed"] != seed:
            raise SslVitError(f"{path} holds the labelled subsets of seed {record['seed']}, not {seed} "
                              f"(eval.label_seed): their models and results are in {folder}; choose another out_dir")
        if any(f"{f:g}" not in record["fractions"] for f in fractions):
            path.unlink()  # a new fraction: the subsets are a function of the seed, the old ones come out the same

    path = folder / "subsets.json"
    if path.is_file():
        stages.on_main(drop_outdated)
    labels_root = folder if folder.name == "labels" else folder.parent
    record = stages.run(f"labels:subsets{'' if folder == labels_root else ':' + folder.name}", path, choose)
    trains = cfg.eval.finetune or any(needs_labels(cfg, m) for m in cfg.methods)
    subsets, superset = {}, None
    for f in sorted(fractions, reverse=True):  # nested: a smaller subset's images come from a larger
        keys = record["fractions"][f"{f:g}"]["keys"]
        index = indexes["train"]
        if f < 1 and trains:
            shards = folder / fraction_tag(f)
            stages.run(f"labels:shards:{shards.relative_to(labels_root)}", shards / "shards-index.json",
                       lambda k=keys, d=shards, s=superset: subset_shards(indexes["train"], k, d, cfg.budget.batch_size,
                                                                          cfg.source.shard_max_count, superset=s))
            index, superset = str(shards / "shards-index.json"), shards
        subsets[f] = {"keys": keys, "index": index}
    return subsets


def pretrain_all(cfg: CompareConfig, indexes: dict, subsets: dict, out: Path, stages: StageRunner) -> dict:
    """{fraction: [Row]}: every run of each method (each pretraining seed; a labelled method also each fraction and
    draw), then the floors (random init per seed, raw pixels) and the given backbones, once per draw."""
    from ssl_vit.eval.label_subsets import fraction_tag

    gflops = stages.run("flops", out / "flops.json", lambda: write_flops(cfg, indexes["train"], out / "flops.json"))
    ssl_data = [indexes["train"], indexes["unlabeled"]] if "unlabeled" in indexes else indexes["train"]
    rows = {f: [] for f in subsets}
    for method in cfg.methods:
        labelled, images = needs_labels(cfg, method), run_images(cfg, method, gflops)
        runs = [(f, s) for f, draws in subsets.items() for s in draws] if labelled else [(None, None)]
        for seed in range(cfg.eval.seeds):
            for f, subset in runs:
                name = (f"{method}-{fraction_tag(f)}{run_suffix(subset['draw'], seed)}" if labelled
                        else method + run_suffix(0, seed))
                folder = out / "models" / name
                data = subset["index"] if labelled else ssl_data
                stages.run(f"pretrain:{name}", folder / "summary.json",
                           lambda m=method, d=folder, s=data, n=images, k=seed: pretrain(cfg, m, s, d, indexes, n, k),
                           together=True)
                for g, draws in ([(f, [subset])] if labelled else subsets.items()):
                    rows[g] += [Row(method, name, str(folder), len(d["keys"]) if labelled else 0, d["draw"], seed)
                                for d in draws]
    floors = [(name, source, False) for name, source in cfg.backbones.items()]
    if cfg.random_init:
        for seed in range(cfg.eval.seeds):
            folder = out / "models" / f"random_init{run_suffix(0, seed)}"
            stages.run(f"random_init{run_suffix(0, seed)}", folder / "summary.json",
                       lambda d=folder, k=seed: random_init(cfg, d, k))
        floors.append(("random_init", str(out / "models" / "random_init"), True))
    if cfg.eval.raw_pixels:
        floors.append(("raw_pixels", None, False))
    for f, draws in subsets.items():
        for d in draws:
            for name, source, seeded in floors:
                for seed in range(cfg.eval.seeds) if seeded else [0]:
                    model = name + run_suffix(0, seed)
                    rows[f].append(Row(name, model, source + run_suffix(0, seed) if seeded else source,
                                       0, d["draw"], seed))
    return rows


def run_compare(cfg: CompareConfig) -> dict:
    from ssl_vit.eval.label_subsets import fraction_tag
    from ssl_vit.pipelines.report import write_report

    torch.manual_seed(0)
    out = Path(cfg.out_dir)
    stages = StageRunner(out)
    indexes = write_source_shards(cfg, out, stages)
    refuse_choices_on_test(cfg, indexes)
    subsets = labelled_subsets(cfg, indexes, out, stages)
    rows = pretrain_all(cfg, indexes, subsets, out, stages)
    for row in {row.model: row for f_rows in rows.values() for row in f_rows}.values():
        for split in ("train", "val", "test"):
            folder = out / "features" / row.model / split
            if split in indexes:
                stages.run(f"features:{row.model}:{split}", folder / "meta.json",
                           lambda b=row.source, s=split, f=folder: extract(cfg, b, indexes[s], f), together=True)
    for f, f_rows in rows.items():
        tag, draws = fraction_tag(f), {d["draw"]: d for d in subsets[f]}
        for row in f_rows:
            run = row.name + run_suffix(row.draw, row.seed)
            stages.run(f"evaluate:{tag}:{run}", out / "eval" / tag / f"{run}.json",
                       lambda r=row, n=run: evaluate(cfg, out / "features" / r.model, draws[r.draw]["keys"],
                                                     out / "eval" / tag / f"{n}.json"))
            if cfg.eval.finetune and row.name not in ("raw_pixels", *cfg.backbones):  # the recipe's architecture
                ft_dir = out / "finetune" / tag / run
                stages.run(f"finetune:{tag}:{run}", ft_dir / "finetune_eval.json",
                           lambda r=row, d=ft_dir, i=draws[row.draw]["index"]: finetune(cfg, r.source, i, indexes, d),
                           together=True)
    return stages.on_main(lambda: write_report(cfg, out, rows, indexes))
