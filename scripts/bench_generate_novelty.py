"""Weight generators judged as the field now judges them (issue 16): novelty against baselines,
on both zoo kinds, with every choice made on a validation split.

    .venv/bin/python scripts/bench_generate_novelty.py [--steps 1600] [--n 100]
        [--zoo-dir .cache/zoos] [--out OUT/]

1. Builds (once) the two zoos with the zoo builder: ``datasets/digits-mlp-onerun.yaml`` (p-diff:
   ONE run, its last 100 epochs as dense checkpoints) and ``datasets/digits-mlp-seeds.yaml``
   (DeepWeightFlow: 100 independently seeded runs, one final checkpoint each). Both train on the
   digits train split minus a stratified validation split (15%) and are tested on the test split.
2. Trains generators with Lightning, choosing each generator's checkpoint on validation
   (:class:`metanet.generate.selection.SelectOnValidation`: median validation accuracy of 32
   samples every ``--select-every`` steps). One-run zoo: latent diffusion (p-diff) and flow
   matching on raw weights. Seeds zoo (10 runs held out of training as independent networks):
   flow matching at a small (64) and a large (512) width, with and without canonicalization, and
   latent diffusion on canonicalized weights.
3. Samples ``--n`` networks from each, builds the baselines of :mod:`metanet.generate.baselines`
   (training checkpoints, checkpoint + noise at two scales, average of 16 aligned checkpoints,
   diagonal Gaussian of the aligned zoo) and prints, per method: test accuracy (median and mean
   of all networks; best-of-10 chosen on validation beside them), error overlap (max IoU of
   misclassified test samples against the training checkpoints, excluding self), aligned L2
   distance to the nearest training checkpoint (also relative to the zoo's own nearest-neighbour
   distance) and the share flagged as memorized; writes one PNG per zoo (novelty against
   accuracy) into ``--out``.
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

RECIPES = {
    "onerun": os.path.join(ROOT, "datasets", "digits-mlp-onerun.yaml"),
    "seeds": os.path.join(ROOT, "datasets", "digits-mlp-seeds.yaml"),
}


def _quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def build_zoos(zoo_dir: str) -> dict[str, str]:
    """Zoo files of both recipes under ``zoo_dir`` (built when missing)."""
    from metanet.zoo.build import build_zoo

    os.makedirs(zoo_dir, exist_ok=True)
    paths = {}
    for kind, recipe in RECIPES.items():
        path = os.path.join(zoo_dir, os.path.basename(recipe).replace(".yaml", ".h5"))
        if not os.path.exists(path):
            t = time.perf_counter()
            build_zoo(recipe, output=path, progress=False, threads=torch.get_num_threads())
            print(f"built {path} in {time.perf_counter() - t:.0f}s", flush=True)
        paths[kind] = path
    return paths


def train(task, dm, steps: int, every: int, n_select: int):
    """Fit ``task`` for ``steps`` steps, keeping the state chosen on validation; returns
    ``(seconds, selection callback)``."""
    from bench_generate import train as fit

    from metanet.generate.selection import SelectOnValidation

    sel = SelectOnValidation(every_n_steps=every, n_samples=n_select, seed=1)
    return fit(task, dm, steps, callbacks=[sel]), sel


def flow(hidden: int):
    from metanet.tasks.flow_generation import FlowGenerationTask

    return lambda: FlowGenerationTask(hidden=hidden, depth=2, lr=2e-3, sample_steps=32)


def ldm():
    from metanet.tasks.latent_diffusion import LatentDiffusionTask

    return LatentDiffusionTask(
        chunk=128, ae_hidden=512, ae_mixer="mlp", latent=8, hidden=256, depth=2, lr=2e-3,
        ae_lr=2e-3, ae_fraction=0.5, timesteps=1000, sample_steps=50,
    )  # fmt: skip


def evaluate_zoo(kind: str, path: str, other: str, args, start: float) -> list[str]:
    """Everything for one zoo; returns the printed lines."""
    from metanet.generate.baselines import standard_baselines
    from metanet.generate.data import GeneratorDataModule
    from metanet.generate.evaluate import accuracy_summary, classifier_accuracy, load_eval_splits
    from metanet.generate.novelty import align_to, error_sets, novelty, plot_novelty
    from metanet.weightspace import WeightSpace

    holdout = 10 if kind == "seeds" else 0
    dms = {}
    for canon in (True, False):
        dm = GeneratorDataModule(path, canonicalize=canon, batch_size=64, holdout=holdout)
        dm.setup("fit")
        dms[canon] = dm
    dm = dms[True]
    spec, arch = dm.spec, dm.arch
    splits = load_eval_splits({"arch": arch, "zoo_info": dm.zoo_info})
    xt, yt, xv, yv = splits.x_test, splits.y_test, splits.x_val, splits.y_val
    reference = WeightSpace.unflatten(dm.reference_vector[None], spec)
    train_aligned = dm.raw_vectors
    train_errors = error_sets(WeightSpace.unflatten(train_aligned, spec), arch, xt, yt)
    own_nn = novelty(
        WeightSpace.unflatten(train_aligned, spec), train_aligned, train_errors, reference, arch,
        xt, yt, self_index=torch.arange(len(train_aligned)), aligned=train_aligned,
    ).distance  # fmt: skip
    scale = float(own_nn.median())

    methods: dict[str, tuple[WeightSpace, torch.Tensor | None]] = {}
    extra: dict[str, str] = {}
    if kind == "seeds":
        methods["held-out independent runs"] = (
            WeightSpace.unflatten(dm.holdout_vectors, spec),
            None,
        )
    else:  # independent runs of the same recipe: networks of the seeds zoo
        other_dm = GeneratorDataModule(other, canonicalize=False, max_networks=args.n)
        other_dm.setup("fit")
        methods["independent runs (seeds zoo)"] = (
            WeightSpace.unflatten(other_dm.raw_vectors, spec),
            None,
        )
    for name, pair in standard_baselines(train_aligned, spec, args.n, seed=0).items():
        methods[name] = pair

    if kind == "seeds":
        runs = [
            ("flow matching, width 64", True, flow(64)),
            ("flow matching, width 64", False, flow(64)),
            ("flow matching, width 512", True, flow(512)),
            ("flow matching, width 512", False, flow(512)),
            ("latent diffusion", True, ldm),
        ]
    else:
        runs = [("latent diffusion (p-diff)", False, ldm), ("flow matching, width 256", False,
                                                            flow(256))]  # fmt: skip
    for name, canon, make in runs:
        label = f"{name}, {'canonicalized' if canon else 'raw'}"
        task = make()
        fit_s, sel = train(task, dms[canon], args.steps, args.select_every, args.select_n)
        t = time.perf_counter()
        ws, _ = task.sample(args.n, seed=0)
        gen_s = time.perf_counter() - t
        methods[label] = (ws, None)
        hist = " ".join(f"{s}:{v:.3f}" for s, v in sel.history)
        extra[label] = (
            f"train {fit_s:.0f}s, chosen step {sel.best_step} (val median {sel.best_score:.3f}; "
            f"{hist}), {args.n / gen_s:.0f} nets/s"
        )
        print(f"  [{time.perf_counter() - start:.0f}s] {kind}: {label}: {extra[label]}", flush=True)

    reports, rows = {}, []
    for name, (ws, self_index) in methods.items():
        aligned = train_aligned if name == "training checkpoints" else align_to(ws, reference)
        rep = novelty(ws, train_aligned, train_errors, reference, arch, xt, yt,
                      self_index=self_index, aligned=aligned, scale=scale)  # fmt: skip
        val_acc = classifier_accuracy(ws, arch, xv, yv)
        acc = accuracy_summary(val_acc, rep.accuracy, best_of=(10,))
        reports[name] = rep
        rows.append((name, acc, rep.summary()))

    n_runs = len(set(dm.run_ids.tolist()))
    lines = [
        f"zoo: {path} ({len(train_aligned)} training checkpoints of {n_runs} run(s), "
        f"{dm.dim} parameters{f', {holdout} runs held out' if holdout else ''}); "
        f"{args.n} networks per method; validation: the zoo data's {splits.source} split "
        f"({len(yv)} samples), test {len(yt)} samples; zoo's own aligned NN distance "
        f"(median) {scale:.3f}",
        "",
        "| method | test acc median | mean | best-of-10 (on val) | max error IoU median | "
        "aligned L2 NN median | / zoo NN | memorized |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, acc, nov in rows:
        lines.append(
            f"| {name} | {acc['median']:.3f} | {acc['mean']:.3f} | {acc.get('best_of_10', 0):.3f}"
            f" | {nov['iou_median']:.3f} | {nov['l2_median']:.3f} | {nov['l2_rel_median']:.2f} "
            f"| {nov['memorized']:.0%} |"
        )
    lines.append("")
    for name, text in extra.items():
        lines.append(f"- {name}: {text}")
    png = os.path.join(args.out, f"generate_novelty_{kind}.png")
    plot_novelty(
        reports, png, title=f"{os.path.basename(path)}: accuracy vs novelty ({args.n} nets/method)"
    )
    lines.append(f"plot: {png}")
    return lines


def small_width_seeds(path: str, seeds: int, args) -> list[str]:
    """Flow matching at width 64 on the seeds zoo, canonicalized vs raw, over several generator
    seeds (is the canonicalization gap larger than the spread between training seeds?)."""
    from metanet.generate.data import GeneratorDataModule
    from metanet.generate.evaluate import classifier_accuracy, load_eval_splits

    dms = {}
    for canon in (True, False):
        dms[canon] = GeneratorDataModule(path, canonicalize=canon, batch_size=64, holdout=10)
        dms[canon].setup("fit")
    splits = load_eval_splits({"arch": dms[True].arch, "zoo_info": dms[True].zoo_info})
    lines = [
        f"Flow matching, width 64, on {path}: test accuracy (median / mean of {args.n} networks) "
        f"per generator seed, checkpoint chosen on validation",
        "",
        "| generator seed | canonicalized | raw |",
        "|---|---|---|",
    ]
    for seed in range(1, seeds + 1):
        cells = []
        for canon in (True, False):
            torch.manual_seed(seed)
            task = flow(64)()
            train(task, dms[canon], args.steps, args.select_every, args.select_n)
            ws, _ = task.sample(args.n, seed=seed)
            acc = classifier_accuracy(ws, dms[canon].arch, splits.x_test, splits.y_test)
            cells.append(f"{acc.median():.3f} / {acc.mean():.3f}")
        lines.append(f"| {seed} | {cells[0]} | {cells[1]} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1600, help="training steps per generator")
    p.add_argument("--n", type=int, default=100, help="networks sampled per method")
    p.add_argument("--select-every", type=int, default=400, help="validation every N steps")
    p.add_argument("--select-n", type=int, default=32, help="networks sampled per validation")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--zoo-dir", default=os.path.join(ROOT, ".cache", "zoos"))
    p.add_argument("--out", default=os.path.join(ROOT, ".cache", "bench_generate_novelty"))
    p.add_argument("--only", choices=("onerun", "seeds"), default=None, help="one zoo only")
    p.add_argument(
        "--small-seeds",
        type=int,
        default=0,
        help="also train the width-64 flow canonicalized vs raw with this many generator seeds",
    )
    p.add_argument("--skip-main", action="store_true", help="only the --small-seeds table")
    args = p.parse_args(argv)
    _quiet()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    zoos = build_zoos(args.zoo_dir)
    out = [f"command: python scripts/bench_generate_novelty.py {' '.join(argv or sys.argv[1:])}"]
    for kind in ("onerun", "seeds"):
        if args.skip_main or (args.only and kind != args.only):
            continue
        other = zoos["seeds" if kind == "onerun" else "onerun"]
        out += ["", *evaluate_zoo(kind, zoos[kind], other, args, start)]
    if args.small_seeds:
        out += ["", *small_width_seeds(zoos["seeds"], args.small_seeds, args)]
    out += ["", f"total {time.perf_counter() - start:.0f}s"]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
