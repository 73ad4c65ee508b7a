"""Weight generators for whole networks beyond MLPs (issue 16 item 4): a digits CNN with BatchNorm,
generated through a flat parameter layout, with the BatchNorm running statistics recalibrated on a
few training batches after generation, and the effect of that recalibration.

    .venv/bin/python scripts/bench_generate_cnnbn.py [--steps 1600] [--n 100]
        [--zoo-dir .cache/zoos] [--canonicalize {none,rebasin,both}] [--flow-width 256]

1. Builds (once) the zoo of ``datasets/digits-cnnbn-seeds.yaml``: 160 independently seeded runs
   of conv8-BN-ReLU-conv16/2-BN-ReLU-pool-linear (1,466 parameters), one final checkpoint each,
   trained on the digits train split minus a stratified validation split (15%). 10 runs are held
   out of the generators' training as independent networks.
2. Trains flow matching (DeepWeightFlow-style; on raw weights by default, see 4.) and latent
   diffusion (p-diff) on the flat parameter vectors; each generator's
   checkpoint is chosen on validation (:class:`metanet.generate.selection.SelectOnValidation`,
   median validation accuracy of 32 samples recalibrated on 4 train batches).
3. Samples ``--n`` networks from each, builds the baselines of :mod:`metanet.generate.baselines`
   on the same vectors (unaligned by default) and prints, per method and per way of setting the
   BatchNorm running statistics, test accuracy: median / mean of all networks / best-of-10 chosen on
   validation. The ways: the network's own trained statistics (real networks only), the zoo's
   average statistics (what a generated network carries without recalibration), PyTorch's initial
   statistics (zeros and ones), and recalibrated on K batches of 64 training images
   (:func:`metanet.hyper.calibrate.calibrate_batchnorm`), K chosen per method on validation
   among ``--calibrate-grid``. Nothing is chosen on the test split. Beside them, novelty of the
   recalibrated networks, measured by :func:`metanet.generate.novelty.novelty` with the layout
   and the calibration batches (what ``metanet generate --against`` computes): the max IoU of
   each network's misclassified test samples with those of any training checkpoint (the training
   checkpoints recalibrated on the same K batches; excluding itself), the L2 distance to the
   nearest training checkpoint relative to the zoo's own nearest-neighbour distance
   (*unaligned* by default: a permuted copy is far in L2 but shows as an error IoU near 1), and
   the share flagged as memorized (L2 below half the zoo's
   nearest-neighbour distance, or error IoU >= 0.999).
4. ``--canonicalize rebasin`` does all of it on the zoo canonicalized first (Git Re-Basin weight
   matching of every network to the best one on validation, the BatchNorm weights and biases in
   the objective and the running statistics permuted with their channels:
   :func:`metanet.generate.canonicalize.canonicalize_params`); the baselines then average and
   fit Gaussians to *aligned* networks, and the L2 distances are measured in the reference frame
   (``novelty(channels=...)``: every network also aligned to the reference with
   :meth:`FlatLayout.canonicalize`, the smaller distance kept; no refinement against the nearest
   candidates). ``both`` runs ``none`` and ``rebasin`` one after the other and prints a
   comparison of the two. ``--flow-width`` sets the hidden width of flow matching (same
   learning rate).
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
sys.path.insert(0, os.path.join(ROOT, "scripts"))

RECIPE = os.path.join(ROOT, "datasets", "digits-cnnbn-seeds.yaml")


def _quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def build(zoo_dir: str) -> str:
    """The zoo file of the recipe under ``zoo_dir`` (built when missing)."""
    from metanet.zoo.build import build_zoo

    os.makedirs(zoo_dir, exist_ok=True)
    path = os.path.join(zoo_dir, "digits-cnnbn-seeds.h5")
    if not os.path.exists(path):
        t = time.perf_counter()
        build_zoo(RECIPE, output=path, progress=False, threads=torch.get_num_threads())
        print(f"built {path} in {time.perf_counter() - t:.0f}s", flush=True)
    return path


def flow(width: int = 256):
    from metanet.tasks.flow_generation import FlowGenerationTask

    return FlowGenerationTask(hidden=width, depth=2, lr=2e-3, sample_steps=32)


def ldm():
    from metanet.tasks.latent_diffusion import LatentDiffusionTask

    return LatentDiffusionTask(
        chunk=128, ae_hidden=512, ae_mixer="mlp", latent=8, hidden=256, depth=2, lr=2e-3,
        ae_lr=2e-3, ae_fraction=0.5, timesteps=1000, sample_steps=50,
    )  # fmt: skip


class Scorer:
    """Validation and test accuracy of flat-layout networks under each way of setting the
    BatchNorm running statistics."""

    def __init__(self, dm, grid: list[int]) -> None:
        from metanet.generate.canonicalize import ChannelPermutations
        from metanet.generate.data import FlatLayout
        from metanet.generate.evaluate import calibration_batches, load_eval_splits
        from metanet.zoo.architectures import build_module

        self.dm, self.arch, self.layout = dm, dm.arch, dm.layout
        # canonicalized zoo: distances in the reference frame (every network aligned to it)
        self.structure = (
            ChannelPermutations.from_module(build_module(dm.arch)) if dm.canonicalize else None
        )
        info = {"arch": dm.arch, "zoo_info": dm.zoo_info}
        self.splits = load_eval_splits(info)
        fresh = build_module(dm.arch)
        self.init_layout = FlatLayout.from_module(fresh)  # PyTorch's initial 0 / 1 statistics
        self.batches = {k: calibration_batches(info, k, batch_size=64, seed=0) for k in grid}

    def _acc(self, ws, layout, calibration=None) -> tuple[torch.Tensor, torch.Tensor]:
        from metanet.generate.evaluate import classifier_accuracy

        s = self.splits
        kw = {"layout": layout, "calibration": calibration}
        return (
            classifier_accuracy(ws, self.arch, s.x_val, s.y_val, **kw),
            classifier_accuracy(ws, self.arch, s.x_test, s.y_test, **kw),
        )

    @torch.no_grad()
    def own(self, vectors: torch.Tensor, buffers: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Accuracy with each network's own trained running statistics."""
        from metanet.zoo.architectures import build_module

        s = self.splits
        module = build_module(self.arch).eval()
        val, test = torch.empty(len(vectors)), torch.empty(len(vectors))
        for i, vec in enumerate(vectors):
            self.layout.load_into(module, vec, buffers[i])
            val[i] = (module(s.x_val).argmax(1) == s.y_val).float().mean()
            test[i] = (module(s.x_test).argmax(1) == s.y_test).float().mean()
        return val, test

    def errors(self, ws, k: int) -> torch.Tensor:
        """``[B, N]``: which test samples each network misclassifies, recalibrated on K batches."""
        from metanet.generate.novelty import error_sets

        s = self.splits
        return error_sets(ws, self.arch, s.x_test, s.y_test, self.layout, self.batches[k])

    def novelty(self, ws, k: int, train: tuple, self_index=None) -> tuple[float, float, float]:
        """``(median max error IoU, median L2 NN / zoo NN, memorized share)`` of ``ws``
        recalibrated on K batches against ``train`` (``(vectors, {K: error sets of the training
        checkpoints recalibrated on K batches}, zoo NN scale)``).

        L2 unaligned, or for a canonicalized zoo in the reference frame (``novelty(channels=)``):
        every network here is already in it (aligned in set-up, drawn from aligned networks, or
        generated by a generator trained on them), a permuted copy is brought back by aligning
        it to the reference again, and each network keeps the smaller distance."""
        from metanet.generate.novelty import novelty
        from metanet.weightspace import WeightSpace

        vectors, train_errors, scale = train
        s = self.splits
        ref = WeightSpace.unflatten(self.dm.reference_vector[None], ws.spec)
        rep = novelty(ws, vectors, train_errors[k], ref, self.arch, s.x_test, s.y_test,
                      self_index=self_index, scale=scale, layout=self.layout,
                      calibration=self.batches[k], channels=self.structure)  # fmt: skip
        assert rep.aligned == (self.structure is not None)
        out = rep.summary()
        return out["iou_median"], out["l2_rel_median"], out["memorized"]

    def all_modes(
        self, ws, own_buffers: list[dict] | None = None, train: tuple | None = None,
        self_index=None,
    ) -> dict[str, tuple]:  # fmt: skip
        """``mode -> (summary, K)`` for own / zoo / init / recalibrated (K chosen on val), and
        ``"novelty"`` of the recalibrated networks against ``train`` (when given)."""
        from metanet.generate.evaluate import accuracy_summary

        out = {}
        if own_buffers is not None:
            out["own"] = (accuracy_summary(*self.own(ws.flatten(), own_buffers)), None)
        out["zoo"] = (accuracy_summary(*self._acc(ws, self.layout)), None)
        out["init"] = (accuracy_summary(*self._acc(ws, self.init_layout)), None)
        best = None
        out["per_k"] = {}
        for k, batches in self.batches.items():
            val, test = self._acc(ws, self.layout, batches)
            out["per_k"][k] = (float(val.median()), float(test.median()))
            if best is None or float(val.median()) > best[0]:
                best = (float(val.median()), k, accuracy_summary(val, test))
        out["recal"] = (best[2], best[1])
        if train is not None:
            out["novelty"] = self.novelty(ws, best[1], train, self_index)
        return out


def _own_buffers(stacked: dict) -> list[dict]:
    """Per network the stored buffers of stacked ``{key: [N, ...]}`` (permuted with the network
    when the zoo is canonicalized)."""
    n = len(next(iter(stacked.values())))
    return [{k: v[i] for k, v in stacked.items()} for i in range(n)]


def run(args, path: str, mode: str, start: float) -> dict:
    """Every row of the benchmark on the zoo as it is (``mode="none"``) or canonicalized
    (``"rebasin"``): ``{"rows", "extra", "dm", "scorer", "train"}``."""
    from bench_generate import train as fit

    from metanet.generate.baselines import standard_baselines
    from metanet.generate.data import GeneratorDataModule
    from metanet.generate.selection import SelectOnValidation
    from metanet.weightspace import WeightSpace

    grid = [int(k) for k in args.calibrate_grid.split(",")]
    t = time.perf_counter()
    dm = GeneratorDataModule(path, canonicalize=mode == "rebasin", holdout=args.holdout,
                             batch_size=64)  # fmt: skip
    dm.setup("fit")
    setup_s = time.perf_counter() - t
    scorer = Scorer(dm, grid)
    spec = dm.spec
    aligned = mode == "rebasin"

    rows: dict[str, dict] = {}
    held = WeightSpace.unflatten(dm.holdout_vectors, spec)
    rows["held-out independent runs"] = scorer.all_modes(held, _own_buffers(dm.holdout_buffers))
    train_ws = WeightSpace.unflatten(dm.raw_vectors, spec)
    own_index = torch.arange(len(train_ws))
    rows["training checkpoints"] = scorer.all_modes(train_ws, _own_buffers(dm.record_buffers))
    # novelty reference: the training checkpoints, recalibrated on the same K batches as the
    # networks they are compared with (every K of the grid)
    k_train = rows["training checkpoints"]["recal"][1]
    nn_dist = torch.cdist(dm.raw_vectors, dm.raw_vectors).fill_diagonal_(float("inf"))
    train = (dm.raw_vectors, {k: scorer.errors(train_ws, k) for k in grid},
             float(nn_dist.min(1).values.median()))  # fmt: skip
    rows["training checkpoints"]["novelty"] = scorer.novelty(train_ws, k_train, train, own_index)
    rows["held-out independent runs"]["novelty"] = scorer.novelty(
        held, rows["held-out independent runs"]["recal"][1], train
    )
    for name, (ws, _) in standard_baselines(dm.raw_vectors, spec, args.n, seed=0).items():
        if name == "training checkpoints":
            continue
        if aligned:
            name = name.replace(" aligned", " (aligned)").replace("((aligned))", "(aligned)")
        else:
            name = name.replace(" aligned", " (unaligned)").replace("(aligned)", "(unaligned)")
        rows[name] = scorer.all_modes(ws, train=train)

    extra = [f"- set-up (read{', canonicalize' if aligned else ''}): {setup_s:.1f}s"]
    runs = [(f"flow matching, width {args.flow_width}", lambda: flow(args.flow_width)),
            ("latent diffusion (p-diff)", ldm)]  # fmt: skip
    for label, make in runs:
        if args.only and (args.only == "flow") != label.startswith("flow"):
            continue
        torch.manual_seed(0)
        task = make()
        sel = SelectOnValidation(every_n_steps=args.select_every, n_samples=args.select_n,
                                 seed=1, calibrate_bn=args.select_calibrate)  # fmt: skip
        fit_s = fit(task, dm, args.steps, callbacks=[sel])
        t = time.perf_counter()
        ws, _ = task.sample(args.n, seed=0)
        gen_s = time.perf_counter() - t
        rows[label] = scorer.all_modes(ws, train=train)
        hist = " ".join(f"{s}:{v:.3f}" for s, v in sel.history)
        extra.append(
            f"- {label}: train {fit_s:.0f}s, chosen step {sel.best_step} (val median "
            f"{sel.best_score:.3f}; {hist}), {args.n / gen_s:.0f} nets/s"
        )
        print(f"  [{mode} {time.perf_counter() - start:.0f}s] {extra[-1][2:]}", flush=True)
    return {"rows": rows, "extra": extra, "dm": dm, "scorer": scorer, "train": train,
            "grid": grid}  # fmt: skip


def _cell(entry) -> str:
    if entry is None:
        return "-"
    acc, k = entry
    best = acc.get("best_of_10", float("nan"))
    text = f"{acc['median']:.3f} / {acc['mean']:.3f} / {best:.3f}"
    return f"{text} (K={k})" if k is not None else text


def report(args, path: str, mode: str, out: dict) -> list[str]:
    """The printed tables of one mode."""
    rows, dm, grid, train = out["rows"], out["dm"], out["grid"], out["train"]
    aligned = mode == "rebasin"
    frame = "reference-frame" if aligned else "unaligned"
    n_runs = len(set(dm.run_ids.tolist()))
    s = out["scorer"].splits
    how = (
        "canonicalized with Git Re-Basin weight matching to the best training network on "
        "validation (BatchNorm weight/bias in the objective, running statistics permuted along)"
        if aligned
        else "not canonicalized"
    )
    lines = [
        f"canonicalization: {mode} (zoo {how})",
        "",
        f"zoo: {path} ({len(dm.raw_vectors)} training checkpoints of {n_runs} runs, {dm.dim} "
        f"parameters in a flat layout, {args.holdout} runs held out); {args.n} networks per "
        f"sampled method; validation: the zoo data's {s.source} split ({len(s.y_val)} samples), "
        f"test {len(s.y_test)} samples. Cells: test accuracy median / mean / best-of-10 (chosen "
        "on validation); K = recalibration batches of 64 train images, chosen on validation "
        f"among {grid}. Zoo's own {frame} L2 NN distance (median) {train[2]:.3f}. Novelty "
        "(metanet.generate.novelty.novelty, flat layout): against the training checkpoints "
        f"recalibrated on the same K batches; memorized = share with {frame} L2 NN below 0.5 x "
        "the zoo's NN distance or max error IoU >= 0.999.",
        "",
        "| method | own trained BN statistics | zoo-average statistics (no recalibration) | "
        "initial statistics 0/1 (no recalibration) | recalibrated on K train batches | "
        f"max error IoU median (recalibrated) | {frame} L2 NN / zoo NN | memorized |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, modes in rows.items():
        cells = [_cell(modes.get(m)) for m in ("own", "zoo", "init", "recal")]
        iou, rel, mem = modes["novelty"]
        cells += [f"{iou:.3f}", f"{rel:.2f}", f"{mem:.0%}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Recalibration batches K (of 64 train images): test accuracy median (validation median)",
        "",
        "| method | " + " | ".join(f"K={k}" for k in grid) + " |",
        "|---|" + "---|" * len(grid),
    ]
    for name, modes in rows.items():
        per_k = modes["per_k"]
        lines.append(f"| {name} | " + " | ".join(
            f"{per_k[k][1]:.3f} ({per_k[k][0]:.3f})" for k in grid) + " |")  # fmt: skip
    return [*lines, "", *out["extra"]]


def comparison(results: dict[str, dict]) -> list[str]:
    """Side by side: recalibrated test accuracy and novelty without / with canonicalization."""
    none, rebasin = results["none"]["rows"], results["rebasin"]["rows"]
    lines = [
        "Without vs with Git Re-Basin canonicalization (recalibrated on K train batches, K chosen "
        "on validation; L2 unaligned for none, in the reference frame for rebasin)",
        "",
        "| method | none: test median / mean / best-of-10 | rebasin: test median / mean / "
        "best-of-10 | none: max error IoU | rebasin: max error IoU | none: L2 NN / zoo NN | "
        "rebasin: L2 NN / zoo NN | none: memorized | rebasin: memorized |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def key(name: str) -> str:
        return name.replace(" (unaligned)", "").replace(" (aligned)", "").replace(" aligned", "")

    by_key = {key(n): m for n, m in rebasin.items()}
    for name, a in none.items():
        b = by_key.get(key(name))
        if b is None:
            continue
        (ia, ra, ma), (ib, rb, mb) = a["novelty"], b["novelty"]
        lines.append(
            f"| {key(name)} | {_cell(a['recal'])} | {_cell(b['recal'])} | {ia:.3f} | {ib:.3f} | "
            f"{ra:.2f} | {rb:.2f} | {ma:.0%} | {mb:.0%} |"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1600, help="training steps per generator")
    p.add_argument("--n", type=int, default=100, help="networks sampled per method")
    p.add_argument("--select-every", type=int, default=400, help="validation every N steps")
    p.add_argument("--select-n", type=int, default=32, help="networks sampled per validation")
    p.add_argument("--select-calibrate", type=int, default=4,
                   help="train batches recalibrating the selection samples")  # fmt: skip
    p.add_argument("--calibrate-grid", default="1,2,4,16",
                   help="recalibration batches (of 64) to choose from on validation")  # fmt: skip
    p.add_argument("--holdout", type=int, default=10, help="runs held out of generator training")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--zoo-dir", default=os.path.join(ROOT, ".cache", "zoos"))
    p.add_argument("--only", choices=("flow", "ldm"), default=None, help="one generator only")
    p.add_argument("--flow-width", type=int, default=256, help="hidden width of flow matching")
    p.add_argument("--canonicalize", choices=("none", "rebasin", "both"), default="none",
                   help="train on the zoo as it is, canonicalized by Git Re-Basin, or both")
    args = p.parse_args(argv)
    _quiet()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    path = build(args.zoo_dir)
    modes = ["none", "rebasin"] if args.canonicalize == "both" else [args.canonicalize]
    results = {m: run(args, path, m, start) for m in modes}
    lines = [f"command: python scripts/bench_generate_cnnbn.py {' '.join(argv or sys.argv[1:])}"]
    for m in modes:
        lines += ["", *report(args, path, m, results[m])]
    if len(modes) == 2:
        lines += ["", *comparison(results)]
    lines += ["", f"total {time.perf_counter() - start:.0f}s"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
