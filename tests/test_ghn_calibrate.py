"""BatchNorm recalibration after a GHN prediction (library function and ``init-weights`` flag)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metanet.data.tasks import load_task_data
from metanet.hyper.calibrate import (
    CalibrationError,
    batchnorm_layers,
    calibrate_batchnorm,
    task_batches,
)
from metanet.hyper.cli import run as init_weights_run
from metanet.hyper.ghn import GHN
from metanet.zoo.architectures import build_module

BN_CNN = {"type": "cnn", "channels": [6, 6], "kernel": 3, "residual": True, "norm": "batch"}
MLP = {"type": "mlp", "widths": [16], "in": 64, "out": 10}


def _ghn() -> GHN:
    torch.manual_seed(0)
    return GHN(hidden=16, layers=1, decoder_hidden=16, rank=4, max_dim=32).eval()


def _predicted_bn_cnn() -> nn.Module:
    torch.manual_seed(1)
    model = build_module(BN_CNN)
    _ghn().load_into(model)
    return model


@pytest.fixture(scope="module")
def digits():
    return load_task_data("digits")


def test_running_stats_become_the_data_statistics(digits) -> None:
    model = _predicted_bn_cnn().train()
    layers = batchnorm_layers(model)
    assert len(layers) == 2
    before = {k: v.clone() for k, v in model.named_parameters()}
    for _, bn in layers:  # stale statistics, as if from another run
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(7.0)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    hooks = [bn.register_forward_hook(lambda m, a, o, name=name: seen[name].append(a[0].clone()))
             for name, bn in layers]  # fmt: skip
    batches = list(task_batches(digits, num_batches=3, batch_size=100, seed=0))
    report = calibrate_batchnorm(model, batches)
    for h in hooks:
        h.remove()
    assert report.layers == [name for name, _ in layers] and report.calibrated
    assert (report.batches, report.samples) == (3, 300)
    assert "calibrated 2 BatchNorm layers on 3 batches (300 samples)" == report.summary()
    for name, bn in layers:
        # the exact average over the batches of each batch's statistics (not a 0.1-momentum blend
        # with the stale values)
        means = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen[name]])
        vars_ = torch.stack([x.transpose(0, 1).flatten(1).var(dim=1) for x in seen[name]])
        assert len(seen[name]) == 3
        torch.testing.assert_close(bn.running_mean, means.mean(0))
        torch.testing.assert_close(bn.running_var, vars_.mean(0))
        assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 3
    # parameters untouched, training flags restored
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k
        assert v.grad is None
    assert all(m.training for m in model.modules())


def test_calibrated_eval_mode_normalizes_the_data(digits) -> None:
    """On one batch of all training samples, each BatchNorm input is normalized in eval mode."""
    model = _predicted_bn_cnn()
    x = digits.train.x
    calibrate_batchnorm(model, [(x, digits.train.y)])  # (inputs, targets) pairs are accepted
    model.eval()
    seen = []
    bn = batchnorm_layers(model)[0][1]
    hook = bn.register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        model(x)
    hook.remove()
    z = (seen[0] - bn.bias[None, :, None, None]) / bn.weight[None, :, None, None]
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.var(dim=(0, 2, 3)), torch.ones(6), atol=1e-3, rtol=0)


def test_module_without_batchnorm_is_a_no_op() -> None:
    torch.manual_seed(0)
    model = build_module(MLP)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def never():
        raise AssertionError("batches read for a module without BatchNorm")
        yield  # pragma: no cover

    report = calibrate_batchnorm(model, never())
    assert not report.calibrated and report.layers == [] and report.batches == 0
    assert "nothing to calibrate" in report.summary()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_failing_batch_restores_the_statistics_and_names_the_batch() -> None:
    model = _predicted_bn_cnn()
    bn = batchnorm_layers(model)[0][1]
    bn.running_mean.fill_(3.0)
    good, bad = torch.rand(4, 1, 8, 8), torch.rand(4, 2, 8, 8)
    with pytest.raises(CalibrationError, match=r"calibration batch 1 \(inputs \[4, 2, 8, 8\]\)"):
        calibrate_batchnorm(model, [good, bad])
    assert torch.equal(bn.running_mean, torch.full((6,), 3.0)) and bn.momentum == 0.1
    with pytest.raises(CalibrationError, match="no calibration batch"):
        calibrate_batchnorm(model, [])
    with pytest.raises(CalibrationError, match="num_batches must be >= 1"):
        calibrate_batchnorm(model, [good], num_batches=0)
    assert torch.equal(bn.running_mean, torch.full((6,), 3.0))


def test_task_batches_draw_from_the_split(digits) -> None:
    a = list(task_batches(digits, 2, batch_size=5, seed=3, input_shape=(64,)))
    b = list(task_batches(digits, 2, batch_size=5, seed=3, input_shape=(64,)))
    assert [t.shape for t in a] == [(5, 64), (5, 64)]
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    rows = {tuple(r.tolist()) for r in digits.train.x.flatten(1)}
    assert all(tuple(r.tolist()) in rows for t in a for r in t)
    with pytest.raises(CalibrationError, match=">= 1"):
        next(task_batches(digits, 0))


def _arch_kwargs(arch: dict) -> str:
    import json

    return json.dumps({"arch": arch})


def test_init_weights_calibrate_bn_flag(tmp_path, capsys, digits) -> None:
    ghn_path = tmp_path / "ghn.safetensors"
    _ghn().save(ghn_path)
    out = tmp_path / "init.safetensors"
    argv = ["--ghn", str(ghn_path), "--model", "metanet.zoo.architectures:build_module",
            "--kwargs", _arch_kwargs(BN_CNN), "-o", str(out)]  # fmt: skip
    rc, report = init_weights_run(argv + ["--calibrate-bn", "3", "--data", "digits",
                                          "--batch-size", "32"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "BatchNorm: calibrated 2 BatchNorm layers on 3 batches (96 samples)" in text
    from safetensors.torch import load_file

    sd = load_file(str(out))
    # the same prediction calibrated by the library function on the same batches
    torch.manual_seed(0)
    model = build_module(BN_CNN)
    model.load_state_dict(sd)
    ref = build_module(BN_CNN)
    ref.load_state_dict({k: v for k, v in sd.items() if "running" not in k
                         and "num_batches" not in k}, strict=False)  # fmt: skip
    calibrate_batchnorm(ref, task_batches(digits, 3, 32, seed=0))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(sd[k], v, msg=k)
    for key in ("1.running_mean", "3.body.1.running_mean"):  # no longer the reset zeros
        assert not torch.allclose(sd[key], torch.zeros(6)), key
    # no BatchNorm: the output says nothing was calibrated
    rc, _ = init_weights_run(["--ghn", str(ghn_path), "--model",
                              "metanet.zoo.architectures:build_module", "--kwargs",
                              _arch_kwargs(MLP), "-o", str(tmp_path / "mlp.safetensors"),
                              "--calibrate-bn", "2", "--data", "digits"])  # fmt: skip
    assert rc == 0 and "nothing to calibrate" in capsys.readouterr().out
    # bad flags
    rc, _ = init_weights_run(argv + ["--calibrate-bn", "2"])
    assert rc == 2 and "--calibrate-bn needs --data" in capsys.readouterr().err
    rc, _ = init_weights_run(argv + ["--data", "digits"])
    assert rc == 2 and "only for --calibrate-bn" in capsys.readouterr().err
    rc, _ = init_weights_run(argv + ["--calibrate-bn", "2", "--data", "{provider: nope}"])
    assert rc == 2 and "--data" in capsys.readouterr().err
