"""The zoo builder: recipes, vmap training vs plain torch.optim, resumable + sharded builds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from metanet.data.digits import digit_image_coordinates, load_digits
from metanet.data.zoo_store import Zoo
from metanet.weightspace import WeightSpaceSpec
from metanet.zoo import build as build_mod
from metanet.zoo.architectures import ArchError, arch_name, build_module, has_weight_space
from metanet.zoo.build import build_zoo, make_chunks
from metanet.zoo.recipe import Recipe, RecipeError
from metanet.zoo.train import classifier_data, init_network, train_chunk

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "zoo-tiny-mlp.yaml"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny vmap batches run fastest (and steadiest on a shared machine) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _recipe(**over) -> dict:
    raw = yaml.safe_load(TINY.read_text())
    raw.update(over)
    return raw


# -- architectures ----------------------------------------------------------------------------
def test_architectures_build_and_name_stably():
    archs = [
        {"type": "mlp", "widths": [8, 8]},
        {"type": "mlp", "widths": [8, 8], "activation": "tanh"},
        {"type": "cnn", "channels": [4, 8], "kernel": 5},
        {"type": "cnn", "channels": [4, 4], "residual": True, "norm": "group"},
        {"type": "siren", "widths": [16, 16], "w0": 20.0},
    ]
    names = [arch_name(a) for a in archs]
    assert len(set(names)) == len(names)
    assert arch_name({"type": "cnn", "channels": [4, 8], "kernel": 5, "norm": None}) == names[2]
    shapes = {"mlp": (3, 64), "cnn": (3, 1, 8, 8), "siren": (3, 2)}
    outs = {"mlp": 10, "cnn": 10, "siren": 1}
    for a in archs:
        m = build_module(a)
        assert m(torch.randn(shapes[a["type"]])).shape == (3, outs[a["type"]])
        if has_weight_space(a):
            assert WeightSpaceSpec.from_module(m).num_layers == len(a.get("widths", a.get(
                "channels"))) + 1  # fmt: skip
    assert not has_weight_space(archs[3])
    from metanet.zoo.architectures import GroupNorm

    ref, ours = torch.nn.GroupNorm(2, 6), GroupNorm(2, 6)
    torch.nn.init.normal_(ref.weight)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 6, 4, 4)
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize(
    "arch, key",
    [
        ({"type": "mlp", "widths": [8], "depth": 3}, "depth"),
        ({"type": "mlp", "widths": [0]}, "widths"),
        ({"type": "cnn", "kernel": 4}, "kernel"),
        ({"type": "cnn", "norm": "instance"}, "norm"),
        ({"type": "cnn", "channels": [4, 8], "residual": True}, "residual"),
        ({"type": "transformer"}, "type"),
    ],
)
def test_bad_architectures_name_the_key(arch, key):
    with pytest.raises(ArchError, match=f"'{key}'|\\['{key}'\\]"):
        build_module(arch)


# -- recipes ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, key",
    [
        ({"learning_rate": 0.1}, "learning_rate"),
        ({"networks_per_arch": 0}, "networks_per_arch"),
        ({"chunk_size": -1}, "chunk_size"),
        ({"keep_fractions": [0.0, 1.0]}, "keep_fractions"),
        ({"hparams": {"lr": {"log_uniform": [0.0, 0.1]}}}, "hparams.lr"),
        ({"hparams": {"lr": -0.1}}, "hparams.lr"),
        ({"hparams": {"label_noise": {"uniform": [0.0, 1.5]}}}, "hparams.label_noise"),
        ({"hparams": {"batch_size": {"choice": [32, 0]}}}, "hparams.batch_size"),
        ({"hparams": {"optimizer": "rmsprop"}}, "hparams.optimizer"),
        ({"hparams": {"epochs": {"int_uniform": [5, 2]}}}, "hparams.epochs"),
        ({"hparams": {"lr": {"gaussian": [0, 1]}}}, "hparams.lr"),
        ({"hparams": {"colour": 1}}, "hparams.colour"),
        ({"data": {"split_seed": 0, "shuffle": True}}, "data.shuffle"),
        ({"architectures": [{"type": "mlp", "widths": [8], "depth": 2}]}, "architectures[0]"),
        ({"architectures": [{"type": "siren"}]}, "architectures[0].type"),
    ],
)
def test_bad_recipes_name_key_and_file(tmp_path, change, key):
    path = tmp_path / "bad-recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(**change)))
    with pytest.raises(RecipeError) as err:
        Recipe.load(path)
    assert "bad-recipe.yaml" in str(err.value) and f"'{key}'" in str(err.value)


def test_plan_is_deterministic_and_samples_in_range():
    r = Recipe.load(TINY)
    plans = r.plan()
    assert [p.run_id for p in plans] == list(range(12))
    assert [p.hparams for p in plans] == [p.hparams for p in Recipe.load(TINY).plan()]
    assert [p.hparams for p in r.plan(limit=5)] == [p.hparams for p in plans[:5]]
    lrs = np.array([p.hparams["lr"] for p in plans])
    assert lrs.min() >= 1e-3 and lrs.max() <= 0.1 and len(set(lrs)) == 12
    assert {p.hparams["optimizer"] for p in plans} == {"sgd", "adam"}
    assert r.architectures[0]["dropout"]  # a sampled dropout rate adds dropout layers
    chunks = make_chunks(r, plans)
    assert sorted(i for c in chunks for i in c.run_ids) == list(range(12))
    assert all(len(c.plans) <= r.chunk_size for c in chunks)


# -- vmap training == plain torch.optim training ---------------------------------------------------
def test_vmap_chunk_matches_plain_per_network_training():
    """Full-batch training (deterministic) of networks with different optimizers, lrs, weight
    decay, train subsets, label noise and epochs in ONE vmap chunk equals training each network
    alone with torch.optim on its own subset and labels."""
    raw = _recipe(
        keep_fractions=[0.5, 1.0],
        hparams={
            "lr": {"log_uniform": [0.01, 0.1]},
            "optimizer": {"choice": ["sgd", "adam"]},
            "weight_decay": {"uniform": [0.0, 0.01]},
            "momentum": {"uniform": [0.0, 0.9]},
            "train_fraction": {"uniform": [0.1, 0.3]},
            "label_noise": {"uniform": [0.0, 0.5]},
            "init": {"choice": ["default", "orthogonal"]},
            "init_scale": {"uniform": [0.5, 1.5]},
            "batch_size": 4096,  # full batch
            "epochs": {"int_uniform": [2, 4]},
        },
    )
    r = Recipe.from_dict(raw)
    plans = r.plan(limit=4)
    assert len({p.hparams["optimizer"] for p in plans}) == 2
    arch = r.architectures[0]
    data = classifier_data(plans, flat=True)
    res = train_chunk(arch, plans, data, r.keep_fractions)
    for i, plan in enumerate(plans):
        hp = plan.hparams
        m = init_network(arch, plan.seed, hp["init"], hp["init_scale"])
        if hp["optimizer"] == "sgd":
            opt = torch.optim.SGD(m.parameters(), hp["lr"], hp["momentum"],
                                  weight_decay=hp["weight_decay"])  # fmt: skip
        else:
            opt = torch.optim.AdamW(m.parameters(), hp["lr"], weight_decay=hp["weight_decay"])
        x, y = data.x_train[data.subset[i]], data.y_train[i][data.subset[i]]
        for _ in range(hp["epochs"]):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        rows = np.flatnonzero(res.metrics["run_id"] == plan.run_id)
        final = rows[res.metrics["epoch"][rows] == hp["epochs"]][0]
        assert sorted(res.metrics["epoch"][rows]) == sorted(
            {max(1, round(f * hp["epochs"])) for f in r.keep_fractions}
        )
        for k, v in m.state_dict().items():
            torch.testing.assert_close(res.params[k][final], v, atol=2e-5, rtol=1e-4)
        m.eval()
        d = load_digits()
        acc = (m(d.x_test.flatten(1)).argmax(1) == d.y_test).float().mean().item()
        assert abs(res.metrics["test_acc"][final] - acc) < 1e-6


def test_diverging_networks_are_frozen_and_flagged():
    raw = _recipe(hparams={"lr": 1e37, "optimizer": "sgd", "batch_size": 64, "epochs": 2,
                           "init_scale": 10.0})  # fmt: skip
    r = Recipe.from_dict(raw)
    plans = r.plan(limit=2)
    res = train_chunk(r.architectures[0], plans, classifier_data(plans, flat=True), [1.0])
    assert res.metrics["diverged"].tolist() == [1, 1]
    assert all(torch.isfinite(v).all() for v in res.params.values())


def test_siren_zoo_fits_digit_images(tmp_path):
    raw = {
        "name": "siren-test",
        "kind": "siren",
        "data": {"train_images": 3, "test_images": 1},
        "architectures": [{"type": "siren", "widths": [16, 16], "w0": 10.0}],
        "chunk_size": 4,
        "hparams": {"lr": 3e-3, "epochs": 150},
    }
    out = build_zoo(Recipe.from_dict(raw), tmp_path / "s.h5", progress=False)
    g = Zoo.open(out)[arch_name(raw["architectures"][0])]
    d = load_digits()
    m = g.metrics
    assert m["split"].tolist() == [0, 0, 0, 1] and m["image_index"].tolist() == [0, 1, 2, 0]
    assert m["label"].tolist() == [*d.y_train[:3].tolist(), int(d.y_test[0])]
    coords = digit_image_coordinates(8)
    for i in range(4):
        target = (d.x_train[i] if i < 3 else d.x_test[0]).reshape(64, 1)
        with torch.no_grad():
            mse = F.mse_loss(g.module(i)(coords), target).item()
        assert abs(mse - m["train_loss"][i]) < 1e-5
        assert mse < 0.2 * target.var().item()  # fits far better than the mean image


# -- end-to-end builds --------------------------------------------------------------------------
def _check_zoo(path: Path, recipe: Recipe, limit: int | None = None) -> Zoo:
    zoo = Zoo.open(path)
    plans = recipe.plan(limit)
    g = zoo[zoo.architectures[0]]
    run_ids = g.metrics["run_id"]
    for p in plans:
        rows = np.flatnonzero(run_ids == p.run_id)
        epochs = sorted(g.metrics["epoch"][rows])
        assert epochs == sorted({max(1, round(f * p.hparams["epochs"])) for f in
                                 recipe.keep_fractions})  # fmt: skip
        assert g.hparams["lr"][rows[0]] == p.hparams["lr"]
        assert g.metrics["seed"][rows[0]] == p.seed
    assert set(run_ids) == {p.run_id for p in plans}
    return zoo


def test_build_stores_every_network_and_metrics_match_modules(tmp_path):
    r = Recipe.load(TINY)
    out = build_zoo(TINY, tmp_path / "z.h5", limit=6, progress=False)
    zoo = _check_zoo(out, r, limit=6)
    assert zoo.attrs["fingerprint"] == r.fingerprint(6)
    assert yaml.safe_load(zoo.attrs["recipe"])["name"] == "zoo-tiny-mlp"
    assert zoo.attrs["data"]["split_seed"] == 0 and zoo.attrs["data"]["test_fraction"] == 0.25
    assert not (tmp_path / "z.h5.parts").exists()
    g = zoo[zoo.architectures[0]]
    d = load_digits()
    for i in (0, len(g) - 1):
        with torch.no_grad():
            acc = (g.module(i)(d.x_test.flatten(1)).argmax(1) == d.y_test).float().mean()
        assert abs(acc.item() - g.metrics["test_acc"][i]) < 1e-6
    assert len(g.weight_space()) == len(g)
    # same command again: nothing to do; another recipe into the same file: refused, untouched
    before = out.read_bytes()
    assert build_zoo(TINY, out, limit=6, progress=False) == out
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_zoo(TINY, out, limit=5, progress=False)
    assert out.read_bytes() == before


def _parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.parts/*/chunk-*.h5"))


def test_sigkill_mid_build_then_rerun_completes_exactly_once(tmp_path, monkeypatch):
    """A real SIGKILL of a building subprocess, then the same build in-process: every network
    exactly once, bit-identical to an uninterrupted build, finished chunks not retrained."""
    recipe_path = tmp_path / "kill.yaml"
    recipe_path.write_text(yaml.safe_dump(_recipe(name="kill", networks_per_arch=16,
                                                  chunk_size=2)))  # fmt: skip
    out = tmp_path / "killed.h5"
    n_chunks = len(make_chunks(Recipe.load(recipe_path), Recipe.load(recipe_path).plan()))
    assert n_chunks >= 8
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "metanet.zoo.cli", "build", str(recipe_path), "-o", str(out),
         "--no-progress"],  # fmt: skip
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not _parts(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = _parts(out)
    assert 1 <= len(done) < n_chunks and not out.exists()
    # damage one finished chunk and leave a stray temporary file: both must be handled
    if len(done) > 1:
        done[-1].write_bytes(done[-1].read_bytes()[:100])
    (done[0].parent / ".chunk-00007.h5.junk.tmp").write_bytes(b"partial")
    calls = []
    real = build_mod.train_chunk_to_file
    monkeypatch.setattr(build_mod, "train_chunk_to_file",
                        lambda r, c, *a, **k: (calls.append(c.index), real(r, c, *a, **k)))
    build_zoo(recipe_path, out, progress=False)
    intact = len(done) - (1 if len(done) > 1 else 0)
    assert len(calls) == n_chunks - intact
    recipe = Recipe.load(recipe_path)
    zoo = _check_zoo(out, recipe)
    assert not (tmp_path / "killed.h5.parts").exists()
    monkeypatch.setattr(build_mod, "train_chunk_to_file", real)
    ref = Zoo.open(build_zoo(recipe_path, tmp_path / "ref.h5", progress=False))
    name = zoo.architectures[0]
    order_a = np.lexsort((zoo[name].metrics["epoch"], zoo[name].metrics["run_id"]))
    order_b = np.lexsort((ref[name].metrics["epoch"], ref[name].metrics["run_id"]))
    for key, t in zoo[name].params().items():
        torch.testing.assert_close(t[order_a], ref[name].params()[key][order_b], rtol=0, atol=0)
    np.testing.assert_array_equal(
        zoo[name].metrics["test_acc"][order_a], ref[name].metrics["test_acc"][order_b]
    )


@pytest.mark.slow
def test_two_fabric_ranks_write_shards_opened_as_one_zoo(tmp_path):
    """--devices 2 (gloo): each rank writes its shard; the zoo file is virtual over them and
    equals a single-process build."""
    single = Zoo.open(build_zoo(TINY, tmp_path / "single.h5", limit=8, progress=False))
    out = build_zoo(TINY, tmp_path / "multi.h5", limit=8, devices=2, progress=False)
    shards = sorted((tmp_path / "multi.shards").glob("rank-*.h5"))
    assert [s.name for s in shards] == ["rank-000-of-002.h5", "rank-001-of-002.h5"]
    multi = _check_zoo(out, Recipe.load(TINY), limit=8)
    name = multi.architectures[0]
    a = np.lexsort((multi[name].metrics["epoch"], multi[name].metrics["run_id"]))
    b = np.lexsort((single[name].metrics["epoch"], single[name].metrics["run_id"]))
    for key, t in multi[name].params().items():
        torch.testing.assert_close(t[a], single[name].params()[key][b], rtol=0, atol=0)
