"""compile: true compiles the stages that train, when they start to, and all of EfficientNet-Lite0's
9 stages fit under dynamo's recompile limit (the default 8 once sent stage 9 back to eager)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from freezeflow.core.data.prepare import prepare_dataset
from freezeflow.core.layout import Layout
from freezeflow.core.params import load_params
from freezeflow.core.train.run import build_trainer

PARAMS = Path(__file__).parents[3] / "params"


@pytest.mark.slow
def test_compile_covers_every_trainable_stage_without_hitting_the_recompile_limit(photo_folder, tmp_path, caplog):
    import torch._dynamo
    from torch._dynamo.utils import counters

    params = load_params(PARAMS, [f"data.dir={photo_folder('textures', 4)}", "data.image_size=32",
                                  "train.epochs=1", "train.batch_size=16", "train.freeze.strategy=none",
                                  "train.compile=true"])
    prepared = prepare_dataset(params.data, tmp_path / "prepared")
    torch._dynamo.reset()
    counters.clear()
    trainer = build_trainer(params, prepared, Layout(tmp_path), [], checkpoint=False)
    assert trainer.compiled == set(range(len(trainer.model.stages))) and len(trainer.compiled) > 8
    with caplog.at_level(logging.WARNING):
        result = trainer.run()
    assert result.history and result.history[0].train_loss > 0
    limit_hits = [r.getMessage() for r in caplog.records if "recompile_limit" in r.getMessage()
                  or "cache_size_limit" in r.getMessage()]
    assert not limit_hits
    assert counters["stats"]["unique_graphs"] >= len(trainer.model.stages)  # each stage ran compiled
