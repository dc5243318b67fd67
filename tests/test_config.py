"""Recipe validation: every shipped recipe loads; bad recipes fail with one line naming the key."""
from pathlib import Path

import pytest

from ssl_vit.cli import main
from ssl_vit.config import check_world, load_recipe
from ssl_vit.errors import SslVitError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
TRAIN_RECIPES = [p for p in RECIPES if not p.name.startswith("compare_")]


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load_and_build_their_views(path):
    from ssl_vit.transforms import views_from_recipe

    recipe = load_recipe(path)
    specs = views_from_recipe(recipe.views)
    assert specs and all(s.size <= recipe.model.img_size for s in specs)


def test_paper_recipes_carry_the_papers_hyper_parameters():
    root = RECIPES[0].parent
    mae = load_recipe(root / "mae_vit_base_patch16_in1k.yaml")
    assert (mae.model.name, mae.mae.mask_ratio, mae.data.batch_size, mae.optim.base_lr) == \
        ("vit_base_patch16_224", 0.75, 4096, 1.5e-4)
    dino = load_recipe(root / "dino_vit_small_patch16_in1k.yaml")
    assert (dino.model.name, dino.dino.out_dim, dino.dino.momentum_teacher) == ("vit_small_patch16_224", 65536, 0.996)
    assert (dino.optim.weight_decay, dino.optim.weight_decay_end) == (0.04, 0.4)
    sup = load_recipe(root / "supervised_vit_small_patch16_in1k.yaml")
    assert (sup.supervised.label_smoothing, sup.supervised.mixup, sup.supervised.cutmix) == (0.1, 0.8, 1.0)


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,message", [
    ("method: mae\ntrain: {steps: 10}\noptim: {lrr: 0.1}\n", "unknown recipe key 'optim.lrr'"),
    ("method: mae\ntrain: {steps: 10}\nfoo: 1\n", "unknown recipe key 'foo'"),
    ("method: mae\ntrain: {steps: 10}\noptim: {base_lr: fast}\n", "optim.base_lr: expected a number, got 'fast'"),
    ("method: mae\ntrain: {steps: ten}\n", "train.steps: expected an integer"),
    ("method: mae\ntrain: {steps: 10}\nmae: {mask_ratio: 1.0}\n", "mae.mask_ratio: must be in [0, 1)"),
    ("method: mae\ntrain: {steps: 10}\nmodel: {img_size: 32, patch_size: 4}\nmae: {mask_ratio: 0.0}\n",
     "mae.mask_ratio: 0.0 masks none of the 64 patches; the loss would be empty (use a ratio ≥ 0.0156)"),
    ("method: mae\ntrain: {steps: 10}\nmodel: {img_size: 32, patch_size: 4}\nmae: {mask_ratio: 0.999}\n",
     "mae.mask_ratio: 0.999 masks all of the 64 patches; the encoder would see nothing (use a ratio ≤ 0.9844)"),
    ("method: mae\ntrain: {steps: 10}\nmae: {decoder_dim: 30, decoder_heads: 4}\n",
     "mae.decoder_dim: 30 is not divisible by mae.decoder_heads"),
    ("method: dino\ntrain: {steps: 10}\ndino: {teacher_temp: 0}\n", "dino.teacher_temp: must be positive, got 0"),
    ("method: dino\ntrain: {steps: 10}\ndino: {momentum_teacher: 1.5}\n", "dino.momentum_teacher: must be in [0, 1]"),
    ("method: dino\ntrain: {steps: 10}\ndino: {student_temp: -1}\n", "dino.student_temp: must be positive"),
    ("method: dino\ntrain: {steps: 10}\ndino: {center_momentum: 2}\n", "dino.center_momentum: must be in [0, 1]"),
    ("method: dino\ntrain: {steps: 10}\ndino: {out_dim: 0}\n", "dino.out_dim: must be ≥ 1, got 0"),
    ("method: dino\ntrain: {steps: 10}\ndino: {bottleneck_dim: 0}\n", "dino.bottleneck_dim: must be ≥ 1"),
    ("method: dino\ntrain: {steps: 10}\ndino: {freeze_last_layer_epochs: -1}\n",
     "dino.freeze_last_layer_epochs: must be ≥ 0"),
    ("method: supervised\ntrain: {steps: 10}\nsupervised: {label_smoothing: 1.5}\n",
     "supervised.label_smoothing: must be in [0, 1), got 1.5"),
    ("method: supervised\ntrain: {steps: 10}\nsupervised: {cutmix: -1}\n", "supervised.cutmix: must be ≥ 0"),
    ("method: byol\ntrain: {steps: 10}\n", "method: must be one of"),
    ("method: mae\ntrain: {steps: 10}\nmae: {norm_pix_loss: 3}\n", "mae.norm_pix_loss: expected true/false"),
    ("method: mae\ntrain: {steps: 10}\ndata: 5\n", "data: expected a mapping"),
    ("method: mae\n", "set exactly one of train.epochs and train.steps"),
    ("method: mae\ntrain: {steps: 10}\nmodel: {img_size: 32, patch_size: 5}\n", "model.patch_size: 5 does not divide"),
    ("method: mae\ntrain: [steps\n", "is not valid YAML"),
    ("method: dino\ntrain: {steps: 10}\ndino: {centering: softmax}\n", "dino.centering: must be center or"),
    ("method: dino\ntrain: {steps: 10}\ndino: {use_bn_in_head: maybe}\n", "dino.use_bn_in_head: expected true/false"),
])
def test_bad_recipes_name_the_key(tmp_path, text, message):
    with pytest.raises(SslVitError) as err:
        load_recipe(write(tmp_path, text))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_local_crop_larger_than_global_is_rejected(tmp_path):
    from ssl_vit.transforms import views_from_recipe

    path = write(tmp_path, "method: dino\ntrain: {steps: 1}\n"
                           "views: {preset: dino, global_size: 32, local_size: 48, num_local: 2}\n")
    with pytest.raises(SslVitError, match="local"):
        views_from_recipe(load_recipe(path).views)


def test_batch_not_divisible_by_processes():
    recipe = load_recipe(None, ["train.steps=1", "data.batch_size=10", "optim.accum_steps=1"])
    assert check_world(recipe, 2) == 5
    with pytest.raises(SslVitError, match="data.batch_size: 10 .* not divisible by 3 processes"):
        check_world(recipe, 3)


def test_overrides_are_typed_and_checked():
    recipe = load_recipe(None, ["train.steps=5", "optim.base_lr=3e-4", "optim.betas=[0.9, 0.99]"])
    assert recipe.optim.base_lr == 3e-4 and recipe.optim.betas == (0.9, 0.99)
    with pytest.raises(SslVitError, match="unknown recipe key 'optim.nope'"):
        load_recipe(None, ["train.steps=5", "optim.nope=1"])
    with pytest.raises(SslVitError, match="not key=value"):
        load_recipe(None, ["train.steps"])


def test_override_pairs_are_set_as_they_are_and_settings_need_no_run_length():
    """(key, value) pairs skip the YAML text: a folder named 2024 stays a string, a list stays a list."""
    recipe = load_recipe(None, ["train.steps=5", ("train.out_dir", "2024"), ("data.train", ["a.json", "b: c.json"])])
    assert recipe.train.out_dir == "2024" and recipe.data.train == ["a.json", "b: c.json"]
    with pytest.raises(SslVitError, match="unknown recipe key 'optim.nope'"):
        load_recipe(None, [("train.steps", 5), ("optim.nope", 1)])
    with pytest.raises(SslVitError, match="train.steps: expected an integer"):
        load_recipe(None, [("train.steps", "5")])
    assert load_recipe(None, ["train.monitor_every=10"], for_run=False).train.steps == 0  # read for its settings
    with pytest.raises(SslVitError, match="data.monitor: train.monitor_every needs"):
        load_recipe(None, ["train.monitor_every=10"])
    with pytest.raises(SslVitError, match="set exactly one of train.epochs and train.steps"):
        load_recipe(None, [])
    with pytest.raises(SslVitError, match="mae.mask_ratio"):  # every other value is still checked
        load_recipe(None, ["mae.mask_ratio=1.5"], for_run=False)


def test_cli_reports_recipe_errors_in_one_line(tmp_path, capsys):
    path = write(tmp_path, "method: mae\ntrain: {steps: 10}\noptim: {lrr: 0.1}\n")
    assert main(["pretrain", "--recipe", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "optim.lrr" in err and len(err.splitlines()) == 1


def test_view_sizes_follow_model_img_size_unless_set():
    recipes = RECIPES[0].parent
    dino = load_recipe(recipes / "dino_vit_tiny_cifar10.yaml", ["model.img_size=224", "model.patch_size=16"])
    assert (dino.views["global_size"], dino.views["local_size"]) == (224, 96)  # the paper's 224 / 96
    assert load_recipe(recipes / "dino_vit_tiny_cifar10.yaml").views["local_size"] == 16  # 13.7 → 4 patches
    kept = load_recipe(recipes / "mae_vit_tiny_cifar10.yaml", ["model.img_size=64", "views.size=48"])
    assert kept.views["size"] == 48
    listed = [{"size": 24}]
    assert load_recipe(None, ["train.steps=1", f"views={listed}"]).views == listed


def test_mixed_precision_no_in_a_recipe_and_on_the_command_line(tmp_path):
    """YAML 1.1 reads a plain `no` as false; a string setting takes the word as written."""
    assert load_recipe(write(tmp_path, "method: mae\ntrain: {steps: 1, mixed_precision: no}\n")).train.mixed_precision \
        == "no"
    assert load_recipe(None, ["train.steps=1", "train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(SslVitError, match="train.mixed_precision: must be auto, no, bf16 or fp16"):
        load_recipe(None, ["train.steps=1", "train.mixed_precision=No"])  # the word as written reaches the check


def test_yaml11_words_follow_the_type_of_the_setting(tmp_path):
    """Strings keep yes/no/on/off as written; booleans read them as YAML 1.1 does (y/n too); settings of any type
    (views, data sources) keep YAML 1.1's booleans, as before; quoted words are strings everywhere."""
    import yaml

    text = ("method: dino\ntrain: {steps: 1, out_dir: on, resume: 'no', progress: off, audit_keys: yes}\n"
            "mae: {norm_pix_loss: n}\ndino: {use_bn_in_head: Y, norm_last_layer: NO}\n"
            "views: {preset: dino, blur: off, solarize: On}\ndata: {train: [a.json, 'yes']}\n")
    recipe = load_recipe(write(tmp_path, text))
    assert (recipe.train.out_dir, recipe.train.resume) == ("on", "no")
    assert (recipe.train.progress, recipe.train.audit_keys, recipe.mae.norm_pix_loss) == (False, True, False)
    assert (recipe.dino.use_bn_in_head, recipe.dino.norm_last_layer) == (True, False)
    assert recipe.views["blur"] is False and recipe.views["solarize"] is True
    assert recipe.data.train == ["a.json", "yes"]
    yaml.safe_dump(recipe.to_dict())  # plain types only, as run_log writes recipe.yaml
    recipe = load_recipe(None, ["train.steps=1", "train.progress=no", "train.out_dir=yes", "mae.norm_pix_loss=off"])
    assert (recipe.train.progress, recipe.train.out_dir, recipe.mae.norm_pix_loss) == (False, "yes", False)
    for bad in ("train.progress=maybe", "train.steps=yes"):
        with pytest.raises(SslVitError, match=bad.split("=")[0]):
            load_recipe(None, ["train.steps=1", bad])


def test_pretrain_runs_with_mixed_precision_no_from_the_command_line(train_shards, tmp_path):
    root = RECIPES[0].parent
    assert main(["pretrain", "--recipe", str(root / "mae_vit_tiny_cifar10.yaml"), f"data.train={train_shards}",
                 f"train.out_dir={tmp_path}", "train.epochs=0", "train.steps=1", "data.batch_size=8",
                 "data.num_workers=0", "model.depth=1", "mae.decoder_depth=1", "train.progress=no",
                 "train.log_with=[]", "train.mixed_precision=no"]) == 0
    import json
    assert json.loads((tmp_path / "recipe.json").read_text())["train"]["mixed_precision"] == "no"
