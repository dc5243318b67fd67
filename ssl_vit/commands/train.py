"""`ssl-vit pretrain`: train a method from a recipe (also what `accelerate launch -m ssl_vit.train` runs)."""
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pretrain (MAE, DINO) or train the supervised baseline from a recipe",
        description="Train from a YAML recipe. Run under `accelerate launch` for several processes/GPUs/nodes: "
                    "accelerate launch -m ssl_vit.train --recipe recipes/<name>.yaml [key=value ...]")
    p.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. optim.base_lr=1e-3")
    add_resume_options(p)
    p.add_argument("--out-dir", help="shorthand for train.out_dir=...")
    p.set_defaults(func=run)


def add_resume_options(p) -> None:
    """`--resume` (a flag: the latest checkpoint in train.out_dir) or `--resume-from CHECKPOINT`; both set
    `args.resume`, the value of train.resume."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_const", const="auto",
                       help="continue from the latest checkpoint in train.out_dir (if there is one)")
    group.add_argument("--resume-from", dest="resume", metavar="CHECKPOINT",
                       help="continue from this checkpoint folder (<out_dir>/checkpoints/ckpt-<step>)")


def recipe_overrides(args, options: dict) -> list:
    """The command line's key=value overrides, then the options given (recipe key → value, set as it is)."""
    return [*args.overrides, *((key, value) for key, value in options.items() if value)]


def run(args) -> int:
    from ssl_vit.config import load_recipe
    from ssl_vit.loading import method_from_recipe
    from ssl_vit.train.trainer import Trainer

    recipe = load_recipe(args.recipe, recipe_overrides(args, {"train.out_dir": args.out_dir,
                                                              "train.resume": args.resume}))
    trainer = Trainer(recipe, build=method_from_recipe)  # a distillation teacher is read from disk
    summary = trainer.fit()
    if trainer.acc.is_main_process:
        print(json.dumps(summary, indent=1))
    return 0
