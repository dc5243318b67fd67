"""`ssl-vit inspect-model`: the ViT paper's pictures of one backbone (pipelines/vit_figures.py)."""
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect-model", help="draw a backbone's position-embedding similarity, attention distances and rollout",
        description="Writes into --out: position_embedding.png (each patch position's cosine similarity with every "
                    "other, Dosovitskiy et al. 2021 Fig. 7 centre), attention_distance.png (mean attention distance "
                    "per head against depth, Fig. 7 right) and attention_rollout.png (Abnar & Zuidema 2020, beside "
                    "the last-block CLS attention), the attention figures on --images evaluation images of "
                    "--shards. A figure that does not exist for the backbone (a Swin has no absolute position "
                    "embedding and attends within windows) is reported, not drawn.")
    p.add_argument("--backbone", required=True, help="backbone.safetensors, a run or checkpoint folder, timm:<name>, "
                                                    "timm-random:<name>, local-dir:<folder> or hf-hub:<id>")
    p.add_argument("--out", required=True, help="folder to write the figures into")
    p.add_argument("--shards", help="labelled evaluation shards for the attention figures (index.json, pattern ...)")
    p.add_argument("--images", type=int, default=4, help="evaluation images for the attention figures")
    p.set_defaults(func=run)


def run(args) -> int:
    from ssl_vit.loading import load_backbone, source_name
    from ssl_vit.pipelines.figures import evaluation_images
    from ssl_vit.pipelines.vit_figures import inspect_backbone

    model, meta = load_backbone(args.backbone)
    images = evaluation_images(args.shards, args.images)[0] if args.shards else []
    written = inspect_backbone(model, meta, images, args.out, meta.get("model_name", source_name(args.backbone)))
    print(json.dumps(written, indent=1))
    return 0
