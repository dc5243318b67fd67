"""An odd batch under mixup/cutmix (an odd per-process batch, or one the device path dropped an undecodable image
from): the even part is mixed as it would be alone, the last image trains unmixed on its smoothed one-hot target."""
import torch
from test_supervised import batch, make, real_batch, reference_mix, seed_at


def test_odd_batch_mixes_all_but_the_last_image():
    imgs, labels = real_batch(16)
    odd_imgs, odd_labels = imgs[:15], labels[:15]
    m = make(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    for step in range(6):
        mixed, targets = m._mix(odd_imgs, odd_labels, seed_at(step))
        alone, alone_targets = m._mix(odd_imgs[:14], odd_labels[:14], seed_at(step))
        assert torch.equal(mixed[:14], alone) and torch.equal(targets[:14], alone_targets)
        assert torch.equal(mixed[14], odd_imgs[14])
        smooth = torch.full((10,), 0.01)
        smooth[odd_labels[14]] += 0.9
        torch.testing.assert_close(targets[14], smooth)
        kind, _, reference = reference_mix(odd_imgs[:14], mixed[:14], odd_labels[:14], 0.1)
        torch.testing.assert_close(targets[:14].double(), reference, atol=1e-6, rtol=0)
        torch.testing.assert_close(targets.sum(1), torch.ones(15))
    loss = m(batch(odd_imgs, odd_labels), {}, seed_at(7))["loss"]
    assert torch.isfinite(loss)
    one = m(batch(imgs[:1], labels[:1]), {}, seed_at(8))["loss"]  # a batch of one: nothing to pair it with
    assert torch.isfinite(one)
