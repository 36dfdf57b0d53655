"""`freezeflow cache list` / `prune`: the feature cache's entries, least recently used first, and their removal."""

from __future__ import annotations

import json
import subprocess

from freezeflow.core.params import load_params
from freezeflow.core.train.run import run_training
from tests.conftest import BIN, tiny_overrides


def cli(root, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "freezeflow"), "cache", *args], cwd=root, capture_output=True, text=True,
                          timeout=300)


def test_list_then_prune_by_size_then_everything(project, shapes_dir):
    for seed in (0, 1):  # weights none: each seed is another prefix, so another store
        params = load_params(project / "params", tiny_overrides(shapes_dir, **{"train.epochs": 1,
                                                                               "train.seed": seed}))
        run_training(params, project)
    listed = cli(project, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [e["kind"] for e in entries] == ["features", "features"] and all(e["rows"] == 36 for e in entries)
    table = cli(project, "list").stdout
    assert entries[0]["name"] in table and "2 entries" in table

    budget = (entries[1]["size_bytes"] + 512) / 2**30  # room for the newer store only
    pruned = cli(project, "prune", "--max-gb", f"{budget:.12f}")
    assert pruned.returncode == 0 and "removed 1 entries" in pruned.stderr
    assert [json.loads(line)["name"] for line in cli(project, "list", "--json").stdout.splitlines()] == \
        [entries[1]["name"]]  # the least recently used went first
    assert "removed 1 entries" in cli(project, "prune", "--all").stderr
    assert cli(project, "list", "--json").stdout == ""


def test_a_negative_budget_is_one_line(project):
    proc = cli(project, "prune", "--max-gb", "-1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: freezeflow cache prune: --max-gb: -1.0; allowed: >= 0"]
