"""Soak: 30 consecutive short trainings in one process (as a sweep does) do not grow resident memory."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import tiny_overrides

SCRIPT = textwrap.dedent('''
    import gc, json, sys
    from pathlib import Path
    from freezeflow.core.params import load_params
    from freezeflow.core.train.run import run_training

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
    # a leak grows with every run; malloc's arenas make single readings jump by ~10% either way and
    # the first runs settle one-off allocations, so compare medians of runs 11-20 and 21-30
    early, late = statistics.median(rss[10:20]), statistics.median(rss[20:])
    assert late <= early * 1.05, f"RSS grew from a median {early:.0f} MB (runs 11-20) to {late:.0f} MB (runs 21-30)"
