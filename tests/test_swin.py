"""Swin as a backbone: DINO (EsViT-style, the head on the average-pooled final features), supervised training and
fine-tuning, feature extraction with the pooling a Swin has, k-NN, probe and an index; MAE refused in one line."""
import json
from pathlib import Path

import pytest
import torch

from ssl_vit.cli import main
from ssl_vit.config import load_recipe
from ssl_vit.eval.features import pooled_features
from ssl_vit.loading import load_backbone
from ssl_vit.methods import build_method

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "dino_swin_tiny_cifar10.yaml")
SUPERVISED = str(ROOT / "recipes" / "supervised_vit_tiny_cifar10.yaml")
SWIN = ["model.name=swin_tiny_patch4_window7_224", "model.patch_size=4", "model.embed_dim=32", "model.depth=0",
        "model.kwargs={depths: [1, 1], num_heads: [2, 4], window_size: 4}"]
QUICK = ["train.progress=false", "train.log_every=1", "data.num_workers=1", "data.batch_size=16", "train.epochs=0"]
DINO = ["dino.out_dim=64", "dino.hidden_dim=64", "dino.bottleneck_dim=16"]


@pytest.fixture(scope="module")
def swin_dino_run(train_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("swin_dino")
    assert main(["pretrain", "--recipe", RECIPE, f"data.train={train_shards}", f"train.out_dir={out}",
                 "train.steps=3", *QUICK, *SWIN, *DINO]) == 0
    return out


def test_swin_dino_trains_and_exports_a_swin(swin_dino_run):
    log = [json.loads(line) for line in (swin_dino_run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in log)
    model, meta = load_backbone(swin_dino_run)
    assert type(model).__name__ == "SwinTransformer" and meta["method"] == "dino"
    images = torch.randn(3, 3, 32, 32)
    feats = pooled_features(model, images, "avg")  # [3, D]: the mean final token, the model's own pooled output
    assert feats.shape == (3, 64)
    torch.testing.assert_close(feats, model.forward_head(model.forward_features(images), pre_logits=True))


def test_swin_features_knn_probe_and_index(swin_dino_run, train_shards, test_shards, tmp_path, capsys):
    for name, shards in (("train", train_shards), ("test", test_shards)):
        assert main(["features", "--backbone", str(swin_dino_run), "--shards", str(shards), "--pooling", "avg",
                     "--out", str(tmp_path / name), "--workers", "1", "--no-progress"]) == 0
    assert main(["knn", "--train-features", str(tmp_path / "train"), "--test-features", str(tmp_path / "test"),
                 "--k", "10", "--out", str(tmp_path / "knn.json")]) == 0
    assert json.loads((tmp_path / "knn.json").read_text())["k"]["10"]["top1"] > 10.0  # above chance on 10 classes
    assert main(["linear-probe", "--train-features", str(tmp_path / "train"), "--test-features",
                 str(tmp_path / "test"), "--epochs", "2", "--lrs", "0.1", "--out", str(tmp_path / "probe.json")]) == 0
    assert main(["index", "build", "--features", str(tmp_path / "train"), "--out", str(tmp_path / "index")]) == 0
    capsys.readouterr()
    assert main(["features", "--backbone", str(swin_dino_run), "--shards", str(test_shards), "--pooling", "cls",
                 "--out", str(tmp_path / "cls"), "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: pooling: SwinTransformer has no CLS token") and "\n" not in err


def test_swin_supervised_and_fine_tuning_from_the_dino_run(swin_dino_run, train_shards, test_shards, tmp_path):
    out = tmp_path / "finetune"
    assert main(["finetune", "--recipe", str(ROOT / "recipes" / "finetune_vit_tiny_cifar10.yaml"),
                 "--init", str(swin_dino_run), "--eval-shards", str(test_shards), f"data.train={train_shards}",
                 f"train.out_dir={out}",
                 "train.steps=2", "optim.layer_decay=1.0", *QUICK, *SWIN, "model.img_size=32", "--no-progress"]) == 0
    model, _ = load_backbone(out)
    pretrained, _ = load_backbone(swin_dino_run)
    # the fine-tuned backbone started from the DINO teacher: two steps at a small lr leave it close, not equal
    first = "layers.0.blocks.0.attn.qkv.weight"
    assert not torch.equal(model.state_dict()[first], pretrained.state_dict()[first])
    assert (model.state_dict()[first] - pretrained.state_dict()[first]).abs().max() < 0.05
    assert json.loads((out / "finetune_eval.json").read_text())["eval"]["num"] == 1000


def test_mae_on_swin_is_refused_in_one_line(train_shards, tmp_path, capsys):
    assert main(["pretrain", "--recipe", str(ROOT / "recipes" / "mae_vit_tiny_cifar10.yaml"),
                 f"data.train={train_shards}", f"train.out_dir={tmp_path}", "train.steps=1", *QUICK, *SWIN]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.name: 'swin_tiny_patch4_window7_224' is a swin backbone: MAE's encoder "
                          "sees only the visible patches") and "\n" not in err


def test_the_swin_recipe_builds_dino_on_pooled_features():
    method = build_method(load_recipe(RECIPE))
    assert type(method.backbone()).__name__ == "SwinTransformer"
    views = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 2  # local crops tiled as they come
    logits = method.student(views)  # [V, B, K]
    assert logits.shape == (4, 2, 256)
