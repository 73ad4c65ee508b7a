"""DataModules over zoos: run splits, target/weight statistics, WeightSpace and graph batches."""

import numpy as np
import pytest
import torch

from metanet.data.datamodules import ParamGraphDataModule, WeightSpaceDataModule
from metanet.data.readers import InMemoryZoo, InMemoryZooGroup
from metanet.data.zoo_store import Zoo, ZooWriter
from metanet.weightspace import WeightSpace
from metanet.weightspace.augment import RandomPermutation
from metanet.zoo.architectures import arch_name, build_module

MLP = {"type": "mlp", "in": 64, "widths": [8, 6], "out": 10, "activation": "relu"}
CNN_BN = {"type": "cnn", "channels": [3, 4], "kernel": 3, "norm": "batch", "head": "pool"}
SIREN = {"type": "siren", "widths": [6], "w0": 30.0}


def _records(arch, runs, ckpts, seed):
    """Random (untrained) networks: ``runs`` runs x ``ckpts`` checkpoints, distinct weights."""
    torch.manual_seed(seed)
    sds, metrics = [], {k: [] for k in ("test_acc", "train_acc", "test_loss", "train_loss",
                                        "epoch", "run_id", "seed", "label")}  # fmt: skip
    for r in range(runs):
        for c in range(ckpts):
            sds.append(build_module(arch).state_dict())
            acc = float(torch.rand(()))
            for k, v in (("test_acc", acc), ("train_acc", acc), ("test_loss", 1 - acc),
                         ("train_loss", 1 - acc), ("epoch", c + 1), ("run_id", seed * 1000 + r),
                         ("seed", r), ("label", r % 3)):  # fmt: skip
                metrics[k].append(v)
    params = {k: torch.stack([sd[k] for sd in sds]) for k in sds[0]}
    return params, metrics


@pytest.fixture(scope="module")
def zoo_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("zoo") / "zoo.h5"
    with ZooWriter(path, attrs={"name": "test"}) as w:
        w.add(MLP, *_records(MLP, runs=12, ckpts=2, seed=1))
        w.add(CNN_BN, *_records(CNN_BN, runs=5, ckpts=2, seed=2))
    return str(path)


def _all_batches(loader):
    return list(loader)


def test_splits_are_by_run_deterministic_and_complete(zoo_path):
    dm = WeightSpaceDataModule(zoo_path, group=arch_name(MLP), splits=(0.5, 0.25, 0.25), seed=3)
    dm.setup()
    runs = {s: dm.split_run_ids(s) for s in ("train", "val", "test")}
    assert all(runs.values())
    assert not (runs["train"] & runs["val"]) and not (runs["train"] & runs["test"])
    assert not (runs["val"] & runs["test"])
    assert sum(len(r) for r in runs.values()) == 12
    assert sum(len(dm.splits[s][1]) for s in runs) == 24  # every checkpoint somewhere
    same = WeightSpaceDataModule(zoo_path, group=arch_name(MLP), splits=(0.5, 0.25, 0.25), seed=3)
    same.setup()
    assert all(np.array_equal(same.splits[s][1], dm.splits[s][1]) for s in runs)
    other = WeightSpaceDataModule(zoo_path, group=arch_name(MLP), splits=(0.5, 0.25, 0.25), seed=4)
    other.setup()
    assert any(not np.array_equal(other.splits[s][1], dm.splits[s][1]) for s in runs)
    last = WeightSpaceDataModule(zoo_path, group=arch_name(MLP), checkpoints="last")
    last.setup()
    assert sum(len(last.splits[s][1]) for s in runs) == 12


def test_train_runs_shrinks_the_train_split_only(zoo_path):
    # a learning-curve point: fewer train runs (a subset of the full train split), the same
    # validation and test records
    kw = {"group": arch_name(MLP), "splits": (0.5, 0.25, 0.25), "seed": 3}
    full = WeightSpaceDataModule(zoo_path, **kw)
    full.setup()
    part = WeightSpaceDataModule(zoo_path, train_runs=2, **kw)
    part.setup()
    assert len(part.split_run_ids("train")) == 2
    assert part.split_run_ids("train") <= full.split_run_ids("train")
    for split in ("val", "test"):
        assert np.array_equal(part.splits[split][1], full.splits[split][1])
    assert len(part.splits["train"][1]) == 4  # 2 runs x 2 checkpoints
    with pytest.raises(ValueError, match="train_runs=7"):
        WeightSpaceDataModule(zoo_path, train_runs=7, **kw).setup()
    with pytest.raises(ValueError, match="train_runs"):
        WeightSpaceDataModule(zoo_path, train_runs=0, **kw)


def test_weightspace_batches_targets_and_statistics(zoo_path):
    dm = WeightSpaceDataModule(zoo_path, batch_size=5, seed=0)  # the only group with a spec
    dm.setup()
    group = Zoo.open(zoo_path)[arch_name(MLP)]
    # val batches come in order: records and raw targets match the store
    ws, y = next(iter(dm.val_dataloader()))
    rec = dm.splits["val"][1][: len(y)]
    assert isinstance(ws, WeightSpace) and ws.spec == group.spec
    assert ws.allclose(group.weight_space(rec), atol=0, rtol=0)
    raw = torch.as_tensor(group.metrics["test_acc"][rec], dtype=torch.float32)
    torch.testing.assert_close(dm.denormalize_target(y), raw)
    # target normalization: standardized on the train split
    train_y = torch.cat([y for _, y in dm.train_dataloader()])
    assert len(train_y) == len(dm.splits["train"][1])
    assert float(train_y.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(train_y.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    # per-layer weight statistics over the train split
    stats = dm.weight_stats
    train_ws = group.weight_space(np.sort(dm.splits["train"][1]))
    for l in range(3):
        assert float(stats.weight_mean[l]) == pytest.approx(
            float(train_ws.weights[l].mean()), abs=1e-6
        )
        assert float(stats.bias_std[l]) == pytest.approx(
            float(train_ws.biases[l].std(unbiased=False)), rel=1e-4
        )
    normed = stats.normalize(train_ws)
    assert float(normed.weights[1].std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    moved = dm.transfer_batch_to_device((ws, y), torch.device("cpu"), 0)
    assert isinstance(moved[0], WeightSpace)


def test_transforms_apply_to_training_batches_only(zoo_path):
    plain = WeightSpaceDataModule(zoo_path, batch_size=64, normalize_target=False)
    aug = WeightSpaceDataModule(
        zoo_path, batch_size=64, normalize_target=False, transforms=RandomPermutation()
    )
    ws_p, y_p = next(iter(plain.train_dataloader()))
    ws_a, y_a = next(iter(aug.train_dataloader()))
    torch.testing.assert_close(y_a, y_p)  # same seed: same records in the same order
    assert ws_a.max_abs_diff(ws_p) > 1e-3
    x = torch.randn(4, 64)
    net = build_module(MLP)
    for i in (0, 5):  # permuted, but the same functions
        torch.testing.assert_close(
            ws_a.load_into(net, i)(x), ws_p.load_into(build_module(MLP), i)(x), atol=1e-5, rtol=1e-5
        )
    val_p, _ = next(iter(plain.val_dataloader()))
    val_a, _ = next(iter(aug.val_dataloader()))
    assert val_a.allclose(val_p, atol=0, rtol=0)


def test_two_workers_give_the_same_batches(zoo_path):
    kwargs = dict(zoo=zoo_path, batch_size=4, normalize_weights=True, splits=(0.5, 0.5))
    one = _all_batches(WeightSpaceDataModule(**kwargs).val_dataloader())
    two = _all_batches(WeightSpaceDataModule(num_workers=2, **kwargs).val_dataloader())
    assert len(one) == len(two) > 1
    for (w1, y1), (w2, y2) in zip(one, two):
        assert w1.allclose(w2, atol=0, rtol=0) and torch.equal(y1, y2)


def test_classification_targets_and_bad_arguments(zoo_path):
    dm = WeightSpaceDataModule(zoo_path, target="label", batch_size=8)
    ws, y = next(iter(dm.train_dataloader()))
    assert dm.task == "classification" and dm.num_classes == 3 and y.dtype == torch.long
    with pytest.raises(KeyError, match="no metric 'nope'"):
        WeightSpaceDataModule(zoo_path, target="nope").setup()
    with pytest.raises(ValueError, match="no weight space"):
        WeightSpaceDataModule(zoo_path, group=arch_name(CNN_BN), splits=(0.6, 0.2, 0.2)).setup()
    with pytest.raises(ValueError, match="sum to 1"):
        WeightSpaceDataModule(zoo_path, splits=(0.5, 0.2, 0.1))
    with pytest.raises(KeyError, match="no architecture"):
        ParamGraphDataModule(zoo_path, groups=["missing"]).setup()


def test_in_memory_zoo_works_like_the_store(zoo_path):
    h5 = Zoo.open(zoo_path)
    g = h5[arch_name(MLP)]
    mem = InMemoryZooGroup("mlp", g.params(), g.metrics, g.hparams, spec=g.spec, arch=g.arch)
    a = WeightSpaceDataModule(zoo_path, group=arch_name(MLP), batch_size=6)
    b = WeightSpaceDataModule(InMemoryZoo([mem]), batch_size=6)
    (wa, ya), (wb, yb) = next(iter(a.val_dataloader())), next(iter(b.val_dataloader()))
    assert wa.allclose(wb, atol=0, rtol=0) and torch.equal(ya, yb)


def test_param_graph_batches_mix_architectures_and_recover_the_records(zoo_path):
    pytest.importorskip("metanet.graph.tracing")
    from metanet.graph import ParamGraph

    dm = ParamGraphDataModule(zoo_path, batch_size=6, splits=(0.6, 0.4), num_workers=2)
    dm.setup()
    assert set(dm.group_names) == {arch_name(MLP), arch_name(CNN_BN)}
    assert set(dm.weight_stats) == set(dm.group_names)
    h5 = Zoo.open(zoo_path)
    gid, rid = dm.splits["val"]
    seen = 0
    groups_seen = set()
    for batch, y in dm.val_dataloader():
        assert batch.num_graphs == len(y)
        sds = ParamGraph.state_dicts_from_batch(batch)
        for j, sd in enumerate(sds):
            name = dm.group_names[gid[seen + j]]
            groups_seen.add(name)
            ref = h5[name].state_dict(int(rid[seen + j]))
            assert set(sd) == set(ref)
            for k, v in ref.items():
                torch.testing.assert_close(sd[k], v, atol=0, rtol=0)
        seen += len(y)
    assert seen == len(rid) and len(groups_seen) == 2


def test_aligned_mixup_in_the_train_loader_gives_soft_labels(zoo_path):
    from metanet.weightspace.augment import AlignedMixUp

    dm = WeightSpaceDataModule(
        zoo_path, target="label", batch_size=6, transforms=AlignedMixUp(max_iter=5, num_classes=3)
    )
    ws, y = next(iter(dm.train_dataloader()))
    assert y.shape == (6, 3) and torch.allclose(y.sum(1), torch.ones(6))
    assert len(ws) == 6


def test_graph_datamodule_reads_5x5_kernels_narrow_or_wide(tmp_path):
    pytest.importorskip("metanet.graph.tracing")
    from metanet.graph import ParamGraph

    cnn5 = {"type": "cnn", "channels": [3, 4], "kernel": 5, "head": "pool"}
    path = tmp_path / "zoo5.h5"
    with ZooWriter(path, attrs={"name": "k5"}) as w:
        w.add(cnn5, *_records(cnn5, runs=4, ckpts=1, seed=4))
    narrow_dm = ParamGraphDataModule(str(path), splits=(0.5, 0.5))
    narrow, _ = next(iter(narrow_dm.train_dataloader()))
    assert narrow.edge_attr.shape[1] == 9  # 5x5 kernels read over their 25 kernel offsets
    gid, rid = narrow_dm.splits["train"]
    sd = ParamGraph.state_dicts_from_batch(narrow)[0]
    want = Zoo.open(path)[narrow_dm.group_names[gid[0]]].params([rid[0]])
    assert all(torch.equal(sd[k], v[0]) for k, v in want.items())
    with pytest.raises(ValueError, match="max_kernel_size"):
        ParamGraphDataModule(str(path), max_kernel_size=0)
    dm = ParamGraphDataModule(str(path), splits=(0.5, 0.5), max_kernel_size=25)
    assert dm.edge_in_dim == 25
    batch, _ = next(iter(dm.train_dataloader()))
    assert batch.edge_attr.shape[1] == 25
    gid, rid = dm.splits["train"]
    h5 = Zoo.open(path)
    sd = ParamGraph.state_dicts_from_batch(batch)[0]
    want = h5[dm.group_names[gid[0]]].params([rid[0]])
    assert all(torch.equal(sd[k], v[0]) for k, v in want.items())  # 5x5 kernels round-trip


def test_one_group_graph_batches_equal_collated_graphs_of_every_record(zoo_path):
    """A batch of one architecture is written into a cached collated structure: it must equal
    ``Batch.from_data_list`` of each record's graph in every stored tensor, and give the records
    back."""
    pytest.importorskip("metanet.graph.tracing")
    from torch_geometric.data import Batch

    from metanet.graph import ParamGraph

    dm = ParamGraphDataModule(zoo_path, groups=arch_name(MLP), batch_size=5, splits=(0.5, 0.5))
    dm.setup()
    group = dm.zoo[arch_name(MLP)]
    _, rid = dm.splits["val"]
    template = dm.val_dataloader().dataset.template(arch_name(MLP))
    seen = 0
    for batch, y in dm.val_dataloader():  # the last batch is smaller: a second cached size
        params = group.params(rid[seen : seen + len(y)])
        want = Batch.from_data_list([template.with_state_dict({k: v[j] for k, v in
                                     params.items()}) for j in range(len(y))])  # fmt: skip
        assert set(batch.keys()) == set(want.keys())
        for key in want.keys():
            if isinstance(want[key], torch.Tensor):
                assert torch.equal(batch[key], want[key]), key
        for sd, j in zip(ParamGraph.state_dicts_from_batch(batch), range(len(y))):
            assert all(torch.equal(sd[k], params[k][j]) for k in params)
        seen += len(y)
    assert seen == len(rid) and len(rid) % 5 != 0


def test_every_requested_split_gets_a_run_and_too_few_runs_is_an_error(tmp_path):
    def zoo(runs: int) -> str:
        path = tmp_path / f"runs{runs}.h5"
        with ZooWriter(path, attrs={"name": "few"}) as w:
            w.add(MLP, *_records(MLP, runs=runs, ckpts=2, seed=5))
        return str(path)

    # 6 runs at 0.8 / 0.1 / 0.1 round to 5 / 1 / 0: the test split takes a train run
    dm = WeightSpaceDataModule(zoo(6), splits=(0.8, 0.1, 0.1))
    dm.setup()
    assert [len(dm.split_run_ids(s)) for s in ("train", "val", "test")] == [4, 1, 1]
    two = WeightSpaceDataModule(zoo(3), splits=(0.9, 0.1))  # no test split asked for
    two.setup()
    assert [len(two.split_run_ids(s)) for s in ("train", "val")] == [2, 1]
    assert len(two.splits["test"][1]) == 0
    big = WeightSpaceDataModule(zoo(40), splits=(0.7, 0.1, 0.2))  # plain rounding, untouched
    big.setup()
    assert [len(big.split_run_ids(s)) for s in ("train", "val", "test")] == [28, 4, 8]
    with pytest.raises(ValueError, match=r"2 runs, too few for splits \(0.7, 0.1, 0.2\)"):
        WeightSpaceDataModule(zoo(2), splits=(0.7, 0.1, 0.2)).setup()


@pytest.mark.parametrize("module", [WeightSpaceDataModule, ParamGraphDataModule])
def test_a_target_constant_over_a_split_is_an_error(tmp_path, module):
    params, metrics = _records(MLP, runs=10, ckpts=2, seed=6)
    metrics["test_acc"] = [0.1] * len(metrics["test_acc"])  # every network at chance
    path = tmp_path / "flat.h5"
    with ZooWriter(path, attrs={"name": "flat"}) as w:
        w.add(MLP, params, metrics)
    with pytest.raises(ValueError, match=r"'test_acc' is constant \(0.1\) over the 16 records "
                                         r"of the train split"):  # fmt: skip
        module(str(path)).setup()
    dm = module(str(path), target="train_acc")  # another metric of the same zoo varies
    dm.setup()
    assert len(dm.targets["train"]) == 16
