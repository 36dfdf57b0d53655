"""A crash while a checkpoint is written leaves the previous one; a pickle that would run code is refused."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import freezeflow.core.io
from freezeflow.core.io import load_trusted, save_atomic
from freezeflow.core.errors import UserError


def fail_with(message: str, folder, seen: list):
    """An os function that fails as a full disk does (ENOSPC), noting the folder's files at that moment."""
    def fail(*args, **kwargs):
        seen.extend(sorted(p.name for p in folder.iterdir()))
        raise OSError(28, message)
    return fail


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch, step):
    """The write fails after the temp file holds the new bytes (at fsync), or at the rename itself."""
    path = tmp_path / "last.pt"
    save_atomic({"epoch": 1, "w": torch.ones(1000)}, path)
    seen: list[str] = []
    monkeypatch.setattr(freezeflow.core.io.os, step, fail_with(f"disk full at {step} (injected)", tmp_path, seen))
    with pytest.raises(OSError, match=rf"disk full at {step} \(injected\)") as caught:
        save_atomic({"epoch": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert len(seen) == 2 and seen[0].startswith(".last.pt.") and seen[0].endswith(".tmp")  # it failed mid-write
    assert caught.value.filename == str(path)  # the error names the file it could not write
    assert load_trusted(path)["epoch"] == 1
    assert torch.equal(load_trusted(path)["w"], torch.ones(1000))
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
