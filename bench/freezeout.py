"""bench suite `freezeout`: FreezeOut's schedule against `none`, freezeflow's own training for both.

    python -m bench freezeout [--repeats 3] [--epochs 10] [--image-size 64]

Contenders (alternating per repeat, each in a fresh spawned process and project root, as `recipes`):
  none              every stage trains all the way (train.freeze.strategy=none)
  freezeout-t0-X    FreezeOut (cubic schedule): stage i freezes at (X + (1 - X) i / (n - 1))^3 of training,
                    for each X in T0_VALUES (0.8 is the paper's; lower values freeze earlier)

Target (issue 17): one FreezeOut schedule at most 0.80 x none's wall time with val accuracy at most 1 point
below none's (medians of the repeats).
"""

from __future__ import annotations

from dataclasses import replace

from bench import harness

T0_VALUES = (0.8, 0.5)
TIME_TARGET = 0.80
ACCURACY_TOLERANCE = 0.01


def check_ready(settings: harness.Settings) -> str | None:
    return None  # core only


def make_contender(ctx: harness.Context, name: str, strategy: str, t0: float | None) -> dict:
    spec = harness.make_spec(ctx, name, "freezeflow", strategy)
    params = harness.make_params(ctx.settings, strategy, harness.pick_until_stage(ctx))
    if t0 is not None:
        params = replace(params, train=replace(params.train, freeze=replace(params.train.freeze, t0=t0)))
    return spec | {"params": params, "t0": t0}


def list_contenders(ctx: harness.Context) -> list[dict]:
    return [make_contender(ctx, "none", "none", None)] + \
        [make_contender(ctx, f"freezeout-t0-{t0}", "freezeout", t0) for t0 in T0_VALUES]


def check_targets(rows: list[dict]) -> list[dict]:
    none = rows[0]
    out = []
    for row in rows[1:]:
        ratio = row["wall_s"]["median"] / none["wall_s"]["median"]
        drop = none["val_accuracy"] - row["val_accuracy"]
        out.append({"name": f"{row['name']} vs none", "criterion": f"wall <= {TIME_TARGET} x none's, val accuracy "
                    f"at most {ACCURACY_TOLERANCE * 100:.0f} point below none's (medians)",
                    "value": round(ratio, 3), "val_accuracy_drop": round(drop, 4),
                    "met": ratio <= TIME_TARGET and drop <= ACCURACY_TOLERANCE + 1e-9})
    return out


def run(ctx: harness.Context, pool) -> dict:
    contenders = list_contenders(ctx)
    results = harness.run_alternating(pool, contenders, "freezeout")
    rows = [harness.summarize_training(c, results[c["name"]]) | {"t0": c["t0"]} for c in contenders]
    return {"contenders": rows, "targets": check_targets(rows)}


def render(report: dict) -> list[str]:
    none = report["contenders"][0]["wall_s"]["median"]
    rows = [[c["name"], c["repeats"], harness.format_span(c["wall_s"]), c["train_time_s"]["median"],
             round(c["wall_s"]["median"] / none, 3), c["val_accuracy"], "/".join(map(str, c["val_accuracy_runs"])),
             c["test_accuracy"]]
            for c in report["contenders"]]
    return harness.render_table(["contender", "repeats", "wall s median [min–max]", "train s (median)",
                                 "wall / none", "val acc (median)", "val acc (runs)", "test acc (median)"], rows)
