"""One contract, checked for every metanetwork in ``metanet.nn`` (found automatically).

For real networks from a tiny digits zoo (an MLP and a strided CNN with a flatten head, trained
for a few steps in :mod:`tiny_zoo`):

* **symmetry**: under random hidden-neuron permutations (a different one per network) an
  invariant model's output stays the same and an equivariant model's output (new weights, or
  per-edge values mapped back to weights) is permuted the same way — to float tolerance;
* **sensitivity**: the same model is *not* invariant/equivariant to a transformation that is not a
  symmetry of the networks (permuting the input pixels of the MLP, the output classes of the
  CNN), so the first check cannot pass by returning constants.

Every class with an ``input_kind`` attribute and a ``forward`` is a case (with its ``mode`` /
``output`` variants); models that do not apply to an architecture (e.g. DWS on CNNs) must still
build on the MLP. All cases build from one dict of keywords (``SMALL``), and every weight-space
model is a :class:`~metanet.nn.base.WeightSpaceModel` that keeps the shared keywords it takes
under their shared names (no per-model aliases).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import itertools
import pkgutil

import pytest
import torch
from tiny_zoo import CNN_FLAT, MLP, build_tiny_zoo  # noqa: I001
from torch import nn

import metanet.nn
from metanet.nn.base import WeightSpaceModel
from metanet.weightspace import WeightSpace, WeightSpaceError, permute, random_permutation

# Models whose outputs are invariant to far more than hidden permutations by construction
# (statistics of each layer's entries ignore their order): the sensitivity check does not apply.
ORDER_FREE = {"StatNN", "StatFeaturizer"}
VARIANTS = {"mode": ("HNP", "NP"), "output": ("graph", "edge")}
SMALL = {  # keep the models small: the contract runs on CPU in the default test suite
    "hidden": 8, "head_hidden": 16, "num_layers": 2, "heads": 2,
    "edge_dim": 8, "node_mlp": 16, "edge_mlp": 16, "fourier_features": 4,
    "residual": False, "dropout": 0.0,
}  # fmt: skip
ARCHS = {"mlp": MLP, "cnn": CNN_FLAT}
NETS_PER_ARCH = 3


def _discover() -> list[tuple[str, type | None, dict, str]]:
    """(id, class, variant kwargs, import error) for every metanetwork class in metanet.nn."""
    cases = []
    for info in sorted(pkgutil.iter_modules(metanet.nn.__path__), key=lambda i: i.name):
        name = f"metanet.nn.{info.name}"
        try:
            module = importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - reported as a failing case below
            cases.append((info.name, None, {}, f"{name} does not import: {err!r}"))
            continue
        for cls_name, cls in sorted(vars(module).items()):
            if not (
                isinstance(cls, type)
                and issubclass(cls, nn.Module)
                and cls.__module__ == name
                and getattr(cls, "input_kind", None) in ("weightspace", "graph")
                and cls.forward is not nn.Module.forward  # not a shared base
            ):
                continue
            params = inspect.signature(cls.__init__).parameters
            keys = [k for k in VARIANTS if k in params]
            for values in itertools.product(*(VARIANTS[k] for k in keys)):
                variant = dict(zip(keys, values))
                suffix = "-".join(str(v) for v in values)
                cases.append((f"{cls_name}{'-' + suffix if suffix else ''}", cls, variant, ""))
    return cases


CASES = _discover()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from metanet.data.zoo_store import Zoo
    from metanet.zoo.architectures import arch_name

    path = build_tiny_zoo(str(tmp_path_factory.getbasetemp() / "tiny_zoo.h5"))
    z = Zoo.open(path)
    out = {}
    for key, arch in ARCHS.items():
        group = z[arch_name(arch)]
        # the final checkpoint of the first runs: trained networks
        epochs = group.metrics["epoch"]
        idx = [i for i in range(len(group)) if epochs[i] == epochs.max()][:NETS_PER_ARCH]
        out[key] = (group, idx, group.weight_space(idx))
    return out


def _kwargs(cls: type, variant: dict, **extra) -> dict:
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in SMALL.items() if k in params}
    if "heads" in kwargs and "hidden" in kwargs and kwargs["hidden"] % kwargs["heads"]:
        kwargs["heads"] = 1
    kwargs.update(variant)
    kwargs.update({k: v for k, v in extra.items() if k in params})
    return kwargs


def _scale(t: torch.Tensor) -> float:
    return max(1e-6, float(t.detach().abs().max()))


def _diff(a, b) -> float:
    if isinstance(a, WeightSpace):
        return a.max_abs_diff(b)
    return float((a - b).detach().abs().max())


def _size(a) -> float:
    if isinstance(a, WeightSpace):
        return max(_scale(t) for t in a.weights + a.biases)
    return _scale(a)


def _noise_floor(err: float, out) -> float:
    """A change this small could be float rounding: 100x the observed symmetry error or 100x
    float32 rounding of the output's magnitude, whichever is larger."""
    return 100 * max(err, 1e-7 * _size(out))


def _non_symmetry(key: str, ws: WeightSpace) -> WeightSpace:
    """A transformation that changes what the networks compute and that no permutation-equivariant
    model may ignore: shuffle the first layer's output neurons without their biases and outgoing
    weights (a broken hidden permutation; input/output shuffles would not do, NP models without IO
    encodings are invariant to those by design). ``key`` names the architecture (unused)."""
    weights, biases = list(ws.weights), list(ws.biases)
    weights[0] = weights[0].roll(1, dims=1)
    return WeightSpace(ws.spec, weights, biases)


# ------------------------------------------------------------------------------------------------
# weight-space models
# ------------------------------------------------------------------------------------------------
def _ws_contract(cls, variant, key, ws, name) -> None:
    torch.manual_seed(0)
    try:
        model = cls(ws.spec, **_kwargs(cls, variant))
    except (WeightSpaceError, NotImplementedError, TypeError) as err:
        if key == "mlp":
            raise
        pytest.skip(f"{name} does not apply to {key} weight spaces: {err}")
    model.eval()
    perms = random_permutation(ws.spec, torch.Generator().manual_seed(1), batch=len(ws))
    with torch.no_grad():
        out = model(ws)
        out_perm = model(permute(ws, perms))
        out_other = model(_non_symmetry(key, ws))
    equivariant = isinstance(out, WeightSpace)
    expected = permute(out, perms) if equivariant else out
    tol = 1e-5 * _size(out)
    err = _diff(expected, out_perm)
    assert err <= tol, f"{name} on {key}: symmetry broken, max deviation {err:.2e} > {tol:.1e}"
    if cls.__name__ in ORDER_FREE:
        return
    moved = _diff(_non_symmetry(key, out) if equivariant else out, out_other)
    assert moved > _noise_floor(err, out), (
        f"{name} on {key}: output unchanged ({moved:.1e}) under a transformation that is not a "
        "symmetry — the model ignores its input or is too symmetric"
    )


# ------------------------------------------------------------------------------------------------
# graph models
# ------------------------------------------------------------------------------------------------
def _graphs(group, ws: WeightSpace):
    from torch_geometric.data import Batch

    from metanet.graph import from_module
    from metanet.zoo.architectures import build_module, input_shape

    example = torch.zeros(1, *input_shape(group.arch))
    graphs = []
    for i in range(len(ws)):
        module = ws.load_into(build_module(group.arch), i).eval()
        graphs.append(from_module(module, example))
    return Batch.from_data_list(graphs)


def _edge_values_to_ws(batch, values: torch.Tensor, spec) -> WeightSpace:
    from metanet.graph import ParamGraph

    sds = ParamGraph.state_dicts_from_batch(batch, edge_values=values)
    return WeightSpace.from_state_dicts(sds, spec, strict=False)


def _graph_contract(cls, variant, key, group, ws, name) -> None:
    batch = _graphs(group, ws)
    torch.manual_seed(0)
    extra = {"edge_out_dim": batch.edge_attr.shape[1], "node_in_dim": batch.x.shape[1],
             "edge_in_dim": batch.edge_attr.shape[1]}  # fmt: skip
    model = cls(**_kwargs(cls, variant, **extra)).eval()
    perms = random_permutation(ws.spec, torch.Generator().manual_seed(1), batch=len(ws))
    batch_perm = _graphs(group, permute(ws, perms))
    batch_other = _graphs(group, _non_symmetry(key, ws))
    with torch.no_grad():
        out, out_perm, out_other = model(batch), model(batch_perm), model(batch_other)
    if out.shape[0] == len(ws):  # invariant readout [num_graphs, out_dim]
        expected, got, other_expected, other = out, out_perm, out, out_other
    elif out.shape[0] == batch.edge_index.shape[1]:  # per-edge values: map back to weights
        pred = _edge_values_to_ws(batch, out, ws.spec)
        expected = permute(pred, perms)
        got = _edge_values_to_ws(batch_perm, out_perm, ws.spec)
        other_expected = _non_symmetry(key, pred)
        other = _edge_values_to_ws(batch_other, out_other, ws.spec)
    else:
        pytest.skip(f"{name}: output {tuple(out.shape)} is neither per-graph nor per-edge")
    tol = 1e-5 * _size(expected)
    err = _diff(expected, got)
    assert err <= tol, f"{name} on {key}: symmetry broken, max deviation {err:.2e} > {tol:.1e}"
    moved = _diff(other_expected, other)
    assert moved > _noise_floor(err, expected), (
        f"{name} on {key}: output unchanged ({moved:.1e}) under a non-symmetry (a broken hidden "
        "permutation): the model ignores its input or is too symmetric"
    )


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize(("name", "cls", "variant", "error"), CASES, ids=[c[0] for c in CASES])
def test_metanetwork_contract(zoo, name, cls, variant, error, arch):
    assert not error, error
    group, _, ws = zoo[arch]
    if cls.input_kind == "weightspace":
        _ws_contract(cls, variant, arch, copy.deepcopy(ws), name)
    else:
        _graph_contract(cls, variant, arch, group, ws, name)


def test_contract_covers_every_model_family():
    """The discovery finds the models the issue names (so a rename cannot empty the contract)."""
    names = {c[0].split("-")[0] for c in CASES}
    for expected in ("NFN", "UNF", "DWSNet", "StatNN", "GMN", "NGT", "SignGMN"):
        assert expected in names, f"{expected} missing from the contract cases: {sorted(names)}"


# names other libraries (or older metanet) use for the shared keywords: none may come back
ALIASES = {
    "hidden_dim", "dim_hidden", "width", "hidden_channels", "channels", "hidden_size",
    "n_layers", "depth", "num_blocks", "n_hidden", "layers", "output_dim", "out_features",
    "num_outputs", "n_out", "dropout_rate", "p_dropout", "drop", "head_dim", "n_head_layers",
    "num_head_layers", "head_width", "num_fourier", "n_fourier", "fourier_scale",
}  # fmt: skip
SHARED = ("out_dim", "hidden", "num_layers", "dropout")  # kept by WeightSpaceModel


def test_weightspace_models_share_one_vocabulary():
    """Every weight-space case is a WeightSpaceModel, takes ``spec`` first and everything else
    with a default, uses no alias of a shared keyword, and hands the shared keywords it takes
    to the base (they come back as attributes)."""
    spec = WeightSpace.from_module(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))).spec
    ws_cases = [c for c in CASES if c[1] is not None and c[1].input_kind == "weightspace"]
    assert ws_cases
    for name, cls, variant, _ in ws_cases:
        assert issubclass(cls, WeightSpaceModel), f"{name} is not a WeightSpaceModel"
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert params[0].name == "spec", f"{name}: first argument {params[0].name!r}, not spec"
        required = [p.name for p in params[1:] if p.default is inspect.Parameter.empty]
        assert not required, f"{name}: {required} have no default"
        aliases = ALIASES & {p.name for p in params}
        assert not aliases, f"{name} takes {sorted(aliases)}: use the shared keywords"
        kwargs = _kwargs(cls, variant)
        assert set(kwargs) <= set(SMALL) | set(variant)
        torch.manual_seed(0)
        model = cls(spec, **kwargs)
        assert model.spec is spec
        defaults = {p.name: p.default for p in params}
        for key in SHARED:
            if key in defaults:
                want = kwargs.get(key, defaults[key])
                assert getattr(model, key) == want, f"{name}.{key} = {getattr(model, key)!r}"


class _FlatMLP(nn.Module):
    """Reads the flattened weight vector: not invariant to hidden permutations."""

    input_kind = "weightspace"

    def __init__(self, spec) -> None:
        super().__init__()
        self.lin = nn.Linear(spec.num_params, 1)

    def forward(self, ws: WeightSpace) -> torch.Tensor:
        return self.lin(ws.flatten())


class _Constant(nn.Module):
    """Ignores its input: trivially invariant, and useless."""

    input_kind = "weightspace"

    def __init__(self, spec) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.full((1, 1), 0.5))

    def forward(self, ws: WeightSpace) -> torch.Tensor:
        return self.value.expand(len(ws), 1)


def test_contract_catches_broken_models(zoo):
    """The contract fails a model that breaks the symmetry and one that ignores its input."""
    _, _, ws = zoo["mlp"]
    with pytest.raises(AssertionError, match="symmetry broken"):
        _ws_contract(_FlatMLP, {}, "mlp", ws, "FlatMLP")
    with pytest.raises(AssertionError, match="output unchanged"):
        _ws_contract(_Constant, {}, "mlp", ws, "Constant")
