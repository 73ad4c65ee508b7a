"""Benchmark: MIP vs plain hypernetworks (metanet) vs the ``hyperlight`` package, on digits.

Task: one hypernetwork conditioned on a regularization strength ``lam`` in [0, 1] produces the
weights of an MLP 64-64-10; the training loss is ``CE + lam * alpha * sum ||W||^2`` with a fresh
``lam ~ U(0, 1)`` every step (Adam or SGD with momentum 0.9, batch 128). Every ``eval_every``
steps the test cross-entropy (task loss only) is averaged over ``lam in {0, 0.5, 1}``; we
report the first step at which it falls below ``--target-loss`` and the final test accuracy
at each ``lam``, over 3 seeds.

The three methods run the *same* training loop (one runner script, written to
``.cache/peers/mip_runner.py``): ``metanet-mip`` and ``metanet-plain`` under this project's
python; ``hyperlight`` (``hyperlight.HyperNet`` + ``hypernetize``, its default cos|sin encoding
and independent weights) in a separate venv ``.cache/peers/hyperlight`` created by this script
(``python3 -m venv`` + ``pip install torch==<this torch> hyperlight``); it is never a metanet
dependency. If the peer cannot be installed or fails, its rows say so.

Usage: python scripts/bench_mip.py [--steps 1000] [--seeds 0 1 2] [--optimizer adam|sgd]
       [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / ".cache" / "peers"

RUNNER = r'''
import json, math, sys, time
import torch
from torch import nn
import torch.nn.functional as F

cfg = json.loads(sys.argv[1])
data = torch.load(cfg["data"])
xtr, ytr, xte, yte = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
torch.set_num_threads(cfg.get("threads", 1))
EVAL_LAMS = [0.0, 0.5, 1.0]


def target_net():
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def build(method, seed):
    torch.manual_seed(seed)
    net = target_net()
    if method.startswith("metanet"):
        from metanet.hyper.mip import MIPHyperNetwork
        h = MIPHyperNetwork(net, cond_dim=1, hidden=cfg["hidden"], mip=(method == "metanet-mip"))

        def predict(lam):
            return h(torch.tensor([lam]))

        def run(params, x):
            return h.functional_call(params, x)

        return h.parameters(), predict, run
    import hyperlight as hl
    modules = hl.find_modules_of_type(net, [nn.Linear])
    net = hl.hypernetize(net, modules=modules)
    hyper = hl.HyperNet(input_shapes={"lam": (1,)}, output_shapes=net.external_shapes(),
                        hidden_sizes=list(cfg["hidden"]))

    def predict(lam):
        return hyper(lam=torch.tensor([lam]))

    def run(params, x):
        with net.using_externals(params):
            return net(x)

    return hyper.parameters(), predict, run


def evaluate(predict, run):
    losses, accs = [], []
    with torch.no_grad():
        for lam in EVAL_LAMS:
            out = run(predict(lam), xte)
            losses.append(F.cross_entropy(out, yte).item())
            accs.append((out.argmax(-1) == yte).float().mean().item())
    return sum(losses) / len(losses), accs


for method in cfg["methods"]:
    for seed in cfg["seeds"]:
        params, predict, run = build(method, seed)
        trainable = [p for p in params if p.requires_grad]
        if cfg["optimizer"] == "adam":
            opt = torch.optim.Adam(trainable, lr=cfg["lr"])
        else:
            opt = torch.optim.SGD(trainable, lr=cfg["lr"], momentum=0.9)
        g = torch.Generator().manual_seed(1000 + seed)
        reached, t0, diverged = None, time.perf_counter(), False
        for step in range(1, cfg["steps"] + 1):
            idx = torch.randint(0, xtr.shape[0], (cfg["batch"],), generator=g)
            lam = float(torch.rand((), generator=g))
            w = predict(lam)
            out = run(w, xtr[idx])
            reg = sum((v ** 2).sum() for k, v in w.items() if k.endswith("weight"))
            loss = F.cross_entropy(out, ytr[idx]) + lam * cfg["alpha"] * reg
            if not torch.isfinite(loss):
                diverged = True
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            if reached is None and step % cfg["eval_every"] == 0:
                if evaluate(predict, run)[0] <= cfg["target_loss"]:
                    reached = step
        final_loss, accs = evaluate(predict, run)
        print(json.dumps({"method": method, "seed": seed, "steps_to_target": reached,
                          "final_test_loss": final_loss, "acc": accs, "diverged": diverged,
                          "seconds": time.perf_counter() - t0}), flush=True)
'''


def _ensure_peer_env(log: list[str]) -> Path | None:
    """Create ``.cache/peers/hyperlight`` (venv with torch + hyperlight); None if it fails."""
    venv = PEERS / "hyperlight"
    py = venv / "bin" / "python"
    check = [str(py), "-c", "import hyperlight, torch"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    torch_req = "torch==" + torch.__version__.split("+")[0]
    steps = [
        ["python3", "-m", "venv", str(venv)],
        [str(py), "-m", "pip", "install", "-q", torch_req, "numpy", "hyperlight"],
    ]
    for cmd in steps:
        print("+", " ".join(cmd), file=sys.stderr)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            log.append(f"peer set-up failed: {' '.join(cmd)}: {res.stderr.strip()[-500:]}")
            return None
    if subprocess.run(check, capture_output=True).returncode != 0:
        log.append("peer set-up: `import hyperlight` fails in .cache/peers/hyperlight")
        return None
    return py


def _run(python: str, cfg: dict, env: dict | None = None) -> tuple[list[dict], str]:
    runner = PEERS / "mip_runner.py"
    runner.write_text(RUNNER)
    res = subprocess.run([python, str(runner), json.dumps(cfg)], capture_output=True, text=True,
                         env=env, cwd=str(ROOT))  # fmt: skip
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    err = "" if res.returncode == 0 else res.stderr.strip().splitlines()[-1:]
    return rows, (err[0] if err else "")


def _fmt(vals: list[float], digits: int = 3) -> str:
    t = torch.tensor(vals, dtype=torch.float64)
    sd = t.std().item() if len(vals) > 1 else 0.0
    return f"{t.mean().item():.{digits}f} ± {sd:.{digits}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--target-loss", type=float, default=0.3)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    ap.add_argument("--lr", type=float, default=None, help="default 1e-3 (adam), 1e-2 (sgd)")
    ap.add_argument("--no-peer", action="store_true", help="skip the hyperlight comparison")
    args = ap.parse_args()

    from metanet.data.digits import load_digits

    PEERS.mkdir(parents=True, exist_ok=True)
    d = load_digits()
    data_path = PEERS / "digits_flat.pt"
    torch.save({"x_train": d.x_train.flatten(1), "y_train": d.y_train,
                "x_test": d.x_test.flatten(1), "y_test": d.y_test}, data_path)  # fmt: skip
    lr = args.lr if args.lr is not None else (1e-3 if args.optimizer == "adam" else 1e-2)
    cfg = {"data": str(data_path), "steps": args.steps, "seeds": args.seeds, "lr": lr,
           "optimizer": args.optimizer,
           "batch": 128, "alpha": 1e-2, "hidden": [64, 64], "eval_every": args.eval_every,
           "target_loss": args.target_loss, "threads": 1}  # fmt: skip

    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rows, err = _run(sys.executable, dict(cfg, methods=["metanet-plain", "metanet-mip"]), env)
    notes: list[str] = []
    if err:
        notes.append(f"metanet runner error: {err}")
    if not args.no_peer:
        py = _ensure_peer_env(notes)
        if py is not None:
            peer_rows, perr = _run(str(py), dict(cfg, methods=["hyperlight"]))
            rows += peer_rows
            if perr:
                notes.append(f"hyperlight runner error: {perr}")

    print(f"\nMIP benchmark: digits MLP 64-64-10 conditioned on L2 strength lam in [0,1]; "
          f"{args.steps} {args.optimizer} steps (lr {lr:g}), seeds {args.seeds}; "
          f"target test CE {args.target_loss} "
          f"(mean over lam=0,0.5,1); torch {torch.__version__}\n")
    print("| method | steps to target loss | final test CE | acc lam=0 | acc lam=0.5 | acc lam=1 "
          "| s/run |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method in ["metanet-plain", "metanet-mip", "hyperlight"]:
        rs = [r for r in rows if r["method"] == method]
        if not rs:
            if method != "hyperlight" or not args.no_peer:
                print(f"| {method} | not run (see notes) | | | | | |")
            continue
        hit = [r["steps_to_target"] for r in rs if r["steps_to_target"] is not None]
        steps = (_fmt(hit, 0) if hit else "never") + f" ({len(hit)}/{len(rs)} reached)"
        accs = [_fmt([r["acc"][j] for r in rs]) for j in range(3)]
        div = " (diverged)" if any(r["diverged"] for r in rs) else ""
        print(f"| {method}{div} | {steps} | {_fmt([r['final_test_loss'] for r in rs])} | "
              f"{' | '.join(accs)} | {_fmt([r['seconds'] for r in rs], 1)} |")
    for n in notes:
        print(f"\nnote: {n}")
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
