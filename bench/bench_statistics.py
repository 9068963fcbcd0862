"""Benchmark: streaming consistency statistics vs stored-feature computation, and matching time.

For each channel count c (teacher and student both c) and N pooled samples made in batches of 256
(generation not timed), times :class:`kcd.consistency.ConsistencyStatistics` per metric group

* moments: l2 + cosine + correlation from one accumulator,
* kl,
* l1 (exact chunked cdist; slow for large c, skipped above ``--skip-l1-above``),

beside the naive computation that stores all features and computes in float64 (concatenation
included): centred-matmul Pearson + cdist L2 + normalised-matmul cosine; the direct kl formula;
cdist L1. Memory compares the bytes the accumulator holds (its state, and its buffer of samples
waiting for the next block product) with the bytes of the stored float64 features. Then bipartite
matching time, and the accumulator's size after 10k and after N samples.

    python bench/bench_statistics.py [--n 50000] [--channels 64 512 2048] [--skip-l1-above 512]
                                     [--threads T] [--repeats R]

The target row (every metric but L1 in one streaming pass against naive Pearson alone) alternates
the two R times and keeps each one's best wall time, so that load from other processes on a shared
machine disturbs the ratio less; the process CPU seconds of those best runs are shown beside it.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from kcd.consistency import ConsistencyStatistics, consistency_matrix
from kcd.transforms import match

BATCH = 256
MOMENT_METRICS = ("l2", "cosine", "correlation")


def make_batches(n: int, c: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pooled-feature-like float32 batches: mean 1, the student partly follows the teacher."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randperm(c, generator=generator)
    batches = []
    for start in range(0, n, BATCH):
        size = min(BATCH, n - start)
        teacher = torch.randn(size, c, generator=generator) + 1.0
        student = 0.5 * teacher[:, mixing] + torch.randn(size, c, generator=generator)
        batches.append((teacher, student))
    return batches


def state_bytes(stats: ConsistencyStatistics) -> int:
    return sum(t.numel() * t.element_size() for t in stats.state_dict()["tensors"].values())


def buffer_bytes(stats: ConsistencyStatistics) -> int:
    return getattr(stats, "workspace_bytes", 0)


def time_streaming(batches, c: int, metrics: tuple[str, ...]) -> tuple[float, int, int]:
    start = time.perf_counter()
    stats = ConsistencyStatistics(c, c, metrics)
    for teacher, student in batches:
        stats.update(teacher, student)
    for metric in metrics:
        stats.matrix(metric)
    return time.perf_counter() - start, state_bytes(stats), buffer_bytes(stats)


def naive_moments(a: torch.Tensor, b: torch.Tensor) -> None:
    ac, bc = a - a.mean(0), b - b.mean(0)
    ac.T @ bc / torch.outer(ac.norm(dim=0), bc.norm(dim=0))  # Pearson
    1.0 / (torch.cdist(a.T, b.T) + 1e-8)  # L2
    a.T @ b / torch.outer(a.norm(dim=0), b.norm(dim=0))  # cosine


def naive_pearson(a: torch.Tensor, b: torch.Tensor) -> None:
    ac, bc = a - a.mean(0), b - b.mean(0)
    ac.T @ bc / torch.outer(ac.norm(dim=0), bc.norm(dim=0))


def naive_kl(a: torch.Tensor, b: torch.Tensor) -> None:
    consistency_matrix(a, b, "kl")


def naive_l1(a: torch.Tensor, b: torch.Tensor) -> None:
    1.0 / (torch.cdist(a.T, b.T, p=1) + 1e-8)


def time_naive(batches, compute: Callable[[torch.Tensor, torch.Tensor], None]) -> float:
    start = time.perf_counter()
    a = torch.cat([t for t, _ in batches]).double()
    b = torch.cat([s for _, s in batches]).double()
    compute(a, b)
    return time.perf_counter() - start


def readable(n_bytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{n_bytes} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="pooled samples (default 50000)")
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--skip-l1-above", type=int, default=512,
                        help="skip l1 for channel counts above this (c=2048 takes ~100 s)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternating runs of the target comparison, best kept (default 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"N={args.n} samples, batches of {BATCH}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; times in seconds")
    header = ("c", "group", "ours s", "naive s", "naive/ours", "ours state", "ours buffer",
              "naive stored")
    rows = []
    targets = []
    for c in args.channels:
        batches = make_batches(args.n, c, seed=c)
        stored = 2 * args.n * c * 8  # both sides' features in float64
        groups = [("moments", MOMENT_METRICS, naive_moments), ("kl", ("kl",), naive_kl),
                  ("l1", ("l1",), naive_l1)]
        pearson = all_but_l1 = (float("inf"), 0.0)
        for _ in range(max(1, args.repeats)):
            cpu = time.process_time()
            pearson = min(pearson, (time_naive(batches, naive_pearson),
                                    time.process_time() - cpu))
            cpu = time.process_time()
            ours, held, buffered = time_streaming(batches, c, (*MOMENT_METRICS, "kl"))
            all_but_l1 = min(all_but_l1, (ours, time.process_time() - cpu))
        targets.append((c, all_but_l1, pearson, held, buffered))
        for name, metrics, naive in groups:
            if name == "l1" and c > args.skip_l1_above:
                rows.append((c, name, "skipped", "skipped", "-", "-", "-", readable(stored)))
                continue
            ours, held, buffered = time_streaming(batches, c, metrics)
            theirs = time_naive(batches, naive)
            rows.append((c, name, f"{ours:.2f}", f"{theirs:.2f}", f"{theirs / ours:.2f}",
                         readable(held), readable(buffered), readable(stored)))
        del batches
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))

    print("\ntarget: every metric but L1 in one streaming pass, no slower than naive Pearson alone")
    for c, (ours, ours_cpu), (pearson, pearson_cpu), held, buffered in targets:
        verdict = "met" if ours <= pearson else "MISSED"
        print(f"  c={c}: ours (l2+cosine+correlation+kl) {ours:.2f} s (cpu {ours_cpu:.2f} s), "
              f"naive Pearson alone {pearson:.2f} s (cpu {pearson_cpu:.2f} s), "
              f"ratio {pearson / ours:.2f}x: {verdict} "
              f"(ours holds {readable(held)} state + {readable(buffered)} buffer, naive stores "
              f"{readable(2 * args.n * c * 8)})")

    print("\nbipartite matching (scipy linear_sum_assignment, maximize=True)")
    generator = torch.Generator().manual_seed(0)
    for c_t, c_s in [*((c, c) for c in args.channels), (2048, 1280)]:
        m = torch.rand(c_t, c_s, generator=generator, dtype=torch.float64)
        start = time.perf_counter()
        match(m, "bipartite")
        print(f"  c_T={c_t} x c_S={c_s}: {time.perf_counter() - start:.3f} s")

    c = min(args.channels)
    sizes = {}
    for n in (10_000, args.n):
        stats = ConsistencyStatistics(c, c)
        for teacher, student in make_batches(n, c, seed=1):
            stats.update(teacher, student)
        sizes[n] = (state_bytes(stats), buffer_bytes(stats))
    print(f"\nmemory flat in N (c={c}, all metrics): accumulator state + sample buffer "
          + ", ".join(f"{held:,} + {buffered:,} bytes at N={n:,}"
                      for n, (held, buffered) in sizes.items()))


if __name__ == "__main__":
    main()
