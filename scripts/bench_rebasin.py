#!/usr/bin/env python
"""Git Re-Basin weight matching: metanet vs. the ``rebasin`` package (PyPI), side by side.

Trains two MLPs on scikit-learn's digits from different seeds, saves them, aligns model B to
model A with ``metanet.weightspace.align.weight_matching`` here and with
``rebasin.PermutationCoordinateDescent`` in a separate virtual environment
(``.cache/peers/rebasin``, created on first use: ``python3 -m venv`` + ``pip install torch==2.13.0
rebasin``), run as a subprocess that loads the same two saved models. Both aligned models are then
scored by the same code here: the loss barrier on the linear path from A to aligned B (train and
test cross-entropy, 21 points), whether B's function is unchanged, and the alignment time (median of
``--repeats`` runs, one CPU thread for both).

Usage: .venv/bin/python scripts/bench_rebasin.py [--width 128] [--steps 600] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metanet.data.digits import load_digits  # noqa: E402
from metanet.weightspace import WeightSpace, permute  # noqa: E402
from metanet.weightspace.align import loss_barrier, weight_matching  # noqa: E402

PEER_VENV = ROOT / ".cache" / "peers" / "rebasin"
WORK = ROOT / ".cache" / "bench_rebasin"

PEER_SCRIPT = textwrap.dedent(
    """
    import json, statistics, sys, time
    import torch
    from torch import nn
    torch.set_num_threads(1)
    from rebasin import PermutationCoordinateDescent

    work, width, depth, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

    def mlp():
        layers, prev = [], 64
        for _ in range(depth):
            layers += [nn.Linear(prev, width), nn.ReLU()]
            prev = width
        return nn.Sequential(*layers, nn.Linear(prev, 10))

    x = torch.load(f"{work}/data.pt")["x_train"][:64]
    times, init_times = [], []
    for _ in range(repeats):
        a, b = mlp(), mlp()
        a.load_state_dict(torch.load(f"{work}/model_a.pt"))
        b.load_state_dict(torch.load(f"{work}/model_b.pt"))
        t0 = time.perf_counter()
        pcd = PermutationCoordinateDescent(a, b, x)
        t1 = time.perf_counter()
        pcd.rebasin(max_iterations=100)
        t2 = time.perf_counter()
        init_times.append(t1 - t0)
        times.append(t2 - t0)
    torch.save(b.state_dict(), f"{work}/rebasin_b.pt")
    import importlib.metadata as md
    print(json.dumps({"time": statistics.median(times), "init": statistics.median(init_times),
                      "version": md.version("rebasin")}))
    """
)


def mlp(width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = 64
    for _ in range(depth):
        layers += [nn.Linear(prev, width), nn.ReLU()]
        prev = width
    return nn.Sequential(*layers, nn.Linear(prev, 10))


def train(seed: int, width: int, depth: int, steps: int, x, y) -> nn.Module:
    torch.manual_seed(seed)
    net = mlp(width, depth)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def ensure_peer_venv() -> Path:
    python = PEER_VENV / "bin" / "python"
    ok = (
        python.exists()
        and subprocess.run(
            [str(python), "-c", "import rebasin, torch"], capture_output=True
        ).returncode
        == 0
    )
    if not ok:
        print(f"creating {PEER_VENV} (python3 -m venv; pip install torch==2.13.0 rebasin) ...")
        subprocess.run(["python3", "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "rebasin"], check=True
        )
    return python


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    WORK.mkdir(parents=True, exist_ok=True)

    data = load_digits()
    x_tr, x_te = data.flat()
    y_tr, y_te = data.y_train, data.y_test
    net_a = train(0, args.width, args.depth, args.steps, x_tr, y_tr)
    net_b = train(1, args.width, args.depth, args.steps, x_tr, y_tr)
    torch.save(net_a.state_dict(), WORK / "model_a.pt")
    torch.save(net_b.state_dict(), WORK / "model_b.pt")
    torch.save({"x_train": x_tr}, WORK / "data.pt")
    template = mlp(args.width, args.depth).eval()

    def loss_on(x, y):
        def f(ws: WeightSpace) -> float:
            with torch.no_grad():
                return float(F.cross_entropy(ws.load_into(template)(x), y))

        return f

    def logits(ws: WeightSpace) -> torch.Tensor:
        with torch.no_grad():
            return ws.load_into(template)(x_te)

    ws_a, ws_b = WeightSpace.from_module(net_a), WeightSpace.from_module(net_b)

    # metanet
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        perms = weight_matching(ws_a, ws_b, max_iter=100, seed=0)
        times.append(time.perf_counter() - t0)
    ours = permute(ws_b, perms)

    # rebasin, in its own venv
    rows = []
    peer_error = None
    peer = None
    try:
        python = ensure_peer_venv()
        proc = subprocess.run(
            [str(python), "-c", PEER_SCRIPT, str(WORK), str(args.width), str(args.depth),
             str(args.repeats)],
            capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        if proc.returncode != 0:
            peer_error = proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"
        else:
            info = json.loads(proc.stdout.strip().splitlines()[-1])
            theirs_mod = mlp(args.width, args.depth)
            theirs_mod.load_state_dict(torch.load(WORK / "rebasin_b.pt"))
            peer = (info, WeightSpace.from_module(theirs_mod))
    except (subprocess.SubprocessError, OSError) as err:
        peer_error = f"{type(err).__name__}: {err}"

    candidates = [("none (B as trained)", None, ws_b), ("metanet weight_matching", times, ours)]
    if peer is not None:
        info, theirs = peer
        candidates.append((f"rebasin {info['version']} PCD", [info["time"]], theirs))
    ref_logits = logits(ws_b)
    for name, t, aligned in candidates:
        tr, _ = loss_barrier(loss_on(x_tr, y_tr), ws_a, aligned, 21)
        te, _ = loss_barrier(loss_on(x_te, y_te), ws_a, aligned, 21)
        same = float((logits(aligned) - ref_logits).abs().max())
        rows.append((name, statistics.median(t) if t else None, tr, te, same))

    print(
        f"\nGit Re-Basin on a digits MLP 64-{'-'.join([str(args.width)] * args.depth)}-10 "
        f"(2 nets, {args.steps} full-batch Adam steps each; 1 CPU thread)"
    )
    print(
        "| method | align time (s) | train loss barrier | test loss barrier | max |dlogits| vs B |"
    )
    print("|---|---|---|---|---|")
    for name, t, tr, te, same in rows:
        ts = f"{t:.3f}" if t is not None else "-"
        print(f"| {name} | {ts} | {tr:.4f} | {te:.4f} | {same:.1e} |")
    if peer is not None:
        info, theirs = peer
        print(
            f"\nrebasin time includes its model tracing (PermutationInitializer: {info['init']:.3f}"
            f" s); max |metanet - rebasin| over aligned weights: {ours.max_abs_diff(theirs):.2e}"
        )
    else:
        print(f"\nrebasin could not be run: {peer_error}")


if __name__ == "__main__":
    main()
