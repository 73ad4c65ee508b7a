"""Benchmark metanet.ops against torch-scatter, native torch and torch_geometric.utils.scatter.

Prints one table per statistic (median and min over interleaved rounds, ms) of
sum/mean/max/std over destination-sorted graphs: random graphs of 10k, 100k and 1M edges, the
parameter graph of a batch of 256 digits CNNs (conv 1->8 3x3, conv 8->16 3x3, linear 16->10
after global pooling) and of one ResNet-18 (nodes = channels, one edge per (out, in) kernel
incl. 1x1 downsamples and the 512->1000 head). The "metanet" column calls
``ops.segment(x, ptr)`` (graphs in metanet are CSR-sorted); "mn.scatter" calls
``ops.scatter(x, index)``. ``best/mn`` = fastest single-backend column / metanet (>= 1 means
metanet is at least as fast); ``pyg/mn`` = torch_geometric.utils.scatter / metanet. metanet
caches per CSR pointer (validation, index, sparse matrix), as a training step reuses one
batch's ptr across layers; "mn.cold" passes a fresh copy of ptr on every call.

Protocol (the same for every column): fixed torch thread count (``--threads``, default 1),
passive OpenMP waiting, freed memory kept by glibc (``--allocator``, default keep); per row,
each callable is warmed up, then timed once per round with the columns in a new random order
every round, gradients reset untimed before each call and the garbage collector off; rounds
fill ``--budget`` seconds per row (9 to 301 rounds). Each call's CPU time (of the calling
thread with one torch thread, else of the process) and wall-clock time are recorded; ratios
are ratios of median CPU times (the cores are shared, so wall time includes other processes'
time slices); a median wall-clock table is printed last.
``--backward`` times forward + backward (``out.backward(grad)``).

    python scripts/bench_scatter.py [--backward] [--quick] [--reps N] [--budget S] [--threads T]
        [--allocator keep|system]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import time
from collections.abc import Callable

# A spinning OpenMP runtime (libgomp's default "active" wait) stalls every parallel torch op
# by a scheduler time slice (~200 ms measured) when the cores are shared with other busy
# processes; "passive" measures the kernels instead. Override by setting the variable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch_geometric  # noqa: E402
from bench_common import keep_freed_memory  # noqa: E402
from torch_geometric.nn.aggr import StdAggregation  # noqa: E402
from torch_geometric.utils import scatter as pyg_scatter  # noqa: E402

from metanet import ops  # noqa: E402
from metanet.ops import backend  # noqa: E402

ts = backend.torch_scatter
REDUCES = ("sum", "mean", "max", "std")
SINGLE = ("ts.scatter", "ts.segment", "native", "segment_reduce")  # single-backend columns
COLUMNS = ("metanet", "mn.cold", "mn.scatter", *SINGLE, "pyg")
MIN_ROUNDS, MAX_ROUNDS = 9, 301


def machine_info() -> str:
    cpu = platform.processor() or "?"
    if os.path.exists("/proc/cpuinfo"):
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if "model name" in ln]
        cpu = names[0] if names else cpu
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"CPU: {cpu} | cores: {os.cpu_count()} | torch threads: {torch.get_num_threads()} | "
        f"load avg: {load} | OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}\n"
        f"torch {torch.__version__} | torch_geometric "
        f"{torch_geometric.__version__} | torch_scatter "
        f"{getattr(ts, '__version__', 'not installed')} | metanet backend: {ops.get_backend()}"
    )


def _sorted_graph(fan_in: list[tuple[int, int]]) -> torch.Tensor:
    """dst index ``[E]`` (sorted) for groups of ``(num_nodes, in_degree)``; node ids in order."""
    deg = torch.cat([torch.full((n,), d, dtype=torch.long) for n, d in fan_in])
    return torch.arange(deg.numel()).repeat_interleave(deg), deg.numel()


def cases(quick: bool) -> list[tuple[str, torch.Tensor, int, int]]:
    """(name, sorted dst index [E], num_nodes N, feature dim F)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for e in (10_000, 100_000) + (() if quick else (1_000_000,)):
        n = e // 32  # mean in-degree 32, like a hidden layer's fan-in
        out.append((f"random {e // 1000}k", torch.randint(n, (e,), generator=gen).sort()[0], n, 32))
    # digits CNN: input node (0 in-edges), conv1 8 nodes x 1, conv2 16 x 8, linear 10 x 16
    cnn = [(1, 0), (8, 1), (16, 8), (10, 16)] * 256
    index, n = _sorted_graph(cnn)
    out.append(("256 digits CNNs", index, n, 32))
    if not quick:
        convs = [(3, 64)] + [(64, 64)] * 4 + [(64, 128), (128, 128), (128, 128), (128, 128)]
        convs += [(64, 128), (128, 256)] + [(256, 256)] * 3 + [(128, 256), (256, 512)]
        convs += [(512, 512)] * 3 + [(256, 512), (512, 1000)]  # 1x1 downsamples and the fc
        index, n = _sorted_graph([(3, 0)] + [(o, i) for i, o in convs])
        out.append(("ResNet-18", index, n, 16))
    return out


def methods(x, index, ptr, n: int, reduce: str) -> dict[str, Callable[[], torch.Tensor] | None]:
    """Callables per column (None where a backend has no such reduction)."""

    def native():
        if reduce in ("max", "min"):
            i = index.view(-1, 1).expand_as(x)
            out = x.new_zeros(n, x.size(1))
            return out.scatter_reduce(0, i, x, "a" + reduce, include_self=False)
        total = x.new_zeros(n, x.size(1)).index_add(0, index, x)
        if reduce == "sum":
            return total
        cnt = torch.bincount(index, minlength=n).clamp_min(1).unsqueeze(1).to(x.dtype)
        mean = total / cnt
        if reduce == "mean":
            return mean
        d = x - mean.index_select(0, index)
        return (x.new_zeros(n, x.size(1)).index_add(0, index, d * d) / cnt).sqrt()

    f: dict[str, Callable[[], torch.Tensor] | None] = {
        "metanet": lambda: ops.segment(x, ptr, reduce),
        "mn.cold": lambda: ops.segment(x, ptr.clone(), reduce),  # new ptr: per-ptr cache cold
        "mn.scatter": lambda: ops.scatter(x, index, 0, n, reduce),
        "ts.scatter": None, "ts.segment": None, "native": native, "segment_reduce": None,
        "pyg": lambda: pyg_scatter(x, index, 0, dim_size=n, reduce=reduce),
    }  # fmt: skip
    if reduce == "std":
        f["pyg"] = lambda: StdAggregation()(x, index, dim_size=n)
    else:
        f["segment_reduce"] = lambda: torch.segment_reduce(x, reduce, offsets=ptr, axis=0)
    if ts is not None:
        if reduce == "std":
            f["ts.scatter"] = lambda: ts.scatter_std(x, index, 0, dim_size=n, unbiased=False)
        else:
            f["ts.scatter"] = lambda: ts.scatter(x, index, 0, dim_size=n, reduce=reduce)
            f["ts.segment"] = lambda: ts.segment_csr(x, ptr, reduce=reduce)
    return f


def time_interleaved(
    fns: dict[str, Callable],
    reps: int,
    budget_s: float,
    before: Callable[[], None],
    seed: int,
    cpu_clock: Callable[[], float],
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm up, then run every callable once per round, in a fresh random order each round
    (so load spikes and cache state hit all backends alike). ``before()`` runs untimed before
    every call (it resets gradients). The Python garbage collector is off while timing.
    Returns (CPU times, wall times) in ms per column, one entry per round."""
    est = 0.0
    for fn in fns.values():
        before()
        fn()
        before()
        t0 = time.perf_counter()
        fn()
        est += time.perf_counter() - t0
    rounds = reps or int(min(MAX_ROUNDS, max(MIN_ROUNDS, budget_s / max(est, 1e-6))))
    order = list(fns)
    rng = random.Random(seed)
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            rng.shuffle(order)
            for k in order:
                before()
                c0, t0 = cpu_clock(), time.perf_counter()
                fns[k]()
                t1, c1 = time.perf_counter(), cpu_clock()
                cpu[k].append((c1 - c0) * 1e3)
                wall[k].append((t1 - t0) * 1e3)
    finally:
        gc.enable()
    return cpu, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--quick", action="store_true", help="small graphs only")
    p.add_argument("--reps", type=int, default=0, help="rounds (default: ~budget s per row)")
    p.add_argument("--budget", type=float, default=4.0, help="seconds per row (default 4)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, fixed for the whole run (default 1: the cores are "
                        "shared, and a descheduled worker thread stalls a parallel kernel)")
    p.add_argument("--allocator", choices=("keep", "system"), default="keep",
                   help="keep: glibc keeps freed memory (default; see keep_freed_memory); "
                        "system: glibc defaults (large tensors are mmap'ed and page-faulted)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kept = args.allocator == "keep" and keep_freed_memory()
    # With one thread every kernel runs on the calling thread, so its CPU time is the work
    # done, free of the time slices the OS gives other processes; with more threads the
    # process CPU time (all threads) is used.
    clock = time.thread_time if args.threads == 1 else time.process_time
    clock_name = "thread CPU" if args.threads == 1 else "process CPU"
    start = time.perf_counter()
    print(machine_info())
    alloc = "freed memory kept (mallopt)" if kept else "glibc defaults"
    print(f"mode: {'forward + backward' if args.backward else 'forward'}; allocator: {alloc}; "
          f"ratios from {clock_name} time (wall-clock table last); times in ms\n")
    rows = []
    for name, index, n, feat in cases(args.quick):
        e = index.numel()
        ptr = ops.index_to_ptr(index, n)
        x = torch.randn(e, feat, generator=torch.Generator().manual_seed(1))
        x.requires_grad_(args.backward)
        grad = torch.randn(n, feat)

        def reset_grad(x=x) -> None:
            x.grad = None  # every backward writes a fresh gradient (no accumulation)

        for reduce in REDUCES:
            fns = {k: f for k, f in methods(x, index, ptr, n, reduce).items() if f is not None}
            if args.backward:
                fns = {k: (lambda f=f, g=grad: f().backward(g)) for k, f in fns.items()}
            seed = len(rows)
            cpu, wall = time_interleaved(fns, args.reps, args.budget, reset_grad, seed, clock)
            layout = ops.reduce.layout_of(x, ptr)
            kernel = backend.kernel_for("max" if reduce == "max" else "sum", layout, args.backward)
            rows.append((name, e, n, feat, reduce, kernel, cpu, wall))
            print(f"  measured {name} {reduce} ({len(cpu['metanet'])} rounds)", flush=True)
    tables = (
        (f"median {clock_name} time over interleaved rounds (ms)", statistics.median, 6),
        (f"min {clock_name} time over interleaved rounds (ms)", min, 6),
        ("median wall-clock time over interleaved rounds (ms)", statistics.median, 7),
    )
    for title, stat, field in tables:
        print(f"\n{title}")
        head = f"{'graph':16s} {'E':>9s} {'N':>7s} {'F':>3s} {'reduce':6s} {'kernel':14s}"
        head += "".join(f"{c:>11s}" for c in COLUMNS)
        head += f"{'best/mn':>8s}{'pyg/mn':>7s}{'best/cold':>10s}"
        print(head)
        for row in rows:
            name, e, n, feat, reduce, kernel = row[:6]
            t = {k: stat(v) for k, v in row[field].items()}
            best = min(t[k] for k in SINGLE if k in t)
            cells = "".join(f"{t[c]:11.3f}" if c in t else f"{'-':>11s}" for c in COLUMNS)
            line = f"{name:16s} {e:9d} {n:7d} {feat:3d} {reduce:6s} {kernel:14s}{cells}"
            ratios = f"{best / t['metanet']:8.2f}{t['pyg'] / t['metanet']:7.2f}"
            print(line + ratios + f"{best / t['mn.cold']:10.2f}")
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
