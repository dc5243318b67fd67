"""One place per method: the registry pairs each recipe section (its settings class: the only defaults and checks)
with its constructor; nothing else branches on a method's name, and the layers import downwards only."""
import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from ssl_vit import cli
from ssl_vit.config import METHODS, Recipe, load_recipe, method_settings
from ssl_vit.method_settings import SettingsError
from ssl_vit.errors import SslVitError
from ssl_vit.methods import REGISTRY, backbone_spec, build_method
from ssl_vit.methods.distill import DistilledSupervised
from ssl_vit.methods.dino import DINO
from ssl_vit.methods.mae import MAE
from ssl_vit.methods.supervised import Supervised

PACKAGE = Path(__file__).resolve().parents[1] / "ssl_vit"
TINY = ["train.steps=1", "model.img_size=32", "model.patch_size=8", "model.depth=1", "model.embed_dim=32",
        "model.num_heads=2", "mae.decoder_dim=32", "mae.decoder_heads=2", "mae.decoder_depth=1", "dino.out_dim=16",
        "dino.hidden_dim=16", "dino.bottleneck_dim=8"]


def test_every_recipe_section_has_one_entry():
    assert tuple(REGISTRY) == METHODS == ("mae", "dino", "supervised")
    sections = {f.name: f.default_factory for f in dataclasses.fields(Recipe)}
    for name, entry in REGISTRY.items():
        assert sections[name] is entry.settings and entry.settings.section == name
    assert [name for name, entry in REGISTRY.items() if entry.needs_labels] == ["supervised"]
    assert {name: entry.views for name, entry in REGISTRY.items()} == {"mae": "mae", "dino": "dino",
                                                                       "supervised": "supervised"}


@pytest.mark.parametrize("cls", [MAE, DINO, Supervised, DistilledSupervised])
def test_constructors_repeat_no_setting_or_default(cls):
    """A method's settings come only from its settings class: no constructor parameter is a settings field."""
    fields = {f.name for entry in REGISTRY.values() for f in dataclasses.fields(entry.settings)}
    params = inspect.signature(cls.__init__).parameters
    assert not fields & set(params), fields & set(params)


@pytest.mark.parametrize("method,cls", [("mae", MAE), ("dino", DINO), ("supervised", Supervised)])
def test_build_method_uses_the_recipe_section(method, cls):
    recipe = load_recipe(None, [f"method={method}", *TINY])
    assert recipe.views["preset"] == method_settings(recipe).views  # a recipe without views: the method's preset
    built = build_method(recipe, num_classes=10)
    assert type(built) is cls
    assert backbone_spec(recipe).dynamic_img_size == (method == "dino")


def test_a_constructor_checks_with_the_recipe_message():
    spec = backbone_spec(load_recipe(None, ["method=mae", *TINY]))
    with pytest.raises(SettingsError, match=r"mae.mask_ratio: must be in \[0, 1\), got 1.0"):
        MAE(spec, mask_ratio=1.0)
    with pytest.raises(SettingsError, match=r"mae.mask_ratio: must be in \[0, 1\), got 1.0"):
        load_recipe(None, ["method=mae", *TINY, "mae.mask_ratio=1.0"])


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("module,lower_than", [
    ("train/trainer.py", "ssl_vit.loading"), ("train/finetune.py", "ssl_vit.loading"),
    ("config.py", "ssl_vit.models"), ("transforms/cpu_views.py", "ssl_vit.data"),
    ("transforms/gpu_views.py", "ssl_vit.data")])
def test_imports_point_down(module, lower_than):
    assert not any(m == lower_than or m.startswith(lower_than + ".") for m in imported_modules(PACKAGE / module))


def test_no_branch_on_a_method_name():
    """Outside the registry and the settings classes, no code compares a recipe's method with a name."""
    for path in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "pipelines").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "method":
                names = [c.value for c in node.comparators if isinstance(c, ast.Constant)]
                assert not names, f"{path}:{node.lineno} compares .method with {names}"


def test_the_cli_has_an_explicit_command_table():
    assert "importlib" not in imported_modules(Path(cli.__file__))
    names = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert {"pretrain", "finetune", "features", "compare", "inspect-model"} <= names


@pytest.mark.parametrize("name", sorted(p.name for p in (PACKAGE.parent / "recipes").glob("compare_*.yaml")))
def test_shipped_comparisons_load_every_row(name, monkeypatch):
    """Rows are names (`swin_dino`, `deit_distilled`), each with its recipe: every row's training recipe is checked
    when the comparison loads, a bad key of one row named in one line."""
    from ssl_vit.pipelines.compare_config import load_compare_recipe, training_recipe

    monkeypatch.chdir(PACKAGE.parent)
    cfg = load_compare_recipe(f"recipes/{name}")
    assert all(training_recipe(cfg, row).method in METHODS for row in cfg.methods)
    if "swin_dino" in cfg.methods:
        with pytest.raises(SslVitError, match="unknown recipe key .dino.temperature."):
            load_compare_recipe(f"recipes/{name}", ["method_overrides={swin_dino: [dino.temperature=1]}"])
