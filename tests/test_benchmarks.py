"""Every benchmark in tools/ runs at a tiny size and reports its ratios, so that bench/results/ can be re-measured
with the code as it is (tools/bench_data.py has its own test)."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args) -> dict:
    result = subprocess.run([sys.executable, str(ROOT / "tools" / script), *map(str, args)], capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def assert_ratio(value) -> None:
    assert isinstance(value, float) and math.isfinite(value) and value > 0, value


def test_bench_train_reports_a_ratio_per_method(train_shards):
    out = run_bench("bench_train.py", "--steps", 1, "--rounds", 1, "--batch", 8, "--depth", 1, "--patch", 8,
                    "--index", train_shards)
    assert set(out["methods"]) == {"mae", "dino", "supervised"}
    for method in out["methods"].values():
        assert_ratio(method["ratio"])


def test_bench_eval_reports_knn_over_faiss():
    out = run_bench("bench_eval.py", "--queries", 200, "--bank", 2000, "--dim", 16, "--classes", 10, "--k", 10, 20,
                    "--threads", 1)
    assert_ratio(out["ratio_knn_total_over_faiss_search"])
    assert_ratio(out["ratio_knn_total_over_faiss_total"])
    assert set(out["variants"]) == {"faiss_raw", "knn", "torch_matmul_topk"}
