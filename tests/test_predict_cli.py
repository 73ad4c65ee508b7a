"""``metanet predict-accuracy``: ranking ordinary checkpoints, and clear errors for bad input."""

from __future__ import annotations

import functools
import os
import re

import lightning as L
import pytest
import torch
from tiny_zoo import CNN_FLAT, MLP, build_tiny_zoo, one_thread  # noqa: I001
from torch import nn

from metanet.tasks import GeneralizationTask, INRClassificationTask
from metanet.tasks.predict_cli import load_predictor, main

ROW = re.compile(r"^\s*(\d+)\s+([-0-9.]+)\s+(\S+)\s*$")


def _name(arch: dict) -> str:
    from metanet.zoo.architectures import arch_name

    return arch_name(arch)


def _fit(task, dm, folder) -> str:
    trainer = L.Trainer(max_epochs=2, default_root_dir=str(folder), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(task, dm)
    path = os.path.join(str(folder), "predictor.ckpt")
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from metanet.data.zoo_store import Zoo

    return Zoo.open(build_tiny_zoo(str(tmp_path_factory.getbasetemp() / "tiny_zoo.h5")))


@pytest.fixture(scope="module")
def ws_predictor(zoo, tmp_path_factory) -> tuple[str, GeneralizationTask]:
    """An NFN-HNP accuracy predictor trained on the tiny zoo's MLPs (with input normalization)."""
    from metanet.data.datamodules import WeightSpaceDataModule
    from metanet.nn.nfn import NFN

    with one_thread():
        dm = WeightSpaceDataModule(zoo.path, group=_name(MLP), batch_size=8, splits=(0.7, 0.3),
                                   normalize_weights=True)  # fmt: skip
        task = GeneralizationTask(functools.partial(NFN, hidden=8, num_layers=2, head_hidden=16))
        path = _fit(task, dm, tmp_path_factory.mktemp("ws_predictor"))
    return path, task.eval()


@pytest.fixture(scope="module")
def nets(zoo, tmp_path_factory):
    """Network files in every supported format, and the records they come from."""
    folder = tmp_path_factory.mktemp("nets")
    g = zoo[_name(MLP)]
    files = {}
    for i in (3, 7, 11):
        files[f"sd{i}"] = str(folder / f"mlp_{i}.pt")
        torch.save(g.state_dict(i), files[f"sd{i}"])
    files["module"] = str(folder / "mlp_module.pt")
    torch.save(g.module(15), files["module"])
    files["lightning"] = str(folder / "mlp_lightning.ckpt")
    torch.save({"state_dict": {f"net.{k}": v for k, v in g.state_dict(19).items()},
                "epoch": 3, "pytorch-lightning_version": "2.6.6"}, files["lightning"])  # fmt: skip

    class Named(nn.Module):  # same shapes, other layer names
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(64, 16), nn.Linear(16, 12), nn.Linear(12, 10)

        def forward(self, x):
            return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    named = Named()
    for (_, p), (_, v) in zip(named.state_dict().items(), g.state_dict(21).items()):
        p.copy_(v)
    files["renamed"] = str(folder / "renamed.pt")
    torch.save(named.state_dict(), files["renamed"])
    files["cnn"] = str(folder / "cnn.pt")
    torch.save(zoo[_name(CNN_FLAT)].module(5), files["cnn"])
    files["cnn_sd"] = str(folder / "cnn_sd.pt")
    torch.save(zoo[_name(CNN_FLAT)].state_dict(9), files["cnn_sd"])
    bad = g.state_dict(2)
    bad["2.weight"][0, 0] = float("nan")
    files["nan"] = str(folder / "nan.pt")
    torch.save(bad, files["nan"])
    files["bn"] = str(folder / "bn.pt")
    torch.save(nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 12),
                             nn.ReLU(), nn.Linear(12, 10)), files["bn"])  # fmt: skip
    files["garbage"] = str(folder / "garbage.pt")
    with open(files["garbage"], "wb") as fh:
        fh.write(b"not a torch file at all")
    files["list"] = str(folder / "list.pt")
    torch.save([1, 2, 3], files["list"])
    return files, g


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _rows(out: str) -> list[tuple[int, float, str]]:
    rows = []
    for line in out.splitlines()[1:]:
        m = ROW.match(line)
        assert m, f"unparsable output line {line!r}"
        rows.append((int(m.group(1)), float(m.group(2)), m.group(3)))
    return rows


def test_ranks_every_checkpoint_format(ws_predictor, nets, capsys):
    path, task = ws_predictor
    files, group = nets
    keys = ["sd3", "sd7", "sd11", "module", "lightning", "renamed"]
    code, out, err = _run(["--predictor", path, *(files[k] for k in keys)], capsys)
    assert code == 2 and "mlp_module.pt holds pickled Python objects" in err  # needs trust
    assert "--trust-pickle" in err and err.count("\n") == 1
    code, out, err = _run(["--predictor", path, "--trust-pickle", *(files[k] for k in keys)],
                          capsys)  # fmt: skip
    assert code == 0, err
    rows = _rows(out)
    assert [r[0] for r in rows] == list(range(1, len(keys) + 1))
    values = [r[1] for r in rows]
    assert values == sorted(values, reverse=True)  # best first
    # the printed numbers are the predictor's own predictions on the normalized weight space
    from metanet.tasks._common import apply_weight_normalization

    records = {"sd3": 3, "sd7": 7, "sd11": 11, "module": 15, "lightning": 19, "renamed": 21}
    ws = apply_weight_normalization(group.weight_space([records[k] for k in keys]),
                                    task.weight_normalization)  # fmt: skip
    with torch.no_grad():
        expected = task.predict_accuracy(ws).clamp(0.0, 1.0).tolist()  # accuracies: clipped
    printed = {r[2]: r[1] for r in rows}
    for k, e in zip(keys, expected):
        assert printed[files[k]] == pytest.approx(e, abs=6e-5), k


def test_json_output(ws_predictor, nets, capsys):
    import json

    files, _ = nets
    code, out, _ = _run(["--predictor", ws_predictor[0], files["sd3"], files["sd7"], "--json"],
                        capsys)  # fmt: skip
    assert code == 0
    rows = json.loads(out)
    assert [r["rank"] for r in rows] == [1, 2] and "predicted_test_acc" in rows[0]


@pytest.mark.parametrize(
    ("key", "pattern"),
    [
        ("cnn", "does not fit the predictor's architecture family"),
        ("nan", "'2.weight' contains NaN"),
        ("bn", "BatchNorm1d"),
        ("garbage", "not a readable PyTorch file"),
        ("list", "holds a list"),
        ("missing", "no such file"),
    ],
)
def test_bad_networks_give_clear_errors(ws_predictor, nets, capsys, key, pattern):
    files, _ = nets
    target = files.get(key, "/nonexistent/model.pt")
    trust = ["--trust-pickle"] if key in ("cnn", "bn") else []  # pickled modules
    code, out, err = _run(["--predictor", ws_predictor[0], *trust, files["sd3"], target], capsys)
    assert code == 2
    assert err.startswith("error: ") and re.search(pattern, err), err
    assert "Traceback" not in err and out == ""


def test_bad_predictors_give_clear_errors(ws_predictor, nets, zoo, tmp_path, capsys):
    from metanet.data.datamodules import WeightSpaceDataModule
    from metanet.nn.nfn import NFN

    files, _ = nets
    # a checkpoint of another task
    dm = WeightSpaceDataModule(zoo.path, group=_name(MLP), target="epoch", task="classification",
                               batch_size=8, splits=(0.7, 0.3))  # fmt: skip
    dm.setup()
    inr = INRClassificationTask(functools.partial(NFN, hidden=4, num_layers=1, head_hidden=8,
                                                  out_dim=25), num_classes=25)  # fmt: skip
    other = _fit(inr, dm, tmp_path)
    cases = [
        (other, "'inr_classification' task"),
        (files["sd3"], "without metanet's predictor metadata"),
        (files["garbage"], "not a readable PyTorch file"),
        (str(tmp_path / "nope.ckpt"), "no such file"),
    ]
    for predictor, pattern in cases:
        code, _, err = _run(["--predictor", predictor, files["sd3"]], capsys)
        assert code == 2 and re.search(pattern, err), (predictor, err)
        assert "Traceback" not in err
    # a network file that is itself a predictor
    code, _, err = _run(["--predictor", ws_predictor[0], ws_predictor[0]], capsys)
    assert code == 2 and "not a network" in err
    # usage errors
    code, _, err = _run(["model.pt"], capsys)
    assert code == 2 and "--predictor" in err


def test_graph_predictor_reads_any_architecture(zoo, nets, tmp_path, capsys):
    import json

    from metanet.data.datamodules import ParamGraphDataModule
    from metanet.nn.ngt import NGT

    files, _ = nets
    dm = ParamGraphDataModule(zoo.path, batch_size=8, splits=(0.7, 0.3))
    task = GeneralizationTask(functools.partial(NGT, hidden=8, edge_dim=8, num_layers=1, heads=2))
    path = _fit(task, dm, tmp_path)
    code, out, err = _run(["--predictor", path, "--trust-pickle", files["sd3"], files["cnn"],
                           files["cnn_sd"], files["module"]], capsys)  # fmt: skip
    assert code == 0, err
    assert len(_rows(out)) == 4
    # a bare state_dict of an architecture it never saw needs --arch
    other = nn.Sequential(nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 10))
    sd_path = str(tmp_path / "other.pt")
    torch.save(other.state_dict(), sd_path)
    code, _, err = _run(["--predictor", path, sd_path], capsys)
    assert code == 2 and "--arch" in err
    arch = json.dumps({"type": "mlp", "in": 64, "widths": [20], "out": 10})
    code, out, err = _run(["--predictor", path, sd_path, "--arch", arch], capsys)
    assert code == 0 and len(_rows(out)) == 1, err
    # the whole module works without --arch; a norm layer is fine for graph predictors
    code, out, err = _run(["--predictor", path, "--trust-pickle", files["bn"]], capsys)
    assert code == 0, err
    code, _, err = _run(["--predictor", path, files["nan"]], capsys)
    assert code == 2 and "NaN" in err


def test_weightspace_errors_name_the_layer(ws_predictor, tmp_path, capsys):
    """A state_dict with the right shapes but an extra norm parameter is refused by name."""
    sd = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                       nn.Linear(12, 10)).state_dict()  # fmt: skip
    sd["3.weight"] = torch.ones(12)
    path = str(tmp_path / "extra.pt")
    torch.save(sd, path)
    code, _, err = _run(["--predictor", ws_predictor[0], path], capsys)
    assert code == 2 and "'3.weight'" in err and "graph predictor" in err


def test_data_flag_measures_true_accuracy_beside_the_prediction(ws_predictor, nets, capsys):
    files, group = nets
    keys, records = ["sd3", "sd7", "sd11"], [3, 7, 11]
    code, out, err = _run(["--predictor", ws_predictor[0], "--data", "digits", "--json",
                           *(files[k] for k in keys)], capsys)  # fmt: skip
    assert code == 0, err
    import json

    rows = {r["path"]: r for r in json.loads(out)}
    for k, i in zip(keys, records):  # the zoo measured the same accuracy on the same test split
        assert rows[files[k]]["true_test_acc"] == pytest.approx(group.metrics["test_acc"][i],
                                                                abs=1e-6)  # fmt: skip
    code, out, _ = _run(["--predictor", ws_predictor[0], "--data", "digits",
                         *(files[k] for k in keys)], capsys)  # fmt: skip
    assert code == 0 and "true test_acc" in out and "Kendall's tau" in out
    code, _, err = _run(["--predictor", ws_predictor[0], "--data", '{"provider": "nope"}',
                         files["sd3"]], capsys)  # fmt: skip
    assert code == 2 and err.startswith("error: --data") and "nope" in err


def test_true_accuracy_streams_test_data_from_disk(ws_predictor, nets, capsys, tmp_path,
                                                   monkeypatch):  # fmt: skip
    # the digits test split as .npy files read as a lazy array in chunks of 37 samples: the
    # same accuracies as the zoo measured in memory
    import json

    import numpy as np

    from metanet.data.providers import tensors
    from metanet.data.tasks import LazyArray, load_task_data
    from metanet.zoo import data as zoo_data

    task = load_task_data("digits")
    cfg = {"provider": "tensors"}
    for split in ("train", "test"):
        x, y = getattr(task, split)
        np.save(tmp_path / f"x_{split}.npy", x.numpy())
        np.save(tmp_path / f"y_{split}.npy", y.numpy())
        cfg[split] = {"x": str(tmp_path / f"x_{split}.npy"), "y": str(tmp_path / f"y_{split}.npy")}
    monkeypatch.setattr(tensors, "_fits", lambda nbytes: False)  # memory-map every file
    monkeypatch.setattr(zoo_data, "fits_in_memory", lambda x: not isinstance(x, LazyArray))
    monkeypatch.setattr(zoo_data, "stream_rows", lambda x: 37)
    assert isinstance(load_task_data(cfg).test.x, LazyArray)
    files, group = nets
    keys, records = ["sd3", "sd7"], [3, 7]
    code, out, err = _run(["--predictor", ws_predictor[0], "--data", json.dumps(cfg), "--json",
                           *(files[k] for k in keys)], capsys)  # fmt: skip
    assert code == 0, err
    rows = {r["path"]: r for r in json.loads(out)}
    for k, i in zip(keys, records):
        assert rows[files[k]]["true_test_acc"] == pytest.approx(group.metrics["test_acc"][i],
                                                                abs=1e-6)  # fmt: skip


def test_metanet_load_reads_a_predictor_and_a_ghn(ws_predictor, zoo, tmp_path) -> None:
    """``metanet.load`` gives the predictor ``load_predictor`` gives (same predictions) and a
    GHN saved by ``GHN.save``; a pickled module is refused without ``trust_pickle``."""
    import metanet
    from metanet.checkpoints import CheckpointError
    from metanet.hyper import GHN

    path, task = ws_predictor
    loaded = metanet.load(path)
    assert isinstance(loaded, GeneralizationTask) and not loaded.training
    ws = zoo[_name(MLP)].weight_space([0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ws), load_predictor(path)(ws))
    torch.manual_seed(0)
    ghn = GHN(hidden=8, layers=1)
    ghn.save(tmp_path / "ghn.safetensors")
    back = metanet.load(tmp_path / "ghn.safetensors")
    assert isinstance(back, GHN)
    assert all(torch.equal(a, b) for a, b in zip(ghn.state_dict().values(),
                                                 back.state_dict().values()))  # fmt: skip
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="trust"):
        metanet.load(tmp_path / "module.pt")
