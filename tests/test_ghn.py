"""ArchGraph tracing, GHN decoders, vocabulary errors, training signal, files and CLI."""

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from metanet.graph.arch import ArchGraph, ArchTraceError
from metanet.hyper.cli import main as init_weights_main
from metanet.hyper.decoders import fit_to, normalize_param
from metanet.hyper.ghn import GHN, GHNVocabularyError
from metanet.zoo.architectures import build_module


def _res_cnn() -> nn.Module:
    return build_module({"type": "cnn", "channels": [6, 6], "kernel": 3, "residual": True,
                         "norm": "batch", "dropout": False})  # fmt: skip


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h)
        h = torch.relu(self.drop(a) + h)
        return self.out(h.mean(dim=1))


def test_archgraph_types_edges_and_params():
    m = _res_cnn()
    g = ArchGraph.from_module(m)
    ops = g.ops()
    assert ops[0] == "input" and ops[-1] == "output"
    assert ops.count("conv") == 2 and ops.count("batchnorm") == 2 and "add" in ops
    add = ops.index("add")
    preds = sorted(g.edge_index[0][g.edge_index[1] == add].tolist())
    assert len(preds) == 2  # the skip connection and the block output
    assert (g.edge_index[0] < g.edge_index[1]).all()  # topological order
    names = {p for n in g.nodes for p in n.params.values()}
    assert names == {k for k, _ in m.named_parameters()}
    feats = g.shape_features()
    assert feats.shape == (len(g), 8) and torch.isfinite(feats).all()
    conv = g.nodes[ops.index("conv")]
    assert feats[ops.index("conv"), 2] == 3.0 and conv.shapes["weight"] == (6, 1, 3, 3)
    # dropout is a pass-through, attention is typed, the functional relu/add/mean are ops
    ga = ArchGraph.from_module(_Attn())
    assert "attention" in ga.ops() and "relu" in ga.ops() and "global_pool" in ga.ops()
    assert all(n.module_path != "drop" for n in ga.nodes)
    assert ga.to_networkx().number_of_nodes() == len(ga)


class _Cond(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.blk = nn.Sequential(nn.ReLU(), _Cond())

    def forward(self, x):
        return self.blk(self.a(x))


def test_untraceable_forward_names_the_submodule():
    with pytest.raises(ArchTraceError, match=r"submodule 'blk\.1' \(_Cond\)"):
        ArchGraph.from_module(_Outer())


def test_unknown_op_error_and_logged_fallback(caplog):
    class WithLSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.rnn = nn.LSTM(4, 4)

        def forward(self, x):
            return self.rnn(self.fc(x))[0]

    ghn = GHN(hidden=16, layers=1, decoder_hidden=16, max_dim=16)
    m = WithLSTM()
    with pytest.raises(GHNVocabularyError, match=r"op 'lstm' .*module path 'rnn'"):
        ghn.load_into(m)
    before = m.rnn.weight_ih_l0.detach().clone()
    fc_before = m.fc.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="metanet.hyper.ghn"):
        ghn.load_into(m, fallback_init=True)
    assert "lstm" in caplog.text
    torch.testing.assert_close(m.rnn.weight_ih_l0, before)  # own init kept
    assert not torch.equal(m.fc.weight, fc_before)  # predicted


def test_fit_to_tiles_and_slices():
    t = torch.arange(6.0).view(2, 3)
    out = fit_to(t, [5, 2], [0, 1])
    assert out.shape == (5, 2)
    torch.testing.assert_close(out[:, 0], torch.tensor([0.0, 3.0, 0.0, 3.0, 0.0]))
    torch.testing.assert_close(out[:, 1], torch.tensor([1.0, 4.0, 1.0, 4.0, 1.0]))
    raw = torch.ones(10, 20, 3, 3)
    torch.testing.assert_close(normalize_param(raw, "weight", "conv"),
                               torch.full_like(raw, math.sqrt(2 / 180)))  # fmt: skip
    torch.testing.assert_close(normalize_param(torch.zeros(4), "weight", "batchnorm"),
                               torch.ones(4))  # fmt: skip


@pytest.mark.parametrize("decoder", ["lowrank", "tiling"])
def test_both_decoders_reach_any_shape_and_give_gradients(decoder):
    ghn = GHN(hidden=16, layers=2, decoder=decoder, decoder_hidden=16, rank=4, max_dim=16,
              chunk=8, kernel=3)  # fmt: skip
    models = [
        build_module({"type": "mlp", "widths": [40, 7], "activation": "gelu"}),  # > max_dim
        build_module({"type": "cnn", "channels": [5, 20], "kernel": 5, "norm": "group"}),
        nn.Sequential(nn.Conv1d(2, 3, 1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 9, 2)),
        _Attn(),
    ]
    inputs = [torch.rand(3, 64), torch.rand(3, 1, 8, 8), torch.rand(3, 2, 9), torch.rand(3, 5, 4)]
    for m, x in zip(models, inputs):
        params = ghn.predict(m)
        assert set(params) == {k for k, _ in m.named_parameters()}
        for k, p in m.named_parameters():
            assert params[k].shape == p.shape, k
        out = torch.func.functional_call(m, params, (x,))
        assert torch.isfinite(out).all()
        out.square().mean().backward()
    assert all(p.grad is not None for p in ghn.decoder.parameters())
    # fan-in normalisation: a 40-wide layer's weights are smaller than a 7-input layer's
    p = ghn.predict(models[0])
    assert p["2.weight"].std() < p["4.weight"].std() * 1.5 / math.sqrt(40 / 7) * 2


def test_lowrank_decoder_is_much_smaller_for_wide_targets():
    with torch.device("meta"):
        low = GHN(decoder="lowrank", max_dim=512, rank=8, kernel=3)
        tile = GHN(decoder="tiling", chunk=512, kernel=3)
    assert low.num_decoder_parameters() * 50 < tile.num_decoder_parameters()


def test_ghn_training_reduces_loss_on_an_architecture_pair():
    torch.manual_seed(0)
    from metanet.data.digits import load_digits

    d = load_digits()
    x, y = d.x_train[:128], d.y_train[:128]
    ghn = GHN(hidden=16, layers=1, decoder="lowrank", decoder_hidden=16, rank=4, max_dim=32)
    archs = [{"type": "mlp", "widths": [16]}, {"type": "cnn", "channels": [4], "kernel": 3}]
    mods = [build_module(a) for a in archs]
    graphs = [ghn.prepare(ArchGraph.from_module(m), m) for m in mods]
    xs = [x.flatten(1), x]
    opt = torch.optim.Adam(ghn.parameters(), lr=1e-2)

    def loss_fn():
        ps = ghn.predict_prepared(graphs)
        return sum(nn.functional.cross_entropy(torch.func.functional_call(m, p, (xi,)), y)
                   for m, p, xi in zip(mods, ps, xs)) / 2  # fmt: skip

    first = loss_fn().item()
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_save_load_and_init_weights_cli(tmp_path, capsys):
    ghn = GHN(hidden=16, layers=1, decoder="tiling", decoder_hidden=16, chunk=8)
    path = tmp_path / "ghn.pt"
    ghn.save(path)
    loaded = GHN.load(path)
    m = nn.Linear(8, 4)
    torch.testing.assert_close(loaded.predict(m)["weight"], ghn.predict(m)["weight"])
    out = tmp_path / "init.pt"
    rc = init_weights_main(["--ghn", str(path), "--model", "torch.nn:Linear", "--kwargs",
                            "in_features=8", "out_features=4", "-o", str(out)])  # fmt: skip
    assert rc == 0
    sd = torch.load(out)
    with torch.no_grad():
        torch.testing.assert_close(sd["weight"], ghn.predict(m)["weight"])
    capsys.readouterr()
    # --keep-output: the only layer is the output layer, so nothing is predicted, and it says so
    rc = init_weights_main(["--ghn", str(path), "--model", "torch.nn:Linear", "--kwargs",
                            "in_features=8", "out_features=4", "--keep-output",
                            "-o", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0 and "kept the module's own init for 2 tensors (36 parameters)" in text
    assert "kept weight: output layer" in text
    assert not torch.equal(torch.load(out)["weight"], sd["weight"])
    rc = init_weights_main(["--ghn", str(path), "--model", "torch.nn:LSTM", "--kwargs",
                            '{"input_size": 4, "hidden_size": 4}', "-o", str(out)])  # fmt: skip
    assert rc == 2 and "op 'lstm'" in capsys.readouterr().err
    rc = init_weights_main(["--ghn", str(tmp_path / "missing.ckpt"), "--model",
                            "torch.nn:Linear", "-o", str(out)])  # fmt: skip
    assert rc == 2 and "missing.ckpt" in capsys.readouterr().err
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    rc = init_weights_main(["--ghn", str(tmp_path / "junk.ckpt"), "--model", "torch.nn:Linear",
                            "-o", str(out)])  # fmt: skip
    assert rc == 2 and "junk.ckpt" in capsys.readouterr().err


@pytest.mark.slow
def test_lightning_fit_config_runs_and_checkpoint_feeds_init_weights(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    from metanet.tasks.hypernet import GHNTask  # noqa: F401

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)  # the config's runs/ghn-lowrank/checkpoints land in tmp_path
    args = ["fit", "--config", str(root / "configs/ghn/digits-lowrank.yaml"),
            "--data.init_args.recipe", str(root / "datasets/ghn-digits-family.yaml"),
            "--trainer.max_steps", "3",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--data.init_args.val_family_archs", "1"]
    LightningCLI(subclass_mode_model=True, subclass_mode_data=True, args=args,
                 save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
    ckpts = sorted(tmp_path.rglob("last.ckpt"))
    assert ckpts
    out = tmp_path / "init.pt"
    kwargs = '{"arch": {"type": "mlp", "widths": [300]}}'
    rc = init_weights_main(["--ghn", str(ckpts[0]), "--model",
                            "metanet.zoo.architectures:build_module", "--kwargs", kwargs,
                            "-o", str(out)])  # fmt: skip
    assert rc == 0 and torch.load(out)["0.weight"].shape == (300, 64)
    # the pickle-free copy beside the checkpoint predicts the same weights
    out2 = tmp_path / "init.safetensors"
    rc = init_weights_main(["--ghn", str(ckpts[0].with_suffix(".safetensors")), "--model",
                            "metanet.zoo.architectures:build_module", "--kwargs", kwargs,
                            "-o", str(out2)])  # fmt: skip
    from metanet.serialization import load_file

    assert rc == 0 and torch.equal(load_file(out2)["0.weight"], torch.load(out)["0.weight"])


def test_family_recipe_samples_valid_archs_and_rejects_bad_keys(tmp_path):
    import random

    from metanet.hyper.family import ArchFamily, FamilyError

    fam = ArchFamily.from_yaml("datasets/ghn-digits-family.yaml")
    rng = random.Random(0)
    archs = [fam.sample(rng) for _ in range(30)]
    assert {a["type"] for a in archs} == {"mlp", "cnn"}
    def dims(a):
        return a.get("widths") or a.get("channels")

    for held in fam.held_out:  # held-out archs are wider and deeper than the family's
        same = [a for a in archs if a["type"] == held["type"]]
        assert min(dims(held)) > max(max(dims(a)) for a in same)
        assert len(dims(held)) > max(len(dims(a)) for a in same)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  - {type: mlp, depth: [1, 2], width: [8], activation: swishy}\n")
    with pytest.raises(FamilyError, match=r"bad\.yaml: train\[0\].*activation"):
        ArchFamily.from_yaml(bad)
    bad.write_text("train: []\nextra: 1\n")
    with pytest.raises(FamilyError, match="unknown key"):
        ArchFamily.from_yaml(bad)


def test_load_into_needs_a_module_and_apply_stays_nn_module_apply():
    ghn = GHN(hidden=8, layers=1, decoder_hidden=8, max_dim=8)
    seen = []
    assert ghn.apply(lambda m: seen.append(type(m).__name__)) is ghn  # nn.Module.apply(fn)
    assert "GHN" in seen and "LowRankDecoder" in seen
    with pytest.raises(TypeError, match="nn.Module"):
        ghn.load_into(3)


def _attention_logit_std(model: nn.Module, x: torch.Tensor) -> float:
    """Std of the pre-softmax attention logits of every ``nn.MultiheadAttention`` in ``model``."""
    logits = []

    def hook(mod, args, out):
        h = args[0]
        q, k, _ = nn.functional.linear(h, mod.in_proj_weight, mod.in_proj_bias).chunk(3, -1)
        n, t, d = q.shape
        dh = d // mod.num_heads
        q = q.reshape(n, t, mod.num_heads, dh).transpose(1, 2)
        k = k.reshape(n, t, mod.num_heads, dh).transpose(1, 2)
        logits.append((q @ k.transpose(-1, -2) / math.sqrt(dh)).flatten())

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, nn.MultiheadAttention)]  # fmt: skip
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return torch.cat(logits).std().item()


@pytest.mark.parametrize("decoder", ["lowrank", "tiling"])
def test_scaled_normalization_keeps_transformer_scales_whatever_the_decoder_scale(decoder):
    """The failure of issue 11 on a small case: a GHN whose decoder outputs have grown (x30, as
    after training on a family without transformers) gives one-hot attention and a blown-up
    residual stream with GHN-2's fan-in normalisation; the scaled normalisation sets every weight
    tensor's RMS to ``sqrt(beta / fan_in)`` exactly (gain 1 at init), so neither happens."""
    from metanet.hyper.family import PatchTransformer

    x = torch.rand(16, 1, 8, 8)
    torch.manual_seed(0)
    model = PatchTransformer(dim=32, depth=2, heads=4)
    ref = _attention_logit_std(model, x)  # PyTorch's default init
    out = {}
    for norm in ("fan_in", "scaled"):
        torch.manual_seed(0)
        ghn = GHN(hidden=16, layers=1, decoder=decoder, decoder_hidden=16, rank=4, max_dim=64,
                  chunk=16, normalize=norm).eval()  # fmt: skip
        head = ghn.decoder.factors if decoder == "lowrank" else ghn.decoder.matrix
        with torch.no_grad():
            head[-1].weight.mul_(30.0)
            ghn.decoder.vector.net[-1].weight.mul_(30.0)
            params = ghn.predict(model)
        m = PatchTransformer(dim=32, depth=2, heads=4)
        m.load_state_dict(dict(params), strict=False)
        with torch.no_grad():
            logits = m.eval()(x)
        out[norm] = (_attention_logit_std(m, x), logits.std().item(), params)
    # attention logit std: default init ~0.5; fan-in: > 1000 (one-hot attention); scaled: a few
    # (low-rank / tiled weights of a fixed RMS have a few large singular values)
    assert out["fan_in"][0] > 100 * max(ref, 1.0) and out["fan_in"][0] > 100 * out["scaled"][0]
    assert out["scaled"][0] < 4.0 and out["scaled"][1] < 5.0
    assert out["fan_in"][1] > 20 * out["scaled"][1]
    params = out["scaled"][2]
    # exact RMS sqrt(beta / fan_in): beta 2 only where a rectifier follows (fc1 -> GELU)
    for name, beta in (("blocks.0.fc1.weight", 2.0), ("blocks.0.fc2.weight", 1.0),
                       ("blocks.0.attn.in_proj_weight", 1.0),
                       ("blocks.0.attn.out_proj.weight", 1.0), ("head.weight", 1.0),
                       ("embed.weight", 1.0)):  # fmt: skip
        p = params[name]
        rms = p.pow(2).mean().sqrt().item()
        assert rms == pytest.approx(math.sqrt(beta / p[0].numel()), rel=1e-4), name
    for name in ("blocks.0.ln1.weight", "norm.weight"):  # norm scales bounded in (0, 2)
        assert (params[name] > 0).all() and (params[name] < 2).all()
    for name in ("blocks.0.ln1.bias", "norm.bias"):  # norm shifts bounded in (-1, 1)
        assert params[name].abs().max() < 1.0
    for name in ("blocks.0.fc1.bias", "blocks.0.attn.in_proj_bias"):  # biases: 1 / sqrt(fan_in)
        assert params[name].abs().max() <= 1.0 / math.sqrt(32) + 1e-6


def test_predicted_gain_is_learnt_and_old_checkpoints_keep_fan_in(tmp_path):
    from metanet.serialization import save_tree

    assert GHN(hidden=16, layers=1).config["normalize"] == "fan_in"  # the default
    ghn = GHN(hidden=16, layers=1, decoder_hidden=16, rank=4, max_dim=32, normalize="scaled")
    mlp = build_module({"type": "mlp", "widths": [16]})
    w = ghn.predict(mlp)["0.weight"]
    w.pow(2).mean().backward()
    assert ghn.gain.weight.grad is not None and ghn.gain.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="normalize must be one of"):
        GHN(normalize="he")
    # a checkpoint saved before the scaled normalisation (no 'normalize' in its config) loads
    # with GHN-2's fan-in scaling and predicts what it predicted then
    old = GHN(hidden=16, layers=1, decoder_hidden=16, rank=4, max_dim=32, normalize="fan_in")
    config = {k: v for k, v in old.config.items() if k != "normalize"}
    path = tmp_path / "old.safetensors"
    save_tree(path, {"format": "metanet-ghn/1", "ghn_config": config,
                     "state_dict": old.state_dict()})  # fmt: skip
    loaded = GHN.load(path)
    assert loaded.normalize == "fan_in" and not hasattr(loaded, "gain")
    with torch.no_grad():
        new, ref = loaded.predict(mlp), old.predict(mlp)
    for k in ref:
        torch.testing.assert_close(new[k], ref[k])


def test_transformer_family_recipe_builds_and_the_ghn_predicts_it():
    import random

    from metanet.data.tasks import load_task_data
    from metanet.hyper.family import ArchFamily, PatchTransformer

    fam = ArchFamily.from_yaml("configs/ghn/digits-transformer-family.yaml",
                               task=load_task_data("digits"))  # fmt: skip
    rng = random.Random(0)
    archs = [fam.sample(rng) for _ in range(40)]
    modules = [a for a in archs if a["type"] == "module"]
    assert {a["init_args"]["attention"] for a in modules} == {"mha", "qkv"}
    assert all(a["input_shape"] == [1, 8, 8] for a in modules)
    ghn = GHN(hidden=16, layers=1, decoder_hidden=16, rank=4, max_dim=64).eval()
    for arch in modules[:2] + [a for a in fam.held_out if a["type"] == "module"]:
        m = build_module(arch)
        assert isinstance(m, PatchTransformer)
        with torch.no_grad():
            params = ghn.predict(m, example_input=torch.zeros(1, 1, 8, 8))
        assert set(params) == {k for k, _ in m.named_parameters()} and not params.report.kept
        out = torch.func.functional_call(m, dict(params), (torch.rand(3, 1, 8, 8),))
        assert out.shape == (3, 10) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="multiple of heads"):
        PatchTransformer(dim=30, heads=4)
