"""Sign-canonical form of networks with odd activations, and zoos read through it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metanet.weightspace import (
    WeightSpace,
    canonical_signs,
    flip_signs,
    permute,
    random_permutation,
    random_signs,
    sign_canonical,
)


def _siren() -> nn.Module:
    from metanet.zoo.architectures import build_module

    return build_module({"type": "siren", "in": 2, "widths": [16, 12], "out": 1, "w0": 30.0})


def _tanh_cnn() -> nn.Module:  # conv -> flatten -> linear: the linear's in axis repeats channels
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Conv2d(4, 5, 3, stride=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(5 * 2 * 2, 3))  # fmt: skip


def _outputs(ws: WeightSpace, make, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([ws.load_into(make(), i)(x) for i in range(len(ws))])


CASES = [(_siren, lambda: torch.rand(50, 2) * 2 - 1), (_tanh_cnn, lambda: torch.randn(4, 1, 8, 8))]


@pytest.mark.parametrize("make, inputs", CASES)
def test_every_sign_flipped_copy_has_one_canonical_form_and_the_same_function(make, inputs):
    ws = WeightSpace.from_modules([make() for _ in range(4)])
    flipped = flip_signs(ws, random_signs(ws.spec, len(ws), torch.Generator().manual_seed(1)))
    assert flipped.max_abs_diff(ws) > 1e-3
    canon = sign_canonical(ws)
    assert sign_canonical(flipped).max_abs_diff(canon) == 0.0
    x = inputs()
    torch.testing.assert_close(_outputs(canon, make, x), _outputs(ws, make, x), atol=1e-5,
                               rtol=1e-4)  # fmt: skip
    assert sign_canonical(canon).max_abs_diff(canon) == 0.0  # idempotent


@pytest.mark.parametrize("make, inputs", CASES)
def test_canonical_neurons_have_a_positive_largest_incoming_entry(make, inputs):
    canon = sign_canonical(WeightSpace.from_modules([make() for _ in range(3)]))
    for layer, w, b in zip(canon.spec.layers, canon.weights, canon.biases):
        if layer.out_perm is None:
            continue
        rows = torch.cat([w.flatten(2), b.unsqueeze(-1)], dim=-1)
        top = rows.gather(-1, rows.abs().argmax(-1, keepdim=True))
        assert (top > 0).all()
    assert all(s.abs().eq(1).all() for s in canonical_signs(canon))


def test_canonical_form_commutes_with_hidden_permutations():
    ws = WeightSpace.from_modules([_siren() for _ in range(3)])
    perms = random_permutation(ws.spec, torch.Generator().manual_seed(2))
    assert sign_canonical(permute(ws, perms)).allclose(permute(sign_canonical(ws), perms))


def test_a_zoo_read_through_sign_canonical(tmp_path):
    from tiny_zoo import build_tiny_inr_zoo

    from metanet.data.datamodules import WeightSpaceDataModule
    from metanet.data.zoo_store import Zoo
    from metanet.data.zoo_view import MappedZoo

    path = build_tiny_inr_zoo(str(tmp_path / "inr.h5"), per_class=1, steps=5)
    plain = WeightSpaceDataModule(path, target="label", splits=(0.6, 0.2, 0.2), batch_size=4)
    canon = WeightSpaceDataModule(path, target="label", splits=(0.6, 0.2, 0.2), batch_size=4,
                                  canonicalize=sign_canonical)  # fmt: skip
    plain.setup()
    canon.setup()
    for split in ("train", "val", "test"):  # every split, not only the training batches
        loader_p = getattr(plain, f"{split}_dataloader")()
        loader_c = getattr(canon, f"{split}_dataloader")()
        for (ws_p, y_p), (ws_c, y_c) in zip(loader_p, loader_c):
            assert sign_canonical(ws_p).max_abs_diff(ws_c) == 0.0
            assert torch.equal(y_p, y_c)
    # the statistics are those of the canonical networks (hidden biases change sign, so means do)
    assert not torch.allclose(plain.weight_stats.bias_mean, canon.weight_stats.bias_mean)
    with Zoo.open(path) as zoo:
        view = MappedZoo(zoo, sign_canonical)
        group = view[zoo.architectures[0]]
        module = group.module(0)
        expected = sign_canonical(zoo[zoo.architectures[0]].weight_space([0]))
        assert WeightSpace.from_module(module, group.spec).max_abs_diff(expected) == 0.0
        assert set(group.params([0, 1])) == set(zoo[zoo.architectures[0]].keys)


def test_a_map_on_a_group_without_weight_space_is_refused(zoo_path):
    import types

    from metanet.data.zoo_view import MappedGroup

    group = types.SimpleNamespace(name="resnet", spec=None)
    with pytest.raises(ValueError, match="'resnet' has no weight space"):
        MappedGroup(group, sign_canonical)


def test_canonicalize_is_a_dotted_path_in_the_cli(tmp_path):
    from tiny_zoo import build_tiny_inr_zoo

    from metanet.cli import MetanetCLI

    path = build_tiny_inr_zoo(str(tmp_path / "inr.h5"), per_class=1, steps=5)
    args = ["--config", "configs/inr/dws.yaml", "--data.init_args.zoo", path,
            "--data.init_args.canonicalize", "metanet.weightspace.symmetry.sign_canonical",
            "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    cli = MetanetCLI(args, run=False)
    assert cli.datamodule.canonicalize is sign_canonical


def test_a_sign_canonical_zoo_loads_in_worker_processes(tmp_path):
    from tiny_zoo import build_tiny_inr_zoo

    from metanet.data.datamodules import WeightSpaceDataModule

    path = build_tiny_inr_zoo(str(tmp_path / "inr.h5"), per_class=1, steps=5)
    kwargs = dict(target="label", splits=(0.6, 0.2, 0.2), batch_size=4,
                  canonicalize=sign_canonical)  # fmt: skip
    inline = WeightSpaceDataModule(path, **kwargs)
    workers = WeightSpaceDataModule(path, num_workers=2, **kwargs)
    for (a, _), (b, _) in zip(inline.val_dataloader(), workers.val_dataloader()):
        assert a.max_abs_diff(b) == 0.0
