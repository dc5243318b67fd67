"""`ssl-vit shards write SRC OUT`, `ssl-vit shards inspect SOURCE` and `ssl-vit shards index PATTERN --out INDEX`."""
import argparse
import json
import sys
import textwrap
import warnings

FOLDER_RULE = (
    "How a folder (or a tar of one) is read: with --unlabeled, every image at any depth, without labels. Without it, "
    "the folder's sub-folders are classes (SRC/<class>/.../<image>), as for ImageFolder; a folder whose images all "
    "sit at its top level has no classes and is read as unlabeled (a note says so). A folder that mixes loose "
    "top-level images with class folders is an error rather than a guess: labelling would drop the loose images, "
    "and reading it unlabeled would throw the class folders' labels away, so choose with --unlabeled or by moving "
    "the loose images into class folders. A tar's shared top folder (e.g. photos/ in `tar czf photos.tgz photos/`) "
    "is the folder itself, never a class. Lists: a .txt of paths (one per line) is unlabeled; a CSV/JSONL with a "
    "path column is labelled when it also has a label column (every row), else unlabeled. Unlabeled shards serve "
    "MAE/DINO pretraining, feature extraction and retrieval indexes; k-NN, the linear probe and fine-tuning need "
    "labels.")


def register(subparsers) -> None:
    p = subparsers.add_parser("shards", help="write WebDataset shards from images, or inspect them",
                              description="Write WebDataset tar shards from images, or inspect written shards.")
    verbs = p.add_subparsers(dest="shards_command", metavar="<verb>", required=True)

    w = verbs.add_parser(
        "write", help="write shuffled tar shards plus OUT-index.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="\n\n".join(textwrap.fill(text, 100) for text in (
            "Write OUT-000000.tar, OUT-000001.tar, ... from an image folder (labelled by class folders, or "
            "unlabeled), a .tar/.tar.gz/.tgz of one, a .txt list of paths, or a CSV/JSONL list with a path (and "
            "label) column. Samples are shuffled with the seed; re-running the same command resumes (finished "
            "shards are kept).", FOLDER_RULE)))
    w.add_argument("src", metavar="SRC",
                   help="image folder, tar of one, .txt list of paths, or .csv/.jsonl list with path (and label)")
    w.add_argument("out", metavar="OUT", help="output prefix, e.g. shards/train -> shards/train-000000.tar")
    w.add_argument("--max-size", default="256MB",
                   help="target shard size (KB/MB/GB = powers of 1000, KiB/MiB/GiB of 1024; default 256MB)")
    w.add_argument("--max-count", type=int, default=None, help="at most this many samples per shard")
    w.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    w.add_argument("--workers", type=int, default=2, help="parallel writer processes (default 2; 0: in-process)")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.add_argument("--overwrite", action="store_true", help="delete this prefix's shards and write them anew")
    w.add_argument("--unlabeled", action="store_true",
                   help="read every image (at any depth, or every row of a list) without labels")
    w.set_defaults(func=run_write)

    i = verbs.add_parser("inspect", help="summarize shards (classes, formats, sizes); --verify checksums",
                         description="Summarize the shards of an index: class histogram, image formats and sizes.")
    i.add_argument("source", metavar="SOURCE", help="OUT-index.json, or the OUT prefix it was written with")
    i.add_argument("--verify", action="store_true",
                   help="recompute sha256 and sample counts; exit 1 naming any shard that differs or is missing")
    i.add_argument("--grid", metavar="PNG", help="write a PNG grid of the first samples with their class names")
    i.add_argument("--grid-n", type=int, default=64, help="samples in the grid (default 64)")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(func=run_inspect)

    x = verbs.add_parser(
        "index", help="write our index.json for shards written by other tools (img2dataset, webdataset)",
        description="Scan WebDataset shards that another tool wrote (img2dataset's <key>.jpg/.json/.txt, webdataset's "
                    "ShardWriter/TarWriter; images jpg/jpeg/png/webp in any case) and write an index: samples, bytes "
                    "and sha256 per shard, and classes when every sample has a cls. Training and evaluation given "
                    "the index then know epochs, progress and ETA.")
    x.add_argument("pattern", metavar="PATTERN",
                   help="shards: brace pattern (s3-{000000..000099}.tar), glob, or pipe: URL (pipe:aws s3 cp ... -)")
    x.add_argument("--out", required=True, metavar="INDEX.json", help="index to write")
    x.add_argument("--workers", type=int, default=4, help="parallel reader processes (default 4; 0: in-process)")
    x.add_argument("--no-progress", action="store_true", help="no progress bar")
    x.set_defaults(func=run_index)


def run_write(args) -> int:
    from ssl_vit.data.writer import write_shards

    from ssl_vit.data.image_sources import UnlabeledNote

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            index = write_shards(args.src, args.out, max_count=args.max_count, max_size=args.max_size,
                                 seed=args.seed, workers=args.workers, progress=not args.no_progress,
                                 overwrite=args.overwrite, unlabeled=args.unlabeled)
        finally:
            for w in caught:
                kind = "note" if issubclass(w.category, UnlabeledNote) else "warning"
                print(f"{kind}: {w.message}", file=sys.stderr)
    counts = ", ".join(f"{name} {n}" for name, n in zip(index["classes"], index["class_counts"])) or "unlabeled"
    if len(index["classes"]) > 20:
        counts = f"{len(index['classes'])} classes, {min(index['class_counts'])}..{max(index['class_counts'])} each"
    print(f"wrote {len(index['shards'])} shards, {index['num_samples']} samples ({counts}) to {args.out}-*.tar; "
          f"index {args.out}-index.json; skipped {index['skipped']}")
    return 0


def run_inspect(args) -> int:
    from ssl_vit.data.inspect import format_report, inspect_shards

    report = inspect_shards(args.source, verify=args.verify, grid_png=args.grid, grid_n=args.grid_n)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    if args.verify and not report["verify"]["ok"]:
        for problem in report["verify"]["problems"]:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0


def run_index(args) -> int:
    from ssl_vit.data.index import index_is_labeled
    from ssl_vit.data.scan import index_shards

    index = index_shards(args.pattern, args.out, workers=args.workers, progress=not args.no_progress)
    labels = (f"{len(index['classes'])} classes" if index_is_labeled(index) else
              f"unlabeled: {index['unlabeled_samples']} samples lack a cls" if "unlabeled_samples" in index
              else "unlabeled")
    print(f"indexed {len(index['shards'])} shards, {index['num_samples']} samples ({labels}); index {args.out}")
    skipped = [f"{e['name']} {e['skipped']}" for e in index["shards"] if e.get("skipped")]
    if skipped:
        print(f"skipped {index['skipped']} samples without an image or with an unreadable label "
              f"({', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''})", file=sys.stderr)
    return 0
