"""Backbone export: plain `timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))` must load
it and give identical outputs; `load_backbone` loads strictly and names the first mismatching key."""
import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ssl_vit.errors import SslVitError
from ssl_vit.loading import load_backbone
from ssl_vit.methods.mae import MAE
from ssl_vit.methods.supervised import Supervised
from ssl_vit.models.backbone import BackboneSpec
from ssl_vit.models.export import META_KEY, export_backbone

SPEC = BackboneSpec(img_size=32, patch_size=4, kwargs=dict(depth=2, embed_dim=64, num_heads=2))


def trained(method):
    """One optimizer step so the weights differ from any fresh initialisation."""
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = method({"views": [images], "label": torch.arange(8) % 10}, {}, 0)
    opt = torch.optim.AdamW(method.param_groups(0.0), lr=1e-2)
    out["loss"].backward()
    opt.step()
    return method.backbone().eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["mae", "supervised"])
def test_timm_pretrained_file_round_trip(tmp_path, images, kind):
    torch.manual_seed(0)
    method = MAE(SPEC, decoder_depth=1, decoder_dim=32, decoder_heads=4) if kind == "mae" else Supervised(SPEC, 10)
    model = trained(method)
    path = tmp_path / "out" / "backbone.safetensors"
    assert export_backbone(model, SPEC, path, extra_meta={"method": kind, "step": 1}) == path
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["model_name"] == SPEC.name and meta["num_features"] == 64 and meta["method"] == kind
    assert meta["img_size"] == 32 and meta["patch_size"] == 4 and meta["create_kwargs"] == SPEC.create_kwargs()
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()[META_KEY]) == meta
        assert not any(k.startswith("head") for k in f.keys())

    loaded = timm.create_model(meta["model_name"], pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                               num_classes=0, **meta["create_kwargs"]).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(images), model.forward_features(images))
        assert torch.equal(loaded(images), model.forward_head(model.forward_features(images), pre_logits=True))
        ours, ours_meta = load_backbone(path)
        assert ours_meta == meta and not ours.training
        assert torch.equal(ours.forward_features(images), model.forward_features(images))


@pytest.fixture()
def exported(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "b.safetensors"
    export_backbone(Supervised(SPEC, 10).backbone(), SPEC, path)
    return path


def rewrite(path, tensors=None, meta=None):
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
    tensors = load_file(str(path)) if tensors is None else tensors
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)} if meta else header)


def test_wrong_width_names_first_key(exported):
    meta = json.loads(exported.with_suffix(".json").read_text())
    meta["create_kwargs"]["embed_dim"] = 32
    rewrite(exported, meta=meta)
    with pytest.raises(SslVitError, match=r"b\.safetensors.*'cls_token' has shape \[1, 1, 64\].*\[1, 1, 32\]"):
        load_backbone(exported)


def test_wrong_depth_and_missing_keys(exported):
    meta = json.loads(exported.with_suffix(".json").read_text())
    meta["create_kwargs"]["depth"] = 3
    rewrite(exported, meta=meta)
    with pytest.raises(SslVitError, match=r"missing key 'blocks\.2\.norm1\.weight'"):
        load_backbone(exported)
    meta["create_kwargs"]["depth"] = 1
    rewrite(exported, meta=meta)
    with pytest.raises(SslVitError, match=r"unexpected key 'blocks\.1\."):
        load_backbone(exported)
    meta["create_kwargs"]["depth"] = 2
    tensors = load_file(str(exported))
    del tensors["blocks.1.mlp.fc2.bias"]
    rewrite(exported, tensors=tensors, meta=meta)
    with pytest.raises(SslVitError, match=r"missing key 'blocks\.1\.mlp\.fc2\.bias'"):
        load_backbone(exported)


def test_sidecar_fallback_and_unreadable_files(exported, tmp_path):
    tensors = load_file(str(exported))
    save_file(tensors, str(exported))  # header without our metadata: the sidecar is used
    model, meta = load_backbone(exported)
    assert meta["model_name"] == SPEC.name and model.num_features == 64
    exported.with_suffix(".json").unlink()
    with pytest.raises(SslVitError, match="no ssl_vit metadata"):
        load_backbone(exported)
    with pytest.raises(SslVitError, match="no such file"):
        load_backbone(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(SslVitError, match="junk.safetensors.*safetensors"):
        load_backbone(junk)


def test_export_rejects_model_that_does_not_match_spec(tmp_path):
    torch.manual_seed(0)
    model = Supervised(SPEC, 10).backbone()
    wider = BackboneSpec(img_size=32, patch_size=4, kwargs=dict(depth=2, embed_dim=96, num_heads=2))
    with pytest.raises(SslVitError, match=r"export .*'cls_token' has shape \[1, 1, 64\]"):
        export_backbone(model, wider, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_export_folder_is_a_timm_local_dir(tmp_path, images):
    """The export's folder loads through plain `timm.create_model("local-dir:...")` with identical features, and its
    config.json carries the input size, mean/std and our metadata."""
    from ssl_vit.transforms import MEAN, STD

    torch.manual_seed(0)
    model = trained(Supervised(SPEC, 10))
    path = export_backbone(model, SPEC, tmp_path / "run" / "backbone.safetensors", extra_meta={"method": "supervised"})
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["architecture"] == SPEC.name and config["num_classes"] == 0
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and "tag" not in config["pretrained_cfg"]
    assert config["pretrained_cfg"]["mean"] == list(MEAN) and config["pretrained_cfg"]["std"] == list(STD)
    assert config[META_KEY] == json.loads(path.with_suffix(".json").read_text())
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == path.read_bytes()

    plain = timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True).eval()
    ours, meta = load_backbone(f"local-dir:{tmp_path / 'run'}")
    assert meta["method"] == "supervised" and meta["img_size"] == 32 and meta["source"].startswith("local-dir:")
    with torch.no_grad():
        expected = model.forward_features(images)
        assert torch.equal(plain.forward_features(images), expected)
        assert torch.equal(ours.forward_features(images), expected)


def test_another_normalisation_is_folded_into_the_patch_embedding(tmp_path, images):
    """A timm folder whose model was trained on (x - 0.5) / 0.5 (timm's augreg ViTs) takes our ImageNet-normalised
    views and gives the features the model gives its own normalisation."""
    from timm.models import save_for_hf

    from ssl_vit.transforms import MEAN, STD

    torch.manual_seed(0)
    model = timm.create_model(SPEC.name, num_classes=0, **SPEC.create_kwargs()).eval()
    save_for_hf(model, tmp_path / "augreg", safe_serialization=True,
                data_config={"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    ours, _ = load_backbone(f"local-dir:{tmp_path / 'augreg'}")
    pixels = images.sigmoid()  # [4, 3, 32, 32] in 0..1
    ours_in = (pixels - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(ours_in), model.forward_features((pixels - 0.5) / 0.5),
                                   atol=1e-5, rtol=1e-5)
