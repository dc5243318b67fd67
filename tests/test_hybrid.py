"""Hybrid ViTs (a ResNet stem feeding the Transformer, as the ViT paper compares them; timm's vit_*_r26_* and
vit_tiny_r_s16_p8) as backbones for supervised and DINO runs and evaluation."""
import json
from pathlib import Path

import pytest
import torch

from ssl_vit.cli import main
from ssl_vit.loading import load_backbone
from ssl_vit.models.backbone import BackboneSpec, create_backbone, patch_size_of
from ssl_vit.models.export import export_backbone

ROOT = Path(__file__).resolve().parents[1]
# A stem-only hybrid (ResNetV2 stem, stride 4, then 8-px patches on its features): one token per 32 px, 2×2 at 64 px.
HYBRID = ["model.name=vit_tiny_r_s16_p8_224", "model.img_size=64", "model.patch_size=32", "model.depth=2",
          "model.embed_dim=64", "model.num_heads=2"]
QUICK = ["train.progress=false", "train.log_every=1", "data.num_workers=1", "data.batch_size=16", "train.epochs=0",
         "train.steps=2"]


@pytest.mark.parametrize("method,extra", [
    ("supervised", []),
    ("dino", ["dino.out_dim=64", "dino.hidden_dim=64", "dino.bottleneck_dim=16"])])
def test_hybrid_trains_exports_and_extracts(method, extra, train_shards, test_shards, tmp_path):
    out = tmp_path / "run"
    recipe = ROOT / "recipes" / f"{method}_vit_tiny_cifar10.yaml"
    assert main(["pretrain", "--recipe", str(recipe), f"data.train={train_shards}", f"train.out_dir={out}",
                 *QUICK, *HYBRID, *extra]) == 0
    model, meta = load_backbone(out)
    assert hasattr(model.patch_embed, "backbone") and patch_size_of(model) == 32 and meta["img_size"] == 64
    assert main(["features", "--backbone", str(out), "--shards", str(test_shards), "--out", str(tmp_path / "f"),
                 "--workers", "1", "--no-progress"]) == 0
    cache = json.loads((tmp_path / "f" / "meta.json").read_text())
    assert (cache["pooling"], cache["num"], cache["dim"]) == ("cls", 1000, 64)


def test_a_hybrid_patch_size_is_its_token_stride(train_shards, tmp_path, capsys):
    recipe = ROOT / "recipes" / "supervised_vit_tiny_cifar10.yaml"
    assert main(["pretrain", "--recipe", str(recipe), f"data.train={train_shards}", f"train.out_dir={tmp_path}",
                 *QUICK, *HYBRID, "model.patch_size=16"]) == 2
    assert capsys.readouterr().err.strip() == ("error: model.patch_size: 'vit_tiny_r_s16_p8_224' at 64 px puts one "
                                               "token on 32 px (2×2 tokens); set model.patch_size=32")


def test_the_papers_r26_hybrid_exports_and_loads_shrunk(tmp_path):
    """vit_small_r26_s32 (ResNet-26 stem, stride 32) with a 1-block, 64-wide Transformer at 64 px: 2×2 tokens."""
    torch.manual_seed(0)
    spec = BackboneSpec("vit_small_r26_s32_224", img_size=64, patch_size=32,
                        kwargs=dict(depth=1, embed_dim=64, num_heads=2))
    model = create_backbone(spec).eval()
    path = export_backbone(model, spec, tmp_path / "backbone.safetensors")
    loaded, meta = load_backbone(path)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))
    assert meta["create_kwargs"].get("patch_size") is None  # a hybrid's patch is on its stem's features: timm's own
