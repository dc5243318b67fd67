"""Folders written through `atomic_dir` appear whole or not at all, and a failed write leaves nothing behind."""
import pytest

from ssl_vit.atomic_io import atomic_dir


def test_atomic_dir_swaps_in_on_success_and_cleans_up_on_failure(tmp_path):
    out = tmp_path / "features"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"]  # no temporary folder left
