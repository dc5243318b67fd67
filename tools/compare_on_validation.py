"""Paired k-NN differences on the validation split between models of finished comparison runs: how a change to a
recipe (a lever) is kept or dropped without reading the test set.

Each model is RUN_FOLDER:ROW (e.g. runs/long300k:dino), ROW a features folder of a model trained once for every draw
(mae, dino, random_init, raw_pixels; not a supervised per-draw run); the first is the reference. For every fraction and labelled
draw of the reference run (labels/**/subsets.json, the same for every run carved from the same shards), the k-NN of
each model's validation features against its training features restricted to the draw's labelled keys, at every k of
the grid; the reported k is the one with the best validation top-1 for that model (as the comparison chooses it), and
the difference against the reference is a paired bootstrap over the same validation images (draws pooled). A change
counts when its 95 % interval excludes zero. The test features are never opened.

    python tools/compare_on_validation.py runs/long300k:dino runs/long300k_local6:dino runs/long300k:raw_pixels
"""
import argparse
import json
from pathlib import Path

import numpy as np

from ssl_vit.eval.feature_cache import load_features
from ssl_vit.eval.knn import knn_classify
from ssl_vit.eval.uncertainty import bootstrap_accuracy, paired_difference



def draws(run: Path) -> dict[float, list[list[str]]]:
    """{fraction: [labelled keys of each draw]}; 1.0: every training key (one draw)."""
    out: dict[float, list[list[str]]] = {}
    for path in sorted(run.glob("labels/**/subsets.json")):
        for fraction, subset in json.loads(path.read_text())["fractions"].items():
            out.setdefault(float(fraction), []).append(subset["keys"])
    out[1.0] = [None]
    return dict(sorted(out.items()))


def hits(model: str, fraction_draws: list, grid: list[int]) -> tuple[np.ndarray, int]:
    """Per validation image and draw (concatenated), whether the k-NN is right at the model's best k."""
    run, row = model.rsplit(":", 1)
    train, val = (load_features(Path(run) / "features" / row / split, mmap=False) for split in ("train", "val"))
    keys = np.asarray(train.keys)
    per_draw = []
    for labelled in fraction_draws:
        rows = np.arange(len(keys)) if labelled is None else np.flatnonzero(np.isin(keys, labelled))
        ks = [k for k in grid if k <= len(rows)]
        result = knn_classify(np.asarray(train.features)[rows], train.labels[rows], np.asarray(val.features),
                              val.labels, ks=ks, return_predictions=True)
        per_draw.append({k: result["predictions"][str(k)] == val.labels for k in ks})
    ks = per_draw[0].keys()
    best = max(ks, key=lambda k: (sum(d[k].mean() for d in per_draw), -k))
    return np.concatenate([d[best] for d in per_draw]), best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="RUN_FOLDER:ROW; the first is the reference")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200], help="the k grid (eval.knn_k)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    reference_run = Path(args.models[0].rsplit(":", 1)[0])
    report = {"models": args.models, "ks": args.ks, "fractions": {}}
    for fraction, fraction_draws in draws(reference_run).items():
        scored = {m: hits(m, fraction_draws, args.ks) for m in args.models}
        base = scored[args.models[0]][0].astype(float)
        rows = {}
        for model, (correct, k) in scored.items():
            acc = bootstrap_accuracy(correct)
            row = {"k": k, "val_top1": round(acc.value, 2), "draws": len(fraction_draws)}
            if model != args.models[0]:
                diff = paired_difference(correct.astype(float), base)
                row["minus_reference"] = {"points": round(diff.value, 2), "std": round(diff.std, 2),
                                          "ci95": [round(diff.low, 2), round(diff.high, 2)],
                                          "beyond_uncertainty": diff.excludes_zero()}
            rows[model] = row
        report["fractions"][str(fraction)] = rows
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
