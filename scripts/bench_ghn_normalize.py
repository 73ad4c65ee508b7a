"""Zero-shot accuracy of GHN predictions under each normalisation, over GHN training seeds.

For each normalisation of predicted parameters (``fan_in``: GHN-2's; ``scaled``: the
scale-aware one of transformer families) and decoder, a GHN is trained as in
``scripts/bench_ghn.py`` (same family, steps, batch and optimizer) once per GHN training seed,
then its predictions are scored with no training: mean test accuracy of 8 unseen samples of
the training family, and the test accuracy of every held-out architecture of the family
(wider / deeper MLPs and residual CNNs with BatchNorm / GroupNorm). The bundled digits; norm
layers use batch statistics, as in GHN training. Prints one table: mean ± std over seeds.

    OMP_NUM_THREADS=1 python scripts/bench_ghn_normalize.py [--seeds 0 1 2] [--steps 800]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ghn import DECODERS, accuracy, ms, predicted_module, train_ghn  # noqa: E402

from metanet.data.digits import load_digits  # noqa: E402
from metanet.hyper.family import ArchFamily  # noqa: E402
from metanet.zoo.architectures import arch_name  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800, help="GHN training steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="GHN training seeds")
    ap.add_argument("--normalize", nargs="+", default=["fan_in", "scaled"])
    ap.add_argument("--decoders", nargs="+", default=list(DECODERS), choices=list(DECODERS))
    ap.add_argument("--recipe", default="datasets/ghn-digits-family.yaml")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    d = load_digits()
    family = ArchFamily.from_yaml(args.recipe)
    fam_archs = [family.sample(random.Random(123)) for _ in range(8)]
    columns = ["in-family (8 unseen)"] + [arch_name(a) for a in family.held_out]
    t_all = time.perf_counter()
    rows = []
    for dec in args.decoders:
        for norm in args.normalize:
            cells: list[list[float]] = [[] for _ in columns]
            secs = []
            for seed in args.seeds:
                t0 = time.perf_counter()
                task = train_ghn(dec, family, d, args.steps, seed=seed, normalize=norm)
                secs.append(time.perf_counter() - t0)
                fam = [accuracy(predicted_module(task, a), a, d.x_test, d.y_test)
                       for a in fam_archs]  # fmt: skip
                cells[0].append(statistics.mean(fam))
                for j, arch in enumerate(family.held_out, start=1):
                    cells[j].append(accuracy(predicted_module(task, arch), arch, d.x_test,
                                             d.y_test))  # fmt: skip
            rows.append((dec, norm, cells, statistics.mean(secs)))
    print(f"\nGHN zero-shot test accuracy by normalisation: {args.steps} training steps per GHN, "
          f"GHN training seeds {args.seeds} (mean ± std); digits test split "
          f"({len(d.y_test)} images); torch {torch.__version__}, 1 thread\n")  # fmt: skip
    print("| decoder | normalize | " + " | ".join(columns) + " | train s / GHN |")
    print("| --- | --- | " + " | ".join("---" for _ in columns) + " | --- |")
    for dec, norm, cells, sec in rows:
        print(f"| {dec} | {norm} | " + " | ".join(ms(c) for c in cells) + f" | {sec:.0f} |")
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; command: python "
          f"scripts/bench_ghn_normalize.py {' '.join(sys.argv[1:])}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
