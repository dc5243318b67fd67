"""The comparison's numbers with their uncertainty: each row's runs (labelled draws × pretraining seeds) folded into
mean ± standard deviation (and a 95 % bootstrap interval over test images), and the paired differences between rows
that the report words its conclusions from."""
from ssl_vit.eval.uncertainty import bootstrap_accuracy, decode_hits, mean_std, paired_difference

METRICS = {"knn": ("knn_top1", "knn_hits", "k-NN"), "linear": ("linear_top1", "linear_hits", "probe")}
FLOORS = ("random_init", "raw_pixels")
N_BOOT = 2000


def fold_runs(runs: list[dict]) -> dict:
    """One table row from the runs of one model at one fraction: the first run's descriptive fields, then each
    score's mean, `_std` over runs, `_ci` (95 % bootstrap over test images of the run-averaged hits) and `_band`
    (what a plot draws: mean ± std over several runs, the interval for one)."""
    first = runs[0]
    row = {key: value for key, value in first.items() if key not in ("draw", "seed", "knn_hits", "linear_hits")}
    row["runs"] = len(runs)
    row["knn_k"] = "/".join(dict.fromkeys(str(r["knn_k"]) for r in runs if r.get("knn_k") is not None)) or None
    for key in ("train_seconds", "images_per_s", "knn_top5", "finetune_top1", "images_seen"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            row[key] = mean_std(values)[0] if key != "images_seen" else int(round(mean_std(values)[0]))
    if row.get("finetune_top1") is not None:
        row["finetune_top1_std"] = mean_std([r["finetune_top1"] for r in runs if r.get("finetune_top1") is not None])[1]
    for score, hits_key, _ in METRICS.values():
        values = [r[score] for r in runs if r.get(score) is not None]
        if not values:
            row[score] = None
            continue
        mean, std = mean_std(values)
        row[score], row[f"{score}_std"] = mean, std
        hits = [decode_hits(r[hits_key]) for r in runs if r.get(hits_key)]
        if hits and len({len(h) for h in hits}) == 1:
            ci = bootstrap_accuracy(sum(h.astype(float) for h in hits) / len(hits), n_boot=N_BOOT)
            row[f"{score}_ci"] = [ci.low, ci.high]
        row[f"{score}_band"] = ([mean - std, mean + std] if len(values) > 1 else row.get(f"{score}_ci", [mean, mean]))
    return row


def score_cell(row: dict, score: str) -> str:
    """'62.3 ± 1.2' (mean ± std over runs), '62.3 [59.3, 65.2]' (one run: its 95 % interval over test images)."""
    value = row.get(score)
    if value is None:
        return "–"
    if row.get("runs", 1) > 1:
        return f"{value:.1f} ± {row.get(f'{score}_std', 0.0):.1f}"
    ci = row.get(f"{score}_ci")
    return f"{value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{value:.1f}"


def _paired_hits(a: dict, b: dict):
    """[runs, N] hits of A and B on the same runs: every (draw, seed) either has; a row trained once (seed 0 only,
    e.g. raw pixels) stands for itself at every seed. None when a run is missing on one side."""
    keys = sorted(set(a) | set(b))
    pick = lambda runs, key: runs.get(key) if key in runs else runs.get((key[0], 0))
    pairs = [(pick(a, k), pick(b, k)) for k in keys]
    if any(x is None or y is None or len(x) != len(y) for x, y in pairs):
        return None
    return [x for x, _ in pairs], [y for _, y in pairs]


def comparison_pairs(names: list[str], labelled: list[str]) -> list[tuple[str, str]]:
    """(A, B) pairs worth a difference: every non-floor row against each labelled baseline and raw pixels (two
    labelled rows are not compared with each other)."""
    baselines = [*labelled, "raw_pixels"]
    return [(a, b) for a in names if a not in FLOORS for b in baselines
            if b in names and a != b and not (a in labelled and b in labelled)]


def differences(runs: list[dict], fraction: float, labelled: list[str]) -> list[dict]:
    """Paired bootstrap differences A − B at `fraction` for each metric and comparison pair."""
    at = [r for r in runs if r["fraction"] == fraction]
    names = list(dict.fromkeys(r["model"] for r in at))
    out = []
    for metric, (_, hits_key, label) in METRICS.items():
        by_name = {n: {(r["draw"], r["seed"]): decode_hits(r[hits_key]) for r in at
                       if r["model"] == n and r.get(hits_key)} for n in names}
        for a, b in comparison_pairs(names, labelled):
            paired = _paired_hits(by_name[a], by_name[b]) if by_name[a] and by_name[b] else None
            if paired is None:
                continue
            est = paired_difference(*paired, n_boot=N_BOOT)
            out.append({"fraction": fraction, "metric": metric, "a": a, "b": b, "difference": est.value,
                        "std": est.std, "ci": [est.low, est.high], "runs": len(paired[0]),
                        "significant": est.excludes_zero(), "text": difference_text(a, b, label, fraction, est)})
    return out


def difference_text(a: str, b: str, label: str, fraction: float, est) -> str:
    """'mae + probe beats supervised at 10 %: +3.1 ± 1.2 (95 %: [+0.8, +5.4])', or 'within the uncertainty'."""
    where = f"at {fraction:.0%}".replace("%", " %")
    if not est.excludes_zero():
        return (f"{a} + {label} vs {b} {where}: {est.value:+.1f} ± {est.std:.1f} (95 %: [{est.low:+.1f}, "
                f"{est.high:+.1f}]): no difference beyond the uncertainty")
    if est.value < 0:
        a, b, value, low, high = b, a, -est.value, -est.high, -est.low
    else:
        value, low, high = est.value, est.low, est.high
    return f"{a} + {label} beats {b} {where}: +{value:.1f} ± {est.std:.1f} (95 %: [{low:+.1f}, {high:+.1f}])"


def goal_verdict(diffs: list[dict], fractions: list[float], ssl: list[str], labelled: list[str]) -> list[str]:
    """The SSL goal, fraction by fraction, from the paired differences only: below 100 % the better of the SSL
    methods (k-NN or probe) above the labelled baseline (same evaluation) beyond the uncertainty; at 100 % SSL
    k-NN above raw pixels beyond the uncertainty."""
    lines = []
    for f in fractions:
        if f < 1:
            cands = [d for d in diffs if d["fraction"] == f and d["a"] in ssl and d["b"] in labelled]
            what = f"SSL above {'/'.join(labelled) or 'the labelled baseline'} at {f:.0%}"
        else:
            cands = [d for d in diffs if d["fraction"] == f and d["a"] in ssl and d["b"] == "raw_pixels"
                     and d["metric"] == "knn"]
            what = f"SSL k-NN above raw pixels at {f:.0%}"
        if not cands:
            continue
        best = max(cands, key=lambda d: d["ci"][0])
        met = best["ci"][0] > 0
        lines.append(f"{what.replace('%', ' %')}: {'met' if met else 'not met'} (best: {best['a']} + "
                     f"{METRICS[best['metric']][2]} {best['difference']:+.1f} ± {best['std']:.1f}, 95 %: "
                     f"[{best['ci'][0]:+.1f}, {best['ci'][1]:+.1f}])")
    return lines
