"""The comparison report: `report.json` (the numbers), `report.md` (a table per fraction of labels, readable) and the
figures."""
import json
from pathlib import Path

from ssl_vit.pipelines.compare_budget import budget_statement
from ssl_vit.pipelines.compare_config import CompareConfig, needs_labels, training_recipe
from ssl_vit.pipelines.report_stats import differences, fold_runs, goal_verdict, score_cell

COLUMNS = [("model", "model"), ("pretrain_labels", "labels in pretraining"), ("images_seen", "images seen"),
           ("gflops_per_image", "GFLOPs/image"), ("train_tflops", "train TFLOPs"),
           ("train_seconds", "wall time (s)"), ("images_per_s", "images/s"), ("knn_k", "k (val)"),
           ("knn_top1", "k-NN top-1"), ("knn_top5", "k-NN top-5"), ("linear_top1", "linear-probe top-1"),
           ("finetune_top1", "fine-tune top-1")]
SCORES = ("knn_top1", "linear_top1")  # cells with their uncertainty
KNN_K = 20  # the k of the table's k-NN columns (the largest k below it when a fraction has fewer labels)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def table_k(knn: dict) -> str | None:
    """The k shown in the table: KNN_K when it was computed, else the largest one below it (else the smallest)."""
    ks = sorted(int(k) for k in knn)
    if not ks:
        return None
    below = [k for k in ks if k <= KNN_K]
    return str(below[-1] if below else ks[0])


def model_row(row, fraction: float, out: Path, gflops: dict | None = None) -> dict:
    """One run of a row (one labelled draw, one pretraining seed) with every number it has, hits per test image
    included."""
    from ssl_vit.eval.label_subsets import fraction_tag
    from ssl_vit.pipelines.compare import run_suffix

    tag, run = fraction_tag(fraction), row.name + run_suffix(row.draw, row.seed)
    summary = _read(out / "models" / row.model / "summary.json")
    result = _read(out / "eval" / tag / f"{run}.json")
    knn = result.get("knn", {}).get("k", {})
    choice = result.get("knn_choice") or {}
    k = str(choice["k"]) if "k" in choice else table_k(knn)
    probe = result.get("linear_probe") or {}
    finetune = _read(out / "finetune" / tag / run / "finetune_eval.json")
    per_image = (gflops or {}).get(row.name, {}).get("total") if summary.get("steps") else None  # by row: swin_dino
    images = summary.get("images_seen", 0)
    return {"fraction": fraction, "draw": row.draw, "seed": row.seed, "num_labels": result.get("num_labels"),
            "labels_digest": result.get("labels_digest"),
            "model": row.name, "method": summary.get("method", row.name), "weights": row.model,
            "source": row.source,
            "pretrain_labels": row.trained_on, "images_seen": images, "kept": summary.get("kept"),
            "gflops_per_image": per_image, "train_tflops": per_image * images / 1e3 if per_image else None,
            "train_seconds": summary.get("train_seconds") or None, "images_per_s": summary.get("images_per_s"),
            "knn_k": k, "knn_k_by": choice.get("by"), "knn_val_top1": choice.get("val_top1"),
            "knn_top1": knn.get(k, {}).get("top1"), "knn_top5": knn.get(k, {}).get("top5"),
            "knn_hits": result.get("knn_test_hits"),
            "linear_top1": probe.get("test_top1"), "probe_selection": probe.get("selection"),
            "probe_lr": probe.get("best_lr"), "linear_hits": probe.get("test_hits"),
            "finetune_top1": finetune.get("eval", {}).get("top1"), "knn": knn or None}


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if value < 1 else f"{value:.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(score_cell(row, key) if key in SCORES else _cell(row.get(key)) for key, _ in COLUMNS)
            + " |" for row in rows]
    return "\n".join([head, sep, *body])


def fraction_title(fraction: float, rows: list[dict]) -> str:
    n = next((row["num_labels"] for row in rows if row.get("num_labels")), None)
    runs = max((row.get("runs", 1) for row in rows), default=1)
    k_by = next((row["knn_k_by"] for row in rows if row.get("knn_k_by")), None)
    selection = next((row["probe_selection"] for row in rows if row.get("probe_selection")), None)
    parts = [f"{n:,} labelled training images" if n else None,
             f"mean ± std over {runs} runs" if runs > 1 else "one run, [95 % interval over test images]",
             f"k-NN k by {k_by}" if k_by else None, f"probe lr by {selection}" if selection else None]
    return f"{fraction:.0%} of the labels ({', '.join(p for p in parts if p)})"


def markdown_tables(report: dict) -> str:
    """One table per fraction of labels, smallest first."""
    blocks = []
    for fraction in report["label_fractions"]:
        rows = [row for row in report["rows"] if row["fraction"] == fraction]
        blocks += [f"### {fraction_title(fraction, rows)}", "", markdown_table(rows), ""]
    return "\n".join(blocks).rstrip() + "\n"


def backbone_name(cfg: CompareConfig) -> str:
    r = training_recipe(cfg, cfg.methods[0])
    arch = f"{r.model.name}"
    overrides = ", ".join(f"{k}={v}" for k, v in (("depth", r.model.depth), ("dim", r.model.embed_dim)) if v)
    return f"{arch} ({r.model.img_size}px/p{r.model.patch_size}{', ' + overrides if overrides else ''})"


def fold_fraction_rows(runs: list[dict]) -> list[dict]:
    """Table rows: the runs of each (fraction, model) folded into one (report_stats.fold_runs), in run order."""
    groups: dict = {}
    for run in runs:
        groups.setdefault((run["fraction"], run["model"]), []).append(run)
    return [fold_runs(group) for group in groups.values()]


def conclusions(cfg: CompareConfig, runs: list[dict], fractions: list[float]) -> tuple[list[dict], list[str]]:
    """(every paired difference, the goal's verdict per fraction)."""
    labelled = [m for m in cfg.methods if needs_labels(cfg, m)]
    diffs = [d for f in fractions for d in differences(runs, f, labelled)]
    ssl = [m for m in cfg.methods if m not in labelled]
    return diffs, goal_verdict(diffs, fractions, ssl, labelled)


def write_report(cfg: CompareConfig, out: Path, rows_by_fraction: dict, indexes: dict) -> dict:
    from ssl_vit.pipelines import figures, vit_figures

    backbone = backbone_name(cfg)
    gflops = _read(out / "flops.json")
    runs = [model_row(row, f, out, gflops) for f, f_rows in rows_by_fraction.items() for row in f_rows]
    rows = fold_fraction_rows(runs)
    fractions = list(rows_by_fraction)
    diffs, goal = conclusions(cfg, runs, fractions)
    budget = budget_statement(cfg, gflops)
    report = {"name": cfg.name, "budget_images": cfg.budget.images, "batch_size": cfg.budget.batch_size,
              "budget_mode": cfg.budget.mode, "budget": budget, "gflops_per_image": gflops,
              "label_draws": cfg.eval.label_draws, "seeds": cfg.eval.seeds,
              "backbone": backbone, "shards": indexes, "label_fractions": fractions, "rows": rows,
              "differences": diffs, "goal": goal, "runs": runs,
              "protocol": f"k-NN: L2-normalised CLS features, cosine similarity, exp(sim/{cfg.eval.knn_temperature}) "
                          "votes (DINO), the fraction's labelled training images as the bank, k chosen per run among "
                          f"{cfg.eval.knn_k} on the validation split ({validation_text(cfg, indexes)}); linear probe: "
                          "trained on the same labelled images only, its lr grid selected on a held-out 10 % of them, "
                          "or by per-class k-fold cross-validation when a class has fewer than 10 (then refit on "
                          "all); the test set is scored once, after every choice"}
    if cfg.eval.finetune:
        report["protocol"] += (f"; fine-tuning: every backbone trained end to end on {cfg.eval.finetune_images:,} "
                               f"images of the fraction's labelled set with {cfg.eval.finetune_recipe}, top-1 on the "
                               "test shards")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    largest = max(rows_by_fraction)
    top = [row for row in rows if row["fraction"] == largest]
    trained = {row["weights"]: out / "models" / row["weights"] for row in rows
               if (out / "models" / row["weights"]).is_dir()}
    md = [f"# SSL vs supervised: {cfg.name}", "",
          f"Budget: {budget}, batch {cfg.budget.batch_size}, on `{backbone}`. MAE and DINO pretrain once per seed, "
          "on every training image without labels; the supervised baseline pretrains once per fraction, draw and "
          "seed, on that draw's labelled images only (more epochs over fewer images). Every evaluation at a "
          "fraction uses only its labelled images (class-balanced, seeded, nested: the same for every model); "
          f"below 100 % there are {cfg.eval.label_draws} independent draws, and {cfg.eval.seeds} pretraining "
          f"seed(s).{kept_statement(runs)}", "", "## What the differences say", "",
          "Paired bootstrap over the same test images and runs (draws × seeds); a difference counts when its 95 % "
          "interval excludes zero. Single numbers are never compared.", "",
          *[f"- {line}" for line in goal], "", *[f"- {d['text']}" for d in diffs if d["significant"]], "",
          "Within the uncertainty:", "", *[f"- {d['text']}" for d in diffs if not d["significant"]], "",
          markdown_tables(report), *[f"`{name}`: `{source}` (evaluated as it is, not trained here)." for name, source
                                     in cfg.backbones.items()], "", report["protocol"] + ".", "",
          "MAE features are known to be weak under k-NN and strong after fine-tuning (He et al. 2021; lightly's "
          "ImageNet benchmarks): read the k-NN and linear-probe columns together.", "",
          "![label efficiency](label_efficiency.png)", "", "![comparison](comparison.png)", "",
          "![retrieval](retrieval.png)", "", "![attention](attention.png)"]
    images = figures.evaluation_images(indexes["test"], 4)[0]  # the ViT paper's pictures of every trained row
    md += vit_figures.report_lines(vit_figures.row_figures(trained, images, out / "vit_figures"), out)
    (out / "report.md").write_text("\n".join(md) + "\n")
    figures.label_efficiency_png(rows, out / "label_efficiency.png")
    figures.comparison_png(top, trained, out / "comparison.png")
    figures.retrieval_png(out, [row["weights"] for row in top], indexes["test"], out / "retrieval.png")
    figures.attention_png(trained, indexes["test"], out / "attention.png")
    return report


def kept_statement(runs: list[dict]) -> str:
    """Which rows export the monitored step with the best validation k-NN (train.keep_best) rather than the last."""
    kept = {}
    for run in runs:
        if run["kept"]:
            kept.setdefault(run["model"], {})[run["weights"]] = run["kept"]
    if not kept:
        return ""
    parts = [f"{name} at step{'s' if len(by_run) > 1 else ''} "
             f"{', '.join(str(k['step']) for k in by_run.values())} of {max(k['last_step'] for k in by_run.values())}"
             for name, by_run in kept.items()]
    return (" Every run exports its last step, except where the recipe sets `train.keep_best`: there the step with "
            "the best k-NN on the monitor set (the validation split unless `source.monitor` names another; never the test "
            "set), scored every `train.monitor_every` steps and at the end (chosen: "
            f"{'; '.join(parts)}).")


def validation_text(cfg: CompareConfig, indexes: dict) -> str:
    if "val" not in indexes:
        return "none: source.val_fraction=0, the fixed k=20 rule"
    if cfg.source.val:
        return f"source.val = {cfg.source.val}"
    return f"{cfg.source.val_fraction:.0%} of each class of the training images, never trained on"
