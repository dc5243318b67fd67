"""The comparison report: `report.json` (the numbers), `report.md` (a table per fraction of labels, readable) and the
figures."""
import json
from pathlib import Path

from ssl_vit.pipelines.compare_config import CompareConfig, training_recipe

COLUMNS = [("model", "model"), ("pretrain_labels", "labels in pretraining"), ("images_seen", "images seen"),
           ("train_seconds", "wall time (s)"), ("images_per_s", "images/s"), ("knn_top1", "k-NN top-1"),
           ("knn_top5", "k-NN top-5"), ("linear_top1", "linear-probe top-1"), ("finetune_top1", "fine-tune top-1")]
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


def model_row(row, fraction: float, out: Path) -> dict:
    from ssl_vit.eval.label_subsets import fraction_tag

    tag = fraction_tag(fraction)
    summary = _read(out / "models" / row.model / "summary.json")
    result = _read(out / "eval" / tag / f"{row.name}.json")
    knn = result.get("knn", {}).get("k", {})
    k = table_k(knn)
    probe = result.get("linear_probe") or {}
    finetune = _read(out / "finetune" / tag / row.name / "finetune_eval.json")
    return {"fraction": fraction, "num_labels": result.get("num_labels"), "labels_digest": result.get("labels_digest"),
            "model": row.name, "method": summary.get("method", row.name), "weights": row.model,
            "source": row.source,
            "pretrain_labels": row.trained_on, "images_seen": summary.get("images_seen", 0),
            "train_seconds": summary.get("train_seconds") or None, "images_per_s": summary.get("images_per_s"),
            "knn_k": k, "knn_top1": knn.get(k, {}).get("top1"), "knn_top5": knn.get(k, {}).get("top5"),
            "linear_top1": probe.get("test_top1"), "probe_selection": probe.get("selection"),
            "probe_lr": probe.get("best_lr"), "finetune_top1": finetune.get("eval", {}).get("top1"), "knn": knn or None}


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(row[key]) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join([head, sep, *body])


def fraction_title(fraction: float, rows: list[dict]) -> str:
    n = next((row["num_labels"] for row in rows if row.get("num_labels")), None)
    k = next((row["knn_k"] for row in rows if row.get("knn_k")), None)
    selection = next((row["probe_selection"] for row in rows if row.get("probe_selection")), None)
    parts = [f"{n:,} labelled training images" if n else None, f"k-NN k={k}" if k else None,
             f"probe lr by {selection}" if selection else None]
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


def write_report(cfg: CompareConfig, out: Path, rows_by_fraction: dict, indexes: dict) -> dict:
    from ssl_vit.pipelines import figures, vit_figures

    backbone = backbone_name(cfg)
    rows = [model_row(row, f, out) for f, f_rows in rows_by_fraction.items() for row in f_rows]
    report = {"name": cfg.name, "budget_images": cfg.budget.images, "batch_size": cfg.budget.batch_size,
              "backbone": backbone, "shards": indexes, "label_fractions": list(rows_by_fraction), "rows": rows,
              "protocol": f"k-NN: L2-normalised CLS features, cosine similarity, exp(sim/{cfg.eval.knn_temperature}) "
                          "votes (DINO), the fraction's labelled training images as the bank; linear probe: trained "
                          "on the same labelled images only, its lr grid selected on a held-out 10 % of them, or by "
                          "per-class k-fold cross-validation when a class has fewer than 10 (then refit on all)"}
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
          f"Every pretraining run saw the same budget: **{cfg.budget.images:,} images** (batch "
          f"{cfg.budget.batch_size}) on `{backbone}`. MAE and DINO pretrain once, on every training image without "
          "labels; the supervised baseline pretrains once per fraction, on that fraction's labelled images only "
          "(the same budget: more epochs over fewer images). Every evaluation at a fraction uses only its labelled "
          "images (class-balanced, seeded, nested: the same for every model).", "",
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
