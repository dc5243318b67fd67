"""Fine-tuning through `ssl-vit finetune`: starts from the pretrained weights, layer-wise lr decay, scored once per
evaluation sample, bad starting points named."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssl_vit.cli import main
from ssl_vit.config import load_recipe
from ssl_vit.loading import method_from_recipe
from ssl_vit.methods import backbone_spec
from ssl_vit.models.backbone import create_backbone
from ssl_vit.models.export import export_backbone

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "finetune_vit_tiny_cifar10.yaml")
TINY = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "train.progress=false", "data.num_workers=1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny 2-block backbone exported as a pretrained run would export it (random weights: only loading matters)."""
    torch.manual_seed(1)
    recipe = load_recipe(RECIPE, [*TINY, "model.drop_path_rate=0"])
    spec = backbone_spec(recipe)
    path = tmp_path_factory.mktemp("pretrained") / "backbone.safetensors"
    export_backbone(create_backbone(spec), spec, path, extra_meta={"method": "mae"})
    return path


def test_finetune_starts_from_pretrained_weights_and_decays_lr_by_layer(pretrained):
    recipe = load_recipe(RECIPE, [*TINY, f"model.init={pretrained}", "optim.layer_decay=0.5"])
    method = method_from_recipe(recipe, num_classes=10)
    weights = load_file(str(pretrained))
    state = method.encoder.state_dict()
    for name, tensor in weights.items():
        assert torch.equal(state[name], tensor), name
    scale = {}
    for group in method.param_groups(0.05):
        for param in group["params"]:
            scale[param] = (group["lr_scale"], group["weight_decay"], group["wd_scale"])
    enc = method.encoder
    # depth 2: patch embedding = layer 0 (0.5^3), block i = layer i+1, head = layer 3 (full lr).
    assert scale[enc.patch_embed.proj.weight] == (0.125, 0.05, 1.0)
    assert scale[enc.blocks[0].attn.qkv.weight] == (0.25, 0.05, 1.0)
    assert scale[enc.blocks[1].mlp.fc1.weight] == (0.5, 0.05, 1.0)
    assert scale[enc.head.weight] == (1.0, 0.05, 1.0)
    assert scale[enc.pos_embed][1:] == (0.0, 0.0) and scale[enc.blocks[1].norm1.weight][1:] == (0.0, 0.0)
    assert len(scale) == sum(1 for _ in enc.parameters())


def test_finetune_cli_trains_and_scores_every_test_sample(pretrained, train_shards, test_shards, tmp_path, capsys):
    """30 steps from a random 2-block backbone, the recipe's mixup/cutmix and label smoothing: the loss falls and
    the classifier beats chance (10 %) on every one of the 1,000 test images, which a run whose updates do
    nothing (or whose classifier is never read back) cannot."""
    out = tmp_path / "ft"
    code = main(["finetune", "--recipe", RECIPE, "--init", str(pretrained), "--eval-shards", str(test_shards),
                 "--out-dir", str(out), f"data.train={train_shards}", "train.epochs=0", "train.steps=30",
                 "data.batch_size=64", "train.log_every=1", "optim.warmup_epochs=0.02", *TINY])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "finetune_eval.json").read_text())
    assert result["steps"] == 30 and result["init"] == str(pretrained) and result["layer_decay"] == 0.75
    assert result["eval"]["num"] == 1000 and result["eval"]["skipped"] == 0
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    # measured: loss 2.31 -> 2.24 (mean of the first and last five; mixup keeps it high), top-1 20.9 %, top-5 70.2 %
    assert len(losses) == 30 and sum(losses[-5:]) < 0.985 * sum(losses[:5]), losses
    assert result["eval"]["top1"] >= 15.0 and result["eval"]["top5"] >= 60.0, result["eval"]
    assert result["eval"]["top1"] <= result["eval"]["top5"] <= 100.0


@pytest.mark.parametrize("extra, expected", [
    (["model.depth=3"], "model.init: "),                      # a 2-block backbone into a 3-block model
    (["model.embed_dim=32"], "model.init: "),
    (["--init=/nonexistent/backbone.safetensors"], "model.init: no pretrained backbone at /nonexistent"),
    (["--eval-shards=/nonexistent/test-index.json"], "/nonexistent/test-index.json"),  # named before training
])
def test_bad_init_or_eval_shards_are_one_line_errors(pretrained, train_shards, test_shards, tmp_path, capsys, extra,
                                                     expected):
    init = [] if any(e.startswith("--init") for e in extra) else ["--init", str(pretrained)]
    init += [] if any(e.startswith("--eval") for e in extra) else ["--eval-shards", str(test_shards)]
    code = main(["finetune", "--recipe", RECIPE, *init, "--out-dir", str(tmp_path / "x"), f"data.train={train_shards}",
                 "train.epochs=0", "train.steps=1", *TINY, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and "\n" not in err, err
    assert not (tmp_path / "x" / "summary.json").exists()


def test_finetune_needs_init_and_a_classifier(train_shards, tmp_path, capsys):
    assert main(["finetune", "--recipe", RECIPE, f"data.train={train_shards}", *TINY]) == 2
    assert "model.init: fine-tuning needs a pretrained backbone" in capsys.readouterr().err
    mae = str(ROOT / "recipes" / "mae_vit_tiny_cifar10.yaml")
    assert main(["pretrain", "--recipe", mae, "model.init=x.safetensors", *TINY]) == 2
    assert "model.init: only the supervised method" in capsys.readouterr().err
