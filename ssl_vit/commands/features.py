"""`ssl-vit features`: extract a feature cache from evaluation shards with a trained backbone."""


def add_extract_options(p) -> None:
    from ssl_vit.eval import AUTO_POOLING, POOLINGS

    p.add_argument("--backbone", required=True,
                   help="backbone.safetensors, a run folder (train.out_dir), a checkpoint folder, timm:<name> "
                        "(timm's pretrained weights), timm-random:<name>, local-dir:<folder> (config.json + "
                        "model.safetensors, as timm's save_for_hf writes) or hf-hub:<id>")
    p.add_argument("--shards", required=True, help="evaluation shards: index.json, brace pattern, glob or pipe: URL")
    p.add_argument("--pooling", choices=(AUTO_POOLING, *POOLINGS), default=AUTO_POOLING,
                   help="cls: the CLS token (a DeiT student: the mean of its class and distillation tokens); avg: the "
                        "mean final token; cls+avg: both; auto (default): cls where the backbone has a CLS token, "
                        "avg where it has none (a Swin). The cache records the pooling used")
    p.add_argument("--last-blocks", type=int, default=1, help="concatenate the CLS token of the last N blocks")
    p.add_argument("--resize", type=int, default=None,
                   help="resize the shorter side to this before the centre crop (default: image size / 0.875)")
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    p.add_argument("--no-progress", action="store_true")


def register(subparsers) -> None:
    p = subparsers.add_parser("features", help="extract features (a cache for knn / linear-probe / index)",
                              description="Extract features of every sample exactly once (also under accelerate "
                                          "launch), sorted by key, with labels, into a cache folder.")
    add_extract_options(p)
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--per-rank", action="store_true",
                   help="under accelerate launch: each process writes its share as its own cache OUT/part-<rank> "
                        "(nothing gathered on one process; `index build --features OUT/part-*` takes them)")
    p.set_defaults(func=run)


def run(args) -> int:
    extract_from_args(args, args.out, per_rank=args.per_rank)
    print(f"features written to {args.out}")
    return 0


def extract_from_args(args, out, per_rank: bool = False):
    from ssl_vit.eval.features import extract_features
    from ssl_vit.loading import load_backbone, source_name

    model, meta = load_backbone(args.backbone)
    return extract_features(model, args.shards, out, image_size=int(meta["img_size"]), resize=args.resize,
                            pooling=args.pooling, last_blocks=args.last_blocks, batch_size=args.batch_size,
                            num_workers=args.workers, progress=not args.no_progress, per_rank=per_rank,
                            meta={"backbone": source_name(args.backbone), "model_name": meta.get("model_name")})
