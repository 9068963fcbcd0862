"""kcd.models.small_conv: the same outputs and gradients as PyTorch's, and where it applies."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kcd.models import build_model, small_conv
from kcd.models.small_conv import SmallConv2d, use_small_conv_grads


def _grads(conv: nn.Module, x: torch.Tensor, seed: int = 0):
    x = x.detach().clone().requires_grad_()
    out = conv(x)
    torch.manual_seed(seed)  # not randn_like: the two outputs may differ in their strides
    out.backward(torch.randn(out.shape))
    return out.detach(), x.grad, [p.grad for p in conv.parameters()]


def _pair(native: nn.Conv2d, size: int, channels_last: bool = False):
    """``native``, a copy of it switched to SmallConv2d, and an input of ``size`` x ``size``
    pixels, all in the same memory format."""
    fast = copy.deepcopy(native)
    assert use_small_conv_grads(fast) == 1 and type(fast) is SmallConv2d
    x = torch.randn(4, native.in_channels, size, size)
    if channels_last:
        native, fast = (m.to(memory_format=torch.channels_last) for m in (native, fast))
        x = x.contiguous(memory_format=torch.channels_last)
    return native, fast, x


def _assert_same_gradients(got, expected):
    """Float rounding of sums of ~1000 terms."""
    for b, a in zip(got, expected):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())


# (in, out, kernel, stride, padding, dilation, groups, bias, map size)
CASES = [
    (48, 48, 3, 1, 1, 1, 48, False, 16),   # depthwise on a large map
    (96, 96, 3, 2, 1, 1, 96, False, 8),    # depthwise, strided
    (480, 480, 3, 1, 0, 1, 480, False, 3),  # depthwise, unpadded, to a 1x1 map
    (32, 32, 5, 1, 4, 2, 32, True, 6),     # depthwise, dilated, with bias
    (64, 128, 3, 1, 1, 1, 1, False, 2),    # dense 3x3 on a 2x2 map
    (64, 128, 3, 2, 1, 1, 1, True, 2),     # dense, strided to 1x1 (a tap meets only padding)
    (16, 8, 3, 1, 2, 1, 1, False, 1),      # dense on a 1x1 map, padded past "same"
]


@pytest.mark.parametrize("cin, cout, k, stride, pad, dil, groups, bias, size", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_equal_pytorch(cin, cout, k, stride, pad, dil, groups, bias, size,
                                 channels_last):
    torch.manual_seed(0)
    native, fast, x = _pair(nn.Conv2d(cin, cout, k, stride, pad, dil, groups, bias), size,
                            channels_last)
    calls = []
    real = torch.nn.grad.conv2d_input
    out_a, gx_a, gp_a = _grads(native, x)
    try:  # the shifted-product path ran (it asks PyTorch for the input gradient only)
        torch.nn.grad.conv2d_input = lambda *a, **k: calls.append(1) or real(*a, **k)
        out_b, gx_b, gp_b = _grads(fast, x)
    finally:
        torch.nn.grad.conv2d_input = real
    assert calls == [1]
    torch.testing.assert_close(out_b, out_a)
    assert len(gp_b) == len(gp_a) == 1 + bias
    _assert_same_gradients([gx_b, *gp_b], [gx_a, *gp_a])


# (in, out, kernel, stride, dilation, groups, bias): k x k with "same" padding on a 1x1 map
CENTRE = [
    (480, 480, 3, 1, 1, 480, False),   # depthwise (MobileNetV2's last blocks)
    (64, 128, 3, 1, 1, 1, False),      # dense (ResNet's last stage, Sub-net-Res)
    (64, 128, 3, 2, 1, 1, True),       # strided, with bias
    (32, 32, 5, 1, 2, 32, True),       # depthwise, dilated, with bias
]


@pytest.mark.parametrize("cin, cout, k, stride, dil, groups, bias", CENTRE)
@pytest.mark.parametrize("grad", [True, False])
def test_centre_tap_equals_pytorch(cin, cout, k, stride, dil, groups, bias, grad, monkeypatch):
    torch.manual_seed(0)
    native, fast, x = _pair(nn.Conv2d(cin, cout, k, stride, dil * (k - 1) // 2, dil, groups,
                                      bias), 1)
    calls = []
    real = small_conv._centre_tap
    monkeypatch.setattr(small_conv, "_centre_tap", lambda *a: calls.append(1) or real(*a))
    if grad:
        out_a, gx_a, gp_a = _grads(native, x)
        out_b, gx_b, gp_b = _grads(fast, x)
        _assert_same_gradients([gx_b, *gp_b], [gx_a, *gp_a])
    else:
        with torch.no_grad():
            out_a, out_b = native(x), fast(x)
    assert calls == [1] and out_b.shape == out_a.shape == (4, cout, 1, 1)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    fast(torch.randn(4, cin, 2, 2))  # a larger map: not the centre alone
    assert calls == [1]


# (in, out, stride, bias, map size): 1x1 convolutions on the maps where they become products
POINTWISE = [
    (64, 128, 1, False, 1),   # ResNet-50's last stage, a regressor on pooled features
    (64, 128, 1, True, 2),    # with bias, on a 2x2 map
    (64, 128, 2, False, 2),   # a strided shortcut to 1x1
    (32, 16, 2, False, 3),    # strided, from an odd map to 2x2
]


@pytest.mark.parametrize("cin, cout, stride, bias, size", POINTWISE)
@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_equals_pytorch(cin, cout, stride, bias, size, channels_last, monkeypatch):
    torch.manual_seed(0)
    native, fast, x = _pair(nn.Conv2d(cin, cout, 1, stride, bias=bias), size, channels_last)
    out_a, gx_a, gp_a = _grads(native, x)
    calls = []
    real = small_conv._pointwise
    monkeypatch.setattr(small_conv, "_pointwise", lambda *a: calls.append(1) or real(*a))
    out_b, gx_b, gp_b = _grads(fast, x)
    assert calls == [1]
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    assert len(gp_b) == len(gp_a) == 1 + bias
    _assert_same_gradients([gx_b, *gp_b], [gx_a, *gp_a])


def test_pointwise_only_on_the_smallest_maps(monkeypatch):
    """A 1x1 convolution is a product on one-pixel maps always, on maps of up to 4 pixels
    while gradients are on, and PyTorch's convolution elsewhere; a padded one is left alone."""
    conv = nn.Conv2d(8, 16, 1)
    assert use_small_conv_grads(conv) == 1
    assert use_small_conv_grads(nn.Conv2d(8, 16, 1, padding=1)) == 0
    sizes = []
    real = small_conv._pointwise
    monkeypatch.setattr(small_conv, "_pointwise",
                        lambda x, *a: sizes.append(tuple(x.shape[-2:])) or real(x, *a))
    with torch.no_grad():
        conv(torch.randn(2, 8, 1, 1))                   # one pixel: a product
        conv(torch.randn(2, 8, 2, 2))                   # no gradients, 4 pixels: PyTorch's
    conv(torch.randn(2, 8, 2, 2)).sum().backward()      # gradients, 4 pixels: a product
    conv(torch.randn(2, 8, 3, 3)).sum().backward()      # 9 pixels: PyTorch's
    assert sizes == [(1, 1), (2, 2)]


@pytest.mark.parametrize("padding", [0, 1])
def test_a_depthwise_1x1_is_not_taken_for_a_pointwise_one(padding):
    """A 1x1 kernel with groups == channels is depthwise: the shifted products, not
    ``F.linear`` (whose weight would be the wrong shape), and its padding kept."""
    torch.manual_seed(0)
    native, fast, x = _pair(nn.Conv2d(8, 8, 1, padding=padding, groups=8), 1)
    out_a, gx_a, gp_a = _grads(native, x)
    out_b, gx_b, gp_b = _grads(fast, x)
    torch.testing.assert_close(out_b, out_a)
    _assert_same_gradients([gx_b, *gp_b], [gx_a, *gp_a])


def test_pytorch_path_where_it_does_not_pay(monkeypatch):
    """Dense convolutions on maps over 4 pixels, grouped (not depthwise) ones, no-grad
    passes and frozen weights keep PyTorch's own path."""
    dense = nn.Conv2d(8, 8, 3, padding=1)
    assert use_small_conv_grads(dense) == 1
    assert use_small_conv_grads(nn.Conv2d(8, 16, 3, groups=2)) == 0
    assert use_small_conv_grads(nn.Conv2d(8, 8, 3, padding="same")) == 0
    applied = []
    real = small_conv._ShiftedProductConv

    class Watch:
        @staticmethod
        def apply(*args):
            applied.append(args[0].shape[-2:])
            return real.apply(*args)

    monkeypatch.setattr(small_conv, "_ShiftedProductConv", Watch)
    dense(torch.randn(2, 8, 3, 3)).sum().backward()      # 9 pixels: PyTorch's path
    with torch.no_grad():
        dense(torch.randn(2, 8, 2, 2))                   # no gradients: PyTorch's path
    dense.weight.requires_grad_(False)
    dense(torch.randn(2, 8, 2, 2, requires_grad=True)).sum().backward()  # frozen weights
    dense.weight.requires_grad_(True)
    assert applied == []
    dense(torch.randn(2, 8, 2, 2)).sum().backward()      # 4 pixels: the shifted products
    assert applied == [(2, 2)]
    # an unbatched (3-D) input keeps PyTorch's path too
    depthwise = nn.Conv2d(3, 3, 3, padding=1, groups=3)
    use_small_conv_grads(depthwise)
    depthwise(torch.randn(3, 5, 5)).sum().backward()
    assert applied == [(2, 2)] and depthwise.weight.grad is not None


def test_a_model_switched_keeps_its_state_and_gradients():
    torch.manual_seed(0)
    native = build_model("mobilenetv2_0.5x", num_classes=10)
    fast = copy.deepcopy(native)
    for m in (native, fast):  # dropout's random masks would differ between the two passes
        for d in m.modules():
            if isinstance(d, nn.Dropout):
                d.p = 0.0
    keys = list(native.state_dict())
    convs = [m for m in native.modules() if isinstance(m, nn.Conv2d)]
    depthwise = sum(m.groups == m.in_channels == m.out_channels > 1 for m in convs)
    dense_kxk = sum(m.groups == 1 and m.kernel_size != (1, 1) for m in convs)
    pointwise = sum(m.groups == 1 and m.kernel_size == (1, 1) for m in convs)
    assert depthwise == 17 and dense_kxk == 1     # MobileNetV2: its blocks and the 3x3 stem
    assert pointwise == len(convs) - 18           # its expansions and projections
    assert use_small_conv_grads(fast) == len(convs)
    assert use_small_conv_grads(fast) == len(convs)  # idempotent
    assert list(fast.state_dict()) == keys
    # as accurate as PyTorch's own float32 pass: both against a float64 one (a batch norm
    # over 8 one-pixel maps amplifies rounding, so the two float32 passes differ by ~1e-3)
    exact = copy.deepcopy(native).double()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for m in (native, fast, exact):
        F.cross_entropy(m(x.to(next(m.parameters()).dtype)), y).backward()

    def error(model):
        return max((a.grad.double() - b.grad).abs().max().item() / b.grad.abs().max().item()
                   for (name, a), b in zip(model.named_parameters(), exact.parameters())
                   if name.endswith("weight"))

    assert error(native) < 1e-2
    assert error(fast) < 4 * error(native)
