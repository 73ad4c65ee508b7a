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
from metanet.zoo import batched as batched_mod
from metanet.zoo import build as build_mod
from metanet.zoo import native as native_mod
from metanet.zoo.architectures import ArchError, arch_name, build_module, has_weight_space
from metanet.zoo.build import build_zoo, make_chunks
from metanet.zoo.data import recipe_task
from metanet.zoo.recipe import Recipe, RecipeError
from metanet.zoo.train import (
    classifier_data,
    engine_fingerprint,
    init_network,
    resolve_engine,
    train_chunk,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "zoo-tiny-mlp.yaml"
_TRAIN_CHUNK_TO_FILE = build_mod.train_chunk_to_file


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
        ({"shared_init": 0}, "shared_init"),
        ({"shared_init": True}, "shared_init"),
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
CNN_STRIDED = {"type": "cnn", "channels": [4, 8], "strides": [1, 2], "kernel": 3,
               "head": "flatten"}  # fmt: skip
CNN_POOL = {"type": "cnn", "channels": [3, 5], "strides": [2, 1], "kernel": 5, "head": "pool",
            "activation": "tanh"}  # fmt: skip


@pytest.mark.parametrize(
    "engine, arch, native",
    [
        ("vmap", {"type": "mlp", "widths": [8]}, False),
        ("batched", {"type": "mlp", "widths": [8]}, False),
        ("batched", {"type": "mlp", "widths": [8]}, True),
        ("vmap", CNN_STRIDED, False),
        ("batched", CNN_STRIDED, False),
        ("batched", CNN_STRIDED, True),
        ("batched", CNN_POOL, False),
        ("batched", {**CNN_POOL, "activation": "relu"}, True),
    ],
)
def test_chunk_engines_match_plain_per_network_training(engine, arch, native, monkeypatch):
    """Full-batch training (deterministic) of networks with different optimizers, lrs, weight
    decay, train subsets, label noise and epochs in ONE chunk (torch.func vmap engine and
    hand-batched engine) equals training each network alone with torch.optim on its own subset
    and labels."""
    raw = _recipe(
        architectures=[arch],
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
    if not native:  # the PyTorch ops of metanet.zoo.batched, as where no C compiler exists
        monkeypatch.setattr(batched_mod, "native_chain", lambda *a, **k: None)
    elif native_mod.library() is None:
        pytest.skip("no C compiler")
    else:  # the case runs the C kernels
        assert batched_mod.native_chain(batched_mod.BatchedNet(arch), "cpu") is not None
    r = Recipe.from_dict(raw)
    plans = r.plan(limit=4)
    assert len({p.hparams["optimizer"] for p in plans}) == 2
    arch = r.architectures[0]
    flat = arch["type"] == "mlp"
    data = classifier_data(plans, flat=flat, task=recipe_task(r.data))
    res = train_chunk(arch, plans, data, r.keep_fractions, engine=engine)
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
        x_test = d.x_test.flatten(1) if flat else d.x_test
        acc = (m(x_test).argmax(1) == d.y_test).float().mean().item()
        assert abs(res.metrics["test_acc"][final] - acc) < 1e-6


@pytest.mark.parametrize(
    "arch",
    [
        {"type": "mlp", "widths": [7, 5], "activation": "gelu", "dropout": True},
        {**CNN_STRIDED, "dropout": True},
        CNN_POOL,
        {"type": "cnn", "channels": [2, 3, 4], "strides": [2, 1, 2], "kernel": 3,
         "activation": "elu", "head": "flatten"},
        {"type": "siren", "widths": [6, 6], "w0": 20.0, "w0_first": 10.0},
    ],
)
def test_batched_forward_equals_modules(arch):
    """The hand-batched forward (per-network and shared inputs, dropout off) of N networks
    with different weights equals each module's own forward."""
    from metanet.zoo.architectures import input_shape
    from metanet.zoo.batched import BatchedNet

    net = BatchedNet(arch)
    mods = [init_network(arch, seed, "xavier_normal" if seed % 2 else "default") for seed in
            range(3)]  # fmt: skip
    for m in mods:  # nonzero biases
        for k, p in m.named_parameters():
            if k.endswith("bias"):
                torch.nn.init.normal_(p.data, std=0.3)
    flat = net.pack({k: torch.stack([dict(m.named_parameters())[k] for m in mods]).detach()
                     for k in net.keys})  # fmt: skip
    assert flat.shape == (3, sum(p.numel() for p in mods[0].parameters()))
    x = torch.rand(5, *input_shape(arch)) * 2 - 1
    with torch.no_grad():
        ref = torch.stack([m.eval()(x) for m in mods])
        shared = net.forward(net.views(flat, False), net.prepare(x), shared=True)
        per = net.forward(net.views(flat, False), net.prepare(x).expand(3, *net.prepare(x).shape))
    torch.testing.assert_close(shared, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net.forward_eval(net.views(flat, False), x), ref, atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    torch.testing.assert_close(per, ref, atol=1e-5, rtol=1e-5)
    for k, v in net.unpack(flat).items():
        torch.testing.assert_close(v[1], dict(mods[1].named_parameters())[k].detach())


@pytest.mark.parametrize("k, s, pad, c, co", [(3, 1, 1, 1, 4), (3, 2, 1, 4, 8), (5, 2, 2, 2, 3),
                                          (1, 1, 0, 3, 2), (3, 3, 0, 2, 2)])  # fmt: skip
def test_band_convolution_equals_conv2d_and_its_gradients(k, s, pad, c, co):
    """A convolution as banded row GEMMs (:class:`Band`) equals ``F.conv2d``; its hand-written
    transposes (weight and input gradients) equal autograd's."""
    from metanet.zoo.batched import Band

    h = w = 7
    band = Band(h, w, c, co, k, s, pad)
    x = torch.randn(2, c, h, w, dtype=torch.double, requires_grad=True)
    weight = torch.randn(1, co, c, k, k, dtype=torch.double, requires_grad=True)
    rows = x.permute(0, 2, 3, 1).reshape(1, 2, h, w * c)  # [N, B, H, W*C]
    cols = band.cols(rows)  # [N, B, Ho, k*W*C]
    out = (cols.reshape(1, -1, cols.shape[-1]) @ band.matrix(weight)).view(2, band.ho, band.wo, co)
    ref = F.conv2d(x, weight[0], stride=s, padding=pad)
    torch.testing.assert_close(out.permute(0, 3, 1, 2), ref)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, weight), g)
    with torch.no_grad():
        g2 = g.reshape(1, -1, band.wo * co)
        gm = cols.reshape(1, -1, cols.shape[-1]).transpose(1, 2) @ g2
        torch.testing.assert_close(band.weight_grad(gm).view_as(weight), gw)
        gc = (g2 @ band.matrix(weight).transpose(1, 2)).view(cols.shape)
        gr = band.cols_grad(gc).view(2, h, w, c).permute(0, 3, 1, 2)
        torch.testing.assert_close(gr, gx)


@pytest.mark.parametrize(
    "arch",
    [
        {"type": "mlp", "widths": [6, 5], "dropout": True},
        {"type": "cnn", "channels": [4, 8], "strides": [1, 2], "kernel": 3, "head": "flatten",
         "dropout": True},
        {"type": "cnn", "channels": [3, 5], "strides": [2, 1], "kernel": 5, "head": "pool"},
    ],
)  # fmt: skip
def test_manual_gradient_equals_autograd_with_dropout(arch):
    """The hand-written backward of ReLU chains (per-network dropout rates, per-sample loss
    weights) equals autograd through the batched forward (same dropout masks: same keys)."""
    from metanet.zoo.batched import BatchedNet

    net = BatchedNet(arch)
    assert net.manual
    flat = torch.randn(4, net.dim) * 0.5
    raw = torch.randn(28, 64) if not net.conv else torch.randn(28, 1, 8, 8)
    x = net.prepare(raw)
    x = x.view(4, 7, *x.shape[1:])
    y, w = torch.randint(0, 10, (4, 7)), torch.rand(4, 7)
    rate = torch.tensor([0.0, 0.2, 0.5, 0.9])
    from metanet.zoo.train import dropout_keys

    drop = (rate, dropout_keys(5, torch.arange(4), torch.zeros(4, dtype=torch.long)))
    grad = net.ce_grad(flat, x, y, w, drop)
    leaves = net.views(flat, requires_grad=True)
    out = net.forward(leaves, x, drop)
    loss = (F.cross_entropy(out.reshape(-1, 10), y.reshape(-1), reduction="none").view(4, 7)
            * w).sum()  # fmt: skip
    ref = torch.cat([g.reshape(4, -1) for g in torch.autograd.grad(loss, leaves)], dim=1)
    scale = ref.abs().max()
    torch.testing.assert_close(grad / scale, ref / scale, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "arch",
    [
        {"type": "mlp", "widths": [7, 5], "dropout": True},
        {"type": "cnn", "channels": [3, 4], "strides": [1, 2], "kernel": 3, "head": "flatten"},
        {"type": "cnn", "channels": [2], "kernel": 5, "head": "pool", "activation": "tanh"},
        {"type": "siren", "widths": [6, 6]},
    ],
)  # fmt: skip
def test_init_rows_equal_one_module_per_network(arch):
    """The batched engine's initialization (one module re-initialized per network) gives exactly
    the parameters of :func:`init_network` for every scheme, scale and seed."""
    from metanet.zoo.recipe import NetworkPlan
    from metanet.zoo.train import init_rows

    schemes = ["default", "kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal",
               "orthogonal", "normal"]  # fmt: skip
    plans = [
        NetworkPlan(i, 0, 100 + i, {"init": schemes[i % len(schemes)], "init_scale": 0.5 + i / 4})
        for i in range(9)
    ]
    rows = init_rows(arch, plans)
    for row, p in zip(rows, plans):
        m = init_network(arch, p.weight_seed, p.hparams["init"], p.hparams["init_scale"])
        ref = torch.cat([q.detach().reshape(-1) for q in m.parameters()])
        assert torch.equal(row, ref), p.hparams


NATIVE_ARCHS = [
    {"type": "mlp", "widths": [32, 16], "dropout": True},
    {"type": "cnn", "channels": [4, 8], "strides": [1, 2], "kernel": 3, "head": "flatten",
     "dropout": True},
    {"type": "cnn", "channels": [3, 5], "strides": [2, 1], "kernel": 5, "head": "pool"},
    {"type": "cnn", "channels": [2, 3], "strides": [2, 2], "kernel": 1, "head": "flatten"},
]  # fmt: skip


@pytest.mark.skipif(native_mod.library() is None, reason="no C compiler")
@pytest.mark.parametrize("arch", NATIVE_ARCHS)
def test_native_kernels_equal_the_pytorch_engine(arch):
    """The fused C kernels: gradients, losses and evaluation logits equal the batched PyTorch
    ops (no dropout), for odd batch sizes (partial SIMD blocks) and several networks."""
    net = batched_mod.BatchedNet(arch)
    chain = native_mod.NativeChain(net)
    m, b = 3, 13
    flat = torch.randn(m, net.dim) * 0.5
    raw = torch.randn(m * b, 64) if not net.conv else torch.randn(m * b, 1, 8, 8)
    x = net.prepare(raw).view(m, b, *net.prepare(raw).shape[1:])
    y, w = torch.randint(0, 10, (m, b)), torch.rand(m, b)
    grad, loss = chain.ce_grad(flat, raw.view(m, b, -1), y, w, None)
    ref = net.ce_grad(flat, x, y, w, None)
    scale = ref.abs().max()
    torch.testing.assert_close(grad / scale, ref / scale, atol=2e-6, rtol=1e-5)
    out = net.forward(net.views(flat, False), x)
    ref_loss = (F.cross_entropy(out.reshape(-1, 10), y.reshape(-1), reduction="none")
                .view(m, b) * w).sum(1)  # fmt: skip
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    logits = chain.forward(flat, raw[:11])
    torch.testing.assert_close(logits, net.forward_eval(net.views(flat, False), raw[:11]),
                               atol=1e-4, rtol=1e-5)  # fmt: skip


def test_native_kernels_fall_back_with_a_warning_where_they_cannot_be_built(tmp_path,
                                                                           monkeypatch):
    """An unwritable cache folder or a failing compiler: ``library()`` is ``None`` with a warning
    naming the cause, and the batched engine uses its PyTorch ops."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.delenv("METANET_NO_NATIVE", raising=False)  # the kernels are wanted here
    monkeypatch.setenv("METANET_CACHE", str(blocker))
    native_mod.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="unavailable"):
            assert native_mod.library() is None
        native_mod.library.cache_clear()
        monkeypatch.setenv("METANET_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
        with pytest.warns(UserWarning, match="compiling"):
            assert native_mod.library() is None
        net = batched_mod.BatchedNet({"type": "mlp", "widths": [8]})
        assert batched_mod.native_chain(net, torch.device("cpu")) is None
    finally:
        native_mod.library.cache_clear()


@pytest.mark.skipif(native_mod.library() is None, reason="no C compiler")
def test_native_dropout_is_keyed_and_drops_everything_at_rate_one():
    from metanet.zoo.train import dropout_keys

    net = batched_mod.BatchedNet(NATIVE_ARCHS[1])
    chain = native_mod.NativeChain(net)
    flat = torch.randn(2, net.dim) * 0.5
    x, y, w = torch.randn(2, 16, 64), torch.randint(0, 10, (2, 16)), torch.full((2, 16), 1 / 16)
    half = torch.tensor([0.5, 0.5])

    def keys(seed: int) -> torch.Tensor:
        return dropout_keys(seed, torch.arange(2), torch.zeros(2, dtype=torch.long))

    g1, _ = chain.ce_grad(flat, x, y, w, half, keys(1))
    g1b, _ = chain.ce_grad(flat, x, y, w, half, keys(1))
    g2, _ = chain.ce_grad(flat, x, y, w, half, keys(2))
    g0, _ = chain.ce_grad(flat, x, y, w, torch.zeros(2), keys(1))
    assert torch.equal(g1, g1b) and not torch.equal(g1, g2) and not torch.equal(g1, g0)
    torch.testing.assert_close(g0, chain.ce_grad(flat, x, y, w, None)[0])
    # the C kernels draw exactly the masks of the PyTorch ops (one definition of the masks)
    xp = net.prepare(x.reshape(32, 1, 8, 8))
    ref = net.ce_grad(flat, xp.view(2, 16, *xp.shape[1:]), y, w, (half, keys(1)))
    scale = ref.abs().max()
    torch.testing.assert_close(g1 / scale, ref / scale, atol=1e-6, rtol=1e-5)
    # everything dropped after each ReLU: only the output bias gets a gradient
    g, _ = chain.ce_grad(flat, x, y, w, torch.ones(2), keys(3))
    bias = net.offsets[-2]
    assert g[:, :bias].abs().max() == 0 and g[:, bias:].abs().max() > 0


def test_dropout_multipliers_keep_the_rate_and_the_mean():
    from metanet.zoo.train import dropout_keys, dropout_multipliers

    rate = torch.tensor([0.0, 0.1, 0.5, 0.9])
    keys = dropout_keys(0, torch.arange(4), torch.zeros(4, dtype=torch.long))
    m = dropout_multipliers(keys, rate, 2, 200, 500)
    dropped = (m == 0).float().mean(dim=(1, 2))
    torch.testing.assert_close(dropped, rate, atol=4e-3, rtol=0)
    torch.testing.assert_close(m.mean(dim=(1, 2)), torch.ones(4), atol=3e-2, rtol=0)  # 3 sigma
    values = m[1].unique().tolist()
    assert values[0] == 0.0 and len(values) == 2
    assert values[1] == pytest.approx(1 / 0.9, rel=1e-4)


def test_diverging_networks_are_frozen_and_flagged():
    raw = _recipe(hparams={"lr": 1e37, "optimizer": "sgd", "batch_size": 64, "epochs": 2,
                           "init_scale": 10.0})  # fmt: skip
    r = Recipe.from_dict(raw)
    plans = r.plan(limit=2)
    data = classifier_data(plans, flat=True, task=recipe_task(r.data))
    res = train_chunk(r.architectures[0], plans, data, [1.0])
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


def test_siren_shared_init_starts_every_inr_from_one_init(tmp_path):
    raw = {
        "name": "siren-shared",
        "kind": "siren",
        "data": {"train_images": 3, "test_images": 2},
        "architectures": [{"type": "siren", "widths": [8, 8], "w0": 30.0}],
        "shared_init": 2,
        "chunk_size": 5,
        "hparams": {"lr": 3e-3, "epochs": 30},
    }
    r = Recipe.from_dict(raw)
    plans = r.plan()
    assert [p.weight_seed for p in plans][:2] == [p.weight_seed for p in plans][2:4]
    assert plans[0].weight_seed != plans[1].weight_seed
    assert len({p.seed for p in plans}) == 5
    assert r.fingerprint() != Recipe.from_dict({**raw, "shared_init": None}).fingerprint()
    arch = r.architectures[0]
    inits = [dict(init_network(arch, p.weight_seed).named_parameters()) for p in plans]
    torch.testing.assert_close(inits[0]["0.weight"], inits[2]["0.weight"])
    assert not torch.equal(inits[0]["0.weight"], inits[1]["0.weight"])
    out = build_zoo(r, tmp_path / "shared.h5", progress=False)
    g = Zoo.open(out)[arch_name(arch)]
    m = g.metrics
    assert m["init_seed"].tolist() == [p.weight_seed for p in plans]
    d = load_digits()
    coords = digit_image_coordinates(8)
    for i, p in enumerate(plans):  # recorded PSNR is the INR's; fitting raised it from the init
        target = (d.x_train if p.split == 0 else d.x_test)[p.image_index].reshape(64, 1)
        with torch.no_grad():
            psnr = -10 * np.log10(F.mse_loss(g.module(i)(coords), target).item())
            init_mse = F.mse_loss(init_network(arch, p.weight_seed)(coords), target).item()
        assert abs(psnr - m["psnr"][i]) < 1e-3
        assert psnr > -10 * np.log10(init_mse) + 5
    # INRs of one shared init stay close to it: much closer than two different inits are
    d_same = (g.params()["0.weight"][0] - inits[0]["0.weight"]).norm()
    d_init = (inits[0]["0.weight"] - inits[1]["0.weight"]).norm()
    assert d_same < 0.5 * d_init


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
    assert list(zoo.attrs["engines"]) == [resolve_engine(a) for a in r.architectures]
    engines = [engine_fingerprint(e) for e in zoo.attrs["engines"]]
    assert zoo.attrs["fingerprint"] == r.fingerprint(6, engines)
    # an engine whose arithmetic changed gets a new revision, hence a new fingerprint
    assert engine_fingerprint("vmap") != "vmap" and engine_fingerprint("batched") == "batched"
    assert r.fingerprint(6, ["vmap/2"]) != r.fingerprint(6, ["vmap"])
    assert zoo.attrs["data_provider"] == "digits" and len(zoo.attrs["data_fingerprint"]) == 64
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


def test_worker_processes_build_the_same_zoo_as_one_process(tmp_path, monkeypatch):
    """``workers=2`` trains the chunks in two forked processes: every record (parameters and
    metrics) equals the one-process build exactly; a worker's error reaches the caller."""
    one = build_zoo(TINY, tmp_path / "one.h5", progress=False)
    two = build_zoo(TINY, tmp_path / "two.h5", progress=False, workers=2)
    with Zoo.open(one) as a, Zoo.open(two) as b:
        name = a.architectures[0]
        ga, gb = a[name], b[name]
        assert len(ga) == len(gb) >= 12
        for k in ("run_id", "epoch", "train_acc", "test_loss"):
            np.testing.assert_array_equal(ga.metrics[k], gb.metrics[k])
        pa, pb = ga.params(), gb.params()
        for k in pa:
            assert torch.equal(pa[k], pb[k]), k
    with pytest.raises(ValueError, match="workers"):
        build_zoo(TINY, tmp_path / "bad.h5", progress=False, workers=0)
    monkeypatch.setattr(build_mod, "train_chunk_to_file", _fail_on_chunk_one)
    with pytest.raises(RuntimeError, match="chunk 1 failed"):
        build_zoo(TINY, tmp_path / "fail.h5", progress=False, workers=2)
    assert not (tmp_path / "fail.h5").exists()


def _fail_on_chunk_one(recipe, chunk, *args, **kwargs):
    """A chunk trainer for the worker test: chunk 1 fails, the others train as usual."""
    if chunk.index == 1:
        raise RuntimeError("chunk 1 failed")
    return _TRAIN_CHUNK_TO_FILE(recipe, chunk, *args, **kwargs)


def _parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.parts/*/chunk-*.h5"))


# The building subprocess: the real CLI, with chunk 2 held back until the test has seen chunks 0
# and 1 on disk, so the SIGKILL always lands while the build is mid-way (never before the first
# chunk, never after the last), however slow or loaded the machine is.
_KILL_DRIVER = """
import sys, time
from metanet.zoo import build
real = build.train_chunk_to_file
def held(recipe, chunk, *args, **kwargs):
    if chunk.index == 2:
        time.sleep(600)
    return real(recipe, chunk, *args, **kwargs)
build.train_chunk_to_file = held
from metanet.zoo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_build_then_rerun_completes_exactly_once(tmp_path, monkeypatch):
    """A real SIGKILL of a building subprocess (after two chunks are durably written), then the
    same build in-process: every network exactly once, bit-identical to an uninterrupted build,
    finished chunks not retrained, a damaged chunk and a stray temporary file handled."""
    recipe_path = tmp_path / "kill.yaml"
    recipe_path.write_text(yaml.safe_dump(_recipe(
        name="kill", networks_per_arch=4, chunk_size=1,
        hparams={"lr": 0.01, "optimizer": {"choice": ["sgd", "adam"]}, "train_fraction": 0.1,
                 "dropout": {"uniform": [0.0, 0.3]}, "batch_size": 64,
                 "epochs": {"int_uniform": [1, 2]}},
    )))  # fmt: skip
    out = tmp_path / "killed.h5"
    recipe = Recipe.load(recipe_path)
    n_chunks = len(make_chunks(recipe, recipe.plan()))
    assert n_chunks == 4
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_DRIVER, "build", str(recipe_path), "-o", str(out),
         "--no-progress", "--threads", "1"],  # fmt: skip
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    # the uninterrupted reference build runs while the subprocess starts up
    ref = Zoo.open(build_zoo(recipe_path, tmp_path / "ref.h5", progress=False))
    deadline = time.time() + 120
    while len(_parts(out)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = _parts(out)
    assert len(done) == 2 and not out.exists()
    # damage one finished chunk and leave a stray temporary file: both must be handled
    done[-1].write_bytes(done[-1].read_bytes()[:100])
    (done[0].parent / ".chunk-00004.h5.junk.tmp").write_bytes(b"partial")
    calls = []
    real = build_mod.train_chunk_to_file
    monkeypatch.setattr(build_mod, "train_chunk_to_file",
                        lambda r, c, *a, **k: (calls.append(c.index), real(r, c, *a, **k)))
    build_zoo(recipe_path, out, progress=False)
    assert sorted(calls) == list(range(1, n_chunks))  # chunk 0 intact, chunk 1 damaged
    zoo = _check_zoo(out, recipe)
    assert not (tmp_path / "killed.h5.parts").exists()
    name = zoo.architectures[0]
    order_a = np.lexsort((zoo[name].metrics["epoch"], zoo[name].metrics["run_id"]))
    order_b = np.lexsort((ref[name].metrics["epoch"], ref[name].metrics["run_id"]))
    assert len(order_a) == len(order_b) == sum(
        len({max(1, round(f * p.hparams["epochs"])) for f in recipe.keep_fractions})
        for p in recipe.plan()
    )
    for key, t in zoo[name].params().items():
        torch.testing.assert_close(t[order_a], ref[name].params()[key][order_b], rtol=0, atol=0)
    np.testing.assert_array_equal(
        zoo[name].metrics["test_acc"][order_a], ref[name].metrics["test_acc"][order_b]
    )


_KILL_WORKERS_DRIVER = """
import os, sys, time
from metanet.zoo import build
def held(recipe, chunk, *args, **kwargs):
    open(os.path.join(os.environ["PID_DIR"], str(os.getpid())), "w").close()
    time.sleep(600)
build.train_chunk_to_file = held
from metanet.zoo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _held_build(tmp_path: Path, out: Path, workers: int) -> tuple[subprocess.Popen, list[int]]:
    """A ``metanet zoo build`` subprocess of TINY into ``out`` whose chunk workers (``workers``
    of them; the build process itself when 1) sleep once they start; returns it once all train."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PID_DIR": str(pid_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_WORKERS_DRIVER, "build", str(TINY), "-o", str(out),
         "--no-progress", "--workers", str(workers)],  # fmt: skip
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while len(list(pid_dir.iterdir())) < workers and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    pids = [int(p.name) for p in pid_dir.iterdir()]
    assert len(pids) == workers, proc.stderr.read()[-2000:]
    return proc, pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigkill_of_a_build_with_workers_leaves_no_orphan_worker(tmp_path):
    """SIGKILL of ``metanet zoo build --workers 2`` while both workers train: the workers exit
    on their own (no orphan keeps training or idling)."""
    proc, workers = _held_build(tmp_path, tmp_path / "w.h5", workers=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    orphans = [w for w in workers if _alive(w)]
    for w in orphans:  # do not leave them sleeping if the test fails
        os.kill(w, signal.SIGKILL)
    assert not orphans


def test_a_second_build_of_the_same_zoo_is_refused_while_the_first_runs(tmp_path, capsys):
    """While one build of ``out`` runs, another (API or CLI) fails at once naming the PID of the
    first, and writes nothing; once the first is killed, the lock is free without any clean-up."""
    from metanet.zoo.cli import main
    from metanet.zoo.lock import ZooBuildLocked, lock_path

    out = tmp_path / "locked.h5"
    proc, _ = _held_build(tmp_path, out, workers=1)
    try:
        with pytest.raises(ZooBuildLocked, match=rf"another build of this zoo .*PID {proc.pid}"):
            build_zoo(TINY, out, progress=False)
        assert main(["build", str(TINY), "-o", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("metanet zoo build: error:") and f"PID {proc.pid}" in err
        assert "\n" not in err and not out.exists()
        # a different output is not locked by this build
        other = build_zoo(TINY, tmp_path / "other.h5", progress=False)
        assert Zoo.open(other).architectures
    finally:
        proc.kill()
        proc.wait()
    zoo = Zoo.open(build_zoo(TINY, out, progress=False))  # SIGKILL left no stale lock
    assert zoo.architectures and not lock_path(out).exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_ctrl_c_stops_a_build_with_workers_at_once(tmp_path):
    """SIGINT to ``metanet zoo build --workers 2`` while both workers train: the build exits
    within seconds with status 130 and a one-line message, its workers killed, not waited for."""
    proc, workers = _held_build(tmp_path, tmp_path / "w.h5", workers=2)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    for w in workers:
        if _alive(w):  # do not leave them sleeping if the test fails
            os.kill(w, signal.SIGKILL)
    err = proc.stderr.read().decode().strip()
    assert proc.returncode == 130, err[-2000:]
    assert err.splitlines()[-1].startswith("metanet zoo build: interrupted")
    assert not any(_alive(w) for w in workers)


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


ZOO_RECIPES = [  # datasets/ also holds the GHN architecture family (no "kind")
    p for p in sorted((REPO / "datasets").glob("*.yaml")) if "kind" in yaml.safe_load(p.read_text())
]


@pytest.mark.parametrize("path", ZOO_RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load_and_plan(path: Path) -> None:
    recipe = Recipe.load(path)
    plans = recipe.plan(limit=3)
    assert recipe.num_networks >= 1  # digits-mlp-onerun is one run with dense checkpoints
    assert recipe.name == path.stem and len(plans) == min(3, recipe.num_networks)


@pytest.mark.parametrize("arch", [{"type": "mlp", "widths": [8]}, CNN_STRIDED],
                         ids=["mlp", "cnn"])  # fmt: skip
@pytest.mark.parametrize("native", [False, True], ids=["torch-ops", "native"])
@pytest.mark.parametrize("dropout", [False, True], ids=["", "dropout"])
def test_engines_agree_on_mini_batches(arch, native, dropout, monkeypatch):
    """Mini-batch training (several steps per epoch, train subsets, label noise, both
    optimizers, per-network dropout): the vmap reference engine and the batched engine (PyTorch
    ops or the C kernels) read one drawn sample order and one definition of the dropout masks,
    and give the same networks up to float rounding."""
    raw = _recipe(architectures=[arch], keep_fractions=[0.5, 1.0], hparams={
        "lr": {"log_uniform": [0.01, 0.05]}, "optimizer": {"choice": ["sgd", "adam"]},
        "train_fraction": {"uniform": [0.1, 0.3]}, "label_noise": {"uniform": [0.0, 0.3]},
        "batch_size": {"choice": [16, 32]}, "epochs": {"int_uniform": [2, 3]},
        "dropout": {"uniform": [0.1, 0.4]} if dropout else 0.0})  # fmt: skip
    if not native:
        monkeypatch.setattr(batched_mod, "native_chain", lambda *a, **k: None)
    elif native_mod.library() is None:
        pytest.skip("no C compiler")
    r = Recipe.from_dict(raw)
    plans = [p for p in r.plan(limit=8) if p.hparams["batch_size"] == 16][:4]
    assert len(plans) >= 2
    data = classifier_data(plans, flat=arch["type"] == "mlp", task=recipe_task(r.data))
    assert (data.subset.sum(1) > 2 * 16).all()  # several mini-batches per epoch
    ref = train_chunk(r.architectures[0], plans, data, r.keep_fractions, engine="vmap",
                      generator_seed=7)  # fmt: skip
    got = train_chunk(r.architectures[0], plans, data, r.keep_fractions, engine="batched",
                      generator_seed=7)  # fmt: skip
    assert ref.metrics["epoch"].tolist() == got.metrics["epoch"].tolist()
    for k in ref.params:  # Adam divides by sqrt(v): rounding grows where gradients vanish
        diff = (got.params[k] - ref.params[k]).abs()
        assert float(diff.max()) < 1e-3, k
        assert float((diff > 5e-5).float().mean()) < 0.01, k  # another order moves every weight
    np.testing.assert_allclose(got.metrics["test_acc"], ref.metrics["test_acc"], atol=0.01)
