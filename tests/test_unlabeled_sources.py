"""Unlabeled sources through `ssl-vit shards write` (a folder at any depth, a tar of one, .txt/CSV/JSONL lists of
paths), the folder rule (auto-unlabeled top-level folder, mixed folder refused), `shards inspect` of unlabeled
shards, and evaluation refusing unlabeled features while feature extraction and retrieval indexes accept them.

The images are the bundled CIFAR-10 subset with its class folders flattened away; shards are read back with plain
`tarfile` and `hashlib`.
"""
import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BUNDLED
from ssl_vit.cli import main
from ssl_vit.data.index import index_is_labeled, read_index
from ssl_vit.errors import SslVitError
from ssl_vit.eval.feature_cache import load_features, save_features
from ssl_vit.models.backbone import BackboneSpec, create_backbone
from ssl_vit.models.export import export_backbone

FINETUNE_RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "finetune_vit_tiny_cifar10.yaml")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shard_samples(index_path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} over all shards of an index, read with tarfile."""
    index, samples = json.loads(index_path.read_text()), {}
    for entry in index["shards"]:
        with tarfile.open(index_path.parent / entry["name"]) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The bundled train split with its class folders flattened into nested folders that are not classes
    (photos/roll<r>/day<d>/img<i>.jpg, images of every class in each); returns (folder, {relative path: sha256})."""
    root = tmp_path_factory.mktemp("unlabeled")
    with tarfile.open(BUNDLED / "train.tar.gz") as tar:
        tar.extractall(root / "raw", filter="data")
    photos, digests = root / "photos", {}
    for i, src in enumerate(sorted((root / "raw").rglob("*.jpg"), key=lambda p: (p.name, p.parent.name))):
        ref = f"roll{i % 4}/day{i % 3}/img{i:05d}.jpg"
        (photos / ref).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, photos / ref)
        digests[ref] = sha((photos / ref).read_bytes())
    return photos, digests


@pytest.fixture(scope="module")
def flat(tmp_path_factory, photos) -> Path:
    """200 of the photos directly in one folder (no sub-folders): read as unlabeled without being asked."""
    folder = tmp_path_factory.mktemp("flat") / "flat"
    folder.mkdir()
    for ref in sorted(photos[1])[:200]:
        shutil.copy(photos[0] / ref, folder / ref.replace("/", "_"))
    return folder


@pytest.fixture(scope="module")
def flat_shards(tmp_path_factory, flat) -> Path:
    out = tmp_path_factory.mktemp("flat_shards") / "flat"
    assert main(["shards", "write", str(flat), str(out), "--max-count", "64", "--workers", "1", "--no-progress"]) == 0
    return Path(f"{out}-index.json")


def check_unlabeled(index_path: Path, digests: dict[str, str]) -> dict:
    """The index says unlabeled; every sample has an image and a json (path, size, mode), no cls and no label; the
    images are the source bytes, each once."""
    index = read_index(index_path)
    assert index["labeled"] is False and index["classes"] == [] and index["class_counts"] == []
    assert not index_is_labeled(index) and index["num_samples"] == len(digests)
    samples = shard_samples(index_path)
    assert len(samples) == len(digests)
    seen = {}
    for sample in samples.values():
        assert sorted(sample) == ["jpg", "json"]
        meta = json.loads(sample["json"])
        assert sorted(meta) == ["mode", "path", "size"] and meta["size"] == [32, 32] and meta["mode"] == "RGB"
        seen[meta["path"]] = sha(sample["jpg"])
    assert seen == digests
    return index


def test_unlabeled_folder_at_any_depth(photos, tmp_path, capsys):
    folder, digests = photos
    out = tmp_path / "p"
    assert main(["shards", "write", str(folder), str(out), "--unlabeled", "--max-count", "2000",
                 "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "5000 samples (unlabeled)" in printed.out and "note:" not in printed.err
    index = check_unlabeled(Path(f"{out}-index.json"), digests)
    assert len(index["shards"]) == 3 and max(e["samples"] for e in index["shards"]) <= 2000

    # Resume: a lost shard is rewritten byte for byte, the kept ones are summarized from their tars.
    lost = out.parent / "p-000001.tar"
    kept, before = out.parent / "p-000000.tar", lost.read_bytes()
    mtime = kept.stat().st_mtime_ns
    lost.unlink()
    assert main(["shards", "write", str(folder), str(out), "--unlabeled", "--max-count", "2000",
                 "--no-progress"]) == 0
    assert lost.read_bytes() == before and kept.stat().st_mtime_ns == mtime
    assert read_index(f"{out}-index.json") == index

    # Without --unlabeled the same folder is labelled by its top folders, as an ImageFolder; its plan differs.
    assert main(["shards", "write", str(folder), str(out), "--max-count", "2000", "--no-progress"]) == 2
    assert "holds another plan (classes [], now ['roll0', 'roll1', 'roll2', 'roll3'])" in capsys.readouterr().err


def test_top_level_folder_is_unlabeled_with_a_note(flat, flat_shards, photos, capsys):
    index = check_unlabeled(flat_shards, {p.name: sha(p.read_bytes()) for p in flat.iterdir()})
    assert len(index["shards"]) == 4
    # the note was printed when the fixture wrote the shards; write again (a resume) to see it
    assert main(["shards", "write", str(flat), str(flat_shards).removesuffix("-index.json"), "--max-count", "64",
                 "--workers", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"note: {flat}: all 200 images sit at the top level, no class folders: read as an unlabeled set"]


def test_mixed_folder_is_one_line_error(flat, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    shutil.copytree(flat, mixed)
    names = sorted(p.name for p in mixed.iterdir())
    (mixed / "cat").mkdir()
    for name in names[:30]:
        shutil.move(mixed / name, mixed / "cat" / name)
    assert main(["shards", "write", str(mixed), str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {mixed} mixes 170 loose image(s) at its top level (e.g. {names[30]}) with "
                   "30 image(s) in 1 class folder(s): pass --unlabeled to read all 200 without labels, or move the "
                   "loose images into class folders"]
    assert not list(tmp_path.glob("o-*"))
    assert main(["shards", "write", str(mixed), str(tmp_path / "o"), "--unlabeled", "--workers", "1",
                 "--no-progress"]) == 0
    index = read_index(tmp_path / "o-index.json")
    assert index["num_samples"] == 200 and not index_is_labeled(index)


@pytest.mark.parametrize("layout", ["flat", "nested", "mixed"])
def test_tar_of_a_folder_follows_the_folder_rule(photos, tmp_path, capsys, layout):
    folder, digests = photos
    refs = sorted(digests)[::125]  # 40 images from all four rolls
    names = {"flat": lambda r: r.replace("/", "_"), "nested": lambda r: r,
             "mixed": lambda r: r if r < refs[10] else r.replace("/", "_")}[layout]
    archive = tmp_path / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for ref in refs:
            tar.add(folder / ref, arcname=f"photos/{names(ref)}")
    args = ["shards", "write", str(archive), str(tmp_path / "o"), "--workers", "1", "--no-progress"]
    if layout == "mixed":
        assert main(args) == 2
        assert "mixes 30 loose image(s) at its top level" in capsys.readouterr().err
        args.append("--unlabeled")
    assert main(args) == 0
    note = "read as an unlabeled set" in capsys.readouterr().err
    assert note == (layout == "flat")
    index = read_index(tmp_path / "o-index.json")
    if layout == "nested":  # sub-folders are classes unless --unlabeled, as for the folder itself
        assert index["classes"] == ["roll0", "roll1", "roll2", "roll3"]
        return
    check_unlabeled(tmp_path / "o-index.json", {names(r): digests[r] for r in refs})


@pytest.mark.parametrize("kind", ["txt", "csv", "jsonl"])
def test_lists_of_paths_without_labels(photos, tmp_path, kind):
    folder, digests = photos
    refs = sorted(digests)[::125]
    listed = tmp_path / "lists"
    shutil.copytree(folder / "roll0", listed / "roll0")
    paths = [f"roll0/{r.split('/', 1)[1]}" if r.startswith("roll0/") else str(folder / r) for r in refs]
    lines = {"txt": ["", *paths, ""],
             "csv": ["path,caption", *[f"{p},a photo" for p in paths]],
             "jsonl": [json.dumps({"path": p, "caption": "a photo"}) for p in paths]}[kind]
    src = listed / f"photos.{kind}"
    src.write_text("\n".join(lines) + "\n")
    assert main(["shards", "write", str(src), str(tmp_path / "o"), "--workers", "1", "--no-progress"]) == 0
    check_unlabeled(tmp_path / "o-index.json", {p: digests[r] for p, r in zip(paths, refs)})


def test_inspect_unlabeled_shards(flat_shards, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert main(["shards", "inspect", str(flat_shards), "--verify", "--grid", str(grid), "--grid-n", "9"]) == 0
    out = capsys.readouterr().out
    assert "labels: none (unlabeled set)" in out and "classes" not in out
    assert "verify: OK" in out and "shards: 4  samples: 200" in out
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["shards", "inspect", str(flat_shards), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["labeled"] is False and report["num_samples"] == 200
    assert report["classes"] == [{"label": -1, "name": "(no label)", "count": 200}]


def test_index_without_labeled_key_reads_as_before(flat_shards, test_shards, tmp_path):
    labelled = json.loads(test_shards.read_text())
    assert labelled["labeled"] is True and index_is_labeled(labelled)
    for source, expected in ((test_shards, True), (flat_shards, False)):
        old = json.loads(source.read_text())
        del old["labeled"]
        (tmp_path / "old-index.json").write_text(json.dumps(old))
        assert index_is_labeled(read_index(tmp_path / "old-index.json")) is expected
    (tmp_path / "bad-index.json").write_text(json.dumps({**labelled, "labeled": False}))
    with pytest.raises(SslVitError, match=r"'labeled' must be true with classes and false without"):
        read_index(tmp_path / "bad-index.json")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    spec = BackboneSpec(img_size=32, patch_size=4, kwargs=dict(depth=2, embed_dim=64, num_heads=2))
    return export_backbone(create_backbone(spec), spec, tmp_path_factory.mktemp("bb") / "backbone.safetensors",
                           extra_meta={"method": "mae"})


def test_features_and_index_of_unlabeled_shards_but_no_label_metrics(flat_shards, backbone, tmp_path, capsys):
    feats, partial = tmp_path / "feats", tmp_path / "partial"
    assert main(["features", "--backbone", str(backbone), "--shards", str(flat_shards), "--out", str(feats),
                 "--workers", "1", "--no-progress"]) == 0
    cache = load_features(feats)
    assert len(cache) == 200 and (cache.labels == -1).all()
    assert main(["index", "build", "--features", str(feats), "--out", str(tmp_path / "ix")]) == 0
    labels = np.arange(200) % 10
    labels[::50] = -1
    save_features(partial, np.asarray(cache.features), labels, cache.keys, cache.meta)
    capsys.readouterr()
    for argv, name, cache_dir, missing in [
        (["knn", "--train-features", str(feats), "--test-features", str(feats)], "train", feats, 200),
        (["knn", "--train-features", str(partial), "--test-features", str(partial)], "train", partial, 4),
        (["linear-probe", "--train-features", str(partial), "--test-features", str(feats)], "train", partial, 4),
        (["index", "eval", "--index", str(tmp_path / "ix"), "--features", str(feats)], "query", feats, 200),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {name} labels missing in feature cache {cache_dir}: "
                                                   f"{missing} samples have label -1, out of 200;"), err


def test_finetune_refuses_unlabeled_shards(flat_shards, backbone, capsys):
    for key, overrides in (("data.train", [f"data.train={flat_shards}"]),
                           ("data.eval", ["data.train=unused-*.tar", f"data.eval={flat_shards}"])):
        assert main(["finetune", "--recipe", FINETUNE_RECIPE, "--init", str(backbone), *overrides]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {key}: {flat_shards} indexes unlabeled shards; fine-tuning needs a class label on "
                       "every sample (pretrain on unlabeled shards with MAE or DINO instead)"]


@pytest.mark.slow
def test_a_list_of_sources_is_one_stream_and_every_source_is_trained_on(photos, test_shards, tmp_path):
    """`data.train=[labelled index, unlabeled index]`: one epoch of MAE's audit keys holds every sample of both
    sources exactly once (the unlabeled shards, written by webdataset with keys of their own, are told apart)."""
    import webdataset as wds

    from test_train import METHOD_ARGS, recipe_for

    folder = tmp_path / "bucket"
    folder.mkdir()
    refs = sorted(photos[1])[:160]
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=40, verbose=0) as sink:
        for i, ref in enumerate(refs):
            sink.write({"__key__": f"photo{i:05d}", "jpg": (photos[0] / ref).read_bytes()})
    unlabeled = folder / "index.json"
    assert main(["shards", "index", str(folder / "*.tar"), "--out", str(unlabeled), "--no-progress"]) == 0
    assert json.loads(unlabeled.read_text())["labeled"] is False
    labelled = read_index(test_shards)["num_samples"]
    batch = 40
    steps = (labelled + 160) // batch  # one epoch, every sample: 1,160 = 29 x 40
    assert steps * batch == labelled + 160
    out = tmp_path / "mae"
    assert main(["pretrain", "--recipe", recipe_for("mae"), f"data.train=[{test_shards}, {unlabeled}]",
                 f"train.out_dir={out}", f"train.steps={steps}", "train.epochs=0", f"data.batch_size={batch}",
                 "train.audit_keys=true", "data.shuffle_buffer=100", "model.depth=1", "model.embed_dim=32",
                 "model.num_heads=2", "train.progress=false", "data.num_workers=1", "train.log_with=[]",
                 *METHOD_ARGS["mae"]]) == 0
    rows = [json.loads(line) for line in (out / "audit" / "rank0.jsonl").read_text().splitlines()]
    keys = [key for row in rows for key in row["keys"]]
    assert len(keys) == len(set(keys)) == labelled + 160
    assert {k for k in keys if k.startswith("photo")} == {f"photo{i:05d}" for i in range(160)}
    assert sum(k.startswith("s") for k in keys) == labelled
    # the two sources are mixed through the epoch, not one after the other
    first_half = [k for row in rows[:steps // 2] for k in row["keys"]]
    assert 0 < sum(k.startswith("photo") for k in first_half) < 160
