"""`ssl-vit finetune`: end-to-end fine-tuning of a pretrained backbone, then top-1/top-5 on evaluation shards."""
import json

from ssl_vit.commands.train import add_resume_options, recipe_overrides


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
    from ssl_vit.loading import method_from_recipe
    from ssl_vit.train.finetune import finetune

    overrides = recipe_overrides(args, {"model.init": args.init, "data.eval": args.eval_shards,
                                        "train.out_dir": args.out_dir, "train.resume": args.resume})
    if args.no_progress:
        overrides.append(("train.progress", False))
    result = finetune(load_recipe(args.recipe, overrides), args.recipe, build=method_from_recipe)
    print(json.dumps(result, indent=1))
    return 0
