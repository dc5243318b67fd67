"""One way to load a model: a run folder, a checkpoint, an export or a timm name → a backbone or a method."""
from pathlib import Path

import pytest
import timm
import torch

from ssl_vit.cli import main
from ssl_vit.config import load_recipe
from ssl_vit.errors import SslVitError
from ssl_vit.loading import load_backbone, load_method, method_from_recipe
from ssl_vit.methods.dino import DINO
from ssl_vit.models.backbone import BackboneSpec, create_backbone
from ssl_vit.models.export import export_backbone

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "train.progress=false", "data.num_workers=0",
        "dino.out_dim=256", "dino.hidden_dim=64", "dino.bottleneck_dim=32", "views.num_local=2", "train.steps=1",
        "train.epochs=0", "data.batch_size=8"]


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory, train_shards) -> Path:
    out = tmp_path_factory.mktemp("loading") / "dino"
    assert main(["pretrain", "--recipe", str(ROOT / "recipes" / "dino_vit_tiny_cifar10.yaml"), *TINY,
                 f"data.train={train_shards}", f"train.out_dir={out}"]) == 0
    return out


def test_export_run_folder_and_checkpoint_give_the_same_backbone(dino_run):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    exported, meta = load_backbone(dino_run / "backbone.safetensors")
    from_run, _ = load_backbone(dino_run)
    from_ckpt, ckpt_meta = load_backbone(dino_run / "checkpoints" / "ckpt-00000001")
    method, method_meta = load_method(dino_run)
    assert isinstance(method, DINO) and not method.training and method_meta == ckpt_meta
    assert ckpt_meta["method"] == "dino" and ckpt_meta["step"] == 1 and ckpt_meta["img_size"] == meta["img_size"]
    with torch.no_grad():
        expected = method.teacher.backbone.forward_features(images)  # DINO is evaluated on its teacher
        for model in (exported, from_run, from_ckpt):
            assert not model.training
            torch.testing.assert_close(model.forward_features(images), expected)


def test_fine_tuning_starts_from_a_checkpoints_backbone(dino_run, train_shards):
    ckpt = dino_run / "checkpoints" / "ckpt-00000001"
    recipe = load_recipe(ROOT / "recipes" / "finetune_vit_tiny_cifar10.yaml",
                         [*TINY[:3], f"model.init={ckpt}", f"data.train={train_shards}"])
    method = method_from_recipe(recipe, num_classes=10)
    teacher = load_method(ckpt)[0].teacher.backbone.state_dict()
    state = method.encoder.state_dict()
    assert all(torch.equal(state[k], v) for k, v in teacher.items())
    assert {k for k in state if k not in teacher} == {"head.weight", "head.bias"}


def test_timm_names_load_timms_pretrained_weights(tmp_path, monkeypatch):
    """timm's hub is out of reach here, so its download is pointed at a local file; the rest is the real path."""
    torch.manual_seed(0)
    spec = BackboneSpec(name="vit_tiny_patch16_224")
    path = export_backbone(create_backbone(spec), spec, tmp_path / "hub.safetensors")
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model",
                        lambda name, **kw: real(name, pretrained_cfg_overlay=dict(file=str(path)), **kw))
    model, meta = load_backbone("timm:vit_tiny_patch16_224")
    assert meta == {"model_name": "vit_tiny_patch16_224", "img_size": 224, "patch_size": 16, "method": "timm",
                    "source": "timm:vit_tiny_patch16_224", "pretrained": True}
    exported, _ = load_backbone(path)
    # timm's ViT-Ti weights expect (x - 0.5) / 0.5: that normalisation is folded into the patch embedding
    folded = {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in exported.state_dict().items() if k not in folded)
    assert not torch.equal(model.state_dict()["patch_embed.proj.weight"], exported.patch_embed.proj.weight)
    monkeypatch.setattr(timm, "create_model", real)
    with pytest.raises(SslVitError, match="backbone timm:no_such_vit: timm could not load"):
        load_backbone("timm:no_such_vit")


def test_what_is_not_a_model_is_named(tmp_path):
    with pytest.raises(SslVitError, match="no such file or folder"):
        load_backbone(tmp_path / "nothing")
    with pytest.raises(SslVitError, match="no checkpoint in"):
        load_method(tmp_path)


def test_hub_ids_that_cannot_be_reached_are_one_line_errors_naming_them():
    with pytest.raises(SslVitError) as e:
        load_backbone("hf-hub:ssl-vit-tests/no-such-model")
    assert "backbone hf-hub:ssl-vit-tests/no-such-model: " in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SslVitError, match="no config.json in that folder"):
        load_backbone("local-dir:/nonexistent/folder")


def test_timm_weights_from_the_local_cache_without_the_hub(tmp_path):
    """timm's pretrained weights already in the Hugging Face cache load without asking the Hub (which is out of
    reach here, or is made so with a closed port; the patch embedding differs by the folded (x - 0.5) / 0.5
    normalisation); `timm-random:` builds the same architecture untrained."""
    import os
    import subprocess
    import sys

    repo = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(0)
    export_backbone(create_backbone(BackboneSpec()), BackboneSpec(), snapshot / "model.safetensors")
    code = ("import torch; from ssl_vit.loading import load_backbone; from safetensors.torch import load_file; "
            f"m, meta = load_backbone('timm:{repo.split('/')[1]}'); w = load_file('{snapshot / 'model.safetensors'}');"
            "assert all(torch.equal(m.state_dict()[k], v) for k, v in w.items() if 'patch_embed' not in k), 'differ';"
            f"r, _ = load_backbone('timm-random:vit_tiny_patch16_224');"
            "assert not torch.equal(r.state_dict()['cls_token'], w['cls_token']); print(meta['img_size'])")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "224", done.stderr[-2000:]
