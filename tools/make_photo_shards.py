"""Benchmark data at ImageNet size: distinct ~500×375 JPEG crops of the photographs in scikit-image's wheel.

Each crop takes a random photograph, a random box of a random scale and aspect (4:3, 3:4, 3:2, 1:1) at a random
position, a random horizontal flip, resizes it (bicubic) to a long side of 500 px and re-encodes it as JPEG quality
90, about the size and quality of an ImageNet training image. The crops are written as an image tree
(`<photograph>/<n>.jpg`, so the photograph is the class) in a scratch folder, then as shards through
`ssl_vit.data.writer.write_shards`. Nothing is downloaded: the photographs ship inside the scikit-image wheel (a dev
dependency).

    python tools/make_photo_shards.py OUT_PREFIX [--count 2000] [--max-count 250] [--seed 0] [--long-side 500]
"""
import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

JPEG_QUALITY = 90
LONG_SIDE = 500  # ImageNet-size; a larger --long-side shows the reduced-scale decode at work
ASPECTS = (4 / 3, 3 / 4, 3 / 2, 1.0)  # width / height
# The colour and grey photographs that load from the wheel itself (others are fetched from the network).
PHOTOGRAPHS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
               "stereo_motorcycle", "camera", "moon", "coins", "brick", "grass", "gravel", "clock")


def photographs() -> dict[str, Image.Image]:
    """The bundled photographs as RGB PIL images (grey ones replicated to three channels)."""
    import skimage.data

    out = {}
    for name in PHOTOGRAPHS:
        pixels = getattr(skimage.data, name)()
        pixels = pixels[0] if isinstance(pixels, tuple) else pixels
        out[name] = Image.fromarray(np.asarray(pixels, dtype=np.uint8)).convert("RGB")
    return out


def random_crop(photo: Image.Image, rng: np.random.Generator, long_side: int = LONG_SIDE) -> Image.Image:
    """A box of 35-100 % of the largest box of a random aspect that fits, at a random place, maybe flipped, resized
    to a long side of `long_side` px."""
    aspect = ASPECTS[rng.integers(len(ASPECTS))]
    w, h = photo.size
    box_w = min(w, h * aspect) * rng.uniform(0.35, 1.0)
    box_h = box_w / aspect
    x, y = rng.uniform(0, w - box_w), rng.uniform(0, h - box_h)
    size = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
    crop = photo.resize(size, Image.BICUBIC, box=(x, y, x + box_w, y + box_h))
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def photo_jpegs(count: int, seed: int, long_side: int = LONG_SIDE):
    """(photograph name, JPEG bytes) of `count` distinct random crops."""
    rng, photos = np.random.default_rng(seed), photographs()
    names = sorted(photos)
    for _ in range(count):
        name = names[rng.integers(len(names))]
        buf = io.BytesIO()
        random_crop(photos[name], rng, long_side).save(buf, format="JPEG", quality=JPEG_QUALITY)
        yield name, buf.getvalue()


def write_image_tree(root: Path, count: int, seed: int, long_side: int = LONG_SIDE) -> None:
    for i, (name, data) in enumerate(photo_jpegs(count, seed, long_side)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(data)


def make_photo_shards(out_prefix, count: int = 2000, max_count: int = 250, seed: int = 0, workers: int = 2,
                      long_side: int = LONG_SIDE) -> str:
    """Write the shards and return the path of their index.json."""
    from ssl_vit.data.writer import write_shards

    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(out_prefix).parent) as scratch:
        write_image_tree(Path(scratch), count, seed, long_side)
        write_shards(scratch, str(out_prefix), max_count=max_count, seed=seed, workers=workers, progress=False)
    return f"{out_prefix}-index.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_prefix", help="shard path prefix, e.g. /tmp/photos/train")
    p.add_argument("--count", type=int, default=2000, help="number of crops")
    p.add_argument("--max-count", type=int, default=250, help="samples per shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--long-side", type=int, default=LONG_SIDE, help="pixels on the long side of each crop")
    args = p.parse_args(argv)
    print(make_photo_shards(args.out_prefix, args.count, args.max_count, args.seed, long_side=args.long_side))
    return 0


if __name__ == "__main__":
    sys.exit(main())
