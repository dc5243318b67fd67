"""Labelled fractions of a training set: which samples' labels evaluation and supervised training may use.

For each fraction f < 1, every class keeps the same number of labelled samples, max(1, round(f · N / C)) (capped at
the class's size): class-balanced, as the 1 % / 10 % ImageNet subsets of the semi-supervised literature are. Each
class's samples are put in one seeded order (by key, then a permutation seeded by (seed, class)) and a fraction takes
a prefix of it, so the subsets are nested (1 % ⊂ 10 % ⊂ 100 %) and depend on nothing but the keys, labels and seed:
every model is evaluated on the same subset. f = 1 is every labelled sample.

`subset_shards` writes a fraction's labelled images as shards of their own (through the one shard writer), so that
the supervised baseline trains on exactly those images and nothing else.
"""
import csv
import math
import shutil
from pathlib import Path

import numpy as np

from ssl_vit.atomic_io import write_json_atomic
from ssl_vit.errors import SslVitError


def check_fractions(fractions) -> list[float]:
    """Sorted, distinct fractions in (0, 1]; anything else is a one-line error naming eval.label_fractions."""
    if not isinstance(fractions, (list, tuple)) or not fractions:
        raise SslVitError(f"eval.label_fractions: expected a non-empty list of fractions in (0, 1], got {fractions!r}")
    out = []
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise SslVitError(f"eval.label_fractions: {f!r} is not a fraction in (0, 1]")
        out.append(float(f))
    if len(set(out)) != len(out):
        raise SslVitError(f"eval.label_fractions: {fractions} lists a fraction twice")
    return sorted(out)


def fraction_tag(fraction: float) -> str:
    """A fraction as a file-name part: 0.01 → 'f0.01', 1.0 → 'f1'."""
    return f"f{fraction:g}"


def label_table(source) -> tuple[list[str], np.ndarray]:
    """(keys, labels) of every sample of the shards at `source`, in shard order; an unlabelled sample is an error."""
    from ssl_vit.data.samples import BadSample, decode_label, image_key, iter_samples
    from ssl_vit.data.sources import expand_source

    keys, labels = [], []
    for url in expand_source(source).urls:
        for sample in iter_samples(url):
            if image_key(sample) is None:
                continue  # the loader skips samples without an image; so does the bank
            try:
                label = decode_label(sample)
            except BadSample as e:
                raise SslVitError(str(e)) from None
            if label < 0:
                raise SslVitError(f"eval.label_fractions: sample {sample['__key__']} of {url} has no label; "
                                  "label fractions need labelled training shards")
            keys.append(sample["__key__"])
            labels.append(label)
    if not keys:
        raise SslVitError(f"eval.label_fractions: no samples in {source}")
    return keys, np.asarray(labels, dtype=np.int64)


def per_class_quota(fraction: float, class_size: int, num_samples: int, num_classes: int) -> int:
    """Labelled samples a class keeps at `fraction` (non-decreasing in the fraction: subsets nest)."""
    if fraction >= 1:
        return class_size
    return min(class_size, max(1, round(fraction * num_samples / num_classes)))


def nested_subsets(keys: list[str], labels, fractions, seed: int = 0) -> dict[float, list[str]]:
    """{fraction: sorted keys of its labelled samples}: class-balanced, seeded, nested (see the module docstring)."""
    labels = np.asarray(labels)
    if len(set(keys)) != len(keys):
        raise SslVitError("eval.label_fractions: sample keys of the training shards are not unique")
    classes = np.unique(labels)
    orders = {}
    for c in classes:
        members = sorted(keys[i] for i in np.flatnonzero(labels == c))
        perm = np.random.default_rng([seed, int(c)]).permutation(len(members))
        orders[int(c)] = [members[i] for i in perm]
    return {f: sorted(k for c, order in orders.items()
                      for k in order[:per_class_quota(f, len(order), len(keys), len(classes))])
            for f in check_fractions(fractions)}


def draw_seeds(fraction: float, draws: int, label_seed: int) -> list[int]:
    """The labelled draws at `fraction`: `draws` independent seeds below 100 %, one (every label) at 100 %."""
    return [label_seed] if fraction >= 1 else [label_seed + d for d in range(draws)]


def validation_split(keys: list[str], labels, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(fit keys, validation keys), both sorted: round(fraction · n_c) samples of each class c held out (at least
    one when fraction > 0, and at least one kept), in the seeded per-class order of `nested_subsets` (seed offset so
    that it is not the order the labelled draws take)."""
    labels = np.asarray(labels)
    val = []
    for c in np.unique(labels):
        members = sorted(keys[i] for i in np.flatnonzero(labels == c))
        take = min(len(members) - 1, max(1, round(fraction * len(members))))
        perm = np.random.default_rng([seed, int(c), 1 << 20]).permutation(len(members))
        val += [members[i] for i in perm[:take]]
    held = set(val)
    return sorted(k for k in keys if k not in held), sorted(val)


def carve_validation(train_index: str, fraction: float, seed: int, out_dir, max_count: int) -> tuple[str, str]:
    """(fit index, validation index): the training shards split by `validation_split` into two sets of shards of
    their own under out_dir/fit and out_dir/val (images copied byte for byte, keys renumbered)."""
    out_dir = Path(out_dir)
    keys, labels = label_table(train_index)
    fit, val = validation_split(keys, labels, fraction, seed)
    indexes = []
    for name, part in (("val", val), ("fit", fit)):
        if not (out_dir / name / "shards-index.json").is_file():
            subset_shards(train_index, part, out_dir / name, 1, max_count)
        indexes.append(str(out_dir / name / "shards-index.json"))
    return indexes[1], indexes[0]


def write_subsets(path, keys: list[str], labels, fractions, seed: int) -> dict:
    """`nested_subsets` written to `path` as {"seed", "num_samples", "fractions": {"0.01": {"keys", "per_class"}}}."""
    labels = np.asarray(labels)
    label_of = dict(zip(keys, labels.tolist()))
    subsets = nested_subsets(keys, labels, fractions, seed)
    record = {"seed": seed, "num_samples": len(keys), "num_classes": int(len(np.unique(labels))),
              "fractions": {f"{f:g}": {"keys": ks, "per_class": _counts([label_of[k] for k in ks])}
                            for f, ks in subsets.items()}}
    write_json_atomic(path, record)
    return record


def _counts(labels: list[int]) -> dict[str, int]:
    values, counts = np.unique(np.asarray(labels, dtype=np.int64), return_counts=True)
    return {str(v): int(n) for v, n in zip(values, counts)}


def subset_shards(source, keys: list[str], out_dir, min_samples: int, max_count: int, superset=None) -> str:
    """Shards holding only the samples `keys` of `source` (with their labels); returns the index path.

    The images are copied byte for byte into `out_dir/images/` and listed with their class names in `list.csv`,
    which the shard writer turns into shards (keys renumbered). Each image is listed ceil(min_samples / len(keys))
    times, so that an epoch holds at least one batch of `min_samples`: more epochs over the same labelled images.
    `superset`: the folder of a larger subset made this way that holds every one of `keys`; its images are copied
    instead of reading all of `source` again."""
    from ssl_vit.data.sources import expand_source
    from ssl_vit.data.writer import write_shards

    out_dir = Path(out_dir)
    shards = expand_source(source)
    classes = shards.classes or []
    wanted = set(keys)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = _copy_from_subset(Path(superset), wanted, out_dir) if superset else _copy_from_shards(shards.urls, wanted,
                                                                                                    classes, out_dir)
    if len(rows) != len(wanted):
        raise SslVitError(f"{source}: {len(wanted) - len(rows)} of the {len(wanted)} labelled samples were not found")
    repeats = math.ceil(min_samples / len(rows))
    with open(out_dir / "list.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(sorted(rows) * repeats)
    total = len(rows) * repeats
    # at least four shards, so that up to four loader workers each get one
    index = write_shards(str(out_dir / "list.csv"), str(out_dir / "shards"), seed=0, workers=1, progress=False,
                         max_count=min(max_count, max(1, math.ceil(total / 4))))
    if index["classes"] != classes:
        raise SslVitError(f"{out_dir}: the labelled subset's classes {index['classes'][:3]}... differ from the "
                          f"training shards' {classes[:3]}...")
    return str(out_dir / "shards-index.json")


def _copy_from_shards(urls: list[str], wanted: set[str], classes: list[str], out_dir: Path) -> list[tuple[str, str]]:
    """(image file, class name) of the `wanted` samples, read from the shards and written under out_dir."""
    from ssl_vit.data.samples import decode_label, image_key, iter_samples

    rows = []
    for url in urls:
        for sample in iter_samples(url):
            if sample["__key__"] not in wanted:
                continue
            member = image_key(sample)
            name = f"images/{sample['__key__']}.{member.rsplit('.', 1)[-1].lower()}"
            (out_dir / name).write_bytes(sample[member])
            rows.append((name, classes[decode_label(sample)]))
    return rows


def _copy_from_subset(superset: Path, wanted: set[str], out_dir: Path) -> list[tuple[str, str]]:
    """(image file, class name) of the `wanted` samples, copied from a larger subset's folder."""
    with open(superset / "list.csv", newline="") as f:
        listed = dict(tuple(row) for row in list(csv.reader(f))[1:])  # its rows repeat: one entry each
    rows = sorted((name, label) for name, label in listed.items()
                  if name.removeprefix("images/").rsplit(".", 1)[0] in wanted)
    for name, _ in rows:
        shutil.copyfile(superset / name, out_dir / name)
    return rows
