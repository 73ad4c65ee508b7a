"""Weight generators for whole networks beyond MLPs (issue 16 item 4): a CNN zoo with BatchNorm
through a flat parameter layout, BatchNorm running statistics recalibrated after generation, and
the one-architecture error."""

from __future__ import annotations

import copy
import csv
import json
import os

import lightning as L
import pytest
import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn

from metanet.data.datamodules import open_zoo
from metanet.generate.canonicalize import ChannelPermutations
from metanet.generate.cli import main as generate_main
from metanet.generate.data import (
    FlatLayout,
    GeneratorDataModule,
    ZooInputError,
    network_layout,
    zoo_group_for,
)
from metanet.generate.evaluate import (
    calibration_batches,
    classifier_accuracy,
    load_eval_splits,
    load_network,
)
from metanet.generate.novelty import error_sets, max_error_overlap, novelty
from metanet.generate.selection import SelectOnValidation
from metanet.hyper.calibrate import calibrate_batchnorm
from metanet.tasks.flow_generation import FlowGenerationTask
from metanet.weightspace import WeightSpace
from metanet.zoo.architectures import arch_name, build_module
from metanet.zoo.build import build_zoo
from metanet.zoo.recipe import Recipe

CNN_BN = {"type": "cnn", "channels": [3, 4], "strides": [1, 2], "kernel": 3, "norm": "batch",
          "head": "pool"}  # fmt: skip
MLP = {"type": "mlp", "in": 64, "widths": [6], "out": 10}
DATA = {"provider": "digits", "split_seed": 0, "test_fraction": 0.25, "val_fraction": 0.15}


def _recipe(name: str, archs: list[dict], n: int) -> Recipe:
    return Recipe.from_dict(
        {
            "name": name,
            "kind": "classifier",
            "seed": 5,
            "data": DATA,
            "architectures": archs,
            "networks_per_arch": n,
            "chunk_size": n,
            "keep_fractions": [1.0],
            "hparams": {"lr": 1e-2, "optimizer": "adam", "batch_size": 64, "epochs": 2},
        }
    )


@pytest.fixture(scope="module")
def cnnbn_zoo(tmp_path_factory) -> str:
    """Five seeded runs of a tiny digits CNN with BatchNorm, one final checkpoint each."""
    out = tmp_path_factory.mktemp("cnnbn") / "cnnbn.h5"
    return os.fspath(build_zoo(_recipe("t-cnnbn", [CNN_BN], 5), out, progress=False, threads=1))


@pytest.fixture(scope="module")
def cnnbn_dm(cnnbn_zoo) -> GeneratorDataModule:
    dm = GeneratorDataModule(cnnbn_zoo, canonicalize=False, holdout=1, batch_size=4)
    dm.setup("fit")
    return dm


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    names = {k for k, _ in module.named_parameters()}
    return {k: v.clone() for k, v in module.state_dict().items() if k not in names}


# -- flat layout -----------------------------------------------------------------------------------
def test_flat_layout_round_trip_gives_the_same_module(cnnbn_zoo, cnnbn_dm) -> None:
    dm = cnnbn_dm
    group = open_zoo(cnnbn_zoo)[arch_name(CNN_BN)]
    assert group.spec is None and dm.layout is not None  # no weight space: the flat layout
    layout = dm.layout
    assert layout.dim == dm.dim == sum(p.numel() for p in build_module(CNN_BN).parameters())
    assert set(layout.buffers) == {
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "4.running_mean",
        "4.running_var",
        "4.num_batches_tracked",
    }
    x = load_eval_splits({"arch": dm.arch, "zoo_info": dm.zoo_info}).x_test[:50]
    for j, record in enumerate(dm.records.tolist()):
        zoo_net = group.module(record)  # the zoo's network, its own running statistics
        vec = dm.raw_vectors[j]
        assert torch.equal(vec, layout.flatten(group.params([record]))[0])
        back = layout.load_into(build_module(CNN_BN), vec, _buffers(zoo_net)).eval()
        sd, want = back.state_dict(), zoo_net.state_dict()
        assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in sd)
        torch.testing.assert_close(back(x), zoo_net(x), rtol=0, atol=0)
        # the pseudo weight space the generators see unflattens to the same vector
        ws = WeightSpace.unflatten(vec[None], dm.spec)
        assert torch.equal(ws.flatten()[0], vec)
    # the layout travels in the generator's info (its own key) and comes back equal; checkpoints
    # written before carried it inside zoo_info, which is still read
    assert "layout" not in dm.zoo_info
    plain = json.loads(json.dumps(layout.to_dict()))
    for info in ({"layout": plain, "zoo_info": dm.zoo_info}, {"zoo_info": {"layout": plain}}):
        again = network_layout(info)
        assert again.params == layout.params
        assert all(torch.equal(again.buffers[k], v) and again.buffers[k].dtype == v.dtype
                   for k, v in layout.buffers.items())  # fmt: skip
    assert network_layout({"zoo_info": dm.zoo_info}) is None  # a weight-space generator's info
    # defaults: the zoo's average running statistics over the training networks
    stacked = group.params(dm.records.numpy())
    torch.testing.assert_close(layout.buffers["4.running_var"], stacked["4.running_var"].mean(0))


def test_flat_layout_of_any_module() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten())
            self.scale = nn.Parameter(torch.randn(3))
            self.head = nn.Linear(72, 3, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x)) * self.scale

    torch.manual_seed(0)
    src = Scaled()
    src.body[1].running_mean.normal_()
    layout = FlatLayout.from_module(src)
    # named_parameters() order: the module's own parameters, then its children's
    assert layout.keys == ["scale", "body.0.weight", "body.0.bias", "body.1.weight",
                           "body.1.bias", "head.weight"]  # fmt: skip
    vec = layout.flatten({k: v[None] for k, v in src.state_dict().items()})[0]
    dst = layout.load_into(Scaled(), vec).eval()
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(dst(x), src.eval()(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit this flat layout"):
        layout.load_into(build_module(CNN_BN), vec)


# -- recalibration ---------------------------------------------------------------------------------
def test_recalibration_matches_the_batch_statistics(cnnbn_dm) -> None:
    dm = cnnbn_dm
    info = {"arch": dm.arch, "zoo_info": dm.zoo_info}
    batches = calibration_batches(info, 3, batch_size=16, seed=1)
    assert len(batches) == 3 and batches[0].shape == (16, 1, 8, 8)
    ws = WeightSpace.unflatten(dm.raw_vectors, dm.spec)
    module = load_network(build_module(CNN_BN).eval(), ws, 0, dm.layout)
    before = _buffers(module)
    assert torch.equal(before["1.running_var"], dm.layout.buffers["1.running_var"])
    # the statistics a direct computation gives: per batch, the BN inputs' channel mean and
    # unbiased variance (layers before in training mode, i.e. normalized by batch statistics)
    ref = copy.deepcopy(module).train()
    want = {}
    with torch.no_grad():
        for idx in (1, 4):
            feats = [ref[:idx](b) for b in batches]
            want[f"{idx}.running_mean"] = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
            want[f"{idx}.running_var"] = torch.stack(
                [f.transpose(0, 1).flatten(1).var(1, unbiased=True) for f in feats]
            ).mean(0)
    load_network(module, ws, 0, dm.layout, calibration=batches)
    after = _buffers(module)
    assert not module.training
    for key, value in want.items():
        assert not torch.allclose(after[key], before[key])  # recalibration changed them
        torch.testing.assert_close(after[key], value, rtol=1e-4, atol=1e-6)
    params = dict(module.named_parameters())
    assert torch.equal(torch.cat([params[k].flatten() for k in dm.layout.keys]), dm.raw_vectors[0])
    # classifier_accuracy recalibrates every network the same way
    splits = load_eval_splits(info)
    acc = classifier_accuracy(ws, dm.arch, splits.x_test, splits.y_test, layout=dm.layout,
                              calibration=batches)  # fmt: skip
    for i in range(len(ws)):
        m = load_network(build_module(CNN_BN).eval(), ws, i, dm.layout)
        calibrate_batchnorm(m, batches)
        with torch.no_grad():
            own = (m(splits.x_test).argmax(1) == splits.y_test).float().mean()
        assert float(acc[i]) == pytest.approx(float(own))


# -- generation end to end -------------------------------------------------------------------------
def test_generator_on_a_batchnorm_zoo_and_generate_calibrate_bn(cnnbn_dm, tmp_path, capsys) -> None:
    torch.manual_seed(0)
    task = FlowGenerationTask(hidden=32, depth=1, sample_steps=4)
    sel = SelectOnValidation(every_n_steps=3, n_samples=2, calibrate_bn=2)
    trainer = L.Trainer(max_steps=6, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[sel])  # fmt: skip
    trainer.fit(task, datamodule=cnnbn_dm)
    assert sel.history and network_layout(task.info).params == cnnbn_dm.layout.params
    assert "layout" in task.info and "layout" not in task.info["zoo_info"]
    ckpt = str(tmp_path / "flow.ckpt")
    trainer.save_checkpoint(ckpt)
    for k, sub in ((0, "raw"), (2, "calibrated")):
        out = tmp_path / sub
        rc = generate_main(["--generator", ckpt, "--n", "3", "-o", str(out), "--seed", "1",
                            "--calibrate-bn", str(k)])  # fmt: skip
        text = capsys.readouterr()
        assert rc == 0, text.err
        assert ("recalibrated on 2 train batches" in text.out) == bool(k)
        rows = list(csv.DictReader(open(out / "generated.csv")))
        assert len(rows) == 3 and "val_acc" in rows[0]
        arch = json.loads((out / "arch.json").read_text())
        for i in range(3):
            sd = load_safetensors(out / f"net_{i:04d}.safetensors")
            module = build_module(arch)
            module.load_state_dict(sd, strict=True)
            stats = sd["4.running_var"]
            same = torch.equal(stats, cnnbn_dm.layout.buffers["4.running_var"])
            assert same == (k == 0)  # without --calibrate-bn: the zoo's average statistics
    err = generate_main(["--generator", ckpt, "--n", "2", "-o", str(tmp_path / "x"),
                         "--calibrate-bn", "-1"])  # fmt: skip
    assert err == 2 and "--calibrate-bn must be >= 0" in capsys.readouterr().err
    # --against: novelty against the training networks, both sides recalibrated the same way
    out = tmp_path / "against"
    rc = generate_main(["--generator", ckpt, "--n", "3", "-o", str(out), "--seed", "1",
                        "--calibrate-bn", "2", "--against", cnnbn_dm.zoo])  # fmt: skip
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "unaligned L2 NN (flat layout)" in text.out
    rows = list(csv.DictReader(open(out / "generated.csv")))
    assert "unaligned_l2_nn" in rows[0] and "aligned_l2_nn" not in rows[0]
    info = {"arch": cnnbn_dm.arch, "zoo_info": cnnbn_dm.zoo_info}
    splits = load_eval_splits(info)
    batches = calibration_batches(info, 2)  # what --calibrate-bn 2 uses (64 per batch, seed 0)
    train = WeightSpace.unflatten(cnnbn_dm.raw_vectors, cnnbn_dm.spec)  # held-out run left out
    train_errors = error_sets(train, cnnbn_dm.arch, splits.x_test, splits.y_test,
                              cnnbn_dm.layout, batches)  # fmt: skip
    for i, row in enumerate(rows):
        module = build_module(cnnbn_dm.arch).eval()  # the written (recalibrated) network
        module.load_state_dict(load_safetensors(out / f"net_{i:04d}.safetensors"))
        with torch.no_grad():
            wrong = module(splits.x_test).argmax(1) != splits.y_test
        iou, _ = max_error_overlap(wrong[None], train_errors)
        assert float(row["max_error_iou"]) == pytest.approx(float(iou), abs=1e-4)
        dist = (cnnbn_dm.raw_vectors - cnnbn_dm.layout.flatten(
            {k: v[None] for k, v in module.state_dict().items()})).norm(dim=1).min()  # fmt: skip
        assert float(row["unaligned_l2_nn"]) == pytest.approx(float(dist), rel=1e-4, abs=1e-4)


def test_against_aligns_a_canonicalized_flat_generator(cnnbn_zoo, tmp_path, capsys) -> None:
    dm = GeneratorDataModule(cnnbn_zoo, canonicalize=True, holdout=1, batch_size=4)
    torch.manual_seed(0)
    task = FlowGenerationTask(hidden=32, depth=1, sample_steps=4)
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        accelerator="cpu")  # fmt: skip
    trainer.fit(task, datamodule=dm)
    ckpt = str(tmp_path / "flow.ckpt")
    trainer.save_checkpoint(ckpt)
    out = tmp_path / "against"
    rc = generate_main(["--generator", ckpt, "--n", "3", "-o", str(out), "--seed", "1",
                        "--against", cnnbn_zoo])  # fmt: skip
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "aligned L2 NN median" in text.out and "unaligned" not in text.out
    rows = list(csv.DictReader(open(out / "generated.csv")))
    assert "aligned_l2_nn" in rows[0] and "unaligned_l2_nn" not in rows[0]
    # the same distances by hand: the training networks (held-out run left out) aligned to the
    # generator's reference; each generated network as written, or aligned to it too
    structure = ChannelPermutations.from_module(build_module(dm.arch))
    group = zoo_group_for(cnnbn_zoo, dm.arch, flat=True)
    held = set(dm.holdout_records.tolist())
    records = [i for i in range(len(group)) if i not in held]
    ref = task.reference.detach().float()
    train = dm.layout.canonicalize(dm.layout.flatten(group.params(records)), structure, ref)
    for i, row in enumerate(rows):
        sd = load_safetensors(out / f"net_{i:04d}.safetensors")
        g = dm.layout.flatten({k: v[None] for k, v in sd.items()})
        again = dm.layout.canonicalize(g, structure, ref)
        want = min((train - g).norm(dim=1).min(), (train - again).norm(dim=1).min())
        assert float(row["aligned_l2_nn"]) == pytest.approx(float(want), rel=1e-4, abs=1e-4)


def test_novelty_of_flat_layout_networks(cnnbn_dm) -> None:
    dm = cnnbn_dm
    info = {"arch": dm.arch, "zoo_info": dm.zoo_info}
    batches = calibration_batches(info, 2, batch_size=16)
    splits = load_eval_splits(info)
    x, y = splits.x_test, splits.y_test
    train = dm.raw_vectors
    train_ws = WeightSpace.unflatten(train, dm.spec)
    errors = error_sets(train_ws, dm.arch, x, y, dm.layout, batches)
    acc = classifier_accuracy(train_ws, dm.arch, x, y, layout=dm.layout, calibration=batches)
    torch.testing.assert_close(1.0 - errors.float().mean(1), acc)  # the same loading
    # a copy of two checkpoints, loaded and recalibrated like them: IoU 1, distance 0, memorized
    copies = WeightSpace.unflatten(train[[0, 2]].clone(), dm.spec)
    rep = novelty(copies, train, errors, None, dm.arch, x, y, layout=dm.layout,
                  calibration=batches)  # fmt: skip
    assert not rep.aligned and rep.summary()["l2_aligned"] == 0.0
    assert rep.memorized.all() and torch.allclose(rep.iou, torch.ones(2))
    assert torch.allclose(rep.distance, torch.zeros(2)) and rep.distance_index.tolist() == [0, 2]
    # the checkpoints against each other (excluding self) and the held-out run are not copies
    own = novelty(train_ws, train, errors, None, dm.arch, x, y, self_index=torch.arange(len(train)),
                  layout=dm.layout, calibration=batches)  # fmt: skip
    assert (own.distance > 0).all() and (own.distance_index != torch.arange(len(train))).all()
    held = novelty(WeightSpace.unflatten(dm.holdout_vectors, dm.spec), train, errors, None,
                   dm.arch, x, y, layout=dm.layout, calibration=batches)  # fmt: skip
    assert not held.memorized.any() and float(held.distance[0]) > 0


# -- bad input -------------------------------------------------------------------------------------
def test_several_architectures_name_them_in_one_line(tmp_path, cnnbn_zoo) -> None:
    path = build_zoo(_recipe("t-two", [CNN_BN, MLP], 2), tmp_path / "two.h5", progress=False,
                     threads=1)  # fmt: skip
    with pytest.raises(ZooInputError) as err:
        GeneratorDataModule(path, canonicalize=False).setup("fit")
    msg = str(err.value)
    assert "\n" not in msg and "two.h5" in msg and "one architecture" in msg and "arch=" in msg
    assert arch_name(CNN_BN) in msg and arch_name(MLP) in msg
    # choosing one works, for either layout
    dm = GeneratorDataModule(path, arch=arch_name(CNN_BN), canonicalize=False)
    dm.setup("fit")
    assert dm.layout is not None
    flat_mlp = GeneratorDataModule(path, arch=arch_name(MLP), canonicalize=False, layout="flat")
    flat_mlp.setup("fit")
    assert flat_mlp.layout is not None and flat_mlp.dim == 64 * 6 + 6 + 6 * 10 + 10
    # a BatchNorm chain is canonicalized through its flat layout (tests/test_canonicalize_bn.py)
    canonical = GeneratorDataModule(cnnbn_zoo)
    canonical.setup("fit")
    assert canonical.canonicalize and canonical.layout is not None
    with pytest.raises(ZooInputError, match="no weight space"):
        GeneratorDataModule(cnnbn_zoo, canonicalize=False, layout="weightspace").setup("fit")
    with pytest.raises(ValueError, match="layout must be one of"):
        GeneratorDataModule(cnnbn_zoo, layout="graph")
