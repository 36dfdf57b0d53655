"""Layout: every path a step reads or writes, relative to the project root (the one place for them),
and the one resolver of the data folder and the dataset's name.

Pure path arithmetic: nothing here touches the disk.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Layout:
    """<root>/data, prepared/, cache/, checkpoints/, models/, reports/, exports/, params/, mlflow/, quarantine/."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def data_dvc(self) -> Path:
        return self.root / "data.dvc"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def features(self) -> Path:
        return self.cache / "features"

    @property
    def locks(self) -> Path:
        return self.cache / "locks"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def trials(self) -> Path:
        """Per-trial checkpoints of a sweep: trials/<study>/<number>/ (deleted when the sweep ends)."""
        return self.checkpoints / "trials"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def exports(self) -> Path:
        """`freezeflow export` writes here (exports/model.onnx): outside models/, which the train stage owns."""
        return self.root / "exports"

    @property
    def params(self) -> Path:
        return self.root / "params"

    @property
    def best_params(self) -> Path:
        """Written by `freezeflow tune`, overlaid on train.yaml when train.use_best is true."""
        return self.params / "best.yaml"

    @property
    def mlflow(self) -> Path:
        """The local MLflow tracking store (mlflow.db) and its artifacts/."""
        return self.root / "mlflow"

    def report(self, name: str) -> Path:
        """reports/<name>: metrics.json, history.json, eval.json, tune.json, lr_find.json, ingest.json, ..."""
        return self.reports / name


def resolve_data_dir(data_dir: str | Path, root: Path) -> Path:
    """A relative data.dir is relative to the project root, wherever the command runs from."""
    path = Path(data_dir)
    return path if path.is_absolute() else (Path(root) / path).resolve()


def resolve_data_params(params: Any, root: Path) -> Any:
    """params with data.dir made absolute (see resolve_data_dir)."""
    if Path(params.data.dir).is_absolute():
        return params
    return replace(params, data=replace(params.data, dir=str(resolve_data_dir(params.data.dir, root))))


def dataset_name(params: Any, root: Path) -> str:
    """The dataset folder's name, e.g. "digits": the MLflow experiment and registered-model name."""
    return resolve_data_dir(params.data.dir, root).name
