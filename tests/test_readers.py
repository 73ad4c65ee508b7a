"""Readers of public zoo layouts, on small files written here in exactly those layouts."""

import csv
import gzip
import os

import numpy as np
import pytest
import torch
from torch import nn

from metanet.data.readers import (
    ZooReadError,
    read_checkpoint_folder,
    read_small_cnn_zoo,
    write_zoo,
)
from metanet.data.zoo_store import Zoo
from metanet.zoo.architectures import build_module

# --------------------------------------------------------------------------------------------
# Small CNN Zoo (Unterthiner et al. 2020): weights.npy + metrics.csv.gz + layout.csv
# --------------------------------------------------------------------------------------------
C = 4  # hidden channels (the real zoo has 16)
TF_VARS = [  # TF variable order of the zoo's flat vectors: per layer bias then kernel
    ("sequential/conv2d/bias:0", (C,)),
    ("sequential/conv2d/kernel:0", (3, 3, 1, C)),
    ("sequential/conv2d_1/bias:0", (C,)),
    ("sequential/conv2d_1/kernel:0", (3, 3, C, C)),
    ("sequential/conv2d_2/bias:0", (C,)),
    ("sequential/conv2d_2/kernel:0", (3, 3, C, C)),
    ("sequential/dense/bias:0", (10,)),
    ("sequential/dense/kernel:0", (C, 10)),
]
RUNS = [("relu", "mnist"), ("tanh", "mnist"), ("sigmoid", "mnist")]
STEPS = [0, 20, 86]


def _write_cnn_zoo(folder, gz=True, rng=None):
    """A zoo in the exact public layout; returns the flat TF weight rows."""
    rng = rng or np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    sizes = [int(np.prod(s)) for _, s in TF_VARS]
    rows = rng.normal(0, 0.4, size=(len(RUNS) * len(STEPS), sum(sizes))).astype(np.float32)
    np.save(os.path.join(folder, "weights.npy"), rows)
    with open(os.path.join(folder, "layout.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["varname", "start_idx", "end_idx", "size", "shape"])
        start = 0
        for (name, shape), n in zip(TF_VARS, sizes):
            w.writerow([name, start, start + n, n, str(shape)])
            start += n
    header = ["", "config.activation", "config.dataset", "config.dropout",
              "config.learning_rate", "config.random_seed", "config.w_init", "modeldir", "step",
              "test_accuracy", "test_loss", "train_accuracy", "train_loss"]  # fmt: skip
    body = []
    for r, (act, data) in enumerate(RUNS):
        for step in STEPS:
            acc = 0.1 + 0.01 * step + r * 0.05
            ckpt, run = f"/zoo/run{r}/permanent_ckpt-{step}", f"/zoo/run{r}"
            losses = [acc, 2 - acc, acc + 0.01, 1.9 - acc]
            body.append([ckpt, act, data, 0.1, 0.003, 42, "he_normal", run, step, *losses])
    text_rows = [header] + body
    path = os.path.join(folder, "metrics.csv.gz" if gz else "metrics.csv")
    opener = gzip.open if gz else open
    with opener(path, "wt", newline="") as fh:
        csv.writer(fh).writerows(text_rows)
    return rows


def _tf_forward(flat: np.ndarray, x_nhwc: np.ndarray, act: str) -> np.ndarray:
    """Independent NHWC forward pass of one flat TF vector (valid conv, stride 2, GAP, dense)."""
    params, start = {}, 0
    for name, shape in TF_VARS:
        n = int(np.prod(shape))
        params[name] = flat[start : start + n].reshape(shape).astype(np.float64)
        start += n
    f = {"relu": lambda v: np.maximum(v, 0), "tanh": np.tanh,
         "sigmoid": lambda v: 1 / (1 + np.exp(-v))}[act]  # fmt: skip
    h = x_nhwc.astype(np.float64)
    for layer in ("conv2d", "conv2d_1", "conv2d_2"):
        k, b = params[f"sequential/{layer}/kernel:0"], params[f"sequential/{layer}/bias:0"]
        oh, ow = (h.shape[1] - 3) // 2 + 1, (h.shape[2] - 3) // 2 + 1
        out = np.zeros((h.shape[0], oh, ow, k.shape[3]))
        for i in range(oh):
            for j in range(ow):
                patch = h[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, :]
                out[:, i, j, :] = np.einsum("nhwc,hwco->no", patch, k)
        h = f(out + b)
    g = h.mean(axis=(1, 2))
    return g @ params["sequential/dense/kernel:0"] + params["sequential/dense/bias:0"]


def test_small_cnn_zoo_networks_compute_what_the_tf_layout_says(tmp_path):
    rows = _write_cnn_zoo(tmp_path / "zoo")
    zoo = read_small_cnn_zoo(tmp_path / "zoo")
    (name,) = zoo.architectures
    group = zoo[name]
    assert name == "small-cnn-zoo-mnist" and len(group) == 9 and group.input_shape == (1, 28, 28)
    x = np.random.default_rng(1).uniform(-1, 1, size=(3, 28, 28, 1)).astype(np.float32)
    x_torch = torch.from_numpy(x).permute(0, 3, 1, 2)
    for i in (0, 4, 8):  # relu, tanh, sigmoid runs
        act = group.hparams["activation"][i]
        with torch.no_grad():
            out = group.module(i)(x_torch).double().numpy()
        np.testing.assert_allclose(out, _tf_forward(rows[i], x, act), atol=1e-5)
    # metrics renamed to metanet's, runs from modeldir, config.* as hyperparameters
    np.testing.assert_array_equal(group.metrics["epoch"], STEPS * 3)
    np.testing.assert_array_equal(group.metrics["run_id"], np.repeat([0, 1, 2], 3))
    assert group.metrics["test_acc"][2] == pytest.approx(0.96)
    assert group.hparams["learning_rate"][0] == pytest.approx(0.003)
    assert group.metrics["seed"][0] == 42
    # the weight space is the torch layout of the same numbers
    ws = group.weight_space([5, 1])
    assert ws.spec.hidden_sizes == (C, C, C)
    torch.testing.assert_close(ws.weights[0][1], group.state_dict(1)["0.weight"])
    assert tuple(ws.weights[0].shape) == (2, C, 1, 3, 3)


def test_small_cnn_zoo_step_selection_and_plain_csv(tmp_path):
    _write_cnn_zoo(tmp_path / "zoo", gz=False)
    group = read_small_cnn_zoo(tmp_path / "zoo", steps=86).groups()[0]
    assert len(group) == 3 and set(group.metrics["epoch"]) == {86}
    assert list(group.hparams["activation"]) == ["relu", "tanh", "sigmoid"]
    with pytest.raises(ZooReadError, match="no checkpoint has step"):
        read_small_cnn_zoo(tmp_path / "zoo", steps=5)


def test_small_cnn_zoo_bad_files_name_the_file(tmp_path):
    folder = tmp_path / "zoo"
    _write_cnn_zoo(folder)
    os.remove(folder / "layout.csv")
    with pytest.raises(ZooReadError, match="layout.csv"):
        read_small_cnn_zoo(folder)
    _write_cnn_zoo(folder)
    np.save(folder / "weights.npy", np.zeros((4, 5), dtype=np.float32))
    with pytest.raises(ZooReadError, match="layout.csv.*outside|covers"):
        read_small_cnn_zoo(folder)
    _write_cnn_zoo(folder)
    (folder / "weights.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ZooReadError, match="weights.npy"):
        read_small_cnn_zoo(folder)
    _write_cnn_zoo(folder)
    lines = gzip.open(folder / "metrics.csv.gz", "rt").read().splitlines()
    with gzip.open(folder / "metrics.csv.gz", "wt") as fh:
        fh.write("\n".join(lines[:-2]) + "\n")
    with pytest.raises(ZooReadError, match=r"metrics.csv.gz has 7 rows .* 9 networks"):
        read_small_cnn_zoo(folder)


# --------------------------------------------------------------------------------------------
# folder of torch checkpoints + metrics CSV
# --------------------------------------------------------------------------------------------
ARCH = {"type": "mlp", "in": 64, "widths": [8, 6], "out": 10, "activation": "relu"}


def _write_ckpt_folder(folder, n=4, pickled_last=False):
    os.makedirs(folder, exist_ok=True)
    nets = []
    with open(folder / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["filename", "test_acc", "epoch", "run_id", "optimizer"])
        for i in range(n):
            torch.manual_seed(i)
            net = build_module(ARCH)
            nets.append(net)
            fname = f"net{i}.pt"
            if pickled_last and i == n - 1:
                torch.save(net, folder / fname)
            elif i == 1:  # a Lightning-style checkpoint dict
                torch.save({"state_dict": net.state_dict(), "epoch": 3}, folder / fname)
            else:
                torch.save(net.state_dict(), folder / fname)
            w.writerow([fname, 0.5 + 0.1 * i, i % 2, i // 2, "adam" if i % 2 else "sgd"])
    return nets


def test_checkpoint_folder_round_trips_networks_and_metrics(tmp_path):
    nets = _write_ckpt_folder(tmp_path / "ckpts")
    zoo = read_checkpoint_folder(tmp_path / "ckpts", arch=ARCH)
    (group,) = zoo.groups()
    assert len(group) == 4 and group.spec is not None
    np.testing.assert_allclose(group.metrics["test_acc"], [0.5, 0.6, 0.7, 0.8])
    np.testing.assert_array_equal(group.metrics["run_id"], [0, 0, 1, 1])
    assert list(group.hparams["optimizer"]) == ["sgd", "adam", "sgd", "adam"]
    x = torch.randn(3, 64)
    for i, net in enumerate(nets):
        torch.testing.assert_close(group.module(i)(x), net(x), atol=0, rtol=0)
    ws = group.weight_space([3, 0])
    torch.testing.assert_close(ws.weights[2][0], nets[3][4].weight.detach())
    # conversion to the HDF5 store reads back the same records
    write_zoo(zoo, tmp_path / "imported.h5")
    with Zoo.open(tmp_path / "imported.h5") as h5:
        g = h5[h5.architectures[0]]
        assert len(g) == 4
        torch.testing.assert_close(g.weight_space([3, 0]).weights[2], ws.weights[2])
        np.testing.assert_allclose(g.metrics["test_acc"], [0.5, 0.6, 0.7, 0.8])


def test_checkpoint_folder_without_arch_infers_the_spec_and_groups_by_shape(tmp_path):
    folder = tmp_path / "ckpts"
    _write_ckpt_folder(folder, n=3)
    other = build_module({**ARCH, "widths": [5]})
    torch.save(other.state_dict(), folder / "other.pt")
    with open(folder / "metrics.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(["other.pt", 0.3, 0, 7, "sgd"])
    zoo = read_checkpoint_folder(folder)
    assert sorted(len(g) for g in zoo) == [1, 3]
    small = next(g for g in zoo if len(g) == 1)
    assert small.spec.hidden_sizes == (5,) and small.metrics["run_id"][0] == 7
    with pytest.raises(ZooReadError, match="module factory"):
        small.module(0)
    with pytest.raises(ZooReadError, match="arch dict"):
        write_zoo(zoo, tmp_path / "x.h5")
    assert not os.path.exists(tmp_path / "x.h5")


def test_checkpoint_folder_pickled_modules_need_trust(tmp_path):
    nets = _write_ckpt_folder(tmp_path / "ckpts", n=2, pickled_last=True)
    with pytest.raises(ZooReadError, match=r"net1\.pt.*trust_pickle"):
        read_checkpoint_folder(tmp_path / "ckpts")
    group = read_checkpoint_folder(tmp_path / "ckpts", trust_pickle=True).groups()[0]
    x = torch.randn(2, 64)
    # the pickled module serves as the template for every record
    torch.testing.assert_close(group.module(0)(x), nets[0](x), atol=0, rtol=0)
    torch.testing.assert_close(group.module(1)(x), nets[1](x), atol=0, rtol=0)


def test_checkpoint_folder_bad_files_name_the_file(tmp_path):
    folder = tmp_path / "ckpts"
    _write_ckpt_folder(folder, n=3)
    (folder / "net2.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ZooReadError, match=r"net2\.pt is not a readable PyTorch file"):
        read_checkpoint_folder(folder)
    torch.save([1, 2, 3], folder / "net2.pt")
    with pytest.raises(ZooReadError, match=r"net2\.pt: holds a list"):
        read_checkpoint_folder(folder)
    os.remove(folder / "net2.pt")
    with pytest.raises(ZooReadError, match=r"net2\.pt: listed in the metrics CSV but not found"):
        read_checkpoint_folder(folder)
    with pytest.raises(ZooReadError, match="no 'file' column"):
        read_checkpoint_folder(folder, filename_column="file")
    torch.save(nn.Linear(3, 2).state_dict(), folder / "net2.pt")
    with pytest.raises(ZooReadError, match=r"keys do not fit"):
        read_checkpoint_folder(folder, arch=ARCH)


def test_small_cnn_zoo_folder_feeds_the_weightspace_datamodule(tmp_path):
    from metanet.data.datamodules import WeightSpaceDataModule

    _write_cnn_zoo(tmp_path / "zoo")
    dm = WeightSpaceDataModule(str(tmp_path / "zoo"), splits=(2 / 3, 1 / 3), batch_size=4)
    dm.setup()
    assert len(dm.split_run_ids("train")) == 2 and len(dm.split_run_ids("val")) == 1
    ws, y = next(iter(dm.val_dataloader()))
    assert len(ws) == 3 and ws.spec.hidden_sizes == (C, C, C)  # one run = 3 checkpoints


# --------------------------------------------------------------------------------------------
# one protocol for every zoo
# --------------------------------------------------------------------------------------------
def test_every_reader_and_the_hdf5_zoo_satisfy_the_zoo_protocol(tmp_path):
    from metanet.data import ZooGroupLike, ZooLike
    from metanet.data.datamodules import open_zoo

    _write_cnn_zoo(tmp_path / "cnn")
    nets = _write_ckpt_folder(tmp_path / "ckpts", n=3)
    ckpt_zoo = read_checkpoint_folder(tmp_path / "ckpts", arch=ARCH)
    write_zoo(ckpt_zoo, tmp_path / "zoo.h5")
    with Zoo.open(tmp_path / "zoo.h5") as h5:
        zoos = {
            "small_cnn_zoo": read_small_cnn_zoo(tmp_path / "cnn"),
            "checkpoint_folder": ckpt_zoo,
            "hdf5": h5,
            "one_group": open_zoo(ckpt_zoo.groups()[0]),
        }
        for what, zoo in zoos.items():
            assert isinstance(zoo, ZooLike), what
            assert list(zoo.iter_records())[:1] == [(zoo.architectures[0], 0)], what
            for group in zoo:
                assert isinstance(group, ZooGroupLike), what
                assert len(group) == len(group.metrics["run_id"]), what
        assert not isinstance(object(), ZooLike) and not isinstance(ckpt_zoo, ZooGroupLike)
        # the HDF5 copy and the folder it was written from read the same networks
        x = torch.randn(2, 64)
        g = h5[h5.architectures[0]]
        for i, net in enumerate(nets):
            torch.testing.assert_close(g.module(i)(x), net(x), atol=0, rtol=0)
        # write_zoo takes any ZooLike: the HDF5 zoo itself is re-written record for record
        write_zoo(h5, tmp_path / "again.h5")
        with Zoo.open(tmp_path / "again.h5") as again:
            assert again.architectures == h5.architectures
            copy = again[again.architectures[0]]
            for key, value in g.params().items():
                torch.testing.assert_close(copy.params()[key], value, atol=0, rtol=0)
            np.testing.assert_array_equal(copy.metrics["test_acc"], g.metrics["test_acc"])
