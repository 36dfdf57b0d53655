"""The CLI: every subcommand listed with one line, each with an example; user errors are one line, exit 2."""

from __future__ import annotations

import subprocess

import pytest
from typer.testing import CliRunner

from freezeflow.app.cli import app
from tests.conftest import BIN

COMMANDS = ["ingest", "prepare", "train", "lr-find", "evaluate", "predict", "export", "pipeline", "tune", "schedule",
            "report", "bench", "ui", "data", "server", "cache"]


def test_help_lists_every_subcommand():
    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    commands = result.output.split("Commands")[1]
    listed = [line[2:].split()[0] for line in commands.splitlines()
              if line.startswith("│ ") and not line.startswith("│  ") and len(line.split()) > 2]
    assert sorted(listed) == sorted(COMMANDS)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in ("data", "server", "cache")]
                         + ["data digits", "server mlflow", "server prefect", "cache list", "cache prune"])
def test_each_subcommand_help_has_an_example(command):
    result = CliRunner().invoke(app, [*command.split(), "--help"], terminal_width=200)
    assert result.exit_code == 0 and "Example: freezeflow" in result.output, result.output


def test_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    cmd = [str(BIN / "freezeflow"), "train", "--no-track", "-S", "train.lr=-1"]
    plain = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    debug = subprocess.run([cmd[0], "--debug", *cmd[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "Traceback" in debug.stderr


def test_pipeline_prints_the_dvc_lock_line_after_the_result(monkeypatch):
    """The flow's dvc_lock line is printed on its own, last, not inside the JSON."""
    import flows.training

    seen = {}

    def fake_pipeline(**kwargs):
        seen.update(kwargs)
        return {"metrics": {"val_accuracy": 0.5}, "dvc_lock": "dvc.lock not updated: run with -S overrides (x)"}

    monkeypatch.setattr(flows.training, "training_pipeline", fake_pipeline)
    result = CliRunner().invoke(app, ["pipeline", "-S", "data.dir=data/tex"])
    assert result.exit_code == 0, result.output
    assert seen["overrides"] == ["data.dir=data/tex"]
    *body, last = result.output.strip().splitlines()
    assert last == "dvc.lock not updated: run with -S overrides (x)" and "dvc_lock" not in "\n".join(body)
