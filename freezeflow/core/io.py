"""Files: the one atomic write every writer uses, and checkpoints read with weights-only unpickling.

`open_atomic` writes to a uniquely named temp file in the target's folder, fsyncs it and renames it
over the target: a crash at any point leaves either the old file or the new one, never half of
either, and two writers never share a temp file. Everything that writes a file a reader may see
(checkpoints, models, params, reports, features, prepared manifests, images) goes through it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from freezeflow.core.errors import UserError


@contextlib.contextmanager
def open_atomic(path: Path | str, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Yield a handle on a fresh temp file beside `path`; on success fsync + os.replace onto `path`.

    On any error the temp file is removed and the previous `path` is left as it was.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"open_atomic writes whole files: mode 'wb' or 'w', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # atomic on POSIX, and on Windows within one volume
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        exc.filename = exc.filename or str(path)
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    with open_atomic(path) as handle:
        handle.write(data)


def write_text_atomic(path: Path | str, text: str) -> None:
    with open_atomic(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json_atomic(path: Path | str, payload: dict | list, indent: int | None = 2) -> None:
    """indent=None: compact, for machine-read files of thousands of entries (3x faster to write)."""
    write_text_atomic(path, json.dumps(payload, indent=indent, separators=None if indent else (",", ":")))


def save_atomic(obj: Any, path: Path | str) -> None:
    """torch.save through open_atomic; serialized first, so a write error surfaces as a plain OSError."""
    import torch  # here, not at module top: params and the CLI import this module without torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getbuffer())


def load_trusted(path: Path, map_location: Any = "cpu") -> Any:
    """Load tensors and plain containers only; a file whose pickle would run code is refused."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise UserError(f"{path}: refused to load: not a plain weights file ({first[:160]})") from None
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (RuntimeError, EOFError) as exc:
        raise UserError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0][:160]})") from None
