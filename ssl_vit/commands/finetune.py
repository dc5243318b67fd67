"""`ssl-vit finetune`: end-to-end fine-tuning of a pretrained backbone, then top-1/top-5 on evaluation shards."""
import json

from ssl_vit.commands.train import end_process_group

from ssl_vit.commands.train import add_resume_options


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a pretrained backbone (layer-wise lr decay) and score it on evaluation shards",
        description="Supervised training that starts from a pretrained backbone (model.init) with layer-wise lr "
                    "decay (optim.layer_decay), drop path, mixup/cutmix and label smoothing from the recipe, then "
                    "top-1/top-5 of the fine-tuned classifier on data.eval, written to <out_dir>/finetune_eval.json."
                    " Also runs under `accelerate launch -m ssl_vit.cli finetune ...`.")
    p.add_argument("--recipe", required=True, help="YAML recipe with method: supervised (see recipes/finetune_*)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. optim.layer_decay=0.65")
    p.add_argument("--init", help="pretrained backbone: backbone.safetensors, a run folder, a checkpoint folder, "
                                  "timm:<name>, local-dir:<folder> or hf-hub:<id> of the recipe's architecture "
                                  "(shorthand for model.init=...)")
    p.add_argument("--eval-shards", help="evaluation shards (shorthand for data.eval=...)")
    add_resume_options(p)
    p.add_argument("--out-dir", help="shorthand for train.out_dir=...")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ssl_vit.config import load_recipe

    overrides = list(args.overrides)
    for key, value in (("model.init", args.init), ("data.eval", args.eval_shards), ("train.out_dir", args.out_dir),
                       ("train.resume", args.resume)):
        if value:
            overrides.append(f"{key}={value}")
    if args.no_progress:
        overrides.append("train.progress=false")
    result = finetune(load_recipe(args.recipe, overrides), args.recipe)
    print(json.dumps(result, indent=1))
    end_process_group()
    return 0


def finetune(recipe, recipe_path: str = "") -> dict:
    """Train, then evaluate on `data.eval` (when set); returns the training summary plus the evaluation."""
    from ssl_vit.data.sources import expand_source
    from ssl_vit.errors import SslVitError
    from ssl_vit.eval.classify import evaluate_classifier
    from ssl_vit.atomic_io import write_json_atomic
    from ssl_vit.train.trainer import Trainer

    if recipe.method != "supervised":
        raise SslVitError(f"method: fine-tuning trains a classifier (method: supervised), got {recipe.method!r}")
    if not recipe.model.init:
        raise SslVitError(f"model.init: fine-tuning needs a pretrained backbone (--init PATH or model.init=PATH)"
                          f"{' in ' + recipe_path if recipe_path else ''}")
    for key, source in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)):
        require_labelled_shards(key, source)
    if recipe.data.eval:
        expand_source(recipe.data.eval)  # a missing evaluation set is named now, not after training
    trainer = Trainer(recipe)
    result = {**trainer.fit(), "init": recipe.model.init, "layer_decay": recipe.optim.layer_decay}
    if recipe.data.eval:
        result["eval"] = evaluate_classifier(
            trainer.method.encoder, recipe.data.eval, trainer.acc, image_size=recipe.model.img_size,
            resize=recipe.data.eval_resize or None, batch_size=max(1, trainer.micro_batch),
            num_workers=recipe.data.num_workers, progress=recipe.train.progress)
    if trainer.acc.is_main_process:
        write_json_atomic(trainer.out_dir / "finetune_eval.json", result)
    return result


def require_labelled_shards(key: str, source) -> None:
    """Fine-tuning trains and scores a classifier: an index that says its shards are unlabeled is refused now, not
    at the first unlabeled batch. Patterns without an index are checked by the batches themselves."""
    from ssl_vit.data.index import index_is_labeled, read_index
    from ssl_vit.errors import SslVitError

    for part in source if isinstance(source, (list, tuple)) else [source]:
        if str(part).strip().endswith(".json") and not index_is_labeled(read_index(str(part).strip())):
            raise SslVitError(f"{key}: {part} indexes unlabeled shards; fine-tuning needs a class label on every "
                              "sample (pretrain on unlabeled shards with MAE or DINO instead)")
