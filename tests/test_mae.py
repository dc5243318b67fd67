"""MAE: masking, loss, position embeddings and the method, against references written here from the paper's equations
(He et al. 2021, Sec. 3) and on real CIFAR-10 images."""
import functools
import io
import math
import time

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from conftest import BUNDLED, read_tar_images
from PIL import Image

from ssl_vit.errors import SslVitError
from ssl_vit.losses.mae_loss import mae_loss, patchify, unpatchify
from ssl_vit.methods.mae import MAE
from ssl_vit.models.backbone import BackboneSpec
from ssl_vit.models.masking import random_masking
from ssl_vit.models.pos_embed import sincos_2d
from ssl_vit.seeding import step_generator, step_seed

SPEC = BackboneSpec(img_size=32, patch_size=4, kwargs=dict(depth=2, embed_dim=64, num_heads=2))
DECODER = dict(decoder_depth=1, decoder_dim=32, decoder_heads=4)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=None)
def real_images(n: int = 64) -> torch.Tensor:
    """n real CIFAR-10 training images (spread over the classes), ToTensor + normalise.  # [n, 3, 32, 32]"""
    files = read_tar_images(BUNDLED / "train.tar.gz")
    names = sorted(files, key=lambda k: (int(k.split("/")[1].split(".")[0]), k))[:n]
    imgs = [TF.normalize(TF.to_tensor(Image.open(io.BytesIO(files[k][0])).convert("RGB")), MEAN, STD) for k in names]
    return torch.stack(imgs)


def make_mae(seed: int = 0, **kw) -> MAE:
    torch.manual_seed(seed)
    return MAE(SPEC, **{**DECODER, **kw})


def batch(imgs):
    return {"views": [imgs], "label": torch.full((len(imgs),), -1), "key": [str(i) for i in range(len(imgs))]}


def seed_at(step=0, seed=0, micro=0) -> int:
    """The seed the trainer passes for micro-batch `micro` of `step` on rank 0."""
    return step_seed(seed, step, 0, micro)


# -- position embeddings ------------------------------------------------------------------------------------------
def numpy_sincos_2d(dim, rows, cols):
    """Transformer sin/cos (Vaswani et al. Sec. 3.5) per axis, exponent 2i/d over d = dim/2 channels per axis,
    sines then cosines; column index in the first half, row index in the second (MAE reference layout)."""
    d = dim // 2
    out = np.zeros((1 + rows * cols, dim))
    for r in range(rows):
        for c in range(cols):
            for half, pos in enumerate((c, r)):
                for i in range(d // 2):
                    angle = pos / 10000 ** (2 * i / d)
                    out[1 + r * cols + c, half * d + i] = math.sin(angle)
                    out[1 + r * cols + c, half * d + d // 2 + i] = math.cos(angle)
    return out


@pytest.mark.parametrize("dim,grid", [(64, (8, 8)), (32, (2, 3)), (8, (4, 4))])
def test_sincos_matches_numpy_formula(dim, grid):
    got = sincos_2d(dim, grid, cls_token=True)
    assert got.dtype == torch.float32 and got.shape == (1 + grid[0] * grid[1], dim)
    np.testing.assert_allclose(got.numpy(), numpy_sincos_2d(dim, *grid), atol=1e-6)
    assert torch.equal(sincos_2d(dim, grid), got[1:])


def test_sincos_rejects_bad_width():
    with pytest.raises(SslVitError, match="divisible by 4"):
        sincos_2d(66, 4)


def test_model_pos_embeds_are_fixed_sincos_and_not_optimised():
    m = make_mae()
    assert torch.equal(m.encoder.pos_embed[0], sincos_2d(64, 8, cls_token=True))
    assert torch.equal(m.decoder.pos_embed[0], sincos_2d(32, 8, cls_token=True))
    assert not m.encoder.pos_embed.requires_grad and not m.decoder.pos_embed.requires_grad
    in_opt = [p for g in m.param_groups(0.05) for p in g["params"]]
    ids = {id(p) for p in in_opt}
    assert len(ids) == len(in_opt)
    assert id(m.encoder.pos_embed) not in ids and id(m.decoder.pos_embed) not in ids
    assert ids == {id(p) for p in m.parameters() if p.requires_grad}
    no_decay = {id(p) for p in m.param_groups(0.05)[1]["params"]}
    assert id(m.encoder.cls_token) in no_decay and id(m.decoder.mask_token) in no_decay


# -- masking ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9, 0.33])
def test_random_masking_matches_reference(ratio):
    n, length, dim = 6, 64, 5
    x = torch.randn(n, length, dim, generator=torch.Generator().manual_seed(1))
    visible, mask, ids_restore = random_masking(x, ratio, step_generator(3, 7))
    keep = int(length * (1 - ratio))
    noise = torch.rand(n, length, generator=step_generator(3, 7)).numpy()
    for i in range(n):  # reference: per sample, keep the `keep` patches with the smallest noise, in that order
        kept = np.argsort(noise[i], kind="stable")[:keep]
        ref_mask = np.ones(length)
        ref_mask[kept] = 0
        np.testing.assert_array_equal(mask[i].numpy(), ref_mask)
        assert torch.equal(visible[i], x[i, torch.from_numpy(kept)])
    assert visible.shape == (n, keep, dim) and mask.sum(1).eq(length - keep).all()
    assert len({tuple(r.tolist()) for r in mask}) == n  # a different mask per sample
    masked_tokens = torch.zeros(n, length - keep, dim)
    restored = torch.gather(torch.cat([visible, masked_tokens], 1), 1, ids_restore[..., None].expand(-1, -1, dim))
    assert torch.equal(restored * (1 - mask[..., None]), x * (1 - mask[..., None]))


def test_masks_reproducible_from_seed_and_step_without_global_rng():
    x = torch.zeros(4, 64, 8)
    state = torch.get_rng_state()
    masks = {}
    for key in [(0, 5), (0, 5), (0, 6), (1, 5)]:
        generator = torch.Generator().manual_seed(seed_at(step=key[1], seed=key[0]))
        masks.setdefault(key, []).append(random_masking(x, 0.75, generator)[1])
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(*masks[(0, 5)])
    assert not torch.equal(masks[(0, 5)][0], masks[(0, 6)][0]) and not torch.equal(masks[(0, 5)][0], masks[(1, 5)][0])


def test_micro_batches_of_one_step_get_different_masks_and_no_call_advances_a_hidden_counter():
    m, imgs = make_mae(), real_images(4)
    seeds = [seed_at(step=s, micro=i) for s, i in ((3, 0), (3, 1), (4, 0))]
    assert len(set(seeds)) == 3
    losses = [m(batch(imgs), {}, s)["loss"] for s in seeds]
    assert len({loss.item() for loss in losses}) == 3
    assert torch.equal(m(batch(imgs), {}, seeds[0])["loss"], losses[0])  # a resumed run at step 3 draws the same
    with pytest.raises(TypeError, match="seed"):
        m(batch(imgs), {})


# -- loss ---------------------------------------------------------------------------------------------------------
def test_patchify_matches_hand_loop_and_inverts():
    imgs = torch.randn(2, 3, 8, 12)
    p = 4
    patches = patchify(imgs, p)
    assert patches.shape == (2, 6, 48)
    for gi in range(2):
        for gj in range(3):
            block = imgs[:, :, gi * p:(gi + 1) * p, gj * p:(gj + 1) * p]  # [N, C, p, p]
            assert torch.equal(patches[:, gi * 3 + gj], block.permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.equal(unpatchify(patches, p, (2, 3)), imgs)


def test_norm_pix_target_equals_hand_computation():
    target = torch.randn(2, 4, 12) * 3 + 1
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    hand = torch.empty_like(target)
    for i in range(2):
        for j in range(4):
            v = target[i, j].double()
            mean = v.sum() / 12
            var = ((v - mean) ** 2).sum() / 11  # unbiased, as the reference code's Tensor.var
            hand[i, j] = ((v - mean) / (var + 1e-6).sqrt()).float()
    assert mae_loss(hand, target, mask, norm_pix_loss=True).item() == pytest.approx(0.0, abs=1e-10)
    expected = sum((hand[i, j] ** 2).mean() for i, j in [(0, 0), (0, 2), (1, 3)]) / 3
    assert mae_loss(torch.zeros_like(target), target, mask, True).item() == pytest.approx(expected.item(), rel=1e-5)
    raw = sum((target[i, j] ** 2).mean() for i, j in [(0, 0), (0, 2), (1, 3)]) / 3
    assert mae_loss(torch.zeros_like(target), target, mask, False).item() == pytest.approx(raw.item(), rel=1e-6)


def test_loss_counts_only_masked_patches():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 16, 48, generator=gen), torch.randn(3, 16, 48, generator=gen)
    _, mask, _ = random_masking(torch.zeros(3, 16, 1), 0.75, step_generator(0))
    base = mae_loss(pred, target, mask)
    visible, masked = (mask == 0).nonzero()[0], (mask == 1).nonzero()[0]
    bumped = pred.clone()
    bumped[visible[0], visible[1]] += 5.0
    assert mae_loss(bumped, target, mask).item() == base.item()
    bumped = pred.clone()
    bumped[masked[0], masked[1]] += 5.0
    assert mae_loss(bumped, target, mask).item() > base.item() + 1e-3


# -- the method ---------------------------------------------------------------------------------------------------
def test_visible_only_encoder_equals_timm_forward_features_when_nothing_is_masked():
    m = make_mae().eval()
    imgs = real_images(8)
    m.mask_ratio = 0.0
    latent, mask, ids_restore = m.forward_encoder(imgs, step_generator(1))
    full = m.backbone().forward_features(imgs)  # [8, 65, 64]
    assert mask.sum() == 0 and full.shape == (8, 65, 64)
    torch.testing.assert_close(latent[:, 0], full[:, 0], atol=1e-5, rtol=1e-5)
    restored = torch.gather(latent[:, 1:], 1, ids_restore[..., None].expand(-1, -1, 64))
    torch.testing.assert_close(restored, full[:, 1:], atol=1e-5, rtol=1e-5)


def test_forward_is_reproducible_and_reconstruct_undoes_norm_pix():
    a, b = make_mae(), make_mae()
    imgs = real_images(16)
    out = a(batch(imgs), {}, seed_at(step=5, seed=2))
    assert out["mask_ratio"] == 0.75 and torch.equal(out["loss"], b(batch(imgs), {}, seed_at(step=5, seed=2))["loss"])
    assert not torch.equal(out["loss"], make_mae()(batch(imgs), {}, seed_at(step=6, seed=2))["loss"])
    pred_imgs, mask_imgs = a.reconstruct(imgs[:4], step_generator(9))
    assert a.training and pred_imgs.shape == mask_imgs.shape == (4, 3, 32, 32)
    assert mask_imgs.mean().item() == pytest.approx(0.75)
    a.eval()
    latent, mask, ids = a.forward_encoder(imgs[:4], step_generator(9))
    raw = a.decoder(latent, ids)
    target = patchify(imgs[:4], 4)
    mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(patchify(pred_imgs, 4), raw * std + mean, atol=1e-5, rtol=1e-5)
    assert torch.equal(patchify(mask_imgs, 4)[..., 0], mask)


def test_mae_loss_falls_on_real_images():
    torch.set_num_threads(1)
    m = make_mae()
    opt = torch.optim.AdamW(m.param_groups(0.05), lr=1.5e-3, betas=(0.9, 0.95))
    imgs, losses, times = real_images(64), [], []
    for step in range(30):
        t0 = time.perf_counter()
        loss = m(batch(imgs), {}, seed_at(step))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.8 * losses[0], losses
    assert torch.equal(m.encoder.pos_embed[0], sincos_2d(64, 8, cls_token=True))  # stayed frozen
    print(f"\nMAE tiny, batch 64 @ 32 px: {1000 * np.median(times[1:]):.1f} ms/step (median), "
          f"loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}")


def test_resumed_run_repeats_losses_with_accumulation():
    """As the trainer drives it: 2 accumulated micro-batches per step; stop after 2 steps, reload, run 2 more."""
    imgs = real_images(16)

    def run(m, opt, steps):
        losses = []
        for step in steps:
            total = 0.0
            for i, micro in enumerate(imgs.chunk(2)):
                loss = m(batch(micro), {}, seed_at(step, seed=3, micro=i))["loss"] / 2
                loss.backward()
                total += loss.item()
            opt.step()
            opt.zero_grad()
            losses.append(total)
        return losses

    def optimizer(m):
        return torch.optim.AdamW(m.param_groups(0.05), lr=1e-3, betas=(0.9, 0.95))

    straight = make_mae()
    expected = run(straight, optimizer(straight), range(4))
    first = make_mae()
    first_opt = optimizer(first)
    head = run(first, first_opt, range(2))
    resumed = make_mae(seed=7)
    resumed.load_state_dict(first.state_dict())
    resumed_opt = optimizer(resumed)
    resumed_opt.load_state_dict(first_opt.state_dict())
    torch.manual_seed(1234)  # the global RNG state must not matter
    assert head + run(resumed, resumed_opt, range(2, 4)) == expected


def test_backbone_is_plain_timm_vit_on_full_images():
    enc = make_mae().backbone()
    assert type(enc).__name__ == "VisionTransformer"
    assert enc.forward_features(real_images(2)).shape == (2, 65, 64)
    assert enc(real_images(2)).shape == (2, 64)


@pytest.mark.parametrize("kw,match", [(dict(mask_ratio=1.0), r"mae.mask_ratio: must be in \[0, 1\)"),
                                      (dict(mask_ratio=0.0), "mae.mask_ratio: 0.0 masks none"),
                                      (dict(decoder_dim=30), "mae.decoder_dim: 30 is not divisible")])
def test_bad_config(kw, match):
    """The constructor checks through the settings class a recipe is checked with (one source of checks): the
    recipe key's message, raised as a ValueError too."""
    with pytest.raises(ValueError, match=match):
        make_mae(**kw)


def test_bad_inputs():
    m = make_mae()
    with pytest.raises(SslVitError, match=r"views\[0\].*\[2, 3, 16, 16\]"):
        m(batch(torch.zeros(2, 3, 16, 16)), {}, 0)
    with pytest.raises(TypeError, match="seed"):
        m({"views": [torch.zeros(2, 3, 32, 32)], "label": torch.zeros(2)}, {})
    no_cls = BackboneSpec(img_size=32, patch_size=4, kwargs=dict(depth=1, embed_dim=64, num_heads=2,
                                                               class_token=False, global_pool="avg"))
    with pytest.raises(SslVitError, match="class token"):
        MAE(no_cls, **DECODER)
