"""SignGMN: invariant to hidden-neuron sign flips and permutations of networks with odd
activations, sign-equivariant inside, and refusing graphs it cannot be invariant on."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch_geometric.data import Batch

from metanet.graph import from_module
from metanet.nn import GMN, SignGMN
from metanet.weightspace import WeightSpace, flip_signs, permute, random_permutation, random_signs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _siren() -> nn.Module:
    from metanet.zoo.architectures import build_module

    return build_module({"type": "siren", "in": 2, "widths": [12, 10], "out": 1, "w0": 30.0})


def _tanh_cnn() -> nn.Module:  # conv -> flatten -> linear: flattened positions follow channels
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Conv2d(4, 5, 3, stride=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(5 * 2 * 2, 3))  # fmt: skip


CASES = {"siren": (_siren, (1, 2)), "tanh_cnn": (_tanh_cnn, (1, 1, 8, 8))}


def _graphs(ws: WeightSpace, make, shape) -> Batch:
    example = torch.zeros(*shape)
    return Batch.from_data_list([from_module(ws.load_into(make(), i).eval(), example)
                                 for i in range(len(ws))])  # fmt: skip


def _model(batch: Batch, **kw) -> SignGMN:
    torch.manual_seed(0)
    model = SignGMN(node_in_dim=batch.x.size(1), edge_in_dim=batch.edge_attr.size(1), hidden=16,
                    num_layers=3, out_dim=4, **kw)  # fmt: skip
    model.calibrate(batch)
    return model.eval()


def _networks(make, n: int = 4) -> WeightSpace:
    torch.manual_seed(1)
    nets = [make() for _ in range(n)]
    with torch.no_grad():  # random biases: a zero bias is its own sign flip
        for net in nets:
            for m in net.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                    m.bias.uniform_(-0.5, 0.5)
    return WeightSpace.from_modules(nets)


@pytest.mark.parametrize("case", list(CASES))
def test_output_is_invariant_to_sign_flips_and_permutations_together(case):
    make, shape = CASES[case]
    ws = _networks(make)
    signs = random_signs(ws.spec, len(ws), torch.Generator().manual_seed(2))
    perms = random_permutation(ws.spec, torch.Generator().manual_seed(3), batch=len(ws))
    moved = permute(flip_signs(ws, signs), perms)
    x = torch.randn(5, *shape[1:])
    with torch.no_grad():  # the transformed networks compute the same functions
        for i in range(len(ws)):
            torch.testing.assert_close(moved.load_into(make(), i)(x), ws.load_into(make(), i)(x),
                                       atol=1e-5, rtol=1e-4)  # fmt: skip
    batch, batch_moved = _graphs(ws, make, shape), _graphs(moved, make, shape)
    model = _model(batch)
    with torch.no_grad():
        out, out_moved = model(batch), model(batch_moved)
    assert out.shape == (len(ws), 4)
    torch.testing.assert_close(out_moved, out, atol=1e-5 * out.abs().max().item(), rtol=0)
    # the permutation-equivariant GMN is not sign-invariant: the check above can fail
    gmn = GMN(node_in_dim=batch.x.size(1), edge_in_dim=batch.edge_attr.size(1), hidden=16,
              num_layers=2, out_dim=4).eval()  # fmt: skip
    gmn.calibrate(batch)
    with torch.no_grad():
        assert (gmn(batch_moved) - gmn(batch)).abs().max() > 1e-3


def test_hidden_states_flip_with_their_neurons_and_fixed_states_do_not():
    from metanet.graph.paramgraph import NodeType

    ws = _networks(_siren, n=2)
    signs = random_signs(ws.spec, len(ws), torch.Generator().manual_seed(4))
    batch = _graphs(ws, _siren, (1, 2))
    flipped = _graphs(flip_signs(ws, signs), _siren, (1, 2))
    model = _model(batch)
    with torch.no_grad():
        h, e, g = model.embed(batch)
        h_f, e_f, _ = model.embed(flipped)
    # node sign per graph node: +1 for inputs/outputs, the neuron's flip for hidden nodes
    node_sign = torch.ones(g.num_nodes)
    hidden = (g.node_type == NodeType.HIDDEN).nonzero().flatten()
    per_graph = [torch.cat([s[i] for s in signs]) for i in range(len(ws))]
    node_sign[hidden] = torch.cat(per_graph)  # hidden nodes are stored layer by layer
    scale = h.abs().max().item()
    torch.testing.assert_close(h_f, h * node_sign[:, None], atol=1e-5 * scale, rtol=0)
    edge_sign = node_sign[g.src] * node_sign[g.dst]
    torch.testing.assert_close(e_f, e * edge_sign[:, None], atol=1e-5 * e.abs().max().item(),
                               rtol=0)  # fmt: skip
    assert (node_sign < 0).any()


def test_a_flip_that_is_not_a_symmetry_changes_the_output():
    """Negating one hidden neuron's incoming weights and bias but not its outgoing weights
    changes the function, and the model sees it."""
    ws = _networks(_siren)
    weights, biases = list(ws.weights), list(ws.biases)
    weights[0], biases[0] = weights[0].clone(), biases[0].clone()
    weights[0][:, 0] *= -1
    biases[0][:, 0] *= -1
    broken = WeightSpace(ws.spec, weights, biases)
    signs = random_signs(ws.spec, len(ws), torch.Generator().manual_seed(5))
    batch, batch_broken = _graphs(ws, _siren, (1, 2)), _graphs(broken, _siren, (1, 2))
    batch_flipped = _graphs(flip_signs(ws, signs), _siren, (1, 2))
    model = _model(batch)
    with torch.no_grad():
        out = model(batch)
        err = (model(batch_flipped) - out).abs().max().item()  # float rounding of a symmetry
        moved = (model(batch_broken) - out).abs().max().item()
    assert moved > 100 * max(err, 1e-7 * out.abs().max().item()), (moved, err)


def test_graphs_with_norm_nodes_are_refused_naming_them():
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2))
    graph = from_module(net, torch.zeros(1, 3))
    model = SignGMN(hidden=8, num_layers=1, edge_in_dim=graph.edge_attr.size(1))
    with pytest.raises(ValueError, match="SignGMN reads .* this batch has NORM nodes"):
        model(Batch.from_data_list([graph]))


def test_statistics_live_in_the_state_dict_and_a_reloaded_model_agrees():
    ws = _networks(_siren)
    batch = _graphs(ws, _siren, (1, 2))
    model = _model(batch)
    assert model.is_calibrated
    fresh = SignGMN(node_in_dim=batch.x.size(1), edge_in_dim=batch.edge_attr.size(1), hidden=16,
                    num_layers=3, out_dim=4).eval()  # fmt: skip
    assert not fresh.is_calibrated
    fresh.load_state_dict(model.state_dict())
    assert fresh.is_calibrated
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch), model(batch))
    cnn_graph = Batch.from_data_list([from_module(_tanh_cnn(), torch.zeros(1, 1, 8, 8))])
    with pytest.raises(
        ValueError,
        match=r"\(edge_attr\) have 9 columns, the model was built "
        r"for 1 \(pass edge_in_dim\)",
    ):
        SignGMN(edge_in_dim=1).calibrate(cnn_graph)  # conv kernels: 9 edge columns


def test_glyphs_config_trains_on_a_siren_zoo(tmp_path):
    """``configs/inr/glyphs_sign_gmn.yaml`` fits (two epochs) on a tiny SIREN zoo through the
    CLI, and the task hands the training graphs' statistics to the model."""
    from tiny_zoo import build_tiny_inr_zoo

    from metanet.cli import MetanetCLI

    path = build_tiny_inr_zoo(str(tmp_path / "inr.h5"), per_class=2, steps=5)
    cli = MetanetCLI(["--config", os.path.join(ROOT, "configs", "inr", "glyphs_sign_gmn.yaml"),
                      "--data.init_args.zoo", path, "--data.init_args.batch_size", "8",
                      "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "2",
                      "--trainer.logger", "false", "--trainer.callbacks", "[]",
                      "--trainer.enable_progress_bar", "false"], run=False)  # fmt: skip
    cli.trainer.fit(cli.model, cli.datamodule)
    assert isinstance(cli.model.model, SignGMN) and cli.model.model.is_calibrated
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
