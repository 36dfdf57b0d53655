"""Image folders: ImageFolder scanning, ingest (validate, quarantine, install atomically) and hashing.

Layout everywhere: <root>/<class>/<image>, classes sorted by name, label = index in that order.
Content hashes (md5 of a file's bytes) are computed here once per file: they name the dataset
(hash_folder, prepare's data hash), decide its split and find duplicates.
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
        dirs[:] = [d for d in dirs if not is_hidden(d)]  # prune in place: os.walk honours it
        found += [Path(here, f) for f in files if not is_hidden(f)]
    return sorted(found, key=lambda p: relative_posix(folder, p))


def relative_posix(root: Path, path: Path) -> str:
    """`path` under `root` as a posix string. A string slice when path was built from root, as scans
    build them (pathlib's relative_to costs ~40 us a file: 0.5 s per 10,000)."""
    base, full = str(root), str(path)
    if base != "." and full.startswith(base + os.sep):
        return full[len(base) + 1:].replace(os.sep, "/")
    return path.relative_to(root).as_posix()


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
    # groups of accepted files with identical bytes: {"md5", "files": [posix paths], "classes": [names]}
    duplicates: list[dict] = field(default_factory=list)
    # duplicates in two or more classes: {"md5", "kept": path, "quarantined": [paths], "classes": [names]}
    label_conflicts: list[dict] = field(default_factory=list)

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
        digests: dict[str, str] = {}  # accepted file (posix path under src) -> md5 of its bytes
        for done, (path, label) in enumerate(files, start=1):
            rel = path.relative_to(src)
            reason = check_image(path, max_pixels, min_side)
            if reason is None:
                (tmp_dest / rel).parent.mkdir(parents=True, exist_ok=True)
                digests[rel.as_posix()] = copy_hashing(path, tmp_dest / rel)  # original bytes, new mtime
                report.classes[classes[label]] += 1
            else:
                report.rejected.append({"file": rel.as_posix(), "class": classes[label], "reason": reason})
                copy_rejected(path, tmp_quarantine / rel, report)
            if progress is not None:
                progress(done, len(files))
        quarantine_conflicts(find_duplicates(digests), tmp_dest, tmp_quarantine, report)
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


def copy_hashing(path: Path, target: Path) -> str:
    """Copy `path` to `target` and return the md5 of its bytes: one read serves both."""
    digest = hashlib.md5()
    with open(path, "rb") as fh, open(target, "wb") as out:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def find_duplicates(digests: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(md5, sorted posix paths) of each group of 2+ files with identical bytes, by first path."""
    groups: dict[str, list[str]] = {}
    for rel in sorted(digests):
        groups.setdefault(digests[rel], []).append(rel)
    return [(digest, members) for digest, members in groups.items() if len(members) > 1]


def quarantine_conflicts(groups: list[tuple[str, list[str]]], tmp_dest: Path, tmp_quarantine: Path,
                         report: IngestReport) -> None:
    """Report every duplicate group; one in two or more classes is a label conflict.

    Identical bytes cannot be two classes at once, and training on both labels would teach noise
    silently. The first file by sorted path keeps its label; copies in other classes go to the
    quarantine (reason `label_conflict`); copies in the kept file's class stay (same label).
    """
    for digest, members in groups:
        classes = sorted({rel.split("/")[0] for rel in members})
        report.duplicates.append({"md5": digest, "files": members, "classes": classes})
        if len(classes) == 1:
            report.warnings.append(f"duplicate: {', '.join(members)} have identical bytes (all kept; "
                                   "they always share a split)")
            continue
        kept, kept_class = members[0], members[0].split("/")[0]
        moved = [rel for rel in members if rel.split("/")[0] != kept_class]
        for rel in moved:
            (tmp_quarantine / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(tmp_dest / rel, tmp_quarantine / rel)
            report.classes[rel.split("/")[0]] -= 1
            report.rejected.append({"file": rel, "class": rel.split("/")[0], "reason": "label_conflict"})
        report.label_conflicts.append({"md5": digest, "kept": kept, "quarantined": moved, "classes": classes})
        report.warnings.append(f"label conflict: {', '.join(members)} have identical bytes in classes "
                               f"{', '.join(classes)}: kept {kept}, quarantined the other classes' copies")


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

def md5_file(path: Path) -> str:
    """md5 of a file's bytes, read in 1 MiB chunks: flat memory on big files."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def combine_digests(entries: list[tuple[str, str]]) -> str:
    """The dataset's hash: md5 over sorted (posix path, md5 of bytes) pairs."""
    total = hashlib.md5()
    for rel, file_md5 in sorted(entries):
        total.update(f"{rel}\0{file_md5}\n".encode())
    return total.hexdigest()


def hash_folder(root: Path) -> str:
    """md5 over sorted (posix path relative to root, md5 of bytes) of non-hidden files: a cache key."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"cannot hash {root}: not a folder")
    return combine_digests([(relative_posix(root, path), md5_file(path)) for path in list_files(root)])
