"""The view paths against the reference pipelines, on real photographs (~500×375 JPEG crops of scikit-image's).

Distribution = choices × pixels given the choices. The choices (crop box, flip, jitter order and factors, grayscale,
blur sigma, solarize) are compared with torchvision's own samplers by two-sample Kolmogorov-Smirnov tests at
alpha = 1e-3 on 4,000-20,000 draws; the pixels made from given choices are compared with torchvision's functional ops
on a full PIL decode (paired, same choices). End to end, per-view colour and sharpness statistics of our views and of
the reference pipeline (torchvision transforms on a full decode, as the package made views before) pass the same KS
test. The device path is compared with the CPU path on CPU tensors (paired, same seeds). Every test is seeded, so it
passes or fails the same way on every run.
"""
import importlib.util
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T1
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from ssl_vit.data.loader import move_to
from ssl_vit.data.samples import BadSample, decode_image, open_image
from ssl_vit.errors import SslVitError
from ssl_vit.transforms import MultiViewTransform, ViewSpec, dino_views, eval_views, mae_views, normalize
from ssl_vit.transforms import params as P
from ssl_vit.transforms.gpu_views import (EncodedBatch, EncodedViews, collate_views, device_views, resolve_decode,
                                          views_to_device)

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [data for _, data in load_tool("make_photo_shards").photo_jpegs(120, seed=0)]


def sample(data: bytes, ext: str = "jpg", key: str = "s0") -> dict:
    return {ext: data, "__key__": key, "__url__": "memory"}


def ks_statistic(a, b) -> float:
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    points = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, points, "right") / len(a) -
                               np.searchsorted(b, points, "right") / len(b))))


def ks_critical(n: int, m: int, alpha: float = 1e-3) -> float:
    """The two-sample KS statistic exceeds this with probability alpha when both samples share a distribution."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def assert_same_distribution(ours, reference, what: str):
    d, crit = ks_statistic(ours, reference), ks_critical(len(ours), len(reference))
    assert d < crit, f"{what}: KS statistic {d:.3f} >= {crit:.3f}"


# -- the choices ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,scale", [((500, 375), (0.2, 1.0)), ((500, 375), (0.05, 0.4)), ((600, 40), (0.2, 1.0))],
                         ids=["mae", "dino-local", "thin-image-fallbacks"])
def test_crop_boxes_follow_torchvision(size, scale):
    n, (width, height) = 4000, size
    torch.manual_seed(0)
    x, y, w, h = P.draw_params(ViewSpec(96, scale=scale), n, width, height)[:, [P.X, P.Y, P.W, P.H]].T
    torch.manual_seed(1)
    image = Image.new("RGB", size)
    i, j, rh, rw = np.array([T1.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)]).T
    for name, ours, ref in [("area", w * h, rw * rh), ("log ratio", np.log(w / h), np.log(rw / rh)),
                            ("centre x", x + w / 2, j + rw / 2), ("centre y", y + h / 2, i + rh / 2)]:
        assert_same_distribution(ours, ref, name)
    assert (x >= 0).all() and (x + w <= width).all() and (y >= 0).all() and (y + h <= height).all()


def test_flip_jitter_gray_blur_solarize_choices_follow_torchvision():
    n, spec = 20000, dino_views(224)[1]  # flip 0.5, jitter 0.8, gray 0.2, blur 0.1, solarize 0.2
    torch.manual_seed(0)
    p = P.draw_params(spec, n, 500, 375)
    for column, prob in [(P.FLIP, 0.5), (P.JITTER, 0.8), (P.GRAY, 0.2), (P.BLUR, 0.1), (P.SOLARIZE, 0.2)]:
        assert abs(p[:, column].mean() - prob) < 4 * math.sqrt(prob * (1 - prob) / n)
    torch.manual_seed(1)
    ref = [T1.ColorJitter.get_params((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)) for _ in range(n)]
    for k, name in enumerate(["brightness", "contrast", "saturation", "hue"]):
        assert_same_distribution(p[:, P.BRIGHTNESS + k], [r[1 + k] for r in ref], name)
    orders = {}
    for row in p[:, P.ORDER:P.ORDER + 4].astype(int):
        orders[tuple(row)] = orders.get(tuple(row), 0) + 1
    chi2 = sum((c - n / 24) ** 2 / (n / 24) for c in orders.values())
    assert len(orders) == 24 and chi2 < 49.7  # 23 degrees of freedom, alpha = 1e-3
    assert_same_distribution(p[:, P.SIGMA], torch.empty(n).uniform_(0.1, 2.0).numpy(), "blur sigma")


# -- the pixels, given the choices ----------------------------------------------------------------------------------
def torchvision_view(full: Image.Image, spec: ViewSpec, row: np.ndarray, on_tensors: bool = False) -> torch.Tensor:
    """The view torchvision's functional ops make from the full decode with the choices in `row` (uint8): on PIL
    images (the reference pipelines), or with the colour ops on uint8 tensors."""
    x, y, w, h = (int(v) for v in row[[P.X, P.Y, P.W, P.H]])
    view = TF.resized_crop(full, y, x, h, w, [spec.size, spec.size], interpolation=T.InterpolationMode.BICUBIC)
    if row[P.FLIP]:
        view = TF.horizontal_flip(view)
    if on_tensors:
        view = TF.pil_to_tensor(view)
    if row[P.JITTER]:
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        for op in row[P.ORDER:P.ORDER + 4].astype(int):
            view = ops[op](view, float(row[P.BRIGHTNESS + op]))
    if row[P.GRAY]:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    pixels = view if on_tensors else TF.pil_to_tensor(view)
    if row[P.BLUR]:
        k, sigma = spec.blur_kernel, float(row[P.SIGMA])
        pixels = TF.gaussian_blur(pixels.float(), [k, k], [sigma, sigma]).round().clamp(0, 255).to(torch.uint8)
    if row[P.SOLARIZE]:
        pixels = TF.solarize(pixels, 128)
    return pixels


@pytest.mark.parametrize("specs", [mae_views(224), dino_views(224, 96, 4)], ids=["mae", "dino"])
def test_same_choices_make_torchvision_pixels(photos, specs):
    """torch's antialiased resampling is PIL's to ±1 grey level and the blur kernel is truncated at 4 sigma, so views
    without colour jitter agree to a fraction of a grey level on average. Jittered views go through OpenCV's 8-bit
    HSV for the hue, whose rounding is not PIL's: they may differ from torchvision-on-PIL no more than torchvision's
    own tensor `adjust_hue` differs from its PIL one on the same views."""
    flat = [s for s in specs for _ in range(s.count)]
    plain, jittered, torchvision_gap = [], [], []
    for i, data in enumerate(photos[:16]):
        torch.manual_seed(i)
        image = open_image(sample(data))
        rows = np.concatenate([P.draw_params(s, s.count, *image.size) for s in specs])
        assert P.draft_scale(rows[:, [P.X, P.Y, P.W, P.H]], np.array([s.size for s in flat])) == 1
        torch.manual_seed(i)
        views = MultiViewTransform(specs)(image)
        full = decode_image(sample(data))
        for v, s, r in zip(views, flat, rows):
            reference = torchvision_view(full, s, r)
            (jittered if r[P.JITTER] else plain).append((v.float() - reference.float()).abs().flatten())
            if r[P.JITTER]:
                tensor_path = torchvision_view(full, s, r, on_tensors=True)
                torchvision_gap.append((tensor_path.float() - reference.float()).abs().flatten())
    plain = torch.cat(plain)
    assert plain.mean() < 0.3 and plain.quantile(0.99) <= 2, (plain.mean(), plain.quantile(0.99))
    if jittered:
        jittered, gap = torch.cat(jittered), torch.cat(torchvision_gap)
        assert jittered.mean() <= gap.mean() and jittered.quantile(0.99) <= gap.quantile(0.99), (
            jittered.mean(), jittered.quantile(0.99), gap.mean(), gap.quantile(0.99))


def test_full_size_decode_gives_pils_pixels(photos):
    from ssl_vit.transforms.cpu_views import complete_jpeg, decode_full

    for data in photos:
        assert np.array_equal(decode_full(complete_jpeg(open_image(sample(data)))).permute(1, 2, 0).numpy(),
                              np.asarray(decode_image(sample(data))))


def test_pixel_ops_keep_pils_arithmetic(photos):
    """The CPU path's jitter ops on uint8 arrays against the PIL calls torchvision makes: brightness and contrast
    the same levels, saturation and grayscale (OpenCV's luma) one level apart for a fraction of a percent."""
    from PIL import ImageEnhance

    from ssl_vit.transforms import cpu_views as C

    rng, diffs = np.random.default_rng(0), {"saturation": [], "grayscale": []}
    for data in photos[:24]:
        image = decode_image(sample(data)).crop((0, 0, 96, 96))
        view, factor = np.asarray(image), float(rng.uniform(0.6, 1.4))
        assert np.array_equal(C.brightness(view, factor), np.asarray(ImageEnhance.Brightness(image).enhance(factor)))
        assert np.array_equal(C.contrast(view, factor), np.asarray(ImageEnhance.Contrast(image).enhance(factor)))
        pairs = {"saturation": (C.saturation(view, factor), ImageEnhance.Color(image).enhance(factor)),
                 "grayscale": (C.luma(view), image.convert("L"))}
        for name, (ours, theirs) in pairs.items():
            diffs[name].append((ours.astype(int) - np.asarray(theirs).astype(int)).ravel())
    for name, d in diffs.items():
        d = np.abs(np.concatenate(d))
        assert d.max() <= 1 and (d > 0).mean() < 0.005, (name, d.max(), (d > 0).mean())


def test_draft_decode_keeps_every_box_at_full_view_resolution(photos):
    spec = ViewSpec(48, scale=(0.3, 1.0))  # a 48-px view of a ≥ 200-px box: decoded at 1/2 or 1/4
    torch.manual_seed(0)
    image = open_image(sample(photos[0]))
    rows = P.draw_params(spec, 1, *image.size)
    from ssl_vit.transforms.cpu_views import decode_for_views

    width, height = image.size
    decoded, scale = decode_for_views(image, [spec], [rows])
    assert scale > 1 and decoded.shape == (3, math.ceil(height / scale), math.ceil(width / scale))
    assert min(rows[0, P.W], rows[0, P.H]) / scale >= 48


# -- whole views against the reference pipeline --------------------------------------------------------------------
def reference_pipeline(spec: ViewSpec):
    """What the package ran before (torchvision transforms on a full PIL decode), in 0..255."""
    steps = [T.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio,
                                 interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(spec.flip)]
    if spec.color_jitter:
        steps.append(T.RandomApply([T.ColorJitter(*spec.jitter_strength)], p=spec.color_jitter))
    if spec.grayscale:
        steps.append(T.RandomGrayscale(spec.grayscale))
    steps += [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
    if spec.blur:
        steps.append(T.RandomApply([T.GaussianBlur(spec.blur_kernel, sigma=P.BLUR_SIGMA)], p=spec.blur))
    if spec.solarize:
        steps.append(T.RandomSolarize(128 / 255, p=spec.solarize))
    return T.Compose(steps + [T.Lambda(lambda t: t * 255)])


def view_statistics(v: torch.Tensor) -> dict:
    v = v.float()
    return {"red": v[0].mean(), "green": v[1].mean(), "blue": v[2].mean(), "contrast": v.std(),
            "saturation": (v.max(0).values - v.min(0).values).mean(),
            "sharpness": (v[:, :, 1:] - v[:, :, :-1]).abs().mean() + (v[:, 1:] - v[:, :-1]).abs().mean()}


@pytest.mark.parametrize("specs", [mae_views(224), dino_views(112, 64, 2)], ids=["mae224", "dino112/64"])
def test_view_statistics_match_the_reference_pipeline(photos, specs):
    ours, ref = {}, {}
    references = [reference_pipeline(s) for s in specs]
    transform = MultiViewTransform(specs)
    for i in range(2 * len(photos)):
        data = photos[i % len(photos)]
        torch.manual_seed(i)
        views = transform(open_image(sample(data)))
        full = decode_image(sample(data))
        torch.manual_seed(10 ** 6 + i)
        reference = [r(full) for r, s in zip(references, specs) for _ in range(s.count)]
        for k, (a, b) in enumerate(zip(views, reference)):
            kind = min(k, len(specs) - 1) if len(specs) > 1 else 0
            for name, value in view_statistics(a).items():
                ours.setdefault((kind, name), []).append(float(value))
            for name, value in view_statistics(b).items():
                ref.setdefault((kind, name), []).append(float(value))
    for key in ours:
        assert_same_distribution(ours[key], ref[key], f"view kind {key[0]} {key[1]}")


# -- the device path ------------------------------------------------------------------------------------------------
def both_paths(photos: list[bytes], specs) -> tuple[list, list]:
    """(the CPU path's views, the device path's worker outputs) of each photo, photo i seeded with i on both."""
    cpu, gpu, views, encoded = MultiViewTransform(specs), MultiViewTransform(specs, decode="gpu"), [], []
    for i, data in enumerate(photos):
        torch.manual_seed(i)
        views.append(cpu(open_image(sample(data))))
        torch.manual_seed(i)
        encoded.append(gpu(open_image(sample(data))))
    return views, encoded


@pytest.mark.parametrize("specs", [mae_views(224), dino_views(224, 96, 4)], ids=["mae", "dino"])
def test_device_path_makes_the_cpu_paths_views_on_cpu_tensors(photos, specs):
    items, encoded = both_paths(photos[:12], specs)
    assert all(isinstance(e, EncodedViews) for e in encoded)
    made = device_views(collate_views(encoded, specs), torch.device("cpu")).views
    jitter = torch.from_numpy(np.stack([e.params[:, P.JITTER] for e in encoded]) > 0)  # [B, V]
    plain, jittered = [], []
    for k, (reference, view) in enumerate(zip(collate_views(items), made)):
        assert view.shape == reference.shape
        assert view.dtype == torch.uint8
        diff = (reference.float() - view.float()).abs()
        plain.append(diff[~jitter[:, k]].flatten())
        jittered.append(diff[jitter[:, k]].flatten())
    plain, jittered = torch.cat(plain), torch.cat(jittered)
    assert plain.mean() < 0.3 and plain.quantile(0.99) <= 2  # JPEG decoders differ
    if len(jittered):  # the device path's hue is PIL's arithmetic, the CPU path's OpenCV's (see the test above)
        assert jittered.mean() < 0.35 and jittered.quantile(0.99) <= 5, (jittered.mean(), jittered.quantile(0.99))
    normalised = views_to_device(collate_views(encoded, specs), torch.device("cpu")).views
    assert all(v.dtype == torch.float32 for v in normalised)
    assert torch.allclose(normalised[0], normalize(made[0]), atol=1e-6)


def test_each_view_spec_gets_its_own_augmentations_on_the_device(photos):
    """Two specs of one size, only the second with colour jitter: on the device path each view gets its own spec's
    ops (the first stays plain, the second is jittered as on the CPU path)."""
    specs = [ViewSpec(224), ViewSpec(224, color_jitter=1.0)]  # 224 px: the CPU path decodes these at full size too
    reference, encoded = both_paths(photos[:8], specs)
    assert all(e.params[0, P.JITTER] == 0 and e.params[1, P.JITTER] == 1 for e in encoded)
    made = device_views(collate_views(encoded, specs), torch.device("cpu")).views
    for k, reference_views in enumerate(collate_views(reference)):
        gap = (made[k].float() - reference_views.float()).abs()
        assert gap.mean() < 0.35 and gap.quantile(0.99) <= 5, (k, gap.mean(), gap.quantile(0.99))


def test_same_seed_same_views_on_both_paths(photos):
    specs = dino_views(112, 64, 2)
    for decode in ("cpu", "gpu"):
        transform, runs = MultiViewTransform(specs, decode=decode), []
        for _ in range(2):
            torch.manual_seed(7)
            runs.append(transform(open_image(sample(photos[3]))))
        if decode == "cpu":
            assert all(torch.equal(a, b) for a, b in zip(*runs))
        else:
            assert np.array_equal(runs[0].params, runs[1].params)
            a, b = (device_views(collate_views([r], specs), torch.device("cpu")).views for r in runs)
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def png_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, format="PNG")
    return buf.getvalue()


def test_device_path_falls_back_per_sample_and_bad_images_are_bad_samples(photos):
    specs = dino_views(112, 64, 2)
    gpu = MultiViewTransform(specs, decode="gpu")
    png = png_bytes(photos[1])
    torch.manual_seed(1)
    png_views = gpu(open_image(sample(png, "png")))
    assert isinstance(png_views, list) and png_views[0].dtype == torch.uint8  # made on the CPU, in the worker
    items = []
    for i, data in enumerate([photos[0], png, photos[2]]):
        torch.manual_seed(i)
        items.append(gpu(open_image(sample(data, "png" if data is png else "jpg"))))
    batch = collate_views(items, specs)
    assert isinstance(batch, EncodedBatch) and list(batch.encoded) == [0, 2] and list(batch.decoded_index) == [1]
    made = device_views(batch, torch.device("cpu"))
    assert all(torch.equal(v[1], p) for v, p in zip(made.views, png_views))
    assert made.counts == {"cpu_decoded_samples": 1, "cpu_reduced_samples": 0} and not made.unreadable
    truncated = photos[4][:len(photos[4]) // 2]  # header intact, no end-of-image marker: decoded on the CPU
    with pytest.raises(BadSample, match="corrupt image in sample s0 of memory"):
        gpu(open_image(sample(truncated)))
    with pytest.raises(BadSample, match="corrupt image in sample s0 of memory"):
        open_image(sample(b"\xff\xd8 not a jpeg"))


@pytest.mark.parametrize("mode,device,specs,expected", [
    ("auto", "cpu", mae_views(224), "cpu"),
    ("auto", "cuda", dino_views(224, 96, 10), "cpu"),  # until a GPU measurement shows the device path faster
    ("auto", "cuda", [ViewSpec(224, randaugment="rand-m9-mstd0.5")], "cpu"),
    ("auto", "cuda", eval_views(224), "cpu"),
    ("cpu", "cuda", mae_views(224), "cpu"),
    ("gpu", "cuda", mae_views(224), "gpu"),
])
def test_decode_selection(mode, device, specs, expected):
    assert resolve_decode(mode, torch.device(device), specs) == expected


@pytest.mark.parametrize("mode,device,specs,message", [
    ("gpu", "cpu", mae_views(224), "data.decode: gpu needs a CUDA device, this process runs on cpu"),
    ("gpu", "cuda", [ViewSpec(224, randaugment="rand-m9")], "these views need data.decode: cpu"),
    ("nvjpeg", "cuda", mae_views(224), "data.decode: must be one of cpu, gpu, auto, got 'nvjpeg'"),
])
def test_decode_selection_errors_are_one_line(mode, device, specs, message):
    with pytest.raises(SslVitError, match=message) as err:
        resolve_decode(mode, torch.device(device), specs)
    assert "\n" not in str(err.value)


# -- normalisation once per batch; evaluation unchanged -------------------------------------------------------------
def test_move_to_normalises_pixels_once_and_leaves_float_views(photos):
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    already = torch.randn(2, 3, 8, 8)
    out, made = move_to({"views": [pixels, already], "label": torch.zeros(2, dtype=torch.long), "key": ["a", "b"]},
                        torch.device("cpu"))
    assert not made.unreadable and not made.counts
    reference = T.Normalize(MEAN, STD)(pixels.float() / 255)
    assert torch.allclose(out["views"][0], reference, atol=1e-6) and torch.equal(out["views"][1], already)


def test_evaluation_views_and_features_are_unchanged(photos):
    """The evaluation view, normalised once per batch, equals what the package computed before (torchvision Resize +
    CenterCrop on PIL, then float conversion and normalisation per image), and so do embed_images' features."""
    import timm

    from ssl_vit.eval.features import embed_images, pooled_features

    before = T.Compose([T.Resize(73, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64), T.ToImage(),
                        T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])
    images = [decode_image(sample(data)) for data in photos[:6]]
    old = torch.stack([before(img) for img in images])
    new = normalize(torch.stack([MultiViewTransform(eval_views(64))(img)[0] for img in images]))
    assert torch.allclose(new, old, atol=1e-6)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0).eval()
    assert np.allclose(embed_images(model, images, image_size=64), pooled_features(model, old).numpy(), atol=1e-5)
