"""Reading zoo batches: from the HDF5 file every batch, against held in memory once read.

For the WeightSpace and the ParamGraph DataModules on one zoo (default: digits-cnn-10k): the
time of ``setup`` plus the first training batch (with ``in_memory=True`` that includes reading
every record once) and the mean time of the next ``--batches`` shuffled training batches, with
``in_memory=False`` and ``True``; the batches of both are checked to be identical. With
``--steps N``, also N batch reads plus AdamW training steps of NFN-HNP (WeightSpace) and GMN
(graphs) per read mode, the two modes in turns so that the machine's load hits them alike.

    python scripts/bench_data_loading.py [--zoo .cache/zoos/digits-cnn-10k.h5] [--batches 100]
                                         [--group NAME] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from metanet.data.datamodules import ParamGraphDataModule, WeightSpaceDataModule  # noqa: E402


def _same(a, b) -> bool:
    (xa, ya), (xb, yb) = a, b
    if hasattr(xa, "edge_attr"):  # PyG batches of ParamGraphs
        same = torch.equal(xa.x, xb.x) and torch.equal(xa.edge_attr, xb.edge_attr)
    else:  # WeightSpace batches
        same = xa.max_abs_diff(xb) == 0.0
    return same and torch.equal(ya, yb)


def _datamodule(cls, zoo: str, in_memory: bool, batch_size: int, group: str | None):
    """A DataModule ``cls`` over group ``group`` of ``zoo`` (default: its only one), split as
    the generalization benchmark splits it."""
    where = {"group" if cls is WeightSpaceDataModule else "groups": group}
    return cls(zoo, batch_size=batch_size, splits=(0.7, 0.1, 0.2), seed=0, in_memory=in_memory,
               **where)  # fmt: skip


def time_module(cls, zoo: str, in_memory: bool, batches: int, batch_size: int,
                group: str | None = None):  # fmt: skip
    """``(setup + first batch s, ms per later batch, the batches read)`` of group ``group``
    (default: the zoo's only one)."""
    dm = _datamodule(cls, zoo, in_memory, batch_size, group)
    torch.manual_seed(0)
    start = time.perf_counter()
    dm.setup()
    it = iter(dm.train_dataloader())
    read = [next(it)]
    first = time.perf_counter() - start
    start = time.perf_counter()
    read += [next(it) for _ in range(batches)]
    return first, (time.perf_counter() - start) / batches * 1e3, read


def _model_for(dm):
    """The model whose training step ``--step`` times: NFN-HNP on WeightSpace batches, GMN on
    graph batches (the sizes of ``configs/predict_gen/{nfn_hnp,gmn}.yaml``)."""
    if isinstance(dm, ParamGraphDataModule):
        from metanet.nn.gmn import GMN

        model = GMN(hidden=32, num_layers=3)
        model.set_data_statistics(dm.graph_stats)
        return "GMN", model
    from metanet.nn.nfn import NFN

    spec = dm.zoo[dm.group_names[0]].spec
    return "NFN-HNP", NFN(spec=spec, mode="HNP", hidden=8, num_layers=2, head_hidden=64)


def time_steps(cls, zoo: str, batches: int, batch_size: int, group: str | None = None):
    """``(model name, {in_memory: ms per batch read + AdamW training step})``, both read modes
    timed in turns on the same model so that the machine's load hits them alike."""
    loaders = {}
    for in_memory in (False, True):
        dm = _datamodule(cls, zoo, in_memory, batch_size, group)
        dm.setup()
        loaders[in_memory] = iter(dm.train_dataloader())
    name, model = _model_for(dm)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)

    def step(x, y) -> None:
        opt.zero_grad()
        ((model(x).squeeze(-1) - y) ** 2).mean().backward()
        opt.step()

    for it in loaders.values():  # warm-up: first batch, statistics, allocations
        step(*next(it))
    spent = {False: 0.0, True: 0.0}
    for _ in range(batches):
        for in_memory, it in loaders.items():
            start = time.perf_counter()
            step(*next(it))
            spent[in_memory] += time.perf_counter() - start
    return name, {k: v / batches * 1e3 for k, v in spent.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default=os.path.join(ROOT, ".cache", "zoos", "digits-cnn-10k.h5"))
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--group", default=None, help="architecture group (zoos with several)")
    parser.add_argument("--steps", type=int, default=0,
                        help="also time this many batch reads + training steps of a model "
                        "(NFN-HNP, GMN) per read mode")  # fmt: skip
    args = parser.parse_args(argv)
    if not os.path.exists(args.zoo):
        parser.error(f"--zoo {args.zoo} does not exist (metanet zoo build datasets/...yaml)")
    torch.set_num_threads(1)
    print(f"zoo {os.path.basename(args.zoo)}, batch {args.batch_size}, {args.batches} batches, "
          f"torch 1 thread, {platform.processor() or platform.machine()}")  # fmt: skip
    print("\n| DataModule | from the file: ms / batch | in memory: ms / batch | speed-up | "
          "in memory: setup + first batch (s) | batches identical |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for cls in (WeightSpaceDataModule, ParamGraphDataModule):
        timed = [time_module(cls, args.zoo, in_memory, args.batches, args.batch_size, args.group)
                 for in_memory in (False, True)]  # fmt: skip
        (_, file_ms, file_b), (first, mem_ms, mem_b) = timed
        same = all(_same(a, b) for a, b in zip(file_b, mem_b))
        print(f"| {cls.__name__} | {file_ms:.1f} | {mem_ms:.1f} | {file_ms / mem_ms:.1f}x | "
              f"{first:.1f} | {same} |")  # fmt: skip
    if args.steps:
        print("\n| DataModule | model | from the file: ms / step | in memory: ms / step | "
              "speed-up |")
        print("| --- | --- | ---: | ---: | ---: |")
        for cls in (WeightSpaceDataModule, ParamGraphDataModule):
            name, ms = time_steps(cls, args.zoo, args.steps, args.batch_size, args.group)
            print(f"| {cls.__name__} | {name} | {ms[False]:.1f} | {ms[True]:.1f} | "
                  f"{ms[False] / ms[True]:.2f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
