"""Fine-tuning: supervised training from a pretrained backbone (model.init), then top-1/top-5 on `data.eval`. What
`ssl-vit finetune` and the comparison pipeline both run."""
from ssl_vit.atomic_io import write_json_atomic
from ssl_vit.config import method_settings
from ssl_vit.data.index import index_is_labeled, read_index
from ssl_vit.data.sources import expand_source
from ssl_vit.errors import SslVitError
from ssl_vit.eval.classify import evaluate_classifier
from ssl_vit.train.trainer import Trainer


def finetune(recipe, recipe_path: str = "", build=None) -> dict:
    """Train, then evaluate on `data.eval` (when set); returns the training summary plus the evaluation. `build`:
    the method with `model.init` copied in (`ssl_vit.loading.method_from_recipe`, passed down by the caller)."""
    if not method_settings(recipe).fine_tunes:
        raise SslVitError(f"method: fine-tuning trains a classifier (method: supervised), got {recipe.method!r}")
    if not recipe.model.init:
        raise SslVitError(f"model.init: fine-tuning needs a pretrained backbone (--init PATH or model.init=PATH)"
                          f"{' in ' + recipe_path if recipe_path else ''}")
    for key, source in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)):
        require_labelled_shards(key, source)
    if recipe.data.eval:
        expand_source(recipe.data.eval)  # a missing evaluation set is named now, not after training
    trainer = Trainer(recipe, build=build)
    result = {**trainer.fit(), "init": recipe.model.init, "layer_decay": recipe.optim.layer_decay}
    if recipe.data.eval:
        result["eval"] = evaluate_classifier(
            trainer.method.encoder, recipe.data.eval, trainer.acc, image_size=recipe.model.img_size,
            resize=recipe.data.eval_resize or None, batch_size=max(1, trainer.micro_batch),
            num_workers=recipe.data.num_workers, progress=recipe.train.progress)
    if trainer.acc.is_main_process:
        write_json_atomic(trainer.out_dir / "finetune_eval.json", result)
    return result


def require_labelled_shards(key: str, source) -> None:
    """Fine-tuning trains and scores a classifier: an index that says its shards are unlabeled is refused now, not
    at the first unlabeled batch. Patterns without an index are checked by the batches themselves."""
    for part in source if isinstance(source, (list, tuple)) else [source]:
        if str(part).strip().endswith(".json") and not index_is_labeled(read_index(str(part).strip())):
            raise SslVitError(f"{key}: {part} indexes unlabeled shards; fine-tuning needs a class label on every "
                              "sample (pretrain on unlabeled shards with MAE or DINO instead)")
