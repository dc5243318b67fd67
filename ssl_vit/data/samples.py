"""Read raw samples from one tar shard (webdataset's tar iterator) and decode them to RGB images.

A truncated or unreadable tar ends that shard with a warning; a corrupt image or a sample without an image is a
`BadSample` that the stream counts and skips.
"""
import io
import json
import logging
import tarfile
import warnings

from PIL import Image
from webdataset import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from ssl_vit.errors import SslVitError

log = logging.getLogger("ssl_vit.data")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")


class BadSample(Exception):
    """A sample that cannot be used (no image, undecodable image); the reader skips and counts it."""


def read_shard(url: str) -> list[dict]:
    """All samples of one shard as dicts of raw bytes plus `__key__` and `__url__`, in tar order."""
    samples = []
    try:
        stream = gopen(url, "rb")
    except FileNotFoundError:
        raise SslVitError(f"missing shard: {url}") from None
    except OSError as e:
        raise SslVitError(f"cannot open shard {url}: {e}") from None
    try:
        files = (dict(f, __url__=url) for f in tar_file_iterator(stream))
        samples.extend(group_by_keys(files))
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        warnings.warn(f"shard {url} is truncated or corrupt after {len(samples)} samples ({e}); "
                      "the rest of this shard is skipped", RuntimeWarning, stacklevel=2)
    finally:
        try:
            stream.close()
        except Exception as e:  # a failed `pipe:` command reports its exit status here
            raise SslVitError(f"reading shard {url} failed: {e}") from None
    return samples


def decode_image(sample: dict) -> Image.Image:
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise BadSample(f"no image in sample {sample.get('__key__')} of {sample.get('__url__')} "
                        f"(keys: {sorted(k for k in sample if not k.startswith('__'))})")
    try:
        with Image.open(io.BytesIO(sample[key])) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadSample(f"corrupt image in sample {sample['__key__']} of {sample['__url__']}: {e}") from None


def decode_label(sample: dict) -> int:
    """`cls` as an integer, -1 where the sample has no label."""
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
