"""Graph metanetworks (GMN / NG-GNN, NG-T) on ParamGraphs of real networks.

Hidden-neuron permutations are applied to the *module's* state_dict (MLP neurons, CNN channels
with BatchNorm, a residual stream, a transformer block's stream / MLP neurons / heads), the
graph is rebuilt from the permuted module, and the models' graph outputs must stay equal while
their per-weight (edge) and per-neuron (node) outputs, mapped back to state_dicts through the
graph's parameter layout, must permute exactly like the weights.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch_geometric.data import Batch

from metanet.graph import ParamGraph, from_module
from metanet.nn.gmn import GMN, NGGNN
from metanet.nn.graph_features import make_probe_inputs, probe_features, read_batch
from metanet.nn.ngt import NGT
from metanet.zoo.architectures import build_module


class TinyTransformer(nn.Module):
    """Input projection, one post-norm transformer block (MHA + MLP), mean pool, head."""

    def __init__(self, n_in: int = 6, d: int = 8, heads: int = 2, ff: int = 12, n_out: int = 3):
        super().__init__()
        self.inp = nn.Linear(n_in, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln1 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ff)
        self.ff2 = nn.Linear(ff, d)
        self.ln2 = nn.LayerNorm(d)
        self.out = nn.Linear(d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.ln1(h + a)
        h = self.ln2(h + self.ff2(torch.relu(self.ff1(h))))
        return self.out(h.mean(1))


# A permutation plan: groups of (size, [(key, dim, reps, block)]). A group's permutation p of
# ``size`` items reorders axis ``dim`` of ``key``, seen as ``reps`` parts of ``size`` blocks of
# ``block`` entries each.
def _bn(prefix: str) -> list:
    return [(f"{prefix}.{k}", 0, 1, 1) for k in ("weight", "bias", "running_mean", "running_var")]


def _mlp():
    m = build_module({"type": "mlp", "in": 16, "widths": [12, 10], "out": 5})
    plan = [
        (12, [("0.weight", 0, 1, 1), ("0.bias", 0, 1, 1), ("2.weight", 1, 1, 1)]),
        (10, [("2.weight", 0, 1, 1), ("2.bias", 0, 1, 1), ("4.weight", 1, 1, 1)]),
    ]
    return m, None, plan


def _cnn_bn():
    arch = {"type": "cnn", "channels": [4, 6], "strides": [1, 2], "norm": "batch",
            "head": "flatten", "out": 5}  # fmt: skip
    m = build_module(arch)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for bn in (m[1], m[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    plan = [
        (4, [("0.weight", 0, 1, 1), ("0.bias", 0, 1, 1), *_bn("1"), ("3.weight", 1, 1, 1)]),
        (6, [("3.weight", 0, 1, 1), ("3.bias", 0, 1, 1), *_bn("4"), ("7.weight", 1, 1, 16)]),
    ]
    return m, None, plan


def _res_cnn():
    m = build_module({"type": "cnn", "channels": [4, 4], "residual": True, "out": 5})
    res = [("2.body.0.weight", 0, 1, 1), ("2.body.0.bias", 0, 1, 1), ("2.body.0.weight", 1, 1, 1)]
    plan = [(4, [("0.weight", 0, 1, 1), ("0.bias", 0, 1, 1), *res, ("5.weight", 1, 1, 1)])]
    return m, None, plan


def _transformer():
    m = TinyTransformer()
    d, heads, dh = 8, 2, 4
    stream = [
        ("inp.weight", 0, 1, 1), ("inp.bias", 0, 1, 1), ("attn.in_proj_weight", 1, 1, 1),
        ("attn.out_proj.weight", 0, 1, 1), ("attn.out_proj.bias", 0, 1, 1),
        ("ln1.weight", 0, 1, 1), ("ln1.bias", 0, 1, 1), ("ff1.weight", 1, 1, 1),
        ("ff2.weight", 0, 1, 1), ("ff2.bias", 0, 1, 1), ("ln2.weight", 0, 1, 1),
        ("ln2.bias", 0, 1, 1), ("out.weight", 1, 1, 1),
    ]  # fmt: skip
    ff = [("ff1.weight", 0, 1, 1), ("ff1.bias", 0, 1, 1), ("ff2.weight", 1, 1, 1)]
    head = [("attn.in_proj_weight", 0, 3, dh), ("attn.in_proj_bias", 0, 3, dh),
            ("attn.out_proj.weight", 1, 1, dh)]  # fmt: skip
    return m, torch.randn(2, 5, 6), [(d, stream), (12, ff), (heads, head)]


NETS = {"mlp": _mlp, "cnn_bn": _cnn_bn, "res_cnn": _res_cnn, "transformer": _transformer}


def _index(p: torch.Tensor, reps: int, block: int) -> torch.Tensor:
    n = p.numel()
    one = (p.unsqueeze(1) * block + torch.arange(block)).flatten()
    return torch.cat([r * n * block + one for r in range(reps)])


def permute_state_dict(sd: dict, plan: list, perms: list[torch.Tensor]) -> dict:
    """Apply one permutation per plan group to a state_dict (or to a predicted one)."""
    out = dict(sd)
    for (_, entries), p in zip(plan, perms):
        for key, dim, reps, block in entries:
            out[key] = out[key].index_select(dim, _index(p, reps, block))
    return out


def _graph(module: nn.Module, example: torch.Tensor | None, sd: dict | None = None) -> ParamGraph:
    if sd is not None:
        module.load_state_dict(sd)
    return from_module(module, example)


def _permuted_pair(name: str, seed: int = 0):
    module, example, plan = NETS[name]()
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(size, generator=gen) for size, _ in plan]
    for p in perms:  # a random permutation that is not the identity
        if torch.equal(p, torch.arange(p.numel())):
            p.copy_(p.roll(1))
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    g1 = _graph(module, example)
    g2 = _graph(module, example, permute_state_dict(sd, plan, perms))
    module.load_state_dict(sd)
    return module, example, plan, perms, g1, g2


def _models(output: str = "graph", **kw):
    """Small models. NG-GNN passes messages forward only, so it needs as many layers as the
    deepest network has (3) for the inputs to reach the output neurons it reads."""
    return {
        "gmn": GMN(output=output, hidden=16, num_layers=2, **kw),
        "nggnn": NGGNN(
            output=output, hidden=16, num_layers=3, fourier_features=8, output_slots=5, **kw
        ),  # fmt: skip
        "ngt": NGT(output=output, hidden=16, edge_dim=8, num_layers=2, heads=2, **kw),
    }


def test_permutation_plans_preserve_the_module_function():
    """Sanity of the test helpers: the permuted module computes the same function."""
    for name in NETS:
        module, example, plan, perms, _, _ = _permuted_pair(name)
        x = (
            example
            if example is not None
            else (torch.randn(3, 16) if name == "mlp" else torch.randn(3, 1, 8, 8))
        )
        module.eval()
        y1 = module(x)
        module.load_state_dict(permute_state_dict(module.state_dict(), plan, perms))
        torch.testing.assert_close(module(x), y1, atol=1e-5, rtol=1e-5)


@pytest.mark.native_backend
@pytest.mark.parametrize("name", list(NETS))
def test_graph_outputs_invariant_to_hidden_permutations(name: str):
    _, _, _, _, g1, g2 = _permuted_pair(name)
    assert not torch.equal(g1.edge_attr, g2.edge_attr)  # the permutation did change the graph
    for key, model in _models().items():
        model.eval()
        y1, y2 = model(g1), model(g2)
        assert y1.shape == (1, 1)
        torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-4, msg=f"{key} on {name}")


@pytest.mark.parametrize("name", list(NETS))
def test_edge_and_node_outputs_equivariant(name: str):
    _, _, plan, perms, g1, g2 = _permuted_pair(name, seed=1)
    edge_keys = [k for k, s in g1.layout.slots.items() if s.source == "edge"]
    node_keys = [k for k, s in g1.layout.slots.items() if s.source == "node"]
    for key, model in _models("edge", edge_out_dim=9).items():
        model.eval()
        sd1 = g1.state_dict_from(edge_values=model(g1))
        sd2 = g2.state_dict_from(edge_values=model(g2))
        expect = permute_state_dict(sd1, plan, perms)
        for k in edge_keys:
            torch.testing.assert_close(sd2[k], expect[k], atol=1e-5, rtol=1e-4,
                                       msg=f"{key} edge output '{k}' on {name}")  # fmt: skip
    for key, model in _models("node", node_out_dim=3).items():
        model.eval()
        sd1 = g1.state_dict_from(node_values=model(g1))
        sd2 = g2.state_dict_from(node_values=model(g2))
        expect = permute_state_dict(sd1, plan, perms)
        for k in node_keys:
            torch.testing.assert_close(sd2[k], expect[k], atol=1e-5, rtol=1e-4,
                                       msg=f"{key} node output '{k}' on {name}")  # fmt: skip


def test_input_and_output_permutations_are_not_symmetries():
    """Permuting input or output neurons changes the network's function, and must change the
    models' outputs, by far more than the float noise of a hidden (true) symmetry."""
    mlp, _, _, _, g1, g_hidden = _permuted_pair("mlp")
    sd = {k: v.clone() for k, v in mlp.state_dict().items()}
    sd_in = dict(sd, **{"0.weight": sd["0.weight"][:, torch.randperm(16)]})
    sd_out = dict(sd, **{"4.weight": sd["4.weight"].roll(1, 0), "4.bias": sd["4.bias"].roll(1)})
    g_in, g_out = _graph(mlp, None, sd_in), _graph(mlp, None, sd_out)
    for key, model in _models().items():
        model.eval()
        with torch.no_grad():
            y = model(g1)
            noise = float((model(g_hidden) - y).abs().max())
            for other, what in ((g_in, "input"), (g_out, "output")):
                diff = float((model(other) - y).abs().max())
                assert diff > max(1e-6, 100 * noise), f"{key} is blind to the {what} order"


def test_batch_equals_one_by_one():
    graphs = [_permuted_pair(name)[4] for name in NETS]
    batch = Batch.from_data_list(graphs)
    for output in ("graph", "edge"):
        for key, model in _models(output).items():
            model.eval()
            together = model(batch)
            alone = torch.cat([model(Batch.from_data_list([g])) for g in graphs])
            torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4,
                                       msg=f"{key} ({output})")  # fmt: skip
            if output == "graph":
                assert together.shape == (len(graphs), 1)
            else:
                assert together.shape == (batch.edge_index.size(1), 1)


def test_gradients_flow_to_parameters_and_weights():
    graphs = [_permuted_pair(name)[4] for name in NETS]
    batch = Batch.from_data_list(graphs)
    batch.edge_attr.requires_grad_(True)
    for key, model in _models().items():
        batch.edge_attr.grad = None
        model.train()
        model(batch).pow(2).sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"{key}: no gradient for {missing}"
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        for n, p in model.named_parameters():
            if n.endswith(("emb.weight",)):
                continue  # only the rows of present types/positions get gradients
            assert p.grad.abs().sum() > 0, f"{key}: zero gradient for {n}"
        assert batch.edge_attr.grad.abs().sum() > 0


def test_probe_features_are_activations_and_keep_invariance():
    module, _, plan, perms, _, _ = _permuted_pair("mlp")
    probes = make_probe_inputs((16,), 4)
    g1 = from_module(module)
    g1.probe = probe_features(g1, module, probes)
    hidden = module[0](probes)  # [4, 12]: the first layer's outputs
    rows = g1.layout.slots["0.weight"].rows.view(12, 16)[:, 0]
    torch.testing.assert_close(g1.probe[g1.edge_index[1, rows]], hidden.t().detach())
    inputs = g1.node_type == 0
    torch.testing.assert_close(g1.probe[inputs], probes.t())
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    g2 = _graph(module, None, permute_state_dict(sd, plan, perms))
    g2.probe = probe_features(g2, module, probes)
    assert not torch.equal(g1.probe, g2.probe)
    model = GMN(hidden=16, num_layers=2, probe_dim=4).eval()
    torch.testing.assert_close(model(g2), model(g1), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="probe"):
        model(from_module(module))


def test_bad_input_raises_clear_errors():
    g = from_module(_mlp()[0])
    model = GMN(hidden=16, num_layers=1)
    bad = g.clone()
    bad.edge_attr = bad.edge_attr.clone()
    bad.edge_attr[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(bad)
    with pytest.raises(TypeError, match="ParamGraph"):
        model(torch.randn(3, 4))
    narrow = g.clone()
    narrow.edge_attr = narrow.edge_attr[:, :4]
    with pytest.raises(ValueError, match="edge_in_dim"):
        model(narrow)
    unsorted = g.clone()
    unsorted.edge_index = unsorted.edge_index.flip(1)
    with pytest.raises(ValueError, match="sorted"):
        read_batch(unsorted)
    with pytest.raises(ValueError, match="aggregators"):
        GMN(aggregators=("median",))
    with pytest.raises(ValueError, match="divisible"):
        NGT(hidden=10, heads=4)
