"""The comparison's budget: training FLOPs per image of each method (counted from its model, train/flops.py) and the
images each pretraining run sees, equal images (`budget.mode: images`) or equal compute (`budget.mode: flops`)."""
import json
from pathlib import Path

from ssl_vit.atomic_io import write_json_atomic
from ssl_vit.pipelines.compare_config import CompareConfig, reference_method, training_recipe

FLOPS_BATCH = 4  # per-image FLOPs do not depend on the batch; DINO's head BatchNorm needs more than one image


def method_gflops(cfg: CompareConfig, method: str, num_classes: int) -> dict:
    """{'forward', 'backward', 'total'} GFLOPs per image of one training step of `method` as the comparison runs it."""
    from ssl_vit.loading import method_from_recipe
    from ssl_vit.train.flops import synthetic_batch, training_flops_per_image
    from ssl_vit.transforms import views_from_recipe

    recipe = training_recipe(cfg, method)
    model = method_from_recipe(recipe, num_classes=num_classes)
    sizes = [spec.size for spec in views_from_recipe(recipe.views)]
    sched = {"lr": 0.0, "wd": 0.0, **{k: f(0) for k, f in model.schedules(10, 10).items()}}
    counted = training_flops_per_image(model, synthetic_batch(sizes, FLOPS_BATCH, num_classes), sched)
    return {key: value / 1e9 for key, value in counted.items()}


def write_flops(cfg: CompareConfig, train_index: str, path: Path) -> None:
    """flops.json: {method: GFLOPs per image} for every method of the comparison."""
    classes = json.loads(Path(train_index).read_text()).get("classes") or []
    write_json_atomic(path, {m: method_gflops(cfg, m, max(len(classes), 2)) for m in cfg.methods})


def budget_gflops(cfg: CompareConfig, gflops: dict) -> tuple[float, str]:
    """(GFLOPs every run spends in flops mode, how that number was set)."""
    if cfg.budget.gflops > 0:
        return float(cfg.budget.gflops), f"budget.gflops = {cfg.budget.gflops:,.0f} GFLOPs"
    ref = reference_method(cfg)
    total = cfg.budget.images * gflops[ref]["total"]
    return total, (f"{cfg.budget.images:,} images at {ref}'s {gflops[ref]['total']:.3g} GFLOPs per image "
                   f"= {total:,.0f} GFLOPs")


def run_images(cfg: CompareConfig, method: str, gflops: dict) -> int:
    """Images the pretraining run of `method` sees: `budget.images`, or in flops mode the budget's compute over the
    method's cost per image (at least one batch)."""
    if cfg.budget.mode == "images":
        return cfg.budget.images
    total, _ = budget_gflops(cfg, gflops)
    return max(cfg.budget.batch_size, int(total / gflops[method]["total"]))


def budget_statement(cfg: CompareConfig, gflops: dict) -> str:
    if cfg.budget.mode == "images":
        return (f"equal images: every pretraining run saw **{cfg.budget.images:,} images** "
                f"(budget.mode: images)")
    total, how = budget_gflops(cfg, gflops)
    return (f"equal compute: every pretraining run trained until it had spent **{total:,.0f} training GFLOPs** "
            f"({how}; budget.mode: flops), so a cheaper method sees more images")
