"""Safe file IO: tensors-only loading, explicit trust for pickles, pickle-free trees of values."""

from __future__ import annotations

import builtins
import os
import pickle

import pytest
import torch
from torch import nn

from metanet.limits import MemoryLimitError, check_memory, memory_limit, memory_limit_bytes
from metanet.serialization import (
    FileError,
    PickleRefusedError,
    is_safetensors,
    load_file,
    load_tree,
    save_state_dict,
    save_tree,
)


class _Hostile:
    """Unpickling this object creates the sentinel file (a stand-in for any shell command)."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (builtins.exec, (f"open({self.sentinel!r}, 'w').close()",))


def test_tree_round_trip_keeps_structure_types_and_tensors(tmp_path):
    tree = {
        "state_dict": {"0.weight": torch.randn(3, 4), "0.bias": torch.arange(3)},
        "hyper_parameters": {"lr": 1e-3, "name": "nfn", "widths": [16, 12], "shape": (1, 8, 8),
                             "none": None, "flag": True},  # fmt: skip
        "by_int": {0: torch.ones(2), 1: "b"},
        "half": torch.randn(5).to(torch.bfloat16),
        "nested": [{"t": torch.zeros(2, 2)}, (1, 2.5)],
    }
    path = save_tree(tmp_path / "tree.safetensors", tree)
    assert is_safetensors(path)
    back = load_file(path)
    assert back["hyper_parameters"] == tree["hyper_parameters"]
    assert isinstance(back["hyper_parameters"]["shape"], tuple)
    assert torch.equal(back["state_dict"]["0.weight"], tree["state_dict"]["0.weight"])
    assert back["state_dict"]["0.bias"].dtype == torch.int64
    assert back["by_int"][1] == "b" and torch.equal(back["by_int"][0], torch.ones(2))
    assert back["half"].dtype == torch.bfloat16 and torch.equal(back["half"], tree["half"])
    assert back["nested"][1] == (1, 2.5) and torch.equal(back["nested"][0]["t"], torch.zeros(2, 2))
    # the file is a plain safetensors file: any safetensors reader sees the tensors
    from safetensors.torch import load_file as st_load

    assert torch.equal(st_load(str(path))["state_dict/0.weight"], tree["state_dict"]["0.weight"])


def test_tree_refuses_values_that_need_pickle(tmp_path):
    with pytest.raises(TypeError, match="'hp/module'.*without pickle"):
        save_tree(tmp_path / "x.safetensors", {"hp": {"module": nn.Linear(2, 2)}})
    assert not os.listdir(tmp_path)  # nothing written, no temporary left


def test_state_dict_files_load_tensors_only(tmp_path):
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    for name in ("net.safetensors", "net.pt"):
        back = load_file(save_state_dict(tmp_path / name, net.state_dict()))
        assert set(back) == set(net.state_dict())
        assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())
    assert sorted(os.listdir(tmp_path)) == ["net.pt", "net.safetensors"]


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, writer):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    if writer == "torch.save":
        torch.save({"weight": torch.ones(2), "x": _Hostile(str(sentinel))}, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(_Hostile(str(sentinel)), fh)
    with pytest.raises(PickleRefusedError) as info:
        load_file(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "--trust-pickle" in message
    assert not sentinel.exists()
    # with explicit trust the full unpickler runs: the very behaviour the default refuses
    if writer == "torch.save":
        load_file(path, trust_pickle=True)
        assert sentinel.exists()


def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(nn.Linear(3, 2), path)
    with pytest.raises(PickleRefusedError, match="Linear"):
        load_file(path)
    assert isinstance(load_file(path, trust_pickle=True), nn.Linear)


def _bad_files(tmp_path) -> dict[str, tuple[str, str]]:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(64, 64)}, good)
    st = save_state_dict(tmp_path / "good.safetensors", {"w": torch.randn(64, 64)})
    cases = {}
    (tmp_path / "empty.pt").write_bytes(b"")
    cases["empty"] = (str(tmp_path / "empty.pt"), "empty")
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (str(tmp_path / "truncated.pt"), "not a readable PyTorch file")
    (tmp_path / "garbage.pt").write_bytes(os.urandom(300))
    cases["garbage"] = (str(tmp_path / "garbage.pt"), "not a readable PyTorch file")
    data = st.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated safetensors"] = (
        str(tmp_path / "truncated.safetensors"),
        "not a readable safetensors file",
    )
    # a safetensors header that declares a tensor far larger than the file
    header = b'{"w":{"dtype":"F32","shape":[1000000000000],"data_offsets":[0,4000000000000]}}'
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    cases["huge declared shape"] = (str(huge), "not a readable safetensors file")
    cases["missing"] = (str(tmp_path / "nope.pt"), "no such file")
    cases["folder"] = (str(tmp_path), "is a folder")
    return cases


def test_bad_files_give_one_line_errors(tmp_path):
    for name, (path, pattern) in _bad_files(tmp_path).items():
        with pytest.raises(FileError) as info:
            load_file(path)
        message = str(info.value)
        assert pattern in message and path in message and "\n" not in message, (name, message)


def test_file_over_the_memory_limit_is_refused_before_reading(tmp_path):
    path = save_state_dict(tmp_path / "big.safetensors", {"w": torch.zeros(1024, 256)})
    with memory_limit(64 * 1024), pytest.raises(FileError, match="memory limit"):
        load_tree(path)
    assert load_tree(path)["w"].shape == (1024, 256)


def test_memory_limit_from_environment(monkeypatch):
    monkeypatch.setenv("METANET_MEMORY_LIMIT_GB", "0.5")
    assert memory_limit_bytes() == 512 * 1024**2
    with pytest.raises(MemoryLimitError, match="the graph of X needs an estimated 1.0 GiB"):
        check_memory(1024**3, "the graph of X")
    monkeypatch.setenv("METANET_MEMORY_LIMIT_GB", "lots")
    with pytest.raises(ValueError, match="not a number"):
        memory_limit_bytes()
