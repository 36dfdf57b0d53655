"""Checkpoints: written atomically, read with weights-only unpickling (never plain pickle)."""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from freezeflow.errors import UserError


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace.

    A crash at any point leaves the previous file intact: os.replace is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialize first: a write error then surfaces as a plain OSError
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        exc.filename = exc.filename or str(path)
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_trusted(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """Load tensors and plain containers only; a file whose pickle would run code is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise UserError(f"{path}: refused to load: not a plain weights file ({first[:160]})") from None
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (RuntimeError, EOFError) as exc:
        raise UserError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0][:160]})") from None
