"""Input transforms of coordinate networks: g(x) = f(A x + t) made in the first layer's weights."""

import math

import pytest
import torch
from torch import nn

from metanet.weightspace import WeightSpace, WeightSpaceError, affine_input, random_affine
from metanet.weightspace.augment import Compose, RandomInputAffine, RandomPermutation
from metanet.zoo.architectures import build_module

SIREN = {"type": "siren", "in": 2, "widths": [16, 16], "out": 1, "w0": 30.0, "init": "dws"}


def _sirens(n: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [build_module(SIREN) for _ in range(n)]


def _grid(size: int = 12) -> torch.Tensor:
    lin = torch.linspace(-1, 1, size)
    return torch.stack(torch.meshgrid(lin, lin, indexing="ij"), -1).reshape(-1, 2)


def _render(ws: WeightSpace, x: torch.Tensor) -> torch.Tensor:
    """``[B, N]``: every network of ``ws`` on the coordinates ``x`` (per network ``[N, 2]`` or
    shared)."""
    xs = x if x.dim() == 3 else x.expand(len(ws), *x.shape)
    return torch.stack([ws.load_into(build_module(SIREN), i)(xs[i]).squeeze(-1)
                        for i in range(len(ws))])  # fmt: skip


def test_affine_input_computes_the_network_on_the_transformed_coordinates():
    ws = WeightSpace.from_modules(_sirens(4))
    matrix, offset = random_affine(4, 2, degrees=45, translate=0.3, scale=(0.7, 1.3),
                                   generator=torch.Generator().manual_seed(1))  # fmt: skip
    out = affine_input(ws, matrix, offset)
    x = _grid()
    moved = x @ matrix.transpose(1, 2) + offset[:, None, :]  # [B, N, 2]: A x + t per network
    with torch.no_grad():
        torch.testing.assert_close(_render(out, x), _render(ws, moved), atol=2e-5, rtol=1e-4)
        assert (_render(out, x) - _render(ws, x)).abs().max() > 1e-2  # the image did change
    # only the first layer changes
    for a, b in zip(out.weights[1:] + out.biases[1:], ws.weights[1:] + ws.biases[1:]):
        assert torch.equal(a, b)


def test_a_quarter_turn_rotates_the_rendered_image():
    ws = WeightSpace.from_modules(_sirens(2))
    turn = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # (x, y) -> (-y, x)
    out = affine_input(ws, turn)
    size = 12
    with torch.no_grad():
        image = _render(ws, _grid(size)).reshape(2, size, size)
        turned = _render(out, _grid(size)).reshape(2, size, size)
    # pixel (i, j) at (u_i, u_j) shows the old image at (-u_j, u_i) = pixel (size-1-j, i)
    torch.testing.assert_close(turned, image.flip(1).transpose(1, 2), atol=2e-5, rtol=1e-4)


def test_random_input_affine_follows_the_generator_and_keeps_labels():
    ws = WeightSpace.from_modules(_sirens(3))
    y = torch.tensor([1, 2, 3])
    t = RandomInputAffine(degrees=30, translate=0.2, scale=(0.9, 1.1))
    a, ya = t(ws, y, generator=torch.Generator().manual_seed(5))
    b, _ = t(ws, y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ya, y)
    assert a.allclose(b, atol=0, rtol=0)
    matrix, offset = random_affine(3, 2, 30, 0.2, (0.9, 1.1), torch.Generator().manual_seed(5))
    assert affine_input(ws, matrix, offset).allclose(a, atol=1e-6, rtol=1e-6)
    angles = torch.atan2(matrix[:, 1, 0], matrix[:, 0, 0]).abs() * 180 / math.pi
    scales = torch.linalg.det(matrix).sqrt()
    assert bool((angles <= 30).all()) and bool(((scales >= 0.9) & (scales <= 1.1)).all())
    assert bool((offset.abs() <= 0.2).all())


def test_input_affine_commutes_with_hidden_permutations():
    """Permuting hidden neurons and transforming the input are independent: both orders give
    networks that compute the same function."""
    ws = WeightSpace.from_modules(_sirens(3))
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    both = Compose([RandomInputAffine(), RandomPermutation()])(ws, generator=gen())
    affine_only = RandomInputAffine()(ws, generator=gen())
    with torch.no_grad():
        torch.testing.assert_close(_render(both, _grid()), _render(affine_only, _grid()),
                                   atol=2e-5, rtol=1e-4)  # fmt: skip


def test_bad_input_transforms_get_clear_errors():
    ws = WeightSpace.from_modules(_sirens(2))
    with pytest.raises(WeightSpaceError, match=r"matrix must be \[2, 2\]"):
        affine_input(ws, torch.eye(3))
    with pytest.raises(WeightSpaceError, match="offset must be"):
        affine_input(ws, offset=torch.zeros(5, 2))
    with pytest.raises(WeightSpaceError, match="2-D coordinates"):
        random_affine(2, 3, degrees=10)
    with pytest.raises(ValueError, match="scale"):
        RandomInputAffine(scale=(1.2, 0.8))
    cnn = WeightSpace.from_module(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)))
    with pytest.raises(WeightSpaceError, match="first layer is Linear"):
        affine_input(cnn, torch.eye(1))
    no_bias = WeightSpace.from_module(nn.Sequential(nn.Linear(2, 4, bias=False), nn.Linear(4, 1)))
    with pytest.raises(WeightSpaceError, match="has none"):
        affine_input(no_bias, offset=torch.ones(2))
