"""Does ``torch.compile`` pay for the zoo builder's reference (vmap) engine on the digits recipes?

For each recipe (default: the digits MLP and CNN, dropout on as the recipes sample it), the
largest chunk of the recipe's first ``--nets`` networks (``make_chunks``: one batch size per
chunk) is set up as the vmap engine sets it up (:func:`metanet.zoo.train.vmap_step`, stacked
parameters, per-network dropout masks), and this script times:

* one gradient step (``vmap(grad_and_value(loss))`` of all the chunk's networks on one batch
  each), eager and under ``torch.compile`` (inductor, ``dynamic=True`` since networks leave the
  batch as they finish); the first compiled call's time is the compile time, and one more call
  with one network fewer shows whether a smaller batch recompiles;
* the whole chunk (``train_chunk(engine="vmap")``: every step, snapshots, evaluation), eager and
  with the step compiled (a fresh compile, as every chunk of a build would pay one), unless
  ``--no-chunk``.

``break-even steps`` = compile time / (eager - compiled step time): the steps a chunk must run
before compiling pays (inf where the compiled step is not faster). One torch thread.

    python scripts/bench_zoo_compile.py [--recipe datasets/digits-mlp.yaml ...] [--nets 200]
                                        [--reps 20] [--no-chunk]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from metanet.zoo import train
from metanet.zoo.architectures import SampledDropout, build_module
from metanet.zoo.build import make_chunks
from metanet.zoo.data import recipe_task
from metanet.zoo.recipe import Recipe
from metanet.zoo.schedule import dropout_keys, dropout_multipliers, hparam_column, init_networks


def _ms(fn: Callable[[], Any], reps: int) -> float:
    """Median wall time of ``fn`` in ms over ``reps`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _step_inputs(arch: dict, plans: list, data: Any, seed: int = 0) -> tuple[Any, ...]:
    """What one vmap step of ``plans`` consumes: stacked params and buffers (dropout rates and
    this step's masks), a batch ``[M, B, ...]`` of each network's own samples, targets and
    loss weights: the vmap engine's layout at its first step."""
    template = build_module(arch)
    modules = init_networks(arch, plans)
    params = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in modules])
              for k, _ in template.named_parameters()}  # fmt: skip
    buffers = {k: torch.stack([dict(m.named_buffers())[k].detach() for m in modules]).clone()
               for k, _ in template.named_buffers()}  # fmt: skip
    m = len(plans)
    b = int(min(int(p.hparams.get("batch_size", 10**9)) for p in plans))
    b = min(b, int(data.subset.sum(1).min()))
    gen = torch.Generator().manual_seed(seed)
    keys = torch.rand(m, data.x_train.shape[0], generator=gen).masked_fill(~data.subset, 2.0)
    idx = keys.argsort(1)[:, :b]
    x, y = data.x_train[idx], data.y_train.gather(1, idx)
    w = torch.full((m, b), 1.0 / b)
    drop_keys = [k for k, mod in template.named_modules() if isinstance(mod, SampledDropout)]
    rate = hparam_column(plans, "dropout", 0.0)
    if drop_keys and bool((rate > 0).any()):
        layout = train._dropout_layout(arch, template, drop_keys, data.x_train[:1])
        step_keys = dropout_keys(seed, torch.arange(m), torch.zeros(m, dtype=torch.long))
        for k, op, shape in layout:
            buffers[f"{k}.p"] = rate.clone()
            mult = dropout_multipliers(step_keys, rate, op, b, math.prod(shape))
            buffers[f"{k}.mult"] = mult.view(m, b, *shape)
    template.train()
    return template, params, buffers, x, y, w


def _fewer(params: dict, buffers: dict, x, y, w) -> tuple[Any, ...]:
    """The same step inputs with the last network gone (a network finished)."""
    return ({k: v[:-1] for k, v in params.items()}, {k: v[:-1] for k, v in buffers.items()},
            x[:-1], y[:-1], w[:-1])  # fmt: skip


def bench(path: str, nets: int, reps: int, chunk: bool) -> str:
    """One markdown row for the largest chunk of the recipe ``path``."""
    recipe = Recipe.load(path)
    arch = recipe.architectures[0]
    plans = recipe.plan(nets)
    chunks = make_chunks(recipe, plans)
    big = max(chunks, key=lambda c: len(c.plans))
    cplans = list(big.plans)
    task = recipe_task(recipe.data)
    data = train.classifier_data(cplans, flat=arch["type"] == "mlp", task=task)
    template, params, buffers, x, y, w = _step_inputs(arch, cplans, data)
    eager = train.vmap_step(template)
    eager_ms = _ms(lambda: eager(params, buffers, x, y, w), reps)

    torch._dynamo.reset()
    compiled = torch.compile(train.vmap_step(template), dynamic=True)
    t0 = time.perf_counter()
    compiled(params, buffers, x, y, w)
    compile_s = time.perf_counter() - t0
    comp_ms = _ms(lambda: compiled(params, buffers, x, y, w), reps)
    small = _fewer(params, buffers, x, y, w)
    t0 = time.perf_counter()
    compiled(*small)
    recompile_s = time.perf_counter() - t0
    g_e, l_e = eager(params, buffers, x, y, w)
    g_c, l_c = compiled(params, buffers, x, y, w)
    err = max(float((g_e[k] - g_c[k]).abs().max()) for k in g_e)
    gain = eager_ms - comp_ms
    breakeven = compile_s * 1e3 / gain if gain > 0 else math.inf

    _, spe, epochs, _ = train.step_schedule(cplans, data.subset.sum(1), data.x_train.shape[0],
                                            recipe.keep_fractions)  # fmt: skip
    steps = int((epochs * spe).max())  # the chunk's steps (its longest network)
    row = (f"| {arch['type']} ({recipe.name}) | {len(cplans)} x {x.shape[1]} | {steps} | "
           f"{eager_ms:.2f} | {comp_ms:.2f} | {eager_ms / comp_ms:.2f}x | {compile_s:.1f} | "
           f"{recompile_s:.2f} | {breakeven:.0f} | {err:.1e} |")  # fmt: skip
    if chunk:
        kwargs = dict(keep_fractions=recipe.keep_fractions, engine="vmap", generator_seed=1)
        t0 = time.perf_counter()
        train.train_chunk(arch, cplans, data, **kwargs)
        chunk_eager = time.perf_counter() - t0
        real = train.vmap_step
        torch._dynamo.reset()
        train.vmap_step = lambda t, r=False: torch.compile(real(t, r), dynamic=True)
        try:
            t0 = time.perf_counter()
            train.train_chunk(arch, cplans, data, **kwargs)
            chunk_comp = time.perf_counter() - t0
        finally:
            train.vmap_step = real
        row += f" {chunk_eager:.1f} | {chunk_comp:.1f} |"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", default=None,
                        help="recipe (repeatable; default digits-mlp and digits-cnn)")
    parser.add_argument("--nets", type=int, default=200, help="the recipe's first networks")
    parser.add_argument("--reps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--no-chunk", action="store_true", help="skip the whole-chunk timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cli = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: python scripts/bench_zoo_compile.py {cli}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.machine()} cpus={os.cpu_count()} torch={torch.__version__} "
          f"threads=1 load1={load:.1f}")  # fmt: skip
    print()
    extra = " chunk eager (s) | chunk compiled (s) |" if not args.no_chunk else ""
    print("| arch (recipe) | chunk nets x batch | steps | eager step (ms) | compiled step (ms) | "
          "step ratio | compile (s) | one net fewer (s) | break-even steps | max grad diff |"
          + extra)  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
          + " ---: |" * (2 * (not args.no_chunk)))  # fmt: skip
    recipes = args.recipe or ["datasets/digits-mlp.yaml", "datasets/digits-cnn.yaml"]
    for path in recipes:
        print(bench(path, args.nets, args.reps, not args.no_chunk), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
