"""DeiT distillation (Touvron et al. 2021, Sec. 4): the losses against references written here from Eq. 2 and 3, a
student with a distillation token (timm's deit_*_distilled_*, or a plain vit_* given one, its weights from an MAE
run) trained from a frozen teacher run (no gradients, eval mode, weights unchanged), evaluation on the two heads'
average, bad teachers and students named in one line, and a two-process run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from ssl_vit.cli import main
from ssl_vit.config import load_recipe
from ssl_vit.loading import load_backbone, load_method, method_from_recipe
from ssl_vit.losses.distill import hard_distillation_loss, soft_distillation_loss
from ssl_vit.errors import SslVitError
from ssl_vit.eval.features import pooled_features
from ssl_vit.methods import backbone_spec
from ssl_vit.methods.distill import DistilledSupervised
from ssl_vit.models.backbone import BackboneSpec, create_backbone
from ssl_vit.models.distilled import distilled_spec
from ssl_vit.models.export import export_backbone

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "supervised_vit_tiny_cifar10.yaml")
TINY = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "train.progress=false", "train.log_every=1",
        "data.num_workers=1", "train.epochs=0", "data.batch_size=16"]
STUDENT = ["model.name=deit_tiny_distilled_patch16_224"]
PLAIN = ["model.name=vit_tiny_patch16_224"]  # the recipe's ViT, given a distillation token
SWIN = ["model.name=swin_tiny_patch4_window7_224", "model.depth=0", "model.num_heads=0",
        "model.kwargs={depths: [1, 1], num_heads: [2, 4], window_size: 4}"]
MAE_RECIPE = str(ROOT / "recipes" / "mae_vit_tiny_cifar10.yaml")
MAE_TINY = ["mae.decoder_depth=1", "mae.decoder_dim=64", "mae.decoder_heads=2"]


def test_hard_distillation_loss_is_eq_3():
    """L = ½ L_CE(ψ(Z_s), y) + ½ L_CE(ψ(Z_s'), y_t), y_t = argmax_c Z_t(c), Z_s' the distillation token's logits."""
    gen = torch.Generator().manual_seed(0)
    z_cls, z_dist, z_t = (torch.randn(6, 5, generator=gen) for _ in range(3))
    y = torch.randint(0, 5, (6,), generator=gen)
    y_t = [max(range(5), key=lambda c, row=row: z_t[row, c].item()) for row in range(6)]
    log_psi = lambda z: z - z.exp().sum(-1, keepdim=True).log()  # noqa: E731  (log-softmax, by hand)
    expected = sum(0.5 * -log_psi(z_cls)[i, y[i]] + 0.5 * -log_psi(z_dist)[i, y_t[i]] for i in range(6)) / 6
    got = hard_distillation_loss(z_cls, z_dist, y, z_t, alpha=0.5)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_soft_distillation_loss_is_eq_2():
    """L = (1 − λ) L_CE(ψ(Z_s), y) + λ τ² KL(ψ(Z_t/τ), ψ(Z_s'/τ)), KL summed over classes, averaged over images."""
    gen = torch.Generator().manual_seed(1)
    z_cls, z_dist, z_t = (torch.randn(4, 7, generator=gen) for _ in range(3))
    y = torch.randint(0, 7, (4,), generator=gen)
    lam, tau = 0.1, 3.0
    p_t = (z_t / tau).softmax(-1)
    kl = (p_t * (p_t.log() - (z_dist / tau).log_softmax(-1))).sum(-1).mean()
    expected = (1 - lam) * F.cross_entropy(z_cls, y) + lam * tau * tau * kl
    got = soft_distillation_loss(z_cls, z_dist, y, z_t, alpha=lam, tau=tau)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.fixture(scope="module")
def teacher_run(train_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    assert main(["pretrain", "--recipe", RECIPE, f"data.train={train_shards}", f"train.out_dir={out}",
                 "train.steps=3", *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def mae_run(train_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mae")
    assert main(["pretrain", "--recipe", MAE_RECIPE, f"data.train={train_shards}", f"train.out_dir={out}",
                 "train.steps=1", *TINY, *MAE_TINY]) == 0
    return out


@pytest.mark.parametrize("student", [STUDENT, PLAIN], ids=["deit", "plain_vit"])
def test_student_learns_from_a_frozen_teacher(student, teacher_run, train_shards):
    recipe = load_recipe(RECIPE, [*TINY, *student, "train.steps=1", f"supervised.distill.teacher={teacher_run}"])
    method = method_from_recipe(recipe, num_classes=10)
    assert isinstance(method, DistilledSupervised)
    assert type(method.encoder).__name__ == "VisionTransformerDistilled" and len(method.encoder.blocks) == 2
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    trained = {id(p) for g in method.param_groups(0.05) for p in g["params"]}
    assert not any(p.requires_grad or id(p) in trained for p in method.teacher.parameters())
    opt = torch.optim.AdamW([p for g in method.param_groups(0.05) for p in g["params"]], lr=1e-2)
    method.train()
    assert not method.teacher.training and method.encoder.training
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(2):
        out = method({"views": [images], "label": labels}, {}, 0)
        out["loss"].backward()
        assert all(p.grad is None for p in method.teacher.parameters())
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in method.teacher.state_dict().items())
    assert 0.0 <= out["teacher_agreement"] <= 1.0
    method.eval()  # evaluation: the mean of the class and distillation heads, as DeiT evaluates
    enc = method.encoder
    with torch.no_grad():
        tokens = enc.forward_features(images)
        expected = (enc.head(tokens[:, 0]) + enc.head_dist(tokens[:, 1])) / 2
        torch.testing.assert_close(enc(images), expected)


def test_distilled_run_exports_a_student_and_keeps_the_teacher(teacher_run, train_shards, tmp_path):
    out = tmp_path / "student"
    assert main(["pretrain", "--recipe", RECIPE, f"data.train={train_shards}", f"train.out_dir={out}",
                 "train.steps=2", *TINY, *STUDENT, f"supervised.distill.teacher={teacher_run}",
                 "supervised.distill.kind=soft", "supervised.distill.tau=3.0"]) == 0
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("teacher_agreement" in entry for entry in logs)
    student, meta = load_backbone(out)
    assert type(student).__name__ == "VisionTransformerDistilled" and meta["model_name"].startswith("deit_tiny_dist")
    images = torch.randn(2, 3, 32, 32)  # its features: the mean of the class and distillation tokens, as its heads
    torch.testing.assert_close(pooled_features(student, images, "cls"),
                               student.forward_head(student.forward_features(images), pre_logits=True))
    method, _ = load_method(out)  # the teacher is rebuilt from its run, its weights as trained there
    teacher_weights = load_file(str(teacher_run / "backbone.safetensors"))
    state = method.teacher.state_dict()
    assert all(torch.equal(state[k], v) for k, v in teacher_weights.items())


@pytest.mark.parametrize("change,message", [
    (["supervised.distill.kind=medium"], "supervised.distill.kind: must be hard or soft, got 'medium'"),
    (["supervised.distill.alpha=1.5"], "supervised.distill.alpha: must be in [0, 1], got 1.5"),
    (["supervised.distill.temperature=3"], "unknown recipe key 'supervised.distill.temperature'"),
    (["supervised.distill.tau=0"], "supervised.distill.tau: must be positive, got 0.0"),
    (["supervised.distill.teacher=TEACHER", *SWIN],
     "model.name: a distillation token sits beside a plain ViT's CLS token; 'swin_tiny_patch4_window7_224' is a "
     "swin"),
    (["supervised.distill.teacher=TEACHER/backbone.safetensors"], "supervised.distill.teacher: "),
    (["supervised.distill.teacher=TEACHER", "data.num_classes=12"], "classifies 10 classes, the training data has 12")])
def test_bad_distillation_settings_are_one_line(change, message, teacher_run, train_shards, tmp_path, capsys):
    change = [c.replace("TEACHER", str(teacher_run)) for c in change]
    code = main(["pretrain", "--recipe", RECIPE, f"data.train={train_shards}", f"train.out_dir={tmp_path}",
                 "train.steps=1", *TINY, *STUDENT, *change])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err, err


def test_an_mae_run_cannot_teach(mae_run, train_shards, tmp_path, capsys):
    assert main(["pretrain", "--recipe", RECIPE, f"data.train={train_shards}", f"train.out_dir={tmp_path / 's'}",
                 "train.steps=1", *TINY, *STUDENT, f"supervised.distill.teacher={mae_run}"]) == 2
    assert "is a mae run, which trains no classifier" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_distillation(teacher_run, train_shards, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ssl_vit.train",
           "--recipe", RECIPE, f"data.train={train_shards}", f"train.out_dir={out}", "train.steps=3", *TINY,
           *PLAIN, f"supervised.distill.teacher={teacher_run}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    method, _ = load_method(out)
    teacher_weights = load_file(str(teacher_run / "backbone.safetensors"))
    assert all(torch.equal(method.teacher.state_dict()[k], v) for k, v in teacher_weights.items())


def test_a_student_can_start_from_a_pretrained_backbone(teacher_run, tmp_path):
    """model.init into a student with two heads (class and distillation): only the heads stay as they were."""
    recipe = load_recipe(RECIPE, [*TINY, *STUDENT, "train.steps=1", f"supervised.distill.teacher={teacher_run}"])
    spec = backbone_spec(recipe)
    export = export_backbone(create_backbone(spec), spec, tmp_path / "student" / "backbone.safetensors")
    method = method_from_recipe(load_recipe(RECIPE, [*TINY, *STUDENT, "train.steps=1", f"model.init={export}",
                                                     f"supervised.distill.teacher={teacher_run}"]), num_classes=10)
    pretrained, state = load_file(str(export)), method.encoder.state_dict()
    assert all(torch.equal(state[k], v) for k, v in pretrained.items())
    assert sorted(set(state) - set(pretrained)) == ["head.bias", "head.weight", "head_dist.bias", "head_dist.weight"]


@pytest.mark.parametrize("student,init", [(PLAIN, "mae"), (STUDENT, "teacher")], ids=["plain_vit", "deit"])
def test_a_plain_vit_run_moves_into_the_student(student, init, mae_run, teacher_run):
    """A plain ViT (our MAE run, or a supervised run) loaded into a DeiT student: every block, the patch embedding and
    the norms carry its weights; the distillation token and its position start as the CLS token's."""
    source = {"mae": mae_run, "teacher": teacher_run}[init]
    vit, _ = load_backbone(source)
    assert type(vit).__name__ == "VisionTransformer"
    method = method_from_recipe(load_recipe(RECIPE, [*TINY, *student, "train.steps=1", f"model.init={source}",
                                                     f"supervised.distill.teacher={teacher_run}"]), num_classes=10)
    state, plain = method.encoder.state_dict(), vit.state_dict()
    assert type(method.encoder).__name__ == "VisionTransformerDistilled"
    assert all(torch.equal(state[k], v) for k, v in plain.items() if k != "pos_embed")
    assert torch.equal(state["blocks.1.mlp.fc2.weight"], plain["blocks.1.mlp.fc2.weight"])
    pos = state["pos_embed"]  # [1, 2 + L, D]: cls, dist, patches
    assert torch.equal(pos[:, :1], plain["pos_embed"][:, :1]) and torch.equal(pos[:, 1:2], plain["pos_embed"][:, :1])
    assert torch.equal(pos[:, 2:], plain["pos_embed"][:, 1:])
    assert torch.equal(state["dist_token"], plain["cls_token"])


def test_a_plain_vit_student_trains_distilled_through_the_cli(mae_run, teacher_run, train_shards, tmp_path):
    """`ssl-vit pretrain` of the recipe's plain ViT from our MAE run with a teacher: a DeiT student is trained (the
    two tokens part), exported as timm's distilled class (rebuilt by plain timm), evaluated on the heads' mean."""
    out = tmp_path / "student"
    assert main(["pretrain", "--recipe", RECIPE, f"data.train={train_shards}", f"train.out_dir={out}",
                 "train.steps=3", *TINY, *PLAIN, f"model.init={mae_run}",
                 f"supervised.distill.teacher={teacher_run}"]) == 0
    assert all("teacher_agreement" in json.loads(line) for line in (out / "log.jsonl").read_text().splitlines())
    student, meta = load_backbone(out)
    assert type(student).__name__ == "VisionTransformerDistilled" and meta["model_name"] == \
        "deit_tiny_distilled_patch16_224" and meta["create_kwargs"]["depth"] == 2 and meta["patch_size"] == 4
    assert not torch.equal(student.dist_token, student.cls_token)  # the copies parted under different targets
    method, _ = load_method(out)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        tokens = method.encoder.forward_features(images)
        heads = (method.encoder.head(tokens[:, 0]) + method.encoder.head_dist(tokens[:, 1])) / 2
        torch.testing.assert_close(method.encoder(images), heads)
    torch.testing.assert_close(pooled_features(student, images), (tokens[:, 0] + tokens[:, 1]) / 2)


def test_a_swin_cannot_become_a_student(teacher_run, tmp_path):
    """A Swin has no CLS token for a distillation token to sit beside: as model.init of a ViT student, one line."""
    swin_recipe = load_recipe(RECIPE, [*TINY, *SWIN, "train.steps=1"])
    spec = backbone_spec(swin_recipe)
    swin = export_backbone(create_backbone(spec), spec, tmp_path / "swin" / "backbone.safetensors")
    with pytest.raises(SslVitError, match="^model.init: a distillation token sits beside a plain ViT's CLS token; "
                                          "'swin_tiny_patch4_window7_224' is a swin"):
        method_from_recipe(load_recipe(RECIPE, [*TINY, *PLAIN, "train.steps=1", f"model.init={swin}",
                                                f"supervised.distill.teacher={teacher_run}"]), num_classes=10)


def test_a_vit_at_another_size_is_resampled_past_both_prefix_tokens(teacher_run, tmp_path):
    """timm's ViT-Ti (224 px, 16-px patches, 14×14 positions) into a ViT-Ti-sized student at 32 px on 4-px patches:
    the grid is resampled by timm's helper with the CLS and distillation positions kept, and a ViT of DeiT-S's size
    is named as timm names DeiT-S."""
    vit, _ = load_backbone("timm-random:vit_tiny_patch16_224")
    export = export_backbone(vit, BackboneSpec("vit_tiny_patch16_224"), tmp_path / "vit" / "backbone.safetensors")
    method = method_from_recipe(load_recipe(RECIPE, [*TINY, *PLAIN, "model.depth=12", "model.embed_dim=192",
                                                     "model.num_heads=3", "train.steps=1", f"model.init={export}",
                                                     f"supervised.distill.teacher={teacher_run}"]), num_classes=10)
    pos, plain = method.encoder.state_dict()["pos_embed"], vit.state_dict()["pos_embed"]  # [1, 2 + 64, D], [1, 197, D]
    assert pos.shape == (1, 66, 192)
    assert torch.equal(pos[:, 0], plain[:, 0]) and torch.equal(pos[:, 1], plain[:, 0])
    torch.testing.assert_close(pos[:, 2:], resample_abs_pos_embed(plain, [8, 8], num_prefix_tokens=1)[:, 1:])
    key = "blocks.11.attn.qkv.weight"
    assert torch.equal(method.encoder.state_dict()[key], vit.state_dict()[key])
    assert distilled_spec(BackboneSpec("vit_small_patch16_224")).name == "deit_small_distilled_patch16_224"
