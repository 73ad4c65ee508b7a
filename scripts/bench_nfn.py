"""Throughput of metanet's NFN layers (NP, HNP) against the ``nfn`` package; equivariance errors.

Usage::

    .venv/bin/python scripts/bench_nfn.py [--batch 64] [--hidden 16] [--depth 3] [--rounds 3]

Both sides build the same model — ``depth`` NP or HNP layers (1 -> hidden -> ... channels) with
ReLU, invariant pooling (NPPool / HNPPool) and a linear readout — and time forward + backward on
the same batch of weight spaces (zoo-like shapes: the digits MLP 64-32-32-10 and a digits CNN
conv(1->8) conv(8->16) + global pooling + linear(16->10)) on CPU with the same thread count.
The ``nfn`` package runs in its own virtual environment (``.cache/peers/nfn``, created on first
use with ``python3 -m venv`` + ``pip install torch==2.13.0 nfn numpy``) as a subprocess; rounds
alternate between the two sides and the best round of each is reported (the machine may be
shared). The second table is the max abs deviation of every metanet weight-space model's output
under random hidden permutations (float32 and float64).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PEER_DIR = ROOT / ".cache" / "peers" / "nfn"
SHAPES = {
    "mlp": [(32, 64), (32, 32), (10, 32)],
    "cnn": [(8, 1, 3, 3), (16, 8, 3, 3), (10, 16)],
}

PEER_CODE = r"""
import json, sys, time
import torch
from torch import nn
from nfn.common import WeightSpaceFeatures, network_spec_from_wsfeat
from nfn.layers import HNPLinear, NPLinear, HNPPool, NPPool, TupleOp

cfg = json.load(open(sys.argv[1]))
torch.set_num_threads(cfg["threads"])
data = torch.load(cfg["data"])
out = {}
for key, (weights, biases) in data.items():
    arch, mode = key.split(":")
    wsfeat = WeightSpaceFeatures(
        [w.unsqueeze(1) for w in weights], [b.unsqueeze(1) for b in biases]
    )
    spec = network_spec_from_wsfeat(wsfeat)
    layer_cls, pool_cls = (HNPLinear, HNPPool) if mode == "HNP" else (NPLinear, NPPool)
    torch.manual_seed(0)
    mods, c = [], 1
    for _ in range(cfg["depth"]):
        mods += [layer_cls(spec, c, cfg["hidden"]), TupleOp(nn.ReLU())]
        c = cfg["hidden"]
    pool = pool_cls(spec)
    body = nn.Sequential(*mods)
    head = nn.Linear(c * pool_cls.get_num_outs(spec), 1)
    def step():
        y = head(pool(body(wsfeat)).flatten(1))
        y.sum().backward()
    step()
    times = []
    for _ in range(cfg["iters"]):
        t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
    out[key] = min(times)
print(json.dumps(out))
"""


def ensure_peer(python: str = "python3") -> Path:
    """Create ``.cache/peers/nfn`` with torch 2.13.0 and nfn if it is not there yet."""
    exe = PEER_DIR / "bin" / "python"
    probe = [str(exe), "-c", "import nfn, numpy, torch"]
    if exe.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return exe
    print(f"creating peer environment {PEER_DIR} (torch 2.13.0 + nfn) ...", file=sys.stderr)
    PEER_DIR.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-m", "venv", str(PEER_DIR)], check=True)
    pip = [str(exe), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0", "nfn", "numpy"], check=True)
    return exe


def make_batch(shapes: list[tuple[int, ...]], batch: int, seed: int) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(batch, *s, generator=gen) * (1 / s[1]) ** 0.5 for s in shapes]
    biases = [torch.randn(batch, s[0], generator=gen) * 0.1 for s in shapes]
    return weights, biases


def metanet_model(spec, mode: str, hidden: int, depth: int) -> tuple[nn.Module, nn.Module]:
    from metanet.nn.layers import Pointwise
    from metanet.nn.nfn import HNPLinear, HNPPool, NPLinear, NPPool

    layer_cls, pool_cls = (HNPLinear, HNPPool) if mode == "HNP" else (NPLinear, NPPool)
    mods, c = [], 1
    for _ in range(depth):
        mods += [layer_cls(spec, c, hidden), Pointwise(nn.ReLU())]
        c = hidden
    pool = pool_cls(spec, c)
    return nn.Sequential(*mods, pool), nn.Linear(pool.out_dim, 1)


def time_metanet(data: dict, args) -> dict[str, float]:
    from metanet.weightspace import WeightSpaceSpec

    out = {}
    for key, (weights, biases) in data.items():
        arch, mode = key.split(":")
        spec = WeightSpaceSpec.chain([tuple(w.shape[1:]) for w in weights])
        torch.manual_seed(0)
        body, head = metanet_model(spec, mode, args.hidden, args.depth)
        feats = []
        for w, b in zip(weights, biases):
            feats += [w.unsqueeze(1), b.unsqueeze(1)]

        def step(head=head, body=body, feats=feats) -> None:
            head(body(feats)).sum().backward()

        step()
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        out[key] = min(times)
    return out


def equivariance_table() -> list[tuple[str, str, str, float]]:
    """Max abs output deviation under random hidden permutations for every metanet model."""
    from metanet.nn.dws import DWSNet
    from metanet.nn.nfn import NFN, NFNEquivariant
    from metanet.nn.statnn import StatNN
    from metanet.nn.unf import UNF, UNFEquivariant
    from metanet.weightspace import WeightSpace, WeightSpaceSpec, permute, random_permutation

    models = {
        "NFN-HNP": lambda s: NFN(s, hidden=16, num_layers=2, mode="HNP"),
        "NFN-NP": lambda s: NFN(s, hidden=16, num_layers=2, mode="NP"),
        "DWSNet": lambda s: DWSNet(s, hidden=16, num_layers=3),
        "UNF": lambda s: UNF(s, hidden=16, num_layers=2),
        "StatNN": lambda s: StatNN(s),
        "NFNEquivariant-HNP": lambda s: NFNEquivariant(s, hidden=16, num_layers=2, residual=False),
        "NFNEquivariant-NP": lambda s: NFNEquivariant(s, 16, 2, mode="NP", residual=False),
        "UNFEquivariant": lambda s: UNFEquivariant(s, hidden=16, num_layers=2, residual=False),
    }
    rows = []
    for arch, shapes in SHAPES.items():
        spec = WeightSpaceSpec.chain(shapes)
        weights, biases = make_batch(shapes, 8, seed=1)
        for dtype in (torch.float32, torch.float64):
            ws = WeightSpace(spec, weights, biases).to(dtype)
            perms = random_permutation(spec, batch=len(ws))
            moved = permute(ws, perms)
            for name, make in models.items():
                torch.manual_seed(0)
                model = make(spec).to(dtype).eval()
                with torch.no_grad():
                    a, b = model(ws), model(moved)
                    if isinstance(a, WeightSpace):
                        err = permute(a, perms).max_abs_diff(b)
                    else:
                        err = float((a - b).abs().max())
                rows.append((name, arch, str(dtype).replace("torch.", ""), err))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument("--no-peer", action="store_true", help="skip the nfn package")
    parser.add_argument("--archs", default="mlp,cnn", help="comma-separated subset of mlp,cnn")
    parser.add_argument("--no-equivariance", action="store_true", help="skip the second table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))

    data = {}
    for arch in args.archs.split(","):
        shapes = SHAPES[arch]
        for mode in ("NP", "HNP"):
            data[f"{arch}:{mode}"] = make_batch(shapes, args.batch, seed=0)

    peer = None if args.no_peer else ensure_peer()
    best_m: dict[str, float] = {}
    best_p: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_path, cfg_path, code_path = (Path(tmp) / n for n in ("data.pt", "cfg.json", "peer.py"))
        torch.save(data, data_path)
        code_path.write_text(PEER_CODE)
        cfg = {"data": str(data_path), "hidden": args.hidden, "depth": args.depth,
               "iters": args.iters, "threads": args.threads}  # fmt: skip
        cfg_path.write_text(json.dumps(cfg))
        for r in range(args.rounds):
            for k, v in time_metanet(data, args).items():
                best_m[k] = min(v, best_m.get(k, float("inf")))
            if peer is not None:
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                res = subprocess.run(
                    [str(peer), str(code_path), str(cfg_path)],
                    capture_output=True, text=True, env=env,
                )  # fmt: skip
                if res.returncode != 0:
                    raise RuntimeError(f"nfn peer failed:\n{res.stderr[-2000:]}")
                for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items():
                    best_p[k] = min(v, best_p.get(k, float("inf")))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    print(
        f"\nNFN throughput, forward+backward, batch {args.batch}, hidden {args.hidden}, "
        f"depth {args.depth}, CPU threads {args.threads} (networks/second, best of "
        f"{args.rounds} rounds x {args.iters} iterations)\n"
    )
    print("| arch | layer | metanet nets/s | nfn nets/s | metanet / nfn |")
    print("| --- | --- | ---: | ---: | ---: |")
    for key in data:
        arch, mode = key.split(":")
        m = args.batch / best_m[key]
        if key in best_p:
            p = args.batch / best_p[key]
            print(f"| {arch} | {mode} | {m:.1f} | {p:.1f} | {m / p:.2f} |")
        else:
            print(f"| {arch} | {mode} | {m:.1f} | - | - |")

    if args.no_equivariance:
        return
    print("\nEquivariance error: max abs deviation under random hidden permutations (batch 8)\n")
    print("| model | arch | dtype | max abs deviation |")
    print("| --- | --- | --- | ---: |")
    for name, arch, dtype, err in equivariance_table():
        print(f"| {name} | {arch} | {dtype} | {err:.2e} |")


if __name__ == "__main__":
    main()
