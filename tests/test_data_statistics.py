"""Data statistics of the graph metanetworks come from the training split, never from a batch.

``ParamGraphDataModule.graph_stats`` (per-type value statistics, degree histograms) is computed
from the train split's graphs; the tasks hand it to GMN / NG-T before Lightning's sanity check;
the statistics live in buffers and survive a checkpoint round trip; a model that never got
statistics warns and calibrates on its first batch; sizes that follow from the data are linked by
``metanet fit``.
"""

from __future__ import annotations

import functools
import os
import warnings

import lightning as L
import pytest
import torch
from tiny_zoo import MLP  # noqa: I001
from torch_geometric.data import Batch

from metanet.data.datamodules import ParamGraphDataModule
from metanet.graph.paramgraph import EdgeType, NodeType
from metanet.nn.gmn import GMN
from metanet.nn.graph_features import GraphStats, UncalibratedWarning
from metanet.nn.ngt import NGT
from metanet.tasks import GeneralizationTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = (0.5, 0.25, 0.25)


def _dm(zoo_path: str, **kw) -> ParamGraphDataModule:
    return ParamGraphDataModule(zoo_path, **{"batch_size": 8, "splits": SPLITS, **kw})


def _split_graphs(dm: ParamGraphDataModule, split: str) -> Batch:
    """Every graph of ``split`` (through the data module's own loader), in one batch."""
    dm.setup()
    loader = dm._loader(split, shuffle=False)
    return Batch.from_data_list([g for batch, _ in loader for g in batch.to_data_list()])


def _by_hand(graphs: Batch) -> dict[str, torch.Tensor]:
    """Per-type population mean/std (constant columns: scale 1; absent types: all values) and
    mean log-degrees, computed directly from the graphs."""
    out = {}
    for name, v, types, num in (
        ("node", graphs.x, graphs.node_type, len(NodeType)),
        ("edge", graphs.edge_attr, graphs.edge_type, len(EdgeType)),
    ):
        v = v.double()
        mean = v.mean(0).repeat(num, 1)
        std = v.std(0, unbiased=False).repeat(num, 1)
        for t in types.unique().tolist():
            mean[t] = v[types == t].mean(0)
            std[t] = v[types == t].std(0, unbiased=False)
        out[f"{name}_mean"] = mean.float()
        out[f"{name}_std"] = torch.where(std > 1e-6, std, torch.ones_like(std)).float()
    n = graphs.num_nodes
    in_deg = torch.bincount(graphs.edge_index[1], minlength=n).double()
    out_deg = torch.bincount(graphs.edge_index[0], minlength=n).double()
    out["log_deg_in"] = torch.log1p(in_deg).mean()
    out["log_deg_both"] = torch.log1p(torch.cat([in_deg, out_deg])).mean()
    return out


def _assert_model_has(model, stats: GraphStats) -> None:
    torch.testing.assert_close(model.nodes.standardize.mean, stats.node_mean, rtol=0, atol=0)
    torch.testing.assert_close(model.nodes.standardize.std, stats.node_std, rtol=0, atol=0)
    torch.testing.assert_close(model.edges.standardize.mean, stats.edge_mean, rtol=0, atol=0)
    torch.testing.assert_close(model.edges.standardize.std, stats.edge_std, rtol=0, atol=0)
    if isinstance(model, GMN):
        delta = stats.avg_log_degree(model.bidirectional)
        assert float(model.avg_log_degree) == pytest.approx(delta, rel=1e-6)


def _trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(
        **{"max_epochs": 1, "default_root_dir": str(tmp_path), "logger": False,
           "enable_checkpointing": False, "enable_progress_bar": False,
           "enable_model_summary": False, "num_sanity_val_steps": 1, **kw}
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# (a) statistics come from the training split
# ------------------------------------------------------------------------------------------------
def test_graph_stats_equal_the_train_graphs_statistics(zoo_path):
    dm = _dm(zoo_path)
    stats = dm.graph_stats
    train = _split_graphs(dm, "train")
    assert stats.num_graphs == train.num_graphs == len(dm.splits["train"][1])
    assert (stats.node_dim, stats.edge_dim) == (dm.node_in_dim, dm.edge_in_dim)
    hand = _by_hand(train)
    for key in ("node_mean", "node_std", "edge_mean", "edge_std"):
        torch.testing.assert_close(getattr(stats, key), hand[key], rtol=1e-5, atol=1e-6)
    assert stats.avg_log_degree(False) == pytest.approx(float(hand["log_deg_in"]), rel=1e-9)
    assert stats.avg_log_degree(True) == pytest.approx(float(hand["log_deg_both"]), rel=1e-9)
    # the same as GraphStats of the train loader's batches
    again = GraphStats.from_graphs(batch for batch, _ in dm.train_dataloader())
    torch.testing.assert_close(again.edge_std, stats.edge_std)
    assert torch.equal(again.in_degree_hist, stats.in_degree_hist)
    # ... and not those of the validation graphs
    val = _by_hand(_split_graphs(dm, "val"))
    assert not torch.allclose(val["edge_std"], stats.edge_std, rtol=1e-3, atol=0)


def test_graph_stats_do_not_depend_on_the_validation_split(zoo_path):
    a, b = _dm(zoo_path), _dm(zoo_path, splits=(0.5, 0.5))  # same train runs, other val runs
    assert a.split_run_ids("train") == b.split_run_ids("train")
    assert a.split_run_ids("val") != b.split_run_ids("val")
    for key in ("node_mean", "node_std", "edge_mean", "edge_std", "in_degree_hist",
                "out_degree_hist"):  # fmt: skip
        assert torch.equal(getattr(a.graph_stats, key), getattr(b.graph_stats, key)), key
    other = _dm(zoo_path, seed=1)  # another train split: other statistics
    assert not torch.equal(other.graph_stats.edge_std, a.graph_stats.edge_std)


def test_stats_max_records_is_a_seeded_bounded_sample(zoo_path):
    full = _dm(zoo_path).graph_stats
    a, b = _dm(zoo_path, stats_max_records=3), _dm(zoo_path, stats_max_records=3)
    assert a.graph_stats.num_graphs == 3 * len(a.group_names)
    assert torch.equal(a.graph_stats.edge_std, b.graph_stats.edge_std)
    assert not torch.equal(a.graph_stats.edge_std, full.edge_std)
    # every record of a group shares its structure: degrees always count all training records
    assert torch.equal(a.graph_stats.in_degree_hist, full.in_degree_hist)


class _SanityProbe(L.Callback):
    """Records the model's statistics when Lightning's sanity check (a validation batch) starts
    and after training."""

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self.at_sanity = {k: v.clone() for k, v in pl_module.model.state_dict().items()
                          if "standardize" in k or k == "avg_log_degree"}  # fmt: skip

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self.sanity_ran = True


@pytest.mark.parametrize("factory", [
    functools.partial(GMN, hidden=8, num_layers=1),
    functools.partial(NGT, hidden=8, edge_dim=8, num_layers=1, heads=2),
], ids=["gmn", "ngt"])  # fmt: skip
def test_fit_gives_the_model_train_stats_before_the_sanity_check(zoo_path, tmp_path, factory):
    dm = _dm(zoo_path)
    task = GeneralizationTask(factory, lr=3e-3, plot=False)
    probe = _SanityProbe()
    trainer = _trainer(tmp_path, callbacks=[probe], limit_train_batches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncalibratedWarning)  # no forward calibrates itself
        trainer.fit(task, dm)
    assert probe.sanity_ran and task.model.is_calibrated
    stats = dm.graph_stats
    _assert_model_has(task.model, stats)
    sanity = probe.at_sanity
    assert torch.equal(sanity["edges.standardize.std"].cpu(), stats.edge_std)
    assert torch.equal(sanity["nodes.standardize.mean"].cpu(), stats.node_mean)
    # the sanity check's validation batch would have given other statistics
    val_batch, _ = next(iter(dm.val_dataloader()))
    assert not torch.equal(GraphStats.from_graphs([val_batch]).edge_std, stats.edge_std)


def test_a_model_calibrated_beforehand_keeps_its_statistics(zoo_path, tmp_path):
    dm = _dm(zoo_path)
    model = GMN(hidden=8, num_layers=1)
    first, _ = next(iter(dm.train_dataloader()))
    model.calibrate(first)
    mine = model.edges.standardize.std.clone()
    trainer = _trainer(tmp_path, limit_train_batches=1, num_sanity_val_steps=0)
    trainer.fit(GeneralizationTask(model, plot=False), dm)
    assert torch.equal(model.edges.standardize.std, mine)


class _NoStatsDataModule(ParamGraphDataModule):
    """A graph data module that does not expose the training split's statistics."""

    @property
    def graph_stats(self):
        return None


def test_data_module_without_stats_calibrates_on_a_training_batch(zoo_path, tmp_path):
    dm = _NoStatsDataModule(zoo_path, batch_size=8, splits=SPLITS)
    task = GeneralizationTask(functools.partial(GMN, hidden=8, num_layers=1), plot=False)
    trainer = _trainer(tmp_path, limit_train_batches=1)
    with pytest.warns(UserWarning, match="first training batch"):
        trainer.fit(task, dm)
    first, _ = next(iter(dm.train_dataloader()))
    _assert_model_has(task.model, GraphStats.from_graphs([first]))


# ------------------------------------------------------------------------------------------------
# (b) checkpoints keep the statistics: predict-accuracy gives identical outputs
# ------------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_gives_identical_predictions(zoo_path, tmp_path):
    from metanet.data.zoo_store import Zoo
    from metanet.tasks.predict_cli import load_network, load_predictor, predict
    from metanet.zoo.architectures import arch_name

    dm = _dm(zoo_path)
    task = GeneralizationTask(functools.partial(GMN, hidden=8, num_layers=1), lr=3e-3, plot=False)
    trainer = _trainer(tmp_path, limit_train_batches=2)
    trainer.fit(task, dm)
    path = str(tmp_path / "predictor.ckpt")
    trainer.save_checkpoint(path)

    loaded = load_predictor(path)
    assert loaded.model.is_calibrated
    _assert_model_has(loaded.model, dm.graph_stats)
    task.eval()
    batch, _ = next(iter(dm.test_dataloader()))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UncalibratedWarning)
        assert torch.equal(loaded.model(batch), task.model(batch))
    # the predict-accuracy path on network files
    group = Zoo.open(zoo_path)[arch_name(MLP)]
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"net{i}.pt"))
        torch.save(group.module(i).state_dict(), files[-1])
    nets = [load_network(f) for f in files]
    task.payload_loaded = task.payload()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncalibratedWarning)
        assert predict(loaded, nets) == predict(task, nets)
    # a fresh model without the checkpoint's statistics predicts something else
    fresh = GMN(hidden=8, num_layers=1)
    learned = {k: v for k, v in loaded.model.state_dict().items()
               if "standardize" not in k and k != "avg_log_degree"}  # fmt: skip
    fresh.load_state_dict(learned, strict=False)
    with torch.no_grad(), pytest.warns(UncalibratedWarning):
        assert not torch.equal(fresh(batch), loaded.model(batch))


# ------------------------------------------------------------------------------------------------
# (c) a model that never got statistics: warns, calibrates on that batch, once
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: GMN(hidden=8, num_layers=1),
    lambda: NGT(hidden=8, edge_dim=8, num_layers=1, heads=2),
], ids=["gmn", "ngt"])  # fmt: skip
def test_uncalibrated_model_warns_and_calibrates_on_its_first_batch(zoo_path, make):
    dm = _dm(zoo_path)
    (b1, _), (b2, _) = list(dm.train_dataloader())[:2]
    model = make().eval()
    assert not model.is_calibrated
    with pytest.warns(UncalibratedWarning, match="calibrate"):
        y1 = model(b1)
    assert model.is_calibrated
    _assert_model_has(model, GraphStats.from_graphs([b1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncalibratedWarning)
        assert torch.equal(model(b1), y1)  # calibrated once, kept
        model(b2)
        _assert_model_has(model, GraphStats.from_graphs([b1]))
        # explicit calibration: no warning; statistics replaced
        other = make().eval()
        other.calibrate(b2)
        _assert_model_has(other, GraphStats.from_graphs([b2]))
        other(b1)
        # statistics handed over: no warning
        third = make().eval()
        third.set_data_statistics(dm.graph_stats)
        _assert_model_has(third, dm.graph_stats)
        third(b1)


def test_models_without_statistics_to_learn_never_warn(zoo_path):
    batch, _ = next(iter(_dm(zoo_path).train_dataloader()))
    model = GMN(hidden=8, num_layers=1, standardize=False, avg_log_degree=1.5)
    assert model.is_calibrated
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncalibratedWarning)
        model(batch)
    model.calibrate(batch)  # a given avg_log_degree is kept
    assert float(model.avg_log_degree) == 1.5


def test_statistics_of_another_width_are_refused(zoo_path):
    stats = _dm(zoo_path, max_kernel_size=25).graph_stats
    assert stats.edge_dim == 25
    with pytest.raises(ValueError, match="edge_in_dim"):
        GMN(hidden=8, num_layers=1).set_data_statistics(stats)
    GMN(hidden=8, num_layers=1, edge_in_dim=25).set_data_statistics(stats)
    with pytest.raises(ValueError, match="at least one graph"):
        GraphStats.from_graphs([])


# ------------------------------------------------------------------------------------------------
# sizes that follow from the data are linked by the CLI
# ------------------------------------------------------------------------------------------------
def test_cli_links_the_edge_width_to_the_data(zoo_path, tmp_path, monkeypatch):
    from metanet.cli import MetanetCLI

    monkeypatch.chdir(tmp_path)  # the configs' loggers and checkpoints write under runs/

    def build(config: str, *extra: str):
        args = ["--config", os.path.join(ROOT, "configs", config), "--data.init_args.zoo",
                zoo_path, *extra]  # fmt: skip
        return MetanetCLI(args, run=False).model

    task = build("predict_gen/gmn.yaml", "--data.init_args.max_kernel_size", "25")
    assert task._factory.keywords["edge_in_dim"] == 25
    assert task.hparams.model["init_args"]["edge_in_dim"] == 25  # the recipe checkpoints keep
    task = build("predict_gen/ngt.yaml")
    assert task._factory.keywords["edge_in_dim"] == 9
    task = build("predict_gen/nfn_np.yaml")  # weight-space model and data: no link applies
    assert "edge_in_dim" not in task._factory.keywords
