"""Soak: 30 consecutive short trainings in one process (as a sweep does) do not grow resident memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import tiny_overrides

SCRIPT = textwrap.dedent('''
    import gc, json, sys
    from pathlib import Path
    from freezeflow.params import load_params
    from freezeflow.train import run_training

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    root, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
    rss = []
    for i in range(30):
        params = load_params(root / "params", overrides + [f"train.seed={i}"])
        run_training(params, root)
        gc.collect()
        rss.append(rss_mb())
    print(json.dumps(rss))
''')


@pytest.mark.slow
def test_thirty_trainings_keep_memory_flat(project, shapes_dir):
    overrides = tiny_overrides(shapes_dir, **{"train.epochs": 2, "train.freeze.strategy": "until",
                                              "train.freeze.until": 3})
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(project), json.dumps(overrides)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rss) == 30
    assert rss[-1] <= rss[2] * 1.10, f"RSS grew from {rss[2]:.0f} MB (3rd) to {rss[-1]:.0f} MB (30th)"
