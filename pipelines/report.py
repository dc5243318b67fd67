"""The comparison report: `report.json` (the numbers), `report.md` (the same table, readable) and the figures."""
import json
from pathlib import Path

from ssl_vit.pipelines.compare_config import CompareConfig

COLUMNS = [("model", "model"), ("method", "method"), ("backbone", "backbone"), ("images_seen", "images seen"),
           ("train_seconds", "wall time (s)"), ("images_per_s", "images/s"), ("knn_top1", "k-NN top-1 (k=20)"),
           ("knn_top5", "k-NN top-5 (k=20)"), ("linear_top1", "linear-probe top-1"),
           ("finetune_top1", "fine-tune top-1")]


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def model_row(name: str, model_dir: Path | None, eval_result: dict, backbone: str, finetune: dict) -> dict:
    summary = _read(model_dir / "summary.json") if model_dir else {}
    knn20 = eval_result.get("knn", {}).get("k", {}).get("20", {})
    probe = eval_result.get("linear_probe", {})
    return {"model": name, "method": summary.get("method", name), "backbone": backbone if model_dir else "-",
            "images_seen": summary.get("images_seen", 0), "train_seconds": summary.get("train_seconds", 0.0),
            "images_per_s": summary.get("images_per_s"), "knn_top1": knn20.get("top1"), "knn_top5": knn20.get("top5"),
            "linear_top1": probe.get("test_top1"),
            "finetune_top1": finetune.get("eval", {}).get("top1"), "knn": eval_result.get("knn", {}).get("k"),
            "linear_probe": probe or None}


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(row[key]) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join([head, sep, *body])


def backbone_name(cfg: CompareConfig) -> str:
    from ssl_vit.config import load_recipe

    r = load_recipe(cfg.recipes[cfg.methods[0]], [*cfg.overrides, "train.steps=1", "train.epochs=0"])
    arch = f"{r.model.name}"
    overrides = ", ".join(f"{k}={v}" for k, v in (("depth", r.model.depth), ("dim", r.model.embed_dim)) if v)
    return f"{arch} ({r.model.img_size}px/p{r.model.patch_size}{', ' + overrides if overrides else ''})"


def write_report(cfg: CompareConfig, out: Path, models: dict, indexes: dict) -> dict:
    from ssl_vit.pipelines import figures

    backbone = backbone_name(cfg)
    rows = [model_row(name, model_dir, _read(out / "eval" / f"{name}.json"), backbone,
                      _read(out / "finetune" / name / "finetune_eval.json")) for name, model_dir in models.items()]
    report = {"name": cfg.name, "budget_images": cfg.budget.images, "batch_size": cfg.budget.batch_size,
              "backbone": backbone, "shards": indexes, "rows": rows,
              "protocol": f"k-NN: L2-normalised CLS features, cosine similarity, exp(sim/{cfg.eval.knn_temperature}) "
                          "votes (DINO); linear probe: lr grid selected on a held-out 10% of the train features"}
    if cfg.eval.finetune:
        report["protocol"] += (f"; fine-tuning: every backbone trained end to end on {cfg.eval.finetune_images:,} "
                               f"images with {cfg.eval.finetune_recipe}, top-1 on the test shards")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    md = [f"# SSL vs supervised: {cfg.name}", "",
          f"Every pretraining run saw the same budget: **{cfg.budget.images:,} images** (batch "
          f"{cfg.budget.batch_size}) on `{backbone}`.", "", markdown_table(rows), "", report["protocol"] + ".", "",
          "MAE features are known to be weak under k-NN and strong after fine-tuning (He et al. 2021; lightly's "
          "ImageNet benchmarks): read the k-NN and linear-probe columns together.", "",
          "![comparison](comparison.png)", "", "![retrieval](retrieval.png)", "", "![attention](attention.png)"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    figures.comparison_png(rows, {name: d for name, d in models.items() if d}, out / "comparison.png")
    figures.retrieval_png(out, [name for name in models], indexes["test"], out / "retrieval.png")
    figures.attention_png(models, indexes["test"], out / "attention.png")
    return report
