"""The architecture is enforced: import-linter's contracts (pyproject.toml) hold, a deliberate violation
fails them, and the core imports with every adapter library missing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("freezeflow", "bench", "flows", "tasks")


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def copy_project(dest: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_contracts_are_kept():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "5 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("freezeflow/core/params.py", "import mlflow", "core imports only"),
    ("freezeflow/core/train/run.py", "from freezeflow.integrations import tracking", "core imports only"),
    ("freezeflow/integrations/tune.py", "from freezeflow.app import progress", "integrations never import the app"),
    ("freezeflow/core/data/images.py", "from freezeflow.core.train import freezing", "inside core"),
])
def test_a_deliberate_violation_fails(tmp_path: Path, module: str, line: str, contract: str):
    root = copy_project(tmp_path)
    target = root / module
    target.write_text(target.read_text() + f"\n{line}  # deliberate violation\n")
    result = lint(root)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts")[-1]
    assert contract in broken and module.removesuffix(".py").replace("/", ".") in broken


CORE_WITHOUT_ADAPTERS = """
import importlib, pkgutil, sys
BLOCKED = {"mlflow", "optuna", "prefect", "dvc", "typer", "rich", "matplotlib", "sklearn", "skimage"}
for name in BLOCKED:
    sys.modules[name] = None  # as if not installed: `import name` raises ImportError
import freezeflow.core as core
names = [m.name for m in pkgutil.walk_packages(core.__path__, "freezeflow.core.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def test_core_imports_without_any_adapter_installed():
    result = subprocess.run([sys.executable, "-c", CORE_WITHOUT_ADAPTERS], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.strip()) >= 20
