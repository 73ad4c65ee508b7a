"""Faults: SIGKILL during an HDF5 merge and during ``metanet generate``'s writing, generation past
the memory limit, and a hostile pickle handed to ``metanet generate``.

Every kill is a real ``SIGKILL`` of a subprocess, at a point the test controls: the child patches
a writer to announce itself (a marker file) and then sleep, so the kill always lands mid-write
however slow the machine is. After the kill the test checks what a reader would find, then reruns
the same job and checks that it completes with every record exactly once and no partial or
temporary file left.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file as load_safetensors

from metanet.data.zoo_store import REQUIRED_METRICS, Zoo, ZooWriter, merge_zoos
from metanet.generate.cli import estimate_memory
from metanet.generate.cli import main as generate_main
from metanet.zoo import build as build_mod
from metanet.zoo.architectures import arch_name, build_module

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "zoo-tiny-mlp.yaml"
ARCH = {"type": "mlp", "in": 64, "widths": [8, 8], "out": 10, "activation": "relu"}
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
ENV.pop("METANET_MEMORY_LIMIT_GB", None)


def _temporaries(folder: Path) -> list[Path]:
    """Every temporary file under ``folder`` (``*.tmp``, hidden or not, at any depth)."""
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _kill_when(proc: subprocess.Popen, marker: Path, timeout: float = 120.0) -> None:
    """SIGKILL ``proc`` once it has created ``marker``; fail if it exits or times out first."""
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    err = proc.stderr.read().decode()[-3000:] if proc.stderr else ""
    assert alive and marker.exists(), f"the child never reached the kill point:\n{err}"
    assert proc.returncode == -signal.SIGKILL, err


# ------------------------------------------------------------------------------------------------
# SIGKILL during an HDF5 merge of zoo chunks
# ------------------------------------------------------------------------------------------------
def _chunks(folder: Path, n_chunks: int, records: int, arch: dict) -> list[Path]:
    """``n_chunks`` zoo files of ``records`` random networks each; run ids are unique overall."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shapes = {k: v.shape for k, v in build_module(arch).state_dict().items()}
    paths = []
    for c in range(n_chunks):
        params = {k: torch.randn(records, *s, generator=gen) for k, s in shapes.items()}
        metrics = {m: np.zeros(records) for m in REQUIRED_METRICS}
        metrics["run_id"] = np.arange(records) + c * records
        metrics["test_acc"] = np.linspace(0.1, 0.9, records)
        path = folder / f"chunk-{c:05d}.h5"
        with ZooWriter(path, attrs={"chunk": c}) as w:
            w.add(arch, params, metrics, {"lr": np.full(records, 0.01 * (c + 1))}, compress=False)
        paths.append(path)
    return paths


def _records_of(paths: list[Path]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run ids and parameters of the zoo files ``paths``, concatenated, sorted by run id."""
    ids, params = [], {}
    for p in paths:
        with Zoo.open(p) as z:
            for g in z:
                ids.append(g.metrics["run_id"])
                for k, v in g.params().items():
                    params.setdefault(k, []).append(v.numpy())
    run_ids = np.concatenate(ids)
    order = np.argsort(run_ids, kind="stable")
    return run_ids[order], {k: np.concatenate(v)[order] for k, v in params.items()}


def _assert_merged(dest: Path, sources: list[Path]) -> None:
    """``dest`` holds every record of ``sources`` exactly once, with identical parameters."""
    got_ids, got = _records_of([dest])
    want_ids, want = _records_of(sources)
    assert len(np.unique(got_ids)) == len(got_ids), "a record appears twice"
    np.testing.assert_array_equal(got_ids, want_ids)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


# The merging subprocess: merge_zoos with ZooWriter held at a chosen point ("add:K": before the
# K-th chunk is added; "close": everything added and flushed, before the rename; "none": run
# freely, the marker only says the merge has started).
_MERGE_DRIVER = """
import json, sys, time
from pathlib import Path
from metanet.data import zoo_store
sources, dest, hold, marker = json.loads(sys.argv[1])
def held():
    Path(marker).touch()
    time.sleep(600)
real_add, real_close = zoo_store.ZooWriter.add, zoo_store.ZooWriter.close
count = [0]
def add(self, *args, **kwargs):
    if hold == f"add:{count[0]}":
        held()
    count[0] += 1
    return real_add(self, *args, **kwargs)
def close(self):
    if hold == "close":
        self._file.flush()
        held()
    return real_close(self)
zoo_store.ZooWriter.add, zoo_store.ZooWriter.close = add, close
if hold == "none":
    Path(marker).touch()
zoo_store.merge_zoos(sources, dest)
"""


def _merge_proc(sources: list[Path], dest: Path, hold: str, marker: Path) -> subprocess.Popen:
    args = json.dumps([[str(s) for s in sources], str(dest), hold, str(marker)])
    return subprocess.Popen(
        [sys.executable, "-c", _MERGE_DRIVER, args],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


@pytest.mark.parametrize("hold", ["add:0", "add:2", "close"])
def test_sigkill_mid_merge_leaves_no_zoo_and_the_rerun_merges_every_record_once(
    tmp_path: Path, hold: str
) -> None:
    sources = _chunks(tmp_path / "parts", 4, 5, ARCH)
    dest = tmp_path / "out" / "merged.h5"
    marker = tmp_path / "marker"
    _kill_when(_merge_proc(sources, dest, hold, marker), marker)
    assert not dest.exists()  # no zoo under the final name before the merge is complete
    assert _temporaries(dest.parent), "the kill did not land while the merge was writing"
    merge_zoos(sources, dest)
    _assert_merged(dest, sources)
    assert _temporaries(tmp_path) == []
    assert sorted(p.name for p in dest.parent.iterdir()) == ["merged.h5"]


def test_sigkill_after_random_delays_finds_no_zoo_or_a_complete_one(tmp_path: Path) -> None:
    """Kills at seeded random moments of an unpatched merge (large chunks, so it takes a while):
    the zoo is either absent or complete, and a rerun always leaves exactly one complete zoo."""
    wide = {"type": "mlp", "in": 64, "widths": [256], "out": 10}
    sources = _chunks(tmp_path / "parts", 4, 48, wide)
    dest = tmp_path / "out" / "merged.h5"
    rng = random.Random(7)
    for attempt in range(2):
        marker = tmp_path / f"marker{attempt}"
        proc = _merge_proc(sources, dest, "none", marker)
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode()[-3000:]
        if dest.exists():
            _assert_merged(dest, sources)
            dest.unlink()
        merge_zoos(sources, dest)
        _assert_merged(dest, sources)
        assert _temporaries(tmp_path) == []
        dest.unlink()


# The building subprocess: the real ``metanet zoo build``, held in the merge of its chunks after
# the first chunk has been copied into the zoo's temporary file.
_BUILD_MERGE_DRIVER = """
import os, sys, time
from pathlib import Path
from metanet.data import zoo_store
from metanet.zoo import build
real_merge, real_add = build.merge_zoos, zoo_store.ZooWriter.add
def add(self, *args, **kwargs):
    if Path(self.path).name == "killed.h5" and zoo_store._test_added:
        Path(os.environ["MARKER"]).touch()
        time.sleep(600)
    zoo_store._test_added = True
    return real_add(self, *args, **kwargs)
def merge(*args, **kwargs):
    zoo_store._test_added = False
    zoo_store.ZooWriter.add = add
    return real_merge(*args, **kwargs)
build.merge_zoos = merge
from metanet.zoo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_a_builds_merge_then_rerun_completes_without_retraining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "killed.h5"
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", _BUILD_MERGE_DRIVER, "build", str(TINY), "-o", str(out),
         "--no-progress", "--threads", "1"],
        env={**ENV, "MARKER": str(marker)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    _kill_when(proc, marker)
    assert not out.exists()
    parts = sorted(tmp_path.glob("killed.h5.parts/*/chunk-*.h5"))
    assert len(parts) == 3  # every chunk trained and kept for the rerun
    assert [p.name for p in _temporaries(tmp_path)] and all(
        p.name.startswith(".killed.h5.") for p in _temporaries(tmp_path)
    )
    calls: list[int] = []
    real = build_mod.train_chunk_to_file

    def counted(recipe, chunk, *args, **kwargs):
        calls.append(chunk.index)
        return real(recipe, chunk, *args, **kwargs)

    monkeypatch.setattr(build_mod, "train_chunk_to_file", counted)
    torch.set_num_threads(1)
    build_mod.build_zoo(TINY, out, progress=False)
    assert calls == []  # the merge is redone from the finished chunks, nothing is retrained
    recipe = yaml.safe_load(TINY.read_text())
    plans = build_mod.Recipe.load(TINY).plan()
    expected = sum(
        len({max(1, round(f * p.hparams["epochs"])) for f in recipe["keep_fractions"]})
        for p in plans
    )
    with Zoo.open(out) as zoo:
        pairs = [
            (int(r), int(e))
            for g in zoo
            for r, e in zip(g.metrics["run_id"], g.metrics["epoch"], strict=True)
        ]
    assert len(pairs) == len(set(pairs)) == expected
    assert {r for r, _ in pairs} == set(range(len(plans)))
    assert _temporaries(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.h5", "marker"]


# ------------------------------------------------------------------------------------------------
# metanet generate: SIGKILL while writing, memory limit, hostile pickle
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flow_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny trained flow generator (as tests/test_generate.py builds it: a two-task digits
    zoo of 8 MLPs, 6 Lightning steps)."""
    from metanet.generate import GeneratorDataModule
    from metanet.generate.taskzoo import build_task_zoo
    from metanet.tasks.flow_generation import FlowGenerationTask

    folder = tmp_path_factory.mktemp("faultgen")
    zoo = build_task_zoo(folder / "tasks.h5", arch=ARCH, per_task=4, steps=80, seed=0)
    torch.manual_seed(0)
    dm = GeneratorDataModule(zoo, condition="task", batch_size=4)
    task = FlowGenerationTask(hidden=32, depth=1, sample_steps=4)
    trainer = L.Trainer(
        max_steps=6, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(task, datamodule=dm)
    path = str(folder / "flow.ckpt")
    trainer.save_checkpoint(path)
    return path


def _gen_args(ckpt: str, out: Path, n: int) -> list[str]:
    return ["--generator", ckpt, "--n", str(n), "-o", str(out), "--seed", "3"]


def _assert_generated(out: Path, n: int) -> None:
    """``out`` holds exactly ``n`` complete networks, ``arch.json`` and ``generated.csv``."""
    nets = [f"net_{i:04d}.safetensors" for i in range(n)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*nets, "arch.json", "generated.csv"])
    arch = json.loads((out / "arch.json").read_text())
    assert arch_name(arch) == arch_name(ARCH)
    for name in nets:
        build_module(arch).load_state_dict(load_safetensors(out / name), strict=True)
    with open(out / "generated.csv") as fh:
        assert [r["file"] for r in csv.DictReader(fh)] == nets


# The generating subprocess: the real ``metanet generate``, held at a chosen point of its writing
# ("mid-file": half of network K's temporary file written; "before-csv": every network and
# arch.json written, before generated.csv).
_GENERATE_DRIVER = """
import sys, time
from pathlib import Path
import safetensors.torch
from metanet.generate import cli
point, k, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def held():
    Path(marker).touch()
    time.sleep(600)
real_save = safetensors.torch.save_file
calls = [0]
def save_file(tensors, filename, metadata=None):
    if point == "mid-file" and calls[0] == k:
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        held()
    calls[0] += 1
    return real_save(tensors, filename, metadata=metadata)
safetensors.torch.save_file = save_file
if point == "before-csv":
    cli._write_csv = lambda path, rows: held()
sys.exit(cli.main(sys.argv[4:]))
"""


@pytest.mark.parametrize("point", ["mid-file", "before-csv"])
def test_sigkill_while_generate_writes_then_rerun_leaves_exactly_n_networks(
    flow_ckpt: str, tmp_path: Path, point: str
) -> None:
    out = tmp_path / "gen"
    assert generate_main(_gen_args(flow_ckpt, out, 6)) == 0  # an earlier, larger run
    torch.save(build_module(ARCH).state_dict(), out / "net_0009.pt")  # and an older format
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", _GENERATE_DRIVER, point, "2", str(marker),
         *_gen_args(flow_ckpt, out, 4)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    ref = tmp_path / "ref"
    assert generate_main(_gen_args(flow_ckpt, ref, 4)) == 0  # while the child starts up
    _kill_when(proc, marker)
    # what a reader finds after the kill: arch.json only beside exactly the new networks, and
    # every file under a final name complete
    names = sorted(p.name for p in out.iterdir())
    if point == "mid-file":
        assert "arch.json" not in names and "generated.csv" not in names
        assert [p.name for p in _temporaries(out)] and all(
            p.name.startswith(".net_0002.safetensors.") for p in _temporaries(out)
        )
    else:
        assert "arch.json" in names and "generated.csv" not in names
        assert [n for n in names if n.startswith("net_")] == [f"net_{i:04d}.safetensors"
                                                                for i in range(4)]  # fmt: skip
    for p in out.glob("net_*.safetensors"):
        assert load_safetensors(p)
    assert generate_main(_gen_args(flow_ckpt, out, 4)) == 0
    _assert_generated(out, 4)
    for i in range(4):  # the completed rerun equals an uninterrupted run
        a = load_safetensors(out / f"net_{i:04d}.safetensors")
        b = load_safetensors(ref / f"net_{i:04d}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_over_the_memory_limit_exits_2_and_writes_nothing(
    flow_ckpt: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "gen"
    monkeypatch.setenv("METANET_MEMORY_LIMIT_GB", "0.000001")
    assert generate_main(_gen_args(flow_ckpt, out, 4)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.strip().count("\n") == 0, err
    assert "needs an estimated" in err and "METANET_MEMORY_LIMIT_GB" in err
    assert not out.exists()
    # a limit the checkpoint fits but a million networks do not: the generation estimate refuses
    monkeypatch.setenv("METANET_MEMORY_LIMIT_GB", "0.25")
    assert generate_main(_gen_args(flow_ckpt, out, 1_000_000)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: generating 1000000 networks of 682 parameters needs an "
                          "estimated ") and err.strip().count("\n") == 0, err  # fmt: skip
    assert not out.exists()
    # the estimate is the one the error names, and grows with n
    from metanet.tasks.generators import load_generator

    gen = load_generator(flow_ckpt)
    small, large = estimate_memory(gen, 4), estimate_memory(gen, 1_000_000)
    assert large > 0.25 * 1024**3 > small
    assert estimate_memory(gen, 8, guidance=2.0) > estimate_memory(gen, 8)
    monkeypatch.delenv("METANET_MEMORY_LIMIT_GB")
    assert generate_main([*_gen_args(flow_ckpt, out, 2), "--no-eval"]) == 0


class _Hostile:
    """Pickles as a call of ``exec`` that creates ``sentinel`` when unpickled."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self) -> tuple:
        return (exec, (f"open({self.sentinel!r}, 'w').close()",))


def test_generate_refuses_a_hostile_pickle_unless_trusted(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "metanet": _Hostile(sentinel)}, evil)
    out = tmp_path / "gen"
    assert generate_main(["--generator", str(evil), "--n", "2", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.strip().count("\n") == 0, err
    assert "--trust-pickle" in err and "evil.ckpt" in err
    assert not sentinel.exists() and not out.exists()
    # the file really is hostile: --trust-pickle (and only it) runs its code
    assert generate_main(["--generator", str(evil), "--n", "2", "-o", str(out), "--trust-pickle"])
    assert sentinel.exists() and not out.exists()
    capsys.readouterr()
