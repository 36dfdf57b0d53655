"""The backbone names params accepts, in the order the docs list them.

Torch-free, so that params (which sits below core.models) can validate `train.backbone` and list the
allowed names. core.models.registry holds one BackboneSpec per name and refuses to import if its
table and this tuple ever differ: add a backbone there and here.
"""

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
