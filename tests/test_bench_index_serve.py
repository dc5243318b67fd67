"""tools/bench_index.py and tools/bench_serve.py run at a tiny size and report their ratios (the style of
tests/test_benchmarks.py), so that bench/results/ can be re-measured with the code as it is."""
import pytest

from test_benchmarks import assert_ratio, run_bench  # tests/ is on the path (pytest's rootdir conftest)


@pytest.mark.slow
def test_bench_index_reports_ours_over_the_plain_faiss_build():
    out = run_bench("bench_index.py", "--n", 3000, "--dim", 16, "--nlist", 8, "--m", 4, "--queries", 50,
                    "--max-memory", "60KB", "--threads", 1)
    (run,) = out["runs"]
    for name in ("ratio_build_s", "ratio_peak_rss", "ratio_build_rss", "peak_rss_over_features"):
        assert_ratio(run[name])
    assert run["ours"]["ntotal"] == run["reference"]["ntotal"] == 3000
    assert run["ours"]["train_size"] == run["train_size"] == 3000  # 64 x 2^8 PQ centroids > N: every row
    auto = run["auto"]
    assert auto["kind"] in ("ivf", "ivfpq", "hnsw") and auto["bytes_estimated"] <= 60_000  # flat is 192 kB
    assert 0 < auto["final"]["recall"] <= 1 and auto["queries_per_s"] > 0


@pytest.mark.slow
def test_bench_serve_reports_served_over_in_process():
    out = run_bench("bench_serve.py", "--image-size", 32, 224, "--samples", 12, "--requests", 6, "--concurrency", 1,
                    2, "--rounds", 1, "--threads", 1)
    assert set(out["sizes"]) == {"32", "224"}
    for size in out["sizes"].values():
        for level in ("concurrency=1", "concurrency=2"):
            for kind in ("upload", "key"):
                row = size["served_best"][level][kind]
                assert row["requests"] == 6 and 0 < row["p50_ms"] <= row["p99_ms"]
                assert row["cpu_ms_per_query"] >= 0  # in clock ticks: 0 for a few quick queries
        for name in ("ratio_upload_top_concurrency_over_in_process_batched",
                     "ratio_upload_concurrency_1_over_in_process_one_at_a_time",
                     "ratio_key_top_concurrency_over_in_process"):
            assert_ratio(size[name])
        assert size["meets_target"] == (size["ratio_upload_top_concurrency_over_in_process_batched"] >= 0.8)
