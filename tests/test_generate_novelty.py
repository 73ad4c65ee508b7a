"""Novelty of generated networks (error overlap, aligned L2), baselines, selection on validation,
and the generators' bad-input errors (issue 16)."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch

from metanet.generate.baselines import (
    average_baseline,
    checkpoint_baseline,
    diagonal_gaussian_baseline,
    noise_baseline,
    standard_baselines,
)
from metanet.generate.data import GeneratorDataModule, ZooInputError
from metanet.generate.evaluate import accuracy_summary, best_of_n, load_eval_splits
from metanet.generate.novelty import (
    align_to,
    aligned_nearest,
    error_iou,
    error_sets,
    max_error_overlap,
    novelty,
    plot_novelty,
    refined_nearest,
)
from metanet.generate.selection import SelectOnValidation
from metanet.tasks.flow_generation import FlowGenerationTask
from metanet.tasks.generation import GenerationError
from metanet.weightspace import WeightSpace, permute, random_permutation
from metanet.zoo.build import build_zoo
from metanet.zoo.recipe import Recipe

MLP = {"type": "mlp", "in": 64, "widths": [8, 8], "out": 10, "activation": "relu"}
DATA = {"provider": "digits", "split_seed": 0, "test_fraction": 0.25, "val_fraction": 0.15}


def _recipe(name: str, archs: list[dict], n: int, keep: list[float], epochs: int = 4) -> Recipe:
    return Recipe.from_dict(
        {
            "name": name,
            "kind": "classifier",
            "seed": 3,
            "data": DATA,
            "architectures": archs,
            "networks_per_arch": n,
            "chunk_size": n,
            "keep_fractions": keep,
            "hparams": {"lr": 1e-2, "optimizer": "adam", "batch_size": 64, "epochs": epochs},
        }
    )


@pytest.fixture(scope="module")
def seeds_zoo(tmp_path_factory) -> str:
    """Eight independently seeded runs, one final checkpoint each."""
    out = tmp_path_factory.mktemp("novelty") / "seeds.h5"
    return os.fspath(build_zoo(_recipe("t-seeds", [MLP], 8, [1.0]), out, progress=False, threads=1))


@pytest.fixture(scope="module")
def seeds_dm(seeds_zoo) -> GeneratorDataModule:
    dm = GeneratorDataModule(seeds_zoo, canonicalize=True, holdout=2, batch_size=8)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def splits(seeds_dm):
    return load_eval_splits({"arch": seeds_dm.arch, "zoo_info": seeds_dm.zoo_info})


def _ws(dm: GeneratorDataModule, vectors: torch.Tensor) -> WeightSpace:
    return WeightSpace.unflatten(vectors, dm.spec)


# -- error overlap ---------------------------------------------------------------------------------
def test_error_iou_of_a_model_with_itself_is_one(seeds_dm, splits) -> None:
    errors = error_sets(_ws(seeds_dm, seeds_dm.raw_vectors), seeds_dm.arch, splits.x_test,
                        splits.y_test)  # fmt: skip
    assert errors.any(1).all()  # every net makes some error: the IoU is not the empty-set case
    iou = error_iou(errors, errors)
    assert torch.allclose(iou.diagonal(), torch.ones(len(errors)))
    off = iou[~torch.eye(len(iou), dtype=torch.bool)]
    assert (off < 1).all() and (off >= 0).all()
    # hand-checked sets: {0, 1} vs {1, 2} -> 1/3; two empty sets agree
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.allclose(error_iou(a, b), torch.tensor([[1 / 3, 0.0], [0.0, 1.0]]))


def test_max_error_overlap_excludes_self() -> None:
    e = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    iou, idx = max_error_overlap(e, e)
    assert torch.equal(iou, torch.ones(3))
    iou, idx = max_error_overlap(e, e, self_index=torch.arange(3))
    assert iou.tolist() == [1.0, 1.0, 0.0] and idx[:2].tolist() == [1, 0]
    with pytest.raises(ValueError, match="one entry per query"):
        max_error_overlap(e, e, self_index=[0, 1])


# -- aligned L2 ---------------------------------------------------------------------------------
def test_alignment_makes_permuted_copies_distance_zero(seeds_dm) -> None:
    ref = _ws(seeds_dm, seeds_dm.reference_vector[None])
    train = seeds_dm.raw_vectors
    g = torch.Generator().manual_seed(0)
    copies = WeightSpace.cat(
        [permute(_ws(seeds_dm, train[i : i + 1]), random_permutation(seeds_dm.spec, g))
         for i in range(len(train))]
    )  # fmt: skip
    raw, _ = aligned_nearest(copies.flatten(), train)
    assert (raw > 1e-2).all()  # before alignment the copies are far from their originals
    aligned = align_to(copies, ref)
    frame, _ = aligned_nearest(aligned, train)
    assert (frame < raw).all()  # the reference frame alone brings every copy closer ...
    dist, idx = refined_nearest(copies, aligned, train)  # ... direct alignment to candidates: 0
    assert torch.allclose(dist, torch.zeros(len(train)), atol=1e-4)
    assert idx.tolist() == list(range(len(train)))
    # excluding self, a checkpoint's nearest neighbour is another network, at a positive distance
    own, own_idx = aligned_nearest(train, train, torch.arange(len(train)))
    assert (own > 0).all() and (own_idx != torch.arange(len(train))).all()


def test_non_finite_networks_are_infinitely_far(seeds_dm) -> None:
    bad = seeds_dm.raw_vectors[:2].clone()
    bad[0, 0] = float("nan")
    ref = _ws(seeds_dm, seeds_dm.reference_vector[None])
    dist, _ = aligned_nearest(align_to(_ws(seeds_dm, bad), ref), seeds_dm.raw_vectors)
    assert dist[0] == float("inf") and torch.isfinite(dist[1])


# -- novelty report and baselines ------------------------------------------------------------------
def _report(dm, splits, ws, self_index=None):
    train = dm.raw_vectors
    errors = error_sets(_ws(dm, train), dm.arch, splits.x_test, splits.y_test)
    ref = _ws(dm, dm.reference_vector[None])
    return novelty(ws, train, errors, ref, dm.arch, splits.x_test, splits.y_test,
                   self_index=self_index)  # fmt: skip


def test_an_exact_copy_is_flagged_as_memorized(seeds_dm, splits) -> None:
    train = seeds_dm.raw_vectors
    copy = _ws(seeds_dm, train[[0, 3]].clone())
    rep = _report(seeds_dm, splits, copy)
    assert rep.memorized.all()
    assert torch.allclose(rep.iou, torch.ones(2)) and torch.allclose(rep.distance, torch.zeros(2))
    assert rep.iou_index.tolist() == [0, 3] and rep.distance_index.tolist() == [0, 3]
    # the same networks measured as themselves (excluding self) are not copies of each other
    ckpts, self_index = checkpoint_baseline(train, seeds_dm.spec)
    rep = _report(seeds_dm, splits, ckpts, self_index)
    assert not rep.memorized.any()
    assert (rep.iou < 1).all() and (rep.distance > 0).all()
    # independent held-out runs are not copies either
    held = _report(seeds_dm, splits, _ws(seeds_dm, seeds_dm.holdout_vectors))
    assert not held.memorized.any()
    s = held.summary()
    assert set(s) >= {"acc_median", "iou_median", "l2_median", "memorized"}


def test_averaging_baseline_is_closer_than_independent_runs(seeds_dm, splits) -> None:
    train, spec = seeds_dm.raw_vectors, seeds_dm.spec
    avg = average_baseline(train, spec, 8, k=4, seed=0)
    rep_avg = _report(seeds_dm, splits, avg)
    rep_ind = _report(seeds_dm, splits, _ws(seeds_dm, seeds_dm.holdout_vectors))
    assert float(rep_avg.distance.median()) < float(rep_ind.distance.median())
    # k = 1 averages a single checkpoint: an exact copy
    one = average_baseline(train, spec, 5, k=1, seed=0)
    d, _ = aligned_nearest(one.flatten(), train)
    assert torch.allclose(d, torch.zeros(5), atol=1e-5)
    with pytest.raises(ValueError, match="k must be"):
        average_baseline(train, spec, 2, k=len(train) + 1)


def test_noise_and_gaussian_baselines(seeds_dm) -> None:
    train, spec = seeds_dm.raw_vectors, seeds_dm.spec
    small, src = noise_baseline(train, spec, 16, 0.01, seed=1)
    large, src2 = noise_baseline(train, spec, 16, 0.1, seed=1)
    assert torch.equal(src, src2)
    d_small = (small.flatten() - train[src]).norm(dim=1)
    d_large = (large.flatten() - train[src]).norm(dim=1)
    assert (d_small > 0).all() and torch.allclose(d_large, 10 * d_small, rtol=1e-4)
    zero, src0 = noise_baseline(train, spec, 4, 0.0)
    assert torch.equal(zero.flatten(), train[src0])
    g = diagonal_gaussian_baseline(train, spec, 4000, seed=0).flatten()
    assert torch.allclose(g.mean(0), train.mean(0), atol=0.15 * float(train.std(0).max()))
    assert torch.allclose(g.std(0), train.std(0), rtol=0.1, atol=1e-4)
    names = list(standard_baselines(train, spec, 4))
    assert names == ["training checkpoints", "checkpoint + noise 0.01", "checkpoint + noise 0.1",
                     f"average of {len(train)} aligned", "diagonal Gaussian (aligned)"]  # fmt: skip


def test_plot_novelty_writes_a_png(seeds_dm, splits, tmp_path) -> None:
    ckpts, self_index = checkpoint_baseline(seeds_dm.raw_vectors, seeds_dm.spec)
    reports = {"training checkpoints": _report(seeds_dm, splits, ckpts, self_index)}
    path = plot_novelty(reports, os.fspath(tmp_path / "n.png"), title="t", reference_l2=1.0)
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


# -- selection on validation -----------------------------------------------------------------------
def test_eval_splits_use_validation_or_a_test_half(seeds_dm) -> None:
    info = {"arch": seeds_dm.arch, "zoo_info": seeds_dm.zoo_info}
    s = load_eval_splits(info)
    assert s.source == "val" and len(s.y_test) == 450 and len(s.y_val) > 0
    legacy = {"arch": seeds_dm.arch, "zoo_info": {"data": {"split_seed": 0, "test_fraction": 0.25}}}
    h = load_eval_splits(legacy)
    assert h.source == "test half" and len(h.y_val) + len(h.y_test) == 450
    both = torch.cat([h.x_val, h.x_test]).flatten(1)
    assert len(torch.unique(both, dim=0)) == len(torch.unique(s.x_test.flatten(1), dim=0))


def test_best_of_n_is_chosen_on_validation() -> None:
    val = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.3, 0.8])
    test = torch.tensor([0.99, 0.10, 0.50, 0.98, 0.40, 0.30])
    assert best_of_n(val, test, 3).tolist() == pytest.approx([0.10, 0.30])  # not the best test
    s = accuracy_summary(val, test, best_of=(3, 100))
    assert s["median"] == pytest.approx(float(test.median()))
    assert s["mean"] == pytest.approx(float(test.mean()))
    assert s["best_of_3"] == pytest.approx(0.2) and "best_of_100" not in s
    with pytest.raises(ValueError, match="best of 7"):
        best_of_n(val, test, 7)


def test_select_on_validation_restores_the_best_state(seeds_dm) -> None:
    task = FlowGenerationTask(hidden=32, depth=1, lr=1e-2, sample_steps=4)
    sel = SelectOnValidation(every_n_steps=4, n_samples=4, seed=0)
    trainer = L.Trainer(max_steps=12, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[sel])  # fmt: skip
    trainer.fit(task, datamodule=seeds_dm)
    assert [s for s, _ in sel.history] == [4, 8, 12]
    assert sel.best_score == max(v for _, v in sel.history)
    assert sel.best_step == next(s for s, v in sel.history if v == sel.best_score)
    # the model now holds the chosen state: sampling as the callback did gives its score
    from metanet.generate.evaluate import classifier_accuracy

    ws, _ = task.sample(4, seed=0)
    val = load_eval_splits(task.info)
    acc = classifier_accuracy(ws, task.info["arch"], val.x_val, val.y_val)
    assert float(acc.median()) == pytest.approx(sel.best_score)


# -- bad input -------------------------------------------------------------------------------------
def test_several_architectures_for_a_one_architecture_generator(tmp_path) -> None:
    other = {**MLP, "widths": [6]}
    path = build_zoo(_recipe("t-two", [MLP, other], 2, [1.0], epochs=1), tmp_path / "two.h5",
                     progress=False, threads=1)  # fmt: skip
    dm = GeneratorDataModule(path)
    with pytest.raises(ZooInputError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "\n" not in msg and "two.h5" in msg and "one architecture" in msg and "arch=" in msg
    with pytest.raises(ZooInputError, match="no architecture 'nope'"):
        GeneratorDataModule(path, arch="nope").setup("fit")


def test_zoo_too_small_for_the_requested_split(tmp_path, seeds_zoo) -> None:
    onerun = build_zoo(_recipe("t-one", [MLP], 1, [0.5, 0.75, 1.0]), tmp_path / "one.h5",
                       progress=False, threads=1)  # fmt: skip
    with pytest.raises(ZooInputError) as err:
        GeneratorDataModule(onerun, holdout=1).setup("fit")
    msg = str(err.value)
    assert "\n" not in msg and "one.h5" in msg and "1 run(s)" in msg and "holdout=1" in msg
    with pytest.raises(ZooInputError, match="8 run"):
        GeneratorDataModule(seeds_zoo, holdout=8).setup("fit")
    with pytest.raises(ZooInputError, match="left for training"):
        GeneratorDataModule(seeds_zoo, holdout=0.5, max_networks=1).setup("fit")
    with pytest.raises(ValueError, match="holdout must be"):
        GeneratorDataModule(seeds_zoo, holdout=-1)
    # a held-out run keeps all its checkpoints out of training
    dm = GeneratorDataModule(onerun, canonicalize=False)
    dm.setup("fit")
    assert len(dm.vectors) == 3 and len(dm.holdout_vectors) == 0


def test_holdout_runs_are_disjoint_and_aligned(seeds_zoo, seeds_dm) -> None:
    assert len(seeds_dm.vectors) == 6 and len(seeds_dm.holdout_vectors) == 2
    assert not set(seeds_dm.run_ids.tolist()) & set(seeds_dm.holdout_run_ids.tolist())
    raw = GeneratorDataModule(seeds_zoo, canonicalize=False, holdout=2)
    raw.setup("fit")
    assert torch.equal(raw.holdout_records, seeds_dm.holdout_records)
    # canonicalized held-out nets compute the same functions as the raw ones
    x = torch.rand(5, 64)
    from metanet.zoo.architectures import build_module

    m = build_module(seeds_dm.arch).eval()
    for i in range(2):
        a = _ws(seeds_dm, seeds_dm.holdout_vectors[i : i + 1]).load_into(m)(x)
        b = _ws(raw, raw.holdout_vectors[i : i + 1]).load_into(m)(x)
        assert torch.allclose(a, b, atol=1e-5)


def test_condition_outside_the_trained_set(seeds_zoo, seeds_dm) -> None:
    with pytest.raises(ZooInputError) as err:
        GeneratorDataModule(seeds_zoo, condition="colour").setup("fit")
    assert "\n" not in str(err.value) and "colour" in str(err.value)
    task = FlowGenerationTask(hidden=16, depth=1)
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        accelerator="cpu")  # fmt: skip
    trainer.fit(task, datamodule=seeds_dm)
    with pytest.raises(GenerationError, match="unconditional"):
        task.sample(2, condition="0-4")


# -- metanet generate --against --------------------------------------------------------------------
@pytest.fixture(scope="module")
def seeds_ckpt(seeds_dm, tmp_path_factory) -> str:
    task = FlowGenerationTask(hidden=32, depth=1, lr=1e-2, sample_steps=4)
    trainer = L.Trainer(max_steps=20, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        accelerator="cpu")  # fmt: skip
    trainer.fit(task, datamodule=seeds_dm)
    path = tmp_path_factory.mktemp("ckpt") / "flow.ckpt"
    trainer.save_checkpoint(path)
    return os.fspath(path)


def test_generate_against_writes_novelty_and_chooses_on_validation(
    seeds_ckpt, seeds_zoo, tmp_path, capsys
) -> None:
    import csv

    from metanet.generate.cli import main as generate_main

    out = tmp_path / "gen"
    args = ["--generator", seeds_ckpt, "--n", "4", "-o", os.fspath(out), "--against", seeds_zoo]
    assert generate_main(args) == 0
    line = capsys.readouterr().out
    assert "best by val_acc" in line and "novelty: max error IoU" in line
    rows = list(csv.DictReader(open(out / "generated.csv")))
    assert len(rows) == 4
    for r in rows:
        assert 0.0 <= float(r["max_error_iou"]) <= 1.0
        assert float(r["aligned_l2_nn"]) >= 0.0 and r["memorized"] in ("0", "1")
        assert 0.0 <= float(r["val_acc"]) <= 1.0
    best = max(rows, key=lambda r: float(r["val_acc"]))
    assert best["file"] in line


def test_held_out_runs_are_not_training_networks_of_against(seeds_ckpt, seeds_dm) -> None:
    from metanet.data.datamodules import open_zoo
    from metanet.generate.cli import _same_zoo
    from metanet.generate.data import zoo_group_for
    from metanet.tasks.generators import load_generator

    gen = load_generator(seeds_ckpt)
    assert gen.info["holdout_records"] == seeds_dm.holdout_records.tolist()
    group = zoo_group_for(open_zoo(seeds_dm.zoo), gen.info["arch"])
    assert _same_zoo(gen.info, group)


def test_generate_against_a_zoo_of_another_architecture(seeds_ckpt, tmp_path, capsys) -> None:
    from metanet.generate.cli import main as generate_main

    other = build_zoo(_recipe("t-other", [{**MLP, "widths": [6]}], 2, [1.0], epochs=1),
                      tmp_path / "other.h5", progress=False, threads=1)  # fmt: skip
    args = ["--generator", seeds_ckpt, "--n", "2", "-o", os.fspath(tmp_path / "g"),
            "--against", os.fspath(other)]  # fmt: skip
    assert generate_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other.h5" in err and "mlp" in err
    assert "no networks of the generator's architecture" in err
