"""metanet's main job end to end: predict how well trained checkpoints generalize, from weights.

1. build a tiny digits-cnn model zoo  (``metanet zoo build datasets/digits-cnn.yaml --limit N``)
2. train an accuracy predictor on it   (``metanet fit --config configs/predict_gen/<model>.yaml``)
3. test it on held-out training runs   (``metanet test ...``: writes predicted_vs_true.png)
4. rank ordinary checkpoints           (``metanet predict-accuracy --predictor best.ckpt *.pt``)

Every step calls the real ``metanet`` command (in-process). Outputs go to ``.cache/demo`` (zoo,
exported checkpoints) and ``runs/demo`` (logs, checkpoints, plots).

    python scripts/demo.py                 # make demo
    python scripts/demo.py --networks 60 --epochs 20 --model nfn_np
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _banner(step: str) -> None:
    print(f"\n=== {step} " + "=" * max(0, 90 - len(step)), flush=True)


def _export_checkpoints(
    zoo_path: str, seed: int, folder: str, count: int
) -> list[tuple[str, float]]:
    """Save ``count`` networks of the held-out test runs as ordinary checkpoint files (a
    state_dict, a safetensors file, a Lightning-style checkpoint); returns (path, true acc)."""
    from metanet.data.datamodules import WeightSpaceDataModule
    from metanet.serialization import save_state_dict

    dm = WeightSpaceDataModule(zoo_path, splits=(0.7, 0.1, 0.2), seed=seed)
    dm.setup()
    _, rid = dm.splits["test"]
    group = dm.zoo[dm.group]
    acc = group.metrics["test_acc"][rid]
    picks = rid[np.argsort(acc)][np.linspace(0, len(rid) - 1, count).round().astype(int)]
    os.makedirs(folder, exist_ok=True)
    out = []
    for n, i in enumerate(np.unique(picks)):
        i = int(i)
        kind = ("state_dict", "safetensors", "lightning")[n % 3]
        suffix = ".safetensors" if kind == "safetensors" else ".pt"
        path = os.path.join(folder, f"cnn_{n}_{kind}{suffix}")
        if kind == "state_dict":
            torch.save(group.state_dict(i), path)
        elif kind == "safetensors":  # the pickle-free format (a pickled module needs trust)
            save_state_dict(path, group.state_dict(i))
        else:
            sd = {f"model.{k}": v for k, v in group.state_dict(i).items()}
            torch.save({"state_dict": sd, "epoch": int(group.metrics["epoch"][i])}, path)
        out.append((path, float(group.metrics["test_acc"][i])))
    return out


def metanet(argv: list[str]) -> int:
    """Run ``metanet ARGV`` in this process (sys.argv cleared so LightningCLI reads only ARGV)."""
    from metanet.cli import main as cli_main

    saved = sys.argv
    sys.argv = [saved[0]]
    try:
        return cli_main(argv)
    finally:
        sys.argv = saved


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", type=int, default=100, help="networks in the demo zoo")
    parser.add_argument("--model", default="nfn_hnp", help="configs/predict_gen/<model>.yaml")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--checkpoints", type=int, default=6, help="files to rank")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small models on a shared 2-core machine: one thread is fastest
    start = time.time()
    work = os.path.join(ROOT, ".cache", "demo")
    run = os.path.join(ROOT, "runs", "demo", args.model)
    zoo = os.path.join(work, f"digits-cnn-{args.networks}.h5")
    os.makedirs(work, exist_ok=True)

    _banner(f"1/4 metanet zoo build datasets/digits-cnn.yaml --limit {args.networks}")
    code = metanet(["zoo", "build", os.path.join(ROOT, "datasets", "digits-cnn.yaml"),
                    "--limit", str(args.networks), "-o", zoo, "--no-progress",
                    "--overwrite"])  # fmt: skip  # the demo cache follows the recipe
    if code:
        return code
    metanet(["zoo", "info", zoo])

    config = os.path.join(ROOT, "configs", "predict_gen", f"{args.model}.yaml")
    checkpoint = (
        '[{"class_path": "metanet.tasks.checkpoint.ModelCheckpoint", "init_args": '
        f'{{"dirpath": "{run}/checkpoints", "filename": "best", "monitor": "val/kendall_tau", '
        '"mode": "max", "save_last": true, "enable_version_counter": false}}]'
    )
    common = [
        "--config", config,
        "--seed_everything", str(args.seed),
        "--data.init_args.zoo", zoo,
        "--data.init_args.splits", "[0.7, 0.1, 0.2]",
        "--data.init_args.seed", str(args.seed),
        "--data.init_args.batch_size", "16",
        "--trainer.default_root_dir", run,
        "--trainer.logger.init_args.save_dir", run,
        "--trainer.callbacks", checkpoint,
        "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", "5",
    ]  # fmt: skip
    shutil.rmtree(run, ignore_errors=True)
    _banner(f"2/4 metanet fit --config configs/predict_gen/{args.model}.yaml "
            f"--trainer.max_epochs {args.epochs}")  # fmt: skip
    metanet(["fit", *common, "--trainer.max_epochs", str(args.epochs),
             "--trainer.enable_progress_bar", "false"])  # fmt: skip
    best = os.path.join(run, "checkpoints", "best.ckpt")

    _banner("3/4 metanet test --ckpt_path best.ckpt  (held-out training runs)")
    metanet(["test", *common, "--ckpt_path", best, "--trainer.enable_progress_bar", "false"])

    _banner("4/4 metanet predict-accuracy --predictor best.safetensors <checkpoint files>")
    shared = os.path.join(run, "checkpoints", "best.safetensors")  # the pickle-free copy
    files = _export_checkpoints(zoo, args.seed, os.path.join(work, "checkpoints"),
                                args.checkpoints)  # fmt: skip
    print("$ metanet predict-accuracy --predictor " + os.path.relpath(shared, ROOT) + " "
          + " ".join(os.path.relpath(p, ROOT) for p, _ in files))  # fmt: skip
    code = metanet(["predict-accuracy", "--predictor", shared, *(p for p, _ in files)])
    if code:
        return code
    print("\ntrue test accuracy of those checkpoints (measured when the zoo was built):")
    for path, acc in sorted(files, key=lambda f: -f[1]):
        print(f"  {acc:.4f}  {os.path.relpath(path, ROOT)}")
    print(f"\ndemo finished in {time.time() - start:.0f} s; run folder: "
          f"{os.path.relpath(run, ROOT)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
