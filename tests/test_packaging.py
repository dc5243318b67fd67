"""What pyproject.toml installs: every package, no top-level `pipelines`, every imported distribution declared."""
import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalized(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}


def test_the_package_list_names_every_package_and_maps_pipelines_under_ssl_vit():
    setuptools = PYPROJECT["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ssl_vit").rglob("__init__.py")}
    assert set(setuptools["packages"]) == found | {"ssl_vit.pipelines"}
    assert setuptools["package-dir"] == {"ssl_vit.pipelines": "pipelines"}


def test_pipelines_import_only_as_ssl_vit_pipelines(tmp_path):
    code = ("import importlib.util, ssl_vit.pipelines.compare, ssl_vit.pipelines.report; "
            "print(importlib.util.find_spec('pipelines'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "None"


def imported_top_level_modules() -> set[str]:
    names = set()
    for path in [*(ROOT / "ssl_vit").rglob("*.py"), *(ROOT / "pipelines").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"ssl_vit"}


def test_every_imported_distribution_is_declared():
    """Installed distributions of every module the package imports are dependencies; FAISS is one of two extras
    (faiss-cpu and faiss-gpu-cu12 install the same module `faiss`, so the base cannot name either)."""
    project = PYPROJECT["project"]
    base, extras = requirement_names(project["dependencies"]), project["optional-dependencies"]
    declared = base | requirement_names(extras["cpu"]) | requirement_names(extras["gpu"])
    providers = importlib.metadata.packages_distributions()
    for module in imported_top_level_modules():
        dists = {normalized(d) for d in providers.get(module, [])}
        assert dists & declared, f"{module} (from {sorted(dists)}) is not declared in pyproject.toml"
    assert requirement_names(extras["cpu"]) == {"faiss-cpu"} and requirement_names(extras["gpu"]) == {"faiss-gpu-cu12"}
    assert not {"faiss-cpu", "faiss-gpu-cu12"} & base
