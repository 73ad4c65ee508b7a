"""MIP and plain hypernetworks: encoding, residual start, functional_call semantics, errors."""

import pytest
import torch
from torch import nn

from metanet.hyper.mip import ConditioningError, MIPHyperNetwork, encode_condition


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip


def test_encoding_has_constant_magnitude_and_range_check():
    x = torch.rand(50, 2) * 4 - 2
    enc = encode_condition(x, -2.0, 2.0, mip=True)
    assert enc.shape == (50, 4)
    # [z, 1-z] per coordinate: the L1 norm is the number of coordinates for every input
    torch.testing.assert_close(enc.abs().sum(-1), torch.full((50,), 2.0))
    plain = encode_condition(x, -2.0, 2.0, mip=False)
    torch.testing.assert_close(plain, (x + 2) / 4)
    with pytest.raises(ConditioningError, match=r"outside the range \[-2, 2\]"):
        encode_condition(torch.tensor([[0.0, 2.5]]), -2.0, 2.0)
    with pytest.raises(ConditioningError, match="NaN"):
        encode_condition(torch.tensor([float("nan")]))


@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_mip_starts_at_target_network_for_every_condition(make):
    target = make().eval()
    reference = {k: v.clone() for k, v in target.state_dict().items()}
    hnet = MIPHyperNetwork(target, cond_dim=1, hidden=(16,), mip=True)
    x = torch.randn(5, 1, 8, 8) if isinstance(target[0], nn.Conv2d) else torch.randn(5, 8)
    expected = target(x)
    for c in (0.0, 0.4, 1.0):
        params = hnet(torch.tensor([c]))
        for name, p in params.items():
            torch.testing.assert_close(p, reference[name])
        torch.testing.assert_close(hnet.forward_target(torch.tensor([c]), x), expected)


def test_functional_call_matches_loaded_module_and_batches():
    torch.manual_seed(1)
    target = _mlp()
    hnet = MIPHyperNetwork(target, cond_dim=2, hidden=(16, 16), mip=True, residual_init=1.0,
                           cond_range=([0.0, -1.0], [1.0, 1.0]))  # fmt: skip
    xs = torch.tensor([[0.1, -0.5], [0.9, 0.7], [0.5, 0.0]])
    inputs = torch.randn(3, 4, 8)
    batched = hnet.functional_call(hnet(xs), inputs)  # [3, 4, 3]
    assert batched.shape == (3, 4, 3)
    for i in range(3):
        single = hnet.forward_target(xs[i], inputs[i])
        torch.testing.assert_close(batched[i], single, rtol=1e-5, atol=1e-6)
        loaded = hnet.load_into(_mlp(), xs[i])
        torch.testing.assert_close(loaded(inputs[i]), single, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConditioningError, match="not a batch"):
        hnet.load_into(_mlp(), xs)
    with pytest.raises(ConditioningError, match="'0.weight'"):
        hnet.load_into(nn.Sequential(nn.Linear(3, 3)), xs[0])
    # the residual is conditioned: different x give different parameters
    p = hnet(xs)
    assert not torch.allclose(p["0.weight"][0], p["0.weight"][1])


def test_gradients_reach_base_and_hypernetwork():
    hnet = MIPHyperNetwork(_mlp(), hidden=(16,), mip=True, residual_init=0.0)
    x = torch.randn(10, 8)
    y = torch.randint(0, 3, (10,))
    loss = nn.functional.cross_entropy(hnet.forward_target(torch.tensor([0.3]), x), y)
    loss.backward()
    assert hnet.base[0].grad is not None and hnet.base[0].grad.abs().sum() > 0
    # zero-initialised head: its weight still gets a gradient (hidden activations are non-zero)
    assert hnet.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in hnet.target.parameters())


def test_plain_hypernetwork_same_api_and_training_changes_output():
    target = _mlp()
    hnet = MIPHyperNetwork(target, hidden=(16,), mip=False)
    assert len(hnet.base) == 0
    x = torch.randn(32, 8)
    y = torch.randint(0, 3, (32,))
    opt = torch.optim.Adam(hnet.parameters(), lr=1e-2)
    c = torch.tensor([0.5])
    first = nn.functional.cross_entropy(hnet.forward_target(c, x), y).item()
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(hnet.forward_target(c, x), y)
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.1


def test_partial_prediction_and_bad_input():
    target = _mlp()
    hnet = MIPHyperNetwork(target, hidden=(8,), params=["2.*"])
    assert hnet.param_names == ["2.weight", "2.bias"]
    assert target[0].weight.requires_grad  # not predicted: stays trainable in the target
    with pytest.raises(KeyError, match="nope"):
        MIPHyperNetwork(_mlp(), params=["nope.*"])
    with pytest.raises(ConditioningError, match=r"shape \[1\] or \[B, 1\]"):
        hnet(torch.zeros(2, 2))
    with pytest.raises(ConditioningError, match="1.5"):
        hnet(torch.tensor([1.5]))
    with pytest.raises(TypeError, match="nn.Module"):
        MIPHyperNetwork("not a module")  # type: ignore[arg-type]
