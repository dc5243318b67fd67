"""`ssl-vit knn | linear-probe | index build|merge|query|eval|compare`: evaluation verbs that read feature caches
(`index build` and `index merge` live in commands/index_build.py)."""
from pathlib import Path

from ssl_vit.commands.index_build import add_index_build_options, run_index_build, run_index_merge
from ssl_vit.errors import SslVitError
from ssl_vit.eval.index_queries import index_caches, query_embedder


def register(subparsers) -> None:
    p = subparsers.add_parser("knn", help="weighted k-NN accuracy of cached features (DINO protocol)",
                              description="Top-1/top-5 of the exp(sim/T)-weighted k-NN vote over L2-normalised "
                                          "features (FAISS exact search).")
    add_train_test_options(p)
    add_knn_options(p)
    p.set_defaults(func=run_knn)

    p = subparsers.add_parser("linear-probe", help="grid of linear heads on cached features, chosen on validation",
                              description="Trains one linear head per lr (and per pooling for cls+avg caches) in "
                                          "one pass, selects on a held-out part of the train features, then "
                                          "reports test top-1/top-5 of the chosen head.")
    add_train_test_options(p)
    add_probe_options(p)
    p.set_defaults(func=run_linear_probe)

    index = subparsers.add_parser("index", help="retrieval indexes over cached features").add_subparsers(
        dest="index_command", metavar="<index command>", required=True)
    p = index.add_parser("build", help="build and save a FAISS index of a feature cache (or of its parts)",
                         description="Trains on a sample of the cache (chosen by key hash) and adds the rows a chunk "
                                     "at a time from the memory-mapped cache: memory is the index plus one chunk. "
                                     "Several caches (the parts of `features --per-rank`, or jobs over shards of "
                                     "one pile) are each added to a copy of the trained index and merged.")
    p.add_argument("--features", required=True, nargs="+", help="feature cache folder(s) to index, as one index")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--train-only", action="store_true",
                       help="write only the trained, empty index (reads the caches' training sample): copy it to "
                            "where each part lives, fill it there with --trained, then `index merge` the parts")
    steps.add_argument("--trained", help="an index from --train-only: add --features (one part) to a copy of it")
    p.add_argument("--out", required=True, help="index folder to write")
    add_index_build_options(p)
    p.set_defaults(func=run_index_build)
    p = index.add_parser("merge", help="merge parts filled from one --train-only index into one index")
    p.add_argument("parts", nargs="+", help="part index folders (from `index build --trained`), in id order")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--image-table", choices=("auto", "yes", "no"), default="auto", help="as for `index build`")
    p.set_defaults(func=run_index_merge)
    p = index.add_parser("query", help="nearest neighbours of image files, or of cached samples by key",
                         description="Prints rank, score, label and key of each query's nearest indexed samples. "
                                     "Image files are embedded with the backbone, view and pooling the index's "
                                     "features were extracted with.")
    p.add_argument("--index", required=True, help="index folder (from `index build`)")
    queries = p.add_mutually_exclusive_group(required=True)
    queries.add_argument("--image", action="append", help="image file to query (repeatable)")
    queries.add_argument("--key", action="append", help="key of a cached sample to query (repeatable)")
    p.add_argument("--features", help="feature cache holding the --key samples (default: the indexed one)")
    p.add_argument("--backbone", help="backbone for --image (default: the one the index records)")
    p.add_argument("-k", "--k", type=int, default=10, help="results per query")
    p.add_argument("--grid", help="write a PNG: one row per query, the query image then its results and scores")
    p.set_defaults(func=run_index_query)
    p = index.add_parser("eval", help="label recall@k and mAP of an index for labelled query features")
    p.add_argument("--index", required=True, help="index folder (from `index build`)")
    p.add_argument("--features", required=True, help="labelled query feature cache")
    add_index_eval_options(p)
    p.set_defaults(func=run_index_eval)
    p = index.add_parser("compare", help="recall vs exact search and queries/s of each index kind")
    p.add_argument("--features", required=True, help="labelled feature cache, indexed and queried")
    p.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw", "ivfpq"])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--num-queries", type=int, default=1000)
    p.add_argument("--out", help="write the result as JSON here")
    p.set_defaults(func=run_index_compare)


def add_train_test_options(p) -> None:
    p.add_argument("--train-features", required=True, help="feature cache of the labelled bank / training set")
    p.add_argument("--test-features", required=True, help="feature cache of the evaluation set")
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("--threads", type=int, default=None, help="FAISS and torch threads (default: all cores)")


def add_knn_options(p) -> None:
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200], help="neighbour counts")
    p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T)")
    p.add_argument("--chunk-size", type=int, default=16384, help="queries per FAISS search call")


def add_probe_options(p) -> None:
    p.add_argument("--lrs", type=float, nargs="+",
                   help="learning-rate grid (default: the probe's, ssl_vit.eval.linear_probe.DEFAULT_LRS)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out of the train features for selection")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)


def add_index_eval_options(p) -> None:
    p.add_argument("--k", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--exclude-self", choices=("auto", "yes", "no"), default="auto",
                   help="drop each query's own item from its results (auto: when the query cache is the one "
                        "the index was built from)")
    p.add_argument("--out", help="write the result as JSON here")


def load_cache(folder):
    """The feature cache behind a --*-features option (the one place to add on-the-fly extraction)."""
    from ssl_vit.eval.feature_cache import load_features

    return load_features(folder)


def load_labelled_cache(folder, name: str, needed_for: str):
    """A cache whose every sample has a label; else one line naming the cache and how many labels are missing."""
    from ssl_vit.eval.feature_cache import require_labels

    cache = load_cache(folder)
    require_labels(cache.labels, name, needed_for, cache=folder)
    return cache


def write_result(path, result: dict) -> None:
    from ssl_vit.atomic_io import write_json_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    print(f"result written to {path}")


def run_knn(args) -> int:
    from ssl_vit.eval.knn import knn_classify

    train = load_labelled_cache(args.train_features, "train", "k-NN")
    test = load_labelled_cache(args.test_features, "test", "k-NN")
    result = knn_classify(train.features, train.labels, test.features, test.labels, ks=args.k,
                          temperature=args.temperature, chunk_size=args.chunk_size, num_threads=args.threads)
    result["features"] = {"train": str(args.train_features), "test": str(args.test_features),
                          "backbone": train.meta.get("backbone"), "pooling": train.meta.get("pooling")}
    print(format_knn(result))
    if args.out:
        write_result(args.out, result)
    return 0


def format_knn(result: dict) -> str:
    lines = [f"k-NN (T={result['temperature']:g}, {result['num_train']} train, {result['num_test']} test, "
             f"dim {result['dim']}, {result['device']}, {result['seconds']['total']:.2f}s)",
             f"{'k':>6} {'top1 %':>8} {'top5 %':>8}"]
    lines += [f"{k:>6} {v['top1']:>8.2f} {v['top5']:>8.2f}" for k, v in result["k"].items()]
    return "\n".join(lines)


def run_linear_probe(args) -> int:
    from ssl_vit.eval.linear_probe import DEFAULT_LRS, linear_probe

    train = load_labelled_cache(args.train_features, "train", "the linear probe")
    test = load_labelled_cache(args.test_features, "test", "the linear probe")
    result = linear_probe(train, test, lrs=args.lrs or DEFAULT_LRS, epochs=args.epochs, batch_size=args.batch_size,
                          val_fraction=args.val_fraction, seed=args.seed, weight_decay=args.weight_decay,
                          num_threads=args.threads)
    print(format_probe(result))
    if args.out:
        write_result(args.out, result)
    return 0


def format_probe(result: dict) -> str:
    lrs = list(next(iter(result["pooling_grid"].values())))
    lines = [f"linear probe: validation top-1 % ({result['num_train']} train, {result['num_val']} val, "
             f"{result['epochs']} epochs, {result['optimizer']})",
             f"{'pooling':>8} " + " ".join(f"{'lr=' + lr:>9}" for lr in lrs)]
    lines += [f"{name:>8} " + " ".join(f"{row[lr]:>9.2f}" for lr in lrs)
              for name, row in result["pooling_grid"].items()]
    lines.append(f"chosen: pooling {result['best_pooling']}, lr {result['best_lr']:g} (val {result['val_top1']:.2f}) "
                 f"-> test top-1 {result['test_top1']:.2f}, top-5 {result['test_top5']:.2f}")
    return "\n".join(lines)


def run_index_query(args) -> int:
    from ssl_vit.eval.retrieval import RetrievalIndex, images_by_key

    index = RetrievalIndex.load(args.index)
    if args.grid and not index.source.get("shards"):
        raise SslVitError(f"index {args.index} does not record the shards of its features: cannot draw --grid")
    if args.image:
        features, images = embed_query_images(args, index)
    else:
        features, query_shards = cached_queries(args, index)
    scores, ids = index.search(features, args.k)
    names = args.image or args.key
    for name, s, i in zip(names, scores, ids):
        print(format_neighbours(index, s, i, query=name))
    if args.grid:
        if not args.image:
            found = images_by_key(query_shards, args.key)
            images = [found[key] for key in args.key]
        write_query_grid(args, index, names, images, scores, ids)
    return 0


def embed_query_images(args, index):
    """(features [N, D], PIL images) of the --image files, embedded as the index's features were."""
    from ssl_vit.eval.features import load_image

    images = [load_image(path) for path in args.image]
    return query_embedder(index.source, index.dim, args.index, args.backbone)(images), images


def cached_queries(args, index):
    """(features [N, D], shard URLs of the caches) of the --key samples."""
    from ssl_vit.eval.feature_cache import vectors_by_key

    folders = [args.features] if args.features else index_caches(index)
    if not folders:
        raise SslVitError(f"index {args.index} does not record its feature cache: pass --features")
    features, metas = vectors_by_key(folders, args.key)
    shards = [url for meta in metas for url in meta.get("shards") or []]
    if args.grid and not shards:
        raise SslVitError(f"feature cache {folders[0]} does not record its shards: cannot draw --grid")
    return features, shards


def write_query_grid(args, index, names, images, scores, ids) -> None:
    from ssl_vit.eval.retrieval import images_by_key, write_result_grid

    results = [[(key, label, float(s)) for (key, label), s in zip(index.lookup(i), row) if key is not None]
               for i, row in zip(ids, scores)]
    found = images_by_key(index.source["shards"], {key for row in results for key, _, _ in row})
    classes = index.source.get("classes")
    rows = [(image, Path(name).name if args.image else name,
             [(found[key], f"{score:.3f} {label_name(label, classes)}") for key, label, score in row])
            for name, image, row in zip(names, images, results)]
    print(f"grid written to {write_result_grid(rows, args.grid)}")


def label_name(label, classes) -> str:
    """The class name of `label` where the index knows it, else the number ('-' for unlabelled)."""
    if label is None:
        return "-"
    return classes[label] if classes and 0 <= label < len(classes) else str(label)


def format_neighbours(index, scores, ids, query=None) -> str:
    """Rows `rank  score  label  key` for one query's results (scores [k], ids [k] from `RetrievalIndex.search`);
    labels are class names where the index records them."""
    classes = index.source.get("classes")
    found = [(rank, float(score), label_name(label, classes), key)
             for rank, (score, (key, label)) in enumerate(zip(scores, index.lookup(ids)), start=1) if key is not None]
    width = max([5] + [len(name) for _, _, name, _ in found])
    lines = [f"query {query}:"] if query is not None else []
    lines.append(f"{'rank':>4} {'score':>9}  {'label':>{width}}  key")
    lines += [f"{rank:>4} {score:>9.4f}  {name:>{width}}  {key}" for rank, score, name, key in found]
    return "\n".join(lines)


def run_index_eval(args) -> int:
    from ssl_vit.eval.retrieval import RetrievalIndex, evaluate

    index, cache = RetrievalIndex.load(args.index), load_labelled_cache(args.features, "query", "label recall")
    exclude = args.exclude_self == "yes" or (
        args.exclude_self == "auto" and str(Path(args.features).resolve()) in index_caches(index))
    result = evaluate(index, cache.features, cache.labels, ks=args.k,
                      exclude_self_keys=cache.keys if exclude else None)
    result["exclude_self"] = exclude
    print(f"{index.kind} index, {result['num_queries']} queries ({'self excluded' if exclude else 'self kept'}), "
          f"{result['queries_per_s']:.0f} queries/s")
    print("  ".join(f"recall@{k} {v:.4f}" for k, v in result["recall@k"].items())
          + f"  mAP@{result['mAP_at']} {result['mAP']:.4f}")
    if args.out:
        write_result(args.out, result)
    return 0


def run_index_compare(args) -> int:
    from ssl_vit.eval.retrieval import compare_index_kinds

    cache = load_labelled_cache(args.features, "query", "label recall")
    result = compare_index_kinds(cache.features, cache.labels, args.kinds, k=args.k, keys=cache.keys,
                                 num_queries=args.num_queries)
    print(f"{'kind':>6} {'build s':>8} {'queries/s':>10} {'recall vs flat':>15} {'label recall':>13}")
    for kind, row in result["kinds"].items():
        print(f"{kind:>6} {row['build_s']:>8.2f} {row['queries_per_s']:>10.0f} {row['recall_vs_flat']:>15.4f} "
              f"{row[f'label_recall@{args.k}']:>13.4f}")
    if args.out:
        write_result(args.out, result)
    return 0
