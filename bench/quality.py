"""bench quality: does every freezing strategy give a good model at its defaults, on data that is not ours?

    python -m bench quality --repeats 3 --epochs 10 --image-size 64 --threads 1

The digits are a smoke test; these are real photo folders built offline from scikit-image's sample photos
(`freezeflow.app.photosets`: textures, scenes, glyphs; patches at random scales, angles and crops, JPEG,
grayscale and RGB mixed, one rare class). On each, side by side on the same split, backbone, image size
and epochs:

  freezeflow-<strategy>   run_training with the project's params (params/) and only the strategy,
                          data, epochs and batch size set: every other key at its default
  fastai-fine-tune        vision_learner + fine_tune(E - 1, freeze_epochs=1) at fastai's own defaults
                          (base_lr 2e-3, its weight decay, train_bn)
  lightning-backbone-ft   BackboneFinetuning(unfreeze_backbone_at_epoch=1), its defaults otherwise, with the
                          optimizer of its documented example: Adam(lr=1e-3)

Repeat r trains with seed r (train.seed, and the peers' seeds), so the medians are over seeds: accuracy
differences smaller than the spread between seeds are noise. Goals per dataset:
  - every freezeflow strategy's val and test accuracy >= the best peer's - 1 point;
  - `until` and `none` never more than 2 points below `head`.
The peers come from the optional group `bench`; without them freezeflow's rows still run (and the first goal
is reported as not measured).
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

from bench import harness
from bench import peers
from freezeflow.core.params import load_params

PEERS = {"fastai-fine-tune": ("run_fastai", "fine_tune (fastai defaults)", "fine_tune"),
         "lightning-backbone-ft": ("run_lightning", "BackboneFinetuning (Lightning defaults)", "backbone_finetuning")}
PEER_TOLERANCE = 0.01  # absolute: each strategy may be at most 1 point below the best peer
HEAD_TOLERANCE = 0.02  # absolute: until and none may be at most 2 points below head
BODY_STRATEGIES = ("until", "none")


def check_ready(settings) -> str | None:
    if importlib.util.find_spec("skimage") is None:
        return "needs scikit-image (the photos the datasets are cut from): pip install scikit-image"
    return None


# ---- suite ------------------------------------------------------------------------------------------

def run(ctx: harness.Context, pool) -> dict:
    from freezeflow.app.photosets import write_photoset

    peers_missing = peers.check_ready(ctx.settings)
    contenders, datasets = [], []
    for name in ctx.settings.datasets:
        folder = ctx.work / "photos" / name
        info = write_photoset(name, folder, ctx.settings.per_class)
        sub = harness.build_context(replace(ctx.settings, data=str(folder)), ctx.work / "quality" / name)
        datasets.append(info | {"split": {k: len(v) for k, v in sub.prepared.split.items()}})
        contenders += make_specs(sub, name, include_peers=peers_missing is None)
    results = harness.run_alternating(pool, contenders, "quality", vary=seed_repeat)
    rows = [summarize_row(c, results[c["name"]]) for c in contenders]
    summaries = [summarize_dataset(d["name"], [r for r in rows if r["dataset"] == d["name"]]) for d in datasets]
    notes = harness.list_notes(ctx, "quality") + ([f"peers not run: {peers_missing}"] if peers_missing else [])
    return {"notes": notes, "datasets": datasets, "contenders": rows, "summaries": summaries,
            "targets": [t for s in summaries for t in s["targets"]], "peer_versions": peers.read_peer_versions(),
            "recipes": describe(ctx)}


def make_specs(ctx: harness.Context, dataset: str, include_peers: bool) -> list[dict]:
    specs = []
    for strategy in harness.STRATEGIES:
        spec = harness.make_spec(ctx, f"freezeflow-{strategy}-{dataset}", "freezeflow", strategy)
        specs.append(spec | {"params": default_params(ctx.settings, strategy), "contender": f"freezeflow-{strategy}"})
    if include_peers:
        for name, (runner, strategy, mode) in PEERS.items():
            spec = harness.make_spec(ctx, f"{name}-{dataset}", name, "head")
            specs.append(spec | {"params": default_params(ctx.settings, "gradual"), "strategy": strategy,
                                 "mode": mode, "peer_defaults": True, "contender": name,
                                 "runner": f"bench.peers:{runner}"})
    return [s | {"dataset": dataset} for s in specs]


def default_params(settings: harness.Settings, strategy: str):
    """The project's params with only what the benchmark must fix: data, size, epochs, batch, strategy."""
    pins = {"data.dir": str(Path(settings.data).resolve()), "data.image_size": settings.image_size,
            "train.backbone": settings.backbone, "train.weights": settings.weights, "train.epochs": settings.epochs,
            "train.batch_size": settings.batch_size, "train.freeze.strategy": strategy, "train.use_best": False}
    return load_params(settings.params_dir, [f"{k}={v}" for k, v in pins.items()])


def seed_repeat(spec: dict, repeat: int) -> dict:
    """Repeat r trains with seed r: medians over seeds, not over identical CPU runs."""
    params = spec["params"]
    return spec | {"params": replace(params, train=replace(params.train, seed=repeat))}


def summarize_row(spec: dict, runs: list[dict]) -> dict:
    row = harness.summarize_training(spec, runs)
    return row | {"dataset": spec["dataset"], "contender": spec["contender"],
                  "test_accuracy_runs": [round(r["test_accuracy"], 4) for r in runs],
                  "seeds": list(range(len(runs)))}


def summarize_dataset(name: str, rows: list[dict]) -> dict:
    by = {r["contender"]: r for r in rows}
    peer_rows = [by[p] for p in PEERS if p in by]
    best_val = max((p["val_accuracy"] for p in peer_rows), default=None)
    best_test = max((p["test_accuracy"] for p in peer_rows), default=None)
    gaps = {c: {"val_minus_best_peer": round(r["val_accuracy"] - best_val, 4) if peer_rows else None,
                "test_minus_best_peer": round(r["test_accuracy"] - best_test, 4) if peer_rows else None,
                "val_minus_head": round(r["val_accuracy"] - by["freezeflow-head"]["val_accuracy"], 4),
                "test_minus_head": round(r["test_accuracy"] - by["freezeflow-head"]["test_accuracy"], 4)}
            for c, r in by.items() if c.startswith("freezeflow-")}
    return {"dataset": name, "best_peer_val": best_val, "best_peer_test": best_test, "gaps": gaps,
            "targets": check_targets(name, by, best_val, best_test)}


def check_targets(name: str, by: dict, best_val: float | None, best_test: float | None) -> list[dict]:
    targets = []
    for strategy in harness.STRATEGIES:
        row = by[f"freezeflow-{strategy}"]
        met = None if best_val is None else (row["val_accuracy"] >= best_val - PEER_TOLERANCE
                                              and row["test_accuracy"] >= best_test - PEER_TOLERANCE)
        targets.append({"name": f"{name}: {strategy} vs best peer",
                        "criterion": f"val and test accuracy >= best peer's - {PEER_TOLERANCE}",
                        "value": [row["val_accuracy"], row["test_accuracy"]], "best_peer": [best_val, best_test],
                        "met": met})
    head = by["freezeflow-head"]
    for strategy in BODY_STRATEGIES:
        row = by[f"freezeflow-{strategy}"]
        met = (row["val_accuracy"] >= head["val_accuracy"] - HEAD_TOLERANCE
               and row["test_accuracy"] >= head["test_accuracy"] - HEAD_TOLERANCE)
        targets.append({"name": f"{name}: {strategy} vs head", "criterion": f"val and test >= head's - {HEAD_TOLERANCE}",
                        "value": [row["val_accuracy"], row["test_accuracy"]],
                        "head": [head["val_accuracy"], head["test_accuracy"]], "met": bool(met)})
    return targets


def describe(ctx: harness.Context) -> dict:
    p = default_params(ctx.settings, "until").train
    return {"freezeflow": f"run_training at the project's defaults: lr {p.lr}, body_lr_factor {p.body_lr_factor}, "
                          f"lr_decay {p.lr_decay}, bn {p.bn}, bn_adapt {p.bn_adapt}, {p.optimizer}, {p.schedule}, "
                          f"until k={p.freeze.until}, gradual lr_decay {p.freeze.lr_decay}",
            "fastai-fine-tune": "bench_peers.run_fastai: vision_learner over the same pretrained body (fastai's "
                                "head), fine_tune(E - 1, freeze_epochs=1) with fastai's default base_lr and wd",
            "lightning-backbone-ft": "bench_peers.run_lightning: LightningModule(body, freezeflow's head) + "
                                     "BackboneFinetuning(unfreeze_backbone_at_epoch=1), Adam(lr=1e-3)",
            "datasets": "freezeflow.app.photosets, seed 0; split by freezeflow's manifest for every contender",
            "seeds": "repeat r uses seed r for every contender"}


# ---- output -------------------------------------------------------------------------------------------

def render(report: dict) -> list[str]:
    out = []
    for summary in report["summaries"]:
        name = summary["dataset"]
        info = next(d for d in report["datasets"] if d["name"] == name)
        rows = [[r["contender"], r["strategy"], r["repeats"], r["val_accuracy"], r["test_accuracy"],
                 spread(r["val_accuracy_runs"]), harness.format_span(r["wall_s"]),
                 *fmt_gap(summary["gaps"].get(r["contender"]))]
                for r in report["contenders"] if r["dataset"] == name]
        out += [f"## {name}: {info['images']} images, {len(info['classes'])} classes (rare: {info['rare']}), "
                f"split {info['split']}", ""]
        out += harness.render_table(["contender", "strategy", "seeds", "val acc (median)", "test acc (median)",
                                   "val range", "wall s median [min–max]", "val - best peer", "test - best peer",
                                   "val - head", "test - head"], rows)
        out.append("")
    versions = ", ".join(f"{k} {v}" for k, v in report["peer_versions"].items())
    out.append(f"Peers: {versions}.")
    return out


def spread(values: list[float]) -> str:
    return f"{min(values):.3f}–{max(values):.3f}" if len(values) > 1 else "-"


def fmt_gap(gap: dict | None) -> list:
    if gap is None:
        return ["-"] * 4
    return [("-" if v is None else f"{v:+.3f}") for v in (gap["val_minus_best_peer"], gap["test_minus_best_peer"],
                                                          gap["val_minus_head"], gap["test_minus_head"])]
