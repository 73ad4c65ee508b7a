"""Parameter graphs of real architectures: build cost, size, round trip, GHN prediction, and a GMN
forward + backward on a ResNet-18-sized graph (CPU).

Architectures: the small family stand-ins of ``tests/test_real_archs.py`` (MobileNetV2/V3,
EfficientNet, DenseNet, ConvNeXt, Swin, RegNet, ShuffleNet), the tiny Hugging Face GPT-2, BERT,
ViT and Llama built from config objects there (random init, nothing downloaded), the digits CNN
of the zoo recipes (``build_module({"type": "cnn", "channels": [8, 16], "kernel": 3})``, input
``[2, 1, 8, 8]``) and a standard ResNet-18 written here (BasicBlock x [2, 2, 2, 2], 1000 classes,
input ``[1, 3, 224, 224]``; torchvision is not used) at the default ``max_kernel_size=9``, where
its 7x7 stem is read over its kernel offsets, and at ``max_kernel_size=49``, where every edge is
49 values wide (the only way before kernel-offset nodes; the comparison row).

Per architecture (every model in ``eval()`` mode, all float state, BatchNorm statistics included,
set to random values as the tests do):

* parameters: elements of the module's parameters (tied ones once);
* build: ``metanet.graph.from_module(model, example_input, max_kernel_size=K)``, ``--repeats``
  builds (one untimed warm-up build of the digits CNN comes first);
* nodes / edges of the graph;
* peak memory of a build: the peak resident set size (RSS, ``/proc/self/statm`` sampled every
  millisecond by a thread) minus the RSS just before the build, the largest over the repeats.
  ``tracemalloc`` is not used: it does not see torch's tensor allocations. RSS deltas
  under-count when the allocator reuses memory freed by an earlier build, and the sampler can
  miss peaks shorter than its period (the GIL may delay it by ~5 ms);
* ``estimate_graph_memory(...).peak_bytes``, what ``from_module`` checks against the limit;
* graph bytes: every tensor of the ``ParamGraph`` plus its layout's row indices, against the
  bytes of the module's parameters (buffers not counted on that side);
* round trip: the graph written with ``graph.load_into`` into a fresh copy of the model
  initialised with other random values; the max abs difference of the two models' outputs
  (logits) on the example input (0 = bit-exact);
* times: median wall clock and median CPU time of this process (``time.process_time``, all its
  threads, the RSS sampler included) of the repeats;
* GHN: an untrained ``GHN(hidden=32, layers=2)`` (seed 0) predicts the model's parameters
  (``GHN.predict``, under ``no_grad``, tracing included; ``--repeats`` calls): predicted
  tensors / parameter tensors kept at the module's own init. When the strict call raises, the
  cell gives the one-line reason, and, if the reason is the vocabulary, the counts with
  ``fallback_init=True``.

GMN: ``metanet.nn.GMN(edge_in_dim=K, hidden=--gmn-hidden, num_layers=--gmn-layers)``
(calibrated on the graph first, not timed), forward + backward of ``mean(out ** 2)`` on the
ResNet-18 graph, and the forward alone under ``no_grad`` (``--repeats`` each); peak RSS delta
measured as for builds.

``--allocator keep`` makes glibc keep freed memory (see :func:`keep_freed_memory`): large
temporaries are then not fresh page-faulted mmaps, which can dominate the GMN's time with the
default allocator on this machine; RSS deltas then count only memory the process did not already
hold, so compare them only within one allocator setting.

The machine may be shared: wall times move with other processes' load (the ``load1`` of the
machine line); CPU times less so (page faults and cache misses still do).

    python scripts/bench_archs.py [--only resnet18,gpt2,...,gmn] [--repeats 3] [--threads 1]
                                  [--allocator system|keep] [--gmn-hidden 16] [--gmn-layers 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench_common import ResNet18, keep_freed_memory  # noqa: E402
from test_real_archs import FAMILIES, _example, _logits, _randomize  # noqa: E402

from metanet.graph import ParamGraph, estimate_graph_memory, from_module  # noqa: E402
from metanet.graph.tracing import _record_or_raise  # noqa: E402
from metanet.hyper.ghn import GHN, GHNVocabularyError  # noqa: E402
from metanet.nn import GMN  # noqa: E402
from metanet.zoo.architectures import build_module  # noqa: E402

T = TypeVar("T")


def mlp_100m() -> nn.Module:
    """A 100.7 M-parameter MLP (six 4096-wide Linear layers; input ``[..., 4096]``)."""
    layers: list[nn.Module] = []
    for i in range(6):
        layers += [nn.Linear(4096, 4096)] + ([nn.ReLU()] if i < 5 else [])
    return nn.Sequential(*layers)


def digits_cnn() -> nn.Module:
    """The digits CNN of the zoo recipes (input ``[N, 1, 8, 8]``, 10 classes)."""
    return build_module({"type": "cnn", "channels": [8, 16], "kernel": 3})


# name -> (factory, example input shape, max_kernel_size)
ARCHS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    **{k: v for k, v in FAMILIES.items() if not k.endswith("_eager")},
    "digits_cnn": (digits_cnn, (2, 1, 8, 8), 9),
    "resnet18": (ResNet18, (1, 3, 224, 224), 9),
    "resnet18_k49": (ResNet18, (1, 3, 224, 224), 49),
    # every weight one scalar edge (kernels over kernel-offset nodes): ~3.25x the parameters
    **{f"{k}_k1": (*FAMILIES[k][:2], 1) for k in ("gpt2", "bert", "vit", "llama")},
    "resnet18_k1": (ResNet18, (1, 3, 224, 224), 1),
    "mlp_100m_k1": (mlp_100m, (2, 1, 4096), 1),  # 3-D: 2-D examples are token ids
}
GMN_NAME = "gmn"


# -- measuring ---------------------------------------------------------------------------------
def _rss() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager: ``delta`` = peak RSS during the block minus the RSS at its start
    (sampled every ``period`` seconds by a daemon thread)."""

    def __init__(self, period: float = 0.001) -> None:
        self.period, self.delta = period, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss())
            time.sleep(self.period)

    def __enter__(self) -> PeakRSS:
        self._start = self._peak = _rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss())
        self.delta = self._peak - self._start


@dataclass
class Timing:
    """Median wall and CPU seconds of the repeats, and the largest peak RSS delta (bytes)."""

    wall: float
    cpu: float
    peak: int

    def cell(self) -> str:
        """``wall (CPU cpu)`` for a table cell."""
        return f"{fmt_seconds(self.wall)} (CPU {fmt_seconds(self.cpu)})"


def timed(fn: Callable[[], T], repeats: int) -> tuple[T, Timing]:
    """Run ``fn`` ``repeats`` times: its last result and the :class:`Timing` (CPU time is this
    process's, all threads, ``time.process_time``: other processes' load does not inflate it)."""
    walls, cpus, peaks, out = [], [], [], None
    for _ in range(repeats):
        with PeakRSS() as mem:
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        peaks.append(mem.delta)
    timing = Timing(statistics.median(walls), statistics.median(cpus), max(peaks))
    return out, timing  # type: ignore[return-value]


def git_state() -> str:
    """Short commit of the checkout, ``+dirty`` with uncommitted changes (``?`` without git)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        return "?"
    return (sha or "?") + ("+dirty" if dirty else "")


def fmt_bytes(n: float) -> str:
    """Bytes in KiB / MiB / GiB."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(s: float) -> str:
    """Seconds as ms below 1 s."""
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def graph_bytes(g: ParamGraph) -> int:
    """Bytes of every tensor of ``g`` plus the row indices of its layout."""
    total = sum(v.nbytes for _, v in g if isinstance(v, Tensor))
    layout = getattr(g, "layout", None)
    if layout is not None:
        total += sum(s.storage_bytes for s in layout.slots.values())
    return total


def param_stats(model: nn.Module) -> tuple[int, int, int]:
    """Parameter elements, bytes and tensors of ``model`` (tied parameters once)."""
    params = list(model.parameters())
    return (sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params),
            len(params))  # fmt: skip


def one_line(exc: BaseException, limit: int = 180) -> str:
    """``Type: first line of the message``, shortened, safe in a markdown cell (a vocabulary
    error's reason stops before its list of known ops)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, GHNVocabularyError):
        text = text.split("; ")[0]
    msg = f"{type(exc).__name__}: {text}"
    msg = msg if len(msg) <= limit else msg[: limit - 3] + "..."
    return msg.replace("|", "\\|")


# -- benchmarks --------------------------------------------------------------------------------
@dataclass
class Row:
    """One architecture's measurements (strings ready for the table where noted)."""

    name: str
    k: int
    params: int
    build: Timing
    nodes: int
    edges: int
    est_peak: int
    graph_bytes: int
    param_bytes: int
    roundtrip: float
    ghn: str


def ghn_cell(ghn: GHN, model: nn.Module, n_tensors: int, repeats: int) -> str:
    """``time; predicted / kept`` of ``ghn.predict(model)``, or the reason it raises."""

    def count(params: dict[str, Tensor], t: Timing) -> str:
        return f"{t.cell()}; {len(params)} / {n_tensors - len(params)}"

    with torch.no_grad():
        try:
            params, t = timed(lambda: ghn.predict(model), repeats)
            return count(params, t)
        except GHNVocabularyError as exc:
            reason = one_line(exc)
            try:
                params, t = timed(lambda: ghn.predict(model, fallback_init=True), repeats)
            except Exception as exc2:  # noqa: BLE001 - report whatever the fallback raises
                return f"{reason}; fallback_init: {one_line(exc2)}"
            return f"{reason}; fallback_init: {count(params, t)}"
        except Exception as exc:  # noqa: BLE001 - report any failure in the cell, keep going
            return one_line(exc)


def bench_arch(name: str, ghn: GHN, repeats: int) -> tuple[Row, ParamGraph]:
    """Measure one architecture of :data:`ARCHS`; returns its row and its graph."""
    factory, shape, k = ARCHS[name]
    torch.manual_seed(0)
    model = _randomize(factory(), 0)
    x = _example(shape)
    n_params, p_bytes, n_tensors = param_stats(model)
    with torch.no_grad():  # the recorded trace from_module makes (HF models need it)
        est = estimate_graph_memory(model, k, traced=_record_or_raise(model, x))
    g, build = timed(lambda: from_module(model, x, max_kernel_size=k), repeats)
    torch.manual_seed(123)
    fresh = _randomize(factory(), 7)
    with torch.no_grad():
        ref = _logits(model(x))
        if torch.equal(_logits(fresh(x)), ref):
            raise RuntimeError(f"{name}: the fresh copy already computes the same outputs")
        g.load_into(fresh)
        err = float((_logits(fresh(x)) - ref).abs().max())
    row = Row(name, k, n_params, build, g.num_nodes, g.num_edges, est.peak_bytes,
              graph_bytes(g), p_bytes, err, ghn_cell(ghn, model, n_tensors, repeats))  # fmt: skip
    return row, g


def bench_gmn(g: ParamGraph, hidden: int, layers: int, repeats: int) -> dict[str, Any]:
    """Forward (``no_grad``) and forward + backward of a GMN on ``g``: median seconds and peak
    RSS delta of each, and the GMN's parameter count."""
    torch.manual_seed(0)
    model = GMN(edge_in_dim=g.edge_attr.size(1), hidden=hidden, num_layers=layers)
    model.calibrate(g)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = model(g).pow(2).mean()
        loss.backward()
        return loss.item()

    def forward() -> None:
        with torch.no_grad():
            model(g)

    _, fwd = timed(forward, repeats)
    _, step_t = timed(step, repeats)
    n = sum(p.numel() for p in model.parameters())
    return {"step": step_t, "forward": fwd, "gmn_params": n}


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, run the benchmarks, print the command, machine line and tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [*ARCHS, GMN_NAME]
    parser.add_argument(
        "--only", default=None, help=f"comma-separated subset of {','.join(names)} (default: all)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--allocator",
        choices=("system", "keep"),
        default="system",
        help="system: glibc defaults (large tensors are fresh mmaps, page-faulted on first "
        "touch); keep: glibc keeps freed memory (faster, but RSS deltas then miss reused memory)",
    )
    parser.add_argument("--gmn-hidden", type=int, default=16, help="GMN hidden width")
    parser.add_argument("--gmn-layers", type=int, default=2, help="GMN message-passing layers")
    args = parser.parse_args(argv)
    chosen = names if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        parser.error(f"unknown --only names {unknown}; choose from {names}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    allocator = "keep" if args.allocator == "keep" and keep_freed_memory() else "system"
    logging.getLogger("metanet.hyper.ghn").setLevel(logging.ERROR)  # fallback notes
    logging.getLogger("transformers").setLevel(logging.ERROR)  # tiny-config notes
    warnings.filterwarnings("ignore", module="transformers")
    cli = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: python scripts/bench_archs.py {cli}".rstrip())

    torch.manual_seed(0)
    ghn = GHN(hidden=32, layers=2).eval()
    from_module(digits_cnn(), torch.zeros(1, 1, 8, 8))  # warm-up (first fx trace), not timed
    rows, graphs = [], {}
    t_start = time.perf_counter()
    for name in chosen:
        if name == GMN_NAME:
            continue
        row, g = bench_arch(name, ghn, args.repeats)
        rows.append(row)
        if name == "resnet18":
            graphs[name] = g
        del g
    gmn = None
    if GMN_NAME in chosen:
        g = graphs.get("resnet18")
        if g is None:
            torch.manual_seed(0)
            factory, shape, k = ARCHS["resnet18"]
            g = from_module(_randomize(factory(), 0), _example(shape), max_kernel_size=k)
        gmn = bench_gmn(g, args.gmn_hidden, args.gmn_layers, args.repeats)
        gmn.update(nodes=g.num_nodes, edges=g.num_edges, k=g.edge_attr.size(1))
    total = time.perf_counter() - t_start

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    try:
        import transformers

        tf = f" transformers={transformers.__version__}"
    except ImportError:
        tf = ""
    print(f"machine: {platform.machine()} cpus={os.cpu_count()} torch={torch.__version__}{tf} "
          f"threads={args.threads} repeats={args.repeats} allocator={allocator} "
          f"load1={load:.1f} git={git_state()} "
          f"total={total:.0f}s")  # fmt: skip
    print()
    if rows:
        print("| arch | K | parameters | build, median wall (CPU) | nodes | edges | "
              "build peak RSS delta | estimated peak | graph bytes / param bytes | "
              "round-trip max abs error | "
              "GHN predict, median wall (CPU); predicted / kept tensors |")  # fmt: skip
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in rows:
            print(
                f"| {r.name} | {r.k} | {r.params:,} | {r.build.cell()} | {r.nodes:,} | "
                f"{r.edges:,} | {fmt_bytes(r.build.peak)} | {fmt_bytes(r.est_peak)} | "
                f"{fmt_bytes(r.graph_bytes)} / {fmt_bytes(r.param_bytes)} "
                f"({r.graph_bytes / r.param_bytes:.1f}x) | {r.roundtrip:.1e} | {r.ghn} |"
            )
    if gmn is not None:
        print()
        print("GMN forward+backward on a ResNet-18-sized graph")
        print()
        print(
            "| graph | GMN | forward+backward, median wall (CPU) | peak RSS delta | "
            "forward only, no_grad, median wall (CPU) | peak RSS delta |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        print(f"| resnet18: {gmn['nodes']:,} nodes, {gmn['edges']:,} edges x {gmn['k']} | "
              f"hidden={args.gmn_hidden}, layers={args.gmn_layers}, "
              f"{gmn['gmn_params']:,} params | {gmn['step'].cell()} | "
              f"{fmt_bytes(gmn['step'].peak)} | {gmn['forward'].cell()} | "
              f"{fmt_bytes(gmn['forward'].peak)} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
