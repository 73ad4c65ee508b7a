"""Throughput of metanet's graph metanetworks against the Neural Graphs reference (CPU).

Networks per second (forward + backward of an MSE regression loss, batch of 64 networks) of

* metanet ``NGGNN`` configured like the reference's PNA model (forward messages, mean/min/max/std
  with identity/amplification scalers, edge updates, Fourier value features, ``cat`` readout of
  the output neurons), ``GMN`` (bidirectional messages) and ``NGT``;
* the reference ``GNNForGeneralization`` (``nn/dynamic_gnn.py``, PNA backbone) and
  ``DynamicRelationalTransformer`` (``nn/dynamic_relational_transformer.py``) of
  github.com/mkofinas/neural-graphs, configured as in its ``cnn_generalization`` configs with the
  same hidden size and depth.

Both sides get the same graphs (metanet ``ParamGraph`` values written in the reference's input
format) and the same thread count. The reference runs in its own virtual environment
(``.cache/peers/neural-graphs``: torch 2.13.0, torch-geometric, hydra-core,
random-fourier-features-pytorch, einops; created on first use) as a subprocess; its source is
put on ``sys.path`` at run time from ``--ref-path`` (a checkout or a bare git mirror, exported
to ``.cache/peers/neural-graphs-src``) and is never part of metanet.

The script also prints each metanet model's equivariance error: the max abs deviation of the
graph outputs under random hidden-neuron permutations of the same networks.

Usage::

    python scripts/bench_gmn.py --ref-path /work/.mirror/mkofinas+neural-graphs/repo
    python scripts/bench_gmn.py --no-ref            # metanet only
    python scripts/bench_gmn.py --unfused           # also each metanet model on PyTorch ops only
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
from unittest import mock

import torch
from torch_geometric.data import Batch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metanet.graph import ParamGraph, from_module  # noqa: E402
from metanet.nn.gmn import GMN, NGGNN  # noqa: E402
from metanet.nn.ngt import NGT  # noqa: E402
from metanet.ops import _fused  # noqa: E402
from metanet.weightspace import WeightSpace, permute, random_permutation  # noqa: E402
from metanet.zoo.architectures import build_module  # noqa: E402

PEER_VENV = ROOT / ".cache" / "peers" / "neural-graphs"
PEER_SRC = ROOT / ".cache" / "peers" / "neural-graphs-src"
PEER_PACKAGES = ["torch==2.13.0", "torch-geometric", "hydra-core", "einops", "numpy"]
# random-fourier-features-pytorch pulls torchvision, whose PyPI wheel does not load against the
# CPU build of torch; rff only imports it for its data loader, so it is installed without
# dependencies and the runner stubs ``torchvision``.
PEER_NO_DEPS = ["random-fourier-features-pytorch"]
WORKLOADS = {
    # the digits CNN zoo architecture (1x8x8 inputs, 10 classes)
    "cnn": {"type": "cnn", "channels": [8, 16], "kernel": 3, "head": "pool", "out": 10},
    # a 64-32-32-10 MLP on flattened digits
    "mlp": {"type": "mlp", "in": 64, "widths": [32, 32], "out": 10},
}


# ----------------------------------------------------------------------------- data
UNFUSED = ", PyTorch ops only"  # suffix of the rows timed without metanet's C kernels
PNA = "neural-graphs PNA (GNNForGeneralization)"
RT = "neural-graphs RT (DynamicRelationalTransformer)"


def make_graphs(arch: dict, count: int, seed: int) -> tuple[list[ParamGraph], list[ParamGraph]]:
    """``count`` randomly initialized networks of ``arch`` as ParamGraphs, and the same
    networks with random hidden-neuron permutations (same functions)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    graphs, permuted = [], []
    for i in range(count):
        module = build_module(arch)
        with torch.no_grad():  # spread the weight scales like a zoo of trained networks
            for p in module.parameters():
                p.mul_(0.5 + 1.5 * i / max(count - 1, 1))
        graphs.append(from_module(module))
        ws = WeightSpace.from_module(module)
        permute(ws, random_permutation(ws.spec, gen)).load_into(module)
        permuted.append(from_module(module))
    return graphs, permuted


def to_reference_format(graphs: list[ParamGraph]) -> list[dict]:
    """The reference's input: per graph bias column ``x [N, 1]``, ``edge_index``, kernel edges
    ``edge_attr [E, 9]`` and ``layer_layout`` (nodes per layer, layers contiguous)."""
    out = []
    for g in graphs:
        layer = g.node_layer
        if bool((layer[1:] < layer[:-1]).any()):
            raise ValueError("the reference format needs nodes ordered by layer")
        out.append(
            {
                "x": g.x[:, :1].clone(),
                "edge_index": g.edge_index.long(),  # metanet stores int32; PyG scatters need int64
                "edge_attr": g.edge_attr.clone(),
                "layer_layout": torch.bincount(layer).tolist(),
            }
        )
    return out


def degree_histogram(graphs: list[ParamGraph]) -> list[int]:
    """In-degree histogram over all nodes (PNA's ``deg`` argument)."""
    deg = torch.cat([torch.bincount(g.edge_index[1], minlength=g.num_nodes) for g in graphs])
    return torch.bincount(deg).tolist()


# ----------------------------------------------------------------------------- timing
def time_train_step(model: torch.nn.Module, batch: object, iters: int, warmup: int = 2) -> float:
    """Mean seconds of one forward + backward (MSE to a fixed target) on ``batch``."""
    model.train()
    target = torch.linspace(0, 1, batch.num_graphs).unsqueeze(1)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = (model(batch) - target).pow(2).mean()
        loss.backward()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) / iters


@torch.no_grad()
def equivariance_error(model: torch.nn.Module, a: object, b: object) -> float:
    """Max abs deviation of graph outputs between networks and their permuted copies."""
    model.eval()
    return float((model(a) - model(b)).abs().max())


def metanet_models(hidden: int, layers: int) -> dict[str, torch.nn.Module]:
    return {
        "metanet NG-GNN (reference config)": NGGNN(
            hidden=hidden,
            num_layers=layers,
            edge_dim=hidden,
            fourier_features=128,
            output_slots=10,
        ),  # fmt: skip
        "metanet GMN (bidirectional)": GMN(hidden=hidden, num_layers=layers),
        "metanet NG-T": NGT(hidden=2 * hidden, edge_dim=hidden, num_layers=layers, heads=8),
    }


# ----------------------------------------------------------------------------- reference
RUNNER = r"""
import json, sys, time, types
import torch
try:
    import torchvision  # noqa: F401
except Exception:  # rff imports it for its data loader only (see PEER_NO_DEPS)
    sys.modules["torchvision"] = types.ModuleType("torchvision")
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["src"])
torch.set_num_threads(cfg["threads"])
torch.manual_seed(0)
import hydra  # noqa: F401  (the reference instantiates sub-modules through hydra)
import torch_geometric
try:  # torch-geometric >= 2.5 renamed the module the reference imports TrimToLayer from
    import torch_geometric.utils.trim_to_layer  # noqa: F401
except ImportError:
    import torch_geometric.utils._trim_to_layer as _trim
    sys.modules["torch_geometric.utils.trim_to_layer"] = _trim
from nn.dynamic_gnn import GNNForGeneralization
from nn.dynamic_relational_transformer import DynamicRelationalTransformer

data = torch.load(cfg["data"], weights_only=False)
H, L = cfg["hidden"], cfg["layers"]
constructor = dict(
    _target_="nn.dynamic_graph_constructor.GraphConstructor", _recursive_=False,
    _convert_="all", d_in=1, d_edge_in=9, zero_out_bias=False, zero_out_weights=False,
    sin_emb=True, sin_emb_dim=128, use_pos_embed=True, input_layers=1, inp_factor=3,
    num_probe_features=0, stats=None, max_num_hidden_layers=cfg["max_hidden_layers"],
    linear_as_conv=True, flattening_method=None, max_spatial_resolution=64,
    use_act_embed=False,
)
models = {
    "neural-graphs PNA (GNNForGeneralization)": lambda: GNNForGeneralization(
        d_hid=H, d_out=1, graph_constructor=constructor, rev_edge_features=False,
        pooling_method="cat", pooling_layer_idx="last", input_channels=cfg["inputs"],
        num_classes=cfg["outputs"],
        gnn_backbone=dict(
            _target_="nn.gnn.PNA", _convert_="all", in_channels=H, hidden_channels=H,
            out_channels=H, num_layers=L, aggregators=["mean", "min", "max", "std"],
            scalers=["identity", "amplification"], edge_dim=H, dropout=0.0,
            norm="layernorm", act="silu", deg=cfg["deg"], update_edge_attr=True,
            modulate_edges=True, gating_edges=False, final_edge_update=False,
        ),
    ),
    "neural-graphs RT (DynamicRelationalTransformer)": lambda: DynamicRelationalTransformer(
        d_in=1, d_node=2 * H, d_edge=H, d_attn_hid=2 * H, d_node_hid=4 * H, d_edge_hid=2 * H,
        d_out_hid=2 * H, d_out=1, n_layers=L, n_heads=8, graph_constructor=constructor,
        use_cls_token=False, pooling_method="cat", pooling_layer_idx="last",
        input_channels=cfg["inputs"], num_classes=cfg["outputs"],
    ),
}

def batch_of(items):
    out = []
    for d in items:
        g = torch_geometric.data.Data(x=d["x"], edge_index=d["edge_index"],
                                      edge_attr=d["edge_attr"])
        g.layer_layout = list(d["layer_layout"])
        out.append(g)
    return torch_geometric.data.Batch.from_data_list(out)

results = {}
batch, batch_p = batch_of(data["graphs"]), batch_of(data["permuted"])
for name in cfg["models"]:
    model = models[name]()
    target = torch.linspace(0, 1, batch.num_graphs).unsqueeze(1)
    def step():
        model.zero_grad(set_to_none=True)
        loss = (model(batch) - target).pow(2).mean()
        loss.backward()
    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(cfg["iters"]):
        step()
    seconds = (time.perf_counter() - t0) / cfg["iters"]
    model.eval()
    with torch.no_grad():
        err = float((model(batch) - model(batch_p)).abs().max())
    results[name] = {"seconds": seconds, "equivariance_error": err}
print("RESULT " + json.dumps(results))
"""


def ensure_reference_source(ref_path: Path) -> Path:
    """A directory with the reference's ``nn/`` package: ``ref_path`` itself, or its HEAD
    exported from a bare git mirror into ``.cache/peers/neural-graphs-src``."""
    if (ref_path / "nn" / "dynamic_gnn.py").exists():
        return ref_path
    if not (ref_path / "HEAD").exists():
        raise FileNotFoundError(f"--ref-path {ref_path} is neither a checkout nor a git mirror")
    head = subprocess.run(["git", "--git-dir", str(ref_path), "rev-parse", "HEAD"],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    stamp = PEER_SRC / ".commit"
    if not (stamp.exists() and stamp.read_text() == head):
        PEER_SRC.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "--git-dir", str(ref_path), "archive", head, "nn"],
                                 check=True, capture_output=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(PEER_SRC)], input=archive, check=True)
        stamp.write_text(head)
    return PEER_SRC


def ensure_peer_venv() -> Path:
    """The reference's virtual environment (created and filled on first use)."""
    python = PEER_VENV / "bin" / "python"
    stamp = PEER_VENV / ".bench-gmn-ready"
    if stamp.exists():
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    print(f"installing the reference's packages into {PEER_VENV} ...", file=sys.stderr)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *PEER_PACKAGES], check=True)
    subprocess.run([*pip, "--no-deps", *PEER_NO_DEPS], check=True)
    stamp.write_text(" ".join(PEER_PACKAGES + PEER_NO_DEPS))
    return python


def run_reference(cfg: dict, python: Path, timeout: float) -> dict:
    """Run the reference models of ``cfg`` (one subprocess each); a model that fails or times
    out gets ``{"error": why}``."""
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        runner = Path(tmp) / "ng_runner.py"
        runner.write_text(RUNNER)
        for name in cfg["models"]:
            one = dict(cfg, models=[name])
            try:
                proc = subprocess.run([str(python), str(runner), json.dumps(one)],
                                      capture_output=True, text=True, timeout=timeout)  # fmt: skip
            except subprocess.TimeoutExpired:
                results[name] = {"error": f"timed out after {timeout:.0f} s"}
                continue
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
                results[name] = {"error": tail[0][:200]}
                continue
            results.update(json.loads(lines[-1][len("RESULT ") :]))
    return results


def dense_attention_gb(batch: int, nodes: int, hidden: int, layers: int) -> float:
    """Rough activation memory (GB) of the reference RT, whose attention and edge tensors are
    dense ``[B, N, N, width]`` (about 10 such tensors of width ``2 * hidden`` per layer)."""
    return 4 * batch * nodes * nodes * 10 * 2 * hidden * layers / 1e9


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref-path", type=Path,
                    default=Path("/work/.mirror/mkofinas+neural-graphs/repo"))  # fmt: skip
    ap.add_argument("--no-ref", action="store_true", help="skip the reference")
    ap.add_argument("--unfused", action="store_true",
                    help="also time every metanet model without its fused C kernels")
    ap.add_argument("--workloads", default="cnn,mlp", help=f"comma list of {list(WORKLOADS)}")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="repeat and keep the best time")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--ref-timeout", type=float, default=900, help="seconds per reference model")
    ap.add_argument(
        "--ref-max-gb", type=float, default=6.0, help="skip the reference RT above this memory"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    python = src = None
    if not args.no_ref:
        src = ensure_reference_source(args.ref_path)
        python = ensure_peer_venv()

    rows = []
    for wl in args.workloads.split(","):
        arch = WORKLOADS[wl]
        graphs, permuted = make_graphs(arch, args.batch, seed=0)
        batch, batch_p = Batch.from_data_list(graphs), Batch.from_data_list(permuted)
        size = f"{batch.num_nodes // args.batch} nodes, {batch.num_edges // args.batch} edges"
        best: dict[str, float] = {}
        errors: dict[str, float] = {}
        skipped: dict[str, str] = {}
        layout_sizes = [g.num_nodes for g in graphs]
        for _ in range(args.rounds):
            torch.manual_seed(0)
            for name, model in metanet_models(args.hidden, args.layers).items():
                model.calibrate(batch)
                t = time_train_step(model, batch, args.iters)
                best[name] = min(best.get(name, float("inf")), t)
                errors[name] = equivariance_error(model, batch, batch_p)
                if args.unfused:  # the same model on the PyTorch ops a machine without cc runs
                    with mock.patch.object(_fused, "library", lambda: None):
                        t = time_train_step(model, batch, args.iters)
                        key = name + UNFUSED
                        best[key] = min(best.get(key, float("inf")), t)
                        errors[key] = equivariance_error(model, batch, batch_p)
            if python is not None:
                layout = to_reference_format(graphs)[0]["layer_layout"]
                with tempfile.TemporaryDirectory() as tmp:
                    data = Path(tmp) / "graphs.pt"
                    torch.save({"graphs": to_reference_format(graphs),
                                "permuted": to_reference_format(permuted)}, data)  # fmt: skip
                    cfg = {
                        "src": str(src), "data": str(data), "threads": args.threads,
                        "hidden": args.hidden, "layers": args.layers, "iters": args.iters,
                        "deg": degree_histogram(graphs), "inputs": layout[0],
                        "outputs": layout[-1], "max_hidden_layers": 8,
                        "models": [PNA, RT],
                    }  # fmt: skip
                    gb = dense_attention_gb(args.batch, max(layout_sizes), args.hidden,
                                            args.layers)  # fmt: skip
                    if gb > args.ref_max_gb:
                        cfg["models"] = cfg["models"][:1]
                        skipped[RT] = f"skipped: dense N x N attention needs ~{gb:.0f} GB"
                    for name, res in run_reference(cfg, python, args.ref_timeout).items():
                        if "error" in res:
                            skipped[name] = res["error"]
                            continue
                        best[name] = min(best.get(name, float("inf")), res["seconds"])
                        errors[name] = res["equivariance_error"]
        for name, t in best.items():
            rows.append((wl, size, name, args.batch / t, t * 1000, errors[name]))
            print(f"{wl}: {name}: {args.batch / t:.0f} networks/s", file=sys.stderr, flush=True)
        for name, why in skipped.items():
            if name not in best:
                rows.append((wl, size, name, None, None, why))

    print(f"\nGraph metanetworks, forward+backward, batch {args.batch}, CPU, "
          f"{args.threads} thread(s), hidden {args.hidden}, {args.layers} layers "
          f"(best of {args.rounds} rounds x {args.iters} iterations)\n")  # fmt: skip
    print("| workload | graph size | model | networks/s | ms/batch | equivariance error |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for wl, size, name, nps, ms, err in rows:
        if nps is None:
            print(f"| {wl} | {size} | {name} | - | - | {err} |")
        else:
            print(f"| {wl} | {size} | {name} | {nps:.0f} | {ms:.1f} | {err:.1e} |")
    if args.unfused:
        print("\n| workload | model | fused C kernels / PyTorch ops throughput |")
        print("| --- | --- | ---: |")
        for wl in args.workloads.split(","):
            by = {r[2]: r[3] for r in rows if r[0] == wl}
            for name in metanet_models(args.hidden, args.layers):
                if by.get(name) and by.get(name + UNFUSED):
                    print(f"| {wl} | {name} | {by[name] / by[name + UNFUSED]:.2f}x |")
    ref = {"NG-GNN": PNA, "NG-T": RT}
    ours = {"NG-GNN": "metanet NG-GNN (reference config)", "NG-T": "metanet NG-T"}
    if python is not None:
        print("\n| workload | model | metanet / reference throughput |")
        print("| --- | --- | ---: |")
        for wl in args.workloads.split(","):
            by = {r[2]: r[3] for r in rows if r[0] == wl}
            for key in ("NG-GNN", "NG-T"):
                if by.get(ref[key]) and by.get(ours[key]):
                    print(f"| {wl} | {key} | {by[ours[key]] / by[ref[key]]:.2f}x |")
                else:
                    print(f"| {wl} | {key} | reference did not run |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
