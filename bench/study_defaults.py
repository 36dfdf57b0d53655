"""The study behind freezeflow's training defaults: a grid of train.* settings on real photo folders.

    python bench/study_defaults.py run GRID.json --out bench/results/defaults-study.jsonl [--datasets ...]
    python bench/study_defaults.py render bench/results/defaults-study.jsonl > bench/results/defaults-study.md

GRID.json is a list of {"name": ..., "sets": ["train.key=value", ...]}; every run trains EfficientNet-Lite0
with the project's params plus those overrides, 10 epochs at 64 px, seed 0, one thread, on the photo sets of
`freezeflow.app.photosets` (130 images per class, the rare class a quarter of that). Runs of one dataset share a
project root, so frozen features are computed once per key. A finished (name, dataset) is never rerun: the
study resumes where it stopped. One seed per cell: differences under ~3 points are within seed noise;
`freezeflow bench quality` measures the chosen defaults over several seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DATASETS = ("textures", "scenes", "glyphs")


def run(grid: Path, out: Path, datasets: tuple[str, ...], work: Path, params_dir: str) -> None:
    import torch

    from freezeflow.core.params import load_params
    from freezeflow.app.photosets import write_photoset
    from freezeflow.core.train.run import run_training

    torch.set_num_threads(1)
    configs = json.loads(grid.read_text())
    done = {(r["name"], r["dataset"]) for r in read_rows(out)}
    for dataset in datasets:
        folder = work / "photos" / dataset
        if not folder.exists():
            write_photoset(dataset, folder, 130)
        for cfg in configs:
            if (cfg["name"], dataset) in done:
                continue
            sets = [f"data.dir={folder}", "data.image_size=64", "train.epochs=10", *cfg["sets"]]
            start = time.perf_counter()
            metrics = run_training(load_params(params_dir, sets), work / f"root-{dataset}")
            row = {k: metrics[k] for k in ("val_accuracy", "test_accuracy", "train_time_s", "best_epoch")}
            row |= {"name": cfg["name"], "dataset": dataset, "sets": cfg["sets"],
                    "wall_s": round(time.perf_counter() - start, 1)}
            with open(out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def render(path: Path) -> str:
    rows = read_rows(path)
    by: dict[str, dict[str, dict]] = {}
    for row in rows:
        by.setdefault(row["name"], {})[row["dataset"]] = row
    datasets = [d for d in DATASETS if any(d in cells for cells in by.values())]
    lines = ["| setting | " + " | ".join(f"{d} val / test" for d in datasets) + " | mean |",
             "|---|" + "---|" * (len(datasets) + 1)]
    for name, cells in by.items():
        values = [cells.get(d) for d in datasets]
        shown = [f"{v['val_accuracy']:.3f} / {v['test_accuracy']:.3f}" if v else "-" for v in values]
        means = [(v["val_accuracy"] + v["test_accuracy"]) / 2 for v in values if v]
        mean = f"{sum(means) / len(means):.3f}" if len(means) == len(datasets) else "-"
        lines.append(f"| `{name}` | " + " | ".join(shown) + f" | {mean} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run")
    go.add_argument("grid", type=Path)
    go.add_argument("--out", type=Path, required=True)
    go.add_argument("--datasets", default=",".join(DATASETS))
    go.add_argument("--work", type=Path, default=Path("/tmp/freezeflow-study"))
    go.add_argument("--params", default="params")
    show = sub.add_parser("render")
    show.add_argument("rows", type=Path)
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.grid, args.out, tuple(args.datasets.split(",")), args.work, args.params)
    else:
        sys.stdout.write(render(args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
