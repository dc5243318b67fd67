"""Retrieval indexes: build/save/load/search per kind, hand-checked recall@k and mAP, errors, CLI."""
import json

import faiss
import numpy as np
import pytest

from ssl_vit.cli import main as cli_main
from ssl_vit.commands.eval import format_neighbours
from ssl_vit.errors import SslVitError
from ssl_vit.eval.feature_cache import save_features
from ssl_vit.eval.retrieval import (KINDS, RetrievalIndex, build_index, compare_index_kinds, default_nlist,
                                    default_pq_m, evaluate, mean_average_precision)



def clustered(seed=0, n=1200, dim=16, classes=6):
    rng = np.random.default_rng(seed)
    centres = 2.0 * rng.normal(size=(classes, dim))
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y


OPTIONS = {"flat": {}, "ivf": {}, "hnsw": {}, "ivfpq": {"nbits": 6}}


@pytest.mark.parametrize("kind", KINDS)
def test_build_save_load_search(kind, tmp_path):
    x, y = clustered()
    keys = [f"img{i:04d}" for i in range(len(x))]
    index = RetrievalIndex.build(x, keys, y, kind, **OPTIONS[kind])
    scores, ids = index.search(x[:20], 5)
    assert scores.shape == ids.shape == (20, 5) and (np.diff(scores, axis=1) <= 1e-6).all()
    index.save(tmp_path / "ix")
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == ["index.faiss", "keys.npy", "labels.npy", "meta.json"]
    meta = json.loads((tmp_path / "ix" / "meta.json").read_text())
    assert meta["kind"] == kind and meta["dim"] == 16 and meta["metric"] == "cosine" and meta["num"] == len(x)
    loaded = RetrievalIndex.load(tmp_path / "ix")
    scores2, ids2 = loaded.search(x[:20], 5)
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_allclose(scores2, scores, rtol=1e-6)
    assert loaded.lookup(ids2[0, :2]) == [(keys[i], int(y[i])) for i in ids2[0, :2]]
    assert loaded.params == index.params
    if kind in ("flat", "hnsw"):  # exact or near-exact: every item finds itself first
        np.testing.assert_array_equal(ids[:, 0], np.arange(20))
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    if kind in ("flat", "ivf", "hnsw"):  # the same-class neighbours dominate on this easy data
        assert (y[ids] == y[:20, None]).mean() > 0.9


def test_build_index_defaults_and_params():
    assert default_nlist(100_000) == 1265 and default_nlist(10_000) == 256  # 4·sqrt(N), then N // 39
    assert default_nlist(1_000) == 25 and default_nlist(20) == 1
    assert default_pq_m(384) == 64 and default_pq_m(64) == 16 and default_pq_m(30) == 6 and default_pq_m(7) == 1
    x, _ = clustered(n=2000)
    ivf = build_index(x, "ivf", nlist=20, nprobe=3)
    assert isinstance(ivf, faiss.IndexIVFFlat) and ivf.nlist == 20 and ivf.nprobe == 3 and ivf.ntotal == 2000
    pq = build_index(x, "ivfpq", m=4, nbits=5)
    assert pq.pq.M == 4 and pq.pq.nbits == 5 and pq.nlist == default_nlist(2000)
    l2 = build_index(x, "flat", metric="l2")
    d, i = l2.search(x[:1], 1)
    assert i[0, 0] == 0 and d[0, 0] == pytest.approx(0.0, abs=1e-4)


def hand_index():
    """Unit vectors at these angles (degrees), labels A=0 / B=1. Cosine ranking = angular distance ranking."""
    angles = {"i0": (10, 1), "i1": (22, 0), "i2": (30, 1), "i3": (45, 0), "i4": (180, 0), "i5": (170, 1)}
    vec = lambda deg: [np.cos(np.radians(deg)), np.sin(np.radians(deg))]  # noqa: E731
    x = np.array([vec(a) for a, _ in angles.values()], np.float32)
    return RetrievalIndex.build(x, list(angles), [lab for _, lab in angles.values()], "flat"), vec


def test_recall_and_map_hand_checked():
    index, vec = hand_index()
    # q0 at 0 deg, label A: ranking i0(B) i1(A) i2(B) i3(A) ... -> top3 relevance [0, 1, 0]; A has R=3 items
    #   recall@1 = 0, recall@3 = 1, AP@3 = (precision@2 = 1/2) / min(3, 3) = 1/6
    # q1 at 172 deg, label B: ranking i5(B) i4(A) i3(A) ... -> [1, 0, 0]; B has R=3
    #   recall@1 = 1, recall@3 = 1, AP@3 = (precision@1 = 1) / 3 = 1/3
    queries = np.array([vec(0), vec(172)], np.float32)
    r = evaluate(index, queries, [0, 1], ks=(1, 3))
    assert r["recall@k"] == {"1": 0.5, "3": 1.0}
    assert r["mAP"] == pytest.approx((1 / 6 + 1 / 3) / 2) and r["mAP_at"] == 3 and r["num_queries"] == 2
    assert r["queries_per_s"] > 0


def test_recall_and_map_excluding_self_hand_checked():
    index, vec = hand_index()
    # query = item i1 (22 deg, A) itself; without it the ranking is i2(B, 8) i0(B, 12) i3(A, 23) -> [0, 0, 1];
    #   A items other than itself: R = 2 -> AP@3 = (precision@3 = 1/3) / min(3, 2) = 1/6; recall@1 0, @3 1
    # query = i5 (170 deg, B): i4(A, 10) i3(A, 125) i2(B, 140) -> [0, 0, 1]; R = 2 (i0, i2) -> AP = 1/6
    queries = np.array([vec(22), vec(170)], np.float32)
    r = evaluate(index, queries, [0, 1], ks=(1, 3), exclude_self_keys=["i1", "i5"])
    assert r["recall@k"] == {"1": 0.0, "3": 1.0}
    assert r["mAP"] == pytest.approx(1 / 6)
    kept = evaluate(index, queries, [0, 1], ks=(1, 3))  # self kept: each query's first hit is itself
    assert kept["recall@k"]["1"] == 1.0


def test_mean_average_precision_reference():
    relevant = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]], bool)
    # row0: (1 + 2/3) / min(4, 2); row1: R=0 -> left out; row2: (1/2 + 2/3 + 3/4) / min(4, 5)
    expected = ((1 + 2 / 3) / 2 + (1 / 2 + 2 / 3 + 3 / 4) / 4) / 2
    assert mean_average_precision(relevant, [2, 0, 5]) == pytest.approx(expected)


def test_compare_index_kinds():
    x, y = clustered(1, n=1500)
    r = compare_index_kinds(x, y, ("flat", "hnsw", "ivf", "ivfpq"), k=10, num_queries=200, nbits=6)
    assert list(r["kinds"]) == ["flat", "hnsw", "ivf", "ivfpq"] and r["num_queries"] == 200
    assert r["kinds"]["flat"]["recall_vs_flat"] == 1.0
    assert r["kinds"]["hnsw"]["recall_vs_flat"] > 0.95
    assert 0.0 < r["kinds"]["ivfpq"]["recall_vs_flat"] < 1.0  # compressed codes lose some neighbours
    for row in r["kinds"].values():
        assert row["queries_per_s"] > 0 and 0.9 < row["label_recall@10"] <= 1.0


def test_errors(tmp_path):
    x, y = clustered(n=500, dim=12)
    with pytest.raises(SslVitError, match="m=5 must divide the feature dim 12"):
        build_index(x, "ivfpq", m=5)
    with pytest.raises(SslVitError, match="needs at least 256 vectors"):
        build_index(x[:100], "ivfpq", m=4)
    with pytest.raises(SslVitError, match="index kind must be one of"):
        build_index(x, "lsh")
    with pytest.raises(SslVitError, match="nlist=900"):
        build_index(x, "ivf", nlist=900)
    with pytest.raises(SslVitError, match="empty evaluation set"):
        RetrievalIndex.build(x[:0], [], [], "flat")
    with pytest.raises(SslVitError, match="unknown index option"):
        RetrievalIndex.build(x, None, y, "flat", nprob=3)
    index = RetrievalIndex.build(x, None, y, "hnsw")
    index.save(tmp_path / "ix")
    loaded = RetrievalIndex.load(tmp_path / "ix")
    with pytest.raises(SslVitError, match="query features have dim 8 but the index was built with dim 12"):
        loaded.search(x[:3, :8], 5)
    with pytest.raises(SslVitError, match="k=501"):
        loaded.search(x[:3], 501)
    with pytest.raises(SslVitError, match="query labels missing"):
        evaluate(loaded, x[:3], [0, -1, 2])
    with pytest.raises(SslVitError, match="has no labels"):
        evaluate(RetrievalIndex.build(x, kind="flat"), x[:3], [0, 1, 2])
    (tmp_path / "ix" / "keys.npy").unlink()
    with pytest.raises(SslVitError, match="missing keys.npy$"):
        RetrievalIndex.load(tmp_path / "ix")
    (tmp_path / "ix" / "ids.json").write_text("{}")  # an index from before keys.npy
    with pytest.raises(SslVitError, match="missing keys.npy .*older ssl_vit with ids.json: rebuild it"):
        RetrievalIndex.load(tmp_path / "ix")
    (tmp_path / "bad").mkdir()
    for name in ("index.faiss", "meta.json", "keys.npy", "labels.npy"):
        (tmp_path / "bad" / name).write_text("{}")
    with pytest.raises(SslVitError, match="unreadable"):
        RetrievalIndex.load(tmp_path / "bad")


def test_format_neighbours():
    index, vec = hand_index()
    scores, ids = index.search(np.array([vec(0)], np.float32), 2)
    text = format_neighbours(index, scores[0], ids[0], query="q")
    lines = text.splitlines()
    assert lines[0] == "query q:" and lines[2].split() == ["1", f"{np.cos(np.radians(10)):.4f}", "1", "i0"]
    assert lines[3].split()[2:] == ["0", "i1"] and len(lines) == 4


def test_cli_index_build_eval_query_compare(tmp_path, capsys):
    x, y = clustered(2, n=600)
    keys = [f"k{i:04d}" for i in range(len(x))]
    save_features(tmp_path / "feats", x, y, keys, {"backbone": "test", "pooling": "cls"})
    assert cli_main(["index", "build", "--features", str(tmp_path / "feats"), "--kind", "hnsw",
                     "--out", str(tmp_path / "ix")]) == 0
    assert cli_main(["index", "eval", "--index", str(tmp_path / "ix"), "--features", str(tmp_path / "feats"),
                     "--k", "1", "5", "--out", str(tmp_path / "eval.json")]) == 0
    saved = json.loads((tmp_path / "eval.json").read_text())
    expected = evaluate(RetrievalIndex.load(tmp_path / "ix"), x, y, ks=(1, 5), exclude_self_keys=keys)
    assert saved["exclude_self"] is True and saved["recall@k"] == expected["recall@k"]
    assert saved["mAP"] == pytest.approx(expected["mAP"])
    capsys.readouterr()
    assert cli_main(["index", "query", "--index", str(tmp_path / "ix"), "--features", str(tmp_path / "feats"),
                     "--key", "k0007", "--k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "query k0007:" and out[2].split()[2:] == [str(y[7]), "k0007"]
    assert cli_main(["index", "compare", "--features", str(tmp_path / "feats"), "--kinds", "flat", "ivf",
                     "--num-queries", "50"]) == 0
    assert "recall vs flat" in capsys.readouterr().out
    assert cli_main(["index", "eval", "--index", str(tmp_path / "none"), "--features",
                     str(tmp_path / "feats")]) == 2
    assert "error: retrieval index" in capsys.readouterr().err
    assert cli_main(["index", "query", "--index", str(tmp_path / "ix"), "--features", str(tmp_path / "feats"),
                     "--key", "nope"]) == 2
