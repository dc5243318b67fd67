"""`ssl-vit shards write SRC OUT` and `ssl-vit shards inspect SOURCE`."""
import json
import sys
import warnings


def register(subparsers) -> None:
    p = subparsers.add_parser("shards", help="write WebDataset shards from images, or inspect them",
                              description="Write WebDataset tar shards from images, or inspect written shards.")
    verbs = p.add_subparsers(dest="shards_command", metavar="<verb>", required=True)

    w = verbs.add_parser(
        "write", help="write shuffled tar shards plus OUT-index.json",
        description="Write OUT-000000.tar, OUT-000001.tar, ... from an image folder (SRC/<class>/<image>), a "
                    ".tar/.tar.gz/.tgz of one, or a CSV/JSONL list of path,label. Samples are shuffled with the "
                    "seed; re-running the same command resumes (finished shards are kept).")
    w.add_argument("src", metavar="SRC", help="image folder, tar of one, or .csv/.jsonl list of path,label")
    w.add_argument("out", metavar="OUT", help="output prefix, e.g. shards/train -> shards/train-000000.tar")
    w.add_argument("--max-size", default="256MB",
                   help="target shard size (KB/MB/GB = powers of 1000, KiB/MiB/GiB of 1024; default 256MB)")
    w.add_argument("--max-count", type=int, default=None, help="at most this many samples per shard")
    w.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    w.add_argument("--workers", type=int, default=2, help="parallel writer processes (default 2; 0: in-process)")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.add_argument("--overwrite", action="store_true", help="delete this prefix's shards and write them anew")
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


def run_write(args) -> int:
    from ssl_vit.data.writer import write_shards

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            index = write_shards(args.src, args.out, max_count=args.max_count, max_size=args.max_size,
                                 seed=args.seed, workers=args.workers, progress=not args.no_progress,
                                 overwrite=args.overwrite)
        finally:
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)
    counts = ", ".join(f"{name} {n}" for name, n in zip(index["classes"], index["class_counts"]))
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
