"""The report's figures on a tiny real setup: CIFAR-10 test shards, MAE and DINO trained for 2 steps through the CLI,
real feature caches; neighbours and attention checked against references written here."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLED, ROOT
from PIL import Image

from ssl_vit.pipelines import figures
from ssl_vit.pipelines.attention import last_block_cls_attention, load_mae_method, mae_panels
from ssl_vit.errors import SslVitError

TINY = ["train.steps=2", "train.epochs=0", "train.log_every=1", "model.depth=2", "model.embed_dim=64",
        "model.num_heads=2", "data.batch_size=16", "data.num_workers=0", "train.progress=false"]
RECIPES = {"mae": ["mae.decoder_depth=1", "mae.decoder_dim=64", "mae.decoder_heads=2"],
           "dino": ["dino.out_dim=256", "dino.hidden_dim=64", "dino.bottleneck_dim=32", "views.num_local=2"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """out/ like the compare pipeline's: models/{mae,dino}, features/{mae,dino}/test, plus the test index."""
    from ssl_vit.cli import main
    from ssl_vit.data.writer import write_shards
    from ssl_vit.loading import load_backbone
    from ssl_vit.eval.features import extract_features

    out = tmp_path_factory.mktemp("figures")
    prefix = out / "shards" / "test"
    write_shards(str(BUNDLED / "test.tar.gz"), str(prefix), max_count=500, workers=1, progress=False)
    index = f"{prefix}-index.json"
    models = {}
    for method, extra in RECIPES.items():
        torch.manual_seed(0)
        models[method] = out / "models" / method
        code = main(["pretrain", "--recipe", str(ROOT / "recipes" / f"{method}_vit_tiny_cifar10.yaml"),
                     f"data.train={index}", f"train.out_dir={models[method]}", *TINY, *extra])
        assert code in (0, None)
        model, _ = load_backbone(models[method])
        extract_features(model, index, out / "features" / method / "test", image_size=32, resize=32,
                         batch_size=100, num_workers=0, progress=False)
    return out, index, models


def _png(path: Path, min_w: int, min_h: int) -> tuple[int, int]:
    assert path.is_file()
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        w, h = img.size
    assert min_w <= w <= 4000 and min_h <= h <= 6000, (w, h)
    return w, h


def test_comparison_png_and_normalised_loss_curves(setup, tmp_path):
    out, _, models = setup
    rows = [{"model": "mae", "knn_top1": 21.5, "knn_top5": 60.0, "linear_top1": 25.0},
            {"model": "dino", "knn_top1": 18.0, "knn_top5": 55.2, "linear_top1": None},
            {"model": "raw_pixels", "knn_top1": 30.1, "knn_top5": 70.3, "linear_top1": None}]
    no_log = tmp_path / "random_init"
    no_log.mkdir()
    figures.comparison_png(rows, {**models, "random_init": no_log}, tmp_path / "comparison.png")
    w, h = _png(tmp_path / "comparison.png", 1000, 400)
    assert w > h

    for method in models:
        log = [json.loads(line) for line in (models[method] / "log.jsonl").read_text().splitlines()]
        curve = figures.loss_curve(models[method])
        assert [e["step"] for e in log] == [1, 2]
        np.testing.assert_allclose(curve["loss"], [e["loss"] / log[0]["loss"] for e in log], rtol=1e-12)
        np.testing.assert_allclose(curve["images"], [16, 32])  # step × batch size
    assert figures.loss_curve(no_log) is None

    figures.comparison_png([], {}, tmp_path / "empty.png")  # nothing to show: notes, not a crash
    _png(tmp_path / "empty.png", 500, 200)


def test_pick_queries_takes_first_key_of_each_class():
    keys = ["s05", "s01", "s03", "s02", "s04", "s00"]
    labels = [2, 1, 1, 0, 2, 1]
    assert figures.pick_queries(keys, labels, 3) == [5, 3, 4]  # s00 (1), s02 (0), s04 (2)
    assert figures.pick_queries(keys, labels, 2) == [5, 3]
    assert figures.pick_queries(keys, [-1] * 6, 2) == [5, 1]  # unlabelled: first keys in order


def test_retrieval_neighbours_equal_brute_force_cosine(setup, tmp_path):
    from ssl_vit.eval.feature_cache import load_features

    out, index, _ = setup
    fs = load_features(out / "features" / "dino" / "test")
    rows = figures.pick_queries(fs.keys, fs.labels, 4)
    assert len({int(fs.labels[r]) for r in rows}) == 4
    ids, scores = figures.nearest_neighbours(fs.features, rows, 5)

    x = np.asarray(fs.features, dtype=np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x[rows] @ x.T  # [Q, N]
    sims[np.arange(len(rows)), rows] = -np.inf
    ref = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(ids, ref)  # no near-ties among these (closest gap 1e-5 ≫ float32 error)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, ref, axis=1), atol=1e-5)

    figures.retrieval_png(out, ["mae", "dino", "raw_pixels"], index, tmp_path / "retrieval.png")
    w, h = _png(tmp_path / "retrieval.png", 500, 1000)
    assert h > w  # 2 models × 4 query rows, 6 columns


def test_retrieval_bad_input(setup, tmp_path):
    out, index, _ = setup
    with pytest.raises(SslVitError, match="k=1000"):
        figures.retrieval_png(out, ["dino"], index, tmp_path / "r.png", k=1000)
    with pytest.raises(SslVitError, match="n_queries"):
        figures.retrieval_png(out, ["dino"], index, tmp_path / "r.png", n_queries=0)
    figures.retrieval_png(out, ["nothing_here"], index, tmp_path / "none.png")  # no features: a note
    _png(tmp_path / "none.png", 300, 100)


def test_cls_attention_matches_timm_softmax(setup):
    """Reference: timm's own non-fused path, whose softmax output passes through `attn_drop`."""
    from ssl_vit.loading import load_backbone

    _, _, models = setup
    model, _ = load_backbone(models["dino"])
    attn = model.blocks[-1].attn
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    ours = last_block_cls_attention(model, images)  # [B, H, 8, 8]
    assert ours.shape == (3, 2, 8, 8)

    seen = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, args, output: seen.__setitem__("a", output))
    attn.fused_attn = False
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        attn.fused_attn = True
        handle.remove()
    ref = seen["a"][:, :, 0, model.num_prefix_tokens:].reshape(3, 2, 8, 8)  # [B, H, N, N] → CLS row
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    assert ours.sum(dim=(2, 3)).max() < 1.0  # the CLS and prefix tokens take the rest of the softmax mass

    with pytest.raises(SslVitError, match="not a timm ViT"):
        last_block_cls_attention(torch.nn.Linear(3, 3), images)


def test_mae_panels_keep_visible_pixels(setup):
    _, index, models = setup
    imgs = list(figures.load_images(index, ["s000000000", "s000000001"]).values())
    masked, recon, ratio = mae_panels(models["mae"], imgs)
    assert masked.shape == recon.shape == (2, 32, 32, 3)
    assert ratio == pytest.approx(0.75)
    original = torch.from_numpy(np.stack([np.asarray(i) for i in imgs])).float() / 255  # [2, 32, 32, 3]
    visible = (masked != 0.5).any(dim=-1)  # grey (0.5) only where patches were removed
    assert 0.2 < visible.float().mean() < 0.3
    torch.testing.assert_close(recon[visible], original[visible], atol=2e-3, rtol=0)
    torch.testing.assert_close(masked[visible], original[visible], atol=2e-3, rtol=0)


def test_attention_png_full_and_with_missing_models(setup, tmp_path):
    out, index, models = setup
    figures.attention_png(models, index, tmp_path / "attention.png")
    _png(tmp_path / "attention.png", 600, 700)

    figures.attention_png({"mae": models["mae"]}, index, tmp_path / "no_dino.png", n_images=2)
    _png(tmp_path / "no_dino.png", 600, 300)
    broken = tmp_path / "broken_mae"
    shutil.copytree(models["mae"], broken, ignore=shutil.ignore_patterns("ckpt-*"))
    figures.attention_png({"dino": models["dino"], "mae": broken}, index, tmp_path / "broken.png", n_images=2)
    _png(tmp_path / "broken.png", 600, 300)
    with pytest.raises(SslVitError, match="names a missing checkpoint"):
        load_mae_method(broken)
    with pytest.raises(SslVitError, match="n_images"):
        figures.attention_png(models, index, tmp_path / "x.png", n_images=0)
