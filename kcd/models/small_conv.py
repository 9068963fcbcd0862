"""Faster CPU paths for the convolutions oneDNN handles badly.

On a CPU, PyTorch computes convolutions with oneDNN. Four kinds of convolution in the demo's
ImageNet-size models and in the distillation losses are slow there, at any batch size:

- depthwise convolutions (``groups == in_channels == out_channels``, MobileNetV2): a slow
  weight gradient, about 10 microseconds per channel whatever the map size (5 ms for a
  480-channel convolution on a 1x1 map whose gradient is 138k multiply-adds);
- k x k convolutions on maps of at most :data:`SMALL_MAP` pixels (ResNet-18/50's last stage
  on 32-pixel images): a slow weight gradient, most of the kernel only ever meeting padding;
- k x k convolutions with "same" padding on maps of one pixel, where only the kernel's
  centre meets the input but every tap is computed (those last stages, Sub-net-Res's
  transform on pooled features);
- 1x1 convolutions on maps of one pixel (ResNet-50's last stage, MobileNetV2's last blocks,
  FitNets', AB's and RCO's 1x1 regressors on pooled features): forward and both gradients
  2-3x slower than the same matrix product (34 ms against 13 ms for a 1280 -> 2048 regressor
  on a batch of 32).

:func:`use_small_conv_grads` switches a module's eligible convolutions to
:class:`SmallConv2d`, which takes, on CPU tensors:

- for a k x k convolution with "same" padding on a 1x1 map: a matrix product with the
  kernel's centre (a per-channel scale if depthwise), forward and backward
  (:func:`_centre_tap`);
- for a 1x1 convolution on an output map of one pixel, or of at most :data:`SMALL_MAP`
  pixels while gradients are on: ``F.linear`` over the pixels' channel vectors, forward and
  backward (:func:`_pointwise`);
- for a depthwise convolution, or a dense k x k one on a map of at most :data:`SMALL_MAP`
  pixels, while gradients are on: PyTorch's forward pass and input gradient, and the weight
  gradient as one product per kernel tap of the (padded, strided) input with the output
  gradient, skipping the taps that meet only padding (:func:`_weight_grad`);
- everything else: PyTorch's own path.

The results are the same up to float rounding (tests: 1e-5). The parameters, their names and
the state dict are unchanged. ``bench/bench_small_conv.py`` measures the speed-up per model
(demo shapes, 1 thread). The training engine uses it on a CPU when
``recipe.cpu_small_conv_grads`` is on (default), for the student and the losses' modules;
Sub-net-Res's fitting uses it too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SMALL_MAP = 4
"""The map size (pixels) up to which dense k x k convolutions take the per-tap weight
gradient and 1x1 ones the matrix product while gradients are on."""


class _ShiftedProductConv(torch.autograd.Function):
    """``F.conv2d`` whose weight gradient is a sum of per-tap products (see the module)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad_out, stride, padding,
                                                dilation, groups)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(x, weight.shape, grad_out, stride, padding, dilation, groups)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None


def _meets_input(size: int, out: int, tap: int, stride: int, pad: int, dilation: int) -> bool:
    """Whether kernel tap ``tap`` meets a real (not padding) input pixel at some output
    position along one axis: 0 <= h*stride + tap*dilation - pad < size for an h < out."""
    first = max(0, -(-(pad - tap * dilation) // stride))
    return first < out and first * stride + tap * dilation - pad < size


def _weight_grad(x, shape, grad_out, stride, padding, dilation, groups) -> torch.Tensor:
    """dL/dW[o, c, i, j] = sum over n, h, w of grad_out[n, o, h, w] * x_pad[n, c, h*s + i*d,
    w*s + j*d]: one strided view of the padded input per tap (i, j). A tap that meets only
    padding (most of a 3x3 kernel on a 1x1 map) has a zero gradient and is not computed."""
    kh, kw = shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho, wo = grad_out.shape[-2:]
    padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    zero = None
    taps = []
    for i in range(kh):
        rows = _meets_input(x.shape[-2], ho, i, sh, ph, dh)
        for j in range(kw):
            if not (rows and _meets_input(x.shape[-1], wo, j, sw, pw, dw)):
                if zero is None:
                    zero = x.new_zeros(shape[:2] if groups == 1 else shape[:1])
                taps.append(zero)
                continue
            view = padded[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh,
                          j * dw: j * dw + sw * (wo - 1) + 1: sw]
            if groups == 1:  # [out, in]
                taps.append(torch.einsum("nohw,nchw->oc", grad_out, view))
            else:  # depthwise: [channels]
                taps.append((view * grad_out).sum((0, 2, 3)))
    return torch.stack(taps, -1).reshape(shape)


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias, stride) -> torch.Tensor:
    """A 1x1 convolution (no padding) as ``F.linear`` over the pixels' channel vectors; the
    result has the channels-last strides (a view of the product)."""
    if stride != (1, 1):
        x = x[:, :, ::stride[0], ::stride[1]]
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view for channels-last inputs
    out = F.linear(rows, weight.reshape(weight.shape[0], c), bias)
    return out.view(n, h, w, -1).permute(0, 3, 1, 2)


def _centre_tap(x: torch.Tensor, weight: torch.Tensor, bias, groups: int) -> torch.Tensor:
    """A k x k convolution with "same" padding on a 1x1 map: only the kernel's centre meets
    the input, so it is a matrix product with the centre tap (dense) or a per-channel scale
    (depthwise)."""
    centre = weight[:, :, weight.shape[-2] // 2, weight.shape[-1] // 2]
    n = x.shape[0]
    if groups == 1:
        return F.linear(x.reshape(n, -1), centre, bias).view(n, -1, 1, 1)
    out = x * centre.reshape(1, -1, 1, 1)
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


class SmallConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that takes a faster CPU path where there is one: the weight gradient
    by :func:`_weight_grad` (depthwise, or dense k x k on maps of at most :data:`SMALL_MAP`
    pixels), the whole 1x1 convolution as a matrix product (:func:`_pointwise`), or a k x k
    one on a 1x1 map as its centre tap (:func:`_centre_tap`)."""

    def _same_padding(self) -> bool:
        return all(k % 2 == 1 and p == d * (k - 1) // 2 for k, p, d in
                   zip(self.kernel_size, self.padding, self.dilation))

    def _conv_forward(self, input, weight, bias):  # noqa: A002 - nn.Conv2d's signature
        if (input.device.type == "cpu" and input.dim() == 4 and self.kernel_size != (1, 1)
                and input.shape[-2:] == (1, 1) and self._same_padding()):
            return _centre_tap(input, weight, bias, self.groups)
        if self.kernel_size == (1, 1) and self.groups == 1 and self.padding == (0, 0):
            if input.device.type == "cpu" and input.dim() == 4:
                pixels = (((input.shape[-2] - 1) // self.stride[0] + 1)
                          * ((input.shape[-1] - 1) // self.stride[1] + 1))  # the output's
                if pixels == 1 or (pixels <= SMALL_MAP and torch.is_grad_enabled()):
                    return _pointwise(input, weight, bias, self.stride)
            return super()._conv_forward(input, weight, bias)
        if (input.device.type == "cpu" and input.dim() == 4 and torch.is_grad_enabled()
                and weight.requires_grad
                and (self.groups > 1 or input.shape[-1] * input.shape[-2] <= SMALL_MAP)):
            return _ShiftedProductConv.apply(input, weight, bias, self.stride, self.padding,
                                             self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


def _eligible(module: nn.Module) -> bool:
    if type(module) is not nn.Conv2d or module.padding_mode != "zeros":
        return False
    if isinstance(module.padding, str):  # "same"/"valid": numeric padding is needed
        return False
    depthwise = module.groups == module.in_channels == module.out_channels
    dense_kxk = module.groups == 1 and module.kernel_size != (1, 1)
    pointwise = (module.groups == 1 and module.kernel_size == (1, 1)
                 and module.padding == (0, 0))  # dilation is moot for a 1x1 kernel
    return depthwise or dense_kxk or pointwise


def use_small_conv_grads(model: nn.Module) -> int:
    """Switch ``model``'s eligible convolutions (depthwise, dense k x k, 1x1 without padding)
    to :class:`SmallConv2d` in place; how many of its convolutions are :class:`SmallConv2d`
    now. Idempotent; the parameters and the state
    dict are untouched."""
    switched = 0
    for module in model.modules():
        if _eligible(module):
            module.__class__ = SmallConv2d
        switched += type(module) is SmallConv2d
    return switched
