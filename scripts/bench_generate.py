"""Benchmark of metanet's weight generators on a small digits-MLP zoo (CPU, ~10 min on 2 cores).

    .venv/bin/python scripts/bench_generate.py [--steps 1600] [--n 100]

1. Builds (once) the zoo of ``datasets/digits-mlp-gen.yaml`` with the zoo builder
   (-> ``.cache/zoos/digits-mlp-gen.h5``) and a two-task zoo (digits 0-4 vs 5-9) with
   :func:`metanet.generate.taskzoo.build_task_zoo` (-> ``.cache/zoos/digits-mlp-tasks.h5``).
2. Trains, with Lightning, flow matching and latent diffusion on canonicalized (Git Re-Basin) and on
   raw weights (plus, for comparison, flow matching that regresses the velocity instead of
   predicting the clean weights), and a task-conditioned latent diffusion model (D2NWG-style) on
   the two-task zoo.
3. Samples ``--n`` networks from each and prints tables: test accuracy (best / median / mean) vs
   the training checkpoints; novelty (distance of each generated net to its nearest training net,
   both aligned to the reference, against the nearest-neighbour spread inside the zoo); generation
   speed (networks/s on CPU); conditional accuracy on each condition's own task vs the other's.

Error overlap, the four baselines of :mod:`metanet.generate.baselines`, selection on validation and
the two zoo kinds (one run vs many seeds) are in ``scripts/bench_generate_novelty.py``.

Baseline row "Gaussian (aligned)": a Gaussian with the mean and covariance of the canonicalized zoo
— what a generator must beat to have learned more than second-order statistics.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ZOO = os.path.join(ROOT, ".cache", "zoos", "digits-mlp-gen.h5")
TASK_ZOO = os.path.join(ROOT, ".cache", "zoos", "digits-mlp-tasks.h5")
RECIPE = os.path.join(ROOT, "datasets", "digits-mlp-gen.yaml")


def _quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def build_zoos(task_steps: int, per_task: int) -> None:
    from metanet.generate.taskzoo import build_task_zoo

    if not os.path.exists(ZOO):
        from metanet.zoo.build import build_zoo

        t = time.perf_counter()
        build_zoo(RECIPE, output=ZOO, progress=False, threads=torch.get_num_threads())
        print(f"built {ZOO} in {time.perf_counter() - t:.0f}s", flush=True)
    if not os.path.exists(TASK_ZOO):
        t = time.perf_counter()
        build_task_zoo(TASK_ZOO, per_task=per_task, steps=task_steps, seed=0)
        print(f"built {TASK_ZOO} in {time.perf_counter() - t:.0f}s", flush=True)


def train(task, dm, steps: int, callbacks: list | None = None) -> float:
    """Fit ``task`` on ``dm`` for ``steps`` optimizer steps (with ``callbacks``); returns
    seconds."""
    import lightning as L

    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
    )
    t = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    return time.perf_counter() - t


def aligned_vectors(ws, reference):
    """Flattened ``ws`` after aligning every network to ``reference`` (one network)."""
    from metanet.generate.canonicalize import canonicalize

    return canonicalize(ws, reference).flatten()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1600, help="training steps per generator")
    p.add_argument("--n", type=int, default=100, help="networks sampled per generator")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core box, 2 threads stall each other)",
    )
    p.add_argument("--task-per", type=int, default=24, help="networks per task in the task zoo")
    args = p.parse_args(argv)
    _quiet()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()

    from metanet.generate.canonicalize import nearest_distances
    from metanet.generate.data import GeneratorDataModule
    from metanet.generate.evaluate import classifier_accuracy, load_test_split
    from metanet.tasks.flow_generation import FlowGenerationTask
    from metanet.tasks.latent_diffusion import LatentDiffusionTask
    from metanet.weightspace import WeightSpace

    build_zoos(task_steps=200, per_task=args.task_per)

    dms = {}
    for canon in (True, False):
        dm = GeneratorDataModule(ZOO, canonicalize=canon, batch_size=64)
        dm.setup("fit")
        dms[canon] = dm
    dm_c = dms[True]
    info = {"arch": dm_c.arch, "zoo_info": dm_c.zoo_info}
    x_test, y_test = load_test_split(info)
    reference = WeightSpace.unflatten(dm_c.reference_vector[None], dm_c.spec)
    train_vecs = dm_c.raw_vectors  # canonicalized training nets, raw units
    zoo_acc = dm_c.test_acc
    zoo_nn, _ = nearest_distances(train_vecs, train_vecs, exclude_self=True)
    zoo_nn_runs, _ = nearest_distances(
        train_vecs, train_vecs, exclude_self=True, groups=dm_c.run_ids
    )

    def flow(prediction: str = "data") -> FlowGenerationTask:
        return FlowGenerationTask(
            hidden=256, depth=2, lr=2e-3, sample_steps=32, prediction=prediction
        )

    def flow_velocity() -> FlowGenerationTask:
        return flow("velocity")

    def ldm(**kw) -> LatentDiffusionTask:
        return LatentDiffusionTask(
            chunk=128, ae_hidden=512, ae_mixer="mlp", latent=8, hidden=256, depth=2, lr=2e-3,
            ae_lr=2e-3, ae_fraction=0.5, timesteps=1000, sample_steps=50, **kw,
        )  # fmt: skip

    rows, recons = [], []
    runs = [
        ("flow matching", "yes", flow, True),
        ("flow matching", "no", flow, False),
        ("flow matching (velocity prediction)", "yes", flow_velocity, True),
        ("latent diffusion", "yes", ldm, True),
        ("latent diffusion", "no", ldm, False),
    ]
    for name, canon_label, make, canon in runs:
        task = make()
        fit_s = train(task, dms[canon], args.steps)
        t = time.perf_counter()
        ws, _ = task.sample(args.n, seed=0)
        gen_s = time.perf_counter() - t
        acc = classifier_accuracy(ws, dm_c.arch, x_test, y_test)
        nn, _ = nearest_distances(aligned_vectors(ws, reference), train_vecs)
        rows.append((name, canon_label, acc, nn, args.n / gen_s, fit_s))
        if isinstance(task, LatentDiffusionTask):  # can the decoder give back working nets?
            with torch.no_grad():
                task.eval()
                x = dms[canon].vectors
                rec = task.ae.decode(task.ae.encode(x)) * task.std + task.mean
            rec_acc = classifier_accuracy(
                WeightSpace.unflatten(rec, dm_c.spec), dm_c.arch, x_test, y_test
            )
            recons.append(
                (canon_label, rec_acc, float(((rec - dms[canon].raw_vectors) ** 2).mean()))
            )
        print(
            f"  [{time.perf_counter() - start:.0f}s] {name} canon={canon_label}: median acc "
            f"{acc.median():.3f}, train {fit_s:.0f}s",
            flush=True,
        )

    # baseline: Gaussian with the canonicalized zoo's mean and covariance (no training)
    g = torch.Generator().manual_seed(0)
    centered = train_vecs - train_vecs.mean(0)
    t = time.perf_counter()
    coef = torch.randn(args.n, len(train_vecs), generator=g) / (len(train_vecs) - 1) ** 0.5
    gauss = WeightSpace.unflatten(train_vecs.mean(0) + coef @ centered, dm_c.spec)
    gauss_s = time.perf_counter() - t
    acc = classifier_accuracy(gauss, dm_c.arch, x_test, y_test)
    nn, _ = nearest_distances(aligned_vectors(gauss, reference), train_vecs)
    rows.append(("Gaussian (aligned)", "yes", acc, nn, args.n / max(gauss_s, 1e-9), 0.0))

    med_nn = float(zoo_nn.median())
    med_nn_runs = float(zoo_nn_runs.median())
    print()
    print(
        f"zoo: {ZOO} ({len(train_vecs)} checkpoints of {len(set(dm_c.run_ids.tolist()))} runs, "
        f"{dm_c.dim} parameters); {args.n} generated networks per generator; "
        f"{args.steps} training steps each"
    )
    print()
    print(
        "| generator | canonicalized | best acc | median acc | mean acc | nets/s (CPU) | train s |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| training checkpoints | - | {zoo_acc.max():.3f} | {zoo_acc.median():.3f} | "
        f"{zoo_acc.mean():.3f} | - | - |"
    )
    for name, canon_label, acc, _, speed, fit_s in rows:
        print(
            f"| {name} | {canon_label} | {acc.max():.3f} | {acc.median():.3f} | "
            f"{acc.mean():.3f} | {speed:.0f} | {fit_s:.0f} |"
        )
    print()
    print(
        "Latent diffusion's autoencoder: test accuracy of the training networks after "
        "encode -> decode (no diffusion), against the originals."
    )
    print()
    print("| canonicalized | median acc | mean acc | originals median / mean | MSE (raw weights) |")
    print("|---|---|---|---|---|")
    for canon_label, rec_acc, mse in recons:
        print(
            f"| {canon_label} | {rec_acc.median():.3f} | {rec_acc.mean():.3f} | "
            f"{zoo_acc.median():.3f} / {zoo_acc.mean():.3f} | {mse:.2e} |"
        )
    print()
    print(
        "Novelty: L2 distance of each generated net to its nearest training checkpoint, both "
        "aligned to the reference network (Git Re-Basin), relative to the zoo's own "
        f"nearest-neighbour distance (median {med_nn:.3f} to any other checkpoint, "
        f"{med_nn_runs:.3f} to a checkpoint of another run)."
    )
    print()
    print(
        "| generator | canonicalized | NN dist median | / zoo NN | / zoo NN (other runs) "
        "| copies (< 0.5 x zoo NN) |"
    )
    print("|---|---|---|---|---|---|")
    for name, canon_label, _, nn, _, _ in rows:
        m = float(nn.median())
        copies = float((nn < 0.5 * med_nn).float().mean())
        print(
            f"| {name} | {canon_label} | {m:.3f} | {m / med_nn:.2f} | {m / med_nn_runs:.2f} | "
            f"{copies:.0%} |"
        )

    # conditional generation on the two-task zoo
    dm_t = GeneratorDataModule(TASK_ZOO, condition="task", canonicalize=True, batch_size=32)
    dm_t.setup("fit")
    task = ldm(cond_dropout=0.1)
    fit_s = train(task, dm_t, args.steps)
    tasks = dm_t.task_classes
    print()
    print(
        f"Conditional latent diffusion on {TASK_ZOO} ({len(dm_t.vectors)} nets, tasks "
        f"{', '.join(f'{k}: digits {v}' for k, v in tasks.items())}); accuracy on each "
        f"task's test images, {args.n // len(tasks)} generated nets per condition; "
        f"train {fit_s:.0f}s"
    )
    print()
    header = " | ".join(f"acc on {t} (median / mean)" for t in tasks)
    print(f"| condition | {header} |")
    print("|---|" + "---|" * len(tasks))
    for cond in tasks:
        zoo_sel = dm_t.labels == dm_t.conditions.index(cond)
        zoo_ws = WeightSpace.unflatten(dm_t.raw_vectors[zoo_sel], dm_t.spec)
        ws, _ = task.sample(args.n // len(tasks), cond, seed=0)
        cells, zoo_cells = [], []
        for cls in tasks.values():
            a = classifier_accuracy(ws, dm_t.arch, x_test, y_test, cls)
            z = classifier_accuracy(zoo_ws, dm_t.arch, x_test, y_test, cls)
            cells.append(f"{a.median():.3f} / {a.mean():.3f}")
            zoo_cells.append(f"{z.median():.3f} / {z.mean():.3f}")
        print(f"| generated, condition {cond} | " + " | ".join(cells) + " |")
        print(f"| zoo nets of task {cond} | " + " | ".join(zoo_cells) + " |")
    print()
    print(f"total {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
