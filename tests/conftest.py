"""Shared fixtures: shards written from the bundled real CIFAR-10 subset through the public writer."""
import io
import os
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "data" / "cifar10_subset"

# Two cores: keep every process (pytest and the workers/ranks it starts) to one OpenMP thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def bundled_train() -> Path:
    return BUNDLED / "train.tar.gz"


@pytest.fixture(scope="session")
def bundled_test() -> Path:
    return BUNDLED / "test.tar.gz"


def read_tar_images(path: Path) -> dict[str, tuple[bytes, int]]:
    """{'<class>/<file>': (bytes, label)} of an ImageFolder tar, read with plain tarfile (an independent reader)."""
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        classes = sorted({m.name.split("/")[0] for m in members})
        return {m.name: (tar.extractfile(m).read(), classes.index(m.name.split("/")[0])) for m in members}


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory, bundled_train) -> Path:
    """The bundled train split as 10 shards of 500 samples; returns the index.json path."""
    from ssl_vit.data.writer import write_shards

    out = tmp_path_factory.mktemp("shards") / "train"
    write_shards(str(bundled_train), str(out), max_count=500, seed=0, workers=2, progress=False)
    return Path(f"{out}-index.json")


@pytest.fixture(scope="session")
def test_shards(tmp_path_factory, bundled_test) -> Path:
    """The bundled test split as 4 shards of 250 samples (1,000 in all); returns the index.json path."""
    from ssl_vit.data.writer import write_shards

    out = tmp_path_factory.mktemp("shards") / "test"
    write_shards(str(bundled_test), str(out), max_count=300, seed=0, workers=1, progress=False)
    return Path(f"{out}-index.json")


def jpeg_bytes(color=(200, 30, 30), size=32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()
