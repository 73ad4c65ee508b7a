"""Weight-space metanetworks (DWS, NFN-NP/HNP, UNF, StatNN): symmetry contracts and bad input.

Every model is checked on real networks (briefly trained digits MLPs/CNNs, SIRENs fit to a digit)
under random per-network hidden permutations, in float64: invariant models give the same output,
equivariant ones give the permuted output. Each model must also *change* under a non-symmetry
(permuting input pixels / kernel taps), so the contract can fail.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from metanet.nn.base import WeightSpaceModel
from metanet.nn.dws import DWSLayer, DWSNet
from metanet.nn.layers import WSFeatures
from metanet.nn.nfn import NFN, HNPLinear, NFNEquivariant, NPLinear
from metanet.nn.statnn import StatNN, layer_statistics, statistic_names
from metanet.nn.unf import UNF, UNFEquivariant, UNFLayer
from metanet.nn.unf_terms import PermSpec
from metanet.weightspace import (
    LayerSpec,
    WeightSpace,
    WeightSpaceError,
    WeightSpaceSpec,
    permute,
    random_permutation,
)

TOL64 = 1e-10


# ------------------------------------------------------------------------------------------
# real networks
# ------------------------------------------------------------------------------------------
class Sine(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(30.0 * x)


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 10)
    )


def _cnn_flatten() -> nn.Module:
    # the Linear is fed by flatten: in_repeat = 4 * 4 spatial positions per channel
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(80, 10),
    )


def _cnn_pool() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10),
    )  # fmt: skip


def _siren() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 12), Sine(), nn.Linear(12, 12), Sine(), nn.Linear(12, 1))


def _train(make, n: int = 2, steps: int = 8) -> WeightSpace:
    """``n`` networks from different seeds after a few SGD steps on synthetic 8x8 "digits"
    (labels from a random linear teacher) or, for SIRENs, on a synthetic 8x8 image."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(128, 1, 8, 8, generator=gen)
    labels = (images.flatten(1) @ torch.randn(64, 10, generator=gen)).argmax(1)
    grid = torch.linspace(-1, 1, 8)
    coords = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    nets = []
    for seed in range(n):
        torch.manual_seed(seed)
        net = make()
        for _ in range(steps):  # plain SGD (torch.optim's first step costs seconds of imports)
            if make is _siren:
                target = torch.sin(3 * coords[:, :1] + seed) * coords[:, 1:]
                loss = nn.functional.mse_loss(net(coords), target)
            else:
                loss = nn.functional.cross_entropy(net(images), labels)
            grads = torch.autograd.grad(loss, list(net.parameters()))
            with torch.no_grad():
                for p, g in zip(net.parameters(), grads):
                    p -= 0.2 * g
        nets.append(net)
    return WeightSpace.from_modules(nets).to(torch.float64)


@pytest.fixture(scope="module")
def nets() -> dict[str, WeightSpace]:
    return {
        "mlp": _train(_mlp),
        "cnn_flatten": _train(_cnn_flatten),
        "cnn_pool": _train(_cnn_pool),
        "siren": _train(_siren),
    }


def _non_symmetry(ws: WeightSpace) -> WeightSpace:
    """Permute the network's input pixels (or, with a single input channel, its kernel taps)."""
    w0 = ws.weights[0]
    if w0.shape[2] > 1:
        w0 = w0[:, :, torch.roll(torch.arange(w0.shape[2]), 1)]
    else:
        w0 = w0.flip(-1)
    return WeightSpace(ws.spec, [w0, *ws.weights[1:]], ws.biases)


def _perturbation(ws: WeightSpace) -> WeightSpace:
    """Change one weight value (StatNN is blind to any reordering inside a layer)."""
    w0 = ws.weights[0].clone()
    w0.view(w0.shape[0], -1)[:, 0] += 1.0
    return WeightSpace(ws.spec, [w0, *ws.weights[1:]], ws.biases)


INVARIANT = {
    "nfn_hnp": lambda s: NFN(s, out_dim=3, hidden=4, num_layers=2, mode="HNP", head_hidden=16),
    "nfn_np": lambda s: NFN(
        s, out_dim=3, hidden=8, num_layers=2, mode="NP", head_hidden=16, io_encoding="sinusoidal"
    ),
    "dws": lambda s: DWSNet(s, out_dim=3, hidden=4, num_layers=2),
    "unf": lambda s: UNF(s, out_dim=3, hidden=4, num_layers=2, head_hidden=16),
    "statnn": lambda s: StatNN(s, out_dim=3, hidden=16),
}
EQUIVARIANT = {
    "nfn_hnp_eq": lambda s: NFNEquivariant(s, hidden=4, num_layers=2, mode="HNP", residual=False),
    "nfn_np_eq": lambda s: NFNEquivariant(s, hidden=8, num_layers=2, mode="NP", residual=False),
    "unf_eq": lambda s: UNFEquivariant(s, hidden=4, num_layers=2, residual=False),
}
ARCHS = ["mlp", "cnn_flatten", "cnn_pool", "siren"]
VARIANTS = {  # checked on cnn_flatten, whose non-symmetry flips kernel taps
    "nfn_np_no_io": lambda s: NFN(s, out_dim=3, hidden=8, num_layers=2, mode="NP", head_hidden=16),
    "nfn_np_learned_ff": lambda s: NFN(
        s,
        out_dim=3,
        hidden=4,
        num_layers=2,
        mode="NP",
        io_encoding="learned",
        fourier_features=4,
        head_hidden=16,
    ),
    "nfn_hnp_sin": lambda s: NFN(s, out_dim=3, hidden=4, num_layers=2, io_encoding="sinusoidal"),
    "dws_mean_mlp_head": lambda s: DWSNet(
        s, out_dim=3, hidden=4, num_layers=2, reduction="mean", head_layers=2, batch_norm=False
    ),
}


@pytest.mark.parametrize(
    ("name", "arch"),
    [(n, a) for n in INVARIANT for a in ARCHS if a != "cnn_pool" or n in ("nfn_hnp", "dws")]
    + [(n, "cnn_flatten") for n in VARIANTS],
)
def test_invariant_models(nets, name: str, arch: str) -> None:
    ws = nets[arch]
    model = (INVARIANT | VARIANTS)[name](ws.spec).double().eval()
    assert model.input_kind == "weightspace"
    out = model(ws)
    assert out.shape == (len(ws), 3)
    perms = random_permutation(ws.spec, batch=len(ws))
    assert (model(permute(ws, perms)) - out).abs().max() < TOL64
    broken = (_perturbation if name == "statnn" else _non_symmetry)(ws)
    assert (model(broken) - out).abs().max() > 1e-8  # far above float64 round-off (~1e-16)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["mlp", "cnn_flatten", "siren"])
@pytest.mark.parametrize("name", list(EQUIVARIANT))
def test_equivariant_models(nets, name: str, arch: str) -> None:
    ws = nets[arch]
    model = EQUIVARIANT[name](ws.spec).double().eval()
    out = model(ws)
    assert isinstance(out, WeightSpace) and out.spec == ws.spec and len(out) == len(ws)
    perms = random_permutation(ws.spec, batch=len(ws))
    assert permute(out, perms).max_abs_diff(model(permute(ws, perms))) < TOL64
    assert out.max_abs_diff(model(_non_symmetry(ws))) > 1e-6
    # the output is a usable network of the same architecture
    out.load_into({"mlp": _mlp, "cnn_flatten": _cnn_flatten, "cnn_pool": _cnn_pool,
                   "siren": _siren}[arch]().double())  # fmt: skip


def test_float32_default(nets) -> None:
    ws = nets["cnn_flatten"].to(torch.float32)
    perms = random_permutation(ws.spec, batch=len(ws))
    for make in (INVARIANT["nfn_hnp"], INVARIANT["nfn_np"], INVARIANT["dws"]):
        model = make(ws.spec).eval()
        assert next(model.parameters()).dtype == torch.float32
        out = model(ws)
        assert (model(permute(ws, perms)) - out).abs().max() < 1e-5 * max(1.0, out.abs().max())


def test_np_layer_is_equivariant_to_input_permutations_hnp_is_not(nets) -> None:
    ws = nets["mlp"]
    pixels = torch.randperm(64)
    moved = WeightSpace(ws.spec, [ws.weights[0][:, :, pixels], *ws.weights[1:]], ws.biases)
    for layer_cls, symmetric in ((NPLinear, True), (HNPLinear, False)):
        layer = layer_cls(ws.spec, 1, 2).double()
        a = layer(WSFeatures.from_weightspace(ws))
        b = layer(WSFeatures.from_weightspace(moved))
        diff = (a.weights[0][:, :, :, pixels] - b.weights[0]).abs().max()
        assert (diff < TOL64) == symmetric


# ------------------------------------------------------------------------------------------
# maximality: the layers span every equivariant linear map (count orbits of the group)
# ------------------------------------------------------------------------------------------
def _orbit_count(pspec: PermSpec) -> int:
    """Orbits of the permutation group on (output entry, input entry) pairs, by brute force."""
    positions = [
        (t, idx)
        for t, shape in enumerate(pspec.shapes)
        for idx in itertools.product(*map(range, shape))
    ]
    index = {p: i for i, p in enumerate(positions)}
    gens = []
    for sym, n in pspec.symbol_sizes.items():
        for g in ([1, 0] + list(range(2, n)), list(range(1, n)) + [0]):
            gens.append({sym: g})
    parent = list(range(len(positions) ** 2))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    n_pos = len(positions)
    for gen in gens:
        image = []
        for t, idx in positions:
            new = tuple(gen[s][i] if s in gen else i for i, s in zip(idx, pspec.symbols[t]))
            image.append(index[(t, new)])
        for p in range(n_pos):
            for q in range(n_pos):
                a, b = find(p * n_pos + q), find(image[p] * n_pos + image[q])
                if a != b:
                    parent[a] = b
    return len({find(i) for i in range(n_pos * n_pos)})


def _weight_params(layer: UNFLayer) -> int:
    return sum(w.numel() for w in layer.weights)


def test_hnp_and_np_layers_are_maximal() -> None:
    spec = WeightSpaceSpec.chain([(3, 2), (3, 3), (2, 3)])
    assert _weight_params(HNPLinear(spec, 1, 1)) == _orbit_count(
        PermSpec.from_weightspace_spec(spec)
    )
    np_spec = PermSpec.from_weightspace_spec(spec, io_symbols=True)
    assert _weight_params(NPLinear(spec, 1, 1)) == _orbit_count(np_spec)
    conv = WeightSpaceSpec.chain([(2, 1, 2), (3, 2, 2), (2, 3)])
    assert _weight_params(DWSLayer(conv, 1, 1)) == _orbit_count(
        PermSpec.from_weightspace_spec(conv)
    )


def test_unf_layer_is_maximal_with_repeated_symbols() -> None:
    # an RNN cell: the hidden permutation acts on both axes of weight_hh (diagonal terms needed)
    pspec = PermSpec.from_dict(
        {"w_ih": ("h", None), "w_hh": ("h", "h"), "b": ("h",), "fc": (None, "h")},
        {"w_ih": (4, 2), "w_hh": (4, 4), "b": (4,), "fc": (2, 4)},  # n >= 4 blocks
    )
    assert _weight_params(UNFLayer(pspec, 1, 1)) == _orbit_count(pspec)


def test_dws_block_terms() -> None:
    # 3-layer MLP: W0 (p0, in), W1 (p1, p0), W2 (out, p1); b0 (p0), b1 (p1), b2 (out).
    # A shared hidden axis is either kept (identity) or pooled-and-broadcast: 2 terms, otherwise 1.
    layer = DWSLayer(WeightSpaceSpec.chain([(12, 64), (10, 12), (10, 10)]), 1, 1)
    assert layer.block_terms() == {"W->W": 5 + 8 + 5, "W->B": 5 + 5 + 3, "B->W": 4 + 5 + 4,
                                   "B->B": 4 + 4 + 3}  # fmt: skip
    assert layer.num_terms == 55


# ------------------------------------------------------------------------------------------
# UNF on specs NFN's hand-written layers do not cover
# ------------------------------------------------------------------------------------------
class ResMLP(nn.Module):
    """x -> W_in x; two residual blocks h + W2 relu(W1 h) sharing the stream permutation."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 10)
        self.b1 = nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 10))
        self.b2 = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 10))
        self.out = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.flatten(1))
        h = h + self.b1(h)
        h = h + self.b2(h)
        return self.out(torch.relu(h))


def _resmlp_spec() -> WeightSpaceSpec:
    rows = [  # name, (out, in), out_perm, in_perm ; stream permutation 0 is shared
        ("inp", (10, 64), 0, None), ("b1.0", (7, 10), 1, 0), ("b1.2", (10, 7), 0, 1),
        ("b2.0", (6, 10), 2, 0), ("b2.2", (10, 6), 0, 2), ("out", (10, 10), None, 0),
    ]  # fmt: skip
    return WeightSpaceSpec(tuple(LayerSpec(n, "linear", s, True, o, i) for n, s, o, i in rows))


@torch.no_grad()
def test_unf_residual_mlp() -> None:
    spec = _resmlp_spec()
    with pytest.raises(WeightSpaceError):
        HNPLinear(spec, 1, 1)
    nets = [ResMLP().double() for _ in range(3)]
    ws = WeightSpace.from_modules(nets, spec)
    perms = random_permutation(spec, batch=3)
    moved = permute(ws, perms)
    x = torch.rand(5, 64, dtype=torch.float64)
    # the spec is right: permuted weights compute the same function
    net = moved.load_into(ResMLP().double(), 1)
    assert torch.allclose(net(x), nets[1](x), atol=1e-12)
    model = UNF(spec, out_dim=2, hidden=4, num_layers=2).double().eval()
    out = model(ws)
    assert (model(moved) - out).abs().max() < TOL64
    assert (model(_non_symmetry(ws)) - out).abs().max() > 1e-6
    eq = UNFEquivariant(spec, hidden=4, num_layers=2, residual=False).double()
    assert permute(eq(ws), perms).max_abs_diff(eq(moved)) < TOL64


def test_unf_two_layer_rnn() -> None:
    torch.manual_seed(1)
    rnn, fc = nn.RNN(3, 6, num_layers=2, batch_first=True).double(), nn.Linear(6, 4).double()
    sd = {k: v.detach() for k, v in rnn.state_dict().items()}
    sd |= {f"fc.{k}": v.detach() for k, v in fc.state_dict().items()}
    symbols = {}
    for l in range(2):
        h, prev = f"h{l}", (f"h{l - 1}" if l else None)
        symbols |= {f"weight_ih_l{l}": (h, prev), f"weight_hh_l{l}": (h, h),
                    f"bias_ih_l{l}": (h,), f"bias_hh_l{l}": (h,)}  # fmt: skip
    symbols |= {"fc.weight": (None, "h1"), "fc.bias": (None,)}
    pspec = PermSpec.from_dict(symbols, {k: tuple(v.shape) for k, v in sd.items()})
    batch = {k: torch.stack([v, v + 0.1 * torch.randn_like(v)]) for k, v in sd.items()}
    perm = pspec.random_permutation()
    moved = dict(zip(pspec.names, pspec.permute([batch[k] for k in pspec.names], perm)))
    # the permuted RNN computes the same function
    rnn2, fc2 = nn.RNN(3, 6, num_layers=2, batch_first=True).double(), nn.Linear(6, 4).double()
    rnn2.load_state_dict({k: moved[k][0] for k in rnn.state_dict()})
    fc2.load_state_dict({k: moved[f"fc.{k}"][0] for k in fc.state_dict()})
    seq = torch.randn(2, 5, 3, dtype=torch.float64)
    assert torch.allclose(fc(rnn(seq)[0][:, -1]), fc2(rnn2(seq)[0][:, -1]), atol=1e-12)
    model = UNF(pspec, out_dim=2, hidden=4, num_layers=2).double()
    out = model(batch)
    assert (model(moved) - out).abs().max() < TOL64
    # transposing the recurrent matrix is not a symmetry
    swapped = dict(batch, weight_hh_l0=batch["weight_hh_l0"].transpose(1, 2))
    assert (model(swapped) - out).abs().max() > 1e-6
    eq = UNFEquivariant(pspec, hidden=4, num_layers=2, residual=False).double()
    got = pspec.permute(eq(batch), perm)
    assert max((a - b).abs().max() for a, b in zip(got, eq(moved))) < TOL64


# ------------------------------------------------------------------------------------------
# StatNN features and bad input
# ------------------------------------------------------------------------------------------
def test_statnn_features(nets) -> None:
    ws = nets["mlp"]
    feats = layer_statistics(ws)
    assert feats.shape == (2, ws.spec.num_layers * 14) == (2, len(statistic_names(ws.spec)))
    w0 = ws.weights[0][1].flatten()
    expected = [w0.mean(), w0.var(unbiased=False), w0.min(), w0.quantile(0.25), w0.quantile(0.5),
                w0.quantile(0.75), w0.max()]  # fmt: skip
    assert torch.allclose(feats[1, :7], torch.stack(expected))
    assert statistic_names(ws.spec)[2] == "1.weight:q0"


def test_bad_input(nets) -> None:
    mlp, cnn = nets["mlp"], nets["cnn_pool"]
    model = NFN(mlp.spec, hidden=4, num_layers=1).double()
    with pytest.raises(WeightSpaceError, match="another architecture"):
        model(cnn)
    with pytest.raises(TypeError):
        model(mlp.weights)
    bad = mlp.clone()
    bad.weights[1][0, 0, 0] = float("nan")
    for m in (model, DWSNet(mlp.spec, hidden=4, num_layers=1).double(), StatNN(mlp.spec).double()):
        with pytest.raises(WeightSpaceError, match="'3'.*NaN"):
            m(bad)
    with pytest.raises(ValueError, match="mode"):
        NFN(mlp.spec, mode="XYZ")
    with pytest.raises(ValueError, match="permutation 'h'"):
        PermSpec.from_dict({"a": ("h",), "b": ("h",)}, {"a": (3,), "b": (4,)})
    with pytest.raises(ValueError, match="2 axes but 1"):
        PermSpec.from_dict({"a": ("h",)}, {"a": (3, 3)})
    layer = UNFLayer(mlp.spec, 2, 3)
    with pytest.raises(ValueError, match=r"\[B, 2, \*shape\]"):
        layer(WSFeatures.from_weightspace(mlp).tensors())


def test_weightspace_model_base(nets) -> None:
    """The shared base: spec from anything with ``.spec``, one-line errors naming the model,
    ``num_layers`` checked, shared keywords as attributes and in the repr."""
    ws = nets["mlp"]
    makers = [*INVARIANT.values(), *EQUIVARIANT.values()]
    for make in makers:
        torch.manual_seed(0)
        from_spec = make(ws.spec)
        torch.manual_seed(0)
        from_ws = make(ws)  # a WeightSpace (like a data module) carries its .spec
        assert isinstance(from_spec, WeightSpaceModel) and from_ws.spec is ws.spec
        a, b = from_spec.state_dict(), from_ws.state_dict()
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TypeError, match=r"^DWSNet needs a WeightSpaceSpec .* got list$"):
        DWSNet(ws.weights)
    with pytest.raises(TypeError, match=r"^UNF needs a WeightSpaceSpec or PermSpec .*got dict$"):
        UNF({"a": ("h",)})
    for cls in (DWSNet, NFN, NFNEquivariant, UNF, UNFEquivariant):
        with pytest.raises(ValueError, match=f"{cls.__name__} needs num_layers >= 1, got 0"):
            cls(ws.spec, num_layers=0)
    assert StatNN(ws.spec, num_layers=0).num_layers == 0  # MLP hidden layers: 0 is a linear head
    model = NFN(ws.spec, out_dim=3, hidden=4, num_layers=2, dropout=0.1)
    assert (model.out_dim, model.hidden, model.num_layers, model.dropout) == (3, 4, 2, 0.1)
    text = "mode=HNP, layers=3, out_dim=3, hidden=4, num_layers=2, dropout=0.1"
    assert model.extra_repr() == text
    assert model.extra_repr() in repr(model)
    assert UNFEquivariant(ws.spec).out_dim is None
