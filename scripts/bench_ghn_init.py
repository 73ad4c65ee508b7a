"""Benchmark: GHN-predicted vs PyTorch default initialisation of held-out digits transformers.

1. Trains a GHN (``--decoder``, the loop of :class:`metanet.tasks.hypernet.GHNTask`: ``--steps``
   AdamW steps, 4 architectures x 64 images per step, gradient clip 5) on
   ``configs/ghn/digits-transformer-family.yaml`` (MLPs, CNNs and small ViT-like transformers,
   :class:`metanet.hyper.family.PatchTransformer`), on the training split of the digits with a
   20% validation split; or loads one (``--ghn PATH``, e.g. from
   ``metanet fit --config configs/ghn/digits-transformer.yaml``).
2. For each held-out transformer of the recipe (wider and deeper than any training sample) and
   seeds 0..2: the default init (``torch.manual_seed(seed)`` then the constructor) and the GHN
   init (the same module, GHN-predicted parameters) are trained with the same schedule (Adam,
   and SGD with momentum 0.9; batch 64, constant learning rate, batches drawn by ``seed``) for
   ``--ft-steps`` steps; validation and test accuracy are recorded at ``--eval-at`` steps. Per
   (architecture, init, optimizer, step count) the learning rate of the grid with the best mean
   validation accuracy over seeds is chosen, and its test accuracy (mean +- std over seeds) is
   printed: hyperparameters are chosen on validation only.
3. BatchNorm calibration: the held-out BatchNorm CNN, eval-mode test accuracy of the predicted
   parameters with the module's initial running statistics vs after
   :func:`metanet.hyper.calibrate.calibrate_batchnorm` on 8 training batches.
4. ``--keep-output``: a third init, "GHN, own head": the GHN's prediction with the output layer
   left to the module's own init (:meth:`GHN.predict` with ``keep_output=True``).
5. ``--diagnose``: per-tensor RMS of the predicted parameters against the default init's, and
   attention-logit / residual-stream scales of each init.

Usage: python scripts/bench_ghn_init.py [--steps 1000] [--ft-steps 300] [--seeds 0 1 2]
       [--normalize scaled|fan_in] [--train-recipe datasets/ghn-digits-family.yaml]
       [--ghn SAVED.safetensors] [--save-ghn OUT.safetensors] [--diagnose] [--keep-output]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metanet.data.tasks import load_task_data
from metanet.hyper.calibrate import calibrate_batchnorm, task_batches
from metanet.hyper.family import ArchFamily
from metanet.hyper.ghn import GHN
from metanet.tasks.hypernet import GHNTask, arch_inputs
from metanet.zoo.architectures import arch_name, build_module

RECIPE = "configs/ghn/digits-transformer-family.yaml"
DATA = {"provider": "digits", "val_fraction": 0.2}
GHN_KW = {"hidden": 64, "layers": 3, "decoder_hidden": 64, "kernel": 5, "max_dist": 3}
DECODERS = {"lowrank": {"decoder": "lowrank", "rank": 8, "max_dim": 256},
            "tiling": {"decoder": "tiling", "chunk": 32}}  # fmt: skip
GRIDS = {"adam": [3e-4, 1e-3, 3e-3], "sgd": [0.01, 0.03, 0.1]}


def short(arch: dict) -> str:
    """A readable name for a held-out arch."""
    if arch["type"] == "module":
        a = arch["init_args"]
        return (f"transformer-d{a['dim']}-L{a['depth']}-h{a['heads']}-"
                f"{a.get('attention', 'mha')}")  # fmt: skip
    return arch_name(arch)


def accuracy(module: nn.Module, arch: dict, x: Tensor, y: Tensor,
             train_mode: bool = False) -> float:  # fmt: skip
    module.train(train_mode)
    with torch.no_grad():
        return (module(arch_inputs(arch, x)).argmax(-1) == y).float().mean().item()


def train_ghn(decoder: str, steps: int, family: ArchFamily, x: Tensor, y: Tensor,
              log_every: int = 100, normalize: str = "scaled") -> GHN:  # fmt: skip
    """The GHNTask training loop (AdamW 1e-3, weight decay 1e-5, clip 5)."""
    torch.manual_seed(0)
    task = GHNTask(ghn={**GHN_KW, **DECODERS[decoder], "normalize": normalize}, lr=1e-3)
    opt = task.configure_optimizers()
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        archs = [family.sample(rng) for _ in range(4)]
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        outs = task.forward_archs(archs, x[idx])
        loss = torch.stack([F.cross_entropy(o, y[idx]) for o in outs]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.ghn.parameters(), 5.0)
        opt.step()
        if step % log_every == 0:
            print(f"  ghn step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)  # fmt: skip
    return task.ghn.eval()


def make(arch: dict, seed: int, ghn: GHN | None, keep_output: bool = False) -> nn.Module:
    """The module of ``arch`` built after ``torch.manual_seed(seed)``, then (with ``ghn``) its
    GHN-predicted parameters written in (the output layer left as built with ``keep_output``)."""
    torch.manual_seed(seed)
    module = build_module(arch)
    if ghn is not None:
        example = torch.zeros(1, *arch_inputs(arch, torch.zeros(1, *DATA_SHAPE)).shape[1:])
        ghn.load_into(module, example_input=example, keep_output=keep_output)
    return module


def finetune(module: nn.Module, arch: dict, opt_name: str, lr: float, steps: int, seed: int,
             eval_at: list[int], d: dict[str, Tensor]
             ) -> dict[int, tuple[float, float]]:  # fmt: skip
    """``{step: (val acc, test acc)}`` at the ``eval_at`` steps."""
    if opt_name == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1000 + seed)
    out: dict[int, tuple[float, float]] = {}
    for step in range(0, steps + 1):
        if step in eval_at:
            out[step] = (accuracy(module, arch, d["xv"], d["yv"]),
                         accuracy(module, arch, d["xt"], d["yt"]))  # fmt: skip
        if step == steps:
            break
        idx = torch.randint(0, d["x"].shape[0], (64,), generator=g)
        module.train()
        loss = F.cross_entropy(module(arch_inputs(arch, d["x"][idx])), d["y"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            for s in eval_at:
                if s > step:
                    out[s] = (0.0, 0.0)  # diverged
            break
    return out


def rms(t: Tensor) -> float:
    return t.detach().pow(2).mean().sqrt().item()


def diagnose(arch: dict, ghn: GHN, d: dict[str, Tensor]) -> None:
    """Predicted vs default parameter scales, attention logits and residual stream."""
    default, pred = make(arch, 0, None), make(arch, 0, ghn)
    print(f"\nDiagnosis, {short(arch)}: RMS of each tensor (default init vs GHN)\n")
    print("| tensor | shape | default RMS | GHN RMS | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    dp = dict(default.named_parameters())
    for name, p in pred.named_parameters():
        a, b = rms(dp[name]), rms(p)
        ratio = f"{b / a:.2f}" if a > 1e-9 else "(default 0)"
        print(f"| {name} | {list(p.shape)} | {a:.4f} | {b:.4f} | {ratio} |")
    x = arch_inputs(arch, d["xv"][:256])
    for label, m in (("default", default), ("GHN", pred)):
        stats: list[str] = []
        hooks = []
        for name, sub in m.named_modules():
            if isinstance(sub, nn.MultiheadAttention):
                def hook(mod, args, out, name=name, stats=stats):
                    h = args[0]
                    w, b = mod.in_proj_weight, mod.in_proj_bias
                    q, k, _ = F.linear(h, w, b).chunk(3, dim=-1)
                    nh = mod.num_heads
                    n, t, dim = q.shape
                    q = q.reshape(n, t, nh, dim // nh).transpose(1, 2)
                    k = k.reshape(n, t, nh, dim // nh).transpose(1, 2)
                    logits = q @ k.transpose(-1, -2) / (dim // nh) ** 0.5
                    att = logits.softmax(-1)
                    ent = -(att * att.clamp_min(1e-12).log()).sum(-1).mean().item()
                    uniform = torch.log(torch.tensor(float(t))).item()
                    stats.append(f"{name}: logit std {logits.std().item():.2f}, attention "
                                 f"entropy {ent:.2f} (uniform {uniform:.2f})")
                hooks.append(sub.register_forward_hook(hook))
            if name.startswith("blocks.") and name.count(".") == 1:
                hooks.append(sub.register_forward_hook(
                    lambda mod, a, o, name=name, stats=stats: stats.append(
                        f"{name} out RMS {rms(o):.2f}")))
            if name == "head":
                hooks.append(sub.register_forward_hook(
                    lambda mod, a, o, stats=stats: stats.append(f"logits RMS {rms(o):.2f}")))
        with torch.no_grad():
            m.eval()(x)
        for h in hooks:
            h.remove()
        print(f"\n{label}: " + "; ".join(stats))


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000, help="GHN training steps")
    ap.add_argument("--decoder", default="lowrank", choices=sorted(DECODERS))
    ap.add_argument("--train-recipe", default=RECIPE,
                    help="family the GHN is trained on (default: the transformer family; "
                         "datasets/ghn-digits-family.yaml has no transformer)")  # fmt: skip
    ap.add_argument("--normalize", default="scaled", choices=["scaled", "fan_in"],
                    help="normalisation of predicted parameters of the trained GHN (fan_in: "
                         "GHN-2's, the default before issue 11's fix)")  # fmt: skip
    ap.add_argument("--ghn", default=None, help="load this GHN (GHN.save file or GHNTask ckpt)")
    ap.add_argument("--save-ghn", default=None, help="write the trained GHN here")
    ap.add_argument("--ft-steps", type=int, default=300)
    ap.add_argument("--eval-at", type=int, nargs="+", default=[0, 25, 100, 300])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--optimizers", nargs="+", default=["adam", "sgd"], choices=sorted(GRIDS))
    ap.add_argument("--archs", type=int, nargs="*", default=None,
                    help="indices of the held-out transformers to run (default all)")
    ap.add_argument("--diagnose", action="store_true")
    ap.add_argument("--keep-output", action="store_true",
                    help="also train the GHN init with the output layer left to the "
                         "module's own init (GHN.predict(keep_output=True)): 'GHN, own head'")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    task = load_task_data(DATA)
    global DATA_SHAPE
    DATA_SHAPE = tuple(task.input_shape)
    family = ArchFamily.from_yaml(RECIPE, task=task)
    x, y = task.train.x, task.train.y
    d = {"x": x, "y": y, "xv": task.val.x, "yv": task.val.y, "xt": task.test.x, "yt": task.test.y}
    print(f"GHN init benchmark: data digits train={len(y)} val={len(d['yv'])} "
          f"test={len(d['yt'])}; torch {torch.__version__}, 1 thread; seeds {args.seeds}; "
          f"eval at {args.eval_at}; lr grids {GRIDS}")  # fmt: skip
    if args.ghn:
        ghn = GHN.load(args.ghn).eval()
        print(f"loaded GHN from {args.ghn}: {ghn.config}")
    else:
        t0 = time.perf_counter()
        print(f"training GHN ({args.decoder}, normalize={args.normalize}) for {args.steps} "
              f"steps on {args.train_recipe}",
              flush=True)  # fmt: skip
        train_family = (family if args.train_recipe == RECIPE
                        else ArchFamily.from_yaml(args.train_recipe, task=task))  # fmt: skip
        ghn = train_ghn(args.decoder, args.steps, train_family, x, y,
                        normalize=args.normalize)  # fmt: skip
        print(f"trained in {time.perf_counter() - t0:.0f} s, "
              f"{sum(p.numel() for p in ghn.parameters()):,} parameters")  # fmt: skip
        if args.save_ghn:
            ghn.save(args.save_ghn)
    held = [a for a in family.held_out if a["type"] == "module"]
    if args.archs is not None:
        held = [held[i] for i in args.archs]
    if args.diagnose:
        for arch in held:
            diagnose(arch, ghn, d)
    steps = max(args.eval_at)
    for arch in held:
        n_params = sum(p.numel() for p in build_module(arch).parameters())
        # results[init][opt][lr][seed] = {step: (val, test)}
        results: dict[str, dict[str, dict[float, list[dict[int, tuple[float, float]]]]]] = {}
        t0 = time.perf_counter()
        inits = [("default", None, False), ("GHN", ghn, False)]
        if args.keep_output:
            inits.append(("GHN, own head", ghn, True))
        for init, net, keep in inits:
            results[init] = {}
            for opt_name in args.optimizers:
                results[init][opt_name] = {}
                for lr in GRIDS[opt_name]:
                    runs = []
                    for seed in args.seeds:
                        module = make(arch, seed, net, keep_output=keep)
                        runs.append(finetune(module, arch, opt_name, lr, steps, seed,
                                             args.eval_at, d))  # fmt: skip
                    results[init][opt_name][lr] = runs
        print(f"\n{short(arch)} ({n_params:,} parameters; {time.perf_counter() - t0:.0f} s): "
              "test accuracy (mean ± std over seeds) at the learning rate with the best mean "
              "validation accuracy at that step\n")  # fmt: skip
        head = " | ".join(f"{s} steps" for s in args.eval_at)
        print(f"| optimizer | init | {head} |")
        print("| --- | --- |" + " --- |" * len(args.eval_at))
        for opt_name in args.optimizers:
            for init in results:
                cells = []
                for s in args.eval_at:
                    by_lr = results[init][opt_name]
                    best = max(by_lr, key=lambda lr: statistics.mean(r[s][0] for r in by_lr[lr]))
                    cells.append(f"{fmt([r[s][1] for r in by_lr[best]])} (lr {best:g})")
                print(f"| {opt_name} | {init} | " + " | ".join(cells) + " |")
    # BatchNorm calibration on the held-out BN CNN
    bn_archs = [a for a in family.held_out if a["type"] == "cnn" and a.get("norm") == "batch"]
    for arch in bn_archs:
        module = make(arch, 0, ghn)
        train_mode = accuracy(module, arch, d["xt"], d["yt"], train_mode=True)
        before = accuracy(module, arch, d["xt"], d["yt"])
        report = calibrate_batchnorm(module, task_batches(task, 8, 64, seed=0))
        after = accuracy(module, arch, d["xt"], d["yt"])
        print(f"\nBatchNorm calibration, {arch_name(arch)} with GHN-predicted parameters, test "
              f"accuracy with no training ({report.summary()}):\n")  # fmt: skip
        print("| statistics | test acc |\n| --- | --- |")
        print(f"| eval mode, the module's initial running statistics | {before:.3f} |")
        print(f"| eval mode, calibrated on 8 x 64 training images | {after:.3f} |")
        print(f"| train mode (statistics of the 450 test images themselves) | {train_mode:.3f} |")
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    return 0


DATA_SHAPE: tuple[int, ...] = (1, 8, 8)

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
