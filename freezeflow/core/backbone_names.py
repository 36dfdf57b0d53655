"""The backbone names params accepts, in the order the docs list them.

Torch-free, so that params (which sits below core.models) can validate `train.backbone` and list the
allowed names. core.models.registry holds one BackboneSpec per name and refuses to import if its
table and this tuple ever differ: add a backbone there and here.
"""

import re

BACKBONE_NAMES = (
    "efficientnet_lite0",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
)

# Besides these, `timm/<name>` builds any timm CNN with a group_matcher (core.models.timm_backbone).
TIMM_PREFIX = "timm/"
TIMM_SHOWN = "timm/<name>"  # how error messages and the docs write the open-ended choice
TIMM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a timm model name, optionally with a .tag


def is_timm_name(name: object) -> bool:
    """True for "timm/<name>" with a plausible timm model name (whether timm knows it is checked at build)."""
    return (isinstance(name, str) and name.startswith(TIMM_PREFIX)
            and TIMM_NAME.fullmatch(name.removeprefix(TIMM_PREFIX)) is not None)
