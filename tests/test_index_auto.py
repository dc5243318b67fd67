"""`index build --kind auto --max-memory M --target-recall R`: the choice fits the budget, reaches the recall on
held-out queries (checked again on the built index against exact search over every row) and is recorded."""
import json

import numpy as np
import pytest

from ssl_vit.cli import main
from ssl_vit.eval.feature_cache import save_features
from ssl_vit.eval.index_auto import estimated_bytes, parse_size


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, 32))
    x = (centres[rng.integers(0, 30, 6000)] + 0.3 * rng.normal(size=(6000, 32))).astype(np.float32)
    folder = tmp_path_factory.mktemp("auto") / "c"
    save_features(folder, x, np.zeros(len(x), np.int64), [f"k{i:05d}" for i in range(len(x))], {"pooling": "cls"})
    return folder


def build_auto(cache, out, *options) -> dict:
    assert main(["index", "build", "--features", str(cache), "--out", str(out), "--kind", "auto", *options]) == 0
    return json.loads((out / "meta.json").read_text())


def test_flat_when_it_fits_and_is_fast_enough(cache, tmp_path):
    meta = build_auto(cache, tmp_path / "ix", "--max-memory", "2GB", "--max-latency-ms", "1000")
    auto = meta["source"]["auto"]
    assert meta["kind"] == auto["chosen"]["kind"] == "flat" and auto["final"]["recall"] == 1.0
    assert auto["max_memory"] == 2 * 10 ** 9 and auto["final"]["exact_over"] == 6000


def test_a_budget_below_flat_gets_a_compressed_index_that_reaches_the_recall(cache, tmp_path):
    flat_bytes = 6000 * 32 * 4
    meta = build_auto(cache, tmp_path / "ix", "--max-memory", str(flat_bytes // 2), "--target-recall", "0.9",
                      "--max-latency-ms", "0")
    auto = meta["source"]["auto"]
    chosen = auto["chosen"]
    assert meta["kind"] == chosen["kind"] != "flat" and chosen["reached_target"]
    assert chosen["bytes"] <= flat_bytes // 2 < next(c["bytes"] for c in auto["candidates"] if c["kind"] == "flat")
    assert chosen["bytes"] == estimated_bytes(chosen["kind"], 6000, 32, chosen["params"])
    assert chosen["recall"] >= 0.9 and auto["final"]["recall"] >= 0.85  # on the tuning base, then at N
    assert {k: meta["params"][k] for k in chosen["params"]} == chosen["params"]


def test_impossible_budgets_and_bad_sizes_are_one_line_errors(cache, tmp_path, capsys):
    capsys.readouterr()
    assert main(["index", "build", "--features", str(cache), "--out", str(tmp_path / "x"), "--kind", "auto",
                 "--max-memory", "1KB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no index of 6000 x 32 fits --max-memory") and len(err.strip().splitlines()) == 1
    assert parse_size("2GB") == 2 * 10 ** 9 and parse_size("1.5 GiB") == 3 * 2 ** 29 and parse_size("512") == 512
    assert main(["index", "build", "--features", str(cache), "--out", str(tmp_path / "x"), "--kind", "auto",
                 "--max-memory", "lots"]) == 2
    assert "expected a size such as 2GB" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
