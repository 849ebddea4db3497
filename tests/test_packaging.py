"""Installed layout: package-dir mapping, the console script, and the core's import boundary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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
