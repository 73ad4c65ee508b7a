"""Zoos of the user's data and the user's model family: recipes with any data provider and any
``nn.Module`` class, sizes filled from the data, records that match the stored networks, and
clear errors for data or modules that do not fit."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metanet.data.tasks import load_task_data
from metanet.data.zoo_store import Zoo
from metanet.zoo import architectures
from metanet.zoo.architectures import ArchError, arch_name
from metanet.zoo.build import build_zoo
from metanet.zoo.data import recipe_task
from metanet.zoo.recipe import Recipe, RecipeError

BARS = {"provider": "dataset", "class_path": "user_models:Bars", "init_args": {"n": 180},
        "test_fraction": 0.25}  # fmt: skip
HPARAMS = {"lr": {"log_uniform": [0.01, 0.05]}, "epochs": 3, "batch_size": 32}


def _recipe(**over) -> dict:
    raw = {
        "name": "bars",
        "seed": 1,
        "data": BARS,
        "architectures": [
            {"class_path": "user_models:SmallNet", "init_args": {"width": {"choice": [3, 5]}}},
            {"type": "mlp", "widths": [8]},
        ],
        "networks_per_arch": 3,
        "chunk_size": 3,
        "keep_fractions": [0.5, 1.0],
        "hparams": HPARAMS,
    }
    raw.update(over)
    return raw


def _accuracy(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((module(x).argmax(1) == y).float().mean())


def test_recipe_sizes_archs_from_the_data_and_expands_module_choices():
    r = Recipe.from_dict(_recipe())
    kinds = [(a["type"], a.get("init_args")) for a in r.architectures]
    assert kinds == [("module", {"width": 3}), ("module", {"width": 5}), ("mlp", None)]
    assert r.architectures[0]["input_shape"] == [1, 12, 12]
    assert r.architectures[2]["in"] == 144 and r.architectures[2]["out"] == 3
    assert r.data["dataset"] and r.data["provider"]["class_path"].endswith("Bars")
    task = load_task_data(BARS)
    assert r.data["fingerprint"] == task.fingerprint()
    assert len({arch_name(a) for a in r.architectures}) == 3


def test_zoo_of_a_user_dataset_and_user_module_family(tmp_path):
    r = Recipe.from_dict(_recipe())
    out = build_zoo(r, tmp_path / "bars.h5", progress=False)
    task = recipe_task(r.data)
    with Zoo.open(out) as zoo:
        assert zoo.attrs["data_provider"] == "dataset"
        assert zoo.attrs["data_fingerprint"] == task.fingerprint()
        assert sorted(zoo.attrs["engines"]) == ["batched", "vmap", "vmap"] or sorted(
            zoo.attrs["engines"]) == ["native", "vmap", "vmap"]  # fmt: skip
        assert len(zoo.architectures) == 3
        best = 0.0
        for g in zoo:
            assert len(g) == 3 * 2  # networks x kept checkpoints
            flat = g.arch["type"] == "mlp"
            x_te = task.test.x.flatten(1) if flat else task.test.x
            for i in range(len(g)):
                # the record's test accuracy is the stored network's accuracy on the data
                acc = _accuracy(g.module(i), x_te, task.test.y)
                assert g.metrics["test_acc"][i] == pytest.approx(acc, abs=1e-6)
                best = max(best, acc)
        assert best > 0.6  # trained for real: far above chance (1/3) on the bars
    # the data changes on disk: a rebuild is refused and the zoo is left as it was
    before = os.path.getmtime(out)
    changed = {**BARS, "init_args": {"n": 180, "noise": 0.3}}
    r2 = Recipe.from_dict(_recipe(data=changed))
    with pytest.raises(FileExistsError, match="fingerprint .* this build"):
        build_zoo(r2, out, progress=False)
    assert os.path.getmtime(out) == before


def test_a_file_naming_untrusted_user_code_is_not_imported(tmp_path, monkeypatch):
    r = Recipe.from_dict(_recipe(architectures=[{"class_path": "user_models:SmallNet"}],
                                 networks_per_arch=1))  # fmt: skip
    out = build_zoo(r, tmp_path / "z.h5", progress=False)
    monkeypatch.setattr(architectures, "_TRUSTED_PREFIXES", {"torch.nn", "metanet"})
    with Zoo.open(out) as zoo:
        g = zoo[zoo.architectures[0]]
        with pytest.raises(ArchError, match="METANET_TRUST_CODE=user_models"):
            g.module(0)
        monkeypatch.setenv("METANET_TRUST_CODE", "user_models")
        assert isinstance(g.module(0), torch.nn.Module)


def test_zoo_from_tensor_files_with_a_cnn_sized_from_the_data(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(90, 2, 6, 6, generator=g)
    y = (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2))).long()  # which channel is brighter
    np.savez(tmp_path / "data.npz", x_train=x[:60].numpy(), y_train=y[:60].numpy(),
             x_test=x[60:].numpy(), y_test=y[60:].numpy())  # fmt: skip
    data = {"provider": "tensors", "path": str(tmp_path / "data.npz")}
    r = Recipe.from_dict(_recipe(data=data, networks_per_arch=2, architectures=[
        {"type": "cnn", "channels": [4], "kernel": 3}]))  # fmt: skip
    arch = r.architectures[0]
    assert (arch["in_channels"], arch["input_size"], arch["out"]) == (2, 6, 2)
    out = build_zoo(r, tmp_path / "z.h5", progress=False)
    with Zoo.open(out) as zoo:
        grp = zoo[zoo.architectures[0]]
        for i in range(len(grp)):
            acc = _accuracy(grp.module(i), x[60:], y[60:])
            assert grp.metrics["test_acc"][i] == pytest.approx(acc, abs=1e-6)


def test_siren_zoo_of_non_square_color_images(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 4, 5, generator=g)
    y = torch.arange(6) % 2
    np.savez(tmp_path / "img.npz", x=x.numpy(), y=y.numpy())
    data = {"provider": "tensors", "path": str(tmp_path / "img.npz"), "test_fraction": 0.5,
            "train_images": 2, "test_images": 1}  # fmt: skip
    r = Recipe.from_dict({"name": "inr", "kind": "siren", "data": data,
                          "architectures": [{"type": "siren", "widths": [8]}],
                          "hparams": {"epochs": 5, "lr": 1e-3}})  # fmt: skip
    arch = r.architectures[0]
    assert (arch["in"], arch["out"]) == (2, 3)  # (row, col) -> RGB
    out = build_zoo(r, tmp_path / "inr.h5", progress=False)
    task = recipe_task(r.data)
    from metanet.data.providers.signals import SignalData

    with Zoo.open(out) as zoo:
        grp = zoo[zoo.architectures[0]]
        m = grp.metrics
        assert sorted(zip(m["split"].tolist(), m["image_index"].tolist())) == [(0, 0), (0, 1),
                                                                                (1, 0)]
        for i in range(len(grp)):
            sig = SignalData.from_task(task, "train" if m["split"][i] == 0 else "test")
            coords, values = sig[int(m["image_index"][i])]
            assert m["label"][i] == int(sig.labels[int(m["image_index"][i])])
            with torch.no_grad():
                mse = float(F.mse_loss(grp.module(i)(coords), values))
            assert m["train_loss"][i] == pytest.approx(mse, rel=1e-4)
            assert math.isfinite(m["psnr"][i])


@pytest.mark.parametrize(
    ("over", "pattern"),
    [
        ({"architectures": [{"type": "mlp", "widths": [8], "out": 10}]},
         r"architectures\[0\]\.out': is 10, but the data .* needs 3"),
        ({"architectures": [{"class_path": "user_models:WrongOutput"}]},
         r"architectures\[0\]'.*WrongOutput maps inputs \[2, 1, 12, 12\] to \[2, 2\]"),
        ({"architectures": [{"class_path": "user_models:NoSuchNet"}]},
         r"architectures\[0\]'.*has no 'NoSuchNet'"),
        ({"architectures": [{"class_path": "no_such_pkg.models:Net"}]},
         r"architectures\[0\]'.*cannot import 'no_such_pkg.models'"),
        ({"architectures": [{"class_path": "user_models:SmallNet",
                             "init_args": {"width": {"uniform": [1, 4]}}}]},
         r"architectures\[0\]\.init_args\.width'.*only \{choice"),
        ({"data": {**BARS, "class_path": "user_models:Nope"}}, r"'data'.*Nope"),
        ({"data": {"provider": "tensors", "path": "/nonexistent/x.npz"}},
         r"'data'.*x\.npz"),
        ({"data": {"bogus": 1}}, r"data\.bogus.*provider"),
        ({"kind": "classifier", "data": {"provider": "tensors", "path": "REGRESSION"}},
         r"needs class labels"),
    ],
)
def test_bad_data_and_modules_name_the_recipe_key(over, pattern, tmp_path):
    if over.get("data", {}).get("path") == "REGRESSION":
        np.savez(tmp_path / "r.npz", x=np.zeros((8, 3), np.float32),
                 y=np.linspace(0, 1, 8).astype(np.float32))  # fmt: skip
        over = {**over, "data": {"provider": "tensors", "path": str(tmp_path / "r.npz")}}
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(_recipe(**over), source="my.yaml")
    message = str(info.value)
    assert message.startswith("my.yaml: recipe key") and "\n" not in message, message
    assert __import__("re").search(pattern, message), message


@pytest.mark.parametrize("engine", ["vmap", "auto"])
def test_validation_split_is_recorded_by_every_engine(tmp_path, engine):
    data = {**BARS, "val_fraction": 0.2}
    r = Recipe.from_dict(_recipe(data=data, networks_per_arch=2,
                                 architectures=[{"type": "mlp", "widths": [8]}]))  # fmt: skip
    out = build_zoo(r, tmp_path / f"{engine}.h5", progress=False, engine=engine)
    task = recipe_task(r.data)
    with Zoo.open(out) as zoo:
        g = zoo[zoo.architectures[0]]
        for i in range(len(g)):
            acc = _accuracy(g.module(i), task.val.x.flatten(1), task.val.y)
            assert g.metrics["val_acc"][i] == pytest.approx(acc, abs=1e-6)


def test_siren_early_stop_at_a_psnr_target_agrees_across_engines(tmp_path):
    """The INR protocol's early stop: a network stops updating at the first step whose training
    PSNR reaches the target; both engines stop at the same step with the same weights."""
    results = {}
    for engine in ("vmap", "batched"):
        raw = {"name": "inr-stop", "kind": "siren", "seed": 0,
               "data": {"split_seed": 0, "test_fraction": 0.25, "train_images": 3},
               "architectures": [{"type": "siren", "widths": [16, 16]}],
               "keep_fractions": [0.5, 1.0],
               "hparams": {"epochs": 300, "lr": 1e-3, "psnr_target": 24.0}}  # fmt: skip
        out = build_zoo(Recipe.from_dict(raw), tmp_path / f"{engine}.h5", progress=False,
                        engine=engine)  # fmt: skip
        with Zoo.open(out) as zoo:
            g = zoo[zoo.architectures[0]]
            results[engine] = (g.metrics["steps"].copy(), g.metrics["psnr"].copy(),
                               g.params()["0.weight"].clone())  # fmt: skip
    steps, psnr, w = results["vmap"]
    assert (steps < 300).all() and (steps > 0).all()  # every INR stopped early
    final = psnr[1::2]  # second record of each network: the final checkpoint
    assert (final >= 24.0 - 0.05).all() and (final < 30).all()  # stopped at the target
    steps_b, psnr_b, w_b = results["batched"]
    assert (steps == steps_b).all()
    torch.testing.assert_close(w, w_b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("engine", ["vmap", "auto"])
def test_class_subset_tasks_train_and_score_on_their_own_classes(tmp_path, engine):
    """``tasks:``: each network learns one class subset; its records' accuracies are on that
    subset's samples (what conditional generators are trained and judged on)."""
    tasks = {"bars-0-1": [0, 1], "bars-2": [2]}
    r = Recipe.from_dict(_recipe(networks_per_arch=4, tasks=tasks,
                                 architectures=[{"type": "mlp", "widths": [8]}]))  # fmt: skip
    assert [p.hparams["task"] for p in r.plan()] == ["bars-0-1", "bars-2"] * 2
    out = build_zoo(r, tmp_path / f"{engine}.h5", progress=False, engine=engine)
    task = recipe_task(r.data)
    x_te, y_te = task.test.x.flatten(1), task.test.y
    with Zoo.open(out) as zoo:
        assert zoo.attrs["tasks"] == tasks
        g = zoo[zoo.architectures[0]]
        names = g.hparams["task"]
        for i in range(len(g)):
            keep = torch.isin(y_te, torch.tensor(tasks[str(names[i])]))
            acc = _accuracy(g.module(i), x_te[keep], y_te[keep])
            assert g.metrics["test_acc"][i] == pytest.approx(acc, abs=1e-6)
    with pytest.raises(RecipeError, match=r"tasks\.bad.*\[0, 3\)"):
        Recipe.from_dict(_recipe(tasks={"bad": [5]}))
