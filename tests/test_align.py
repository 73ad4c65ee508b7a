"""Git Re-Basin weight matching: exact recovery of permuted copies, lower loss barriers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metanet.data.digits import load_digits
from metanet.weightspace import WeightSpace, WeightSpaceError, permute, random_permutation
from metanet.weightspace.align import align, interpolate, loss_barrier, weight_matching


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 10)
    )


def _cnn_flatten() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10),
    )  # fmt: skip


def _cnn_pool() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip


@pytest.mark.parametrize("make", [_mlp, _cnn_flatten, _cnn_pool])
def test_permuted_copy_is_matched_back_exactly(make):
    net = make()
    ws = WeightSpace.from_module(net)
    perms = random_permutation(ws.spec, torch.Generator().manual_seed(3))
    shuffled = permute(ws, perms)
    assert shuffled.max_abs_diff(ws) > 0.01  # really permuted
    found = weight_matching(ws, shuffled)
    assert permute(shuffled, found).max_abs_diff(ws) == 0.0
    # the found permutations undo the random ones: perms[p][found[p]] is the identity
    for p, f in zip(perms, found):
        assert torch.equal(p[f], torch.arange(len(p)))
    # and the aligned network still computes the permuted network's function
    x = torch.randn(5, *((64,) if make is _mlp else (1, 8, 8)))
    aligned = align(ws, shuffled).load_into(make())
    torch.testing.assert_close(aligned(x), net(x), atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    a, b = WeightSpace.from_modules([_mlp(), _mlp()]), WeightSpace.from_module(_mlp())
    with pytest.raises(WeightSpaceError, match="holds 2"):
        weight_matching(a, b)
    with pytest.raises(WeightSpaceError, match="shape"):
        weight_matching(
            WeightSpace.from_module(_cnn_pool()), WeightSpace.from_module(_cnn_flatten())
        )
    nan = b.clone()
    nan.weights[1][0, 0, 0] = float("nan")
    with pytest.raises(WeightSpaceError, match="NaN"):
        weight_matching(b, nan)
    with pytest.raises(WeightSpaceError, match=r"\[B=1\]"):
        interpolate(b, b, torch.tensor([0.1, 0.2]))


def test_interpolate_and_barrier_of_identical_networks():
    ws = WeightSpace.from_modules([_mlp(), _mlp()])
    a, b = ws[0], ws[1]
    assert interpolate(a, b, 0.0).allclose(a) and interpolate(a, b, 1.0).allclose(b)
    mid = interpolate(ws, ws[torch.tensor([1, 0])], torch.tensor([0.5, 0.5]))
    assert mid[0].allclose(mid[1])
    barrier, losses = loss_barrier(lambda w: float(w.flatten().pow(2).sum()), a, a, 5)
    assert barrier == pytest.approx(0.0, abs=1e-9) and len(losses) == 5


@pytest.fixture
def one_thread():
    """Small full-batch training runs faster on one thread than on contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(seed: int, x: torch.Tensor, y: torch.Tensor, steps: int = 200) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10)
    )
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def test_alignment_lowers_the_loss_barrier_of_independently_trained_networks(one_thread):
    data = load_digits()
    x, y = data.x_train.flatten(1)[:800], data.y_train[:800]
    net_a, net_b = _train(0, x, y), _train(1, x, y)
    template = _train(0, x, y, steps=0)

    def loss(ws: WeightSpace) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(ws.load_into(template)(x), y))

    ws_a, ws_b = WeightSpace.from_module(net_a), WeightSpace.from_module(net_b)
    before, _ = loss_barrier(loss, ws_a, ws_b, 11)
    aligned = align(ws_a, ws_b)
    after, _ = loss_barrier(loss, ws_a, aligned, 11)
    print(f"digits MLP loss barrier: before alignment {before:.4f}, after {after:.4f}")
    assert loss(aligned) == pytest.approx(loss(ws_b), abs=1e-5)  # same function
    assert before > 0.05
    assert after < 0.5 * before
