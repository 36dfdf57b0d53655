"""bench: every suite runs end to end with --tiny and writes JSON + Markdown with one row per contender.

No timing assertions: timings on shared CI machines say nothing; the shape of the report does.
"""

from __future__ import annotations

import json
import pytest

from bench import harness

REPORT_KEYS = {"suite", "machine", "code", "notes", "date", "settings", "prepare_time_s", "dataset", "contenders",
               "targets"}
MACHINE_KEYS = {"slug", "cpu", "cores", "gpu", "python", "torch", "torchvision"}


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict]:
    """One --tiny run of all three suites (one shared worker process: keeps the test fast)."""
    out = tmp_path_factory.mktemp("bench")
    assert harness.main(["recipes", "loader", "limit", "--tiny", "--out", str(out)]) == 0
    found = {}
    for path in sorted(out.glob("*.json")):
        report = json.loads(path.read_text())
        assert path.name == f"{report['suite']}-{report['machine']['slug']}.json"
        assert path.with_suffix(".md").read_text().startswith(f"# freezeflow bench: {report['suite']}")
        found[report["suite"]] = report
    return found


def check_common(report: dict) -> None:
    assert REPORT_KEYS <= set(report)
    assert MACHINE_KEYS <= set(report["machine"])
    assert report["settings"]["tiny"] is True and report["settings"]["epochs"] == 1
    assert report["dataset"] == {"name": "tiny", "images": 40, "classes": 2}
    assert all({"name", "criterion", "value", "met"} <= set(t) for t in report["targets"])
    assert all(isinstance(t["met"], bool) for t in report["targets"])


def test_recipes_has_one_row_per_contender_and_strategy(reports):
    report = reports["recipes"]
    check_common(report)
    names = [c["name"] for c in report["contenders"]]
    assert names == [f"{recipe}-{s}" for s in harness.STRATEGIES for recipe in ("plain", "freezeflow")]
    for row in report["contenders"]:
        assert row["repeats"] == 1
        assert {"median", "min", "max", "runs"} <= set(row["wall_s"])
        assert 0.0 <= row["val_accuracy"] <= 1.0 and 0.0 <= row["test_accuracy"] <= 1.0
        # measured, not judged: every figure is present and positive (speed targets live in bench/)
        assert all(value > 0 for value in (row["peak_rss_mb"], row["epoch_time_s_median"]))
    assert [c["strategy"] for c in report["comparisons"]] == list(harness.STRATEGIES)
    assert all(value > 0 for c in report["comparisons"] for value in (c["speedup_wall"], c["speedup_flop_model"]))
    assert [t["name"] for t in report["targets"]] == ["head speedup", "until speedup", "freezeout vs none (freezeflow)"]
    assert len(report["stage_flops"]) == 6 and report["until_k"] == 3  # resnet18: stem, 4 stages, head


def test_recipes_uses_freezeflows_split_on_the_same_files(reports):
    check = reports["recipes"]["split_check"]
    assert check["file_lists_equal"] and check["classes_equal"] and check["same_indices"]
    assert sum(check["sizes"].values()) == 40


def test_loader_has_plain_and_cache_rows_with_and_without_augmentation(reports):
    report = reports["loader"]
    check_common(report)
    rows = {c["name"]: c for c in report["contenders"]}
    assert set(rows) == {"plain-w0", "plain-w2", "freezeflow-cache", "plain-w0-aug", "plain-w2-aug",
                         "freezeflow-cache-aug"}
    train = reports["recipes"]["split_check"]["sizes"]["train"]
    assert all(row["images"] == train for row in rows.values())  # the whole train split, once
    assert [c["augment"] for c in report["comparisons"]] == [False, True]
    assert all(c["ratio_vs_plain_w0"] > 0 for c in report["comparisons"])


def test_limit_compares_head_training_with_one_inference_pass(reports):
    report = reports["limit"]
    check_common(report)
    assert [c["name"] for c in report["contenders"]] == ["inference", "freezeflow-head"]
    sizes = reports["recipes"]["split_check"]["sizes"]  # the content-hash split of the 40 files
    assert report["contenders"][0]["images"] == sizes["train"]
    assert report["contenders"][0]["train_val_images"] == sizes["train"] + sizes["val"]
    assert report["ratio"] > 0 and report["targets"][0]["name"] == "limit"


def test_model_flops_match_the_strategies_shape():
    """The FLOP model that explains the ratios: head skips the prefix, none costs the same in both recipes."""
    from freezeflow.core.train.freezing import FreezePlan

    flops, sizes = [10, 20, 30, 1], (100, 20, 20)
    plans = {s: FreezePlan(s, 4, until=2) for s in harness.STRATEGIES}
    plain = {s: harness.estimate_plain_flops(p, flops, sizes, 5, 10) for s, p in plans.items()}
    ff = {s: harness.estimate_freezeflow_flops(p, flops, sizes, 5, 10) for s, p in plans.items()}
    assert plain["none"] == ff["none"] == 5 * (100 * 3 * 61 + 20 * 61) + 20 * 61
    assert ff["head"] == 120 * 60 + 5 * (100 * 3 + 20) + 20 * 61  # prefix once over train + val; test at the end
    assert plain["head"] / ff["head"] > plain["until"] / ff["until"] > 1.0


def test_slugs_are_short_and_filename_safe():
    assert harness.slugify("Intel(R) Xeon(R) Processor") == "intel-xeon"
    assert harness.slugify("AMD EPYC 7B13 64-Core Processor") == "amd-epyc-7b13-64-core"
    assert harness.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert harness.slugify("Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz") == "intel-core-i7-8700"


def test_strategies_option_picks_recipe_pairs_and_rejects_unknown_names(capsys):
    assert harness.parse_settings(["recipes", "--strategies", "freezeout,none"]).strategies == ("freezeout", "none")
    assert harness.parse_settings([]).strategies == harness.STRATEGIES
    with pytest.raises(SystemExit):
        harness.parse_settings(["recipes", "--strategies", "head,frozen"])
    assert "allowed: a comma-separated subset of head, until, gradual, freezeout, none" in capsys.readouterr().err
