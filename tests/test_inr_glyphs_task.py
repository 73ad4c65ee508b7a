"""The INR classification task on glyphs: the SIREN initializations a zoo can start from (today's
SIREN init and the one of the DWSNets / NFN MNIST-INR zoos) and a glyph zoo built with the
latter."""

from __future__ import annotations

import math
import os

import pytest
import torch
import yaml

from metanet.zoo.architectures import (
    DWS_OUTPUT_OFFSET,
    ArchError,
    arch_name,
    arch_to_json,
    build_module,
    normalize_arch,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIREN = {"type": "siren", "widths": [32, 32], "w0": 30.0}


def _bench_script():
    from script_module import load_script

    return load_script("bench_inr_glyphs")


def _params(arch: dict, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in build_module(arch).named_parameters()}


def test_default_init_is_unchanged_and_stays_out_of_names_and_json():
    # "siren" is the default: same arch dict, group name and JSON as before the key existed
    for arch in (SIREN, {**SIREN, "init": "siren"}):
        a = normalize_arch(arch)
        assert "init" not in a
        assert arch_name(arch) == "siren-i2-w32x32-o1-w0-30"
        assert arch_to_json(arch) == arch_to_json(SIREN)
    p = _params(SIREN, 0)
    # random biases U(-1/sqrt(in), 1/sqrt(in)); the last layer SIREN-scaled like a hidden one
    assert p["0.bias"].abs().max() <= 1 / math.sqrt(2) and p["0.bias"].std() > 0.2
    assert p["2.bias"].abs().min() > 0
    assert p["4.weight"].abs().max() <= math.sqrt(6 / 32) / 30
    assert p["4.bias"].abs().max() <= 1 / math.sqrt(32)
    for k, v in _params({**SIREN, "init": "siren"}, 0).items():
        assert torch.equal(v, p[k]), k


def test_dws_init_follows_the_mnist_inr_zoos():
    arch = {**SIREN, "init": "dws"}
    assert normalize_arch(arch)["init"] == "dws"
    assert arch_name(arch) == "siren-i2-w32x32-o1-w0-30-init-dws"
    ws = {k: [] for k in ("0.weight", "2.weight", "4.weight", "4.bias")}
    for seed in range(40):
        p = _params(arch, seed)
        # hidden biases zero; every sine layer, the first included, scaled like a hidden one
        # (the reference INR builds them all with is_first=False)
        assert torch.equal(p["0.bias"], torch.zeros(32))
        assert torch.equal(p["2.bias"], torch.zeros(32))
        assert p["0.weight"].abs().max() <= math.sqrt(6 / 2) / 30
        assert p["2.weight"].abs().max() <= math.sqrt(6 / 32) / 30
        for k in ws:
            ws[k].append(p[k].flatten())
    w = {k: torch.cat(v) for k, v in ws.items()}
    bound = 1 / math.sqrt(32)  # nn.Linear's default on the output layer
    assert w["4.weight"].abs().max() <= bound
    # uniform on [-b, b] has std b / sqrt(3): the default Linear init, not the SIREN scale
    assert w["4.weight"].std() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert w["0.weight"].std() == pytest.approx(math.sqrt(6 / 2) / 30 / math.sqrt(3), rel=0.1)
    # the reference's +0.5 on the output lives in the last bias
    assert ((w["4.bias"] - DWS_OUTPUT_OFFSET).abs() <= bound).all()
    assert w["4.bias"].mean() == pytest.approx(DWS_OUTPUT_OFFSET, abs=0.06)
    # independent draws per seed
    assert not torch.equal(_params(arch, 0)["0.weight"], _params(arch, 1)["0.weight"])


def test_dws_init_is_the_reference_network_plus_offset():
    # f(x) of the folded network == the same weights without the offset, plus 0.5
    torch.manual_seed(3)
    net = build_module({**SIREN, "init": "dws"})
    x = torch.rand(50, 2) * 2 - 1
    with torch.no_grad():
        out = net(x)
        net[4].bias.sub_(DWS_OUTPUT_OFFSET)
        assert torch.allclose(out, net(x) + DWS_OUTPUT_OFFSET, atol=1e-6)


def test_unknown_init_is_refused_naming_the_key():
    with pytest.raises(ArchError, match="'init'"):
        normalize_arch({**SIREN, "init": "kaiming"})
    with pytest.raises(ArchError, match="'init'"):
        build_module({**SIREN, "init": 3})


@pytest.mark.parametrize("engine", ["batched", "vmap"])
def test_glyph_zoo_with_dws_init_fits_its_images(tmp_path, engine):
    from metanet.data.providers.signals import SignalData
    from metanet.data.zoo_store import Zoo
    from metanet.zoo.build import build_zoo
    from metanet.zoo.data import recipe_task
    from metanet.zoo.recipe import Recipe

    with open(os.path.join(ROOT, "datasets", "glyphs-siren-tiny.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["data"].update(train_samples=6, test_samples=2, train_images=6, test_images=2)
    raw["architectures"] = [{**SIREN, "init": "dws"}]
    raw["hparams"].update(epochs=300, lr=5e-3, psnr_target=60.0)  # the glyphs-siren recipe
    raw["chunk_size"] = 8
    recipe = Recipe.from_dict(raw)
    out = build_zoo(recipe, tmp_path / f"{engine}.h5", progress=False, threads=1, engine=engine)
    task = recipe_task(recipe.data)
    sig = SignalData.from_task(task, "train")
    with Zoo.open(out) as zoo:
        assert zoo.architectures == ["siren-i2-w32x32-o1-w0-30-init-dws"]
        g = zoo[zoo.architectures[0]]
        assert g.arch["init"] == "dws"
        m = g.metrics
        for i in range(len(g)):
            if m["split"][i] != 0:
                continue
            coords, values = sig[int(m["image_index"][i])]
            with torch.no_grad():
                mse = float(torch.nn.functional.mse_loss(g.module(i)(coords), values))
            # far below the image's own variance (what a constant output reaches) and the PSNR
            # of a SIREN that drew the image: the fit is real
            assert mse < 0.1 * float(values.var())
            assert m["psnr"][i] > 20
            assert m["train_loss"][i] == pytest.approx(mse, rel=1e-4)
        # the benchmark's rendered-image reference draws exactly each INR's function on the
        # grid it was fitted on
        bench = _bench_script()
        images = bench.render_inrs(g, list(range(len(g))), 28)
        for i in range(len(g)):
            if m["split"][i] != 0:
                continue
            coords, _ = sig[int(m["image_index"][i])]
            with torch.no_grad():
                expected = g.module(i)(coords).flatten()
            assert torch.allclose(images[i], expected, atol=1e-5)
        # the trained hidden biases moved away from their zero start, independently per INR
        b = g.params()["2.bias"].flatten(1)
        assert b.abs().mean() > 1e-4
        assert torch.cdist(b, b).add(torch.eye(len(b)) * 1e3).min() > 1e-5


# ------------------------------------------------------------------------------------------------
# per-layer value standardization of the graph metanetworks
# ------------------------------------------------------------------------------------------------
def _siren_graphs(n: int, seed: int = 0) -> list:
    from metanet.graph import from_module

    torch.manual_seed(seed)
    return [from_module(build_module(SIREN), torch.zeros(1, 2), max_kernel_size=1)
            for _ in range(n)]  # fmt: skip


def test_layer_stats_separate_siren_layers_that_type_stats_mix():
    from torch_geometric.data import Batch

    from metanet.graph.paramgraph import EdgeType, NodeType
    from metanet.nn.graph_features import GraphStats, layer_keys, read_batch

    graphs = _siren_graphs(20)
    stats = GraphStats.from_graphs(graphs)
    assert stats.has_layer_stats
    g = read_batch(Batch.from_data_list(graphs))
    depth = g.node_layer[g.dst]
    assert sorted(depth.unique().tolist()) == [1, 2, 3]
    by_type = stats.edge_std[EdgeType.LINEAR, 0]
    stds = []
    for d in (1, 2, 3):  # the weights into layer d: one Linear layer of the SIRENs each
        w = g.edge_attr[depth == d, 0].double()
        key = int(layer_keys(torch.tensor(int(EdgeType.LINEAR)), torch.tensor(d)))
        assert float(stats.edge_layer_mean[key, 0]) == pytest.approx(float(w.mean()), abs=1e-6)
        assert float(stats.edge_layer_std[key, 0]) == pytest.approx(float(w.std(unbiased=False)),
                                                                    rel=1e-4)  # fmt: skip
        stds.append(float(stats.edge_layer_std[key, 0]))
    # SIREN layers differ ~30x in scale; the per-type std sits between them
    assert max(stds) / min(stds) > 10 and min(stds) < float(by_type) < max(stds)
    # a (type, depth) without values falls back to its type's statistics
    empty = int(layer_keys(torch.tensor(int(EdgeType.LINEAR)), torch.tensor(10)))
    assert torch.equal(stats.edge_layer_std[empty], stats.edge_std[EdgeType.LINEAR])
    hidden = int(layer_keys(torch.tensor(int(NodeType.HIDDEN)), torch.tensor(1)))
    b = g.x[g.node_layer == 1, 0].double()
    assert float(stats.node_layer_std[hidden, 0]) == pytest.approx(float(b.std(unbiased=False)),
                                                                   rel=1e-4)  # fmt: skip


@pytest.mark.parametrize("model", ["gmn", "ngt"])
def test_layer_standardized_models_see_unit_scale_layers_and_stay_invariant(model):
    from torch_geometric.data import Batch

    from metanet.graph import from_module
    from metanet.nn.gmn import GMN
    from metanet.nn.graph_features import GraphStats, layer_keys, read_batch
    from metanet.nn.ngt import NGT

    graphs = _siren_graphs(30)
    make = {"gmn": lambda: GMN(edge_in_dim=1, hidden=8, num_layers=2, standardize="layer"),
            "ngt": lambda: NGT(edge_in_dim=1, hidden=8, edge_dim=8, num_layers=2, heads=2,
                               standardize="layer")}[model]  # fmt: skip
    torch.manual_seed(0)
    net = make().eval()
    net.set_data_statistics(GraphStats.from_graphs(graphs))
    g = read_batch(Batch.from_data_list(graphs))
    keys = layer_keys(g.edge_type, g.node_layer[g.dst])
    z = net.edges.standardize(g.edge_attr, keys)[:, 0]
    for d in (1, 2, 3):  # every layer's weights standardized on their own: mean 0, std 1
        zd = z[g.node_layer[g.dst] == d]
        assert float(zd.mean()) == pytest.approx(0.0, abs=1e-4)
        assert float(zd.std(unbiased=False)) == pytest.approx(1.0, rel=1e-3)
    # permuting a SIREN's hidden neurons leaves the graph-level output unchanged
    torch.manual_seed(5)
    module = build_module(SIREN)
    sd = {k: v.clone() for k, v in module.state_dict().items()}
    p1, p2 = torch.randperm(32), torch.randperm(32)
    perm = {"0.weight": sd["0.weight"][p1], "0.bias": sd["0.bias"][p1],
            "2.weight": sd["2.weight"][p2][:, p1], "2.bias": sd["2.bias"][p2],
            "4.weight": sd["4.weight"][:, p2], "4.bias": sd["4.bias"]}  # fmt: skip
    g1 = from_module(module, torch.zeros(1, 2), max_kernel_size=1)
    module.load_state_dict(perm)
    g2 = from_module(module, torch.zeros(1, 2), max_kernel_size=1)
    with torch.no_grad():
        torch.testing.assert_close(net(g1), net(g2), rtol=1e-4, atol=1e-5)


def test_standardize_mode_is_checked():
    from metanet.nn.gmn import GMN
    from metanet.nn.graph_features import GraphStatsAccumulator

    with pytest.raises(ValueError, match="standardize"):
        GMN(hidden=8, num_layers=1, standardize="batch")
    # statistics collected without depths cannot serve a per-layer model
    g = _siren_graphs(1)[0]
    acc = GraphStatsAccumulator(g.x.size(1), g.edge_attr.size(1))
    acc.add_values(g.x, g.node_type, g.edge_attr, g.edge_type)
    acc.add_degrees(torch.ones(g.num_nodes, dtype=torch.long),
                    torch.ones(g.num_nodes, dtype=torch.long))  # fmt: skip
    stats = acc.result()
    assert not stats.has_layer_stats
    GMN(edge_in_dim=1, hidden=8, num_layers=1).set_data_statistics(stats)  # per type: fine
    with pytest.raises(ValueError, match="per-layer statistics"):
        GMN(edge_in_dim=1, hidden=8, num_layers=1, standardize="layer").set_data_statistics(stats)


def test_datamodule_graph_stats_carry_the_train_split_layer_stats(tmp_path):
    from metanet.data.datamodules import ParamGraphDataModule
    from metanet.nn.graph_features import GraphStats
    from metanet.zoo.build import build_zoo
    from metanet.zoo.recipe import Recipe

    with open(os.path.join(ROOT, "datasets", "glyphs-siren-tiny.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["data"].update(train_samples=12, test_samples=4, train_images=12, test_images=4)
    raw["hparams"]["epochs"] = 5
    out = build_zoo(Recipe.from_dict(raw), tmp_path / "z.h5", progress=False, threads=1)
    dm = ParamGraphDataModule(out, target="label", splits=(0.5, 0.25, 0.25), batch_size=4,
                              max_kernel_size=1)  # fmt: skip
    stats = dm.graph_stats
    assert stats.has_layer_stats
    again = GraphStats.from_graphs(batch for batch, _ in dm.train_dataloader())
    for key in ("edge_layer_mean", "edge_layer_std", "node_layer_mean", "node_layer_std"):
        torch.testing.assert_close(getattr(stats, key), getattr(again, key), rtol=1e-5,
                                   atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("preset", ["permutation", "input", "noise", "mixup", "signflip",
                                    "dwsnets"])  # fmt: skip
def test_bench_augmentation_presets_build_and_keep_the_batch(preset):
    """Each ``--augment`` preset of the benchmark is a Compose the CLI can build; it keeps the
    batch's shapes, and ``input`` changes only the first layer."""
    import json

    from metanet.weightspace import WeightSpace

    bench = _bench_script()
    args = bench.augmentation_args([preset])
    assert args[0] == "--data.init_args.transforms"
    transform = bench.instantiate(json.loads(args[1]))
    assert type(transform).__name__ == "Compose"
    torch.manual_seed(0)
    ws = WeightSpace.from_modules([build_module({**SIREN, "init": "dws"}) for _ in range(4)])
    y = torch.tensor([0, 1, 2, 3])
    out, y_out = transform(ws, y, generator=torch.Generator().manual_seed(0))
    assert [w.shape for w in out.weights] == [w.shape for w in ws.weights]
    assert y_out.shape[0] == 4 and bool(torch.isfinite(y_out).all())
    assert out.max_abs_diff(ws) > 1e-4
    if preset == "input":
        assert not torch.equal(out.weights[0], ws.weights[0])
        assert all(torch.equal(a, b) for a, b in zip(out.weights[1:], ws.weights[1:]))



def test_bench_augment_none_overrides_the_configs_sign_flips(tmp_path):
    """``glyphs_dws.yaml`` trains with RandomSignFlip; ``--augment none`` trains without it and
    no ``--augment`` keeps the config's."""
    from tiny_zoo import build_tiny_inr_zoo

    from metanet.cli import MetanetCLI
    from metanet.weightspace.augment import RandomSignFlip

    bench = _bench_script()
    assert bench.augmentation_args([]) == []
    path = build_tiny_inr_zoo(str(tmp_path / "inr.h5"), per_class=1, steps=5)
    base = ["--config", os.path.join(ROOT, "configs", "inr", "glyphs_dws.yaml"),
            "--data.init_args.zoo", path, "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    assert isinstance(MetanetCLI(base, run=False).datamodule.transforms, RandomSignFlip)
    none = MetanetCLI(base + bench.augmentation_args(["none"]), run=False)
    assert none.datamodule.transforms is None


def test_bench_weight_augmenter_permutes_the_mlps_networks_without_changing_them(tmp_path):
    """The raw-weight MLP's ``--augment permutation`` batches: new flattened weights (standardized
    as the un-augmented ones) of networks that draw the same images."""
    from metanet.data.datamodules import WeightSpaceDataModule
    from metanet.weightspace import WeightSpace
    from metanet.zoo.build import build_zoo
    from metanet.zoo.recipe import Recipe

    with open(os.path.join(ROOT, "datasets", "glyphs-siren-tiny.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["hparams"]["epochs"] = 5
    zoo = str(build_zoo(Recipe.from_dict(raw), tmp_path / "tiny.h5", progress=False, threads=1))
    bench = _bench_script()
    plain = bench.raw_weights(zoo, 0)["train"][0]
    augment = bench.weight_augmenter(zoo, 0, ["permutation"])
    idx = torch.arange(6)
    feats = augment(idx, torch.Generator().manual_seed(0))
    assert feats.shape == plain[idx].shape
    assert (feats - plain[idx]).abs().max() > 0.1  # the weights moved ...
    dm = WeightSpaceDataModule(zoo, target="label", splits=bench.SPLITS, seed=0)
    dm.setup()
    ws = dm.zoo[dm.group].weight_space(dm.splits["train"][1])[idx]
    flat = ws.flatten()
    all_flat = dm.zoo[dm.group].weight_space(dm.splits["train"][1]).flatten()
    mean, std = all_flat.mean(0), all_flat.std(0).clamp_min(1e-8)
    permuted = WeightSpace.unflatten(feats * std + mean, ws.spec)
    arch = dm.zoo[dm.group].arch
    coords = torch.rand(50, 2) * 2 - 1
    with torch.no_grad():
        for i in range(len(idx)):  # ... and every network draws the same image
            a = permuted.load_into(build_module(arch), i)(coords)
            b = ws.load_into(build_module(arch), i)(coords)
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close((flat - mean) / std, plain[idx], atol=1e-5, rtol=1e-5)
