"""`ssl-vit index build` and `index merge`: indexes from feature caches (in bounded memory, from parts, `--kind
auto`), with the image table the server reads thumbnails through. Registered by commands/eval.py's `index` verb."""
import json
from pathlib import Path

from ssl_vit.errors import SslVitError
from ssl_vit.eval.index_queries import EXTRACTION_KEYS


def add_index_build_options(p) -> None:
    p.add_argument("--kind", choices=("flat", "ivf", "hnsw", "ivfpq", "auto"), default="flat",
                   help="auto: the family and parameters that fit --max-memory and reach --target-recall, measured "
                        "on a held-out sample (recorded in meta.json under source.auto)")
    p.add_argument("--max-memory", default="2GB", help="auto: RAM budget of the index (e.g. 2GB, 512MiB)")
    p.add_argument("--target-recall", type=float, default=0.9, help="auto: recall@10 against exact search")
    p.add_argument("--max-latency-ms", type=float, default=10.0,
                   help="auto: flat is chosen when it fits and searches within this many ms per query")
    p.add_argument("--metric", choices=("cosine", "ip", "l2"), default="cosine")
    p.add_argument("--nlist", type=int, help="IVF lists (default ~4*sqrt(N), at most N/39)")
    p.add_argument("--nprobe", type=int, help="IVF lists visited per query (default ~sqrt(nlist))")
    p.add_argument("--m", type=int, help="ivfpq sub-quantizers; must divide the feature dim")
    p.add_argument("--nbits", type=int, default=8, help="ivfpq bits per sub-quantizer code")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree")
    p.add_argument("--ef-search", type=int, default=64, help="HNSW search breadth")
    p.add_argument("--refine", choices=("flat", "sq8"),
                   help="ivfpq: re-rank candidates with the stored vectors (flat, N*D*4 bytes) or 8-bit codes (sq8, "
                        "N*D bytes), so that an indexed image comes back first")
    p.add_argument("--k-factor", type=int, default=32, help="refine: candidates re-ranked per result")
    p.add_argument("--image-table", choices=("auto", "yes", "no"), default="auto",
                   help="write the key -> (shard, offset, size) table of the shards' images for `ssl-vit serve` "
                        "(read from the tar headers once; auto: for local shards only, since a remote shard's "
                        "headers are read by streaming the whole shard)")
    p.add_argument("--train-size", type=int,
                   help="vectors sampled to train IVF/PQ (default 64 per centroid of the largest codebook)")


def run_index_build(args) -> int:
    from ssl_vit.eval.retrieval import RetrievalIndex

    parts, metas = open_parts(args.features)
    params = {"metric": args.metric, "nlist": args.nlist, "nprobe": args.nprobe, "m": args.m, "nbits": args.nbits,
              "hnsw_m": args.hnsw_m, "ef_search": args.ef_search, "refine": args.refine,
              "k_factor": args.k_factor, "train_size": args.train_size}
    kind, report = args.kind, None
    if kind == "auto":
        kind, params, report, queries = choose_kind(args, parts)
    if args.train_only or args.trained:
        index = split_step(args, parts, kind, params)
    else:
        index = RetrievalIndex.build_from_parts(parts, kind, **params)
    index.source = source_info(args.features, metas)
    if report is not None:
        from ssl_vit.eval.index_auto import final_check

        report["final"] = final_check(index, parts, queries)
        print(f"auto: the built index: {json.dumps(report['final'])}")
        index.source["auto"] = report
    save_with_table(index, args.out, "no" if args.train_only or args.trained else args.image_table)
    print(f"{index.kind} index of {len(index)} x {index.dim} ({args.metric}) from {len(parts)} cache(s) written to "
          f"{args.out}; params {json.dumps(index.params)}")
    return 0


def save_with_table(index, out, wanted: str) -> None:
    table = image_table(index.source.get("shards") or [], wanted)
    index.source["image_table"] = table if isinstance(table, str) else len(table.keys)
    index.save(out, arrays=None if isinstance(table, str) else table.arrays())


def split_step(args, parts, kind, params):
    """`--train-only` (the trained, empty index) or `--trained T` (one part added to a copy of T)."""
    from ssl_vit.eval.index_steps import add_part, trained_only
    from ssl_vit.eval.retrieval import RetrievalIndex

    if args.train_only:
        return trained_only(parts, kind, **params)
    if len(parts) != 1:
        raise SslVitError("--trained adds one part: give one --features cache")
    return add_part(RetrievalIndex.load(args.trained), parts[0])


def run_index_merge(args) -> int:
    from ssl_vit.eval.index_steps import merge_indexes
    from ssl_vit.eval.retrieval import RetrievalIndex

    index = merge_indexes([RetrievalIndex.load(folder) for folder in args.parts], args.parts)
    save_with_table(index, args.out, args.image_table)
    print(f"{index.kind} index of {len(index)} x {index.dim} merged from {len(args.parts)} parts into {args.out}")
    return 0


def choose_kind(args, parts):
    """(kind, params, report, held-out queries) of `--kind auto`, one line per measured candidate printed."""
    from ssl_vit.eval.index_auto import choose, parse_size

    if not 0 < args.target_recall <= 1:
        raise SslVitError(f"--target-recall must be in (0, 1], got {args.target_recall}")
    kind, params, report, queries = choose(parts, parse_size(args.max_memory), target_recall=args.target_recall,
                                           metric=args.metric, max_latency_ms=args.max_latency_ms)
    for row in report["candidates"]:
        print(f"auto: {row['kind']:>6} {row['bytes'] / 1e9:8.3f} GB  recall@10 {row['recall']:.3f}  "
              f"{row['ms_per_query']:.3f} ms/query  {json.dumps(row['params'])}")
    chosen = report["chosen"]
    print(f"auto: chose {kind} (recall@10 {chosen['recall']:.3f} on {report['measured_on']['queries']} held-out "
          f"queries, {chosen['ms_per_query']:.3f} ms/query, {chosen['bytes'] / 1e9:.3f} GB)")
    return kind, params, report, queries


def image_table(shards: list, wanted: str = "auto"):
    """The key -> (shard, offset, size) table of the shards' images (for `ssl-vit serve`'s thumbnails), or a line
    saying why there is none (not wanted, no shards recorded, remote shards under `auto`, `pipe:` or gzip shards)."""
    from ssl_vit.data.image_table import ImageTable

    if wanted == "no":
        return "not written (--image-table no)"
    if not shards:
        return "the feature caches record no shards"
    remote = [url for url in shards if "://" in url]
    if remote and wanted == "auto":
        return f"not written for remote shards such as {remote[0]} (--image-table yes reads their headers)"
    try:
        return ImageTable.build(shards)
    except SslVitError as e:
        return str(e)


def open_parts(folders):
    """([Part] read by row from each cache, [meta]); the caches must come from one backbone, view and pooling."""
    from ssl_vit.eval.feature_cache import open_rows
    from ssl_vit.eval.index_build import Part

    opened = [open_rows(folder) for folder in folders]
    first = opened[0][3]
    for folder, (_, _, _, meta) in zip(folders[1:], opened[1:]):
        differ = [key for key in ("backbone", *EXTRACTION_KEYS, "classes") if meta.get(key) != first.get(key)]
        if differ:
            raise SslVitError(f"feature cache {folder} differs from {folders[0]} in {', '.join(differ)}: "
                              "one index holds features of one backbone, view and pooling")
    return [Part(features, keys, labels) for features, keys, labels, _ in opened], [m for *_, m in opened]


# What `--grid` and the server need to show results (EXTRACTION_KEYS: to embed an image as the features were).
RECORDED_KEYS = ("backbone", "model_name", *EXTRACTION_KEYS, "source", "classes")


def source_info(folders, metas: list) -> dict:
    """What the index records of its caches: their folders (in id order), how the features were made, and every
    shard they were extracted from (in first-seen order)."""
    shards = list(dict.fromkeys(url for meta in metas for url in meta.get("shards") or []))
    info = {key: metas[0][key] for key in RECORDED_KEYS if key in metas[0]}
    return {"features": [str(Path(folder).resolve()) for folder in folders], **info,
            **({"shards": shards} if shards else {})}
