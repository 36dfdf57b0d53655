"""Image folders: ImageFolder scanning, ingest (validate, quarantine, install atomically) and hashing.

Layout everywhere: <root>/<class>/<image>, classes sorted by name, label = index in that order.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path


from freezeflow.core.errors import DataError
from freezeflow.core.data.images import check_image, is_hidden

# A hidden marker in folders written by ingest_folder: only such folders are ever replaced.
INGEST_MARKER = ".freezeflow-ingest"


# --- ImageFolder scanning --------------------------------------------------------------------------

def list_files(folder: Path) -> list[Path]:
    """Non-hidden files under `folder`, recursively, hidden folders skipped, sorted by posix path."""
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_hidden(Path(d))]  # prune in place: os.walk honours it
        found += [Path(here, f) for f in files if not is_hidden(Path(f))]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(classes, [(file, label), ...]) of an ImageFolder; DataError naming the folder if unusable."""
    root = Path(root)
    layout = f"expected {root}/<class>/<image>"
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist: {layout}")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a folder: {layout}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not is_hidden(p))
    if not classes:
        raise DataError(f"no class folders in {root}: {layout}")
    if len(classes) == 1:
        raise DataError(f"only one class in {root} ({classes[0]}): need at least 2 class folders")
    files = []
    for label, name in enumerate(classes):
        members = list_files(root / name)
        if not members:
            raise DataError(f"empty class folder {root / name}: each class folder needs at least one image")
        files += [(path, label) for path in members]
    return classes, files


# --- ingest ----------------------------------------------------------------------------------------

@dataclass
class IngestReport:
    source: str
    dest: str
    quarantine: str
    classes: dict[str, int] = field(default_factory=dict)  # accepted images per class
    rejected: list[dict] = field(default_factory=list)  # {"file": posix path under source, "class", "reason"}
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def ingest_folder(src: Path, dest: Path, quarantine: Path, max_pixels: int, min_side: int,
                  imbalance_warn: float, progress: Callable[[int, int], None] | None = None) -> IngestReport:
    """Check every image of `src`; copy good ones to `dest`, bad ones to `quarantine`.

    Never modifies `src`. Both outputs are built in temp folders and renamed into place at the end,
    so an interrupted ingest leaves no half dataset; an existing output is replaced only then.
    scan_image_folder guarantees >= 2 classes, and a class left with no good image is an error,
    so a returned report always has >= 2 classes.
    """
    src, dest, quarantine = Path(src), Path(dest), Path(quarantine)
    classes, files = scan_image_folder(src)
    check_outputs(src, dest, quarantine)
    report = IngestReport(str(src), str(dest), str(quarantine), classes={name: 0 for name in classes})
    tmp_dest, tmp_quarantine = make_temp_folder(dest), make_temp_folder(quarantine)
    try:
        for done, (path, label) in enumerate(files, start=1):
            rel = path.relative_to(src)
            reason = check_image(path, max_pixels, min_side)
            if reason is None:
                (tmp_dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, tmp_dest / rel)  # original bytes, new mtime
                report.classes[classes[label]] += 1
            else:
                report.rejected.append({"file": rel.as_posix(), "class": classes[label], "reason": reason})
                copy_rejected(path, tmp_quarantine / rel, report)
            if progress is not None:
                progress(done, len(files))
        report.rejected_by_reason = dict(sorted(Counter(r["reason"] for r in report.rejected).items()))
        empty = [name for name, count in report.classes.items() if count == 0]
        if empty:
            # Publish the quarantine anyway: it is what explains the error.
            install_folder(tmp_quarantine, quarantine)
            more = f" (and {len(empty) - 1} more classes)" if len(empty) > 1 else ""
            raise DataError(f"no usable images in class folder {src / empty[0]}{more}: all rejected "
                            f"(see {quarantine / empty[0]}); each class needs at least one good image")
        report.warnings += imbalance_warnings(report.classes, imbalance_warn)
        install_folder(tmp_quarantine, quarantine)
        install_folder(tmp_dest, dest)
    finally:
        for tmp in (tmp_dest, tmp_quarantine):
            shutil.rmtree(tmp, ignore_errors=True)  # our own temp folders, if not renamed into place
    return report


def copy_rejected(path: Path, target: Path, report: IngestReport) -> None:
    """Copy a rejected file into quarantine; an unreadable one cannot be copied, so say so."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(path, target)
    except OSError as exc:
        report.warnings.append(f"could not copy {path} to quarantine: {exc.strerror or exc}")


def imbalance_warnings(counts: dict[str, int], limit: float) -> list[str]:
    """One warning when the largest class has more than `limit` times the smallest's images."""
    largest, smallest = max(counts, key=counts.get), min(counts, key=counts.get)
    ratio = counts[largest] / counts[smallest]
    if ratio <= limit:
        return []
    return [f"class imbalance {ratio:.1f}:1 ({largest}: {counts[largest]} images, {smallest}: "
            f"{counts[smallest]}) exceeds imbalance_warn={limit:g}"]


def check_outputs(src: Path, dest: Path, quarantine: Path) -> None:
    """Refuse outputs that overlap the source or each other, or that would replace foreign folders."""
    resolved = {"source": src.resolve(), "dest": dest.resolve(), "quarantine": quarantine.resolve()}
    names = list(resolved)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pa, pb = resolved[a], resolved[b]
            if pa == pb or pa.is_relative_to(pb) or pb.is_relative_to(pa):
                raise DataError(f"ingest {a} {pa} and {b} {pb} overlap: use separate folders")
    for out in (dest, quarantine):
        if out.exists() and not out.is_dir():
            raise DataError(f"ingest output {out} is a file: give a folder path")
        if out.is_dir() and any(out.iterdir()) and not (out / INGEST_MARKER).is_file():
            raise DataError(f"ingest output {out} is not empty and was not written by ingest: "
                            f"use a new or empty folder")


def make_temp_folder(final: Path) -> Path:
    """An empty, marked temp folder next to `final` (same filesystem, so os.replace is a rename)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    (tmp / INGEST_MARKER).write_text("written by freezeflow ingest; replaced by the next ingest\n")
    return tmp


def install_folder(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` (checked by check_outputs) is removed after."""
    old = None
    if final.exists():
        # rename(2) may replace an empty folder, so a fresh empty one gives a unique spot for the old
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old)


# --- hashing ---------------------------------------------------------------------------------------

def hash_folder(root: Path) -> str:
    """md5 over sorted (posix path relative to root, md5 of bytes) of non-hidden files: a cache key."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"cannot hash {root}: not a folder")
    total = hashlib.md5()
    for path in list_files(root):
        digest = hashlib.md5()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):  # 1 MiB chunks: flat memory on big files
                digest.update(chunk)
        total.update(f"{path.relative_to(root).as_posix()}\0{digest.hexdigest()}\n".encode())
    return total.hexdigest()
