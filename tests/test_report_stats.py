"""The comparison report's uncertainty: runs folded into mean ± std / intervals, differences paired by draw and seed."""
import numpy as np
import pytest

from ssl_vit.eval.uncertainty import encode_hits
from ssl_vit.pipelines.report_stats import differences, fold_runs, goal_verdict, score_cell

N = 1000


def run(model: str, hits: np.ndarray, draw: int, seed: int = 0, fraction: float = 0.1) -> dict:
    return {"fraction": fraction, "model": model, "draw": draw, "seed": seed, "knn_k": "20",
            "knn_top1": hits.mean() * 100, "knn_hits": encode_hits(hits)}


def draws_where_a_leads(lead: int, draws: int = 3, seed: int = 0) -> list[dict]:
    """B right on a different random half of the test images in each draw; A right wherever B is, plus `lead`
    more images: +lead/10 points in every draw, far smaller than the draw-to-draw spread of either."""
    rng = np.random.default_rng(seed)
    out = []
    for d in range(draws):
        b = rng.random(N) < 0.3 + 0.1 * d
        a = b.copy()
        a[np.flatnonzero(~b)[:lead]] = True
        out += [run("mae", a, d), run("supervised", b, d)]
    return out


def test_a_small_lead_in_every_draw_is_a_difference_when_paired():
    diffs = differences(draws_where_a_leads(30), 0.1, ["supervised"])
    (d,) = diffs
    assert (d["a"], d["b"], d["metric"], d["runs"]) == ("mae", "supervised", "knn", 3)
    assert d["difference"] == pytest.approx(3.0) and d["significant"] and d["std"] < 0.6
    assert d["text"].startswith("mae + k-NN beats supervised at 10 %: +3.0 ± ")
    # the rows' own spread over draws is far larger than the difference
    rows = {r["model"]: fold_runs([x for x in draws_where_a_leads(30) if x["model"] == r["model"]])
            for r in draws_where_a_leads(30)}
    assert rows["mae"]["knn_top1_std"] > 5 * d["std"] and rows["mae"]["runs"] == 3
    assert score_cell(rows["mae"], "knn_top1") == f"{rows['mae']['knn_top1']:.1f} ± {rows['mae']['knn_top1_std']:.1f}"


def test_no_lead_is_worded_as_within_the_uncertainty_and_a_lost_one_flips():
    (same,) = differences(draws_where_a_leads(0), 0.1, ["supervised"])
    assert not same["significant"] and "no difference beyond the uncertainty" in same["text"]
    runs = [{**r, "model": {"mae": "supervised", "supervised": "mae"}[r["model"]]} for r in draws_where_a_leads(30)]
    (lost,) = differences(runs, 0.1, ["supervised"])
    assert lost["difference"] == pytest.approx(-3.0) and lost["text"].startswith("supervised + k-NN beats mae")
    verdict = goal_verdict([lost], [0.1], ["mae"], ["supervised"])
    assert verdict[0].startswith("SSL above supervised at 10 %: not met")
    assert goal_verdict(differences(draws_where_a_leads(30), 0.1, ["supervised"]), [0.1], ["mae"],
                        ["supervised"])[0].startswith("SSL above supervised at 10 %: met")


def test_a_row_trained_once_pairs_with_every_seed_and_one_run_gets_an_interval():
    rng = np.random.default_rng(1)
    pixels = rng.random(N) < 0.35
    runs = [run("raw_pixels", pixels, 0, fraction=1.0)]
    for s in range(3):
        runs.append(run("mae", (rng.random(N) < 0.1) | pixels, 0, s, fraction=1.0))
    (d,) = differences(runs, 1.0, [])
    assert d["runs"] == 3 and d["significant"] and d["b"] == "raw_pixels"
    one = fold_runs([runs[0]])
    low, high = one["knn_top1_ci"]
    assert low < one["knn_top1"] < high and one["knn_top1_band"] == [low, high]
    assert score_cell(one, "knn_top1") == f"{one['knn_top1']:.1f} [{low:.1f}, {high:.1f}]"
