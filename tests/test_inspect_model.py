"""The ViT paper's pictures (pipelines/vit_figures.py, `ssl-vit inspect-model`, the comparison report): each figure's
numbers checked on tiny models for shape and a property that must hold."""
import json
from pathlib import Path

import torch

from ssl_vit.cli import main
from ssl_vit.methods.mae import MAE
from ssl_vit.models.backbone import BackboneSpec, create_backbone
from ssl_vit.models.export import export_backbone
from ssl_vit.pipelines.attention import attention_rollout, attention_weights, mean_attention_distance
from ssl_vit.pipelines.vit_figures import is_sincos, position_similarity, report_lines, row_figures

SPEC = BackboneSpec(img_size=32, patch_size=4, kwargs=dict(depth=2, embed_dim=64, num_heads=2))


def tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    return create_backbone(SPEC).eval()


def test_sincos_position_similarity_shows_the_grid():
    """MAE's fixed sin-cos embedding: a position is itself (1) and closer to its neighbour than to the far corner."""
    encoder = MAE(SPEC, decoder_depth=1, decoder_dim=32, decoder_heads=2).encoder
    sim = position_similarity(encoder)  # [8, 8, 8, 8]
    assert sim.shape == (8, 8, 8, 8)
    torch.testing.assert_close(torch.einsum("ijij->ij", sim), torch.ones(8, 8))
    for i, j in [(0, 0), (3, 4), (7, 7)]:
        neighbour = sim[i, j, i, min(j + 1, 7) if j < 7 else j - 1]
        far = sim[i, j, 7 - i if i < 4 else 0, 7 - j if j < 4 else 0]
        assert neighbour > far


def test_rollout_rows_sum_to_one_and_one_block_is_half_attention_half_identity():
    model = tiny_vit()
    images = torch.randn(3, 3, 32, 32)
    rollout, cls = attention_rollout(model, images)
    assert rollout.shape == (3, 65, 65) and cls.shape == (3, 8, 8)
    torch.testing.assert_close(rollout.sum(dim=-1), torch.ones(3, 65))
    assert rollout.min() >= 0
    model.blocks = model.blocks[:1]
    one, _ = attention_rollout(model, images)
    expected = 0.5 * attention_weights(model, images)[0].mean(dim=1) + 0.5 * torch.eye(65)
    torch.testing.assert_close(one, expected)  # rows of ½A + ½I already sum to 1


def test_uniform_attention_spreads_to_the_mean_pairwise_distance():
    """With q = k = 0 every patch attends to all patches equally: its mean distance is the grid's mean distance."""
    model = tiny_vit()
    for block in model.blocks:
        torch.nn.init.zeros_(block.attn.qkv.weight)
        torch.nn.init.zeros_(block.attn.qkv.bias)
    dist = mean_attention_distance(model, torch.randn(2, 3, 32, 32))  # [depth, heads]
    assert dist.shape == (2, 2)
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], -1) * 4  # 4-px patches
    torch.testing.assert_close(dist, torch.full((2, 2), torch.cdist(centres, centres).mean().item()))


def test_inspect_model_writes_the_three_figures(test_shards, tmp_path, capsys):
    encoder = MAE(SPEC, decoder_depth=1, decoder_dim=32, decoder_heads=2).encoder
    path = export_backbone(encoder, SPEC, tmp_path / "mae" / "backbone.safetensors", extra_meta={"method": "mae"})
    assert main(["inspect-model", "--backbone", str(path), "--out", str(tmp_path / "fig"), "--shards",
                 str(test_shards), "--images", "2"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert set(written) == {"position_embedding", "attention_distance", "attention_rollout"}
    assert all(Path(p).is_file() and Path(p).stat().st_size > 1000 for p in written.values())
    assert is_sincos(encoder) and not is_sincos(tiny_vit())  # the title says which the embedding is


def test_a_swin_has_no_position_embedding_or_global_attention_to_draw(tmp_path, capsys):
    assert main(["inspect-model", "--backbone", "timm-random:swin_tiny_patch4_window7_224", "--out",
                 str(tmp_path)]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written["position_embedding"].startswith("position embeddings: SwinTransformer has none")
    assert not list(tmp_path.glob("*.png"))


def test_every_report_row_gets_its_figures(test_shards, tmp_path):
    from ssl_vit.pipelines.figures import evaluation_images

    runs = {}
    for name, seed in (("dino", 0), ("supervised", 1)):
        export_backbone(tiny_vit(seed), SPEC, tmp_path / "models" / name / "backbone.safetensors",
                        extra_meta={"method": name})
        runs[name] = tmp_path / "models" / name
    results = row_figures(runs, evaluation_images(str(test_shards), 2)[0], tmp_path / "vit_figures")
    assert set(results) == {"dino", "supervised"}
    assert (tmp_path / "vit_figures" / "attention_distance.png").is_file()
    lines = report_lines(results, tmp_path)
    assert "![dino attention_rollout](vit_figures/dino/attention_rollout.png)" in lines
    note = "position embeddings: SwinTransformer has none"
    assert f"- position_embedding: {note}" in report_lines({"swin": {"position_embedding": note}}, tmp_path)
