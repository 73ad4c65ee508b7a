"""Scale-canonical form of ReLU networks (unit-norm incoming weights per hidden neuron)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metanet.weightspace import (
    WeightSpace,
    canonical_relu_scales,
    permute,
    random_permutation,
    random_relu_scale,
    relu_scale,
    relu_scale_canonical,
)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.LeakyReLU(0.1),
                         nn.Linear(12, 3))  # fmt: skip


def _cnn() -> nn.Module:  # the digits-cnn family: conv -> conv (stride 2) -> flatten -> linear
    from metanet.zoo.architectures import build_module

    return build_module({"type": "cnn", "channels": [4, 8], "strides": [1, 2], "kernel": 3,
                         "activation": "relu", "head": "flatten"})  # fmt: skip


def _outputs(ws: WeightSpace, make, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([ws.load_into(make(), i)(x) for i in range(len(ws))])


CASES = [(_mlp, lambda: torch.randn(20, 6)), (_cnn, lambda: torch.randn(5, 1, 8, 8))]


@pytest.mark.parametrize("make, inputs", CASES)
def test_every_rescaled_copy_has_one_canonical_form_and_the_same_function(make, inputs):
    torch.manual_seed(0)
    ws = WeightSpace.from_modules([make() for _ in range(4)])
    scaled = relu_scale(ws, random_relu_scale(ws.spec, len(ws), 0.1, 10.0,
                                              torch.Generator().manual_seed(1)))  # fmt: skip
    assert scaled.max_abs_diff(ws) > 1e-2
    canon = relu_scale_canonical(ws)
    assert relu_scale_canonical(scaled).allclose(canon, atol=1e-5)
    x = inputs()
    torch.testing.assert_close(_outputs(canon, make, x), _outputs(ws, make, x), atol=1e-5,
                               rtol=1e-4)  # fmt: skip
    assert relu_scale_canonical(canon).allclose(canon, atol=1e-6)  # idempotent


@pytest.mark.parametrize("make, inputs", CASES)
def test_canonical_neurons_have_unit_incoming_norm(make, inputs):
    canon = relu_scale_canonical(WeightSpace.from_modules([make() for _ in range(3)]))
    for layer, w, b in zip(canon.spec.layers, canon.weights, canon.biases):
        if layer.out_perm is None:
            continue
        norm = torch.cat([w.flatten(2), b.unsqueeze(-1)], dim=-1).norm(dim=-1)
        torch.testing.assert_close(norm, torch.ones_like(norm))
    for s in canonical_relu_scales(canon):
        torch.testing.assert_close(s, torch.ones_like(s))


def test_canonical_form_commutes_with_hidden_permutations():
    ws = WeightSpace.from_modules([_cnn() for _ in range(3)])
    perms = random_permutation(ws.spec, torch.Generator().manual_seed(2))
    assert relu_scale_canonical(permute(ws, perms)).allclose(
        permute(relu_scale_canonical(ws), perms), atol=1e-6
    )


def test_a_dead_neuron_keeps_scale_one():
    ws = WeightSpace.from_modules([_mlp() for _ in range(2)])
    ws.weights[0][1, 5].zero_()
    ws.biases[0][1, 5] = 0.0
    scales = canonical_relu_scales(ws)
    assert scales[0][1, 5] == 1.0 and torch.isfinite(relu_scale_canonical(ws).weights[1]).all()


def test_a_zoo_read_through_relu_scale_canonical_in_the_cli(tmp_path):
    from tiny_zoo import CNN_FLAT, build_tiny_zoo

    from metanet.cli import MetanetCLI

    path = build_tiny_zoo(str(tmp_path / "cnn.h5"), archs=(CNN_FLAT,))
    args = ["--config", "configs/predict_gen/nfn_np.yaml", "--data.init_args.zoo", path,
            "--data.init_args.canonicalize",
            "metanet.weightspace.symmetry.relu_scale_canonical",
            "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    cli = MetanetCLI(args, run=False)
    cli.datamodule.setup()
    ws, _ = next(iter(cli.datamodule.val_dataloader()))
    for layer, w, b in zip(ws.spec.layers, ws.weights, ws.biases):
        if layer.out_perm is not None:
            norm = torch.cat([w.flatten(2), b.unsqueeze(-1)], dim=-1).norm(dim=-1)
            torch.testing.assert_close(norm, torch.ones_like(norm))
