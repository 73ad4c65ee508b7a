"""``metanet zoo``: build model zoos from recipes and summarize zoo files.

    metanet zoo build RECIPE.yaml [-o OUT.h5] [--devices N --num_nodes M] [--limit K]
                                  [--overwrite] [--accelerator cpu|cuda|auto] [--threads T]
                                  [--engine auto|batched|vmap] [--workers W] [--no-progress]
    metanet zoo info ZOO.h5       # groups, records, test-accuracy quantiles and histogram

``build`` resumes an interrupted build of the same recipe (run the same command again).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metanet zoo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or resume building) a zoo from a YAML recipe")
    b.add_argument("recipe", help="recipe YAML file (see datasets/)")
    b.add_argument("-o", "--output", default=None, help="zoo file (default .cache/zoos/NAME.h5)")
    b.add_argument("--devices", type=int, default=1, help="Fabric ranks per node (default 1)")
    b.add_argument("--num_nodes", "--num-nodes", type=int, default=1, help="nodes (default 1)")
    b.add_argument("--limit", type=int, default=None, help="build only the first K networks")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an existing output built from another recipe")  # fmt: skip
    b.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda", "gpu", "auto"])
    b.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per rank (default: torch's; 1 is best on a busy box)",
    )
    b.add_argument("--engine", default="auto", choices=["auto", "batched", "vmap"],
                   help="training engine: hand-batched matmuls where the arch allows (auto), "
                        "or torch.func vmap for every arch")  # fmt: skip
    b.add_argument("--workers", type=int, default=1,
                   help="worker processes training chunks side by side on this machine's CPU "
                        "cores (default 1; results are identical)")  # fmt: skip
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="summarize a zoo file")
    i.add_argument("zoo", help="zoo HDF5 file")
    i.add_argument("--metric", default="test_acc", help="metric to summarize (default test_acc)")
    return parser


def summarize(path: str, metric: str = "test_acc") -> str:
    """Text summary of a zoo: per group the records, runs and quantiles/histogram of ``metric``
    (over all records and over each run's final checkpoint)."""
    from metanet.data.zoo_store import Zoo

    lines = []
    with Zoo.open(path) as zoo:
        attrs = zoo.attrs
        lines.append(f"{path}: zoo '{attrs.get('name', '?')}' ({attrs.get('kind', '?')}), "
                     f"{len(zoo)} records in {len(zoo.architectures)} architecture(s)")  # fmt: skip
        for g in zoo:
            m = g.metrics
            if metric not in m:
                lines.append(f"  {g.name}: no metric '{metric}'")
                continue
            vals = np.asarray(m[metric], dtype=float)
            final = vals[m["final"] == 1] if "final" in m else vals
            runs = len(np.unique(m["run_id"]))
            lines.append(f"  {g.name}: {len(g)} records, {runs} runs")
            for label, v in (("all records", vals), ("final checkpoints", final)):
                if v.size == 0:
                    continue
                q = np.quantile(v, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
                lines.append(f"    {metric} {label}: min {q[0]:.3f}  q10 {q[1]:.3f}  "
                             f"q25 {q[2]:.3f}  median {q[3]:.3f}  q75 {q[4]:.3f}  "
                             f"q90 {q[5]:.3f}  max {q[6]:.3f}")  # fmt: skip
            if "acc" in metric:
                hist, edges = np.histogram(vals, bins=10, range=(0.0, 1.0))
                bins = "  ".join(
                    f"[{edges[k]:.1f},{edges[k + 1]:.1f}):{hist[k]}" for k in range(10)
                )
                lines.append("    histogram (all records): " + bins)
            if "diverged" in m:
                bad = len(np.unique(m["run_id"][m["diverged"] == 1]))
                lines.append(f"    diverged runs: {bad}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``metanet zoo ...``; returns an exit code."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "info":
        from metanet.limits import MemoryLimitError

        try:
            print(summarize(args.zoo, args.metric))
        except (OSError, ValueError, KeyError, MemoryLimitError) as err:
            print(f"metanet zoo info: error: {err}", file=sys.stderr)
            return 2
        return 0
    from metanet.limits import MemoryLimitError
    from metanet.zoo.architectures import ArchError
    from metanet.zoo.build import build_zoo
    from metanet.zoo.recipe import RecipeError

    try:
        out = build_zoo(
            args.recipe,
            output=args.output,
            limit=args.limit,
            devices=args.devices,
            num_nodes=args.num_nodes,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            accelerator="cuda" if args.accelerator == "gpu" else args.accelerator,
            threads=args.threads,
            engine=args.engine,
            workers=args.workers,
        )
    except (RecipeError, ArchError, OSError, ValueError, MemoryLimitError) as err:
        print(f"metanet zoo build: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metanet zoo build: interrupted; finished chunks are kept, run the same command "
              "to resume", file=sys.stderr)  # fmt: skip
        return 130
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
