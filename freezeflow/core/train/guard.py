"""The divergence guard: a training that has gone wrong says so in one line, with the likely cause.

Two states are caught:
- the training loss is NaN or inf: nothing can recover, so training stops (`TrainingDiverged`);
- after `train.guard_epochs` epochs the best val accuracy is still at chance (at most the
  majority-class rate plus two binomial standard deviations; checked when val has 30+ images).
  When body stages train, a short head-only probe on the same data tells the two usual causes
  apart: if the head alone does better, the body's learning rate is destroying the pretrained
  weights; if not, the head's lr or the data is the problem. The run goes on (it may recover),
  but the verdict is reported to every callback (`on_divergence`: the CLI prints it, MLflow tags
  the run, Optuna prunes the trial).
"""

from __future__ import annotations

import math

import numpy as np

from freezeflow.core.errors import UserError

CHANCE_SIGMAS = 2.0
MIN_VAL_IMAGES = 30  # below this, 2 sigmas of a binomial span most of [0, 1]: no verdict


class TrainingDiverged(UserError):
    """The loss became NaN/inf: the message names the likely cause and the param to change."""


def chance_threshold(val_labels: np.ndarray, num_classes: int) -> float | None:
    """Val accuracy at or below this is chance: the majority-class rate + 2 binomial std devs.
    None when the val split is too small to tell chance from learning (the chance check is then off)."""
    if len(val_labels) < MIN_VAL_IMAGES:
        return None
    counts = np.bincount(val_labels, minlength=num_classes)
    p = max(counts.max() / max(len(val_labels), 1), 1.0 / num_classes)
    return float(p + CHANCE_SIGMAS * math.sqrt(p * (1 - p) / max(len(val_labels), 1)))


def describe_lrs(lrs: dict[str, float]) -> str:
    """'head 0.01, body 0.001..1e-05': the rates in force when it went wrong."""
    head = lrs.get("lr/head")
    body = [v for k, v in lrs.items() if k != "lr/head"]
    text = f"head {head:.3g}" if head is not None else ""
    if body:
        text += f"{', ' if text else ''}body {max(body):.3g}..{min(body):.3g}"
    return text


def loss_verdict(loss: float, epoch: int, lrs: dict[str, float], lr: float, body_lr_factor: float) -> str:
    trains_body = any(k != "lr/head" for k in lrs)
    fix = (f"lower train.lr ({lr:.3g}) or train.body_lr_factor ({body_lr_factor:.3g}), or use train.lr=auto"
           if trains_body else f"lower train.lr ({lr:.3g}) or use train.lr=auto")
    return (f"training diverged: train loss is {loss} in epoch {epoch} (lrs {describe_lrs(lrs)}): "
            f"the learning rate is too high; {fix}")


def chance_verdict(val_accuracy: float, threshold: float, epoch: int, lrs: dict[str, float], lr: float,
                   body_lr_factor: float, head_alone: float | None) -> str:
    """The message for val accuracy at chance; `head_alone` is the probe's val accuracy (None: no probe)."""
    start = (f"val accuracy {val_accuracy:.3f} is at chance (<= {threshold:.3f}) after {epoch} epochs "
             f"(lrs {describe_lrs(lrs)})")
    trains_body = any(k != "lr/head" for k in lrs)
    if not trains_body:
        return f"{start}: the head's lr is likely wrong for this data; try train.lr=auto or a 10x lower train.lr"
    if head_alone is not None and head_alone > threshold:
        return (f"{start}, while the head alone reaches {head_alone:.3f}: the body stages' lr destroys the "
                f"pretrained weights; lower train.body_lr_factor ({body_lr_factor:.3g}) or train.lr ({lr:.3g}), "
                "or use train.lr=auto")
    if head_alone is not None:
        return (f"{start}, and the head alone is at chance too ({head_alone:.3f}): check the labels of the "
                f"data, or lower train.lr ({lr:.3g}); try train.lr=auto")
    return (f"{start}: the lr is likely too high for the pretrained weights; lower train.body_lr_factor "
            f"({body_lr_factor:.3g}) or train.lr ({lr:.3g}), or use train.lr=auto")
