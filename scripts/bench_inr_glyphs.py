"""Benchmark: INR classification on ``glyphs-siren`` — which glyph (0-9) does a SIREN draw, from
its weights alone, when every SIREN starts from its own random initialization?

Models, all on the same split of the INRs by run (70 / 10 / 20 % train / val / test, seeded):

* ``linear`` - a linear probe (softmax regression) on the raw flattened weights (standardized
  with the train split's mean / std); weight decay swept, chosen on validation accuracy.
* ``mlp`` - an MLP on the same raw weights (2 hidden layers of 256, ReLU, dropout 0.2); learning
  rate x weight decay swept, chosen on validation accuracy.
* ``rendered`` - not a weight-space model but the task's reference: the same linear probe on each
  INR's *function*, its image rendered on the 28x28 pixel grid it was fitted on. It shows how much
  of the class the fitted functions hold, whatever the order of their hidden neurons.
* ``dws``, ``nfn_np``, ``gmn``, ``ngt`` - the permutation-invariant metanetworks, and
  ``sign_gmn`` - the graph metanetwork invariant to sign flips too (:class:`metanet.nn.SignGMN`),
  trained through
  the CLI from ``configs/inr/glyphs_<model>.yaml`` (early stopping on validation accuracy, the
  best-on-validation checkpoint tested), optionally with a learning-rate sweep (``--lrs``) and a
  wall-time budget per fit (``--max-minutes``).

``--augment`` trains the metanetworks with weight-space augmentations (:data:`AUGMENTATIONS`;
``input`` are the exact INR input transforms of :class:`metanet.weightspace.RandomInputAffine`),
``--set key=value`` overrides any config value (``model.init_args.model.init_args.hidden=32``);
both are recorded in the row's ``variant``, and the table has one line per model and variant.

Every figure is chosen on validation only; test accuracy is read once per model and seed, for the
configuration that won on validation. Each finished (model, seed) is appended to ``--out`` as a
JSON line, so several invocations (e.g. on two cores at once) build one table::

    python scripts/bench_inr_glyphs.py --zoo .cache/zoos/glyphs-siren.h5 --models linear mlp
    python scripts/bench_inr_glyphs.py --table runs/bench_inr_glyphs/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SPLITS = (0.7, 0.1, 0.2)
RAW_MODELS = ("linear", "mlp", "rendered")
CLI_MODELS = ("dws", "nfn_np", "gmn", "ngt", "sign_gmn")
MODELS = RAW_MODELS + CLI_MODELS
LABELS = {"linear": "linear probe (raw weights)", "mlp": "MLP (raw weights)",
          "rendered": "linear probe (rendered image, reference)", "dws": "DWS",
          "nfn_np": "NFN-NP", "gmn": "NG-GNN / GMN", "ngt": "NG-T",
          "sign_gmn": "SignGMN (sign + permutation invariant)"}  # fmt: skip
_AUG = "metanet.weightspace.augment."
AUGMENTATIONS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "permutation": [{"class_path": _AUG + "RandomPermutation"}],
    "input": [{"class_path": _AUG + "RandomInputAffine",
               "init_args": {"degrees": 45.0, "translate": 0.25, "scale": [0.8, 1.2]}}],
    "noise": [{"class_path": _AUG + "GaussianNoise", "init_args": {"sigma": 0.1}},
              {"class_path": _AUG + "WeightDropout", "init_args": {"p": 0.01}}],
    "mixup": [{"class_path": _AUG + "AlignedMixUp", "init_args": {"num_classes": 10}}],
    "signflip": [{"class_path": _AUG + "RandomSignFlip"}],
}  # fmt: skip
AUGMENTATIONS["dwsnets"] = AUGMENTATIONS["input"] + AUGMENTATIONS["noise"]


def augmentation_args(names: Sequence[str]) -> list[str]:
    """CLI arguments that train with the augmentations ``names`` (applied in that order; no
    names: the config's own ``transforms``; ``none``: no augmentation, whatever the config)."""
    transforms = [t for name in names for t in AUGMENTATIONS[name]]
    if not names:
        return []
    if not transforms:
        return ["--data.init_args.transforms", "null"]
    compose = {"class_path": _AUG + "Compose", "init_args": {"transforms": transforms}}
    return ["--data.init_args.transforms", json.dumps(compose)]


def instantiate(spec: Any) -> Any:
    """Build a ``{class_path, init_args}`` dict as the CLI builds it, nested specs (in lists or
    as values) included; anything else is returned as it is."""
    import importlib

    if isinstance(spec, list):
        return [instantiate(v) for v in spec]
    if not (isinstance(spec, dict) and "class_path" in spec):
        return spec
    module, _, name = spec["class_path"].rpartition(".")
    kwargs = {k: instantiate(v) for k, v in spec.get("init_args", {}).items()}
    return getattr(importlib.import_module(module), name)(**kwargs)


LINEAR_SWEEP = [{"lr": 1e-3, "weight_decay": wd} for wd in (0.0, 1e-3, 1e-2, 1e-1)]
MLP_SWEEP = [{"lr": lr, "weight_decay": wd} for lr in (1e-3, 3e-4) for wd in (0.0, 1e-2)]


# ------------------------------------------------------------------------------------------------
# raw-weight baselines
# ------------------------------------------------------------------------------------------------
Splits = dict[str, tuple[torch.Tensor, torch.Tensor]]


def split_features(zoo: str, seed: int, featurize: Any) -> Splits:
    """``featurize(group, run_ids) -> [N, D]`` of every split (standardized per coordinate with
    the train split's mean and std) and its labels, split exactly as the CLI models split them."""
    from metanet.data.datamodules import WeightSpaceDataModule

    dm = WeightSpaceDataModule(zoo, target="label", splits=SPLITS, seed=seed)
    dm.setup()
    group = dm.zoo[dm.group]
    out = {}
    for split in ("train", "val", "test"):
        _, rid = dm.splits[split]
        out[split] = (featurize(group, rid).float(), dm.targets[split].long())
    mean = out["train"][0].mean(0)
    std = out["train"][0].std(0).clamp_min(1e-8)
    return {k: ((x - mean) / std, y) for k, (x, y) in out.items()}


def raw_weights(zoo: str, seed: int) -> Splits:
    """Flattened weights ``[N, D]`` of every split (see :func:`split_features`)."""
    return split_features(zoo, seed, lambda group, rid: group.weight_space(rid).flatten())


def render_inrs(group: Any, rids: Any, size: int = 28) -> torch.Tensor:
    """The outputs ``[N, size*size]`` of the INRs ``rids`` of a zoo group on the ``size x size``
    pixel-centre grid they were fitted on (:func:`metanet.data.digits.digit_image_coordinates`):
    each INR's image, whatever the order of its hidden neurons."""
    from metanet.data.digits import digit_image_coordinates
    from metanet.zoo.architectures import build_module

    module = build_module(group.arch).eval()
    coords = digit_image_coordinates(size)
    render = torch.func.vmap(lambda p: torch.func.functional_call(module, p, (coords,)))
    params = {k: v.float() for k, v in group.params(rids).items()}
    with torch.no_grad():
        return render(params).flatten(1)


def rendered_images(zoo: str, seed: int, size: int = 28) -> Splits:
    """:func:`render_inrs` of every split (see :func:`split_features`)."""
    return split_features(zoo, seed, lambda group, rid: render_inrs(group, rid, size))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def fit_raw(
    make: Any,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    weight_decay: float,
    seed: int,
    max_epochs: int = 200,
    patience: int = 15,
    batch_size: int = 128,
    augment: Any = None,
) -> dict[str, Any]:
    """Train ``make()`` with AdamW on the train split, early-stopped on validation accuracy;
    returns the best epoch's validation accuracy, its test accuracy and the epochs run.
    ``augment(indices, generator) -> [len(indices), D]``, when given, makes the features of each
    training batch (augmented train networks) in place of ``data["train"][0][indices]``."""
    torch.manual_seed(seed)
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    x_tr, y_tr = data["train"]
    gen = torch.Generator().manual_seed(seed)
    best = {"val_acc": -1.0, "epoch": 0, "state": None}
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        for idx in torch.randperm(len(y_tr), generator=gen).split(batch_size):
            x = x_tr[idx] if augment is None else augment(idx, gen)
            loss = nn.functional.cross_entropy(model(x), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        val = _accuracy(model, *data["val"])
        if val > best["val_acc"]:
            best = {"val_acc": val, "epoch": epoch,
                    "state": {k: v.clone() for k, v in model.state_dict().items()}}  # fmt: skip
        elif epoch - best["epoch"] >= patience:
            break
    model.load_state_dict(best["state"])
    return {"val_acc": best["val_acc"], "test_acc": _accuracy(model, *data["test"]),
            "train_acc": _accuracy(model, *data["train"]), "epochs": epoch,
            "best_epoch": best["epoch"]}  # fmt: skip


def weight_augmenter(zoo: str, seed: int, names: Sequence[str]) -> Any:
    """``augment(indices, generator)`` for :func:`fit_raw`: the train split's networks
    ``indices``, transformed by the augmentation presets ``names`` (:data:`AUGMENTATIONS`, built
    as the CLI builds them), flattened and standardized with the un-augmented train split's
    per-coordinate mean and std (as :func:`raw_weights` standardizes)."""
    from metanet.data.datamodules import WeightSpaceDataModule
    from metanet.weightspace.augment import Compose

    transform = Compose([instantiate(t) for name in names for t in AUGMENTATIONS[name]])
    dm = WeightSpaceDataModule(zoo, target="label", splits=SPLITS, seed=seed)
    dm.setup()
    ws = dm.zoo[dm.group].weight_space(dm.splits["train"][1])
    flat = ws.flatten().float()
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-8)

    def augment(indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return (transform(ws[indices], generator=generator).flatten().float() - mean) / std

    return augment


def run_raw(model_name: str, zoo: str, seed: int, augment: Sequence[str] = ()) -> dict[str, Any]:
    """The ``linear``, ``mlp`` or ``rendered`` baseline: its sweep, the configuration best on
    validation; ``augment`` (presets of :data:`AUGMENTATIONS`) augments the MLP's training
    networks."""
    start = time.time()
    data = rendered_images(zoo, seed) if model_name == "rendered" else raw_weights(zoo, seed)
    augmenter = weight_augmenter(zoo, seed, augment) if augment and model_name == "mlp" else None
    dim, classes = data["train"][0].shape[1], int(data["train"][1].max()) + 1
    if model_name in ("linear", "rendered"):
        sweep = LINEAR_SWEEP
        make = lambda: nn.Linear(dim, classes)  # noqa: E731
    else:
        sweep = MLP_SWEEP
        make = lambda: nn.Sequential(  # noqa: E731
            nn.Linear(dim, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 256), nn.ReLU(),
            nn.Dropout(0.2), nn.Linear(256, classes),
        )  # fmt: skip
    trials = []
    for hp in sweep:
        r = fit_raw(make, data, hp["lr"], hp["weight_decay"], seed, augment=augmenter)
        print(f"[glyphs] {model_name} seed {seed} {hp}: val {r['val_acc']:.3f}", flush=True)
        trials.append({**hp, **r})
    best = max(trials, key=lambda t: t["val_acc"])
    return {"val_acc": best["val_acc"], "test_acc": best["test_acc"],
            "train_acc": best["train_acc"], "epochs": best["epochs"],
            "chosen": {k: best[k] for k in ("lr", "weight_decay")}, "trials": trials,
            "seconds": time.time() - start, "n_train": len(data["train"][1])}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# metanetworks through the CLI
# ------------------------------------------------------------------------------------------------
def run_dir_of(run_root: str, model_name: str, variant: str, seed: int, lr: float) -> str:
    """The folder of one CLI fit (its checkpoints and CSV log)."""
    tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in variant)
    return os.path.join(run_root, f"{model_name}{'-' + tag if tag else ''}-s{seed}-lr{lr:g}")


def fill_train_acc(rows: Sequence[dict[str, Any]], run_root: str) -> None:
    """Rows of CLI models written before rows recorded ``train_acc`` get it from their run's CSV
    log under ``run_root``, when that is still there."""
    for r in rows:
        if r["model"] in CLI_MODELS and "train_acc" not in r and "error" not in r:
            log = os.path.join(run_dir_of(run_root, r["model"], r.get("variant", ""), r["seed"],
                                          r["chosen"]["lr"]), "logs", "version_0")  # fmt: skip
            r["train_acc"] = best_epoch_train_acc(log)


def best_epoch_train_acc(log_dir: str | None) -> float:
    """Training accuracy (on the augmented batches, if any) of the epoch with the best validation
    accuracy, from the CSV log of a CLI fit (``nan`` without one): how far the model fits its
    train split where it generalizes best."""
    import csv

    path = os.path.join(log_dir or "", "metrics.csv")
    if not os.path.exists(path):
        return float("nan")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    val = {r["epoch"]: float(r["val/acc"]) for r in rows if r.get("val/acc")}
    train = {r["epoch"]: float(r["train/acc"]) for r in rows if r.get("train/acc")}
    best = max(val, key=lambda e: val[e], default=None)
    return train.get(best, float("nan")) if best is not None else float("nan")


def run_cli(model_name: str, zoo: str, seed: int, lrs: Sequence[float], max_epochs: int,
            max_minutes: float | None, run_root: str, augment: Sequence[str] = (),
            overrides: Sequence[str] = (), patience: int | None = None,
            variant: str = "") -> dict[str, Any]:  # fmt: skip
    """Fit ``configs/inr/glyphs_<model>.yaml`` once per learning rate (early stopping on
    validation accuracy, ``patience`` epochs), with the augmentations ``augment`` and the config
    ``overrides`` (``key=value``); test the checkpoint of the run best on validation."""
    from scripts.bench_generalization import fit_and_test, override_args

    config = os.path.join(ROOT, "configs", "inr", f"glyphs_{model_name}.yaml")
    start = time.time()
    trials = []
    for lr in lrs:
        extra = ["--data.init_args.splits", json.dumps(list(SPLITS)),
                 "--model.init_args.lr", str(lr), *augmentation_args(augment)]  # fmt: skip
        extra += override_args(overrides)
        if max_minutes:
            total = int(max_minutes * 60)
            extra += ["--trainer.max_time", f"00:{total // 3600:02d}:{total % 3600 // 60:02d}:"
                      f"{total % 60:02d}"]  # fmt: skip
        run_dir = run_dir_of(run_root, model_name, variant, seed, lr)
        result, seconds, cli = fit_and_test(config, zoo, seed, max_epochs, run_dir, extra,
                                            patience)  # fmt: skip
        ckpt = next(cb for cb in cli.trainer.callbacks if hasattr(cb, "best_model_score"))
        val = float(ckpt.best_model_score) if ckpt.best_model_score is not None else float("nan")
        trial = {"lr": lr, "val_acc": val, "test_acc": float(result["test/acc"]),
                 "train_acc": best_epoch_train_acc(cli.trainer.log_dir),
                 "epochs": int(cli.trainer.current_epoch), "fit_seconds": seconds}  # fmt: skip
        print(f"[glyphs] {model_name} seed {seed} lr {lr:g}: val {val:.3f} "
              f"({trial['epochs']} epochs, {seconds:.0f} s)", flush=True)  # fmt: skip
        trials.append(trial)
    best = max(trials, key=lambda t: t["val_acc"])
    return {"val_acc": best["val_acc"], "test_acc": best["test_acc"],
            "train_acc": best["train_acc"], "epochs": best["epochs"],
            "chosen": {"lr": best["lr"]}, "trials": trials, "seconds": time.time() - start}


# ------------------------------------------------------------------------------------------------
# table
# ------------------------------------------------------------------------------------------------
def table(rows: Sequence[dict[str, Any]], chance: float, majority: float) -> str:
    """Markdown table of the JSON result rows: mean ± std over seeds per model."""
    lines = ["| model | test accuracy | val accuracy | train accuracy | margin above chance | "
             "epochs | wall time / seed (s) | chosen on val |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    by_model: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by_model.setdefault((r["model"], r.get("variant", "")), []).append(r)
    keys = sorted(by_model, key=lambda k: (MODELS.index(k[0]), k[1]))
    for name, variant in keys:
        rs = by_model[name, variant]
        label = LABELS[name] + (f" [{variant}]" if variant else "")
        failed = [r for r in rs if "error" in r]
        if failed:
            lines.append(f"| {label} | failed: {failed[0]['error']} | | | | | | |")
            continue
        test = np.array([r["test_acc"] for r in rs])
        val = np.array([r["val_acc"] for r in rs])
        fmt = lambda a: f"{a.mean():.3f}" + (f" ± {a.std():.3f}" if len(a) > 1 else "")  # noqa: E731
        train = np.array([r.get("train_acc", float("nan")) for r in rs], dtype=float)
        train_text = "" if np.isnan(train).any() else fmt(train)
        chosen = "; ".join(sorted({json.dumps(r["chosen"], sort_keys=True) for r in rs}))
        lines.append(f"| {label} | {fmt(test)} | {fmt(val)} | {train_text} | "
                     f"{test.mean() - chance:+.3f} "
                     f"| {np.mean([r['epochs'] for r in rs]):.0f} | "
                     f"{np.mean([r['seconds'] for r in rs]):.0f} | {chosen} |")  # fmt: skip
    seeds = sorted({r["seed"] for r in rows})
    lines += ["", f"seeds: {seeds}; split by INR 70/10/20 (train/val/test); chance = {chance:.3f} "
              f"(1 / classes; the test split's majority class: {majority:.3f})"]  # fmt: skip
    return "\n".join(lines)


def chance_level(zoo: str, seed: int) -> tuple[float, float]:
    """``(1 / classes, share of the test split's most frequent class)``: the accuracy of a
    uniform guess and of always guessing the majority class."""
    from metanet.data.datamodules import WeightSpaceDataModule

    dm = WeightSpaceDataModule(zoo, target="label", splits=SPLITS, seed=seed)
    dm.setup()
    y = dm.targets["test"].long()
    return 1.0 / int(dm.num_classes), float(torch.bincount(y).max()) / len(y)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default=os.path.join(ROOT, ".cache", "zoos", "glyphs-siren.h5"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3],
                        help="learning rates swept for the CLI models (chosen on val)")
    parser.add_argument("--max-epochs", type=int, default=50)
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="wall-time budget of one CLI fit (Lightning max_time)")
    parser.add_argument("--augment", nargs="+", default=[], choices=sorted(AUGMENTATIONS),
                        help="weight-space augmentations of the training batches of the CLI "
                        "models and of the raw-weight MLP")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides of the CLI models, e.g. "
                        "model.init_args.model.init_args.hidden=32")
    parser.add_argument("--patience", type=int, default=None,
                        help="early-stopping patience of the CLI models (default: the config's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--run-root", default=os.path.join(ROOT, "runs", "bench_inr_glyphs"))
    parser.add_argument("--out", default=None, help="JSON lines file (default RUN_ROOT/results"
                        ".jsonl); rows are appended")  # fmt: skip
    parser.add_argument("--table", default=None, help="only print the table of this JSONL file")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.run_root, "results.jsonl")
    if args.table:
        with open(args.table) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            parser.error(f"--table {args.table} holds no result rows")
        fill_train_acc(rows, args.run_root)
        print(table(rows, rows[0]["chance"], rows[0]["majority"]))
        return 0
    if not os.path.exists(args.zoo):
        parser.error(f"--zoo {args.zoo} does not exist; build it with: metanet zoo build "
                     "datasets/glyphs-siren.yaml --workers 2 --threads 1")  # fmt: skip
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    bad = [item for item in args.set if "=" not in item]
    if bad:
        parser.error(f"--set needs KEY=VALUE items, got {bad}")
    augmented = f"augment={'+'.join(args.augment)}" if args.augment else ""
    variant = " ".join([augmented] * bool(augmented) + args.set
                       + [f"patience={args.patience}"] * (args.patience is not None))  # fmt: skip
    rows = []
    for seed in args.seeds:
        chance, majority = chance_level(args.zoo, seed)
        for name in args.models:
            print(f"[glyphs] {name} seed {seed} ...", flush=True)
            try:
                if name in RAW_MODELS:
                    r = run_raw(name, args.zoo, seed, args.augment)
                else:
                    r = run_cli(name, args.zoo, seed, args.lrs, args.max_epochs,
                                args.max_minutes, args.run_root, args.augment, args.set,
                                args.patience, variant)  # fmt: skip
            except Exception as err:  # noqa: BLE001 - reported in the table
                import traceback

                traceback.print_exc()
                r = {"error": f"{type(err).__name__}: {err}"[:160]}
            row = {"model": name, "seed": seed, "chance": chance, "majority": majority,
                   "variant": variant if name in CLI_MODELS else augmented * (name == "mlp"),
                   **r,
                   "command": "python scripts/bench_inr_glyphs.py " + " ".join(
                       argv if argv is not None else sys.argv[1:])}  # fmt: skip
            if "error" not in r:
                print(f"[glyphs] {name} seed {seed}: test {r['test_acc']:.3f} val "
                      f"{r['val_acc']:.3f} ({r['seconds']:.0f} s)", flush=True)  # fmt: skip
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    print("\n" + table(rows, rows[0]["chance"], rows[0]["majority"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
