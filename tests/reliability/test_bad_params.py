"""Bad params: one line naming the file, the key and the allowed values; exit code 2; nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from freezeflow.core.errors import ParamsError
from freezeflow.core.params import load_params

FREEZEFLOW = str(Path(sys.executable).with_name("freezeflow"))


@pytest.mark.parametrize("override,pattern", [
    (["train.lrr=0.1"], r"train.yaml: lrr: unknown key; allowed: .*\blr\b"),
    (["train.freeze.stratgy=head"], r"train.yaml: freeze.stratgy: unknown key; allowed: strategy"),
    (["train.freeze.strategy=frozen"], r"freeze.strategy: 'frozen' is not allowed; allowed: none, head, until"),
    (["train.backbone=vgg16"], r"backbone: 'vgg16' is not allowed; allowed: efficientnet_lite0, resnet18"),
    (["train.lr=0"], r"train.yaml: lr: 0.0 is out of range; allowed: > 0.0"),
    (["train.lr=-1"], r"lr: -1.0 is out of range"),
    (["train.batch_size=0"], r"batch_size: 0 is out of range; allowed: >= 1"),
    (["train.epochs=ten"], r"epochs: 'ten' is not allowed; allowed: an integer"),
    (["data.image_size=8"], r"data.yaml: image_size: 8 is out of range; allowed: >= 16"),
    (["model.lr=1"], r"-S: model.lr: the part before the first dot must be one of data, train, tune, evaluate"),
    (["train.lr"], r"expected file.key=value"),
])
def test_bad_values_are_one_line_errors(project, override, pattern):
    with pytest.raises(ParamsError, match=pattern) as info:
        load_params(project / "params", override)
    assert "\n" not in str(info.value)


def test_python_object_tag_is_refused_and_never_built(project, tmp_path):
    marker = tmp_path / "pwned"
    (project / "params" / "train.yaml").write_text(
        f"lr: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ParamsError, match=r"train.yaml: unsafe YAML tag"):
        load_params(project / "params")
    assert not marker.exists()


def test_non_mapping_file_is_refused(project):
    (project / "params" / "data.yaml").write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="data.yaml: must be a mapping"):
        load_params(project / "params")


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlruns.db"}
    return subprocess.run([FREEZEFLOW, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("args,pattern", [
    (["-S", "train.lr=0"], "lr: 0.0 is out of range"),
    (["-S", "train.backbone=alexnet"], "backbone: 'alexnet' is not allowed"),
    (["-S", "train.freeze.strategy=until", "-S", "train.freeze.until=42"], "freeze.until: 42 is out of range"),
    (["-S", "data.image_size=16"], "image_size: 16 is too small for efficientnet_lite0; allowed: >= 32"),
    (["-S", "data.dir=/nonexistent/images"], "/nonexistent/images"),
])
def test_cli_bad_params_exit_2_with_one_line_and_write_nothing(project, shapes_dir, args, pattern):
    if "data.dir" not in " ".join(args):
        args = [*args, "-S", f"data.dir={shapes_dir}"]
    proc = run_cli(["train", "--no-track", *args], project)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], proc.stderr
    assert not (project / "models").exists() and not (project / "reports").exists()
    assert not (project / "checkpoints").exists()
    if "data.dir=/nonexistent" not in " ".join(args):
        assert not (project / "prepared").exists()
