"""Benchmark: a CPU training step with PyTorch's convolution gradients beside one with
kcd.models.small_conv's (the demo's shapes: batch 32, 32-pixel images, one thread each).

For each model, two copies from the same weights alternate ``--repeats`` times (the best time
of each is kept, so load from other processes disturbs the ratio less); each time is the mean
of ``--steps`` SGD steps (forward, cross-entropy, backward, update). The last column is the
largest gradient difference between the two, relative to the largest gradient.

How close a step comes to what the core can do: ``gflop`` is one step's floating-point work as
``torch.utils.flop_counter`` counts it (convolutions and matrix products, forward and backward;
batch norm, activations and the update are not counted), ``gflop/s`` that work over the faster
column's time, and ``of peak`` that rate over the rate of one large float32 matrix product
(2048 x 2048, printed first) on the same threads: the most this machine's cores give any of
these steps. A step at 0.6 of it could become at most 1 / 0.6 = 1.7x faster by computing the
same work faster (less what the uncounted work takes); beyond that only less work is faster.

    python bench/bench_small_conv.py [--models mobilenetv2_0.5x resnet18 ...] [--batch 32]
                                     [--size 32] [--steps 8] [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kcd.models import build_model, model_spec
from kcd.models.small_conv import use_small_conv_grads

MODELS = ("mobilenetv2_0.5x", "resnet18", "resnet50", "resnet20", "resnet56")


def _no_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():  # the two copies must see the same function
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def step_ms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1000


def step_gflop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """One training step's convolution and matrix-product work (forward and backward), GFLOP."""
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


def matmul_gflops(size: int = 2048, repeats: int = 3) -> float:
    """The best rate of ``repeats`` float32 ``size`` x ``size`` matrix products, GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def gradient_gap(native: nn.Module, fast: nn.Module, x, y) -> float:
    for m in (native, fast):
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
    scale = max(p.grad.abs().max().item() for p in native.parameters())
    gap = max((a.grad - b.grad).abs().max().item()
              for a, b in zip(native.parameters(), fast.parameters()))
    return gap / scale


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image size of the ImageNet-size "
                        "models (CIFAR ones are always 32)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    peak = matmul_gflops()
    print(f"batch {args.batch}, {args.threads} thread(s), best of {args.repeats} x "
          f"{args.steps} steps, channels_last; peak (2048 x 2048 float32 matrix product) "
          f"{peak:.1f} GFLOP/s")
    print(f"{'model':18s} {'size':>4s} {'switched':>8s} {'pytorch ms':>10s} {'kcd ms':>8s} "
          f"{'speed-up':>8s} {'grad gap':>9s} {'gflop':>7s} {'gflop/s':>8s} {'of peak':>7s}")
    for name in args.models:
        classes = 100 if model_spec(name).family == "cifar" else 10
        size = 32 if model_spec(name).family == "cifar" else args.size
        torch.manual_seed(0)
        native = _no_dropout(build_model(name, classes)).to(memory_format=torch.channels_last)
        fast = copy.deepcopy(native)
        switched = use_small_conv_grads(fast)
        x = torch.randn(args.batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, classes, (args.batch,))
        gap = gradient_gap(native, fast, x, y)
        work = step_gflop(native, x, y)
        step_ms(native, x, y, 2)  # warm-up: oneDNN primitives, allocator
        step_ms(fast, x, y, 2)
        best = [float("inf"), float("inf")]
        for _ in range(args.repeats):
            for i, model in enumerate((native, fast)):
                best[i] = min(best[i], step_ms(model, x, y, args.steps))
        rate = work / (min(best) / 1000)
        print(f"{name:18s} {size:4d} {switched:8d} {best[0]:10.1f} {best[1]:8.1f} "
              f"{best[0] / best[1]:7.2f}x {gap:9.1e} {work:7.3f} {rate:8.1f} {rate / peak:7.2f}",
              flush=True)


if __name__ == "__main__":
    main()
