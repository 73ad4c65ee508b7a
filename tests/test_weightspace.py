"""WeightSpace: exact round trips, symmetry actions that keep the function, clear errors."""

import pytest
import torch
from torch import nn

from metanet.weightspace import (
    WeightSpace,
    WeightSpaceError,
    WeightSpaceSpec,
    invert_permutation,
    permute,
    random_permutation,
    random_relu_scale,
    relu_scale,
)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))


def cnn(pool: bool = False) -> nn.Module:
    layers = [nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU()]
    if pool:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 10)]
    else:
        layers += [nn.Flatten(), nn.Linear(5 * 6 * 6, 10)]
    return nn.Sequential(*layers)


class Siren(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(2, 8)
        self.hidden = nn.Linear(8, 8, bias=False)
        self.last = nn.Linear(8, 1)

    def forward(self, x):
        return self.last(torch.sin(self.hidden(torch.sin(30 * self.first(x)))))


NETS = {
    "mlp": (mlp, lambda: torch.randn(11, 5)),
    "cnn_flatten": (cnn, lambda: torch.randn(4, 1, 8, 8)),
    "cnn_pool": (lambda: cnn(pool=True), lambda: torch.randn(4, 1, 8, 8)),
    "siren_nobias": (Siren, lambda: torch.rand(9, 2)),
}


@pytest.mark.parametrize("name", list(NETS))
def test_round_trip_is_exact(name):
    make, data = NETS[name]
    nets = [make() for _ in range(3)]
    ws = WeightSpace.from_modules(nets)
    assert len(ws) == 3
    for i, net in enumerate(nets):
        fresh = make()
        ws.load_into(fresh, i)
        for (k, a), (_, b) in zip(net.state_dict().items(), fresh.state_dict().items()):
            assert torch.equal(a, b), k
        x = data()
        assert torch.equal(net(x), fresh(x))
    flat = ws.flatten()
    assert flat.shape == (3, ws.spec.num_params)
    assert ws.spec.num_params == sum(p.numel() for p in nets[0].parameters())
    assert WeightSpace.unflatten(flat, ws.spec).max_abs_diff(ws) == 0.0


@pytest.mark.parametrize("name", list(NETS))
def test_permutation_keeps_function(name):
    make, data = NETS[name]
    net = make().double()
    ws = WeightSpace.from_module(net)
    perms = random_permutation(ws.spec, torch.Generator().manual_seed(0))
    moved = permute(ws, perms)
    assert moved.max_abs_diff(ws) > 0  # the action does something
    other = make().double()
    moved.load_into(other)
    x = data().double()
    torch.testing.assert_close(other(x), net(x))
    # permuting back with the inverse restores the weights exactly
    assert permute(moved, invert_permutation(perms)).max_abs_diff(ws) == 0.0


def test_per_network_permutations_match_single_ones():
    nets = [mlp() for _ in range(4)]
    ws = WeightSpace.from_modules(nets)
    perms = random_permutation(ws.spec, torch.Generator().manual_seed(1), batch=4)
    batched = permute(ws, perms)
    for i in range(4):
        single = permute(ws[i], [p[i] for p in perms])
        assert single.max_abs_diff(batched[i]) == 0.0


def test_wrong_permutation_changes_function():
    """A permutation of the *input* neurons is no symmetry: the check above can fail."""
    net = mlp().double()
    ws = WeightSpace.from_module(net)
    broken = ws.clone()
    broken.weights[0] = broken.weights[0][:, :, torch.tensor([1, 0, 2, 3, 4])]
    other = mlp().double()
    broken.load_into(other)
    x = torch.randn(8, 5, dtype=torch.float64)
    assert not torch.allclose(other(x), net(x))


@pytest.mark.parametrize("name", ["mlp", "cnn_flatten", "cnn_pool"])
def test_relu_scaling_keeps_function(name):
    make, data = NETS[name]
    nets = [make().double() for _ in range(2)]
    ws = WeightSpace.from_modules(nets)
    scales = [
        s.double()
        for s in random_relu_scale(ws.spec, 2, generator=torch.Generator().manual_seed(2))
    ]
    scaled = relu_scale(ws, scales)
    assert scaled.max_abs_diff(ws) > 1e-3
    x = data().double()
    for i, net in enumerate(nets):
        other = make().double()
        scaled.load_into(other, i)
        torch.testing.assert_close(other(x), net(x))


def test_scaling_breaks_sine_networks():
    net = Siren().double()
    ws = WeightSpace.from_module(net)
    scaled = relu_scale(ws, [torch.full((8,), 2.0, dtype=torch.float64)] * 2)
    other = Siren().double()
    scaled.load_into(other)
    x = torch.rand(5, 2, dtype=torch.float64)
    assert not torch.allclose(other(x), net(x))


def test_spec_from_state_dict_matches_module():
    net = cnn()
    names = ["0", "2", "5"]
    spec = WeightSpaceSpec.from_state_dict(net.state_dict(), names)
    assert spec == WeightSpaceSpec.from_module(net)
    assert spec.layers[2].in_repeat == 36
    assert spec.hidden_sizes == (4, 5)
    assert WeightSpaceSpec.from_dict(spec.to_dict()) == spec


def test_cat_index_and_stacked_params():
    nets = [mlp() for _ in range(5)]
    ws = WeightSpace.from_modules(nets)
    both = WeightSpace.cat([ws[:2], ws[2:]])
    assert both.max_abs_diff(ws) == 0.0
    params = ws.stacked_params()
    assert params["0.weight"].shape == (5, 7, 5)
    x = torch.randn(3, 5)
    out = torch.func.vmap(lambda p: torch.func.functional_call(nets[0], p, (x,)))(params)
    assert out.shape == (5, 3, 3)
    torch.testing.assert_close(out[4], nets[4](x))
    assert WeightSpace.from_stacked_params(params, ws.spec).max_abs_diff(ws) == 0.0
    no_bias = nn.Sequential(nn.Linear(5, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))
    ws_nb = WeightSpace.from_modules([no_bias, no_bias])
    back = WeightSpace.from_stacked_params(ws_nb.stacked_params(), ws_nb.spec)
    assert back.max_abs_diff(ws_nb) == 0.0 and back.biases[0].shape == (2, 4)


def test_errors_name_the_key():
    net = mlp()
    spec = WeightSpaceSpec.from_module(net)
    sd = net.state_dict()
    missing = {k: v for k, v in sd.items() if k != "2.bias"}
    with pytest.raises(WeightSpaceError, match="2.bias"):
        WeightSpace.from_state_dicts([missing], spec)
    extra = dict(sd, **{"5.weight": torch.zeros(1)})
    with pytest.raises(WeightSpaceError, match="5.weight"):
        WeightSpace.from_state_dicts([extra], spec)
    bad_shape = dict(sd, **{"2.weight": torch.zeros(6, 8)})
    with pytest.raises(WeightSpaceError, match="2.weight"):
        WeightSpace.from_state_dicts([bad_shape], spec)
    nan = dict(sd, **{"4.weight": torch.full((3, 6), float("nan"))})
    with pytest.raises(WeightSpaceError, match="4.weight.*NaN"):
        WeightSpace.from_state_dicts([nan], spec)
    kept = WeightSpace.from_state_dicts([nan], spec, allow_nonfinite=True)
    assert torch.isnan(kept.to_state_dict(0)["4.weight"]).all()


def test_unsupported_layer_is_named():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
    with pytest.raises(WeightSpaceError, match="'1'.*BatchNorm2d"):
        WeightSpaceSpec.from_module(net)
    with pytest.raises(WeightSpaceError, match="does not fit"):
        WeightSpaceSpec.from_module(nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2)))
