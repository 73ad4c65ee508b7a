"""Graph hypernetworks on the model families people use.

The family stand-ins of ``test_real_archs`` (MobileNetV2/V3, EfficientNet, DenseNet, ConvNeXt,
Swin, RegNet, ShuffleNet) and tiny Hugging Face GPT-2 / BERT / ViT / Llama: the op graph is
recorded (the ParamGraph's tracer), every op is in the GHN vocabulary, a small untrained GHN
predicts a finite tensor of the right shape for every parameter, its report is exact, and the
model runs with the predicted parameters; ``metanet init-weights`` on a Hugging Face factory;
vocabulary errors; loading a checkpoint saved with the older, smaller op vocabulary.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_real_archs import FAMILIES, _example, _hf, _logits
from torch import Tensor, nn

from metanet.graph.arch import OPS, ArchGraph
from metanet.hyper.cli import main as init_weights_main
from metanet.hyper.ghn import FORMAT, GHN, GHNVocabularyError
from metanet.serialization import save_tree

CASES = ["mobilenet_v2", "mobilenet_v3", "efficientnet", "densenet", "convnext", "swin",
         "regnet", "shufflenet", "gpt2", "bert", "vit", "llama"]  # fmt: skip
OLD_VOCAB = OPS.index("unknown") + 1  # size of the op vocabulary before the appended ops


def tiny_gpt2(n_embd: int = 16, n_layer: int = 2) -> nn.Module:
    """A factory for ``metanet init-weights --model test_ghn_real_archs:tiny_gpt2``."""
    import transformers as tf

    cfg = tf.GPT2Config(vocab_size=40, n_positions=12, n_embd=n_embd, n_layer=n_layer, n_head=2,
                        use_cache=False, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return tf.GPT2LMHeadModel(cfg)


def _ghn(**kw) -> GHN:
    torch.manual_seed(0)
    return GHN(hidden=16, layers=1, decoder_hidden=16, rank=4, max_dim=32, **kw).eval()


@pytest.fixture(scope="module")
def ghn() -> GHN:
    return _ghn()


@pytest.mark.parametrize("family", CASES)
def test_ghn_predicts_every_parameter_of_real_families(family: str, ghn: GHN) -> None:
    factory, shape, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = factory().train()  # recorded in eval mode (dropout, stochastic depth: identity)
    x = _example(shape)
    graph = ArchGraph.from_module(model)
    assert all(m.training for m in model.modules())  # training flags restored
    assert not graph.unknown_nodes(), [(n.op, n.module_path) for n in graph.unknown_nodes()]
    assert graph.ops()[0] == "input" and graph.ops()[-1] == "output"
    assert not {"eq", "floordiv", "size", "getitem", "dropout"} & set(graph.ops())
    assert (graph.edge_index[0] < graph.edge_index[1]).all()
    with torch.no_grad():
        params = ghn.predict(model)
    named = dict(model.named_parameters())
    report = params.report
    # the report is exact: predicted and kept partition the parameters
    assert set(report.predicted) | set(report.kept) == set(named)
    assert not set(report.predicted) & set(report.kept)
    assert set(params) == set(report.predicted) and not report.kept
    assert report.num_predicted == sum(p.numel() for p in named.values())
    for name, value in params.items():
        assert value.shape == named[name].shape, name
        assert torch.isfinite(value).all(), name
    model.eval()
    with torch.no_grad():
        out = _logits(torch.func.functional_call(model, dict(params), (x,)))
        assert torch.isfinite(out).all()
        ghn.load_into(model)
        torch.testing.assert_close(_logits(model(x)), out)
    assert ghn.last_report.predicted == report.predicted


def test_family_ops_are_typed() -> None:
    def ops(family: str) -> list[str]:
        torch.manual_seed(0)
        return ArchGraph.from_module(FAMILIES[family][0]()).ops()

    v3 = ops("mobilenet_v3")
    assert "hardswish" in v3 and "hardsigmoid" in v3 and "group_conv" in v3 and "mul" in v3
    convnext = ArchGraph.from_module(FAMILIES["convnext"][0]())
    scale = [n for n in convnext.nodes if n.op == "layer_scale"]
    assert [n.params for n in scale] == [{"weight": "blocks.0.layer_scale"},
                                         {"weight": "blocks.1.layer_scale"}]  # fmt: skip
    assert "permute" in convnext.ops()
    assert {"matmul", "softmax", "split", "permute"} <= set(ops("swin"))
    assert {"embedding", "rmsnorm", "sdpa", "silu"} <= set(ops("llama"))
    assert {"embedding", "sdpa", "gelu"} <= set(ops("gpt2"))
    assert {"matmul", "softmax"} <= set(ops("gpt2_eager"))
    assert "cat" in ops("vit")  # the cls token, a parameter of the cat
    gpt2 = ArchGraph.from_module(FAMILIES["gpt2"][0]())
    assert gpt2.tied == {"lm_head.weight": "transformer.wte.weight"}
    attn = [n for n in gpt2.nodes if n.module_path == "transformer.h.0.attn.c_attn"][0]
    assert attn.op == "linear" and attn.attrs["transposed"]  # HF Conv1D, [in, out] weights


def test_tied_weights_are_predicted_once_and_stay_tied(ghn: GHN) -> None:
    model = FAMILIES["gpt2"][0]()
    params = ghn.predict(model)
    assert "lm_head.weight" not in params and params.report.tied == {
        "lm_head.weight": "transformer.wte.weight"
    }
    with torch.no_grad():
        ghn.load_into(model)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_keep_output_leaves_the_head_to_the_module_init(ghn: GHN) -> None:
    torch.manual_seed(0)
    model = FAMILIES["vit"][0]()
    own = {k: v.clone() for k, v in model.named_parameters()}
    full = ghn.predict(model)
    params = ghn.predict(model, keep_output=True)
    report = params.report
    graph = ArchGraph.from_module(model)
    head = {p for n in graph.nodes if n.attrs.get("last") for p in n.params.values()}
    assert head and set(report.kept) == head  # exactly the output layer's tensors are kept
    assert all("output layer" in report.kept[k] and "keep_output" in report.kept[k] for k in head)
    assert set(params) == set(full) - head
    assert set(report.predicted) | set(report.kept) == set(own)
    for name in params:  # the body is predicted exactly as without keep_output
        torch.testing.assert_close(params[name], full[name])
    with torch.no_grad():
        ghn.load_into(model, keep_output=True)
    named = dict(model.named_parameters())
    for name in head:
        assert torch.equal(named[name], own[name])
    assert not torch.equal(named[sorted(params)[0]], own[sorted(params)[0]])
    # a head tied to the input embedding (GPT-2's lm_head is wte) stays predicted and tied
    gpt2 = FAMILIES["gpt2"][0]()
    tied = ghn.predict(gpt2, keep_output=True)
    assert "transformer.wte.weight" in tied and "transformer.wte.weight" not in tied.report.kept


def test_init_weights_cli_on_a_hugging_face_factory(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    path = tmp_path / "ghn.safetensors"
    _ghn().save(path)
    out = tmp_path / "gpt2.safetensors"
    rc = init_weights_main(["--ghn", str(path), "--model", "test_ghn_real_archs:tiny_gpt2",
                            "--kwargs", "n_embd=16", "n_layer=2", "-o", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    n_tensors = len(list(tiny_gpt2().parameters()))
    n_params = sum(p.numel() for p in tiny_gpt2().parameters())
    assert f"predicted {n_tensors} tensors ({n_params} parameters)" in text
    assert "kept the module's own init for 0 tensors (0 parameters)" in text
    assert "predicted transformer.h.0.attn.c_attn.weight [16, 48]" in text
    assert "tied lm_head.weight -> transformer.wte.weight" in text
    from safetensors.torch import load_file

    sd = load_file(str(out))
    model = tiny_gpt2()
    model.load_state_dict(sd)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 40, (2, 7))).logits).all()
    # an explicit input shape (token ids) gives the same prediction as the guessed one
    rc = init_weights_main(["--ghn", str(path), "--model", "test_ghn_real_archs:tiny_gpt2",
                            "--input-shape", "1,5", "--input-vocab", "40", "--quiet", "-o",
                            str(tmp_path / "b.safetensors")])  # fmt: skip
    assert rc == 0 and "predicted transformer" not in capsys.readouterr().out
    torch.testing.assert_close(load_file(str(tmp_path / "b.safetensors")), sd)


class _Cumsum(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.cumsum(x, dim=-1)


class _WithUnknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.blk = nn.Sequential(_Cumsum())
        self.rnn = nn.GRU(4, 4, batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blk(self.fc(x))
        n = h.shape[1] // 2  # shape arithmetic: not an op
        h = h[:, :n] * (h[:, :n] > 0).float()  # a comparison mask: not an op
        return self.out(self.rnn(h)[0])


def test_ops_outside_the_vocabulary_name_op_and_module_path(ghn: GHN, caplog) -> None:
    model = _WithUnknown()
    x = torch.randn(2, 6, 4)
    graph = ArchGraph.from_module(model, x)
    assert [(n.op, n.module_path) for n in graph.unknown_nodes()] == [("cumsum", "blk.0"),
                                                                      ("gru", "rnn")]  # fmt: skip
    assert not {"gt", "floordiv", "float"} & set(graph.ops())
    with pytest.raises(GHNVocabularyError, match=r"op 'cumsum' .*module path 'blk\.0'"):
        ghn.predict(model, example_input=x)
    with caplog.at_level(logging.WARNING, logger="metanet.hyper.ghn"):
        params = ghn.predict(model, fallback_init=True, example_input=x)
    report = params.report
    rnn = {k for k, _ in model.named_parameters() if k.startswith("rnn.")}
    assert set(report.kept) == rnn and "op 'gru'" in report.kept["rnn.weight_ih_l0"]
    assert set(report.predicted) == {"fc.weight", "fc.bias", "out.weight", "out.bias"}
    assert set(report.predicted) | set(report.kept) == {k for k, _ in model.named_parameters()}
    assert report.num_kept == sum(model.get_parameter(k).numel() for k in rnn)
    assert "gru" in caplog.text and "kept the module's own init for 4 tensors" in report.summary()


def test_checkpoint_with_the_older_vocabulary_loads(tmp_path) -> None:
    ghn = _ghn(decoder="tiling", chunk=8)
    state = ghn.state_dict()
    state["op_embed.weight"] = state["op_embed.weight"][:OLD_VOCAB].clone()
    path = tmp_path / "old.safetensors"
    save_tree(path, {"format": FORMAT, "ghn_config": ghn.config, "state_dict": state})
    loaded = GHN.load(path)
    table = loaded.op_embed.weight
    assert table.shape == (len(OPS), 16)
    torch.testing.assert_close(table[:OLD_VOCAB], ghn.op_embed.weight[:OLD_VOCAB])
    torch.testing.assert_close(table[OPS.index("group_conv")], table[OPS.index("conv")])
    torch.testing.assert_close(table[OPS.index("hardswish")], table[OPS.index("silu")])
    torch.testing.assert_close(table[OPS.index("pad")], table[OPS.index("unknown")])
    mlp = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))  # old ops only
    with torch.no_grad():
        new, old = loaded.predict(mlp), ghn.predict(mlp)
    for k in new:
        torch.testing.assert_close(new[k], old[k])
    fresh = _ghn(decoder="tiling", chunk=8)
    fresh.load_state_dict(state)  # the plain (Lightning) path pads too
    torch.testing.assert_close(fresh.op_embed.weight, table)
    state["op_embed.weight"] = state["op_embed.weight"][:5].clone()
    save_tree(path, {"format": FORMAT, "ghn_config": ghn.config, "state_dict": state})
    with pytest.raises(ValueError, match="op embedding of 5 ops"):
        GHN.load(path)


def test_gqa_llama_and_eager_variants_predict(ghn: GHN) -> None:
    """Attention variants: eager GPT-2 / Llama and grouped-query Llama (4 query, 2 kv heads)."""
    tf = pytest.importorskip("transformers")
    gqa = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=32, use_cache=False, attn_implementation="sdpa",
    ))  # fmt: skip
    for model in (gqa, _hf("gpt2", "eager"), _hf("llama", "eager")):
        with torch.no_grad():
            params = ghn.predict(model)
        named = dict(model.named_parameters())
        assert set(params.report.predicted) == set(named)
        assert all(params[k].shape == named[k].shape for k in params)
