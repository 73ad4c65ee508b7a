"""Benchmark: predicting test accuracy from weights (Kendall's tau and R², mean ± std over seeds).

Table 1, ``digits-cnn`` (one CNN architecture, split by training run): StatNN with gradient-boosted
trees (Unterthiner et al.), StatNN with an MLP head, DWS, NFN-NP, NFN-HNP, UNF, GMN, NG-T.
Table 2, ``digits-arch`` (8 architectures: MLPs and CNNs of different depth/width/kernel, with
residuals and norm layers): the graph models against StatNN-GBT on arch-agnostic statistics.

Every metanetwork is trained from its own config (``configs/predict_gen/<model>.yaml``, the same
file ``metanet fit`` uses) with ``--trainer.max_epochs`` set here; the checkpoint with the best
validation Kendall tau is tested. Splits are by training run (no run in two splits), with the seed
of each repetition. Missing zoos are built from ``datasets/*.yaml`` first.

    python scripts/bench_generalization.py                 # full benchmark (CPU: ~1 h)
    python scripts/bench_generalization.py --quick         # smoke run (1 seed, 1 epoch)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CNN_MODELS = ["statnn_gbt", "statnn", "dws", "nfn_np", "nfn_hnp", "unf", "gmn", "ngt"]
ARCH_MODELS = ["statnn_gbt", "gmn", "ngt"]
LABELS = {
    "statnn_gbt": "StatNN (GBT)",
    "statnn": "StatNN (MLP head)",
    "dws": "DWS",
    "nfn_np": "NFN-NP",
    "nfn_hnp": "NFN-HNP",
    "unf": "UNF",
    "gmn": "GMN",
    "ngt": "NG-T",
}
SPLITS = "[0.7, 0.1, 0.2]"


def ensure_zoo(name: str) -> str:
    """Path of the ``name`` zoo, building it from ``datasets/<name>.yaml`` if it is missing."""
    path = os.path.join(ROOT, ".cache", "zoos", f"{name}.h5")
    if not os.path.exists(path):
        from metanet.zoo.build import build_zoo

        print(f"building zoo {name} -> {path}", flush=True)
        build_zoo(os.path.join(ROOT, "datasets", f"{name}.yaml"), path, threads=1)
    return path


# ------------------------------------------------------------------------------------------------
# StatNN with gradient-boosted trees (no Lightning)
# ------------------------------------------------------------------------------------------------
ARCH_KERNEL = 25  # edge_attr width of the digits-arch graphs: kernels up to 5x5


def traceable_groups(zoo_path: str) -> tuple[list[str], dict[str, str]]:
    """Groups of a zoo whose networks metanet.graph can trace, and the error of each other one."""
    from metanet.data.datamodules import _example_input
    from metanet.data.zoo_store import Zoo
    from metanet.graph import from_module

    ok, failed = [], {}
    with Zoo.open(zoo_path) as zoo:
        for group in zoo:
            try:
                from_module(group.module(0), _example_input(group), max_kernel_size=ARCH_KERNEL)
                ok.append(group.name)
            except Exception as err:  # noqa: BLE001 - reported under the table
                failed[group.name] = f"{type(err).__name__}: {str(err)[:90]}"
    return ok, failed


def statnn_gbt(
    zoo_path: str, seed: int, graph: bool, groups: list[str] | None = None,
    train_runs: int | None = None,
) -> dict[str, Any]:
    """Fit StatNN-GBT on the train+val runs of the same split the metanetworks use (on the train
    runs only with ``train_runs``: a learning-curve point, where validation runs would add
    training data the metanetworks do not get)."""
    from metanet.data.datamodules import ParamGraphDataModule, WeightSpaceDataModule
    from metanet.tasks.statnn import arch_agnostic_statistics, run_gbt, statnn_features

    splits = tuple(float(s) for s in SPLITS.strip("[]").split(","))
    if graph:
        dm = ParamGraphDataModule(
            zoo_path, groups=groups, splits=splits, seed=seed, max_kernel_size=ARCH_KERNEL,
            train_runs=train_runs,
        )
    else:
        dm = WeightSpaceDataModule(zoo_path, splits=splits, seed=seed, train_runs=train_runs)
    dm.setup()

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        gid, rid = dm.splits[split]
        feats = np.zeros((len(rid), 0), dtype=np.float32)
        rows = []
        for g_i, name in enumerate(dm.group_names):
            mask = gid == g_i
            if not mask.any():
                continue
            group = dm.zoo[name]
            if graph:
                params = group.params(rid[mask])
                sds = [{k: v[j] for k, v in params.items()} for j in range(int(mask.sum()))]
                f = torch.stack([arch_agnostic_statistics(sd) for sd in sds]).numpy()
            else:
                f = statnn_features(group.weight_space(rid[mask]))
            rows.append((np.flatnonzero(mask), f))
        feats = np.zeros((len(rid), rows[0][1].shape[1]), dtype=np.float32)
        for where, f in rows:
            feats[where] = f
        return feats, dm.targets[split].numpy()

    start = time.time()
    x_tr, y_tr = features("train")
    x_va, y_va = features("val")
    x_te, y_te = features("test")
    if train_runs:
        fit_on = (x_tr, y_tr)
    else:
        fit_on = (np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va]))
    scores = run_gbt(fit_on, (x_te, y_te), seed=seed)
    return {"kendall_tau": scores["kendall_tau"], "r2": scores["r2"],
            "seconds": time.time() - start, "png": None}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# metanetworks through their configs
# ------------------------------------------------------------------------------------------------
def fit_and_test(
    config: str,
    zoo_path: str,
    seed: int,
    epochs: int,
    run_dir: str,
    extra: Sequence[str] = (),
    patience: int | None = None,
) -> tuple[dict[str, float], float, Any]:
    """Fit ``config`` through the CLI on ``zoo_path`` with seed ``seed`` (split by run, SPLITS),
    then test its best checkpoint: ``(test metrics, fit seconds, the LightningCLI)``.
    ``patience`` replaces the config's early-stopping patience; a config without early stopping
    gets it, on the checkpoint's monitor (validation tau)."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from metanet.cli import MetanetCLI

    shutil.rmtree(run_dir, ignore_errors=True)
    args = [
        "--config", config,
        "--seed_everything", str(seed),
        "--trainer.max_epochs", str(epochs),
        "--trainer.default_root_dir", run_dir,
        "--trainer.logger.init_args.save_dir", run_dir,
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--data.init_args.zoo", zoo_path,
        "--data.init_args.seed", str(seed),
        "--data.init_args.splits", SPLITS,
        *extra,
    ]  # fmt: skip
    start = time.time()
    saved, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads only ``args``
    try:
        cli = MetanetCLI(args, run=False)
    finally:
        sys.argv = saved
    checkpoint, stopping = None, False
    for cb in cli.trainer.callbacks:
        if isinstance(cb, ModelCheckpoint):
            cb.dirpath = os.path.join(run_dir, "checkpoints")
            checkpoint = cb
        if isinstance(cb, EarlyStopping):
            stopping = True
            if patience is not None:
                cb.patience = int(patience)
    if patience is not None and not stopping:
        if checkpoint is None or checkpoint.monitor is None:
            raise ValueError(f"{os.path.basename(config)}: --patience needs a ModelCheckpoint "
                             "with a monitor to stop on")  # fmt: skip
        stop = EarlyStopping(monitor=checkpoint.monitor, mode=checkpoint.mode,
                             patience=int(patience))  # fmt: skip
        cli.trainer.callbacks.insert(cli.trainer.callbacks.index(checkpoint), stop)
    cli.trainer.fit(cli.model, cli.datamodule)
    fit_seconds = time.time() - start
    (result,) = cli.trainer.test(cli.model, cli.datamodule, ckpt_path="best", verbose=False)
    return result, fit_seconds, cli


def override_args(overrides: Sequence[str]) -> list[str]:
    """Config overrides ``key=value`` (``data.init_args.canonicalize=...``) as LightningCLI
    arguments ``--key value``."""
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ValueError(f"config overrides must be KEY=VALUE, got {bad}")
    args: list[str] = []
    for item in overrides:
        key, _, value = item.partition("=")
        args += [f"--{key}", value]
    return args


def fit_config(
    config: str,
    zoo_path: str,
    seed: int,
    epochs: int,
    run_dir: str,
    extra: Sequence[str] = (),
    patience: int | None = None,
) -> dict[str, Any]:
    """Fit ``config`` on ``zoo_path`` with seed ``seed`` and test its best checkpoint."""
    result, fit_seconds, cli = fit_and_test(config, zoo_path, seed, epochs, run_dir, extra,
                                            patience)  # fmt: skip
    png = os.path.join(cli.trainer.log_dir, "predicted_vs_true.png")
    ckpt = next((cb for cb in cli.trainer.callbacks if hasattr(cb, "best_model_score")), None)
    best = None if ckpt is None else ckpt.best_model_score
    return {
        "kendall_tau": float(result["test/kendall_tau"]),
        "r2": float(result["test/r2"]),
        "val_tau": float("nan") if best is None else float(best),
        "seconds": fit_seconds,
        "png": png if os.path.exists(png) else None,
        "epochs": int(cli.trainer.current_epoch),
    }


def sweep_config(
    config: str,
    zoo_path: str,
    seed: int,
    epochs: int,
    run_dir: str,
    lrs: Sequence[float],
    extra: Sequence[str] = (),
    patience: int | None = None,
    done: dict[float, dict[str, Any]] | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """:func:`fit_config` once per learning rate in ``lrs``; the fit with the best validation
    tau is the result (its test figures, ``chosen_lr``; ``seconds`` its fit time),
    ``sweep_seconds`` the whole sweep's fit time, ``trials`` every fit's learning rate,
    validation tau and fit time. ``done`` maps learning rates already fitted (by an earlier,
    interrupted sweep) to their results, which are reused; ``on_trial`` gets each new fit's
    result as it ends, so that a sweep can be resumed."""
    if len(lrs) == 1 and lrs[0] is None:
        return fit_config(config, zoo_path, seed, epochs, run_dir, extra, patience)
    trials = []
    for lr in lrs:
        if done and lr in done:
            r = {k: done[lr][k] for k in ("kendall_tau", "r2", "val_tau", "seconds", "epochs")}
            print(f"    lr {lr:g}: val tau {r['val_tau']:.3f} (fitted before)", flush=True)
        else:
            r = fit_config(config, zoo_path, seed, epochs, f"{run_dir}-lr{lr:g}",
                           [*extra, "--model.init_args.lr", str(lr)], patience)  # fmt: skip
            print(f"    lr {lr:g}: val tau {r['val_tau']:.3f} ({r['seconds']:.0f} s, "
                  f"{r['epochs']} epochs)", flush=True)  # fmt: skip
            if on_trial is not None:
                on_trial({**r, "lr": lr})
        trials.append({**r, "lr": lr})
    scored = [t for t in trials if not np.isnan(t["val_tau"])]
    if not scored:
        raise RuntimeError(f"no fit of {os.path.basename(config)} has a validation tau")
    best = max(scored, key=lambda t: t["val_tau"])
    return {**best, "chosen_lr": best["lr"], "sweep_seconds": sum(t["seconds"] for t in trials),
            "trials": [{k: t[k] for k in ("lr", "val_tau", "seconds", "epochs")}
                       for t in trials]}  # fmt: skip


def _fmt(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    if np.isnan(v).all():
        return "n/a"
    return f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}"


def table(
    title: str, results: dict[str, list[dict]], seeds: Sequence[int], sweep: bool = False
) -> str:
    """Markdown table, mean ± std over seeds; with ``sweep``, also the validation tau of the
    chosen fit, its epochs, the learning rate chosen on validation per seed and the fit time of
    every trial of every seed together."""
    head = "| model | Kendall τ | R² | fit time / seed (s) |"
    rule = "| --- | --- | --- | --- |"
    if sweep:
        head += " val τ | epochs | lr chosen on val (per seed) | sweep time, all seeds (s) |"
        rule += " --- | --- | --- | --- |"
    lines = [f"### {title}", "", head, rule]
    for model, runs in results.items():
        if not runs:
            continue
        failed = next((r for r in runs if "error" in r), None)
        if failed is not None:
            lines.append(f"| {LABELS[model]} | failed: {failed['error']} | | |")
            continue
        tau = [r["kendall_tau"] for r in runs]
        r2 = [r["r2"] for r in runs]
        secs = np.mean([r["seconds"] for r in runs])
        row = f"| {LABELS[model]} | {_fmt(tau)} | {_fmt(r2)} | {secs:.0f} |"
        if sweep:
            lrs = [r["chosen_lr"] for r in runs if "chosen_lr" in r]
            val = [r.get("val_tau", float("nan")) for r in runs]
            epochs = np.mean([r.get("epochs", 0) for r in runs])
            sweep_secs = sum(r.get("sweep_seconds", r["seconds"]) for r in runs)
            row += (f" {_fmt(val)} | {epochs:.0f} | {', '.join(f'{v:g}' for v in lrs) or '-'} |"
                    f" {sweep_secs:.0f} |")  # fmt: skip
        lines.append(row)
    lines.append("")
    lines.append(f"seeds: {list(seeds)}; test split = 20% of training runs (mean ± std over seeds)")
    return "\n".join(lines)


def read_rows(path: str) -> list[dict[str, Any]]:
    """The JSON rows of a ``--out`` file (a line cut short by a kill is skipped)."""
    import json

    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def table_of_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The tables of a ``--out`` results file: one per (zoo, split tag, train runs, patience),
    rows from several invocations (e.g. a seed-0 sweep, then the other seeds at its lr) pooled
    per model. The rows of single sweep trials (``kind: trial``) are not results."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for row in rows:
        if row.get("kind") == "trial":
            continue
        key = (row["zoo"], row["tag"], row.get("train_runs"), row.get("patience"),
               row.get("variant", ""))  # fmt: skip
        groups.setdefault(key, {}).setdefault(row["model"], []).append(row)
    out = []
    for (zoo, tag, train_runs, patience, variant), results in groups.items():
        for runs in results.values():
            runs.sort(key=lambda r: r.get("seed", 0))
        seeds = sorted({r["seed"] for runs in results.values() for r in runs if "seed" in r})
        title = f"Generalization prediction on {os.path.basename(zoo)} ({tag})"
        title += f", {train_runs} train runs" if train_runs else ""
        title += f", early-stopping patience {patience}" if patience is not None else ""
        title += f", {variant}" if variant else ""
        sweep = any("chosen_lr" in r for runs in results.values() for r in runs)
        out.append(table(title, results, seeds, sweep=sweep))
    return "\n\n".join(out)


def run_name(model: str, seed: int, key: dict[str, Any]) -> str:
    """The run folder of one (model, seed) fit: every setting that makes it another experiment
    (train runs, epoch budget, patience, config overrides) is in the name, so that a fit never
    writes over the checkpoints and logs of another budget's fit."""
    parts = [model]
    if key.get("train_runs"):
        parts.append(f"n{key['train_runs']}")
    if key.get("epochs_budget") is not None:
        parts.append(f"e{key['epochs_budget']}")
    if key.get("patience") is not None:
        parts.append(f"p{key['patience']}")
    if key.get("variant"):
        parts.append(hashlib.sha1(key["variant"].encode()).hexdigest()[:8])
    return "-".join([*parts, f"s{seed}"])


def run_table(
    models, zoo_path, seeds, epochs, graph_zoo: bool, tag: str, groups: list[str] | None = None,
    train_runs: int | None = None, lrs: Sequence[float | None] = (None,),
    patience: int | None = None, out: str | None = None, command: str = "",
    overrides: Sequence[str] = (),
) -> dict[str, list[dict]]:
    """Every model of ``models`` on every seed (a failed model is reported and skipped); each
    finished (model, seed) is appended to the JSON-lines file ``out`` as it ends. ``overrides``
    (``key=value``) change every metanetwork's config; they name the rows' variant."""
    import json

    variant = " ".join(overrides)
    extra = ["--data.init_args.groups", json.dumps(groups)] if groups else []
    extra += override_args(overrides)
    if train_runs:
        extra += ["--data.init_args.train_runs", str(train_runs)]
    if graph_zoo:
        extra += ["--data.init_args.max_kernel_size", str(ARCH_KERNEL)]
    results: dict[str, list[dict]] = {}
    earlier = read_rows(out) if out and os.path.exists(out) else []
    for model in models:
        results[model] = []
        for seed in seeds:
            key = {"zoo": zoo_path, "tag": tag, "model": model, "seed": seed,
                   "train_runs": train_runs, "patience": patience, "variant": variant,
                   "epochs_budget": epochs.get(model)}  # fmt: skip
            done = {r["lr"]: r for r in earlier if r.get("kind") == "trial"
                    and all(r.get(k) == v for k, v in key.items())}  # fmt: skip

            def on_trial(trial: dict[str, Any], key: dict = key) -> None:
                if out:
                    with open(out, "a") as f:
                        f.write(json.dumps({"kind": "trial", **key, "command": command,
                                            **{k: v for k, v in trial.items() if k != "png"}})
                                + "\n")  # fmt: skip

            print(f"[{tag}] {model} seed {seed} ...", flush=True)
            try:
                if model == "statnn_gbt":
                    r = statnn_gbt(zoo_path, seed, graph=graph_zoo, groups=groups,
                                   train_runs=train_runs)  # fmt: skip
                else:
                    config = os.path.join(ROOT, "configs", "predict_gen", f"{model}.yaml")
                    run_dir = os.path.join(ROOT, "runs", "bench_generalization", tag,
                                           run_name(model, seed, key))  # fmt: skip
                    r = sweep_config(config, zoo_path, seed, epochs[model], run_dir, lrs,
                                     extra, patience, done, on_trial)  # fmt: skip
            except Exception as err:  # noqa: BLE001 - reported in the table, the rest goes on
                import traceback

                traceback.print_exc()
                r = {"error": f"{type(err).__name__}: {err}"[:120]}
                results[model] = [r]
            else:
                print(f"[{tag}] {model} seed {seed}: tau {r['kendall_tau']:.3f} "
                      f"r2 {r['r2']:.3f} ({r['seconds']:.0f} s)", flush=True)  # fmt: skip
                results[model].append(r)
            if out:
                row = {"zoo": zoo_path, "tag": tag, "model": model, "seed": seed,
                       "train_runs": train_runs, "patience": patience, "variant": variant,
                       "epochs_budget": epochs.get(model), "command": command,
                       **{k: v for k, v in r.items() if k != "png"}}  # fmt: skip
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if "error" in r:
                break
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs for every model (default: per-model budget)")  # fmt: skip
    parser.add_argument("--models", nargs="+", default=CNN_MODELS, choices=CNN_MODELS)
    parser.add_argument("--arch-models", nargs="+", default=ARCH_MODELS, choices=ARCH_MODELS)
    parser.add_argument("--skip-arch", action="store_true", help="only the digits-cnn table")
    parser.add_argument("--skip-cnn", action="store_true", help="only the digits-arch table")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch (smoke run)")
    parser.add_argument("--cnn-zoo", default=None, help="zoo file (default: digits-cnn)")
    parser.add_argument("--arch-zoo", default=None, help="zoo file (default: digits-arch)")
    parser.add_argument("--train-runs", type=int, default=None,
                        help="train on this many runs of the train split (a learning-curve point; "
                             "validation and test runs unchanged; StatNN-GBT then fits on train "
                             "only)")  # fmt: skip
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="learning rates swept per metanetwork and seed; the fit with the "
                             "best validation tau is tested (default: the config's lr only)")
    parser.add_argument("--patience", type=int, default=None,
                        help="early-stopping patience (epochs without a better validation tau; "
                             "default: the config's)")  # fmt: skip
    parser.add_argument("--out", default=None,
                        help="JSON-lines file; each finished (model, seed) is appended")
    parser.add_argument("--table", default=None,
                        help="only print the tables of this --out file (rows pooled per model)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides of every metanetwork, e.g. data.init_args."
                        "canonicalize=metanet.weightspace.symmetry.relu_scale_canonical")
    parser.add_argument("--png", default=None,
                        help="where to copy the predicted-vs-true plot of the best model "
                             "(the README's is docs/predicted_vs_true.png)")
    args = parser.parse_args(argv)
    try:
        override_args(args.set)
    except ValueError as err:
        parser.error(str(err))
    if args.table:
        rows = [r for r in read_rows(args.table) if r.get("kind") != "trial"]
        if not rows:
            parser.error(f"--table {args.table} holds no result rows")
        print(table_of_rows(rows))
        return 0
    command = "python scripts/bench_generalization.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.set_num_threads(1)  # 2 shared cores: one thread avoids OpenMP spinning
    seeds = args.seeds[:1] if args.quick else args.seeds
    budget = {"statnn": 40, "dws": 10, "nfn_np": 15, "nfn_hnp": 15, "unf": 15, "gmn": 8,
              "ngt": 8}  # fmt: skip
    epochs = {m: (1 if args.quick else (args.epochs or e)) for m, e in budget.items()}
    lrs: list[float | None] = list(args.lrs) if args.lrs else [None]

    t0 = time.time()
    out, res_cnn = [], {}
    if not args.skip_cnn:
        cnn = args.cnn_zoo or ensure_zoo("digits-cnn")
        res_cnn = run_table(args.models, cnn, seeds, epochs, graph_zoo=False, tag="digits-cnn",
                            train_runs=args.train_runs, lrs=lrs,
                            patience=args.patience, out=args.out, command=command,
                            overrides=args.set)  # fmt: skip
        out.append(table("Generalization prediction on digits-cnn", res_cnn, seeds,
                         sweep=args.lrs is not None))  # fmt: skip
    if not args.skip_arch:
        arch = args.arch_zoo or ensure_zoo("digits-arch")
        groups, failed = traceable_groups(arch)
        res_arch = run_table(args.arch_models, arch, seeds, epochs, graph_zoo=True,
                             tag="digits-arch", groups=groups,
                             train_runs=args.train_runs, lrs=lrs,
                             patience=args.patience, out=args.out, command=command,
                             overrides=args.set)  # fmt: skip
        text = table(f"Generalization prediction on digits-arch ({len(groups)} architectures)",
                     res_arch, seeds, sweep=args.lrs is not None)  # fmt: skip
        for name, err in failed.items():
            text += f"\nexcluded (metanet.graph cannot trace it): {name}: {err}"
        out.append(text)
    # the predicted-vs-true plot of the best metanetwork (seed 0) for the README
    best = None
    for model, runs in res_cnn.items():
        if runs and "error" not in runs[0] and runs[0].get("png"):
            tau = float(np.nanmean([r["kendall_tau"] for r in runs]))
            if best is None or tau > best[0]:
                best = (tau, model, runs[0]["png"])
    if best is not None and args.png:
        os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
        shutil.copyfile(best[2], args.png)
        out.append(f"\npredicted-vs-true plot ({LABELS[best[1]]}, seed {seeds[0]}): {args.png}")
    ran = set(args.arch_models if not args.skip_arch else []) | set(
        args.models if not args.skip_cnn else []
    )
    epochs_line = ", ".join(f"{LABELS[m]} {epochs[m]}" for m in budget if m in ran)
    out.append(f"epochs: {epochs_line}; total time {time.time() - t0:.0f} s; "
               f"torch threads 1; command: {command}")  # fmt: skip
    print("\n\n" + "\n\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
