"""Augmentation views: preset shapes on real CIFAR images, determinism from torch's RNG alone, DINO per-view
settings, validation messages, and the evaluation crop against a hand-written PIL reference. (Distributions against
the torchvision pipelines and the device path: test_view_paths.py.)"""
import io
import pickle
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image, ImageOps

from ssl_vit.config import load_recipe
from ssl_vit.errors import SslVitError
from ssl_vit.transforms import (MultiViewTransform, TorchSeededRandAugment, ViewSpec, denormalize, dino_views,
                                eval_views, mae_views, normalize, supervised_views, views_from_recipe)

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """The first 4 images of the bundled CIFAR-10 train split (32x32 RGB JPEGs)."""
    out = []
    with tarfile.open(ROOT / "data" / "cifar10_subset" / "train.tar.gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                out.append(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
            if len(out) == 4:
                return out
    raise AssertionError("bundled train split has fewer than 4 images")


@pytest.fixture(scope="module")
def image(images) -> Image.Image:
    assert images[0].size == (32, 32)
    return images[0]


def reference_normalize(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] → normalised float [3, H, W], written independently of the package."""
    return torch.from_numpy(((pixels / 255.0 - MEAN) / STD).transpose(2, 0, 1)).float()


def views_of(specs, img, seed):
    torch.manual_seed(seed)
    return MultiViewTransform(specs)(img)


# -- shapes and counts --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("specs,sizes", [
    (mae_views(224), [224]),
    (mae_views(32), [32]),
    (dino_views(224, 96, 10), [224, 224] + [96] * 10),
    (dino_views(32, 16, 4), [32, 32, 16, 16, 16, 16]),
    (dino_views(32, 16, 0), [32, 32]),
    (supervised_views(224, "rand-m9-mstd0.5-inc1"), [224]),
    (supervised_views(32), [32]),
    (eval_views(224), [224]),
    (eval_views(32, resize=32), [32]),
], ids=["mae224", "mae32", "dino224/96x10", "dino32/16x4", "dino32-no-local", "sup224-ra", "sup32", "eval224",
        "eval32"])
def test_presets_give_the_views_their_recipes_ask_for(specs, sizes, image):
    mv = MultiViewTransform(specs)
    views = views_of(specs, image, 0)
    assert mv.num_views == len(views) == len(sizes) and mv.sizes == sizes
    assert [tuple(v.shape) for v in views] == [(3, s, s) for s in sizes]
    assert all(type(v) is torch.Tensor and v.dtype == torch.uint8 for v in views)  # normalised once per batch


def test_cifar_sizes_come_from_the_shipped_recipe_and_overrides(image):
    path = ROOT / "recipes" / "dino_vit_tiny_cifar10.yaml"
    assert MultiViewTransform(views_from_recipe(load_recipe(path).views)).sizes == [32, 32, 16, 16]
    recipe = load_recipe(path, ["views.num_local=3", "views.local_size=8"])
    mv = MultiViewTransform(views_from_recipe(recipe.views))
    assert mv.sizes == [32, 32, 8, 8, 8] and [v.shape[-1] for v in mv(image)] == [32, 32, 8, 8, 8]


def test_dino_preset_blur_can_be_switched_off_from_a_recipe():
    path = ROOT / "recipes" / "dino_vit_small_patch16_in1k.yaml"
    assert [v.blur for v in views_from_recipe(load_recipe(path).views)] == [1.0, 0.1, 0.5]  # the paper's
    off = views_from_recipe(load_recipe(path, ["views.blur=false"]).views)
    assert [v.blur for v in off] == [0.0, 0.0, 0.0] and [v.solarize for v in off] == [0.0, 0.2, 0.0]
    with pytest.raises(SslVitError, match="views.blur"):
        views_from_recipe(load_recipe(path, ["views.blur=3"]).views)


# -- determinism --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("specs", [dino_views(32, 16, 4), supervised_views(32, "rand-m9-mstd0.5-inc1")],
                         ids=["dino", "supervised-randaugment"])
def test_views_depend_on_the_torch_seed_only(specs, image):
    random.seed(1)
    np.random.seed(1)
    a = views_of(specs, image, 7)
    random.seed(2)  # Python's and NumPy's streams moved: the views must not change
    np.random.seed(2)
    b = views_of(specs, image, 7)
    c = views_of(specs, image, 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_randaugment_draws_from_torch_and_leaves_python_and_numpy_streams_alone(images):
    op = TorchSeededRandAugment("rand-m9-mstd0.5", 32, MEAN, "bicubic")
    random.seed(3)
    np.random.seed(3)
    expect_py, expect_np = random.random(), np.random.rand()
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(0)
    outs = [np.array(op(img)) for img in images]
    assert (random.random(), np.random.rand()) == (expect_py, expect_np)
    torch.manual_seed(0)
    assert all(np.array_equal(o, np.array(op(img))) for o, img in zip(outs, images))
    assert any(not np.array_equal(o, np.array(img)) for o, img in zip(outs, images))  # it does augment


def test_a_63_bit_sample_seed_on_torchs_generator_alone_reproduces_every_view(image):
    """What the stream does per sample: a `stable_seed` (beyond NumPy's 32-bit seed range) on torch's CPU generator
    alone; RandAugment's Python and NumPy draws follow from it."""
    from ssl_vit.seeding import stable_seed

    seed = stable_seed(0, "views", 3, "some/sample-key")
    assert seed >= 2 ** 32
    transform = MultiViewTransform(dino_views(32, 16, 2) + supervised_views(32, "rand-m9-mstd0.5"))
    torch.default_generator.manual_seed(seed)
    first = transform(image)
    random.seed(5)
    np.random.seed(5)
    torch.default_generator.manual_seed(seed)
    assert all(torch.equal(x, y) for x, y in zip(first, transform(image)))


def test_multiview_transform_pickles_for_dataloader_workers(image):
    mv = MultiViewTransform(dino_views(32, 16, 2) + supervised_views(32, "rand-m9-mstd0.5"))
    clone = pickle.loads(pickle.dumps(mv))
    torch.manual_seed(4)
    a = mv(image)
    torch.manual_seed(4)
    assert all(torch.equal(x, y) for x, y in zip(a, clone(image)))


# -- DINO per-view settings ---------------------------------------------------------------------------------------
def test_dino_views_carry_the_papers_per_view_augmentations():
    specs = [s for s in dino_views(224, 96, 10) for _ in range(s.count)]
    assert len(specs) == 12
    assert [s.blur for s in specs] == [1.0, 0.1] + [0.5] * 10 and [s.solarize for s in specs] == [0.0, 0.2] + [0.0] * 10
    assert [s.blur_kernel for s in specs] == [23] * 2 + [9] * 10
    for s, size, scale in zip(specs, [224, 224, 96], [(0.4, 1.0), (0.4, 1.0), (0.05, 0.4)]):
        assert (s.color_jitter, s.jitter_strength, s.grayscale, s.flip) == (0.8, (0.4, 0.4, 0.2, 0.1), 0.2, 0.5)
        assert (s.size, s.scale, s.interpolation) == (size, scale, "bicubic")
    assert [s.blur_kernel for s in dino_views(32, 16, 1)] == [3] * 3


def test_mae_and_supervised_presets():
    (mae,) = mae_views(224)
    assert (mae.scale, mae.flip, mae.interpolation, mae.color_jitter, mae.blur) == ((0.2, 1.0), 0.5, "bicubic", 0, 0)
    (sup,) = supervised_views(224, "rand-m9-mstd0.5-inc1")
    assert (sup.scale, sup.flip, sup.randaugment) == ((0.08, 1.0), 0.5, "rand-m9-mstd0.5-inc1")
    assert isinstance(MultiViewTransform([sup]).randaugments[0], TorchSeededRandAugment)
    assert MultiViewTransform([mae]).randaugments == [None]


# -- single-op references -----------------------------------------------------------------------------------------
def fixed(**kw) -> ViewSpec:
    """A 32-px view without crop or flip randomness (centre crop of a 32-px image is the image)."""
    return ViewSpec(32, crop="center", resize=32, flip=0.0, **kw)


def view(spec: ViewSpec, image) -> torch.Tensor:
    return MultiViewTransform([spec])(image)[0]


def test_solarize_and_grayscale_match_pil(image):
    assert np.array_equal(view(fixed(solarize=1.0), image).permute(1, 2, 0).numpy(),
                          np.array(ImageOps.solarize(image, 128)))
    assert np.array_equal(view(fixed(grayscale=1.0), image).permute(1, 2, 0).numpy(),
                          np.array(image.convert("L").convert("RGB")))


def test_blur_smooths_and_jitter_changes_colours(images):
    def roughness(t):
        t = t.float()
        return (t[:, :, 1:] - t[:, :, :-1]).abs().mean() + (t[:, 1:] - t[:, :-1]).abs().mean()

    torch.manual_seed(0)
    for img in images:
        assert roughness(view(fixed(blur=1.0), img)) < roughness(view(fixed(), img))
        assert not torch.equal(view(fixed(color_jitter=1.0), img), view(fixed(), img))


def test_normalisation_matches_torchvision(image):
    reference = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(MEAN), list(STD))])
    assert torch.allclose(normalize(view(fixed(), image)), reference(image), atol=1e-6)


# -- evaluation transform -----------------------------------------------------------------------------------------
def test_eval_view_resizes_shorter_side_and_centre_crops():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))  # H 40, W 60
    transform = MultiViewTransform(eval_views(32, resize=36))
    expected = reference_normalize(np.array(img.resize((54, 36), Image.BICUBIC).crop((11, 2, 43, 34))))
    torch.manual_seed(0)
    a = transform(img)[0]
    torch.manual_seed(1)
    b = transform(img)[0]
    assert torch.equal(a, b) and torch.allclose(normalize(a), expected, atol=1e-5)


def test_eval_default_resize_ratio_and_identity_at_cifar_size(image):
    assert eval_views(224)[0].resize_to == 256 and eval_views(32)[0].resize_to == 37
    view = normalize(MultiViewTransform(eval_views(32, resize=32))(image)[0])
    assert torch.allclose(view, reference_normalize(np.array(image)), atol=1e-5)
    assert torch.allclose(denormalize(view), torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255,
                          atol=1e-5)
    batch = torch.stack([view, view])  # [2, 3, 32, 32]
    assert denormalize(batch).shape == batch.shape


# -- recipes and validation ---------------------------------------------------------------------------------------
def test_explicit_list_equals_the_preset(image):
    jitter = {"color_jitter": 0.8, "jitter_strength": [0.4, 0.4, 0.2, 0.1], "grayscale": 0.2, "flip": 0.5}
    explicit = [{"size": 32, "scale": [0.4, 1], "blur": 1, "global_view": True, **jitter},
                {"size": 32, "scale": [0.4, 1], "blur": 0.1, "solarize": 0.2, "global_view": True, **jitter},
                {"size": 16, "count": 4, "scale": [0.05, 0.4], "blur": 0.5, **jitter}]
    preset = views_from_recipe({"preset": "dino", "global_size": 32, "local_size": 16, "num_local": 4})
    assert views_from_recipe(explicit) == preset == dino_views(32, 16, 4)
    assert all(torch.equal(x, y) for x, y in zip(views_of(views_from_recipe(explicit), image, 3),
                                                 views_of(preset, image, 3)))
    assert views_from_recipe("mae") == mae_views() and views_from_recipe(preset) == preset


@pytest.mark.parametrize("value,message", [
    ({"preset": "dino", "global_size": 32, "local_size": 48}, "views.local_size: local crops (48 px) must not be"),
    ({"preset": "dino", "num_local": -1}, "views.num_local: must be >= 0"),
    ({"preset": "dino", "local_scale": [0.5, 0.4]}, "views.local_scale: need 0 < min <= max <= 1"),
    ({"preset": "dino", "num_locals": 4}, "unknown view key 'views.num_locals' for preset 'dino'"),
    ({"preset": "dino", "global_size": "big"}, "views.global_size: expected an integer, got 'big'"),
    ({"preset": "mae", "size": 0}, "views.size: must be > 0"),
    ({"preset": "supervised", "randaugment": "rand-q9"}, "views.randaugment: 'rand-q9' is not a timm RandAugment"),
    ({"preset": "eval", "size": 32, "resize": 16}, "views.resize: must be >= views.size 32"),
    ({"preset": "byol"}, "views.preset: unknown preset 'byol'"),
    ({"size": 32}, "views: a mapping needs 'preset'"),
    (3, "views: expected a preset name"),
    ([], "views: expected a preset name"),
    ([{"size": 32}, {"size": 16, "blurr": 0.5}], "unknown view key 'views[1].blurr'"),
    ([{"size": 32}, "small"], "views[1]: expected a mapping of view keys"),
    ([{"count": 2}], "views[0].size: missing"),
    ([{"size": 32.0}], "views[0].size: expected an integer, got 32.0"),
    ([{"size": True}], "views[0].size: expected an integer, got True"),
    ([{"size": 32, "count": 0}], "views[0].count: must be >= 1"),
    ([{"size": 32, "scale": [0.0, 1.0]}], "views[0].scale: need 0 < min <= max <= 1"),
    ([{"size": 32, "scale": [0.5, 0.2]}], "views[0].scale: need 0 < min <= max <= 1"),
    ([{"size": 32, "scale": [0.5]}], "views[0].scale: expected a list of 2 numbers"),
    ([{"size": 32, "ratio": [2, 1]}], "views[0].ratio: need 0 < min <= max"),
    ([{"size": 32, "blur": 1.5}], "views[0].blur: a probability must be in [0, 1], got 1.5"),
    ([{"size": 32, "solarize": -0.1}], "views[0].solarize: a probability must be in [0, 1]"),
    ([{"size": 32, "color_jitter": "yes"}], "views[0].color_jitter: expected a number, got 'yes'"),
    ([{"size": 32, "jitter_strength": [0.4, 0.4, 0.2, 0.9]}], "views[0].jitter_strength: need brightness"),
    ([{"size": 32, "crop": "random"}], "views[0].crop: must be one of rrc, center, got 'random'"),
    ([{"size": 32, "crop": "center", "resize": 20}], "views[0].resize: must be 0"),
    ([{"size": 32, "mean": [0.5, 0.5, 0.5]}], "unknown view key 'views[0].mean'"),
    ([{"size": 32, "interpolation": "lanczos"}], "views[0].interpolation: must be one of"),
    ([{"size": 1, "blur": 0.5}], "views[0].blur: a blurred view needs size >= 2"),
])
def test_bad_views_name_the_key_in_one_line(value, message):
    with pytest.raises(SslVitError) as err:
        views_from_recipe(value)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_direct_construction_is_validated_and_normalised():
    with pytest.raises(SslVitError, match=r"ViewSpec.flip: a probability must be in \[0, 1\]"):
        ViewSpec(32, flip=2.0)
    spec = ViewSpec(32, scale=[0.3, 1], flip=1)  # YAML-style list and int become a tuple and a float
    assert spec.scale == (0.3, 1.0) and isinstance(spec.flip, float) and hash(spec)


def test_bad_images_and_tensors_fail_clearly(image):
    transform = MultiViewTransform(mae_views(32))
    with pytest.raises(SslVitError, match="expected a PIL image, got Tensor"):
        transform(torch.zeros(3, 32, 32))
    assert transform(image.convert("L"))[0].shape == (3, 32, 32)  # grayscale input becomes 3 channels
    with pytest.raises(SslVitError, match=r"denormalize: expected a tensor \[..., 3, H, W\]"):
        denormalize(torch.zeros(1, 32, 32))
