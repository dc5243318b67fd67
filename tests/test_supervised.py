"""Supervised baseline: losses against hand formulas, training on real CIFAR-10 images, seeded mixup, bad input."""
import functools
import io
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from conftest import BUNDLED, read_tar_images
from PIL import Image

from ssl_vit.errors import SslVitError
from ssl_vit.losses.classification import classification_loss, top1_accuracy
from ssl_vit.config import load_recipe
from ssl_vit.methods import build_method
from ssl_vit.methods.supervised import Supervised
from ssl_vit.models.backbone import BackboneSpec
from ssl_vit.seeding import step_seed

SPEC = BackboneSpec(img_size=32, patch_size=4, kwargs=dict(depth=2, embed_dim=64, num_heads=2))
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)


@functools.lru_cache(maxsize=None)
def real_batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """n labelled CIFAR-10 training images, classes interleaved.  # [n, 3, 32, 32], [n]"""
    files = read_tar_images(BUNDLED / "train.tar.gz")
    names = sorted(files, key=lambda k: (int(k.split("/")[1].split(".")[0]), k))[:n]
    imgs = [TF.normalize(TF.to_tensor(Image.open(io.BytesIO(files[k][0])).convert("RGB")), MEAN, STD) for k in names]
    return torch.stack(imgs), torch.tensor([files[k][1] for k in names])


def batch(imgs, labels):
    return {"views": [imgs], "label": labels, "key": [str(i) for i in range(len(imgs))]}


def seed_at(step=0, seed=0) -> int:
    """The seed the trainer passes for the first micro-batch of `step` on rank 0."""
    return step_seed(seed, step, 0, 0)


def make(seed=0, **kw) -> Supervised:
    torch.manual_seed(seed)
    return Supervised(SPEC, num_classes=10, **kw)


def test_smoothed_cross_entropy_matches_formula():
    logits, labels = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 3, 1, 1, 2])
    logp = logits.double().log_softmax(-1)
    eps = 0.1  # Szegedy et al.: q' = (1 - ε) δ_y + ε / C
    hand = -((1 - eps) * logp[torch.arange(5), labels] + eps * logp.mean(-1)).mean()
    assert classification_loss(logits, labels, eps).item() == pytest.approx(hand.item(), rel=1e-6)
    soft = torch.softmax(torch.randn(5, 4), -1)
    assert classification_loss(logits, soft).item() == pytest.approx(-(soft * logp).sum(-1).mean().item(), rel=1e-6)
    assert top1_accuracy(logits, logits.argmax(-1)) == 1.0
    assert top1_accuracy(logits, torch.tensor([9, 9, 9, 9, 9])) == 0.0


def test_supervised_learns_real_images():
    torch.set_num_threads(1)
    m = make()
    assert m.encoder.head.out_features == 10
    imgs, labels = real_batch(64)
    assert sorted(set(labels.tolist())) == list(range(10))
    opt = torch.optim.AdamW(m.param_groups(0.05), lr=1e-3)
    losses, accs = [], []
    for step in range(30):
        out = m(batch(imgs, labels), {}, seed_at(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        accs.append(out["acc"])
    logits = m.encoder(imgs)
    assert accs[-1] == pytest.approx((logits.argmax(-1) == labels).float().mean().item(), abs=0.1)
    assert losses[0] == pytest.approx(math.log(10), abs=0.4)
    assert np.mean(losses[-5:]) < 0.75 * losses[0], losses
    assert np.mean(accs[-5:]) > 0.5 > accs[0]


def test_mixup_cutmix_seeded_runs_and_keeps_global_rng():
    imgs, labels = real_batch(16)
    original = imgs.clone()
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a, b = make(mixup=0.8, cutmix=1.0), make(mixup=0.8, cutmix=1.0)
    out_a = a(batch(imgs, labels), {}, seed_at(step=4, seed=1))
    out_b = b(batch(imgs, labels), {}, seed_at(step=4, seed=1))
    assert torch.equal(out_a["loss"], out_b["loss"])  # same (seed, step) → same λ and boxes: exact resume
    losses = {a(batch(imgs, labels), {}, seed_at(step=s, seed=1))["loss"].item() for s in range(5, 10)}
    assert len(losses) > 1
    assert np.array_equal(np.random.get_state()[1], before) and torch.equal(imgs, original)
    out_a["loss"].backward()
    assert all(math.isfinite(p.grad.abs().sum().item()) for p in a.parameters() if p.grad is not None)
    plain = make()(batch(imgs, labels), {}, seed_at())["loss"]
    assert not torch.equal(out_b["loss"], plain)
    opt = torch.optim.AdamW(a.param_groups(0.05), lr=1e-3)
    for step in range(3):
        loss = a(batch(imgs, labels), {}, seed_at(step))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item())


def reference_mix(imgs, mixed, labels, smoothing: float, classes: int = 10):
    """(kind, λ, soft targets) recovered from the images alone, by the papers' rules: mixup (Zhang et al. 2018) is
    λ·x + (1-λ)·x_pair, cutmix (Yun et al. 2019) pastes one box of x_pair with λ = 1 - box area / image area; the
    pair of sample i is sample n-1-i (the batch reversed); each one-hot target is smoothed to (1-ε)·δ + ε/C."""
    pair = imgs.flip(0)
    if torch.equal(mixed, imgs):
        kind, lam = "none", 1.0
    elif torch.equal(torch.where(mixed == imgs, pair, mixed), pair):  # every pixel is its own or the pair's
        changed = (mixed != imgs).any(1).any(0)  # [H, W]: the box, over the whole batch
        rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
        top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        expected = imgs.clone()
        expected[:, :, top:bottom, left:right] = pair[:, :, top:bottom, left:right]
        assert torch.equal(mixed, expected), "cutmix must paste exactly one box of the paired image"
        kind, lam = "cutmix", 1.0 - (bottom - top) * (right - left) / (imgs.shape[2] * imgs.shape[3])
    else:
        d = (imgs - pair).double()
        lam = float(((mixed - pair).double() * d).sum() / (d * d).sum())
        torch.testing.assert_close(mixed, lam * imgs + (1 - lam) * pair, atol=1e-5, rtol=0)
        kind = "mixup"
    smooth = torch.full((len(labels), classes), smoothing / classes, dtype=torch.float64)
    smooth[torch.arange(len(labels)), labels] += 1.0 - smoothing
    return kind, lam, lam * smooth + (1 - lam) * smooth.flip(0)


def test_mixup_cutmix_targets_are_soft_smoothed_and_sum_to_one():
    imgs, labels = real_batch(16)
    m = make(mixup=0.8, cutmix=1.0, mixup_prob=0.5, label_smoothing=0.1)
    seen = {}
    captured = []
    m.encoder.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().clone()))
    for step in range(24):
        mixed, targets = m._mix(imgs, labels, seed_at(step))
        kind, lam, reference = reference_mix(imgs, mixed, labels, 0.1)
        seen[kind] = seen.get(kind, 0) + 1
        assert targets.shape == (16, 10) and 0.0 < lam <= 1.0
        torch.testing.assert_close(targets.double(), reference, atol=1e-6, rtol=0)
        torch.testing.assert_close(targets.sum(1).double(), torch.ones(16, dtype=torch.float64), atol=1e-6, rtol=0)
        # forward() trains on these images and targets: the soft cross-entropy of its own logits
        loss = m(batch(imgs, labels), {}, seed_at(step))["loss"]
        assert torch.equal(captured[-1], mixed)
        logp = m.encoder(mixed).double().log_softmax(-1)
        assert loss.item() == pytest.approx(-(reference * logp).sum(-1).mean().item(), rel=1e-5)
    assert set(seen) == {"none", "mixup", "cutmix"}, seen  # mixup_prob=0.5: every kind occurs in 24 steps
    assert min(seen.values()) >= 3, seen


def test_bad_input():
    imgs, labels = real_batch(8)
    m = make()
    with pytest.raises(SslVitError, match="supervised training needs labels"):
        m(batch(imgs, torch.full((8,), -1)), {}, 0)
    with pytest.raises(SslVitError, match="num_classes=10"):
        m(batch(imgs, labels + 10), {}, 0)
    with pytest.raises(ValueError, match=r"data.num_classes: supervised training needs ≥ 2 classes, got 1"):
        Supervised(SPEC, num_classes=1)
    with pytest.raises(ValueError, match=r"supervised.label_smoothing: must be in \[0, 1\), got 1.5"):  # a recipe's
        Supervised(SPEC, num_classes=10, label_smoothing=1.5)
    with pytest.raises(SslVitError, match="data.num_classes: supervised training needs ≥ 2 classes"):
        build_method(load_recipe(None, ["method=supervised", "train.steps=1"]), num_classes=1)
