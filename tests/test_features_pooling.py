"""`ssl-vit features --pooling auto` (the default): the CLS token where a backbone has one, the mean final token
where it has none (a Swin); the cache records the pooling it chose, and an index built from it embeds queries the
same way. An explicit pooling the model does not have is a one-line error naming the key."""
import json

import numpy as np
import pytest
import torch

from ssl_vit.cli import main
from test_index_query import stored_image
from ssl_vit.eval.features import embed_images, pooled_features
from ssl_vit.models.backbone import BackboneSpec, create_backbone
from ssl_vit.models.export import export_backbone

SWIN = BackboneSpec("swin_tiny_patch4_window7_224", img_size=32, patch_size=4,
                    kwargs=dict(embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4))
VIT = BackboneSpec("vit_tiny_patch16_224", img_size=32, patch_size=8, kwargs=dict(depth=1, embed_dim=32, num_heads=2))
QUICK = ["--workers", "1", "--no-progress", "--batch-size", "250"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("exports")
    return {name: export_backbone(create_backbone(spec), spec, out / name / "backbone.safetensors")
            for name, spec in (("swin", SWIN), ("vit", VIT))}


@pytest.mark.parametrize("name,pooling,dim", [("swin", "avg", 64), ("vit", "cls", 32)])
def test_default_pooling_is_the_models_own_and_is_recorded(name, pooling, dim, exports, test_shards, tmp_path):
    out = tmp_path / "feats"
    assert main(["features", "--backbone", str(exports[name]), "--shards", str(test_shards), "--out", str(out),
                 *QUICK]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["pooling"] == pooling and meta["dim"] == dim and meta["num"] == 1000
    explicit = tmp_path / "explicit"
    assert main(["features", "--backbone", str(exports[name]), "--shards", str(test_shards), "--out", str(explicit),
                 "--pooling", pooling, *QUICK]) == 0
    assert np.array_equal(np.load(out / "features.npy"), np.load(explicit / "features.npy"))


def test_an_index_from_an_auto_cache_embeds_queries_as_its_features(exports, test_shards, tmp_path, capsys):
    """A Swin cache made with `auto` records avg; `index query` embeds an image file the same way (a stored image
    finds itself with cosine 1)."""
    assert main(["features", "--backbone", str(exports["swin"]), "--shards", str(test_shards),
                 "--out", str(tmp_path / "feats"), *QUICK]) == 0
    assert main(["index", "build", "--features", str(tmp_path / "feats"), "--out", str(tmp_path / "index")]) == 0
    assert json.loads((tmp_path / "index" / "meta.json").read_text())["source"]["pooling"] == "avg"
    image, key = stored_image(test_shards, tmp_path, 5)
    capsys.readouterr()
    assert main(["index", "query", "--index", str(tmp_path / "index"), "--image", str(image), "-k", "2"]) == 0
    best = next(line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["1"])
    assert best[3] == key and float(best[1]) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("pooling", ["cls", "cls+avg"])
def test_a_pooling_a_swin_lacks_is_one_line(pooling, exports, test_shards, tmp_path, capsys):
    code = main(["features", "--backbone", str(exports["swin"]), "--shards", str(test_shards),
                 "--out", str(tmp_path / "f"), "--pooling", pooling, *QUICK])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: pooling: SwinTransformer has no CLS token") and "\n" not in err, err


def test_unknown_pooling_names_the_key(exports):
    model = create_backbone(VIT).eval()
    with pytest.raises(Exception, match="pooling: must be one of auto, cls, avg, cls\\+avg, got 'max'"):
        pooled_features(model, torch.randn(1, 3, 32, 32), "max")
    images = [load_image_from_array(np.full((32, 32, 3), 120, np.uint8))]
    np.testing.assert_array_equal(embed_images(model, images, image_size=32),
                                  embed_images(model, images, image_size=32, pooling="cls"))


def load_image_from_array(pixels: np.ndarray):
    from PIL import Image

    return Image.fromarray(pixels)
