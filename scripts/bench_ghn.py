"""Benchmark: graph hypernetworks (low-rank vs tiling decoder) on held-out digits architectures.

1. Trains one GHN per decoder on ``datasets/ghn-digits-family.yaml`` (``--steps`` AdamW steps,
   4 sampled architectures x 64 digits images per step; the loop of
   :class:`metanet.tasks.hypernet.GHNTask`).
2. On the recipe's held-out architectures (wider and deeper than any training sample), for
   seeds 0..2: test accuracy of the predicted parameters with no training vs PyTorch's default
   init; then SGD (``--ft-lr`` 0.02, momentum 0.9, batch 64) from each init for ``--ft-steps``
   steps, evaluated every 20 steps: steps until 90% of the converged accuracy (converged = mean of
   the last 3 evaluations of the default-init run of the same seed), ``>N`` if never.
3. Decoder parameter counts for very wide targets (max width W covered without tiling).
4. Wall time to trace and predict all parameters of a ResNet-18-sized model (11.7 M parameters)
   on CPU.

Norm layers use batch statistics at evaluation (see :mod:`metanet.tasks.hypernet`).
Usage: python scripts/bench_ghn.py [--steps 800] [--ft-steps 200] [--ft-lr 0.02] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from bench_common import ResNet18
from torch import nn

from metanet.data.digits import load_digits
from metanet.graph.arch import ArchGraph
from metanet.hyper.family import ArchFamily
from metanet.hyper.ghn import GHN
from metanet.tasks.hypernet import GHNTask, arch_inputs
from metanet.zoo.architectures import arch_name, build_module

GHN_KW = {"hidden": 64, "layers": 3, "decoder_hidden": 64, "kernel": 5, "max_dist": 3}
DECODERS = {"lowrank": {"decoder": "lowrank", "rank": 8, "max_dim": 256},
            "tiling": {"decoder": "tiling", "chunk": 32}}  # fmt: skip


# -- helpers ---------------------------------------------------------------------------------------
def accuracy(module: nn.Module, arch: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    module.train()  # batch statistics in norm layers, as in GHN training
    with torch.no_grad():
        return (module(arch_inputs(arch, x)).argmax(-1) == y).float().mean().item()


def finetune(module: nn.Module, arch: dict, d, steps: int, seed: int,
             lr: float) -> list[tuple[int, float]]:  # fmt: skip
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    curve = [(0, accuracy(module, arch, d.x_test, d.y_test))]
    for step in range(1, steps + 1):
        idx = torch.randint(0, d.x_train.shape[0], (64,), generator=g)
        module.train()
        loss = F.cross_entropy(module(arch_inputs(arch, d.x_train[idx])), d.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            curve.append((step, accuracy(module, arch, d.x_test, d.y_test)))
    return curve


def predicted_module(task: GHNTask, arch: dict) -> nn.Module:
    """A fresh module of ``arch`` holding the parameters ``task``'s GHN predicts for it."""
    m = build_module(arch)
    with torch.no_grad():
        task.ghn.load_into(m)
    return m


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, a in curve if a >= target), None)


def ms(vals: list[float], digits: int = 3) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def train_ghn(decoder: str, family: ArchFamily, d, steps: int, seed: int = 0,
              normalize: str = "fan_in") -> GHNTask:  # fmt: skip
    torch.manual_seed(seed)
    task = GHNTask(ghn={**GHN_KW, **DECODERS[decoder], "normalize": normalize}, lr=1e-3,
                   cache_size=2048)  # fmt: skip
    opt = torch.optim.AdamW(task.ghn.parameters(), lr=1e-3, weight_decay=1e-5)
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    t0, losses = time.perf_counter(), []
    for step in range(1, steps + 1):
        idx = torch.randint(0, d.x_train.shape[0], (64,), generator=g)
        archs = [family.sample(rng) for _ in range(4)]
        outs = task.forward_archs(archs, d.x_train[idx])
        loss = torch.stack([F.cross_entropy(o, d.y_train[idx]) for o in outs]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.ghn.parameters(), 5.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps:
            print(f"  [{decoder}] step {step}: train CE (last 50) "
                  f"{statistics.mean(losses[-50:]):.3f}  ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr)  # fmt: skip
    return task


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800, help="GHN training steps per decoder")
    ap.add_argument("--ft-steps", type=int, default=200, help="SGD steps from each init")
    ap.add_argument("--ft-lr", type=float, default=0.02, help="SGD learning rate (momentum 0.9)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipe", default="datasets/ghn-digits-family.yaml")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the machine is shared: one thread avoids oversubscription
    d = load_digits()
    family = ArchFamily.from_yaml(args.recipe)
    t_all = time.perf_counter()

    ghns = {}
    for dec in DECODERS:
        t0 = time.perf_counter()
        ghns[dec] = train_ghn(dec, family, d, args.steps)
        ghns[dec].train_seconds = time.perf_counter() - t0

    # in-family check: mean test accuracy on 8 fresh family samples (no training)
    rng = random.Random(123)
    fam_archs = [family.sample(rng) for _ in range(8)]

    def predicted(dec: str, arch: dict) -> nn.Module:
        return predicted_module(ghns[dec], arch)

    print(f"\nGHN benchmark: {args.steps} GHN training steps per decoder (4 archs x 64 images "
          f"per step), SGD fine-tuning {args.ft_steps} steps (lr {args.ft_lr:g}), "
          f"seeds {args.seeds}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("In-family architectures (8 unseen samples of the training family), test accuracy "
          "with no training:\n")
    print("| init | mean test acc |")
    print("| --- | --- |")
    for seed in args.seeds[:1]:
        torch.manual_seed(seed)
        accs = [accuracy(build_module(a), a, d.x_test, d.y_test) for a in fam_archs]
        print(f"| default (PyTorch) | {ms([statistics.mean(accs)])} |")
    for dec in DECODERS:
        accs = [accuracy(predicted(dec, a), a, d.x_test, d.y_test) for a in fam_archs]
        print(f"| GHN {dec} | {ms([statistics.mean(accs)])} |")

    print("\nHeld-out architectures (wider/deeper than any training sample): test accuracy with "
          "no training, and SGD steps to 90% of converged accuracy (mean ± std over seeds):\n")
    print("| architecture | params | init | acc, no training | steps to 90% | converged acc |")
    print("| --- | --- | --- | --- | --- | --- |")
    for arch in family.held_out:
        name = arch_name(arch)
        rows: dict[str, dict[str, list]] = {k: {"acc0": [], "steps": [], "conv": []}
                                            for k in ["default", *DECODERS]}  # fmt: skip
        nparams = sum(p.numel() for p in build_module(arch).parameters())
        for seed in args.seeds:
            torch.manual_seed(seed)
            base = build_module(arch)
            curves = {"default": finetune(base, arch, d, args.ft_steps, seed, args.ft_lr)}
            for dec in DECODERS:
                curves[dec] = finetune(predicted(dec, arch), arch, d, args.ft_steps, seed,
                                       args.ft_lr)  # fmt: skip
            conv = statistics.mean(a for _, a in curves["default"][-3:])
            for k, c in curves.items():
                rows[k]["acc0"].append(c[0][1])
                rows[k]["steps"].append(steps_to(c, 0.9 * conv))
                rows[k]["conv"].append(statistics.mean(a for _, a in c[-3:]))
        for k, r in rows.items():
            hit = [s for s in r["steps"] if s is not None]
            st = ms([float(s) for s in hit], 0) if len(hit) == len(r["steps"]) else (
                f"{ms([float(s) for s in hit], 0) if hit else ''} (>{args.ft_steps} in "
                f"{len(r['steps']) - len(hit)} runs)")  # fmt: skip
            label = "default (PyTorch)" if k == "default" else f"GHN {k}"
            print(f"| {name} | {nparams} | {label} | {ms(r['acc0'])} | {st} | {ms(r['conv'])} |")

    print("\nDecoder size (decoder MLP hidden 64, kernel 5): parameters of the GHN's decoder "
          "to cover a target width W without tiling:\n")
    print("| W | tiling (chunk W x W x 5 x 5) | low-rank r=8 (A: W x 8, B: 8 x W) | ratio |")
    print("| --- | --- | --- | --- |")
    for w in (32, 256, 1024, 4096):
        with torch.device("meta"):
            tile = GHN(**{**GHN_KW, "decoder": "tiling", "chunk": w}).num_decoder_parameters()
            low = GHN(**{**GHN_KW, "decoder": "lowrank", "rank": 8, "max_dim": w}
                      ).num_decoder_parameters()  # fmt: skip
        print(f"| {w} | {tile:,} | {low:,} | {tile / low:.0f}x |")
    print("\nTrained GHNs above: " + ", ".join(
        f"{dec}: {sum(p.numel() for p in t.ghn.parameters()):,} params "
        f"({t.ghn.num_decoder_parameters():,} decoder), trained {t.train_seconds:.0f} s"
        for dec, t in ghns.items()))  # fmt: skip

    print("\nTime to predict all parameters of a ResNet-18-sized model on CPU "
          "(median of 3; trace = ArchGraph.from_module + GHN.prepare):\n")
    print("| decoder | model params | trace + prepare (s) | predict + load (s) |")
    print("| --- | --- | --- | --- |")
    for dec, task in ghns.items():
        ghn = task.ghn.eval()
        t_tr, t_pr = [], []
        for _ in range(3):
            model = ResNet18()
            t0 = time.perf_counter()
            prepared = ghn.prepare(ArchGraph.from_module(model), model)
            t1 = time.perf_counter()
            with torch.no_grad():
                params = ghn.predict_prepared([prepared])[0]
                named = dict(model.named_parameters())
                for k, v in params.items():
                    named[k].copy_(v)
            t_pr.append(time.perf_counter() - t1)
            t_tr.append(t1 - t0)
        n = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            out = model(torch.rand(2, 3, 64, 64))
        assert torch.isfinite(out).all()
        print(f"| {dec} | {n:,} | {statistics.median(t_tr):.3f} | {statistics.median(t_pr):.3f} |")
    print(f"\ntotal wall time {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
