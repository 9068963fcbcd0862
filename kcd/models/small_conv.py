"""Faster weight gradients on a CPU for the convolutions oneDNN handles badly.

On a CPU, PyTorch computes convolution gradients with oneDNN. Two kinds of convolution in
the demo's ImageNet-size models get a slow weight gradient there, at any batch size:

- depthwise convolutions (``groups == in_channels == out_channels``, MobileNetV2): about
  10 microseconds per channel whatever the map size, so 5 ms for a 480-channel convolution on
  a 1x1 map whose gradient is 138k multiply-adds;
- k x k convolutions on maps of at most :data:`SMALL_MAP` pixels (ResNet-18/50's last stage
  on 32-pixel images), where most of the kernel only ever meets padding.

:func:`use_small_conv_grads` switches a model's eligible convolutions to
:class:`SmallConv2d`, which computes the weight gradient as one product per kernel tap of
the (padded, strided) input with the output gradient, and leaves the input gradient and the
forward pass to PyTorch. The result is the same gradient up to float rounding (tests: 1e-5);
``bench/bench_small_conv.py`` measures the speed-up per model (demo shapes, 1 thread:
MobileNetV2-0.5x about 1.6x per training step, ResNet-18 1.3x, CIFAR ResNets unchanged).

It applies only where it helps: on CPU tensors, with gradients on, and for dense
convolutions only on small maps; everything else takes PyTorch's own path. The parameters,
their names and the state dict are unchanged. The training engine uses it on a CPU when
``recipe.cpu_small_conv_grads`` is on (default).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SMALL_MAP = 4
"""Dense k x k convolutions take :class:`SmallConv2d`'s path on input maps of at most this
many pixels (2x2); depthwise ones on every map."""


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


def _weight_grad(x, shape, grad_out, stride, padding, dilation, groups) -> torch.Tensor:
    """dL/dW[o, c, i, j] = sum over n, h, w of grad_out[n, o, h, w] * x_pad[n, c, h*s + i*d,
    w*s + j*d]: one strided view of the padded input per tap (i, j)."""
    kh, kw = shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho, wo = grad_out.shape[-2:]
    padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    taps = []
    for i in range(kh):
        for j in range(kw):
            view = padded[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh,
                          j * dw: j * dw + sw * (wo - 1) + 1: sw]
            if groups == 1:  # [out, in]
                taps.append(torch.einsum("nohw,nchw->oc", grad_out, view))
            else:  # depthwise: [channels]
                taps.append((view * grad_out).sum((0, 2, 3)))
    return torch.stack(taps, -1).reshape(shape)


class SmallConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose CPU weight gradient takes :func:`_weight_grad` where that is
    faster (depthwise, or dense k x k on maps of at most :data:`SMALL_MAP` pixels)."""

    def _conv_forward(self, input, weight, bias):  # noqa: A002 - nn.Conv2d's signature
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
    return depthwise or dense_kxk


def use_small_conv_grads(model: nn.Module) -> int:
    """Switch ``model``'s eligible convolutions to :class:`SmallConv2d` in place; how many of
    its convolutions are :class:`SmallConv2d` now. Idempotent; the parameters and the state
    dict are untouched."""
    switched = 0
    for module in model.modules():
        if _eligible(module):
            module.__class__ = SmallConv2d
        switched += type(module) is SmallConv2d
    return switched
