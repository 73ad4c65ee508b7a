"""One training step and one evaluation pass of the zoo builder's engines, side by side.

For the ReLU MLP and CNN of the digits recipes: the time of one training step (forward, loss,
backward of ``--nets`` networks x ``--batch`` samples, dropout on) with the batched PyTorch ops of
:mod:`metanet.zoo.batched` and with the fused C kernels of :mod:`metanet.zoo.native`, and of
evaluating the networks on all 1797 digits; ``--compile`` adds ``torch.compile`` of the PyTorch
step (inductor, dynamic shapes; its compile time is printed).

    python scripts/bench_zoo_step.py [--nets 30] [--batch 64] [--compile]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable

import torch

from metanet.zoo.batched import BatchedNet
from metanet.zoo.native import NativeChain, library
from metanet.zoo.recipe import Recipe
from metanet.zoo.schedule import dropout_keys


def _ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def bench_arch(path: str, nets: int, batch: int, reps: int, compile_step: bool) -> str:
    """One markdown row for the (dropout) architecture of the recipe ``path``."""
    recipe = Recipe.load(path)
    arch = {**recipe.architectures[0], "dropout": True}
    net = BatchedNet(arch)
    chain = NativeChain(net)
    flat = torch.randn(nets, net.dim) * 0.3
    shape = (64,) if not net.conv else (1, 8, 8)
    raw = torch.randn(nets * batch, *shape)
    x = net.prepare(raw)
    x = x.view(nets, batch, *x.shape[1:])
    x_raw = raw.view(nets, batch, -1)
    y = torch.randint(0, 10, (nets, batch))
    w = torch.full((nets, batch), 1.0 / batch)
    rate = torch.rand(nets) * 0.5
    keys = dropout_keys(1, torch.arange(nets), torch.zeros(nets, dtype=torch.long))
    drop = (rate, keys)  # the masks every engine draws (metanet.zoo.schedule)
    digits = torch.randn(1797, *shape)
    views = net.views(flat, False)
    step_t = _ms(lambda: net.ce_grad(flat, x, y, w, drop), reps)
    step_c = _ms(lambda: chain.ce_grad(flat, x_raw, y, w, rate, keys), reps)
    eval_t = _ms(lambda: net.forward_eval(views, digits), 3)
    eval_c = _ms(lambda: chain.forward(flat, digits), 3)
    row = (f"| {arch['type']} ({recipe.name}) | {step_t:.2f} | {step_c:.2f} | "
           f"{step_t / step_c:.1f}x | {eval_t:.1f} | {eval_c:.1f} | "
           f"{eval_t / eval_c:.1f}x |")  # fmt: skip
    if compile_step:
        t0 = time.perf_counter()
        compiled = torch.compile(net.ce_grad, dynamic=True)
        compiled(flat, x, y, w, drop)
        compile_s = time.perf_counter() - t0
        step_i = _ms(lambda: compiled(flat, x, y, w, drop), reps)
        row += f" {step_i:.2f} | {compile_s:.0f} |"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also torch.compile the step")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if library() is None:
        raise SystemExit("the native kernels are unavailable (no C compiler?)")
    cli = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: python scripts/bench_zoo_step.py {cli}")
    print(f"machine: {platform.machine()} torch={torch.__version__} threads=1")
    print()
    extra = " step: torch.compile (ms) | compile time (s) |" if args.compile else ""
    print("| arch (recipe) | step: PyTorch ops (ms) | step: C kernels (ms) | ratio | "
          "eval 1797 digits: PyTorch ops (ms) | eval: C kernels (ms) | ratio |" + extra)
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * (2 * args.compile))
    torch.manual_seed(0)
    for path in ("datasets/digits-mlp.yaml", "datasets/digits-cnn.yaml"):
        print(bench_arch(path, args.nets, args.batch, args.reps, args.compile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
