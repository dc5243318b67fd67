"""Write the bundled CIFAR-10 subset from the full CIFAR-10 JPEG archive.

The subset is class-balanced and deterministic: the first N files (sorted by name) of every
class folder, for the train and the test split. Each split becomes its own ImageFolder-style
.tar.gz (``<class>/<file>.jpg``), which ``ssl-vit shards write`` reads directly.

    python tools/make_bundled_data.py ../shared/data/cifar10/cifar10-jpeg.tar.gz data/cifar10_subset
"""
import argparse
import io
import sys
import tarfile
from collections import defaultdict
from pathlib import Path


def select_members(archive: tarfile.TarFile, split: str, per_class: int) -> list[tarfile.TarInfo]:
    by_class = defaultdict(list)
    for member in archive.getmembers():
        parts = member.name.split("/")
        if member.isfile() and len(parts) == 3 and parts[0] == split:
            by_class[parts[1]].append(member)
    if not by_class:
        raise SystemExit(f"error: no '{split}/<class>/<file>' entries in the archive")
    chosen = []
    for name in sorted(by_class):
        members = sorted(by_class[name], key=lambda m: m.name)
        if len(members) < per_class:
            raise SystemExit(f"error: class {name!r} of split {split!r} has only {len(members)} files")
        chosen += members[:per_class]
    return chosen


def write_split(archive: tarfile.TarFile, members: list[tarfile.TarInfo], out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    # Fixed mtime/owner so that the bundled file is byte-identical on every machine.
    with tarfile.open(tmp, "w:gz", format=tarfile.USTAR_FORMAT, compresslevel=9) as out:
        for member in members:
            data = archive.extractfile(member).read()
            info = tarfile.TarInfo("/".join(member.name.split("/")[1:]))
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            out.addfile(info, io.BytesIO(data))
    tmp.replace(out_path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive", help="cifar10-jpeg.tar.gz with train/<class>/*.jpg and test/<class>/*.jpg")
    parser.add_argument("out_dir", help="folder that receives train.tar.gz and test.tar.gz")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args(argv)
    with tarfile.open(args.archive) as archive:
        for split, n in (("train", args.train_per_class), ("test", args.test_per_class)):
            members = select_members(archive, split, n)
            write_split(archive, members, Path(args.out_dir) / f"{split}.tar.gz")
            print(f"{split}: {len(members)} images -> {Path(args.out_dir) / f'{split}.tar.gz'}")


if __name__ == "__main__":
    sys.exit(main())
