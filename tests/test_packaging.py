"""Installed layout: package-dir mapping, the console script, and the import layers.

Dependencies point down: training / export / benchmarks (root folders, installed as
msad_deploy.training / .export / .benchmarks) > the core, and within the core
evaluation > runtime > data > models. Checked by scanning every import statement (ast), including
imports inside functions and under TYPE_CHECKING, and ``importlib.import_module("...")`` literals.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PLUGINS = ("msad_deploy.training", "msad_deploy.export", "msad_deploy.benchmarks")
# (folder under the repository, module prefixes no file in it may import)
LAYER_RULES = [
    ("msad_deploy", PLUGINS),
    ("msad_deploy/runtime", ("msad_deploy.evaluation",)),
    ("msad_deploy/data", ("msad_deploy.evaluation", "msad_deploy.runtime")),
    ("msad_deploy/models", ("msad_deploy.data", "msad_deploy.evaluation", "msad_deploy.runtime")),
]


def imported_modules(path: Path, root: Path = REPO) -> list[str]:
    """Every module ``path`` imports, absolute: ``from a.b import c`` gives a.b and a.b.c."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.append(node.args[0].value)
    return names


def layer_violations(folder: Path, forbidden: tuple[str, ...], root: Path = REPO) -> list[str]:
    def hits(name: str) -> bool:
        return any(name == f or name.startswith(f + ".") for f in forbidden)

    return [
        f"{path.relative_to(root)}: {name}"
        for path in sorted(folder.rglob("*.py"))
        for name in imported_modules(path, root)
        if hits(name)
    ]


@pytest.mark.parametrize("folder,forbidden", LAYER_RULES, ids=[rule[0] for rule in LAYER_RULES])
def test_dependencies_point_down(folder: str, forbidden: tuple[str, ...]) -> None:
    assert list((REPO / folder).rglob("*.py")), f"nothing to scan in {folder}"
    violations = layer_violations(REPO / folder, forbidden)
    assert not violations, f"imports against the layers (dependencies must point down): {violations}"


def test_layer_scan_sees_every_import_form(tmp_path: Path) -> None:
    pkg = tmp_path / "msad_deploy" / "models"
    pkg.mkdir(parents=True)
    (pkg / "bad.py").write_text(
        "from __future__ import annotations\n"
        "import msad_deploy.data.coco\n"
        "from msad_deploy import data\n"
        "from ..runtime import results\n"
        "def f():\n"
        "    from msad_deploy.evaluation.coco_eval import save_metrics\n"
        "    return importlib.import_module('msad_deploy.data.transforms')\n"
        "from msad_deploy.models.pyramid import make_lr_batch\n"
        "from msad_deploy.database import fine\n"
    )
    rules = dict(LAYER_RULES)
    found = layer_violations(pkg, rules["msad_deploy/models"], root=tmp_path)
    assert [line.split(": ", 1)[1] for line in found] == [
        "msad_deploy.data.coco",
        "msad_deploy.data",
        "msad_deploy.runtime",
        "msad_deploy.runtime.results",
        "msad_deploy.evaluation.coco_eval",
        "msad_deploy.evaluation.coco_eval.save_metrics",
        "msad_deploy.data.transforms",
    ]


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_mapped_packages_import_only_under_msad_deploy(tmp_path: Path) -> None:
    ok = _run("import msad_deploy.training, msad_deploy.export, msad_deploy.benchmarks", tmp_path)
    assert ok.returncode == 0, ok.stderr
    for bare in ("training", "export", "benchmarks"):
        result = _run(f"import {bare}", tmp_path)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, bare


def test_core_does_not_import_training_export_or_benchmarks(tmp_path: Path) -> None:
    code = (
        "import sys, pkgutil, importlib, msad_deploy\n"
        "for m in pkgutil.walk_packages(msad_deploy.__path__, 'msad_deploy.'):\n"
        "    if m.name.split('.')[1] not in ('training', 'export', 'benchmarks'):\n"
        "        importlib.import_module(m.name)\n"
        "leaked = [n for n in sys.modules if n.split('.')[:2] in (['msad_deploy','training'], ['msad_deploy','export'], ['msad_deploy','benchmarks'])]\n"
        "assert not leaked, leaked\n"
    )
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr


def test_console_script_help_lists_subcommands() -> None:
    msad = Path(sys.executable).parent / "msad"
    result = subprocess.run([str(msad), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("data", "eval", "info"):
        assert command in result.stdout
