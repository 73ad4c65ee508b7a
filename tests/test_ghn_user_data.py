"""GHN training on the user's data and the user's model family."""

from __future__ import annotations

import pytest
import torch

from metanet.hyper.family import ArchFamily, FamilyError
from metanet.tasks.hypernet import GHNData, GHNTask

BARS = {"provider": "dataset", "class_path": "user_models:Bars", "init_args": {"n": 120},
        "val_fraction": 0.25, "test_fraction": 0.25}  # fmt: skip


def _family(tmp_path, sampler: str) -> str:
    path = tmp_path / "family.yaml"
    path.write_text(f"""name: bars-family
train:
  - {sampler}
  - {{type: mlp, depth: [1, 2], width: [8, 16]}}
held_out:
  - {{class_path: user_models:SmallNet, init_args: {{width: 12}}}}
""")
    return str(path)


def test_family_of_user_modules_is_sized_from_the_data(tmp_path):
    dm = GHNData(_family(tmp_path, "{class_path: user_models:SmallNet, init_args: "
                                   "{width: {choice: [4, 6]}}}"),
                 data=BARS, batch_size=16, archs_per_batch=2, steps_per_epoch=3)  # fmt: skip
    import random

    rng = random.Random(0)
    archs = [dm.family.sample(rng) for _ in range(20)]
    modules = [a for a in archs if a["type"] == "module"]
    mlps = [a for a in archs if a["type"] == "mlp"]
    assert modules and mlps
    assert {a["init_args"]["width"] for a in modules} == {4, 6}
    assert all(a["input_shape"] == [1, 12, 12] for a in modules)
    assert all(a["in"] == 144 and a["out"] == 3 for a in mlps)
    assert dm.family.held_out[0]["input_shape"] == [1, 12, 12]


def test_ghn_trains_on_user_data_and_predicts_user_modules(tmp_path):
    torch.manual_seed(0)
    dm = GHNData(_family(tmp_path, "{class_path: user_models:SmallNet, init_args: "
                                   "{width: {choice: [4, 6]}}}"),
                 data=BARS, batch_size=32, archs_per_batch=2, steps_per_epoch=100)  # fmt: skip
    dm.setup("fit")
    task = GHNTask(ghn={"hidden": 16, "layers": 1, "decoder_hidden": 16, "max_dim": 16},
                   lr=3e-3)
    opt = task.configure_optimizers()
    losses = []
    for i in range(100):  # the scaled normalisation starts slower than GHN-2's fan-in scaling
        batch = dm._train[i]
        outs = task.forward_archs(batch["archs"], batch["x"])
        loss = torch.stack([torch.nn.functional.cross_entropy(o, batch["y"]) for o in outs]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)  # chance is ln 3 = 1.10
    # the held-out user module gets every parameter predicted, on the validation split's shape
    val = dm._val[len(dm._val) - 1]
    assert val["held_out"] and val["archs"][0]["type"] == "module"
    with torch.no_grad():
        out = task.forward_archs(val["archs"], val["x"])[0]
    assert out.shape == (len(val["y"]), 3) and torch.isfinite(out).all()
    # end to end: the trained GHN writes the held-out user module's init with `init-weights`
    # (the user's class by class path; --calibrate-bn on the user's data: SmallNet has no
    # BatchNorm, which the output says)
    import json

    from safetensors.torch import load_file
    from user_models import SmallNet

    from metanet.hyper.cli import run as init_weights_run

    path = tmp_path / "ghn.safetensors"
    task.ghn.save(path)
    rc, report = init_weights_run([
        "--ghn", str(path), "--model", "user_models:SmallNet", "--kwargs", "width=12",
        "--input-shape", "1,1,12,12", "--calibrate-bn", "2", "--data", json.dumps(BARS),
        "-o", str(tmp_path / "init.safetensors")])  # fmt: skip
    assert rc == 0 and not report.kept and len(report.predicted) == 4
    sd = load_file(str(tmp_path / "init.safetensors"))
    net = SmallNet(width=12)
    with torch.no_grad():
        expected = task.ghn.eval().predict(net, example_input=torch.zeros(1, 1, 12, 12))
    for k, v in expected.items():
        torch.testing.assert_close(sd[k], v)
    net.load_state_dict(sd)
    acc = (net(val["x"]).argmax(-1) == val["y"]).float().mean().item()
    torch.testing.assert_close(out.argmax(-1).eq(val["y"]).float().mean().item(), acc)


def test_bad_family_entries_name_the_key(tmp_path):
    with pytest.raises(FamilyError, match=r"train\[0\].*'init_args'.*must be a mapping"):
        ArchFamily.from_yaml(_family(tmp_path, "{class_path: user_models:SmallNet, "
                                               "init_args: [1]}"))  # fmt: skip
    with pytest.raises(FamilyError, match=r"train\[0\].*cannot import 'no_such_pkg'"):
        GHNData(_family(tmp_path, "{class_path: no_such_pkg:Net}"), data=BARS)
    with pytest.raises(FamilyError, match=r"train\[0\]\.out: is 10, but the data .* needs 3"):
        GHNData(_family(tmp_path, "{type: mlp, depth: [1, 1], width: [4], out: [10]}"),
                data=BARS)  # fmt: skip


def test_mip_fits_on_a_tensor_file_with_sizes_linked_from_the_data(tmp_path):
    """``metanet fit`` links the data's input and class counts into the MIP task."""
    import numpy as np

    from metanet.cli import main

    x = np.random.default_rng(0).random((50, 4, 5)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(50) % 3)
    data = f"{{provider: tensors, path: {tmp_path / 'd.npz'}, test_fraction: 0.2}}"
    main(["fit", "--config", "configs/ghn/mip-digits.yaml", "--trainer.max_steps", "2",
          "--trainer.val_check_interval", "1", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
          "--trainer.enable_progress_bar", "false", "--data.init_args.data", data])  # fmt: skip
    # a 20-input, 3-class target MLP was built (the digits' 64 -> 10 would not run on the data)
    from metanet.tasks.hypernet import TaskBatches

    dm = TaskBatches(data={"provider": "tensors", "path": str(tmp_path / "d.npz"),
                           "test_fraction": 0.2})  # fmt: skip
    assert (dm.input_features, dm.output_classes) == (20, 3)
