"""Data larger than memory: zoo builds, GHN and MIP training stream their inputs from disk (the
same results as with the data in memory), and the batched engine's early-stopped INRs leave the
batch (the same results as keeping them)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from metanet.data.tasks import LazyArray, load_task_data
from metanet.limits import MemoryLimitError, memory_limit
from metanet.zoo.build import build_zoo
from metanet.zoo.recipe import Recipe
from metanet.zoo.train import classifier_data, resolve_engine, train_chunk

# train 1200 x 64 floats (300 KiB) and test 600 x 64 (150 KiB) on disk; a limit of 140 kB keeps
# both on disk, and still holds a step's batch (4 networks x 32 samples, twice) and an
# evaluation batch of 512 samples (128 KiB)
LIMIT = 140_000
HPARAMS = {"lr": {"log_uniform": [0.01, 0.1]}, "epochs": 2, "batch_size": {"choice": [16, 32]},
           "train_fraction": {"choice": [0.5, 1.0]}}  # fmt: skip


def _write(folder, n_train: int = 1200, n_test: int = 600) -> dict:
    """A 4-class task of 1x8x8 inputs as four .npy files in ``folder``; its tensors config."""
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    x = g.random((n_train + n_test, 1, 8, 8), dtype=np.float32)
    y = (x[:, 0, :4].mean((1, 2)) > 0.5).astype(np.int64) * 2 + (x[:, 0, :, :4].mean((1, 2)) > 0.5)
    parts = {"train": slice(0, n_train), "test": slice(n_train, None)}
    for split, rows in parts.items():
        np.save(folder / f"x_{split}.npy", x[rows])
        np.save(folder / f"y_{split}.npy", y[rows])
    return {"provider": "tensors", **{split: {"x": str(folder / f"x_{split}.npy"),
                                              "y": str(folder / f"y_{split}.npy")}
                                      for split in parts}}  # fmt: skip


def _recipe(data: dict, arch: dict) -> Recipe:
    return Recipe.from_dict({"name": "stream", "seed": 3, "data": data, "architectures": [arch],
                             "networks_per_arch": 4, "chunk_size": 4, "keep_fractions": [0.5, 1.0],
                             "hparams": HPARAMS})  # fmt: skip


def test_lazy_array_take_and_flatten(tmp_path):
    data = _write(tmp_path)
    with memory_limit(LIMIT):
        task = load_task_data(data)
    x = task.train.x
    assert isinstance(x, LazyArray) and x.shape == (1200, 1, 8, 8)
    full = torch.from_numpy(np.load(data["train"]["x"]))
    idx = torch.tensor([[5, 3, 5], [0, 1199, 3]])
    assert torch.equal(x.take(idx), full[idx])
    flat = x.flatten(1)
    assert isinstance(flat, LazyArray) and flat.shape == (1200, 64)
    assert torch.equal(flat.take(idx), full.flatten(1)[idx])
    assert torch.equal(flat.subset(np.array([7, 2]))[:], full.flatten(1)[[7, 2]])


@pytest.mark.parametrize("arch", [{"type": "mlp", "widths": [16]},
                                  {"type": "cnn", "channels": [4], "kernel": 3}])  # fmt: skip
def test_zoo_on_streamed_data_equals_the_zoo_in_memory(tmp_path, arch):
    from metanet.data.zoo_store import Zoo

    lazy_cfg, mem_cfg = _write(tmp_path / "lazy"), _write(tmp_path / "mem")
    results = {}
    for name, cfg, limit in (("lazy", lazy_cfg, LIMIT), ("mem", mem_cfg, None)):
        with memory_limit(limit or 1 << 40):
            recipe = _recipe(cfg, arch)
            out = build_zoo(recipe, tmp_path / f"{name}.h5", progress=False, engine="vmap")
        from metanet.zoo.data import recipe_task

        assert recipe_task(recipe.data).train.lazy == (name == "lazy")
        with Zoo.open(out) as zoo:
            g = zoo[zoo.architectures[0]]
            results[name] = ({k: v.clone() for k, v in g.params().items()},
                             {k: np.array(v) for k, v in g.metrics.items()})  # fmt: skip
    (p_lazy, m_lazy), (p_mem, m_mem) = results["lazy"], results["mem"]
    assert p_lazy.keys() == p_mem.keys()
    for k in p_mem:
        assert torch.equal(p_lazy[k], p_mem[k]), k
    assert m_lazy.keys() == m_mem.keys()
    for k in m_mem:
        np.testing.assert_array_equal(m_lazy[k], m_mem[k], err_msg=k)


def test_a_streamed_build_records_the_engine_that_trains_it(tmp_path):
    # engine="auto" on streamed data trains on vmap, and the zoo's fingerprint says so (a
    # resumed build in memory would otherwise mix batched chunks into a vmap zoo)
    from metanet.data.zoo_store import Zoo

    cfg = _write(tmp_path / "lazy")
    with memory_limit(LIMIT):
        out = build_zoo(_recipe(cfg, {"type": "mlp", "widths": [16]}), tmp_path / "z.h5",
                        progress=False, engine="auto")  # fmt: skip
    with Zoo.open(out) as zoo:
        assert list(zoo.attrs["engines"]) == ["vmap"]


def test_auto_engine_streams_on_vmap_and_batched_is_refused(tmp_path):
    cfg = _write(tmp_path)
    arch = {"type": "mlp", "widths": [16]}
    with memory_limit(LIMIT):
        recipe = _recipe(cfg, arch)
        task = load_task_data(cfg)
        arch = recipe.architectures[0]
        assert resolve_engine(arch, "auto", task=task) == "vmap"
        assert resolve_engine(arch, "vmap", task=task) == "vmap"
        with pytest.raises(ValueError, match="needs the data in memory") as info:
            resolve_engine(arch, "batched", task=task)
        assert "\n" not in str(info.value)
        plans = recipe.plan(4)
        data = classifier_data(plans, True, task)
        assert isinstance(data.x_train, LazyArray) and data.x_train.shape == (1200, 64)
        auto = train_chunk(arch, plans, data, [1.0], generator_seed=5, engine="auto")
        with pytest.raises(ValueError, match="needs the data in memory"):
            train_chunk(arch, plans, data, [1.0], generator_seed=5, engine="batched")
    # the data fits: in memory, the batched engines take it again
    assert resolve_engine(arch, "auto", task=task) in ("batched", "native")
    eager = load_task_data(cfg)
    data = classifier_data(plans, True, eager)
    assert isinstance(data.x_train, torch.Tensor)
    ref = train_chunk(arch, plans, data, [1.0], generator_seed=5, engine="vmap")
    for k in ref.params:
        assert torch.equal(auto.params[k], ref.params[k]), k
    for k in ref.metrics:
        np.testing.assert_array_equal(auto.metrics[k], ref.metrics[k], err_msg=k)


def test_a_limit_below_one_batch_is_one_line(tmp_path):
    cfg = _write(tmp_path)
    with memory_limit(20_000):  # a step reads 2 x 4 networks x 32 samples x 256 B = 64 KiB
        recipe = _recipe(cfg, {"type": "mlp", "widths": [16]})
        task = load_task_data(cfg)
        arch, plans = recipe.architectures[0], recipe.plan(4)
        data = classifier_data(plans, True, task)
        with pytest.raises(MemoryLimitError, match="one training step") as info:
            train_chunk(arch, plans, data, [1.0], engine="vmap")
        assert "\n" not in str(info.value) and "x_train.npy" in str(info.value)
        from metanet.tasks.hypernet import TaskBatches

        dm = TaskBatches(data=cfg, batch_size=128)
        with pytest.raises(MemoryLimitError, match="one MIP training batch") as info:
            dm.setup("fit")
        assert "\n" not in str(info.value)


def _ghn_family(tmp_path) -> str:
    path = tmp_path / "family.yaml"
    path.write_text("name: f\ntrain:\n  - {type: mlp, depth: [1, 2], width: [8, 16]}\n"
                    "  - {type: cnn, depth: [1, 1], width: [4], kernel: [3], norm: [null, batch]}\n"
                    "held_out:\n  - {type: mlp, widths: [12, 12]}\n")  # fmt: skip
    return str(path)


def _record(logged: list, key: str, value, **kw) -> None:
    logged.append((key, float(value.detach()) if isinstance(value, torch.Tensor) else value))


def test_ghn_trains_and_validates_on_streamed_data(tmp_path):
    from metanet.tasks.hypernet import GHNData, GHNTask

    lazy_cfg, mem_cfg = _write(tmp_path / "lazy"), _write(tmp_path / "mem")
    family = _ghn_family(tmp_path)
    runs = {}
    for name, cfg, limit in (("lazy", lazy_cfg, LIMIT), ("mem", mem_cfg, 1 << 40)):
        with memory_limit(limit):
            dm = GHNData(family, data=cfg, batch_size=32, archs_per_batch=2, steps_per_epoch=3)
            dm.setup("fit")
        assert isinstance(dm._train.x, LazyArray) == (name == "lazy")
        torch.manual_seed(0)
        task = GHNTask(ghn={"hidden": 8, "layers": 1, "decoder_hidden": 8, "max_dim": 16})
        logged: list[tuple[str, float]] = []
        task.log = functools.partial(_record, logged)  # no trainer: logs into the list
        opt = task.configure_optimizers()
        losses = []
        for i in range(3):
            loss = task.training_step(dm._train[i], i)  # logs nothing: no trainer
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        logged.clear()
        with torch.no_grad(), memory_limit(limit):
            for i in range(len(dm._val)):
                task.validation_step(dm._val[i], i)
        runs[name] = losses, logged
    assert runs["lazy"][0] == runs["mem"][0]
    lazy_val, mem_val = dict(runs["lazy"][1]), dict(runs["mem"][1])
    # MLPs (no batch statistics) score the same on chunks as on the whole split
    assert lazy_val["val/acc_held_out"] == pytest.approx(mem_val["val/acc_held_out"], abs=1e-6)


def test_mip_trains_and_validates_on_streamed_data(tmp_path):
    from metanet.tasks.hypernet import MIPRegularizationTask, TaskBatches

    lazy_cfg, mem_cfg = _write(tmp_path / "lazy"), _write(tmp_path / "mem")
    runs = {}
    for name, cfg, limit in (("lazy", lazy_cfg, LIMIT), ("mem", mem_cfg, 1 << 40)):
        with memory_limit(limit):
            dm = TaskBatches(data=cfg, batch_size=32, steps_per_epoch=3)
            dm.setup("fit")
            batches = list(dm.train_dataloader())
            val = list(dm.val_dataloader())
        assert isinstance(dm.train_xy[0], LazyArray) == (name == "lazy")
        assert len(val) == (1 if name == "mem" else -(-600 // (LIMIT // 8 // 256)))
        torch.manual_seed(0)
        task = MIPRegularizationTask(widths=[16], hidden=[16], in_features=dm.input_features,
                                     num_classes=dm.output_classes)  # fmt: skip
        task.log = lambda *args, **kw: None  # no trainer
        opt = task.configure_optimizers()
        losses = []
        for i, batch in enumerate(batches):
            loss = task.training_step(batch, i)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        with torch.no_grad():  # the split's mean over chunks weighted by their size
            x = torch.cat([b["x"] for b in val])
            y = torch.cat([b["y"] for b in val])
            acc = sum(task._loss(0.5, b["x"], b["y"])[2] * len(b["y"]) for b in val) / len(y)
            whole = task._loss(0.5, x, y)[2]
        runs[name] = losses
        assert float(acc) == pytest.approx(float(whole), abs=1e-6)
    assert runs["lazy"] == runs["mem"]


# ------------------------------------------------------------------------------------------------
# the batched engine: early-stopped INRs leave the batch
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("epochs", [300, {"choice": [120, 300]}])
def test_stopped_inrs_leave_the_batch_with_the_same_results(epochs):
    """INRs stop at their PSNR target at different steps; compacting the batch as they stop
    gives exactly the records of keeping them frozen in it (lanes of two networks included)."""
    from metanet.zoo import batched
    from metanet.zoo.data import recipe_task
    from metanet.zoo.train import siren_data

    raw = {"name": "inr-stop", "kind": "siren", "seed": 0,
           "data": {"split_seed": 0, "test_fraction": 0.25, "train_images": 12},
           "architectures": [{"type": "siren", "widths": [16, 16]}],
           "keep_fractions": [0.25, 0.5, 1.0],
           "hparams": {"epochs": epochs, "lr": 1e-3, "psnr_target": {"choice": [22.0, 26.0]},
                       "optimizer": {"choice": ["adam", "sgd"]}}}  # fmt: skip
    recipe = Recipe.from_dict(raw)
    plans = recipe.plan()
    data, _ = siren_data(plans, recipe_task(recipe.data))
    arch = recipe.architectures[0]
    steps_seen = {}

    def run(compact: bool):
        rows = []
        out = batched.train_chunk_batched(arch, plans, data, recipe.keep_fractions,
                                          generator_seed=7, compact=compact,
                                          on_step=lambda t, total: rows.append(t))  # fmt: skip
        steps_seen[compact] = len(rows)
        return out

    ref, got = run(False), run(True)
    steps = ref.metrics["steps"]
    assert len(set(steps.tolist())) > 3 and (steps < 300).sum() > 6  # stops at many steps
    for k in ref.params:
        assert torch.equal(got.params[k], ref.params[k]), k
    for k in ref.metrics:
        np.testing.assert_array_equal(got.metrics[k], ref.metrics[k], err_msg=k)
    if epochs == 300:  # every INR stopped early: the loop ends with the last of them
        assert steps_seen[True] < steps_seen[False]


def test_siren_zoo_reads_only_its_chunks_images_from_disk(tmp_path, monkeypatch):
    # images memory-mapped from .npy: each chunk reads the signals it fits (not the split), and
    # the INRs equal those fitted to the same images in memory
    from metanet.data.providers import tensors
    from metanet.data.zoo_store import Zoo
    from metanet.zoo import data as zoo_data

    cfg = _write(tmp_path / "img", n_train=40, n_test=12)
    recipe = {"name": "inr", "kind": "siren", "seed": 0,
              "data": {**cfg, "train_images": 10, "test_images": 4},
              "architectures": [{"type": "siren", "widths": [8]}], "chunk_size": 7,
              "keep_fractions": [1.0],
              "hparams": {"lr": 1e-3, "optimizer": "adam", "epochs": 5}}  # fmt: skip
    from metanet.data.providers.signals import SignalData

    reads = []
    real = SignalData.from_tensor.__func__

    def spy(cls, x, labels=None, dims=None):
        reads.append((type(x).__name__, x.shape[0]))
        return real(cls, x, labels, dims)

    results = {}
    for name, lazy in (("mem", False), ("lazy", True)):
        if lazy:
            monkeypatch.setattr(tensors, "_fits", lambda nbytes: False)
            monkeypatch.setattr(SignalData, "from_tensor", classmethod(spy))
            zoo_data._recipe_task.cache_clear()  # read the data again, now memory-mapped
        out = build_zoo(Recipe.from_dict(recipe), tmp_path / f"{name}.h5", progress=False)
        assert zoo_data.recipe_task(Recipe.from_dict(recipe).data).train.lazy == lazy
        with Zoo.open(out) as zoo:
            g = zoo[zoo.architectures[0]]
            results[name] = {k: v.clone() for k, v in g.params().items()}
    zoo_data._recipe_task.cache_clear()
    assert reads and max(n for _, n in reads) <= 7  # a chunk's images, never the split (40)
    for k in results["mem"]:
        assert torch.equal(results["mem"][k], results["lazy"][k]), k
