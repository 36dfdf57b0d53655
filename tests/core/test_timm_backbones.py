"""timm backbones (`train.backbone=timm/<name>`): timm's parameter groups cut into a StagedNet whose forward is
timm's own, with freezing, the feature-cache contract, weights files, model files and params validation.
Random init only: no test downloads weights."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

from freezeflow.core.errors import ParamsError, UserError  # noqa: E402
from freezeflow.core.layout import Layout  # noqa: E402
from freezeflow.core.models import timm_backbone  # noqa: E402
from freezeflow.core.models.io import ModelInfo, load_model, save_model  # noqa: E402
from freezeflow.core.models.registry import build_backbone, get_backbone, min_image_size, normalization  # noqa: E402
from freezeflow.core.models.staged import StagedNet, stage_names_for  # noqa: E402
from freezeflow.core.params import load_params  # noqa: E402
from freezeflow.core.train.freezing import apply_freeze, set_train_mode  # noqa: E402
from freezeflow.core.train.run import run_training  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402

FAMILIES = ["resnet18", "convnext_atto", "efficientnet_b0", "regnetx_002", "mobilenetv3_small_050",
            "mobilenetv4_conv_small"]
SMALL = "regnetx_002"  # 2.7 M parameters, a nested timm ClassifierHead: the weights and model-file tests use it
PARITY = 1e-5


def staged_outputs(model: StagedNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Output of every stage, in order: (B, C, H, W) up to the last conv stage, then (B, classes)."""
    outputs = []
    for stage in model.stages:
        x = stage(x)
        outputs.append(x)
    return outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_staged_forward_is_timms_forward(family):
    torch.manual_seed(0)
    model = build_backbone(f"timm/{family}", weights="none", num_classes=5).eval()
    torch.manual_seed(0)
    reference = timm.create_model(family, pretrained=False, num_classes=5).eval()  # same seed: same init
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
        outputs = staged_outputs(model, x)
        diff = float((outputs[-1] - expected).abs().max())
        print(f"parity {family}: max abs diff {diff:.3g}")
        assert outputs[-1].shape == (2, 5) and diff < PARITY
        for k in range(1, len(model.stages)):  # the feature cache feeds stage k the output of stage k-1
            torch.testing.assert_close(model.forward_from(outputs[k - 1], k), outputs[-1], rtol=0, atol=0)
    assert all(out.dim() == 4 for out in outputs[:-1])
    assert model.name == f"timm/{family}"
    assert model.stage_names == stage_names_for(len(model.stages) - 2) and len(model.stages) - 2 >= 2
    assert isinstance(model.classifier, nn.Linear) and model.classifier is model.stages[-1][-1]
    assert (model.classifier.in_features, model.classifier.out_features) == (model.feature_dim, 5)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("family", ["resnet18", "efficientnet_b0"])
def test_frozen_prefix_gets_no_gradient(family):
    model = build_backbone(f"timm/{family}", weights="none", num_classes=3)
    k = 3
    apply_freeze(model, k)
    set_train_mode(model, k)
    frozen_stats = {n: b.clone() for n, b in model.stages[:k].named_buffers()}
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is None for p in model.stages[:k].parameters())
    assert all(p.grad is not None for p in model.stages[k:].parameters())
    for name, buffer in model.stages[:k].named_buffers():  # frozen BatchNorm statistics stay as they were
        assert torch.equal(buffer, frozen_stats[name]), name


def test_functional_head_dropout_becomes_a_module_that_matches_train_mode():
    reference = timm.create_model("resnet18", pretrained=False, num_classes=4, drop_rate=0.5)
    stages, feature_dim = timm_backbone.cut_stages(reference)  # shares reference's modules
    model = StagedNet("timm/resnet18", stages, stage_names_for(len(stages) - 2), feature_dim)
    head = model.stages[-1]
    assert isinstance(head[-2], nn.Dropout) and head[-2].p == 0.5 and head[-1] is reference.fc
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    expected = reference.train()(x)
    torch.manual_seed(1)
    torch.testing.assert_close(model.train()(x), expected)  # the same dropout mask from the same seed
    built = build_backbone("timm/ghostnet_100", weights="none", num_classes=4)  # drop_rate 0.2 by default
    assert isinstance(built.stages[-1][-2], nn.Dropout) and built.stages[-1][-2].p == 0.2 and built.training


def test_normalization_and_sizes_come_from_pretrained_cfg(monkeypatch):
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("reading the cfg must not build a model"))
    for family in ("convnext_atto", "resnet34", "vit_tiny_patch16_224"):
        cfg = timm.models.get_pretrained_cfg(family)
        assert normalization(f"timm/{family}") == (tuple(cfg.mean), tuple(cfg.std))
        assert get_backbone(f"timm/{family}").interpolation == cfg.interpolation == "bicubic"
    assert normalization("timm/vit_tiny_patch16_224") == ((0.5,) * 3, (0.5,) * 3)
    assert min_image_size("timm/convnext_atto") == 32  # no min_input_size in the cfg: freezeflow's floor
    assert min_image_size("timm/halonet26t") == 256  # its cfg's min_input_size
    assert get_backbone("resnet18").interpolation is None  # torchvision backbones: unchanged


def save_timm_weights(tmp_path, suffix: str, **create) -> tuple[dict, str]:
    torch.manual_seed(3)
    state = timm.create_model(SMALL, pretrained=False, **create).state_dict()
    path = tmp_path / f"{SMALL}{suffix}"
    if suffix == ".safetensors":
        safetensors_torch.save_file(state, str(path))
    else:
        torch.save(state, path)
    return state, str(path)


def staged_like(state: dict, num_classes: int) -> StagedNet:
    """The StagedNet a state dict in timm's key names should give: cut from a timm model it was loaded into."""
    reference = timm.create_model(SMALL, pretrained=False, num_classes=num_classes)
    reference.load_state_dict(state)
    stages, feature_dim = timm_backbone.cut_stages(reference)
    return StagedNet(f"timm/{SMALL}", stages, stage_names_for(len(stages) - 2), feature_dim)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_loads_exactly_its_tensors(tmp_path, suffix):
    state, path = save_timm_weights(tmp_path, suffix)
    model = build_backbone(f"timm/{SMALL}", weights=path)  # num_classes None: the file's 1000-class head
    expected = staged_like(state, 1000).state_dict()
    assert model.state_dict().keys() == expected.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert torch.equal(model.classifier.weight, state["head.fc.weight"])
    assert torch.equal(model.stages[0].conv.weight, state["stem.conv.weight"])


def test_weights_file_with_another_head_size_keeps_the_body(tmp_path):
    state, path = save_timm_weights(tmp_path, ".safetensors")
    model = build_backbone(f"timm/{SMALL}", weights=path, num_classes=5)
    expected = staged_like(state, 1000).state_dict()
    head = f"stages.{len(model.stages) - 1}.{len(model.stages[-1]) - 1}."
    for key, value in model.state_dict().items():
        if not key.startswith(head):
            assert torch.equal(value, expected[key]), key
    assert model.classifier.weight.shape == (5, model.feature_dim)
    assert not torch.equal(model.classifier.weight, state["head.fc.weight"][:5])  # a fresh head


def test_headless_and_staged_weights_files(tmp_path):
    state, _ = save_timm_weights(tmp_path, ".pth")
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("head.fc.")}, headless)
    model = build_backbone(f"timm/{SMALL}", weights=str(headless), num_classes=3)
    torch.testing.assert_close(model.stages[0].conv.weight, state["stem.conv.weight"], rtol=0, atol=0)
    tuned = tmp_path / "tuned.pt"  # a StagedNet's own state dict (a fine-tuned net) restores its head
    torch.save(model.state_dict(), tuned)
    restored = build_backbone(f"timm/{SMALL}", weights=str(tuned))
    assert torch.equal(restored.classifier.weight, model.classifier.weight)


def test_bad_weights_are_one_line_user_errors(tmp_path):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(UserError) as info:
        build_backbone(f"timm/{SMALL}", weights=str(missing))
    assert "train.weights" in str(info.value) and str(missing) in str(info.value) and "\n" not in str(info.value)
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("regnetx_004", pretrained=False).state_dict(), other)
    with pytest.raises(UserError, match=f"does not fit timm/{SMALL}") as info:
        build_backbone(f"timm/{SMALL}", weights=str(other), num_classes=4)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="allowed: default, none"):
        build_backbone(f"timm/{SMALL}", weights="IMAGENET1K_V1")


def test_unknown_names_and_transformers_are_refused_in_one_line():
    with pytest.raises(UserError, match=r"timm has no model 'resnet_nope'.*list_models") as info:
        build_backbone("timm/resnet_nope", weights="none")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="Invalid pretrained tag"):
        normalization("timm/resnet18.no_such_tag")
    assert "vit_tiny_patch16_224" in timm.list_models("vit_tiny*")
    with pytest.raises(UserError, match="cannot be cut into a sequential StagedNet.*not a CNN") as info:
        build_backbone("timm/vit_tiny_patch16_224", weights="none")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="timm/<name>"):
        get_backbone("vgg16")


def test_params_accept_timm_names_and_name_the_key(project):
    assert load_params(project / "params", ["train.backbone=timm/resnet18"]).train.backbone == "timm/resnet18"
    tagged = load_params(project / "params", ["train.backbone=timm/resnet18.a1_in1k"])
    assert tagged.train.backbone == "timm/resnet18.a1_in1k"
    for bad in ("timm/", "timmy/x", "timm/a b", "timm//x"):
        with pytest.raises(ParamsError) as info:
            load_params(project / "params", [f"train.backbone={bad}"])
        message = str(info.value)
        assert f"train.yaml: backbone: {bad!r} is not allowed; allowed: efficientnet_lite0, resnet18" in message
        assert message.endswith(", convnext_tiny, or timm/<name>") and "\n" not in message


def test_missing_timm_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # import now raises ImportError
    with pytest.raises(UserError, match=r"timm/resnet18 needs timm: pip install timm==1\.0\.31"):
        timm_backbone.import_timm("timm/resnet18")


def test_model_file_round_trip(tmp_path):
    model = build_backbone(f"timm/{SMALL}", weights="none", num_classes=3).eval()
    mean, std = normalization(f"timm/{SMALL}")
    save_model(model, ModelInfo(f"timm/{SMALL}", ["a", "b", "c"], 32, mean, std), tmp_path / "models")
    loaded, info = load_model(tmp_path / "models")
    assert info.backbone == f"timm/{SMALL}" and loaded.name == f"timm/{SMALL}"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("strategy", ["head", "until"])
def test_training_a_timm_backbone_with_the_feature_cache(project, shapes_dir, strategy):
    overrides = tiny_overrides(shapes_dir, **{"train.backbone": "timm/resnet18", "train.epochs": 1,
                                              "train.freeze.strategy": strategy, "train.freeze.until": 2,
                                              "train.cache_features": "on"})
    metrics = run_training(load_params(project / "params", overrides), project)
    assert metrics["backbone"] == "timm/resnet18" and metrics["feature_cache"]
    assert 0.0 <= metrics["val_accuracy"] <= 1.0 and 0.0 <= metrics["test_accuracy"] <= 1.0
    history = json.loads((Layout(project).reports / "history.json").read_text())
    assert len(history) == 1 and "val_accuracy" in history[0]
    model, info = load_model(Layout(project).models)
    assert info.backbone == "timm/resnet18" and model.classifier.out_features == 3
    entries = list(Layout(project).features.iterdir())
    assert entries and all(e.name.startswith("timm+resnet18-") for e in entries), \
        "a timm backbone's store is one cache entry (what `freezeflow cache` lists and prunes), not a folder"


@pytest.mark.parametrize("family", ["efficientnet_b0", "mobilenetv3_small_050"])
def test_fused_norm_act_layers_fold_into_the_inference_prefix(family):
    """timm's BatchNormAct2d (batch norm, then dropout and activation) folds like BatchNorm2d: the
    activation stays, so the folded prefix is used, not the unfolded fallback."""
    from freezeflow.core.train.features import make_inference_prefix

    model = build_backbone(f"timm/{family}", weights="none", num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    prefix = make_inference_prefix(list(model.stages[:3]), x)
    norms = [m for m in prefix.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all("forward" in vars(m) for m in norms), "fell back to the unfolded stages"
    with torch.no_grad():
        expected = nn.Sequential(*model.stages[:3])(x)
        assert torch.allclose(prefix(x.contiguous(memory_format=torch.channels_last)), expected,
                              atol=1e-4 * float(expected.abs().max()))
