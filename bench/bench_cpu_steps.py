"""Benchmark: the two per-step costs kcd computes its own way on a CPU, beside PyTorch's
plain way (one thread, the demo's sizes).

- SGD (``kcd.optim``): one step of momentum SGD with weight decay over each model's
  parameters, PyTorch's loop of tensor ops per parameter against the fused kernel
  (``recipe.fused_optimizer``, default on);
- RKD's angles (``kcd.losses.rkd.angles``): forward and backward of the angle term for a
  batch of embeddings, the reference code's b x b x c difference vectors against the Gram
  matrix of the centred embeddings.

Each pair alternates ``--repeats`` times and keeps the best time of each; the last column is
the largest difference of the results relative to the largest value.

    python bench/bench_cpu_steps.py [--models resnet20 resnet18 ...] [--batch 32]
                                    [--channels 64 1280 2048] [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import Callable

import torch
import torch.nn.functional as F

from kcd.losses.rkd import angles
from kcd.models import build_model, model_spec
from kcd.optim import sgd
from kcd.specs import Recipe

MODELS = ("resnet20", "resnet56", "mobilenetv2_0.5x", "resnet18", "resnet50")


def best_ms(fn: Callable[[], object], calls: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1000)
    return best


def reference_angles(e: torch.Tensor) -> torch.Tensor:
    """The RKD authors' formulation: normalised b x b x c difference vectors."""
    directions = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)
    return directions @ directions.transpose(1, 2)


def sgd_row(name: str, repeats: int) -> tuple:
    classes = 100 if model_spec(name).family == "cifar" else 10
    torch.manual_seed(0)
    model = build_model(name, classes)
    copies = {}
    times = {}
    for fused in (False, True):
        params = [p for p in copy.deepcopy(model).parameters()]
        torch.manual_seed(1)  # the same gradients for both
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = sgd(params, Recipe(iterations=1, batch_size=1, lr=0.1, momentum=0.9,
                                       weight_decay=5e-4, fused_optimizer=fused))
        times[fused] = best_ms(optimizer.step, 5, repeats)
        copies[fused] = params
    scale = max(p.abs().max().item() for p in copies[False])
    gap = max((a - b).abs().max().item() for a, b in zip(copies[False], copies[True])) / scale
    count = sum(p.numel() for p in model.parameters()) / 1e6
    return f"SGD {name} ({count:.2f}M)", times[False], times[True], gap


def angle_row(batch: int, channels: int, repeats: int) -> tuple:
    torch.manual_seed(0)
    embeddings = torch.randn(batch, channels)
    teacher = torch.randn(batch, channels) * 3
    results = {}

    def step(fn):
        e = embeddings.clone().requires_grad_()
        loss = F.smooth_l1_loss(fn(e), fn(teacher))
        loss.backward()
        results[fn] = e.grad

    times = [best_ms(lambda fn=fn: step(fn), 3, repeats) for fn in (reference_angles, angles)]
    reference, ours = results[reference_angles], results[angles]
    gap = (ours - reference).abs().max().item() / reference.abs().max().item()
    return f"RKD angles b{batch} c{channels}", times[0], times[1], gap


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", nargs="+", type=int, default=[64, 1280, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), best of {args.repeats}")
    print(f"{'step':34s} {'pytorch ms':>10s} {'kcd ms':>8s} {'speed-up':>8s} {'gap':>9s}")
    rows = [sgd_row(name, args.repeats) for name in args.models]
    rows += [angle_row(args.batch, c, args.repeats) for c in args.channels]
    for label, plain, ours, gap in rows:
        print(f"{label:34s} {plain:10.2f} {ours:8.2f} {plain / ours:7.2f}x {gap:9.1e}",
              flush=True)


if __name__ == "__main__":
    main()
