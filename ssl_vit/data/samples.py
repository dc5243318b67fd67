"""Decode raw samples (read by `ssl_vit.data.tar_reader`) to RGB images and labels.

A corrupt image or a sample without an image is a `BadSample` that the stream counts and skips.
"""
import io
import json
import logging

from PIL import Image

from ssl_vit.data.tar_reader import iter_samples, read_shard  # noqa: F401  (re-exported)
from ssl_vit.errors import SAMPLE_INFO, BadSample, plain  # noqa: F401  (re-exported: the readers' names for them)


log = logging.getLogger("ssl_vit.data")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")


def image_key(sample: dict) -> str | None:
    """The member holding the image: `jpg`, `JPG`, `png`, ... or a compound suffix such as `image.webp`."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        key = next((k for k in sample if not k.startswith("__") and k.rsplit(".", 1)[-1] in IMAGE_KEYS), None)
    return key


def open_image(sample: dict) -> Image.Image:
    """The sample's image, opened lazily: the header is read (size, format), the pixels are not decoded yet, so a
    view transform can decode at a reduced scale or hand the bytes to the GPU. An unreadable header is a BadSample."""
    key = image_key(sample)
    if key is None:
        raise BadSample(f"no image in sample {sample.get('__key__')} of {sample.get('__url__')} "
                        f"(members: {', '.join(sorted(k for k in sample if not k.startswith('__'))) or 'none'})")
    name = f"sample {sample['__key__']} of {sample['__url__']}"
    try:
        img = Image.open(io.BytesIO(sample[key]))
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadSample(f"corrupt image in {name}: {plain(e)}") from None
    img.info[SAMPLE_INFO] = name
    return img


def decode_image(sample: dict) -> Image.Image:
    img = open_image(sample)
    try:
        img.load()
        return img.convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadSample(f"corrupt image in {img.info[SAMPLE_INFO]}: {plain(e)}") from None


def decode_label(sample: dict) -> int:
    """`cls` as an integer (a `BadSample` if it is not one), else the json's `label_index`, else -1 (no label). The
    one reading of a label: the loader, the shard writer and `shards inspect` all use it."""
    if "cls" in sample:
        try:
            return int(sample["cls"].decode().strip())
        except (ValueError, UnicodeDecodeError):
            raise BadSample(f"bad label {sample['cls'][:20]!r} in sample {sample['__key__']} of "
                            f"{sample['__url__']}") from None
    if "json" in sample:
        label = json.loads(sample["json"]).get("label_index")
        if label is not None:
            return int(label)
    return -1
