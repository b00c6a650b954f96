"""`pip install .` gives a working package: every module imported at run time is a declared dependency, tune/
is packaged, and each console entry point names a real function."""

import ast
import importlib
import re
import sys
from pathlib import Path

from setuptools import find_packages

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("distributed_asac", "tune")
# import name → distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "cv2": "opencv-python"}


def _setup_call() -> dict:
    """The keyword arguments of setup() in setup.py, read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {kw.arg: kw.value for kw in call.keywords}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _runtime_imports(module_level_only: bool = False) -> dict[str, str]:
    """Top-level third-party module → one file importing it, over every module of the installed packages
    (only the imports at module level, which run on `import`, with `module_level_only`)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in (tree.body if module_level_only else ast.walk(tree)):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES:
                        found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_install_requires_covers_every_runtime_import():
    """Every import is a declared dependency; the `deepspeed` extra's modules may be imported only inside the
    functions that run under a DeepSpeed launch, never on `import distributed_asac...`."""
    required = {_name(r) for r in ast.literal_eval(_setup_call()["install_requires"])}
    optional = {_name(r) for r in ast.literal_eval(_setup_call()["extras_require"]).get("deepspeed", [])}
    imports = _runtime_imports()
    assert {"torch", "captum", "ray", "mlflow"} <= set(imports)  # the scan sees the package's real imports
    missing = {f"{module} (imported in {where})" for module, where in imports.items()
               if DISTRIBUTION.get(module, module).lower() not in required | optional}
    assert not missing, f"imported at run time but not in install_requires: {sorted(missing)}"
    eager = {f"{m} ({where})" for m, where in _runtime_imports(module_level_only=True).items() if m in optional}
    assert not eager, f"an optional extra imported at module level: {sorted(eager)}"


def test_install_requires_are_pinned_in_requirements_txt():
    required = {_name(r) for r in ast.literal_eval(_setup_call()["install_requires"])}
    pinned = {_name(line) for line in (REPO / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert required <= pinned, f"in install_requires but not pinned: {sorted(required - pinned)}"


def test_tune_is_packaged():
    found = find_packages(str(REPO), include=["distributed_asac", "distributed_asac.*", "tune", "tune.*"])
    assert {"distributed_asac", "distributed_asac.data", "tune"} <= set(found)
    assert "tune.*" in ast.literal_eval(_setup_call()["packages"].keywords[0].value)


def test_console_entry_points_name_real_functions():
    scripts = ast.literal_eval(_setup_call()["entry_points"])["console_scripts"]
    names = {}
    for line in scripts:
        name, target = (part.strip() for part in line.split("="))
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), line
        names[name] = module
    assert names == {"asac-finetune": "distributed_asac.finetune", "asac-demo": "distributed_asac.demo",
                     "asac-generate": "distributed_asac.data.synthetic", "asac-sweep": "tune.sweep"}
    readme = (REPO / "README.md").read_text()
    assert all(name in readme for name in names), "every entry point is documented in README.md"
