"""Feature taps: module outputs, pre-ReLU values, gradients, hook hygiene, shapes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kcd.errors import KcdError
from kcd.features import FeatureTap, feature_shapes, global_avg_pool, resolve_layer
from kcd.models import build_model

# (model name, tapped module, input side, channels of the tapped module's output)
PRE_RELU_CASES = [
    ("resnet20", "layer3", 32, 64),
    ("resnet18", "layer4", 64, 512),  # torchvision BasicBlock
    ("resnet50", "layer4", 64, 2048),  # Bottleneck: relu runs three times per block
    ("mobilenetv2_0.5x", "features.18", 64, 1280),  # ReLU6
]


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes=10).eval()


@pytest.mark.parametrize("name, layer, side, channels", PRE_RELU_CASES)
def test_pre_relu_is_before_the_last_activation(name: str, layer: str, side: int, channels: int) -> None:
    model = _model(name)
    x = torch.randn(2, 3, side, side)
    pre_spec = f"{layer}:pre_relu"
    with torch.no_grad(), FeatureTap(model, [layer, pre_spec]) as tap:
        model(x)
        feats = tap.features
    pre, post = feats[pre_spec], feats[layer]
    assert pre.shape == post.shape and pre.shape[1] == channels
    assert (pre < 0).any()
    assert (post >= 0).all()
    clamp_max = 6.0 if name.startswith("mobilenet") else None
    assert torch.allclose(pre.clamp(0, clamp_max), post)


@pytest.mark.parametrize("name, layer, side, channels", PRE_RELU_CASES)
def test_taps_do_not_change_the_output(name: str, layer: str, side: int, channels: int) -> None:
    model = _model(name)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        expected = model(x)
        with FeatureTap(model, [layer, f"{layer}:pre_relu"]):
            tapped = model(x)
    assert torch.equal(expected, tapped)


@pytest.mark.parametrize("spec", ["layer3", "layer3:pre_relu"])
def test_gradients_flow_from_tapped_features(spec: str) -> None:
    model = build_model("resnet20", num_classes=10).train()
    with FeatureTap(model, [spec]) as tap:
        logits = model(torch.randn(4, 3, 32, 32))
        feature = tap.features[spec]
    assert feature.requires_grad
    feature.pow(2).mean().backward(retain_graph=True)
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert model.layer3[-1].bn2.weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None  # the head is after the tap
    logits.sum().backward()  # the logits graph is intact as well
    assert model.fc.weight.grad is not None


def test_pre_relu_gradient_matches_direct_computation() -> None:
    model = build_model("resnet20", num_classes=10).train()
    x = torch.randn(2, 3, 32, 32)
    block = model.layer3[-1]
    # reference: recompute the last block's pre-activation (identity shortcut) by hand
    with FeatureTap(model, ["layer3.1"]) as tap:
        model(x)
        block_input = tap.features["layer3.1"]
    reference = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(block_input))))) + block_input
    model.zero_grad()
    with FeatureTap(model, ["layer3:pre_relu"]) as tap:
        model(x)
        pre = tap.features["layer3:pre_relu"]
    assert torch.allclose(pre, reference, atol=1e-5)
    pre.sum().backward()
    tapped_grad = block.conv1.weight.grad.clone()
    model.zero_grad()
    reference.sum().backward()
    assert torch.allclose(tapped_grad, block.conv1.weight.grad, atol=1e-5)


def test_hooks_removed_after_context_exit() -> None:
    model = build_model("resnet20", num_classes=10)

    def hook_count() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    assert hook_count() == 0
    with FeatureTap(model, ["layer3", "layer2:pre_relu"]) as tap:
        assert hook_count() > 0
        model(torch.randn(2, 3, 32, 32))
    assert hook_count() == 0
    kept = tap.features["layer3"]
    model(torch.randn(2, 3, 32, 32))
    assert tap.features["layer3"] is kept  # no longer updated


def test_features_are_replaced_each_forward() -> None:
    model = build_model("resnet20", num_classes=10).eval()
    tap = FeatureTap(model, ["layer3"])
    assert tap.features == {}
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        first = tap.features["layer3"]
        model(torch.randn(5, 3, 32, 32))
    assert tap.features["layer3"].shape[0] == 5 and first.shape[0] == 2
    tap.remove()
    tap.remove()  # idempotent


def test_wrapped_model_resolves_through_module() -> None:
    class Wrapper(nn.Module):  # same attribute layout as DistributedDataParallel
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.module(x)

    model = build_model("resnet20_0.5x", num_classes=10)
    wrapped = Wrapper(model)
    with FeatureTap(wrapped, ["layer3:pre_relu"]) as tap:
        wrapped(torch.randn(2, 3, 32, 32))
        assert tap.features["layer3:pre_relu"].shape == (2, 32, 8, 8)
    assert feature_shapes(wrapped, ["layer3"], 32) == {"layer3": (32, 8, 8)}


def test_unknown_layer_lists_valid_names() -> None:
    model = build_model("resnet20")
    with pytest.raises(KcdError) as info:
        FeatureTap(model, ["layer5"])
    message = str(info.value)
    assert "layer5" in message and "layer3" in message and "fc" in message
    with pytest.raises(KcdError, match="layer4"):
        resolve_layer(build_model("resnet18"), "layer4.9")


def test_bad_specs() -> None:
    model = build_model("mobilenetv2_0.5x")
    with pytest.raises(KcdError, match="no ReLU"):
        FeatureTap(model, ["features.18.0:pre_relu"])  # a bare Conv2d
    with pytest.raises(KcdError, match="suffix"):
        FeatureTap(model, ["features.18:post_relu"])
    with pytest.raises(KcdError, match="empty"):
        FeatureTap(model, [":pre_relu"])
    with pytest.raises(KcdError, match="list"):
        FeatureTap(model, "features.18")  # type: ignore[arg-type]


def test_tap_overwritten_in_place_is_reported() -> None:
    model = build_model("resnet20", num_classes=10)
    with FeatureTap(model, ["layer1.0.bn1"]) as tap:
        model(torch.randn(2, 3, 32, 32))  # followed by ReLU(inplace=True)
        with pytest.raises(KcdError, match="in place"):
            tap.features


def test_global_avg_pool() -> None:
    x = torch.randn(3, 4, 5, 6)
    assert torch.allclose(global_avg_pool(x), x.mean(dim=(2, 3)))
    flat = torch.randn(3, 4)
    assert global_avg_pool(flat) is flat
    with pytest.raises(KcdError):
        global_avg_pool(torch.randn(3, 4, 5))


def test_feature_shapes_restores_mode() -> None:
    model = build_model("resnet20", num_classes=10).train()
    model.layer1.eval()
    shapes = feature_shapes(model, ["layer2", "layer3:pre_relu"], 32)
    assert shapes == {"layer2": (32, 16, 16), "layer3:pre_relu": (64, 8, 8)}
    assert model.training and model.layer3.training and not model.layer1.training
    running_mean = model.bn1.running_mean.clone()
    feature_shapes(model, ["layer3"], (32, 48), batch=1)
    assert torch.equal(running_mean, model.bn1.running_mean)  # eval forward: statistics untouched
    assert feature_shapes(build_model("resnet18"), ["layer4"], 64) == {"layer4": (512, 2, 2)}


def test_distributed_data_parallel(tmp_path) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = build_model("resnet20_0.5x", num_classes=10)
        ddp = nn.parallel.DistributedDataParallel(model)
        with FeatureTap(ddp, ["layer3", "layer3:pre_relu"]) as tap:
            logits = ddp(torch.randn(2, 3, 32, 32))
            feats = tap.features
        assert feats["layer3"].shape == feats["layer3:pre_relu"].shape == (2, 32, 8, 8)
        (logits.sum() + feats["layer3:pre_relu"].pow(2).mean()).backward()
        assert model.conv1.weight.grad is not None
    finally:
        dist.destroy_process_group()
