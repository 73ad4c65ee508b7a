"""Tasks: generalization prediction and INR classification through Lightning, StatNN, plots, CLI.

Everything runs on a tiny real zoo (:mod:`tiny_zoo`) with small metanetworks and 1-3 epochs.
"""

from __future__ import annotations

import functools
import glob
import math
import os

import lightning as L
import numpy as np
import pytest
import torch
from tiny_zoo import CNN_FLAT, MLP, build_tiny_inr_zoo  # noqa: I001
from torch import nn

from metanet.metrics import kendall_tau, r2_score
from metanet.tasks import GeneralizationTask, INRClassificationTask
from metanet.tasks._common import PAYLOAD_KEY, TaskConfigError
from metanet.weightspace import WeightSpace, permute, random_permutation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "predict_gen", "*.yaml"))) + sorted(
    glob.glob(os.path.join(ROOT, "configs", "inr", "*.yaml"))
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def inr_zoo_path(tmp_path_factory) -> str:
    return build_tiny_inr_zoo(str(tmp_path_factory.getbasetemp() / "tiny_inr_zoo.h5"))


def _name(arch: dict) -> str:
    from metanet.zoo.architectures import arch_name

    return arch_name(arch)


def _ws_dm(zoo_path: str, arch: dict = MLP, **kwargs):
    from metanet.data.datamodules import WeightSpaceDataModule

    kw = {"group": _name(arch), "batch_size": 8, "splits": (0.5, 0.25, 0.25)}
    kw.update(kwargs)
    return WeightSpaceDataModule(zoo_path, **kw)


def _trainer(tmp_path, epochs: int = 2) -> L.Trainer:
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(
        max_epochs=epochs,
        default_root_dir=str(tmp_path),
        logger=CSVLogger(str(tmp_path), name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )


def _small_nfn(**kw):
    from metanet.nn.nfn import NFN

    return functools.partial(NFN, hidden=8, num_layers=2, head_hidden=16, **kw)


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def test_metrics_match_scipy_and_sklearn():
    from scipy.stats import kendalltau
    from sklearn.metrics import r2_score as sk_r2

    rng = np.random.default_rng(0)
    true = rng.uniform(size=50)
    pred = true + rng.normal(scale=0.2, size=50)
    assert kendall_tau(pred, true) == pytest.approx(kendalltau(pred, true).statistic)
    assert r2_score(pred, true) == pytest.approx(sk_r2(true, pred))
    assert kendall_tau(true, true) == pytest.approx(1.0)
    assert kendall_tau(-true, true) == pytest.approx(-1.0)
    assert r2_score(torch.tensor(true), torch.tensor(true)) == pytest.approx(1.0)
    assert math.isnan(kendall_tau(np.ones(5), true[:5]))  # constant predictions: undefined
    assert math.isnan(r2_score(true[:5], np.ones(5)))


# ------------------------------------------------------------------------------------------------
# generalization prediction
# ------------------------------------------------------------------------------------------------
def test_generalization_fit_test_plot_and_checkpoint(zoo_path, tmp_path):
    dm = _ws_dm(zoo_path)
    task = GeneralizationTask(_small_nfn(mode="NP"), lr=3e-3)
    trainer = _trainer(tmp_path, epochs=2)
    trainer.fit(task, dm)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert "val/kendall_tau" in trainer.callback_metrics
    # the task copied the data module's target normalization
    assert float(task.target_loc) == pytest.approx(dm.target_mean)
    assert float(task.target_scale) == pytest.approx(dm.target_std)

    (result,) = trainer.test(task, dm)
    assert {"test/loss", "test/kendall_tau", "test/r2"} <= set(result)
    png = os.path.join(trainer.log_dir, "predicted_vs_true.png")
    with open(png, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC
    rows = np.loadtxt(os.path.join(trainer.log_dir, "test_predictions.csv"), delimiter=",",
                      skiprows=1, ndmin=2)  # fmt: skip
    assert rows.shape == (len(dm.targets["test"]), 2)
    np.testing.assert_allclose(np.sort(rows[:, 0]), np.sort(dm.targets["test"].numpy()), atol=1e-5)
    assert os.path.exists(os.path.join(trainer.log_dir, "training_curves.png"))

    # the checkpoint is plain data (weights_only) and rebuilds the same predictor
    ckpt = str(tmp_path / "pred.ckpt")
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=True)
    payload = raw[PAYLOAD_KEY]
    assert payload["task"] == "generalization" and payload["input_kind"] == "weightspace"
    assert payload["model"]["class_path"] == "metanet.nn.nfn.NFN"
    assert payload["target_loc"] == pytest.approx(dm.target_mean)
    again = GeneralizationTask.load_from_checkpoint(ckpt).eval()
    ws, _ = next(iter(dm.test_dataloader()))
    task.eval()
    with torch.no_grad():
        torch.testing.assert_close(again.predict_accuracy(ws), task.predict_accuracy(ws))


def test_a_diverged_fit_stops_with_an_error_and_keeps_earlier_checkpoints(zoo_path, tmp_path):
    """A NaN training loss ends the fit with ``TrainingDivergedError`` naming the step, instead
    of training on (and checkpointing) NaN; the checkpoint of the epoch before is untouched."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from metanet.tasks import TrainingDivergedError

    class Diverge(Callback):  # what a far too large learning rate does, made deterministic
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 1:
                with torch.no_grad():
                    next(module.model.parameters()).fill_(float("nan"))

    dm = _ws_dm(zoo_path)
    task = GeneralizationTask(_small_nfn(mode="NP"), lr=3e-3)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="e{epoch}", save_top_k=-1,
                           auto_insert_metric_name=False)  # fmt: skip
    trainer = _trainer(tmp_path, epochs=3)
    trainer.callbacks[:0] = [Diverge(), ckpt]
    steps = len(dm.train_dataloader())
    where = rf"loss is nan at step {steps + 2} \(epoch 1\);"  # the 2nd step of epoch 1
    with pytest.raises(TrainingDivergedError, match=where):
        trainer.fit(task, dm)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["e0.ckpt"]  # no checkpoint of NaN weights
    saved = torch.load(str(tmp_path / "ckpt" / "e0.ckpt"), weights_only=True)
    assert saved["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_generalization_learns_on_a_real_zoo(zoo_path, tmp_path):
    """StatNN's MLP head fits the training split: the train loss drops well below its start."""
    from metanet.nn.statnn import StatNN

    dm = _ws_dm(zoo_path, splits=(0.8, 0.2), batch_size=64)
    task = GeneralizationTask(functools.partial(StatNN, hidden=32, num_layers=1), lr=1e-2)
    trainer = _trainer(tmp_path, epochs=15)
    trainer.fit(task, dm)
    metrics = np.genfromtxt(os.path.join(trainer.log_dir, "metrics.csv"), delimiter=",",
                            names=True)  # fmt: skip
    train = metrics["trainloss"][~np.isnan(metrics["trainloss"])]
    assert train[-1] < 0.5 * train[0], train


def test_graph_model_trains_on_mixed_architectures(zoo_path, tmp_path):
    from metanet.data.datamodules import ParamGraphDataModule
    from metanet.nn.gmn import GMN

    dm = ParamGraphDataModule(zoo_path, batch_size=8, splits=(0.5, 0.25, 0.25))
    task = GeneralizationTask(functools.partial(GMN, hidden=8, num_layers=1), lr=3e-3)
    trainer = _trainer(tmp_path, epochs=1)
    trainer.fit(task, dm)
    (result,) = trainer.test(task, dm)
    assert math.isfinite(result["test/loss"])
    payload = task.payload()
    assert payload["input_kind"] == "graph" and payload["spec"] is None
    assert sorted(a["type"] for a in payload["archs"]) == ["cnn", "mlp"]


def test_task_errors_name_the_problem(zoo_path):
    from metanet.data.datamodules import ParamGraphDataModule
    from metanet.nn.gmn import GMN

    class NoKind(nn.Module):
        def __init__(self, spec):
            super().__init__()

    with pytest.raises(TaskConfigError, match="input_kind"):
        GeneralizationTask(NoKind)
    with pytest.raises(TaskConfigError, match="loss"):
        GeneralizationTask(_small_nfn(), loss="hinge")

    # a weight-space model fed graphs / a graph model fed weight spaces
    task = GeneralizationTask(_small_nfn())
    graph_dm = ParamGraphDataModule(zoo_path, batch_size=4)
    graph_dm.setup()
    with pytest.raises(TaskConfigError, match="WeightSpaceDataModule"):
        task.split(next(iter(graph_dm.train_dataloader())))
    ws_dm = _ws_dm(zoo_path)
    ws_dm.setup()
    gtask = GeneralizationTask(functools.partial(GMN, hidden=8, num_layers=1))
    with pytest.raises(TaskConfigError, match="ParamGraphDataModule"):
        gtask.split(next(iter(ws_dm.train_dataloader())))
    # a weight-space model on a zoo without a single spec
    with pytest.raises(TaskConfigError, match="graph model"):
        GeneralizationTask(_small_nfn()).build(None)

    # an output that is not one number per network
    wide = GeneralizationTask(_small_nfn(out_dim=3))
    wide.build(ws_dm.spec)
    ws, _ = next(iter(ws_dm.train_dataloader()))
    with pytest.raises(TaskConfigError, match="out_dim=1"):
        wide.predict_accuracy(ws)


def test_model_recipes_cover_factories_and_instances():
    from metanet.nn.gmn import GMN
    from metanet.nn.nfn import NFN
    from metanet.tasks._common import build_metanetwork, describe_factory

    spec = WeightSpace.from_module(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))).spec
    recipe = describe_factory(functools.partial(NFN, hidden=4, mode="NP"))
    assert recipe == {"class_path": "metanet.nn.nfn.NFN", "init_args": {"hidden": 4, "mode": "NP"}}
    model = build_metanetwork(recipe, spec)
    assert isinstance(model, NFN) and model.mode == "NP"
    assert describe_factory(NFN) == {"class_path": "metanet.nn.nfn.NFN", "init_args": {}}
    assert describe_factory(lambda spec: NFN(spec)) is None  # a lambda cannot be recorded
    graph = build_metanetwork(functools.partial(GMN, hidden=8, num_layers=1), None)
    assert isinstance(graph, GMN)


# ------------------------------------------------------------------------------------------------
# INR classification
# ------------------------------------------------------------------------------------------------
def test_inr_classification_fit_and_test(inr_zoo_path, tmp_path):
    from metanet.data.datamodules import WeightSpaceDataModule

    dm = WeightSpaceDataModule(inr_zoo_path, target="label", batch_size=8,
                               splits=(0.6, 0.2, 0.2))  # fmt: skip
    task = INRClassificationTask(_small_nfn(mode="HNP", out_dim=10), lr=3e-3)
    trainer = _trainer(tmp_path, epochs=2)
    trainer.fit(task, dm)
    (result,) = trainer.test(task, dm)
    assert 0.0 <= result["test/acc"] <= 1.0 and math.isfinite(result["test/loss"])
    assert task.payload()["task"] == "inr_classification"
    # metanet.load rebuilds the task and its metanetwork from the checkpoint alone
    import metanet

    trainer.save_checkpoint(tmp_path / "inr.ckpt")
    loaded = metanet.load(tmp_path / "inr.ckpt")
    assert type(loaded) is INRClassificationTask and not loaded.training
    ws, _ = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(ws), task.eval().logits(ws))

    wrong = INRClassificationTask(_small_nfn(out_dim=1))
    wrong.build(dm.spec)
    ws, _ = next(iter(dm.train_dataloader()))
    with pytest.raises(TaskConfigError, match="out_dim: 10"):
        wrong.logits(ws)


def test_inr_classification_trains_on_aligned_mixup_soft_labels(inr_zoo_path, tmp_path):
    from metanet.data.datamodules import WeightSpaceDataModule
    from metanet.weightspace.augment import AlignedMixUp

    dm = WeightSpaceDataModule(inr_zoo_path, target="label", batch_size=8, splits=(0.6, 0.2, 0.2),
                               transforms=AlignedMixUp(num_classes=10, max_iter=2))  # fmt: skip
    ws, y = next(iter(dm.train_dataloader()))
    assert y.shape == (len(ws), 10) and y.is_floating_point()  # mixed: soft labels
    task = INRClassificationTask(_small_nfn(mode="NP", out_dim=10), lr=3e-3)
    task.build(dm.spec)
    logits = task.logits(ws)
    loss = task.training_step((ws, y), 0)
    expected = torch.nn.functional.cross_entropy(logits, y)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(TaskConfigError, match="soft labels have 3 classes"):
        task.training_step((ws, y[:, :3]), 0)
    trainer = _trainer(tmp_path, epochs=1)
    trainer.fit(task, dm)  # validation batches keep their integer labels
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))


# ------------------------------------------------------------------------------------------------
# StatNN baseline
# ------------------------------------------------------------------------------------------------
def test_statnn_features_and_gbt(zoo_path):
    from metanet.data.zoo_store import Zoo
    from metanet.tasks.statnn import arch_agnostic_statistics, fit_gbt, run_gbt, statnn_features

    zoo = Zoo.open(zoo_path)
    mlp, cnn = zoo[_name(MLP)], zoo[_name(CNN_FLAT)]
    ws = mlp.weight_space()
    feats = statnn_features(ws)
    assert feats.shape == (len(mlp), 14 * ws.spec.num_layers)
    # statistics ignore the order of a layer's entries: hidden permutations change nothing
    perms = random_permutation(ws.spec, torch.Generator().manual_seed(0), batch=len(ws))
    np.testing.assert_allclose(statnn_features(permute(ws, perms)), feats, rtol=1e-5, atol=1e-6)
    # the arch-agnostic variant has one length for every architecture
    a = arch_agnostic_statistics(mlp.state_dict(0))
    b = arch_agnostic_statistics(cnn.state_dict(0))
    assert a.shape == b.shape and not torch.allclose(a[:7], b[:7])

    # GBT on a run-level split: trained on 4 runs, scored on 2 held-out runs
    runs = mlp.metrics["run_id"]
    train, test = runs < 4, runs >= 4
    y = mlp.metrics["test_acc"]
    scores = run_gbt((feats[train], y[train]), (feats[test], y[test]), max_iter=50)
    assert -1.0 <= scores["kendall_tau"] <= 1.0 and math.isfinite(scores["r2"])
    with pytest.raises(ValueError, match="NaN"):
        fit_gbt(np.full((4, 3), np.nan), np.zeros(4))


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------
def test_plots_write_pngs_and_reject_bad_input(tmp_path):
    from metanet.tasks.plots import predicted_vs_true, training_curves

    path = predicted_vs_true([0.1, 0.5, 0.9], [0.2, 0.4, 0.95], tmp_path / "sub" / "p.png")
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC
    with pytest.raises(ValueError, match="equal-length"):
        predicted_vs_true([0.1, 0.2], [0.3], tmp_path / "bad.png")
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train/loss,val/loss\n0,1,1.0,\n0,1,,0.9\n1,2,0.5,\n1,2,,0.7\n")
    with open(training_curves(csv, tmp_path / "curves.png"), "rb") as fh:
        assert fh.read(8) == PNG_MAGIC


# ------------------------------------------------------------------------------------------------
# LightningCLI: configs and a run folder
# ------------------------------------------------------------------------------------------------
def _check_init_args(class_path: str, init_args: dict, where: str) -> type:
    import inspect

    from metanet.tasks._common import import_object

    cls = import_object(class_path)
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(init_args) - set(params))
    assert not unknown, f"{where}: {class_path} has no arguments {unknown}"
    return cls


def test_every_config_names_real_classes_and_arguments():
    import yaml

    from metanet.tasks import MetanetTask

    assert len(CONFIGS) >= 14, CONFIGS
    for path in CONFIGS:
        with open(path) as fh:
            cfg = yaml.safe_load(fh)
        task = cfg["model"]
        init = dict(task["init_args"])
        model = init.pop("model")
        assert issubclass(_check_init_args(task["class_path"], init, path), MetanetTask)
        net = _check_init_args(model["class_path"], model.get("init_args", {}), path)
        assert net.input_kind in ("weightspace", "graph"), path
        data_cls = cfg["data"]["class_path"].rsplit(".", 1)[1]
        expected = "WeightSpace" if net.input_kind == "weightspace" else "ParamGraph"
        assert data_cls.startswith(expected), f"{path}: {net.__name__} needs a {expected} module"
        _check_init_args(cfg["data"]["class_path"], cfg["data"]["init_args"], path)
        assert cfg["trainer"]["default_root_dir"].startswith("runs/"), path


@pytest.mark.parametrize("name", ["predict_gen/statnn", "predict_gen/gmn", "inr/nfn_hnp"])
def test_print_config(name, capsys):
    from metanet.cli import main

    path = os.path.join(ROOT, "configs", f"{name}.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", path, "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: metanet.tasks." in out
    # the metanetwork is printed under a path that imports the same class as the config's
    # (jsonargparse may shorten it to the top-level alias, e.g. metanet.StatNN)
    import importlib

    import yaml

    def cls(path: str) -> type:
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)

    printed = yaml.safe_load(out)["model"]["init_args"]["model"]["class_path"]
    with open(path) as f:
        wanted = yaml.safe_load(f)["model"]["init_args"]["model"]["class_path"]
    assert printed.startswith("metanet.") and cls(printed) is cls(wanted)


def test_cli_fit_then_test_writes_run_folder(zoo_path, tmp_path, monkeypatch):
    from metanet.cli import main

    monkeypatch.chdir(tmp_path)
    config = os.path.join(ROOT, "configs", "predict_gen", "statnn.yaml")
    data = ["--data.init_args.zoo", zoo_path, "--data.init_args.group", _name(MLP),
            "--data.init_args.splits", "[0.5, 0.25, 0.25]", "--data.init_args.batch_size", "16",
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    main(["fit", "--config", config, *data, "--trainer.max_epochs", "2",
          "--model.init_args.model.init_args.hidden", "16"])  # fmt: skip
    run = tmp_path / "runs" / "predict_gen" / "statnn"
    best = run / "checkpoints" / "best.ckpt"
    assert best.exists() and (run / "checkpoints" / "last.ckpt").exists()
    assert list(run.glob("logs/version_0/metrics.csv"))
    main(["test", "--config", config, *data, "--model.init_args.model.init_args.hidden", "16",
          "--ckpt_path", str(best)])  # fmt: skip
    pngs = list(run.glob("logs/version_*/predicted_vs_true.png"))
    assert len(pngs) == 1
    # each kept checkpoint has a pickle-free copy that predicts exactly what the .ckpt does
    from metanet.serialization import is_safetensors
    from metanet.tasks.predict_cli import load_predictor

    copies = sorted(p.name for p in (run / "checkpoints").glob("*.safetensors"))
    assert copies == ["best.safetensors", "last.safetensors"]
    assert is_safetensors(run / "checkpoints" / "best.safetensors")
    a, b = load_predictor(str(best)), load_predictor(str(run / "checkpoints" / "best.safetensors"))
    assert b.payload_loaded == a.payload_loaded
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    # a --ckpt_path whose pickle would run code is refused, and the code does not run
    import builtins

    class Hostile:
        def __reduce__(self):
            return (builtins.exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').close()",))

    hostile = tmp_path / "hostile.ckpt"
    torch.save({**torch.load(best, weights_only=True), "hyper_parameters": {"x": Hostile()}},
               hostile)  # fmt: skip
    code = main(["test", "--config", config, *data, "--ckpt_path", str(hostile)])
    assert code == 2 and not (tmp_path / "pwned").exists()


def test_graph_factory_gets_the_data_edge_width_unless_set() -> None:
    from metanet.nn.gmn import GMN
    from metanet.tasks._common import build_metanetwork

    # a CLI-parsed factory carries its defaults (edge_in_dim=None): the data's width wins
    model = build_metanetwork(functools.partial(GMN, hidden=8, edge_in_dim=None), None,
                              {"edge_in_dim": 25})  # fmt: skip
    assert model.edges.edge_in_dim == 25
    model = build_metanetwork(functools.partial(GMN, hidden=8, edge_in_dim=16), None,
                              {"edge_in_dim": 25})  # fmt: skip
    assert model.edges.edge_in_dim == 16
