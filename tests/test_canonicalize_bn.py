"""Git Re-Basin canonicalization of networks with BatchNorm (issue 16): every tensor attached to a
hidden channel moves with it (conv/linear weights and biases, BatchNorm weight, bias, running mean
and variance), the function is preserved, a permuted copy is matched back exactly, the BatchNorm
affine parameters take part in the matching objective, and bad input fails in one line."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from metanet.generate.canonicalize import (
    ChannelPermutations,
    canonicalize_params,
    match_channels,
    permute_params,
)
from metanet.generate.data import FlatLayout, GeneratorDataModule, ZooInputError
from metanet.weightspace import (
    WeightSpace,
    WeightSpaceError,
    WeightSpaceSpec,
    random_permutation,
    weight_matching,
)
from metanet.zoo.architectures import build_module

CNN_BN = {"type": "cnn", "channels": [6, 8], "strides": [1, 2], "kernel": 3, "norm": "batch",
          "head": "pool"}  # fmt: skip
CNN_BN_FLATTEN = {**CNN_BN, "channels": [5, 7], "head": "flatten"}
CNN_LN = {**CNN_BN, "norm": "layer"}
CNN_BN_DROPOUT = {**CNN_BN, "dropout": True}  # SampledDropout: non-persistent buffers only


def _mlp_bn() -> nn.Module:
    return nn.Sequential(
        nn.Linear(12, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 7), nn.BatchNorm1d(7),
        nn.Tanh(), nn.Linear(7, 3),
    )  # fmt: skip


MAKERS = {
    "cnn-bn-pool": lambda: build_module(CNN_BN),
    "cnn-bn-flatten": lambda: build_module(CNN_BN_FLATTEN),
    "cnn-layernorm": lambda: build_module(CNN_LN),
    "cnn-bn-dropout": lambda: build_module(CNN_BN_DROPOUT),
    "mlp-bn": _mlp_bn,
}


def _input(name: str, n: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, 12, generator=g) if name == "mlp-bn" else torch.randn(
        n, 1, 8, 8, generator=g
    )


def _random_net(make, seed: int) -> nn.Module:
    """A network in eval mode with random weights, BatchNorm affine parameters and running
    statistics (not PyTorch's 1/0 defaults, so a missed permutation shows)."""
    torch.manual_seed(seed)
    net = make()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.5)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.3, 2.0)
                m.num_batches_tracked.fill_(7)
    return net.eval()


def _stacked(nets: list[nn.Module]) -> dict[str, torch.Tensor]:
    sds = [n.state_dict() for n in nets]
    return {k: torch.stack([sd[k] for sd in sds]) for k in sds[0]}


def _load(make, params: dict[str, torch.Tensor], i: int) -> nn.Module:
    net = make().eval()
    net.load_state_dict({k: v[i] for k, v in params.items()}, strict=True)
    return net


def _shuffled(params, structure, seed: int) -> tuple[dict, list[torch.Tensor]]:
    perms = random_permutation(structure.spec, torch.Generator().manual_seed(seed))
    return permute_params(params, structure, perms), perms


# -- structure -------------------------------------------------------------------------------------
def test_structure_attaches_every_batchnorm_tensor_to_its_conv_channels() -> None:
    s = ChannelPermutations.from_module(build_module(CNN_BN))
    assert [l.name for l in s.spec.layers] == ["0", "3", "8"] and s.spec.perm_sizes == (6, 8)
    assert s.attached == (
        ("1.weight", 0, "affine"), ("1.bias", 0, "affine"),
        ("1.running_mean", 0, "stats"), ("1.running_var", 0, "stats"),
        ("4.weight", 1, "affine"), ("4.bias", 1, "affine"),
        ("4.running_mean", 1, "stats"), ("4.running_var", 1, "stats"),
    )  # fmt: skip
    assert "1.num_batches_tracked" not in s.keys


@pytest.mark.parametrize("name", list(MAKERS))
def test_random_permutation_preserves_the_function_and_moves_every_tensor(name) -> None:
    make = MAKERS[name]
    net = _random_net(make, 0)
    structure = ChannelPermutations.from_module(net)
    params = _stacked([net])
    shuffled, _ = _shuffled(params, structure, 1)
    x = _input(name)
    with torch.no_grad():
        assert torch.allclose(_load(make, shuffled, 0)(x), net(x), atol=1e-5)
    for key, _, _ in structure.attached:  # really permuted, not left in place
        assert not torch.equal(shuffled[key], params[key]), key
    tracked = [k for k in params if k.endswith("num_batches_tracked")]
    assert all(torch.equal(shuffled[k], params[k]) for k in tracked)


@pytest.mark.parametrize("name", list(MAKERS))
def test_permuted_copy_of_the_reference_is_recovered_exactly(name) -> None:
    make = MAKERS[name]
    net = _random_net(make, 2)
    structure = ChannelPermutations.from_module(net)
    ref = _stacked([net])
    copies = [_shuffled(ref, structure, s)[0] for s in (3, 4, 5)]
    batch = {k: torch.cat([c[k] for c in copies]) for k in ref}
    out = canonicalize_params(batch, structure, ref)
    for i in range(3):
        dist = max(float((out[k][i] - ref[k][0]).abs().max()) for k in ref)
        assert dist == 0.0  # weights, biases, BN affine and running statistics, all of them


@pytest.mark.parametrize("name", list(MAKERS))
def test_canonicalizing_independent_networks_preserves_each_function(name) -> None:
    make = MAKERS[name]
    nets = [_random_net(make, s) for s in range(10, 14)]
    structure = ChannelPermutations.from_module(nets[0])
    params = _stacked(nets)
    out = canonicalize_params(params, structure, reference=0)
    x = _input(name)
    moved = False
    with torch.no_grad():
        for i, net in enumerate(nets):
            assert torch.allclose(_load(make, out, i)(x), net(x), atol=1e-5)
            moved |= any(not torch.equal(out[k][i], params[k][i]) for k in structure.keys)
    assert all(torch.equal(out[k][0], params[k][0]) for k in params)  # the reference stays
    assert moved  # some network was really permuted


def test_match_stats_also_recovers_and_preserves() -> None:
    make = MAKERS["cnn-bn-pool"]
    net = _random_net(make, 6)
    structure = ChannelPermutations.from_module(net)
    ref = _stacked([net])
    shuffled, _ = _shuffled(ref, structure, 7)
    out = canonicalize_params(shuffled, structure, ref, match_stats=True)
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_batchnorm_affine_parameters_take_part_in_the_objective() -> None:
    """Two conv channels with identical weights differ only in their BatchNorm parameters: the
    weights alone cannot tell them apart, the matching with the BatchNorm tensors can."""
    make = MAKERS["cnn-bn-pool"]
    net = _random_net(make, 8)
    with torch.no_grad():  # channels 0..5 of conv 0 and their columns in conv 3: all equal
        net[0].weight.copy_(net[0].weight[:1].expand_as(net[0].weight))
        net[0].bias.fill_(0.1)
        net[3].weight.copy_(net[3].weight[:, :1].expand_as(net[3].weight))
    structure = ChannelPermutations.from_module(net)
    ref = _stacked([net])
    reverse = [torch.arange(6).flip(0), torch.arange(8)]
    shuffled = permute_params(ref, structure, reverse)
    perms = match_channels(ref, shuffled, structure)
    assert torch.equal(perms[0], reverse[0])  # the BN parameters undo the reversal
    # without them every assignment of the first permutation scores the same: identity stays
    ws_ref = structure.weight_space(ref, "ref")
    ws_b = structure.weight_space(shuffled, "b")
    blind = weight_matching(ws_ref, ws_b, spec=structure.spec)
    assert torch.equal(blind[0], torch.arange(6))


def test_weight_matching_extras_alone_recover_a_permutation() -> None:
    spec = WeightSpaceSpec.chain([(5, 3), (2, 5)])
    zero = WeightSpace.zeros(spec)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    perm = torch.tensor([3, 0, 4, 1, 2])
    found = weight_matching(zero, zero, extra_a={0: [x]}, extra_b={0: [x[perm]]})
    assert torch.equal(x[perm][found[0]], x)


# -- flat layout -----------------------------------------------------------------------------------
def test_flat_layout_canonicalize_aligns_parameter_vectors() -> None:
    make = MAKERS["cnn-bn-pool"]
    net = _random_net(make, 9)
    structure = ChannelPermutations.from_module(net)
    layout = FlatLayout.from_module(net)
    ref = _stacked([net])
    shuffled = torch.cat([layout.flatten(_shuffled(ref, structure, s)[0]) for s in (1, 2)])
    bad = torch.full((1, layout.dim), float("nan"))
    out = layout.canonicalize(torch.cat([shuffled, bad]), structure, layout.flatten(ref)[0])
    assert torch.equal(out[:2], layout.flatten(ref).expand(2, -1))
    assert torch.isnan(out[2]).all()  # non-finite rows are left as they are


def test_novelty_with_channels_measures_in_the_reference_frame() -> None:
    from metanet.generate.novelty import error_sets, novelty

    make = MAKERS["cnn-bn-pool"]
    nets = [_random_net(make, s) for s in (20, 21, 22)]
    structure = ChannelPermutations.from_module(nets[0])
    layout = FlatLayout.from_module(nets[0])
    flat_spec = layout.spec()
    params = _stacked(nets)
    train = layout.flatten(canonicalize_params(params, structure, reference=0))
    ref = WeightSpace.unflatten(train[:1], flat_spec)
    copy, _ = _shuffled({k: v[:1] for k, v in params.items()}, structure, 9)
    queries = WeightSpace.unflatten(layout.flatten(copy), flat_spec)  # a permuted reference
    x = _input("cnn-bn-pool")
    y = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(0))
    errors = error_sets(WeightSpace.unflatten(train, flat_spec), CNN_BN, x, y, layout)
    rep = novelty(queries, train, errors, ref, CNN_BN, x, y, layout=layout, channels=structure)
    assert rep.aligned and float(rep.distance[0]) < 1e-5 and int(rep.distance_index[0]) == 0
    assert bool(rep.memorized[0])
    plain = novelty(queries, train, errors, None, CNN_BN, x, y, layout=layout)
    assert not plain.aligned and float(plain.distance[0]) > 0.1  # far in plain L2
    with pytest.raises(ValueError, match="needs one reference"):
        novelty(queries, train, errors, None, CNN_BN, x, y, layout=layout, channels=structure)


# -- bad input -------------------------------------------------------------------------------------
def test_reference_of_another_architecture_fails_in_one_line() -> None:
    make = MAKERS["cnn-bn-pool"]
    nets = [_random_net(make, s) for s in (0, 1)]
    structure = ChannelPermutations.from_module(nets[0])
    other = _stacked([_random_net(lambda: build_module({**CNN_BN, "channels": [4, 8]}), 0)])
    with pytest.raises(WeightSpaceError) as err:
        canonicalize_params(_stacked(nets), structure, other)
    msg = str(err.value)
    assert "\n" not in msg and "reference" in msg and "'0.weight'" in msg
    with pytest.raises(WeightSpaceError, match="no tensor '1.weight'"):
        params = {k: v for k, v in _stacked(nets).items() if k != "1.weight"}
        canonicalize_params(params, structure)
    with pytest.raises(IndexError, match="out of range"):
        canonicalize_params(_stacked(nets), structure, reference=5)


def test_unknown_channel_structure_fails_in_one_line() -> None:
    residual = build_module({**CNN_BN, "channels": [6, 6], "strides": [1, 1], "residual": True})
    with pytest.raises(WeightSpaceError) as err:
        ChannelPermutations.from_module(residual)
    assert "\n" not in str(err.value) and "ResidualConv" in str(err.value)
    with pytest.raises(WeightSpaceError, match="not an nn.Sequential"):
        ChannelPermutations.from_module(nn.Module())
    grouped = build_module({**CNN_BN, "norm": "group"})  # groups of 2 channels: not permutable
    with pytest.raises(WeightSpaceError, match="GroupNorm"):
        ChannelPermutations.from_module(grouped)


def test_weight_matching_rejects_mismatched_extras() -> None:
    spec = WeightSpaceSpec.chain([(5, 3), (2, 5)])
    zero = WeightSpace.zeros(spec)
    with pytest.raises(WeightSpaceError, match="same permutations"):
        weight_matching(zero, zero, extra_a={0: [torch.zeros(5)]}, extra_b={})
    with pytest.raises(WeightSpaceError, match="expected equal shapes"):
        weight_matching(zero, zero, extra_a={0: [torch.zeros(4)]}, extra_b={0: [torch.zeros(4)]})
    with pytest.raises(WeightSpaceError, match="permutations 0..0"):
        weight_matching(zero, zero, extra_a={1: [torch.zeros(5)]}, extra_b={1: [torch.zeros(5)]})


# -- generator data -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bn_zoo(tmp_path_factory) -> str:
    """Four seeded runs of a tiny digits CNN with BatchNorm, one final checkpoint each."""
    from metanet.zoo.build import build_zoo
    from metanet.zoo.recipe import Recipe

    recipe = Recipe.from_dict({
        "name": "t-canon-bn", "kind": "classifier", "seed": 3,
        "data": {"provider": "digits", "split_seed": 0, "test_fraction": 0.25,
                 "val_fraction": 0.15},
        "architectures": [{**CNN_BN, "channels": [3, 4]}], "networks_per_arch": 4,
        "chunk_size": 4, "keep_fractions": [1.0],
        "hparams": {"lr": 1e-2, "optimizer": "adam", "batch_size": 64, "epochs": 1},
    })  # fmt: skip
    out = tmp_path_factory.mktemp("canon-bn") / "bn.h5"
    return os.fspath(build_zoo(recipe, out, progress=False, threads=1))


def test_generator_data_canonicalizes_a_batchnorm_zoo(bn_zoo) -> None:
    raw = GeneratorDataModule(bn_zoo, canonicalize=False, holdout=1)
    raw.setup("fit")
    can = GeneratorDataModule(bn_zoo, canonicalize=True, holdout=1)
    can.setup("fit")
    assert can.layout is not None and torch.equal(can.records, raw.records)
    make = lambda: build_module(raw.arch)  # noqa: E731
    x = _input("cnn-bn-pool")
    moved = False
    with torch.no_grad():
        for vec_raw, vec_can, buf_raw, buf_can in (
            (raw.raw_vectors, can.raw_vectors, raw.record_buffers, can.record_buffers),
            (raw.holdout_vectors, can.holdout_vectors, raw.holdout_buffers, can.holdout_buffers),
        ):
            for i in range(len(vec_raw)):
                a = raw.layout.load_into(make().eval(), vec_raw[i], {k: v[i] for k, v in
                                                                     buf_raw.items()})
                b = can.layout.load_into(make().eval(), vec_can[i], {k: v[i] for k, v in
                                                                     buf_can.items()})
                assert torch.allclose(a(x), b(x), atol=1e-5)  # own statistics moved along
                moved |= not torch.equal(vec_raw[i], vec_can[i])
    assert moved
    ref = int((can.records == can.reference_index).nonzero())
    assert torch.equal(can.raw_vectors[ref], raw.raw_vectors[ref])
    # the layout's default buffers are the average of the aligned running statistics
    assert torch.allclose(can.layout.buffers["1.running_mean"],
                          can.record_buffers["1.running_mean"].mean(0))  # fmt: skip


def test_generator_data_refuses_unknown_structures_in_one_line(tmp_path) -> None:
    from metanet.zoo.build import build_zoo
    from metanet.zoo.recipe import Recipe

    arch = {**CNN_BN, "channels": [3, 3], "strides": [1, 1], "residual": True}
    recipe = Recipe.from_dict({
        "name": "t-res", "kind": "classifier", "seed": 3,
        "data": {"provider": "digits", "split_seed": 0, "test_fraction": 0.25},
        "architectures": [arch], "networks_per_arch": 2, "chunk_size": 2,
        "keep_fractions": [1.0],
        "hparams": {"lr": 1e-2, "optimizer": "adam", "batch_size": 64, "epochs": 1},
    })  # fmt: skip
    path = build_zoo(recipe, tmp_path / "res.h5", progress=False, threads=1)
    with pytest.raises(ZooInputError) as err:
        GeneratorDataModule(path, canonicalize=True).setup("fit")
    msg = str(err.value)
    assert "\n" not in msg and "res.h5" in msg and "canonicalize=False" in msg
