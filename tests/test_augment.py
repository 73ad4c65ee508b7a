"""Weight-space augmentations: function-preserving symmetries, noise, dropout, aligned MixUp."""

import pytest
import torch
from torch import nn

from metanet.weightspace import WeightSpace, WeightSpaceError, permute, random_permutation
from metanet.weightspace.augment import (
    AlignedMixUp,
    Compose,
    GaussianNoise,
    RandomPermutation,
    ReLUScale,
    WeightDropout,
)


def _mlp(bias: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 16, bias=bias), nn.ReLU(), nn.Linear(16, 12, bias=bias), nn.ReLU(),
        nn.Linear(12, 10, bias=bias),
    )  # fmt: skip


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 10),
    )  # fmt: skip


def _outputs(ws: WeightSpace, make, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([ws.load_into(make(), i)(x) for i in range(len(ws))])


@pytest.mark.parametrize("make", [_mlp, _cnn])
@pytest.mark.parametrize("transform", [RandomPermutation(), ReLUScale(0.25, 4.0)])
def test_symmetry_augmentations_keep_every_networks_function(make, transform):
    ws = WeightSpace.from_modules([make() for _ in range(3)])
    x = torch.randn(7, 64) if make is _mlp else torch.randn(7, 1, 8, 8)
    out = transform(ws, generator=torch.Generator().manual_seed(0))
    assert out.max_abs_diff(ws) > 1e-3  # the weights did change
    torch.testing.assert_close(_outputs(out, make, x), _outputs(ws, make, x), atol=1e-5, rtol=1e-4)


def test_random_permutation_differs_per_network_and_follows_the_generator():
    net = WeightSpace.from_module(_mlp())
    ws = WeightSpace.cat([net, net])
    a = RandomPermutation()(ws, generator=torch.Generator().manual_seed(1))
    b = RandomPermutation()(ws, generator=torch.Generator().manual_seed(1))
    assert a.allclose(b, atol=0, rtol=0)
    assert a[0].max_abs_diff(a[1]) > 1e-3


def test_gaussian_noise_is_relative_to_each_layers_std():
    ws = WeightSpace.from_modules([_mlp() for _ in range(64)])
    ws.weights[1] = ws.weights[1] * 100.0
    noisy = GaussianNoise(sigma=0.1)(ws, generator=torch.Generator().manual_seed(0))
    for w, n in zip(ws.weights, noisy.weights):
        ratio = float((n - w).std() / w.std())
        assert ratio == pytest.approx(0.1, rel=0.15)
    assert GaussianNoise(sigma=0.0)(ws).allclose(ws, atol=0, rtol=0)
    nobias = WeightSpace.from_module(_mlp(bias=False))
    noisy = GaussianNoise(sigma=0.5)(nobias)
    assert all(float(b.abs().max()) == 0.0 for b in noisy.biases)  # absent biases stay absent


def test_weight_dropout_zeroes_a_fraction_of_weights_only():
    ws = WeightSpace.from_modules([_mlp() for _ in range(8)])
    out = WeightDropout(p=0.3)(ws, generator=torch.Generator().manual_seed(0))
    zeros = sum(int((w == 0).sum()) for w in out.weights)
    total = sum(w.numel() for w in out.weights)
    assert zeros / total == pytest.approx(0.3, abs=0.03)
    kept = [(o != 0) for o in out.weights]
    assert all(torch.equal(o[k], w[k]) for o, w, k in zip(out.weights, ws.weights, kept))
    assert all(torch.equal(o, b) for o, b in zip(out.biases, ws.biases))
    scaled = WeightDropout(p=0.5, rescale=True)(ws, generator=torch.Generator().manual_seed(0))
    k = scaled.weights[0] != 0
    torch.testing.assert_close(scaled.weights[0][k], 2 * ws.weights[0][k])


def test_aligned_mixup_of_a_network_and_its_permuted_copy_keeps_the_function():
    net = WeightSpace.from_module(_mlp())
    copy = permute(net, random_permutation(net.spec, torch.Generator().manual_seed(2)))
    ws = WeightSpace.cat([net, copy])
    y = torch.tensor([0.2, 0.8])
    x = torch.randn(5, 64)
    gen = torch.Generator().manual_seed(0)
    mixed, y_mixed = AlignedMixUp(alpha=1.0)(ws, y, generator=gen)
    # partners are the same network up to permutation: alignment makes every mix that network
    torch.testing.assert_close(
        _outputs(mixed, _mlp, x), _outputs(ws, _mlp, x), atol=1e-5, rtol=1e-4
    )
    # targets are mixed with the same lam: a convex combination of the two targets
    assert bool(((y_mixed >= 0.2 - 1e-6) & (y_mixed <= 0.8 + 1e-6)).all())
    # without alignment the interpolation leaves the network's function (unless lam is 0 or 1)
    plain, _ = AlignedMixUp(alpha=1.0, align=False)(
        ws, y, generator=torch.Generator().manual_seed(0)
    )
    assert (_outputs(plain, _mlp, x) - _outputs(ws, _mlp, x)).abs().max() > 1e-3


def test_mixup_soft_labels_for_classes():
    ws = WeightSpace.from_modules([_mlp() for _ in range(4)])
    labels = torch.tensor([0, 1, 2, 3])
    with pytest.raises(WeightSpaceError, match="num_classes"):
        AlignedMixUp(align=False)(ws, labels)
    mixed, soft = AlignedMixUp(align=False, num_classes=5)(ws, labels)
    assert soft.shape == (4, 5)
    torch.testing.assert_close(soft.sum(1), torch.ones(4))
    assert len(mixed) == 4


def test_compose_and_bad_arguments():
    ws = WeightSpace.from_modules([_mlp() for _ in range(2)])
    t = Compose([RandomPermutation(), GaussianNoise(0.01), WeightDropout(0.1)])
    out, y = t(ws, torch.zeros(2))
    assert len(out) == 2 and y.shape == (2,)
    with pytest.raises(ValueError, match="p must be"):
        WeightDropout(p=1.0)
    with pytest.raises(ValueError, match="low"):
        ReLUScale(2.0, 1.0)
    with pytest.raises(TypeError, match="WeightSpace"):
        RandomPermutation()(torch.zeros(3))


def _tanh_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(),
                         nn.Linear(12, 10))  # fmt: skip


def _siren() -> nn.Module:
    from metanet.zoo.architectures import build_module

    return build_module({"type": "siren", "in": 64, "widths": [16, 12], "out": 10, "w0": 30.0})


@pytest.mark.parametrize("make", [_tanh_mlp, _siren])
def test_sign_flips_keep_the_function_of_odd_activation_networks(make):
    from metanet.weightspace.augment import RandomSignFlip

    ws = WeightSpace.from_modules([make() for _ in range(3)])
    x = torch.randn(7, 64) * 0.1
    out = RandomSignFlip()(ws, generator=torch.Generator().manual_seed(0))
    assert out.max_abs_diff(ws) > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(_outputs(out, make, x), _outputs(ws, make, x), atol=1e-5,
                                   rtol=1e-4)  # fmt: skip


def test_sign_flips_change_relu_networks_and_refuse_other_factors():
    from metanet.weightspace import flip_signs

    ws = WeightSpace.from_modules([_mlp() for _ in range(2)])
    signs = [-torch.ones(n) for n in ws.spec.perm_sizes]
    x = torch.randn(7, 64)
    with torch.no_grad():
        diff = (_outputs(flip_signs(ws, signs), _mlp, x) - _outputs(ws, _mlp, x)).abs().max()
    assert diff > 1e-3  # ReLU is not odd: flipping its neurons changes the network
    with pytest.raises(WeightSpaceError, match="-1 or \\+1"):
        flip_signs(ws, [torch.full((n,), 2.0) for n in ws.spec.perm_sizes])
