"""Training FLOPs per image, counted from the model, against a hand calculation for a tiny ViT."""
from ssl_vit.config import load_recipe
from ssl_vit.loading import method_from_recipe
from ssl_vit.train.flops import synthetic_batch, training_flops_per_image
from ssl_vit.transforms import views_from_recipe

DEPTH, DIM, PATCH, SIZE, CLASSES = 2, 64, 8, 32, 10
TINY = ["model.name=vit_tiny_patch16_224", f"model.img_size={SIZE}", f"model.patch_size={PATCH}",
        f"model.depth={DEPTH}", f"model.embed_dim={DIM}", "model.num_heads=2", "train.steps=1"]


def vit_forward(tokens: int, depth: int = DEPTH, dim: int = DIM, mlp_ratio: int = 4) -> int:
    """Matmul FLOPs (2 per multiply-add) of `depth` ViT blocks on `tokens` tokens: qkv 3D², proj D², MLP 2·r·D² per
    token, and attention's two products (QKᵀ and AV) of N·N·D multiply-adds each over all heads."""
    per_block = 2 * tokens * (3 + 1 + 2 * mlp_ratio) * dim * dim + 2 * 2 * tokens * tokens * dim
    return depth * per_block


def patch_embed(size: int = SIZE, patch: int = PATCH, dim: int = DIM) -> int:
    return 2 * (size // patch) ** 2 * (3 * patch * patch) * dim


def flops(method: str, extra: list[str] = ()):
    recipe = load_recipe(None, [f"method={method}", *TINY, *extra])
    model = method_from_recipe(recipe, num_classes=CLASSES)
    specs = views_from_recipe(recipe.views)
    sched = {"lr": 0.0, "wd": 0.0, **{k: f(0) for k, f in model.schedules(10, 10).items()}}
    return training_flops_per_image(model, synthetic_batch([s.size for s in specs], 4, CLASSES), sched)


def test_supervised_flops_match_the_hand_count():
    tokens = (SIZE // PATCH) ** 2 + 1  # patches + CLS
    forward = patch_embed() + vit_forward(tokens) + 2 * DIM * CLASSES
    # Backward: every matrix product twice (gradients of both operands); the patch embedding once (the image needs
    # no gradient).
    backward = 2 * (forward - patch_embed()) + patch_embed()
    got = flops("supervised")
    assert got["forward"] == forward
    assert got["backward"] == backward
    assert got["total"] == forward + backward


def test_mae_encoder_sees_only_visible_patches():
    ratio = 0.75
    got = flops("mae", [f"mae.mask_ratio={ratio}", "mae.decoder_depth=1", "mae.decoder_dim=32", "mae.decoder_heads=2"])
    patches = (SIZE // PATCH) ** 2
    visible = int(patches * (1 - ratio)) + 1
    encoder = patch_embed() + vit_forward(visible)
    # Decoder: embed the visible tokens, one block on every position (+ CLS), predict each patch's pixels.
    decoder = (2 * visible * DIM * 32 + vit_forward(patches + 1, depth=1, dim=32)
               + 2 * patches * 32 * PATCH * PATCH * 3)
    assert got["forward"] == encoder + decoder
    full_encoder = patch_embed() + vit_forward(patches + 1)
    assert got["forward"] < full_encoder  # MAE's step is cheaper than one full encoder pass at 75 % masking


def test_dino_counts_every_view_and_the_teacher():
    got = flops("dino", ["views.preset=dino", "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16"])
    one_global = patch_embed() + vit_forward((SIZE // PATCH) ** 2 + 1)
    # Student on 2 global + the local views, teacher on the 2 global ones: well over 4 global passes forward.
    assert got["forward"] > 4 * one_global
    assert got["backward"] > 2 * (2 * one_global - patch_embed())
