"""Zoo building speed (nets/minute, metanet builder vs a plain per-network loop) and an INR
zoo learnability probe.

Speed: for each recipe, both sides train the same networks (the recipe's first ``--nets`` run
ids: the same sampled lr, weight decay, optimizer, dropout, init, train subset, label noise, batch
size and epochs, on the same digits split).

* metanet: ``build_zoo(recipe, limit=nets)`` end to end into a temporary file - chunked training
  (``--engine``: ``auto`` = hand-batched matmuls, ``vmap`` = ``torch.func``), evaluation of
  every kept checkpoint on the full train and test splits, HDF5 chunk files and the merge.
  ``--workers W`` trains the chunks in W worker processes (one torch thread each).
* plain: the ordinary loop, one network at a time: ``nn.Module`` (``nn.Dropout``) +
  ``torch.optim`` (SGD with momentum / AdamW), a fresh ``randperm`` per epoch, the same batch
  size and epochs; after each kept epoch it evaluates loss and accuracy on the full train and
  test splits, as the zoo records (the same work as metanet's build). By
  default it trains the same ``--nets`` networks (``--plain-nets K``: only the first K; steps per
  network vary ~50x across a recipe, so a small subset gives a noisy rate).

Both run in this process with the same torch thread count. The machine may be shared, so the
table gives rates by wall-clock time and by this process's CPU time (``time.process_time``,
which other processes' load does not inflate; with ``--workers``, the workers' CPU time is
included); with one thread they agree on an idle machine.

SIREN early stop (``--siren-psnr DB``): an INR zoo of ``--nets`` images (``--siren-recipe``,
default ``datasets/digits-siren.yaml``) fitted for at most ``--siren-steps`` steps, each INR
stopping once its training PSNR reaches DB: ``build_zoo`` end to end, INRs per minute (wall and
CPU), the steps the INRs really took and their PSNR. ``--siren-no-compact`` keeps stopped INRs in
the batched engine's batch until the step cap (the behaviour before compaction; same zoo).

INR probe (``--inr-probe ZOO.h5``): logistic regression on the flattened weights of the INRs of
the digits train split, scored on the INRs of the test split (chance = 10%), next to the same
classifier on the raw pixels; prints the PSNR spread of the zoo.

    python scripts/bench_zoo.py [--recipe datasets/digits-mlp.yaml --recipe ...] [--nets 200]
                                [--plain-nets K] [--threads 1] [--engine auto] [--workers 1]
    python scripts/bench_zoo.py --siren-psnr 30 --siren-steps 1000 [--nets 600]
                                [--siren-recipe datasets/digits-siren.yaml] [--siren-no-compact]
    python scripts/bench_zoo.py --inr-probe .cache/zoos/digits-siren.h5
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metanet.zoo.architectures import SampledDropout
from metanet.zoo.build import build_zoo
from metanet.zoo.data import recipe_task
from metanet.zoo.recipe import NetworkPlan, Recipe
from metanet.zoo.train import ChunkData, classifier_data, init_network


def plain_model(arch: dict, plan: NetworkPlan) -> nn.Module:
    """The network of ``plan`` as an ordinary module: same initial weights as the zoo builder's,
    ``nn.Dropout(p)`` in place of the builder's per-network-rate dropout."""
    hp = plan.hparams
    model = init_network(arch, plan.weight_seed, hp.get("init", "default"),
                         float(hp.get("init_scale", 1.0)))  # fmt: skip
    for name, m in list(model.named_children()):
        if isinstance(m, SampledDropout):
            setattr(model, name, nn.Dropout(float(hp.get("dropout", 0.0))))
    return model


@torch.no_grad()
def plain_evaluate(model: nn.Module, data: ChunkData) -> dict[str, float]:
    """Loss and accuracy on the full train and test splits: what a zoo stores per checkpoint."""
    model.eval()
    out = {}
    for split, x in data.x_eval.items():
        logits, y = model(x), data.y_eval[split]
        out[f"{split}_loss"] = float(F.cross_entropy(logits, y))
        out[f"{split}_acc"] = float((logits.argmax(1) == y).float().mean())
    model.train()
    return out


def plain_train(
    arch: dict, plan: NetworkPlan, data: ChunkData, i: int, keep_fractions: list[float]
) -> tuple[float, float]:
    """Train network ``i`` of ``data`` alone with torch.optim, evaluating it after each kept
    epoch (as the zoo records); return its final test accuracy and the seconds spent
    evaluating."""
    hp = plan.hparams
    model = plain_model(arch, plan)
    if hp["optimizer"] == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"],
                              weight_decay=hp["weight_decay"])  # fmt: skip
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    idx = data.subset[i].nonzero().squeeze(1)
    x, y = data.x_train[idx], data.y_train[i][idx]
    bs, epochs = int(hp["batch_size"]), int(hp["epochs"])
    keep = {max(1, round(f * epochs)) for f in keep_fractions}
    records = {}
    eval_seconds = 0.0
    model.train()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(idx))
        for s in range(0, len(idx), bs):
            b = perm[s : s + bs]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch in keep:
            t0 = time.perf_counter()
            records[epoch] = plain_evaluate(model, data)
            eval_seconds += time.perf_counter() - t0
    return records[epochs]["test_acc"], eval_seconds


def _clock() -> tuple[float, float]:
    """Wall-clock time and CPU time of this process and its finished children (workers)."""
    t = os.times()
    return time.perf_counter(), t.user + t.system + t.children_user + t.children_system


def bench_recipe(path: str, nets: int, plain_nets: int, engine: str, workers: int = 1) -> dict:
    """Time the metanet build and the plain loop on ``path``; returns one table row."""
    recipe = Recipe.load(path)
    if recipe.kind != "classifier":
        raise SystemExit(f"{path}: the speed comparison needs a classifier recipe")
    plans = recipe.plan(nets)
    arch = recipe.architectures[0]
    if len(recipe.architectures) > 1:
        raise SystemExit(f"{path}: compare one-architecture recipes")
    flat = arch["type"] == "mlp"
    task = recipe_task(recipe.data)  # read once, before any timing
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up (imports, first traces, allocator) on a tiny build, not timed
        build_zoo(recipe, Path(tmp) / "warm.h5", limit=2, progress=False, engine=engine)
        w0, c0 = _clock()
        out = build_zoo(recipe, Path(tmp) / "zoo.h5", limit=nets, progress=False, engine=engine,
                        workers=workers)  # fmt: skip
        w1, c1 = _clock()
        from metanet.data.zoo_store import Zoo

        with Zoo.open(out) as zoo:
            g = zoo[zoo.architectures[0]]
            final = g.metrics["final"] == 1
            acc = float(np.mean(g.metrics["test_acc"][final]))
            records = len(g)
    sub = plans[:plain_nets]
    data = classifier_data(sub, flat, task)
    keep = list(recipe.keep_fractions)
    plain_train(arch, sub[0], data, 0, keep)  # warm-up, not timed
    p0, q0 = _clock()
    plain_acc, plain_eval = zip(*(plain_train(arch, p, data, i, keep) for i, p in enumerate(sub)))
    p1, q1 = _clock()
    epochs = [p.hparams["epochs"] for p in plans]
    return {
        "arch": arch["type"],
        "recipe": recipe.name,
        "nets": len(plans),
        "plain_nets": len(sub),
        "records": records,
        "epochs": f"{min(epochs)}-{max(epochs)} (mean {np.mean(epochs):.1f})",
        "plain_wall": 60 * len(sub) / (p1 - p0),
        "plain_cpu": 60 * len(sub) / (q1 - q0),
        "meta_wall": 60 * len(plans) / (w1 - w0),
        "meta_cpu": 60 * len(plans) / (c1 - c0),
        "plain_acc": float(np.mean(plain_acc)),
        "plain_eval_share": sum(plain_eval) / (p1 - p0),
        "meta_acc": acc,
    }


def bench_siren(path: str, nets: int, psnr: float, steps: int, engine: str,
                compact: bool = True) -> dict:  # fmt: skip
    """Time an INR zoo build of ``nets`` images of the SIREN recipe ``path`` with ``steps``
    steps at most and an early stop at ``psnr`` dB; returns one table row."""
    import functools

    import yaml

    from metanet.zoo import batched

    with open(path) as fh:
        raw = yaml.safe_load(fh)
    if raw.get("kind") != "siren":
        raise SystemExit(f"{path}: --siren-psnr needs a siren recipe")
    raw["hparams"] = {**raw.get("hparams", {}), "epochs": steps, "psnr_target": psnr}
    recipe = Recipe.from_dict(raw, source=path)
    recipe_task(recipe.data)  # read once, before any timing
    original = batched.train_chunk_batched
    if not compact:  # the engine as before compaction: stopped INRs stay in the batch
        batched.train_chunk_batched = functools.partial(original, compact=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            build_zoo(recipe, Path(tmp) / "warm.h5", limit=2, progress=False, engine=engine)
            w0, c0 = _clock()
            out = build_zoo(recipe, Path(tmp) / "zoo.h5", limit=nets, progress=False,
                            engine=engine)  # fmt: skip
            w1, c1 = _clock()
            from metanet.data.zoo_store import Zoo

            with Zoo.open(out) as zoo:
                g = zoo[zoo.architectures[0]]
                final = g.metrics["final"] == 1
                taken = np.asarray(g.metrics["steps"])[final]
                got = np.asarray(g.metrics["psnr"])[final]
                n = int(final.sum())
    finally:
        batched.train_chunk_batched = original
    return {"recipe": recipe.name, "nets": n, "wall": 60 * n / (w1 - w0),
            "cpu": 60 * n / (c1 - c0), "seconds": w1 - w0, "steps": taken, "psnr": got,
            "compact": compact}  # fmt: skip


def inr_probe(path: str) -> str:
    """Logistic-regression accuracy of the digit class from an INR zoo's flattened weights
    (train: INRs of the digits train split; test: INRs of the test split); a markdown table."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from metanet.data.zoo_store import Zoo

    rows = []
    with Zoo.open(path) as zoo:
        for g in zoo:
            m = g.metrics
            if "label" not in m or "split" not in m:
                raise SystemExit(f"{path}: group {g.name} is not an INR zoo (no label/split)")
            params = g.params()
            x = torch.cat([v.flatten(1) for v in params.values()], dim=1).numpy()
            y, split = np.asarray(m["label"]), np.asarray(m["split"])
            tr, te = split == 0, split == 1
            if not tr.any() or not te.any():
                raise SystemExit(f"{path}: needs INRs of both digits splits")
            scaler = StandardScaler().fit(x[tr])
            clf = LogisticRegression(max_iter=3000).fit(scaler.transform(x[tr]), y[tr])
            acc_w = clf.score(scaler.transform(x[te]), y[te])
            d = recipe_task(zoo.attrs["data"])
            pix_tr = d.train.x.flatten(1).numpy()[np.asarray(m["image_index"])[tr]]
            pix_te = d.test.x.flatten(1).numpy()[np.asarray(m["image_index"])[te]]
            clf_p = LogisticRegression(max_iter=3000).fit(pix_tr, y[tr])
            acc_p = clf_p.score(pix_te, y[te])
            psnr = np.asarray(m["psnr"])
            counts = np.bincount(y[tr], minlength=10)
            rows.append(
                f"| {g.name} | {int(tr.sum())} / {int(te.sum())} | "
                f"{np.median(psnr):.1f} ({psnr.min():.1f}-{psnr.max():.1f}) | "
                f"{counts.max() / counts.sum():.3f} | {acc_w:.3f} | {acc_p:.3f} |"
            )
    head = [
        f"INR probe: {path}",
        "",
        "| group | INRs train / test | PSNR dB median (min-max) | majority class | "
        "logreg on weights (test acc) | logreg on pixels (test acc) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    return "\n".join(head + rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", default=None,
                        help="classifier recipe (repeatable; default digits-mlp and digits-cnn)")
    parser.add_argument("--nets", type=int, default=200, help="networks built by metanet")
    parser.add_argument("--plain-nets", type=int, default=None,
                        help="networks trained one by one (default: all --nets, equal work)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both")
    parser.add_argument("--engine", default="auto", choices=["auto", "batched", "vmap"])
    parser.add_argument("--workers", type=int, default=1,
                        help="metanet worker processes (the plain loop stays one process)")
    parser.add_argument("--inr-probe", default=None, metavar="ZOO.h5",
                        help="only run the INR learnability probe on this zoo")  # fmt: skip
    parser.add_argument("--siren-psnr", type=float, default=None, metavar="DB",
                        help="only time an INR zoo build with an early stop at DB (see above)"
                        )  # fmt: skip
    parser.add_argument("--siren-steps", type=int, default=1000, help="step cap of --siren-psnr")
    parser.add_argument("--siren-recipe", default="datasets/digits-siren.yaml",
                        help="SIREN recipe of --siren-psnr")  # fmt: skip
    parser.add_argument("--siren-no-compact", action="store_true",
                        help="keep stopped INRs in the batch (the engine before compaction)"
                        )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cli = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: python scripts/bench_zoo.py {cli}")
    if args.inr_probe:
        print(inr_probe(args.inr_probe))
        return 0
    if args.siren_psnr is not None:
        r = bench_siren(args.siren_recipe, args.nets, args.siren_psnr, args.siren_steps,
                        args.engine, compact=not args.siren_no_compact)  # fmt: skip
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"machine: {platform.machine()} cpus={os.cpu_count()} torch={torch.__version__} "
              f"threads={args.threads} engine={args.engine} load1={load:.1f}")  # fmt: skip
        print()
        print("| recipe | INRs | step cap | stopped INRs leave the batch | INRs/min | "
              "INRs/CPU-min | seconds | steps taken mean (min-max) | PSNR dB median |"
              )  # fmt: skip
        print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        st = r["steps"]
        print(f"| {r['recipe']} | {r['nets']} | {args.siren_steps} | "
              f"{'yes' if r['compact'] else 'no'} | {r['wall']:.0f} | {r['cpu']:.0f} | "
              f"{r['seconds']:.1f} | {st.mean():.0f} ({st.min()}-{st.max()}) | "
              f"{np.median(r['psnr']):.1f} |")  # fmt: skip
        return 0
    recipes = args.recipe or ["datasets/digits-mlp.yaml", "datasets/digits-cnn.yaml"]
    plain = args.nets if args.plain_nets is None else args.plain_nets
    rows = [bench_recipe(r, args.nets, plain, args.engine, args.workers) for r in recipes]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.machine()} cpus={os.cpu_count()} torch={torch.__version__} "
          f"threads={args.threads} engine={args.engine} workers={args.workers} "
          f"load1={load:.1f}")  # fmt: skip
    print()
    print("| arch (recipe) | nets (metanet / plain) | epochs per net | plain nets/min | "
          "metanet nets/min | ratio | plain nets/CPU-min | metanet nets/CPU-min | CPU ratio | "
          "mean final test acc (plain / metanet) | plain time evaluating |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['arch']} ({r['recipe']}) | {r['nets']} / {r['plain_nets']} | {r['epochs']} | "
              f"{r['plain_wall']:.0f} | {r['meta_wall']:.0f} | "
              f"{r['meta_wall'] / r['plain_wall']:.1f}x | {r['plain_cpu']:.0f} | "
              f"{r['meta_cpu']:.0f} | {r['meta_cpu'] / r['plain_cpu']:.1f}x | "
              f"{r['plain_acc']:.3f} / {r['meta_acc']:.3f} | "
              f"{100 * r['plain_eval_share']:.0f}% |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
