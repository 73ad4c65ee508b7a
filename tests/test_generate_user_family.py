"""Weight generators for any zoo of one architecture, from a user's data and model family (issue
16 item 5), end to end: a user ``nn.Module`` with BatchNorm and a residual connection (no weight
space), the user's data in a tensor file (``provider: tensors``), a zoo built from a recipe that
names the module by class path, a conditional generator trained by ``metanet fit`` through a flat
parameter layout, sampled with :func:`metanet.generate.sample`, evaluated on the provider's test
split with BatchNorm recalibration, and ``metanet generate --against`` novelty; then the bad input
a user meets on this path."""

from __future__ import annotations

import csv
import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file as load_safetensors
from torch import nn

import metanet
from metanet.data.datamodules import open_zoo
from metanet.data.tasks import load_task_data
from metanet.generate.cli import main as generate_main
from metanet.generate.data import GeneratorDataModule, ZooInputError, network_layout
from metanet.generate.evaluate import (
    calibration_batches,
    classifier_accuracy,
    load_eval_splits,
    load_network,
    load_test_split,
)
from metanet.hyper.calibrate import calibrate_batchnorm
from metanet.tasks.generation import GenerationError, GenerationTask
from metanet.zoo.architectures import build_module
from metanet.zoo.build import build_zoo
from metanet.zoo.data import _recipe_task
from metanet.zoo.recipe import Recipe

HERE = __name__  # the import name of this file, for class_path
CLASSES = 3


class ResidualBN(nn.Module):
    """A user's model family: conv - BatchNorm - ReLU, a residual conv block, global average
    pool, linear head (BatchNorm and the skip connection: no weight space)."""

    def __init__(self, width: int = 4, classes: int = CLASSES) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width)
        self.block = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.stem(x)))
        h = h + torch.relu(self.block(h))
        return self.head(h.mean(dim=(2, 3)))


def _bars(n: int = 240, size: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy ``[1, size, size]`` images of a horizontal, vertical or diagonal bar."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    x = 0.1 * g.random((n, 1, size, size)).astype(np.float32)
    pos, idx = g.integers(0, size, n), np.arange(size)
    for i in range(n):
        if y[i] == 0:
            x[i, 0, pos[i], :] += 1.0
        elif y[i] == 1:
            x[i, 0, :, pos[i]] += 1.0
        else:
            x[i, 0, idx, (idx + pos[i]) % size] += 1.0
    return x, y


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> dict:
    """The user's data file, their zoo (6 runs, 2 optimizers) and its recipe's data entry."""
    root = tmp_path_factory.mktemp("userfam")
    x, y = _bars()
    np.savez(root / "bars.npz", x=x, y=y)
    data = {"provider": "tensors", "path": os.fspath(root / "bars.npz"), "test_fraction": 0.25,
            "val_fraction": 0.15}  # fmt: skip
    recipe = Recipe.from_dict(  # reading the user's own recipe trusts the class it names
        {
            "name": "user-bars",
            "kind": "classifier",
            "seed": 3,
            "data": data,
            "architectures": [{"class_path": f"{HERE}:ResidualBN", "init_args": {"width": 3}}],
            "networks_per_arch": 6,
            "chunk_size": 6,
            "keep_fractions": [1.0],
            "hparams": {
                "lr": 2e-2,
                "optimizer": {"choice": ["adam", "sgd"]},
                "batch_size": 32,
                "epochs": 3,
            },
        }
    )
    zoo = os.fspath(build_zoo(recipe, root / "bars.h5", progress=False, threads=1))
    return {"root": root, "data": data, "zoo": zoo}


@pytest.fixture(scope="module")
def generator(user) -> str:
    """A conditional flow generator trained by ``metanet fit`` (chosen on validation with
    recalibrated samples); the path of its checkpoint."""
    from metanet.cli import main

    root = user["root"]
    ckpts = os.fspath(root / "ckpt")
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 200,
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": os.fspath(root / "run"),
            "callbacks": [
                {
                    "class_path": "metanet.generate.selection.SelectOnValidation",
                    "init_args": {"every_n_steps": 50, "n_samples": 4, "calibrate_bn": 2},
                },
                {
                    "class_path": "metanet.tasks.checkpoint.ModelCheckpoint",
                    "init_args": {
                        "dirpath": ckpts,
                        "filename": "best",
                        "monitor": "val/median_acc",
                        "mode": "max",
                        "every_n_train_steps": 50,
                        "save_top_k": 1,
                        "enable_version_counter": False,
                    },
                },
            ],
        },
        "model": {
            "class_path": "metanet.tasks.flow_generation.FlowGenerationTask",
            "init_args": {"hidden": 32, "depth": 1, "lr": 1e-2, "sample_steps": 4},
        },
        "data": {
            "class_path": "metanet.generate.data.GeneratorDataModule",
            "init_args": {
                "zoo": user["zoo"],
                "condition": "optimizer",
                "canonicalize": False,
                "holdout": 1,
                "batch_size": 4,
            },
        },
    }
    path = root / "flow-user.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", os.fspath(path)]) == 0
    return os.fspath(root / "ckpt" / "best.ckpt")


def test_user_zoo_has_no_weight_space_and_reads_through_a_flat_layout(user) -> None:
    group = open_zoo(user["zoo"])[next(iter(open_zoo(user["zoo"]).architectures))]
    assert group.spec is None and group.arch["class_path"] == f"{HERE}:ResidualBN"
    assert sorted(set(group.hparams["optimizer"].astype(str))) == ["adam", "sgd"]
    dm = GeneratorDataModule(user["zoo"], canonicalize=False, condition="optimizer")
    dm.setup("fit")
    assert dm.layout is not None and dm.dim == sum(p.numel() for p in ResidualBN(3).parameters())
    assert set(dm.layout.buffers) == {"norm.running_mean", "norm.running_var",
                                      "norm.num_batches_tracked"}  # fmt: skip
    # every zoo network, read back through the layout with its own running statistics, has the
    # test accuracy the zoo recorded on the provider's test split
    x, y = load_test_split({"arch": dm.arch, "zoo_info": dm.zoo_info})
    task = load_task_data(user["data"])
    assert torch.equal(x, task.test.x) and torch.equal(y, task.test.y)
    stacked = group.params(dm.records.numpy())
    module = build_module(dm.arch).eval()
    for j, record in enumerate(dm.records.tolist()):
        own = {k: stacked[k][j] for k in dm.layout.buffers}
        dm.layout.load_into(module, dm.raw_vectors[j], own)
        with torch.no_grad():
            acc = float((module(x).argmax(1) == y).float().mean())
        assert acc == pytest.approx(float(group.metrics["test_acc"][record]), abs=1e-6)


def test_generation_for_a_user_family_end_to_end(user, generator, tmp_path, capsys) -> None:
    gen = metanet.load(generator)
    assert isinstance(gen, GenerationTask) and gen.conditions == ["adam", "sgd"]
    info = gen.info
    layout = network_layout(info)
    assert layout is not None and "layout" in info and info["arch"]["type"] == "module"
    # sampling through the public API; a fixed seed reproduces the networks
    ws = metanet.generate.sample(generator, 4, condition="adam", seed=3)
    assert ws.allclose(metanet.generate.sample(gen, 4, condition="adam", seed=3))
    assert ws.flatten().shape == (4, layout.dim) and torch.isfinite(ws.flatten()).all()
    # evaluation on the user's test split, BatchNorm recalibrated on the train split
    x, y = load_test_split(info)
    batches = calibration_batches(info, 2, batch_size=16)
    assert batches[0].shape == (16, 1, 6, 6)
    acc = classifier_accuracy(ws, info["arch"], x, y, layout=layout, calibration=batches)
    assert float(acc.median()) > 0.4  # 3 classes: chance is 1/3 (the zoo's adam runs: 0.4-1.0)
    module = build_module(info["arch"])
    assert isinstance(module, ResidualBN)
    for i in range(len(ws)):
        m = layout.load_into(build_module(info["arch"]).eval(), ws[i].flatten()[0])
        calibrate_batchnorm(m, batches)
        with torch.no_grad():
            own = float((m(x).argmax(1) == y).float().mean())
        assert float(acc[i]) == pytest.approx(own)
        assert torch.equal(load_network(module, ws, i, layout, batches).norm.running_var,
                           m.norm.running_var)  # fmt: skip
    # metanet generate: recalibrated networks, their accuracy and novelty against the zoo
    out = tmp_path / "gen"
    args = ["--generator", generator, "--n", "4", "--condition", "sgd", "-o", os.fspath(out),
            "--calibrate-bn", "2", "--against", user["zoo"]]  # fmt: skip
    rc = generate_main(args)
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "recalibrated on 2 train batches" in text.out and "unaligned L2 NN" in text.out
    rows = list(csv.DictReader(open(out / "generated.csv")))
    assert len(rows) == 4 and {r["condition"] for r in rows} == {"sgd"}
    assert {"test_acc", "val_acc", "max_error_iou", "unaligned_l2_nn", "memorized"} <= set(rows[0])
    splits = load_eval_splits(info)
    for r in rows:
        m = build_module(info["arch"]).eval()  # the written file: a plain user-module state_dict
        m.load_state_dict(load_safetensors(out / r["file"]), strict=True)
        with torch.no_grad():
            test = float((m(splits.x_test).argmax(1) == splits.y_test).float().mean())
        assert float(r["test_acc"]) == pytest.approx(test, abs=1e-4)
        assert 0.0 <= float(r["max_error_iou"]) <= 1.0 and float(r["unaligned_l2_nn"]) > 0
        assert r["memorized"] in ("0", "1")


# -- bad input -------------------------------------------------------------------------------------
def test_user_family_condition_outside_the_trained_set(generator, tmp_path, capsys) -> None:
    with pytest.raises(GenerationError, match="rmsprop"):
        metanet.generate.sample(generator, 2, condition="rmsprop")
    rc = generate_main(["--generator", generator, "--n", "2", "--condition", "rmsprop", "-o",
                        os.fspath(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "unknown condition" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "arch.json").exists()


def test_user_zoo_too_small_for_the_split(user) -> None:
    with pytest.raises(ZooInputError) as err:
        GeneratorDataModule(user["zoo"], canonicalize=False, holdout=6).setup("fit")
    msg = str(err.value)
    assert "\n" not in msg and "bars.h5" in msg and "6 run(s)" in msg
    with pytest.raises(ZooInputError, match="at least 2"):
        GeneratorDataModule(user["zoo"], canonicalize=False, min_test_acc=2.0).setup("fit")


def test_user_data_changed_after_training(user, generator, tmp_path, capsys) -> None:
    """The user's data file changed on disk: evaluation and recalibration refuse it (exit 2),
    ``--no-eval`` without recalibration still writes the networks."""
    path = user["data"]["path"]
    saved = tmp_path / "bars.npz"
    shutil.copy(path, saved)
    x, y = _bars(seed=1)
    np.savez(path, x=x, y=y)
    _recipe_task.cache_clear()  # the data is read once per process: a new `metanet generate`
    try:
        base = ["--generator", generator, "--n", "2", "-o", os.fspath(tmp_path / "o")]
        assert generate_main(base) == 2
        err = capsys.readouterr().err
        assert "cannot evaluate the networks" in err and "changed on disk" in err
        assert "--no-eval" in err
        assert generate_main([*base, "--no-eval", "--calibrate-bn", "1"]) == 2
        assert "cannot recalibrate BatchNorm" in capsys.readouterr().err
        assert generate_main([*base, "--no-eval"]) == 0
        assert (tmp_path / "o" / "arch.json").exists()
    finally:
        shutil.copy(saved, path)
        _recipe_task.cache_clear()
