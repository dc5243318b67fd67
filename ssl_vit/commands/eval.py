"""`ssl-vit knn | linear-probe | index build|query|eval|compare`: evaluation verbs that read feature caches."""
import json
from pathlib import Path

from ssl_vit.errors import SslVitError


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
    p = index.add_parser("build", help="build and save a FAISS index of a feature cache")
    p.add_argument("--features", required=True, help="feature cache folder to index")
    p.add_argument("--out", required=True, help="index folder to write")
    add_index_build_options(p)
    p.set_defaults(func=run_index_build)
    p = index.add_parser("query", help="nearest neighbours of cached samples, by key")
    p.add_argument("--index", required=True, help="index folder (from `index build`)")
    p.add_argument("--features", required=True, help="feature cache holding the query samples")
    p.add_argument("--key", required=True, action="append", help="sample key to query (repeatable)")
    p.add_argument("--k", type=int, default=5)
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
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out of the train features for selection")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)


def add_index_build_options(p) -> None:
    p.add_argument("--kind", choices=("flat", "ivf", "hnsw", "ivfpq"), default="flat")
    p.add_argument("--metric", choices=("cosine", "ip", "l2"), default="cosine")
    p.add_argument("--nlist", type=int, help="IVF lists (default ~4*sqrt(N), at most N/39)")
    p.add_argument("--nprobe", type=int, help="IVF lists visited per query (default ~sqrt(nlist))")
    p.add_argument("--m", type=int, help="ivfpq sub-quantizers; must divide the feature dim")
    p.add_argument("--nbits", type=int, default=8, help="ivfpq bits per sub-quantizer code")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree")
    p.add_argument("--ef-search", type=int, default=64, help="HNSW search breadth")


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


def write_result(path, result: dict) -> None:
    from ssl_vit.train.checkpoint import write_json_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    print(f"result written to {path}")


def run_knn(args) -> int:
    from ssl_vit.eval.knn import knn_classify

    train, test = load_cache(args.train_features), load_cache(args.test_features)
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
    from ssl_vit.eval.linear_probe import linear_probe

    train, test = load_cache(args.train_features), load_cache(args.test_features)
    result = linear_probe(train, test, lrs=args.lrs, epochs=args.epochs, batch_size=args.batch_size,
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


def run_index_build(args) -> int:
    from ssl_vit.eval.retrieval import RetrievalIndex

    cache = load_cache(args.features)
    params = {"metric": args.metric, "nlist": args.nlist, "nprobe": args.nprobe, "m": args.m, "nbits": args.nbits,
              "hnsw_m": args.hnsw_m, "ef_search": args.ef_search}
    index = RetrievalIndex.build(cache.features, cache.keys, cache.labels, args.kind, **params)
    index.source = source_info(args.features, cache.meta)
    index.save(args.out)
    print(f"{args.kind} index of {len(index)} x {index.dim} ({args.metric}) written to {args.out}; "
          f"params {json.dumps(index.params)}")
    return 0


def source_info(folder, meta: dict) -> dict:
    return {"features": str(Path(folder).resolve()), "backbone": meta.get("backbone"),
            "pooling": meta.get("pooling"), "source": meta.get("source")}


def run_index_query(args) -> int:
    from ssl_vit.eval.retrieval import RetrievalIndex

    index, cache = RetrievalIndex.load(args.index), load_cache(args.features)
    rows = {key: i for i, key in enumerate(cache.keys)}
    unknown = [key for key in args.key if key not in rows]
    if unknown:
        raise SslVitError(f"{args.features}: no sample with key {unknown[0]!r}")
    scores, ids = index.search(cache.features[[rows[key] for key in args.key]], args.k)
    for key, s, i in zip(args.key, scores, ids):
        print(format_neighbours(index, s, i, query=key))
    return 0


def format_neighbours(index, scores, ids, query=None) -> str:
    """Rows `rank  score  key  label` for one query's results (scores [k], ids [k] from `RetrievalIndex.search`)."""
    lines = [f"query {query}:"] if query is not None else []
    lines.append(f"{'rank':>4} {'score':>9}  {'label':>5}  key")
    for rank, (score, (key, label)) in enumerate(zip(scores, index.lookup(ids)), start=1):
        if key is not None:
            lines.append(f"{rank:>4} {float(score):>9.4f}  {'-' if label is None else label:>5}  {key}")
    return "\n".join(lines)


def run_index_eval(args) -> int:
    from ssl_vit.eval.retrieval import RetrievalIndex, evaluate

    index, cache = RetrievalIndex.load(args.index), load_cache(args.features)
    exclude = args.exclude_self == "yes" or (
        args.exclude_self == "auto" and index.source.get("features") == str(Path(args.features).resolve()))
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

    cache = load_cache(args.features)
    result = compare_index_kinds(cache.features, cache.labels, args.kinds, k=args.k, keys=cache.keys,
                                 num_queries=args.num_queries)
    print(f"{'kind':>6} {'build s':>8} {'queries/s':>10} {'recall vs flat':>15} {'label recall':>13}")
    for kind, row in result["kinds"].items():
        print(f"{kind:>6} {row['build_s']:>8.2f} {row['queries_per_s']:>10.0f} {row['recall_vs_flat']:>15.4f} "
              f"{row[f'label_recall@{args.k}']:>13.4f}")
    if args.out:
        write_result(args.out, result)
    return 0
