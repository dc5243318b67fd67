"""`ssl-vit compare`: the SSL-vs-supervised comparison pipeline (code in pipelines/compare.py)."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="pretrain MAE, DINO and a supervised baseline on the same data and budget, then report "
                        "at several fractions of labels",
        description="Runs shards (a validation split carved from train: source.val_fraction) → labelled subsets "
                    "(eval.label_fractions × eval.label_draws) → pretrain (MAE/DINO on every image without labels; "
                    "supervised on each draw's labelled images; same images seen, or same compute with "
                    "budget.mode=flops) → features → k-NN (k chosen on validation) / linear probe per fraction and "
                    "draw → mean ± std, paired differences → report.md, report.json, label_efficiency.png, "
                    "comparison.png, "
                    "retrieval.png, attention.png in the run folder. Re-running skips finished stages. Under "
                    "`accelerate launch` pretraining and features use every process; the other stages run on the "
                    "main process while the rest wait.")
    p.add_argument("--recipe", required=True, help="comparison recipe, e.g. recipes/compare_cifar10_subset.yaml")
    p.add_argument("--thorough", action="store_true",
                   help="3 pretraining seeds per method (eval.seeds=3) on top of the labelled draws: error bars that "
                        "include the training seed (about 3x the pretraining time)")
    p.add_argument("--budget", metavar="NAME", help="a named budget of the recipe's `budgets` (e.g. long): its "
                                                    "key=value settings, before the command line's own")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. budget.images=20000 out_dir=runs/x")
    p.set_defaults(func=run)


def run(args) -> int:
    from accelerate import PartialState

    from ssl_vit.pipelines.compare import run_compare
    from ssl_vit.pipelines.compare_config import load_compare_recipe
    from ssl_vit.pipelines.report import markdown_tables

    cfg = load_compare_recipe(args.recipe, compare_overrides(args))
    report = run_compare(cfg)
    if not PartialState().is_main_process:  # under `accelerate launch`: one copy of the tables
        return 0
    print()
    print(markdown_tables(report))
    print(f"\nreport: {cfg.out_dir}/report.md")
    return 0


def compare_overrides(args) -> list[str]:
    """The command line's key=value list with what --thorough and --budget NAME stand for (the explicit ones win)."""
    from ssl_vit.pipelines.compare_config import apply_budget

    overrides = [*(["eval.seeds=3"] if args.thorough else []), *args.overrides]
    return apply_budget(args.recipe, overrides, args.budget) if args.budget else overrides
