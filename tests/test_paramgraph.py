"""ParamGraph: exact round trips, permutation symmetry = graph isomorphism, batching, errors."""

from __future__ import annotations

import copy

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from networkx.algorithms import isomorphism as iso
from torch import nn
from torch_geometric.data import Batch

from metanet.graph import EdgeType, NodeType, ParamGraph, UnsupportedOpError, from_module

# ----------------------------------------------------------------------------- models


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))


class BNCNN(nn.Module):
    """conv-BN-relu, conv-BN-relu, maxpool, flatten, linear (plain forward code)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(torch.flatten(x, 1))


class ResBlock(nn.Module):
    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(c, hidden, 3, padding=1)
        self.conv_b = nn.Conv2d(hidden, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_b(F.relu(self.conv_a(x)))


class ResCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.blocks = nn.Sequential(ResBlock(4, 6), ResBlock(4, 6))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.stem(x)))
        return self.head(self.pool(x).view(x.size(0), -1))


class TransformerBlock(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2, hidden: int = 12, out: int = 3) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(dim=1))


def randomize_(module: nn.Module) -> nn.Module:
    """Random values for every float parameter and buffer (so norms are not 1/0)."""
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if torch.is_floating_point(t):
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t))
    return module


CASES = [
    ("mlp", mlp, (7, 3)),
    ("bn_cnn", BNCNN, (2, 2, 4, 4)),
    ("res_cnn", ResCNN, (2, 1, 5, 5)),
    ("transformer", TransformerBlock, (2, 5, 8)),
]


def build(name: str):
    factory, shape = {c[0]: (c[1], c[2]) for c in CASES}[name]
    model = randomize_(factory()).eval()
    x = torch.randn(shape)
    return model, x, from_module(model, example_input=x)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_round_trip_exact(name: str) -> None:
    model, x, g = build(name)
    ref = model.state_dict()
    sd = g.to_state_dict()
    assert list(sd) == list(ref)
    for k in ref:
        assert sd[k].shape == ref[k].shape and sd[k].dtype == ref[k].dtype
        assert torch.equal(sd[k], ref[k]), k
    fresh = type(model)() if name != "mlp" else mlp()
    g.load_into(fresh.eval())
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert torch.equal(fresh(x), model(x))
    # structure invariants
    ei = g.edge_index
    key = ei[1] * g.num_nodes + ei[0]
    assert bool((key[1:] >= key[:-1]).all())
    assert torch.equal(g.dst_ptr, torch.searchsorted(ei[1], torch.arange(g.num_nodes + 1)))
    assert g.edge_attr.shape == (g.num_edges, 9) and g.x.shape == (g.num_nodes, 3)


def test_bn_running_stats_round_trip_and_module_untouched() -> None:
    model = BNCNN()
    model.train()
    for _ in range(3):
        model(torch.randn(4, 2, 4, 4))
    before = copy.deepcopy(model.state_dict())
    g = from_module(model, example_input=torch.randn(2, 2, 4, 4))
    assert model.training and model.bn1.training  # training flags restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # tracing ran in eval mode: stats untouched
    assert int(before["bn1.num_batches_tracked"]) == 3
    fresh = BNCNN()
    g.load_into(fresh)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k
    slot = g.layout.locate("bn2.running_var")
    assert slot.source == "node" and torch.equal(
        g.x[slot.rows, slot.col], before["bn2.running_var"]
    )


def test_edit_edges_then_load_changes_module() -> None:
    model, x, g = build("bn_cnn")
    g2 = g.clone()
    lin = g2.layout.locate("fc.weight")
    g2.edge_attr[lin.rows[7], 0] = 5.0
    conv = g2.layout.locate("conv2.weight")
    assert conv.width == 9
    g2.edge_attr[conv.rows[3], :9] = torch.arange(9.0)
    b = g2.layout.locate("conv1.bias")
    g2.x[b.rows[1], b.col] = -2.0
    edited = g2.load_into(BNCNN())
    assert edited.fc.weight.view(-1)[7] == 5.0
    assert torch.equal(edited.conv2.weight.view(-1, 9)[3], torch.arange(9.0))
    assert edited.conv1.bias[1] == -2.0
    changed = [
        k for k, v in edited.state_dict().items() if not torch.equal(v, model.state_dict()[k])
    ]
    assert sorted(changed) == ["conv1.bias", "conv2.weight", "fc.weight"]


def test_with_state_dict_matches_fresh_trace() -> None:
    _, x, g = build("res_cnn")
    other = randomize_(ResCNN()).eval()
    g_other = from_module(other, example_input=x)
    g_fast = g.with_state_dict(other.state_dict())
    for key in ("x", "edge_attr", "edge_index", "edge_type", "node_type", "dst_ptr"):
        assert torch.equal(g_fast[key], g_other[key]), key
    bad = dict(other.state_dict())
    bad["head.weight"] = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="head.weight"):
        g.with_state_dict(bad)


# ----------------------------------------------------------------------------- structure


def test_constructions() -> None:
    _, _, g = build("bn_cnn")
    counts = torch.bincount(g.node_type, minlength=len(NodeType))
    assert counts[NodeType.INPUT] == 2 and counts[NodeType.OUTPUT] == 3
    assert counts[NodeType.NORM] == 4 + 5 and counts[NodeType.FLATTEN] == 5 * 4
    et = torch.bincount(g.edge_type, minlength=len(EdgeType))
    assert et[EdgeType.CONV] == 2 * 4 + 4 * 5 and et[EdgeType.FLATTEN] == 20
    assert et[EdgeType.LINEAR] == 20 * 3 and et[EdgeType.NORM] == 9
    # flatten nodes carry their spatial position
    flat = g.node_pos[g.node_type == NodeType.FLATTEN]
    assert torch.equal(flat, torch.arange(4).repeat(5))

    _, _, g = build("res_cnn")
    et = torch.bincount(g.edge_type, minlength=len(EdgeType))
    assert et[EdgeType.RESIDUAL] == 2 * 4  # merged into the block outputs: no SUM nodes
    assert int((g.node_type == NodeType.SUM).sum()) == 0

    _, _, g = build("transformer")
    nt = torch.bincount(g.node_type, minlength=len(NodeType))
    assert nt[NodeType.ATTN_HEAD] == 2 and nt[NodeType.ATTN_QUERY] == 8
    et = torch.bincount(g.edge_type, minlength=len(EdgeType))
    assert et[EdgeType.ATTN_QUERY] == 64 and et[EdgeType.ATTN_OUT] == 64
    assert et[EdgeType.ATTN_PAIR] == 8 and et[EdgeType.ATTN_HEAD] == 24
    assert et[EdgeType.RESIDUAL] == 16


# ----------------------------------------------------------------------------- symmetry


def _nx_iso(g1: ParamGraph, g2: ParamGraph) -> bool:
    nm = iso.categorical_node_match(["x", "node_type", "node_layer", "node_pos"], [None] * 4)
    em = iso.categorical_multiedge_match(["edge_attr", "edge_type"], [None, None])
    return nx.is_isomorphic(g1.to_networkx(), g2.to_networkx(), node_match=nm, edge_match=em)


def _multisets_equal(g1: ParamGraph, g2: ParamGraph) -> bool:
    def node_rows(g):
        return torch.cat(
            [g.node_type[:, None], g.node_layer[:, None], g.node_pos[:, None], g.x], 1
        ).double()

    def edge_rows(g):
        nr = node_rows(g)  # endpoint type, layer, position and values
        s, d = g.edge_index
        return torch.cat([g.edge_type[:, None].double(), g.edge_attr.double(), nr[s], nr[d]], 1)

    def same(a, b):
        if a.shape != b.shape:
            return False
        ua, ca = torch.unique(a, dim=0, return_counts=True)
        ub, cb = torch.unique(b, dim=0, return_counts=True)
        return ua.shape == ub.shape and torch.equal(ua, ub) and torch.equal(ca, cb)

    a, b = node_rows(g1), node_rows(g2)
    c, d = edge_rows(g1), edge_rows(g2)
    return same(a, b) and same(c, d)


def permute_mlp(m: nn.Sequential, perms: list[torch.Tensor]) -> nn.Sequential:
    m = copy.deepcopy(m)
    lins = [layer for layer in m if isinstance(layer, nn.Linear)]
    with torch.no_grad():
        for i, p in enumerate(perms):
            lins[i].weight.copy_(lins[i].weight[p])
            lins[i].bias.copy_(lins[i].bias[p])
            lins[i + 1].weight.copy_(lins[i + 1].weight[:, p])
    return m


def test_mlp_permutation_is_isomorphism() -> None:
    model, x, g = build("mlp")
    perms = [torch.randperm(5), torch.randperm(4)]
    pm = permute_mlp(model, perms)
    assert torch.allclose(pm(x), model(x), atol=1e-6)
    gp = from_module(pm, example_input=x)
    assert not torch.equal(gp.edge_attr, g.edge_attr)  # the arrays really differ
    assert _nx_iso(g, gp) and _multisets_equal(g, gp)
    # a non-symmetry: change one weight -> not isomorphic any more
    broken = copy.deepcopy(pm)
    with torch.no_grad():
        broken[2].weight[1, 2] += 0.5
    gb = from_module(broken, example_input=x)
    assert not _nx_iso(g, gb) and not _multisets_equal(g, gb)
    # permuting an input neuron is not a symmetry: node_pos pins inputs
    swapped = copy.deepcopy(model)
    with torch.no_grad():
        swapped[0].weight.copy_(swapped[0].weight[:, [1, 0, 2]])
    assert not _nx_iso(g, from_module(swapped, example_input=x))


def _perm_conv_out(conv: nn.Conv2d, p: torch.Tensor) -> None:
    conv.weight.copy_(conv.weight[p])
    conv.bias.copy_(conv.bias[p])


def _perm_bn(bn: nn.BatchNorm2d, p: torch.Tensor) -> None:
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        t.copy_(t[p])


def test_cnn_channel_permutation_is_isomorphism() -> None:
    model, x, g = build("bn_cnn")
    p1, p2 = torch.randperm(4), torch.randperm(5)
    pm = copy.deepcopy(model)
    with torch.no_grad():
        _perm_conv_out(pm.conv1, p1)
        _perm_bn(pm.bn1, p1)
        pm.conv2.weight.copy_(pm.conv2.weight[:, p1])
        _perm_conv_out(pm.conv2, p2)
        _perm_bn(pm.bn2, p2)
        pm.fc.weight.copy_(pm.fc.weight.view(3, 5, 4)[:, p2].reshape(3, 20))
    assert torch.allclose(pm(x), model(x), atol=1e-5)
    gp = from_module(pm, example_input=x)
    assert _multisets_equal(g, gp) and _nx_iso(g, gp)
    with torch.no_grad():
        pm.bn2.running_mean[0] += 1.0
    gb = from_module(pm, example_input=x)
    assert not _multisets_equal(g, gb) and not _nx_iso(g, gb)


def test_residual_cnn_permutation_is_isomorphism() -> None:
    model, x, g = build("res_cnn")
    stream, q1, q2 = torch.randperm(4), torch.randperm(6), torch.randperm(6)
    pm = copy.deepcopy(model)
    with torch.no_grad():
        _perm_conv_out(pm.stem, stream)
        for block, q in zip(pm.blocks, (q1, q2)):
            block.conv_a.weight.copy_(block.conv_a.weight[:, stream])
            _perm_conv_out(block.conv_a, q)
            block.conv_b.weight.copy_(block.conv_b.weight[:, q])
            _perm_conv_out(block.conv_b, stream)
        pm.head.weight.copy_(pm.head.weight[:, stream])
    assert torch.allclose(pm(x), model(x), atol=1e-5)
    gp = from_module(pm, example_input=x)
    assert _multisets_equal(g, gp) and _nx_iso(g, gp)
    # permuting only the block's output channels (not the skip stream) is not a symmetry
    bad = copy.deepcopy(model)
    with torch.no_grad():
        _perm_conv_out(bad.blocks[0].conv_b, torch.tensor([1, 0, 2, 3]))
    assert not _nx_iso(g, from_module(bad, example_input=x))


def _permute_attention(attn: nn.MultiheadAttention, qk: torch.Tensor, v: torch.Tensor) -> None:
    e = attn.embed_dim
    w, b = attn.in_proj_weight, attn.in_proj_bias
    rows = torch.cat([qk, qk + e, v + 2 * e])
    w.copy_(w[rows])
    b.copy_(b[rows])
    attn.out_proj.weight.copy_(attn.out_proj.weight[:, v])


def test_transformer_permutation_is_isomorphism() -> None:
    model, x, g = build("transformer")
    d, heads = 4, 2
    head_perm = torch.tensor([1, 0])
    within_qk = torch.cat([torch.randperm(d) + h * d for h in range(heads)])
    within_v = torch.cat([torch.randperm(d) + h * d for h in range(heads)])
    blocks = (head_perm[:, None] * d + torch.arange(d)).reshape(-1)
    qk, v = blocks[within_qk], blocks[within_v]
    hidden = torch.randperm(12)
    pm = copy.deepcopy(model)
    with torch.no_grad():
        _permute_attention(pm.attn, qk, v)
        pm.fc1.weight.copy_(pm.fc1.weight[hidden])
        pm.fc1.bias.copy_(pm.fc1.bias[hidden])
        pm.fc2.weight.copy_(pm.fc2.weight[:, hidden])
    assert torch.allclose(pm(x), model(x), atol=1e-5)
    gp = from_module(pm, example_input=x)
    assert _multisets_equal(g, gp) and _nx_iso(g, gp)
    # moving one query/key pair to another head is not a symmetry; the heads make it visible
    cross = torch.arange(8)
    cross[[0, 4]] = cross[[4, 0]]
    bad = copy.deepcopy(model)
    with torch.no_grad():
        _permute_attention(bad.attn, cross, torch.arange(8))
    assert not torch.allclose(bad(x), model(x), atol=1e-4)
    gb = from_module(bad, example_input=x)
    assert _multisets_equal(g, gb)  # same weights, only regrouped ...
    assert not _nx_iso(g, gb)  # ... but the head structure differs
    # permuting queries without their keys is not a symmetry; the pair edges make it visible
    q_only = copy.deepcopy(model)
    with torch.no_grad():
        w, b = q_only.attn.in_proj_weight, q_only.attn.in_proj_bias
        swap = torch.tensor([1, 0, 2, 3])
        w[:4].copy_(w[:4][swap])
        b[:4].copy_(b[:4][swap])
    assert not torch.allclose(q_only(x), model(x), atol=1e-4)
    assert not _nx_iso(g, from_module(q_only, example_input=x))


def test_groupnorm_groups_are_encoded() -> None:
    def net():
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(),
                             nn.Conv2d(4, 2, 1))  # fmt: skip

    model = randomize_(net()).eval()
    x = torch.randn(2, 1, 5, 5)
    g = from_module(model, example_input=x)
    assert int((g.node_type == NodeType.GROUP).sum()) == 2

    def permuted(p):
        pm = copy.deepcopy(model)
        with torch.no_grad():
            _perm_conv_out(pm[0], p)
            pm[1].weight.copy_(pm[1].weight[p])
            pm[1].bias.copy_(pm[1].bias[p])
            pm[3].weight.copy_(pm[3].weight[:, p])
        return pm

    within = permuted(torch.tensor([1, 0, 3, 2]))
    assert torch.allclose(within(x), model(x), atol=1e-5)
    assert _nx_iso(g, from_module(within, example_input=x))
    across = permuted(torch.tensor([2, 1, 0, 3]))
    assert not torch.allclose(across(x), model(x), atol=1e-4)
    assert not _nx_iso(g, from_module(across, example_input=x))


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_zoo_norm_subclass_is_read_as_its_base_layer(norm: str) -> None:
    """The zoo's GroupNorm re-implements forward() with tensor ops (for vmap); the graph must
    still see one GroupNorm layer, not trace into it, and map back exactly."""
    from metanet.zoo.architectures import build_module

    arch = {"type": "cnn", "channels": [8, 8], "kernel": 3, "activation": "relu",
            "residual": True, "norm": norm, "head": "pool"}  # fmt: skip
    model = randomize_(build_module(arch)).eval()
    x = torch.randn(3, 1, 8, 8)
    g = from_module(model, example_input=x)
    assert int((g.node_type == NodeType.NORM).sum()) > 0
    fresh = build_module(arch).eval()
    g.load_into(fresh)
    assert torch.equal(fresh(x), model(x))


# ----------------------------------------------------------------------------- batching


def test_batch_keeps_sorting_and_dst_ptr() -> None:
    graphs = [build(name)[2] for name, _, _ in CASES]
    batch = Batch.from_data_list(graphs)
    ei = batch.edge_index
    key = ei[1] * batch.num_nodes + ei[0]
    assert bool((key[1:] >= key[:-1]).all())
    ptr = ParamGraph.batch_dst_ptr(batch)
    expected = torch.zeros(batch.num_nodes + 1, dtype=torch.long)
    expected[1:] = torch.cumsum(torch.bincount(ei[1], minlength=batch.num_nodes), 0)
    assert torch.equal(ptr, expected)
    for g, back in zip(graphs, batch.to_data_list()):
        assert torch.equal(back.dst_ptr, g.dst_ptr) and torch.equal(back.edge_index, g.edge_index)
    # write predicted edge values back, per graph
    new_edges = batch.edge_attr.clone()
    new_edges[:, 0] += 1.0
    sds = ParamGraph.state_dicts_from_batch(batch, edge_values=new_edges)
    for g, sd in zip(graphs, sds):
        ref = g.to_state_dict()
        assert list(sd) == list(ref)
        w = next(k for k in ref if k.endswith("weight"))
        assert not torch.equal(sd[w], ref[w])
        same = ParamGraph.state_dicts_from_batch(batch)[graphs.index(g)]
        assert all(torch.equal(same[k], ref[k]) for k in ref)


# ----------------------------------------------------------------------------- errors


def test_unsupported_module_names_op_and_path() -> None:
    class WithLSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Sequential(nn.Linear(3, 4))
            self.rnn = nn.LSTM(4, 4, batch_first=True)

        def forward(self, x):
            return self.rnn(self.enc(x))[0]

    with pytest.raises(UnsupportedOpError, match=r"LSTM.*'rnn'"):
        from_module(WithLSTM(), example_input=torch.randn(2, 5, 3))


def test_unsupported_function_names_op_and_path() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return torch.cumsum(self.fc(x), dim=-1)

    model = nn.Sequential(nn.Linear(3, 3), Custom())
    with pytest.raises(UnsupportedOpError, match=r"cumsum.*'1'") as info:
        from_module(model)
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnsupportedOpError, match="module Softmax at module path '1'"):
        from_module(nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=-1)))
    with pytest.raises(UnsupportedOpError, match="weight sharing"):
        shared = nn.Linear(3, 3)
        from_module(nn.Sequential(shared, nn.ReLU(), shared))


def test_nonfinite_and_kernel_errors() -> None:
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'2\.weight'"):
        from_module(model)
    g = from_module(model, allow_nonfinite=True)
    assert torch.isnan(g.to_state_dict()["2.weight"][0, 0])



def test_kernels_wider_than_max_kernel_size_become_offset_nodes() -> None:
    """A 5x5 conv at max_kernel_size=9 is read over its 25 kernel offsets (one PATCH node per
    input channel and offset, scalar edges), without widening the 3x3 conv's edges; with
    max_kernel_size=25 it is one 25-wide edge per channel pair. Both write back exactly and
    compute the same function."""
    torch.manual_seed(0)
    big = nn.Sequential(nn.Conv2d(1, 2, 5, padding=2), nn.ReLU(), nn.Conv2d(2, 2, 3))
    x = torch.randn(1, 1, 8, 8)
    g = from_module(big, example_input=x)
    assert g.edge_attr.shape[1] == 9
    patch = g.node_type == NodeType.PATCH
    assert int(patch.sum()) == 25 and sorted(g.node_pos[patch].tolist()) == list(range(25))
    conv0 = g.layout.slots["0.weight"]
    assert (conv0.width, conv0.rows.numel()) == (1, 50)  # 2 outputs x 25 offsets
    wide = from_module(big, example_input=x, max_kernel_size=25)
    assert wide.edge_attr.shape[1] == 25 and not bool((wide.node_type == NodeType.PATCH).any())
    for graph in (g, wide):
        assert all(torch.equal(v, big.state_dict()[k]) for k, v in graph.to_state_dict().items())
        fresh = nn.Sequential(nn.Conv2d(1, 2, 5, padding=2), nn.ReLU(), nn.Conv2d(2, 2, 3))
        with torch.no_grad():
            torch.testing.assert_close(graph.load_into(fresh)(x), big(x))


def test_bad_values_and_modules() -> None:
    _, _, g = build("mlp")
    with pytest.raises(ValueError, match="edge_values"):
        g.state_dict_from(edge_values=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="keys only in"):
        g.load_into(nn.Sequential(nn.Linear(3, 5)))
    with pytest.raises(TypeError):
        from_module("not a module")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- forward code


class FunctionalSiren(nn.Module):
    """Parameters used through F.linear, scalar multiplication and torch.sin."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 2))
        self.b = nn.Parameter(torch.randn(4))
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.sin(30.0 * F.linear(x, self.w, self.b)))


class Sliced(nn.Module):
    """Slicing neurons has no parameter-graph construction."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)[:, :2]


class ConvViewLN(nn.Module):
    """Conv1d, functional pooling, flatten via view(size(0), -1), LayerNorm without affine."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.fc = nn.Linear(3 * 3, 2)
        self.ln = nn.LayerNorm(2, elementwise_affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool1d(F.relu(self.conv(x)), 2)
        return self.ln(self.fc(h.view(h.size(0), -1)))


def test_forward_code_variants() -> None:
    g = from_module(FunctionalSiren())  # input guessed from F.linear's weight
    assert int((g.node_type == NodeType.INPUT).sum()) == 2
    model = ConvViewLN()
    g = from_module(model, example_input=torch.randn(2, 2, 8))
    assert int((g.node_type == NodeType.FLATTEN).sum()) == 9
    assert int((g.edge_type == EdgeType.NORM).sum()) == 2
    assert torch.equal(g.to_state_dict()["fc.weight"], model.fc.weight)
    # the conv-first guess (square / 1d sizes) finds the length 8 that fits fc's in_features
    assert torch.equal(from_module(model).edge_index, g.edge_index)
    with pytest.raises(UnsupportedOpError, match="getitem at module path '<root>'"):
        from_module(Sliced())

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(torch.add(h, x, alpha=0.5) + h)

    g = from_module(Shared())
    assert int((g.node_type == NodeType.SUM).sum()) == 3
    res = g.edge_attr[g.edge_type == EdgeType.RESIDUAL, 0]
    assert sorted(res.tolist()) == [0.5] * 3 + [1.0] * 6


# ----------------------------------------------------------------------------- storage


def _global_sort(b, n):
    """Reference for tracing._sorted_edges: one stable sort of every edge's (dst, src) key."""
    from metanet.graph import tracing

    key = torch.cat([d.long() * max(n, 1) + s.long() for s, d in zip(b.src, b.dst)])
    sizes = [int(d.numel()) for d in b.dst]
    b.src.clear()
    b.dst.clear()
    sorted_key, perm = torch.sort(key, stable=True)
    edge_index = torch.stack([sorted_key % max(n, 1), sorted_key // max(n, 1)]).int()
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    order = tracing._EdgeOrder(tracing._offsets_of(sizes), sizes)
    order.tables = dict(enumerate(torch.split(inv, sizes)))
    return edge_index, order


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_chunk_merge_equals_one_global_sort(name: str, monkeypatch) -> None:
    # the builder orders already-sorted chunks without sorting and sorts only overlapping
    # groups (attention's pair edges); the graph must be the one a global stable sort gives
    from metanet.graph import tracing

    model, x, g = build(name)
    monkeypatch.setattr(tracing, "_sorted_edges", _global_sort)
    ref = from_module(model, example_input=x)
    for key in ("edge_index", "edge_attr", "edge_type", "x", "node_type", "dst_ptr"):
        assert torch.equal(g[key], ref[key]), key
    for key, slot in g.layout.slots.items():
        assert torch.equal(slot.rows, ref.layout.slots[key].rows), key


def test_storage_is_compact_and_rows_are_runs() -> None:
    # int32 endpoints, uint8 types, Linear/conv weights stored as row runs (no bytes per
    # element); at max_kernel_size=1 an MLP's graph is ~3.25x its float32 parameters
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))  # fmt: skip
    g = from_module(model, max_kernel_size=1)
    assert g.edge_index.dtype == torch.int32 and g.edge_type.dtype == torch.uint8
    assert all(s.is_run and s.storage_bytes == 0 for s in g.layout.slots.values())
    nbytes = sum(v.numel() * v.element_size() for _, v in g if isinstance(v, torch.Tensor))
    params = sum(p.numel() * 4 for p in model.parameters())
    assert nbytes < 3.5 * params
    _, _, t = build("transformer")  # attention pair edges: some rows are tables, int32
    tables = [s for s in t.layout.slots.values() if not s.is_run]
    assert all(s.storage_bytes == s.rows.numel() * 4 for s in tables)
