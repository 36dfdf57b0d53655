"""A crash while a checkpoint is written leaves the previous one; a pickle that would run code is refused."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from freezeflow.core.io import load_trusted, save_atomic
from freezeflow.core.errors import UserError


class Boom:
    """Pickles fine until halfway through the file: simulates a crash while a checkpoint is written."""

    def __reduce__(self):
        raise OSError("disk full (injected)")


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"epoch": 1, "w": torch.ones(1000)}, path)
    with pytest.raises(Exception):
        save_atomic({"epoch": 2, "w": torch.zeros(1000), "boom": Boom()}, path)
    assert load_trusted(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_whose_pickle_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = Evil()
    evil.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"model": evil}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    assert not marker.exists()
    with pytest.raises(UserError, match="refused"):
        load_trusted(path)
    assert not marker.exists()
