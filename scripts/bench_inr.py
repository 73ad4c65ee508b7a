"""Benchmark: INR classification on ``digits-siren`` — which digit does a SIREN draw, from its
weights alone? Test accuracy (mean ± std over seeds) for every metanetwork, plus StatNN
statistics with gradient-boosted trees as a baseline.

Each metanetwork is trained from ``configs/inr/<model>.yaml`` (the file ``metanet fit`` uses) with
``--trainer.max_epochs`` set here; the checkpoint with the best validation accuracy is tested.
Splits are random over SIRENs (one SIREN per image), seeded per repetition.

    python scripts/bench_inr.py            # 3 seeds
    python scripts/bench_inr.py --quick    # 1 seed, 1 epoch
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scripts.bench_generalization import (  # noqa: E402
    CNN_MODELS,
    LABELS,
    SPLITS,
    ensure_zoo,
    fit_and_test,
)

MODELS = CNN_MODELS  # every metanetwork applies to the one SIREN architecture


def statnn_gbt(zoo_path: str, seed: int) -> dict[str, Any]:
    """Per-layer statistics + gradient-boosted trees on the same split as the metanetworks."""
    from metanet.data.datamodules import WeightSpaceDataModule
    from metanet.tasks.statnn import fit_gbt_classifier, statnn_features

    splits = tuple(float(s) for s in SPLITS.strip("[]").split(","))
    dm = WeightSpaceDataModule(zoo_path, target="label", splits=splits, seed=seed)
    dm.setup()
    group = dm.zoo[dm.group]
    start = time.time()

    def data(split: str) -> tuple[np.ndarray, np.ndarray]:
        _, rid = dm.splits[split]
        return statnn_features(group.weight_space(rid)), dm.targets[split].numpy()

    x_tr, y_tr = data("train")
    x_va, y_va = data("val")
    x_te, y_te = data("test")
    model = fit_gbt_classifier(np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va]), seed)
    acc = float((model.predict(x_te) == y_te).mean())
    return {"acc": acc, "seconds": time.time() - start}


def fit_config(config: str, zoo_path: str, seed: int, epochs: int, run_dir: str) -> dict[str, Any]:
    result, seconds, _ = fit_and_test(config, zoo_path, seed, epochs, run_dir)
    return {"acc": float(result["test/acc"]), "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--zoo", default=None, help="zoo file (default: digits-siren)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = args.seeds[:1] if args.quick else args.seeds
    budget = {"statnn": 30, "dws": 10, "nfn_np": 10, "nfn_hnp": 10, "unf": 10, "gmn": 5,
              "ngt": 5}  # fmt: skip
    epochs = {m: (1 if args.quick else (args.epochs or e)) for m, e in budget.items()}
    zoo = args.zoo or ensure_zoo("digits-siren")
    t0 = time.time()
    lines = ["### INR classification on digits-siren", "",
             "| model | test accuracy | fit time / seed (s) |", "| --- | --- | --- |"]  # fmt: skip
    for model in args.models:
        runs = []
        error = None
        for seed in seeds:
            print(f"[inr] {model} seed {seed} ...", flush=True)
            try:
                if model == "statnn_gbt":
                    r = statnn_gbt(zoo, seed)
                else:
                    config = os.path.join(ROOT, "configs", "inr", f"{model}.yaml")
                    run_dir = os.path.join(ROOT, "runs", "bench_inr", f"{model}-s{seed}")
                    r = fit_config(config, zoo, seed, epochs[model], run_dir)
            except Exception as err:  # noqa: BLE001 - reported in the table
                import traceback

                traceback.print_exc()
                error = f"{type(err).__name__}: {err}"[:120]
                break
            print(f"[inr] {model} seed {seed}: acc {r['acc']:.3f} ({r['seconds']:.0f} s)",
                  flush=True)  # fmt: skip
            runs.append(r)
        if error:
            lines.append(f"| {LABELS[model]} | failed: {error} | |")
            continue
        acc = np.array([r["acc"] for r in runs])
        secs = np.mean([r["seconds"] for r in runs])
        lines.append(f"| {LABELS[model]} | {acc.mean():.3f} ± {acc.std():.3f} | {secs:.0f} |")
    lines.append("")
    lines.append(f"seeds: {list(seeds)}; test split = 20% of the SIRENs; chance = 0.100")
    epochs_line = ", ".join(f"{LABELS[m]} {epochs[m]}" for m in budget if m in args.models)
    lines.append(f"epochs: {epochs_line}; total time {time.time() - t0:.0f} s; command: "
                 f"python scripts/bench_inr.py "
                 f"{' '.join(argv if argv is not None else sys.argv[1:])}")  # fmt: skip
    print("\n\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
