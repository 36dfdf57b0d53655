"""StagedNet: a backbone cut into an ordered list of stages (stem, stage 1..N, head), so that a
prefix can be frozen and its output cached, plus the per-stage FLOP count of one image."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


class StagedNet(nn.Module):
    """A backbone cut into an ordered list of stages: stem, stage 1..N, head."""

    def __init__(self, name: str, stages: list[nn.Module], stage_names: list[str], feature_dim: int):
        super().__init__()
        if len(stages) != len(stage_names):
            raise ValueError("one name per stage")
        self.name = name
        self.stages = nn.ModuleList(stages)
        self.stage_names = list(stage_names)
        self.feature_dim = feature_dim  # input width of the head's final Linear

    @property
    def classifier(self) -> nn.Linear:
        """The head's final Linear (feature_dim -> num_classes)."""
        return self.stages[-1][-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(x, 0)  # (B, 3, H, W) -> (B, num_classes)

    def forward_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Apply stages[start:] to x, the output of stage start-1 (or the image when start is 0)."""
        for stage in self.stages[start:]:
            x = stage(x)
        return x


def stage_names_for(count: int) -> list[str]:
    """["stem", "stage1", ..., "stage<count>", "head"]."""
    return ["stem"] + [f"stage{i}" for i in range(1, count + 1)] + ["head"]


def count_stage_flops(model: StagedNet, image_size: int) -> list[int]:
    """FLOPs of one (1, 3, S, S) image through each stage, as counted by FlopCounterMode."""
    param = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, dtype=param.dtype, device=param.device)  # (1, 3, S, S)
    was_training = model.training
    model.eval()  # batch-norm in train mode rejects a single 1x1 sample
    flops = []
    try:
        with torch.no_grad():
            for stage in model.stages:
                with FlopCounterMode(display=False) as counter:
                    x = stage(x)
                flops.append(int(counter.get_total_flops()))
    finally:
        model.train(was_training)
    return flops
