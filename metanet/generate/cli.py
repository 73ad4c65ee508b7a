"""``metanet generate``: sample networks from a trained weight generator.

    metanet generate --generator RUN.ckpt --n 100 [--condition NAME ...] -o OUT/

writes ``OUT/net_0000.pt`` ... (ordinary ``state_dict`` files of ``build_module(arch)``; the arch
dict is written to ``OUT/arch.json``) and, when the target task is a digits classifier,
``OUT/generated.csv`` with each network's test accuracy (on its condition's own classes when the
condition is a task of class subsets, and on every task's classes as ``acc_<task>`` columns).

Bad input (a condition the generator was not trained with, a checkpoint of another task or of
another architecture than ``--arch``, ``n <= 0``) prints ``error: ...`` and exits with 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Sequence

import torch

__all__ = ["main"]


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # no SystemExit: main() reports and returns 2
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="metanet generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--generator", required=True, help="generator checkpoint (metanet fit)")
    p.add_argument("--n", type=int, required=True, help="number of networks to write")
    p.add_argument(
        "--condition",
        action="append",
        default=None,
        help="condition name (repeat to cycle over several; default: every condition in turn)",
    )
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: generator's)")
    p.add_argument("--sampler", default=None, help="euler|heun (flow), ddpm|ddim (diffusion)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance weight")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="scale of the sampler's noise (default: generator's, usually 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument(
        "--arch",
        default=None,
        help="JSON arch dict the networks must fit (checked against the generator)",
    )
    p.add_argument("--no-eval", action="store_true", help="do not evaluate the networks")
    return p


def _check_arch(requested: str, arch: dict) -> None:
    from metanet.zoo.architectures import arch_name

    try:
        want = json.loads(requested)
    except ValueError as err:
        raise _UsageError(f"--arch is not valid JSON ({err})") from None
    try:
        same = arch_name(want) == arch_name(arch)
    except Exception as err:  # noqa: BLE001 - any invalid arch dict is a usage error
        raise _UsageError(f"--arch is not a valid arch dict ({err})") from None
    if not same:
        raise _UsageError(
            f"the generator writes '{arch_name(arch)}' networks, not '{arch_name(want)}'"
        )


def run(args: argparse.Namespace) -> str:
    """Sample, write and evaluate; returns a one-line summary."""
    from metanet.generate.evaluate import digits_accuracy, digits_available, load_test_split
    from metanet.tasks.generation import load_generator
    from metanet.zoo.architectures import build_module

    if args.n <= 0:
        raise _UsageError(f"--n must be a positive integer, got {args.n}")
    if args.steps is not None and args.steps <= 0:
        raise _UsageError(f"--steps must be a positive integer, got {args.steps}")
    gen = load_generator(args.generator)
    info = gen.info
    if args.arch is not None:
        _check_arch(args.arch, info["arch"])
    start = time.perf_counter()
    ws, names = gen.sample(
        args.n,
        args.condition,
        steps=args.steps,
        method=args.sampler,
        guidance=args.guidance,
        seed=args.seed,
        temperature=args.temperature,
    )
    elapsed = time.perf_counter() - start
    os.makedirs(args.output, exist_ok=True)
    module = build_module(info["arch"])
    files = []
    for i in range(len(ws)):
        ws.load_into(module, i)
        name = f"net_{i:04d}.pt"
        torch.save(
            {k: v.detach().clone() for k, v in module.state_dict().items()},
            os.path.join(args.output, name),
        )
        files.append(name)
    with open(os.path.join(args.output, "arch.json"), "w") as fh:
        json.dump(info["arch"], fh)
    summary = f"wrote {len(ws)} networks to {args.output} ({len(ws) / elapsed:.1f} networks/s)"
    if args.no_eval or not digits_available(info):
        return summary
    x, y = load_test_split(info)
    tasks = info.get("task_classes") or {}
    acc_all = digits_accuracy(ws, info["arch"], x, y)
    per_task = {t: digits_accuracy(ws, info["arch"], x, y, cls) for t, cls in tasks.items()}
    own = [
        float(per_task[c][i]) if c in per_task else float(acc_all[i]) for i, c in enumerate(names)
    ]
    with open(os.path.join(args.output, "generated.csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "file",
                "condition",
                "test_acc",
                "test_acc_all_classes",
                *[f"acc_{t}" for t in per_task],
            ]
        )
        for i, f in enumerate(files):
            writer.writerow(
                [
                    f,
                    names[i] or "",
                    f"{own[i]:.4f}",
                    f"{float(acc_all[i]):.4f}",
                    *[f"{float(a[i]):.4f}" for a in per_task.values()],
                ]
            )
    med = sorted(own)[len(own) // 2]
    return f"{summary}; test_acc best {max(own):.4f} median {med:.4f} (generated.csv)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``metanet generate``; returns the exit code."""
    from metanet.tasks.generation import GenerationError
    from metanet.weightspace import WeightSpaceError

    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return 0
    try:
        args = parser.parse_args(argv)
        print(run(args))
    except (_UsageError, GenerationError, WeightSpaceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
