"""A corpus of hostile and broken files against every reader and command-line entry point.

Each case must end in a one-line error that names the file and the fault, write nothing, and never
run code from the file: a malicious pickle in the corpus would create a sentinel file, and every
case checks that the sentinel does not exist afterwards.
"""

from __future__ import annotations

import builtins
import os
import pickle
import re
from collections.abc import Callable

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from metanet.tasks._common import PAYLOAD_KEY

SENTINEL = "pwned"


class _Hostile:
    """Unpickling this creates the sentinel file (as a shell command in a real attack would)."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (builtins.exec, (f"open({self.sentinel!r}, 'w').close()",))


def _mlp_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                        nn.Linear(12, 10))  # fmt: skip
    return net.state_dict()


def _torch_corpus(folder: str) -> dict[str, tuple[str, str]]:
    """Files that claim to be checkpoints: kind -> (path, regex the error must match)."""
    sentinel = os.path.join(os.path.dirname(folder), SENTINEL)
    out: dict[str, tuple[str, str]] = {}

    def put(kind: str, name: str, pattern: str) -> str:
        path = os.path.join(folder, name)
        out[kind] = (path, pattern)
        return path

    torch.save({"0.weight": torch.ones(2), "x": _Hostile(sentinel)},
               put("pickle-rce", "rce.pt", "pickled Python objects.*--trust-pickle"))  # fmt: skip
    refused = "pickled Python objects.*--trust-pickle"
    with open(put("raw-pickle-rce", "rce.pkl", refused), "wb") as f:
        pickle.dump(_Hostile(sentinel), f)
    torch.save(nn.Linear(64, 10), put("pickled-module", "module.pt", "pickled Python objects"))
    open(put("empty", "empty.pt", "empty"), "wb").close()
    good = _mlp_state()
    blob = os.path.join(folder, "good.bin")
    torch.save(good, blob)
    data = open(blob, "rb").read()
    os.remove(blob)
    with open(put("truncated", "truncated.pt", "not a readable"), "wb") as f:
        f.write(data[: len(data) // 2])
    with open(put("garbage", "garbage.ckpt", "not a readable"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(500))
    ints = {k: (v * 100).to(torch.int64) for k, v in good.items()}
    torch.save(ints, put("wrong-dtype", "int_weights.pt", "dtype|not a (float|tensor)|integer"))
    not_tensors = "not (a )?tensors?|is a str|holds a|not a .*checkpoint|without"
    torch.save({"0.weight": "a string", "0.bias": 3}, put("not-tensors", "strings.pt", not_tensors))
    nan = {k: v.clone() for k, v in good.items()}
    nan["2.weight"][0, 0] = float("nan")
    nan["0.bias"][1] = float("inf")
    torch.save(nan, put("nan", "nan.pt", "NaN"))
    header = b'{"w":{"dtype":"F32","shape":[1000000000000],"data_offsets":[0,4000000000000]}}'
    with open(put("huge-declared", "huge.safetensors", "not a readable safetensors"), "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    torch.save({PAYLOAD_KEY: {"task": "inr_classification"}, "state_dict": good,
                "hyper_parameters": {"num_classes": 10}},
               put("other-task", "inr.ckpt", "task|not a|metadata"))  # fmt: skip
    with h5py.File(put("hdf5", "other_tool.h5", "not a readable"), "w") as h:
        h.create_dataset("images", data=np.zeros((4, 8, 8), np.float32))
    return out


def _hdf5_corpus(folder: str) -> dict[str, tuple[str, str]]:
    """Files that claim to be zoos: kind -> (path, regex the error must match)."""
    out = {}
    path = os.path.join(folder, "other_tool.h5")
    with h5py.File(path, "w") as h:
        h.create_dataset("images", data=np.zeros((4, 8, 8), np.float32))
        h.attrs["creator"] = "another tool"
    out["hdf5-other-tool"] = (path, "zoo|format")
    path = os.path.join(folder, "torch_as_zoo.h5")
    torch.save(_mlp_state(), path)
    out["not-hdf5"] = (path, "HDF5|zoo|not")
    path = os.path.join(folder, "empty.h5")
    open(path, "wb").close()
    out["empty"] = (path, "HDF5|zoo|empty|not")
    path = os.path.join(folder, "truncated.h5")
    with h5py.File(path, "w") as h:
        h.create_dataset("x", data=np.zeros((1000, 100), np.float32))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:3000])
    out["truncated"] = (path, "HDF5|zoo|truncated|not")
    return out


def _yaml_corpus(folder: str) -> dict[str, tuple[str, str]]:
    """Broken zoo recipes: kind -> (path, regex the error must match)."""
    sentinel = os.path.join(os.path.dirname(folder), SENTINEL)
    texts = {
        "not-yaml": ("broken.yaml", "name: x\n  kind: [classifier\n", "YAML|yaml|parse"),
        "python-tag": ("tag.yaml",
                       f"name: !!python/object/apply:os.system ['touch {sentinel}']\n",
                       "YAML|yaml|tag|constructor"),  # fmt: skip
        "not-a-mapping": ("list.yaml", "- 1\n- 2\n", "mapping|dict"),
        "unknown-key": ("keys.yaml", "name: x\nkind: classifier\nbogus_key: 3\n", "bogus_key"),
        "wrong-type": ("types.yaml", "name: x\nkind: classifier\nruns: many\n", "runs"),
        "empty": ("empty.yaml", "", "empty|mapping"),
    }
    out = {}
    for kind, (name, text, pattern) in texts.items():
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            f.write(text)
        out[kind] = (path, pattern)
    return out


def _snapshot(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def _check(message: str, path: str, pattern: str, root: str, before: set[str]) -> None:
    message = message.strip()
    assert "Traceback" not in message, message
    assert "\n" not in message, f"not one line: {message!r}"
    assert path in message or os.path.basename(path) in message, f"file not named: {message!r}"
    assert re.search(pattern, message), f"fault not named ({pattern}): {message!r}"
    assert not os.path.exists(os.path.join(root, SENTINEL)), "code from the file ran"
    assert _snapshot(root) == before, f"files written: {_snapshot(root) - before}"


def _cli(main: Callable, argv: list[str], capsys) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, code, out, err)
    assert out == "", out
    return err


@pytest.fixture
def corpus(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    return str(tmp_path), {
        "torch": _torch_corpus(str(inputs)),
        "hdf5": _hdf5_corpus(str(inputs)),
        "yaml": _yaml_corpus(str(inputs)),
    }


TORCH_KINDS = ["pickle-rce", "raw-pickle-rce", "pickled-module", "empty", "truncated", "garbage",
               "not-tensors", "huge-declared", "other-task", "hdf5"]  # fmt: skip
NETWORK_KINDS = [*TORCH_KINDS, "wrong-dtype", "nan"]


def _entry_points(root: str, good_net: str) -> dict[str, Callable[[str, object], str]]:
    """Reader name -> function(path, capsys) returning the one error message it gives."""
    from metanet.data.readers import ZooReadError, read_checkpoint_folder
    from metanet.generate.cli import main as generate_main
    from metanet.hyper.cli import main as init_weights_main
    from metanet.hyper.ghn import GHN
    from metanet.serialization import FileError, load_file
    from metanet.tasks.generation import GenerationError
    from metanet.tasks.generators import load_generator
    from metanet.tasks.predict_cli import PredictError, load_network, load_predictor
    from metanet.tasks.predict_cli import main as predict_main

    out_dir = os.path.join(root, "out")

    def raises(fn, exc):
        def run(path, capsys):
            with pytest.raises(exc) as info:
                fn(path)
            return str(info.value)

        return run

    def folder_zoo(path, capsys):
        folder = os.path.join(root, "folder_zoo")
        os.makedirs(folder, exist_ok=True)
        link = os.path.join(folder, "net.pt")
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(path, link)
        try:
            with pytest.raises(ZooReadError) as info:
                read_checkpoint_folder(folder, metrics=None)
        finally:
            os.remove(link)
            os.rmdir(folder)
        return str(info.value).replace(link, path)

    return {
        "load_file": raises(load_file, FileError),
        "GHN.load": raises(GHN.load, ValueError),
        "load_generator": raises(load_generator, GenerationError),
        "load_predictor": raises(load_predictor, PredictError),
        "load_network": raises(load_network, PredictError),
        "read_checkpoint_folder": folder_zoo,
        "predict-accuracy --predictor": lambda p, c: _cli(
            predict_main, ["--predictor", p, good_net], c),
        "init-weights --ghn": lambda p, c: _cli(
            init_weights_main, ["--ghn", p, "--model", "torch.nn:Linear", "--kwargs",
                                "in_features=4", "out_features=2", "-o",
                                os.path.join(out_dir, "init.safetensors")], c),
        "generate --generator": lambda p, c: _cli(
            generate_main, ["--generator", p, "--n", "2", "-o", out_dir], c),
    }  # fmt: skip


# which corpus kinds each reader must refuse (network readers also refuse NaN and int weights)
_READERS = {
    "load_file": [k for k in TORCH_KINDS if k not in ("not-tensors", "other-task")],
    "GHN.load": TORCH_KINDS,
    "load_generator": TORCH_KINDS,
    "load_predictor": TORCH_KINDS,
    "load_network": [k for k in NETWORK_KINDS if k != "other-task"],
    "read_checkpoint_folder": [k for k in NETWORK_KINDS if k != "other-task"],
    "predict-accuracy --predictor": TORCH_KINDS,
    "init-weights --ghn": TORCH_KINDS,
    "generate --generator": TORCH_KINDS,
}
_CASES = [(reader, kind) for reader, kinds in _READERS.items() for kind in kinds]


@pytest.mark.parametrize(("reader", "kind"), _CASES, ids=[f"{r}-{k}" for r, k in _CASES])
def test_torch_file_readers_refuse_bad_files(corpus, reader, kind, capsys):
    root, files = corpus
    good = os.path.join(root, "good.pt")
    torch.save(_mlp_state(), good)
    before = _snapshot(root)
    path, pattern = files["torch"][kind]
    message = _entry_points(root, good)[reader](path, capsys)
    _check(message, path, pattern, root, before)


@pytest.mark.parametrize("kind", ["hdf5-other-tool", "not-hdf5", "empty", "truncated"])
def test_zoo_readers_refuse_files_that_are_not_zoos(corpus, kind, capsys):
    from metanet.data.zoo_store import Zoo, ZooFormatError
    from metanet.zoo.cli import main as zoo_main

    root, files = corpus
    path, pattern = files["hdf5"][kind]
    before = _snapshot(root)
    with pytest.raises(ZooFormatError) as info:
        Zoo.open(path)
    _check(str(info.value), path, pattern, root, before)
    message = _cli(zoo_main, ["info", path], capsys)
    _check(message, path, pattern, root, before)


@pytest.mark.parametrize(
    "kind", ["not-yaml", "python-tag", "not-a-mapping", "unknown-key", "wrong-type", "empty"]
)
def test_recipe_readers_refuse_broken_recipes(corpus, kind, capsys):
    from metanet.zoo.cli import main as zoo_main
    from metanet.zoo.recipe import Recipe, RecipeError

    root, files = corpus
    path, pattern = files["yaml"][kind]
    before = _snapshot(root)
    with pytest.raises(RecipeError) as info:
        Recipe.load(path)
    _check(str(info.value), path, pattern, root, before)
    out = os.path.join(root, "out", "zoo.h5")
    message = _cli(zoo_main, ["build", path, "-o", out, "--no-progress"], capsys)
    _check(message, path, pattern, root, before)


@pytest.mark.parametrize("kind", ["pickle-rce", "truncated", "empty", "huge-declared"])
def test_small_cnn_zoo_reader_refuses_bad_weight_files(tmp_path, kind):
    """The Unterthiner layout's ``weights.npy``: object arrays (pickles) are never loaded."""
    from metanet.data.readers import ZooReadError, read_small_cnn_zoo

    folder = tmp_path / "zoo"
    folder.mkdir()
    (folder / "layout.csv").write_text("varname,start_idx,end_idx,shape\n"
                                       "sequential/dense/kernel:0,0,4,\"(2, 2)\"\n")  # fmt: skip
    (folder / "metrics.csv").write_text("test_accuracy,step\n0.5,86\n")
    path = folder / "weights.npy"
    sentinel = tmp_path / SENTINEL
    if kind == "pickle-rce":
        np.save(path, np.array([_Hostile(str(sentinel))], dtype=object), allow_pickle=True)
        pattern = "Python objects|[Oo]bject arrays|pickle"
    elif kind == "truncated":
        np.save(path, np.zeros((1, 4), np.float32))
        path.write_bytes(path.read_bytes()[:-8])
        pattern = "npy|declares|truncated|cannot be read"
    elif kind == "empty":
        path.write_bytes(b"")
        pattern = "npy|empty|cannot be read"
    elif kind == "huge-declared":
        np.save(path, np.zeros((1, 4), np.float32))
        data = path.read_bytes().replace(b"(1, 4)", b"(10000000000, 4)".ljust(6))
        path.write_bytes(data)
        pattern = "declares|npy|cannot be read"
    before = _snapshot(str(tmp_path))
    with pytest.raises(ZooReadError) as info:
        zoo = read_small_cnn_zoo(folder)
        for group in zoo:  # a lazily read array must refuse at the first read
            group.params()
    _check(str(info.value), str(path), pattern, str(tmp_path), before)
