"""DVC at the edge: the `dvc` command line, run as a subprocess (the core never imports DVC)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from freezeflow.core.errors import UserError
from freezeflow.integrations.secrets import mask_text


def dvc_executable() -> str:
    """The dvc next to this Python (the project's venv) first, then PATH."""
    local = Path(sys.executable).with_name("dvc")
    if local.exists():
        return str(local)
    found = shutil.which("dvc")
    if not found:
        raise UserError("dvc is not installed: run `make run` or `pip install 'dvc>=3.67,<4'`")
    return found


def run_dvc(args: list[str], root: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`dvc ARGS` in `root`; on failure (with `check`) a UserError quoting DVC's own error line.

    Never pass -q where a failure matters: -q silences DVC's ERROR line too."""
    proc = subprocess.run([dvc_executable(), *args], cwd=root, capture_output=True, text=True)
    if check and proc.returncode != 0:
        text = f"{proc.stderr}\n{proc.stdout}"
        if ".dvc/tmp/lock" in text or "Unable to acquire lock" in text:
            raise UserError(f"{root / '.dvc/tmp/lock'}: another dvc process holds the lock; wait for it, or if "
                            "none is running delete that file and retry")
        raise UserError(f"dvc {' '.join(args)} failed: {dvc_error_line(text, proc.returncode)}")
    return proc


def dvc_error_line(text: str, returncode: int) -> str:
    """DVC's first ERROR line, else its first line that is not a warning or the support footer
    (passwords of remote URLs masked); the exit code when DVC printed nothing."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    others = [line for line in lines if not line.startswith(("WARNING", "Having any troubles?"))]
    found = (errors or others or [None])[0]
    return mask_text(found) if found else f"exit code {returncode} and no output"


def is_dvc_repo(root: Path) -> bool:
    return (root / ".dvc").is_dir()


def track_data(root: Path, target: str = "data") -> str | None:
    """`dvc add data` (updates data.dvc and the cache); returns the new hash, None outside a DVC repo."""
    if not is_dvc_repo(root):
        return None
    run_dvc(["add", target], root)  # not -q: on failure its message is what we report
    return read_dvc_hash(root / f"{target}.dvc")


def read_dvc_hash(dvc_file: Path) -> str | None:
    """The md5 recorded in a .dvc file (plain YAML: no DVC import needed)."""
    if not dvc_file.exists():
        return None
    meta = yaml.safe_load(dvc_file.read_text()) or {}
    outs = meta.get("outs") or [{}]
    return outs[0].get("md5")


def data_status(root: Path, target: str = "data.dvc") -> dict:
    """{} when the workspace matches the .dvc file; else DVC's description of what changed."""
    if not is_dvc_repo(root):
        return {}
    proc = run_dvc(["status", "--json", target], root)
    text = proc.stdout.strip()
    return json.loads(text) if text.startswith("{") else {}


def pull_data(root: Path, target: str = "data.dvc") -> bool:
    """dvc pull when the remote has the data; False (not an error) when it does not."""
    proc = run_dvc(["pull", "-q", target], root, check=False)
    return proc.returncode == 0


def frozen_stages(root: Path) -> list[str]:
    """The stages dvc.yaml marks `frozen: true` (plain YAML: no DVC import needed)."""
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    return [name for name, stage in stages.items() if isinstance(stage, dict) and stage.get("frozen")]


def commit_stages(root: Path, stages: list[str]) -> None:
    """`dvc commit -f STAGE...`: dvc.lock records those stages' deps, params and outs as they are now."""
    run_dvc(["commit", "-f", *stages], root)
