"""Shared fixtures: shards written from the bundled real CIFAR-10 subset through the public writer."""
import io
import json
import os
import tarfile
import time
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


# A gate for runs that must be interrupted at a point that does not depend on the machine's speed: every shard is a
# `pipe:` command that passes when it gets a ticket of its rank, else says where it waits and waits for `go`.
# No trap: like `aws s3 cp`, it dies of a signal it gets, unless the process that started it is deaf to it.
GATE = """#!/bin/sh
gate=$1
for ticket in "$gate"/ticket-"${RANK:-0}"-*; do
  if mv "$ticket" "$gate/used/" 2>/dev/null; then exec cat "$2"; fi
done
touch "$gate/reached-${RANK:-0}"
while [ ! -e "$gate/go" ]; do sleep 0.05; done
exec cat "$2"
"""


@pytest.fixture(scope="session")
def gated_shards(tmp_path_factory, bundled_train) -> tuple[Path, Path]:
    """(index of the bundled train split in 125 shards of 40 whose names are gated `pipe:` commands, the gate)."""
    from ssl_vit.data.writer import write_shards

    root = tmp_path_factory.mktemp("gated")
    index = write_shards(str(bundled_train), str(root / "t"), max_count=40, seed=0, workers=2, progress=False)
    gate = root / "gate"
    (gate / "used").mkdir(parents=True)
    (root / "gate.sh").write_text(GATE)
    shards = [{**e, "name": f"pipe:exec sh {root / 'gate.sh'} {gate} {root / e['name']}"} for e in index["shards"]]
    (root / "gated-index.json").write_text(json.dumps({**index, "shards": shards}))
    return root / "gated-index.json", gate


def close_gate(gate: Path, ranks: int, tickets: int) -> None:
    """Shut the gate and hand out `tickets` shards per rank."""
    for path in [*gate.glob("ticket-*"), *gate.glob("reached-*"), *gate.glob("used/*"), gate / "go"]:
        path.unlink(missing_ok=True)
    for rank in range(ranks):
        for i in range(tickets):
            (gate / f"ticket-{rank}-{i}").touch()


def open_gate(gate: Path) -> None:
    (gate / "go").touch()


def wait_at_gate(proc, gate: Path, ready, timeout: float = 300) -> None:
    """Wait until a rank waits at the gate and `ready()` holds (on events, not a clock: the deadline is only against
    a hang); the run cannot get past the gate, so nothing races."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not (list(gate.glob("reached-*")) and ready()):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the gate"
    assert list(gate.glob("reached-*")) and ready(), "the run never got to the gate ready"
