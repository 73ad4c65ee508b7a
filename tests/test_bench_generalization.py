"""The generalization benchmark's protocol: early stopping on validation for configs without it,
and results pooled per model across invocations (a seed-0 sweep, then the other seeds)."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    from script_module import load_script

    return load_script("bench_generalization")


def _mlp_group() -> str:
    from tiny_zoo import MLP

    from metanet.zoo.architectures import arch_name

    return arch_name(MLP)


def test_patience_adds_early_stopping_on_the_checkpoint_monitor(zoo_path, tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    bench = _bench()
    config = os.path.join(ROOT, "configs", "predict_gen", "statnn.yaml")
    groups = ["--data.init_args.group", _mlp_group()]
    _, _, cli = bench.fit_and_test(config, zoo_path, seed=0, epochs=30,
                                   run_dir=str(tmp_path / "run"), extra=groups, patience=1)
    stops = [cb for cb in cli.trainer.callbacks if isinstance(cb, EarlyStopping)]
    assert len(stops) == 1
    assert (stops[0].monitor, stops[0].mode, stops[0].patience) == ("val/kendall_tau", "max", 1)
    # with patience 1 the fit ends at the first epoch whose validation tau does not improve
    assert cli.trainer.current_epoch < 30


def test_patience_without_early_stopping_leaves_the_config_alone(zoo_path, tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    bench = _bench()
    config = os.path.join(ROOT, "configs", "predict_gen", "statnn.yaml")
    groups = ["--data.init_args.group", _mlp_group()]
    _, _, cli = bench.fit_and_test(config, zoo_path, seed=0, epochs=2,
                                   run_dir=str(tmp_path / "run"), extra=groups)
    assert not any(isinstance(cb, EarlyStopping) for cb in cli.trainer.callbacks)
    assert cli.trainer.current_epoch == 2


def _row(model, seed, tau, **extra):
    return {"zoo": "/z/digits-cnn-10k.h5", "tag": "digits-cnn", "model": model, "seed": seed,
            "train_runs": None, "patience": 2, "kendall_tau": tau, "r2": 0.5, "val_tau": tau,
            "seconds": 10.0, "epochs": 3, **extra}


def test_table_pools_seeds_of_several_invocations_and_reports_failures():
    bench = _bench()
    rows = [
        _row("dws", 0, 0.80, chosen_lr=1e-3, sweep_seconds=30.0),  # the seed-0 sweep
        _row("dws", 2, 0.70, chosen_lr=1e-3, sweep_seconds=10.0),  # later, at its lr
        _row("dws", 1, 0.75, chosen_lr=1e-3, sweep_seconds=10.0),
        {**_row("gmn", 0, 0.0), "error": "RuntimeError: loss is NaN"},
        {**_row("dws", 0, 0.60), "train_runs": 700},  # another table: a learning-curve point
    ]
    for r in rows[3:4]:
        del r["kendall_tau"]
    text = bench.table_of_rows(rows)
    tables = text.split("### ")[1:]
    assert len(tables) == 2
    full, small = tables
    dws = next(line for line in full.splitlines() if line.startswith("| DWS"))
    cells = [c.strip() for c in dws.strip("|").split("|")]
    assert cells[1] == "0.750 ± 0.041"  # mean ± std of 0.80, 0.75, 0.70
    assert cells[-1] == "50"  # the sweep time of every seed together
    assert "| GMN | failed: RuntimeError: loss is NaN |" in full
    assert "seeds: [0, 1, 2]" in full
    assert "700 train runs" in small and "0.600 ± 0.000" in small


def test_table_mode_refuses_an_empty_results_file(tmp_path, capsys):
    bench = _bench()
    empty = tmp_path / "results.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit):
        bench.main(["--table", str(empty)])
    assert "holds no result rows" in capsys.readouterr().err


def test_config_overrides_make_their_own_table_and_reach_the_cli(zoo_path, tmp_path, capsys):
    bench = _bench()
    canon = "data.init_args.canonicalize=metanet.weightspace.symmetry.relu_scale_canonical"
    rows = [_row("nfn_hnp", 0, 0.80), {**_row("nfn_hnp", 0, 0.85), "variant": canon}]
    plain, mapped = bench.table_of_rows(rows).split("### ")[1:]
    assert "canonicalize" not in plain and "0.800" in plain
    assert mapped.splitlines()[0].endswith(f", {canon}") and "0.850" in mapped
    assert bench.override_args([canon, "trainer.max_time=00:00:01:00"]) == [
        "--data.init_args.canonicalize", "metanet.weightspace.symmetry.relu_scale_canonical",
        "--trainer.max_time", "00:00:01:00"]  # fmt: skip
    with pytest.raises(SystemExit):
        bench.main(["--set", "data.init_args.canonicalize", "--table", str(tmp_path / "x")])
    assert "must be KEY=VALUE, got ['data.init_args.canonicalize']" in capsys.readouterr().err
    from metanet.weightspace import relu_scale_canonical

    config = os.path.join(ROOT, "configs", "predict_gen", "statnn.yaml")
    extra = ["--data.init_args.group", _mlp_group(), *bench.override_args([canon])]
    _, _, cli = bench.fit_and_test(config, zoo_path, seed=0, epochs=1,
                                   run_dir=str(tmp_path / "run"), extra=extra)  # fmt: skip
    assert cli.datamodule.canonicalize is relu_scale_canonical


def test_an_interrupted_sweep_resumes_from_its_finished_trials(tmp_path, monkeypatch):
    """Each finished learning rate is written to ``--out`` as it ends; the same command run
    again after a kill fits only the learning rates not yet done, and the tables skip the trial
    rows."""
    bench = _bench()
    calls = []

    def fake_fit(config, zoo, seed, epochs, run_dir, extra, patience):
        lr = float(extra[extra.index("--model.init_args.lr") + 1])
        calls.append(lr)
        if lr == 3e-3 and len(calls) == 2:
            raise KeyboardInterrupt  # the kill, during the second fit
        return {"kendall_tau": lr * 100, "r2": 0.5, "val_tau": {1e-3: 0.7, 3e-3: 0.6}[lr],
                "seconds": 1.0, "png": None, "epochs": 2}  # fmt: skip

    monkeypatch.setattr(bench, "fit_config", fake_fit)
    out = str(tmp_path / "sweep.jsonl")
    kwargs = dict(graph_zoo=False, tag="digits-cnn", lrs=[1e-3, 3e-3], patience=2, out=out)
    with pytest.raises(KeyboardInterrupt):
        bench.run_table(["dws"], "/z.h5", [0], {"dws": 5}, **kwargs)
    rows = bench.read_rows(out)
    assert [(r["kind"], r["lr"]) for r in rows] == [("trial", 1e-3)]
    with open(out, "a") as f:
        f.write('{"kind": "tri')  # a line cut short by the kill
    res = bench.run_table(["dws"], "/z.h5", [0], {"dws": 5}, **kwargs)
    assert calls == [1e-3, 3e-3, 3e-3]  # 1e-3 was not fitted again
    (row,) = res["dws"]
    assert row["chosen_lr"] == 1e-3 and row["kendall_tau"] == pytest.approx(0.1)
    assert [t["lr"] for t in row["trials"]] == [1e-3, 3e-3]
    assert "| DWS | 0.100 ± 0.000 |" in bench.table_of_rows(bench.read_rows(out))
    # another epoch budget is another sweep: nothing is reused
    bench.run_table(["dws"], "/z.h5", [0], {"dws": 3}, **kwargs)
    assert calls[3:] == [1e-3, 3e-3]


def test_fits_of_other_budgets_get_their_own_run_folders(tmp_path, monkeypatch):
    """A fit with another epoch budget, patience, train-run count or config override writes to a
    folder of its own, never over the checkpoints of an earlier experiment."""
    bench = _bench()
    folders = []

    def fake_fit(config, zoo, seed, epochs, run_dir, extra, patience):
        folders.append(os.path.relpath(run_dir, os.path.join(ROOT, "runs", "bench_generalization")))
        return {"kendall_tau": 0.5, "r2": 0.5, "val_tau": 0.5, "seconds": 1.0, "epochs": 2}

    monkeypatch.setattr(bench, "fit_config", fake_fit)
    base = dict(graph_zoo=False, tag="digits-cnn", lrs=[1e-3], out=str(tmp_path / "r.jsonl"))
    bench.run_table(["gmn"], "/z.h5", [0], {"gmn": 5}, patience=2, **base)
    bench.run_table(["gmn"], "/z.h5", [0], {"gmn": 10}, patience=2, **base)
    bench.run_table(["gmn"], "/z.h5", [0], {"gmn": 5}, **base)
    bench.run_table(["gmn"], "/z.h5", [1], {"gmn": 5}, train_runs=700, **base)
    bench.run_table(["gmn"], "/z.h5", [1], {"gmn": 5}, overrides=["a.b=1"], **base)
    assert folders[:4] == [
        "digits-cnn/gmn-e5-p2-s0-lr0.001", "digits-cnn/gmn-e10-p2-s0-lr0.001",
        "digits-cnn/gmn-e5-s0-lr0.001", "digits-cnn/gmn-n700-e5-s1-lr0.001",
    ]  # fmt: skip
    assert len(set(folders)) == 5
