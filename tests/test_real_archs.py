"""Parameter graphs of the model families people use (``metanet.graph.from_module``).

Small stand-ins, named after the family each reproduces the op patterns of (MobileNetV2/V3,
EfficientNet, DenseNet, ConvNeXt, Swin, RegNet, ShuffleNet), and Hugging Face GPT-2, BERT, ViT
and Llama built from config objects (random init, nothing downloaded). For each: the graph
builds, writing it into a freshly initialised copy recomputes the same function, every
parameter element sits on exactly one edge (kernel for convs) or node, the remaining edges are
structural (residual, product, attention heads, patch / flatten, unit shifts), and permuting
hidden channels / heads gives an isomorphic graph (same sorted degree sequences, same invariant
``GMN`` output).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metanet.graph import EdgeType, NodeType, ParamGraph, UnsupportedOpError, from_module
from metanet.nn import GMN, NGT

STRUCTURAL = {
    EdgeType.RESIDUAL, EdgeType.FLATTEN, EdgeType.ATTN_HEAD, EdgeType.ATTN_PAIR, EdgeType.GROUP,
    EdgeType.PRODUCT, EdgeType.PATCH, EdgeType.SCALE,
}  # fmt: skip


# ----------------------------------------------------------------------------- CNN families
class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int, gate: Callable[[Tensor], Tensor] = F.hardsigmoid) -> None:
        super().__init__()
        self.fc1, self.fc2, self.gate = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1), gate

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block (expand 1x1, depthwise 3x3, project 1x1, residual); ``se`` and
    ``act=Hardswish`` make it MobileNetV3's."""

    def __init__(self, c: int, expand: int, act: type[nn.Module] = nn.ReLU6, se: bool = False):
        super().__init__()
        h = c * expand
        layers = [nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), act(),
                  nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), act()]
        if se:
            layers.append(SqueezeExcite(h, 4))
        layers += [nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, v3: bool = False) -> None:
        super().__init__()
        act = nn.Hardswish if v3 else nn.ReLU6
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), act())
        self.blocks = nn.Sequential(InvertedResidual(8, 3, act, v3), InvertedResidual(8, 2, act))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 12), act(),
                                  nn.Dropout(0.2), nn.Linear(12, 5))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


class StochasticDepth(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.p
        return x * keep / (1 - self.p)


class MBConv(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        h = 4 * c
        self.block = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.SiLU(),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.SiLU(),
            SqueezeExcite(h, 2, torch.sigmoid), nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c),
        )  # fmt: skip
        self.drop = StochasticDepth(0.2)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop(self.block(x))


class EfficientNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 6, 3, 2, 1, bias=False), nn.BatchNorm2d(6), nn.SiLU()
        )
        self.blocks = nn.Sequential(MBConv(6), MBConv(6))
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class DenseLayer(nn.Module):
    def __init__(self, c: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, feats: list[Tensor]) -> Tensor:
        x = torch.cat(feats, 1)
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class DenseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.layers = nn.ModuleList([DenseLayer(6, 4), DenseLayer(10, 4)])
        self.trans = nn.Sequential(
            nn.BatchNorm2d(14), nn.ReLU(), nn.Conv2d(14, 8, 1), nn.AvgPool2d(2)
        )
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(feats))
        x = self.trans(torch.cat(feats, 1))
        return self.fc(x.mean((2, 3)))


class LayerNorm2d(nn.LayerNorm):
    """torchvision's channels-first LayerNorm: permute, layer_norm, permute back."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        y = self.mlp(self.norm(self.dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x + self.layer_scale * y


class ConvNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), LayerNorm2d(8))
        self.blocks = nn.Sequential(CNBlock(8), CNBlock(8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8),
                                  nn.Linear(8, 3))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


class WindowAttention(nn.Module):
    """Swin's windowed self-attention: window partition by view/permute, fused qkv reshaped to
    (3, heads, head_dim) and permuted, scores by matmul plus the learned relative position bias
    (``relative_position_bias_table[relative_position_index]``, as timm and torchvision write
    it), windows merged back."""

    def __init__(self, c: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.norm, self.qkv, self.proj = nn.LayerNorm(c), nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.norm2 = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                            indexing="ij")).flatten(1)  # fmt: skip
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        index = rel[..., 0] * (2 * window - 1) + rel[..., 1]
        self.register_buffer("relative_position_index", index)

    def _bias(self) -> Tensor:
        n = self.window**2
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return table.view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: Tensor) -> Tensor:  # [B, H, W, C]
        b, h, w, c = x.shape
        ws = self.window
        y = self.norm(x).view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        y = y.reshape(-1, ws * ws, c)
        qkv = self.qkv(y).reshape(y.shape[0], ws * ws, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1) + self._bias()
        y = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(-1, ws * ws, c)
        y = self.proj(y).view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        x = x + y.reshape(b, h, w, c)
        return x + self.mlp(self.norm2(x))


class Swin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.blocks = nn.Sequential(WindowAttention(8, 2, 2), WindowAttention(8, 2, 2))
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.patch(x).permute(0, 2, 3, 1))
        return self.head(x.mean((1, 2)))


class RegNetBlock(nn.Module):
    def __init__(self, c: int, group_width: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c // group_width, bias=False),
                               nn.BatchNorm2d(c), nn.ReLU(), SqueezeExcite(c, 2, torch.sigmoid))
        self.c = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.c(self.b(self.a(x))))


class RegNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.blocks = nn.Sequential(RegNetBlock(8, 4), RegNetBlock(8, 2))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: two 3x3 conv + BN, identity or 1x1-conv + BN shortcut,
    ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(out + skip)


class ResNet(nn.Module):
    """torchvision's ResNet layout with basic blocks: a 7x7 stride-2 padded stem (wider than
    max_kernel_size=9) + max pool, stages of ``blocks`` basic blocks (the first stage at stride
    1, the others 2), global average pool, a Linear. ``ResNet((64, 128, 256, 512), 2, 1000,
    stem=64)`` is ResNet-18 (11,689,512 parameters; ``scripts/bench_common.py``)."""

    def __init__(self, widths: tuple[int, ...] = (8, 12), blocks: int = 1,
                 num_classes: int = 5, stem: int = 8) -> None:  # fmt: skip
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = stem
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(cin if b == 0 else cout, cout, stride if b == 0 else 1)
                     for b in range(blocks)]  # fmt: skip
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            cin = cout
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class WideFunctionalConv(nn.Module):
    """A functional 5x5 conv with dilation (``F.conv2d`` on a parameter), wider than K=9."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3, 5, 5) * 0.1)
        self.bias = nn.Parameter(torch.zeros(6))
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(F.conv2d(x, self.weight, self.bias, stride=1, padding=4, dilation=2))
        return self.fc(x.mean((2, 3)))


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h),
            nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch(x2)), dim=1), 2)


class ShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.units = nn.Sequential(ShuffleUnit(8), ShuffleUnit(8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.units(self.stem(x)).mean([2, 3]))


# ----------------------------------------------------------------------------- Hugging Face
def _hf(name: str, attn: str = "sdpa") -> nn.Module:
    tf = pytest.importorskip("transformers")
    small = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 attn_implementation=attn)  # fmt: skip
    if name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=40, n_positions=12, n_embd=16, n_layer=2, n_head=2,
                            use_cache=False, attn_implementation=attn)  # fmt: skip
        return tf.GPT2LMHeadModel(cfg)
    if name == "bert":
        cfg = tf.BertConfig(vocab_size=40, hidden_size=16, max_position_embeddings=12,
                            num_labels=3, **small)  # fmt: skip
        return tf.BertForSequenceClassification(cfg)
    if name == "vit":
        cfg = tf.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_labels=3, **small)
        return tf.ViTForImageClassification(cfg)
    if name == "llama_gqa":  # grouped-query attention: 4 query heads share 2 key/value heads
        small = {**small, "num_attention_heads": 4}
        cfg = tf.LlamaConfig(vocab_size=40, hidden_size=16, num_key_value_heads=2,
                             max_position_embeddings=12, use_cache=False, **small)  # fmt: skip
        return tf.LlamaForCausalLM(cfg)
    cfg = tf.LlamaConfig(vocab_size=40, hidden_size=16, num_key_value_heads=2,
                         max_position_embeddings=12, use_cache=False, **small)  # fmt: skip
    return tf.LlamaForCausalLM(cfg)


def _logits(out: object) -> Tensor:
    return out if isinstance(out, Tensor) else out.logits  # type: ignore[attr-defined]


IMAGE = (2, 3, 16, 16)
TOKENS = (2, 7)
# family -> (factory, example input shape, max_kernel_size)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "mobilenet_v2": (MobileNetV2, IMAGE, 9),
    "mobilenet_v3": (lambda: MobileNetV2(v3=True), IMAGE, 9),
    "efficientnet": (EfficientNet, IMAGE, 9),
    "densenet": (DenseNet, IMAGE, 9),
    "resnet": (ResNet, IMAGE, 9),  # 7x7 stem read as a linear map over its kernel offsets
    "wide_functional_conv": (WideFunctionalConv, IMAGE, 9),
    "convnext": (ConvNeXt, IMAGE, 9),  # depthwise 7x7 convs: kernel-offset nodes, scalar edges
    "swin": (Swin, IMAGE, 9),  # 4x4 patchify conv read as a linear map over patch pixels
    "regnet": (RegNet, IMAGE, 9),
    "shufflenet": (ShuffleNet, IMAGE, 9),
    "gpt2": (lambda: _hf("gpt2"), TOKENS, 9),
    "gpt2_eager": (lambda: _hf("gpt2", "eager"), TOKENS, 9),
    "bert": (lambda: _hf("bert"), TOKENS, 9),
    "vit": (lambda: _hf("vit"), IMAGE, 9),  # 8x8 patch embedding: linear map over patch pixels
    "llama": (lambda: _hf("llama"), TOKENS, 9),
    "llama_eager": (lambda: _hf("llama", "eager"), TOKENS, 9),
    "llama_gqa": (lambda: _hf("llama_gqa"), TOKENS, 9),  # sdpa's enable_gqa
    "llama_gqa_eager": (lambda: _hf("llama_gqa", "eager"), TOKENS, 9),  # repeat_kv
}


def _example(shape: tuple[int, ...]) -> Tensor:
    gen = torch.Generator().manual_seed(1)
    if len(shape) == 2:
        return torch.randint(0, 40, shape, generator=gen)
    return torch.randn(shape, generator=gen)


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random values in every float state_dict entry (BatchNorm statistics included; not in
    non-persistent buffers such as rotary frequencies, which are not the model's state)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if torch.is_floating_point(t):
                v = torch.rand(t.shape, generator=gen) * 0.5 + 0.25 if "var" in name else (
                    torch.randn(t.shape, generator=gen) * 0.3
                )  # fmt: skip
                t.copy_(v)
    return module.eval()


def _build(family: str) -> tuple[nn.Module, Tensor, ParamGraph, float]:
    factory, shape, k = FAMILIES[family]
    torch.manual_seed(0)
    module = _randomize(factory(), 0)
    x = _example(shape)
    t0 = time.perf_counter()
    g = from_module(module, x, max_kernel_size=k)
    return module, x, g, time.perf_counter() - t0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_graph_round_trip_and_counts(family: str) -> None:
    module, x, g, _ = _build(family)
    factory = FAMILIES[family][0]
    torch.manual_seed(123)
    fresh = _randomize(factory(), 7)
    with torch.no_grad():
        before = _logits(fresh(x))
        assert not torch.allclose(before, _logits(module(x)))
        g.load_into(fresh)
        torch.testing.assert_close(_logits(fresh(x)), _logits(module(x)), atol=1e-5, rtol=1e-5)
    # one edge per weight (per kernel for convs) or one node value per bias / statistic
    layout = g.layout
    edge_rows = torch.cat([s.rows for s in layout.slots.values() if s.source == "edge"])
    assert edge_rows.unique().numel() == edge_rows.numel()
    for key, s in layout.slots.items():
        assert s.rows.numel() * s.width == torch.Size(s.shape).numel(), key
    weight_edges = torch.zeros(g.num_edges, dtype=torch.bool)
    weight_edges[edge_rows] = True
    others = {EdgeType(int(t)) for t in g.edge_type[~weight_edges].unique()}
    assert others <= STRUCTURAL, others
    assert g.edge_index.size(1) == g.edge_attr.size(0) == g.num_edges
    assert torch.all(g.edge_index[1, 1:] >= g.edge_index[1, :-1])  # dst-sorted


def test_gpt2_lm_head_stays_tied() -> None:
    module, x, g, _ = _build("gpt2")
    assert g.layout.meta["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    sd = g.to_state_dict()
    assert sd["lm_head.weight"] is sd["transformer.wte.weight"]
    fresh = _hf("gpt2")
    g.load_into(fresh)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert torch.equal(fresh.lm_head.weight, module.lm_head.weight)


# ----------------------------------------------------------------------------- symmetries
Spec = list[tuple[str, int, Tensor]]  # (state_dict key, dim, permutation of that dim)


def _permute(module: nn.Module, specs: Spec) -> nn.Module:
    """Reorder dim ``d`` of every state_dict entry named in ``specs``."""
    sd = module.state_dict()
    for name, d, perm in specs:
        sd[name] = sd[name].index_select(d, perm).clone()
    module.load_state_dict(sd)
    return module


def _perm(n: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(3))


def _same(keys: list[tuple[str, int]], perm: Tensor) -> Spec:
    return [(k, d, perm) for k, d in keys]


def _bn(prefix: str) -> list[tuple[str, int]]:
    return [(f"{prefix}.{p}", 0) for p in ("weight", "bias", "running_mean", "running_var")]


def _gpt2_heads() -> Spec:
    """Swap the two heads of GPT-2's layer 0: the q, k and v blocks of ``c_attn`` and the
    rows of ``c_proj`` that read the values."""
    heads = torch.cat([torch.arange(8, 16), torch.arange(0, 8)])
    qkv = torch.cat([heads + 16 * i for i in range(3)])
    p = "transformer.h.0.attn."
    return [(p + "c_attn.weight", 1, qkv), (p + "c_attn.bias", 0, qkv),
            (p + "c_proj.weight", 0, heads)]  # fmt: skip


def _gqa_heads() -> Spec:
    """Layer 0 of the GQA Llama (4 query heads of width 4 over 2 key/value heads): key/value
    heads ``[1, 0]``, query heads ``[3, 2, 1, 0]`` (both groups swapped, and the heads within
    each), ``o_proj`` columns with the query heads. Rotary positions act within a head, so
    whole heads may move."""
    def rows(order: list[int]) -> Tensor:
        return torch.cat([torch.arange(4) + 4 * h for h in order])

    p = "model.layers.0.self_attn."
    q, kv = rows([3, 2, 1, 0]), rows([1, 0])
    return [(p + "q_proj.weight", 0, q), (p + "k_proj.weight", 0, kv),
            (p + "v_proj.weight", 0, kv), (p + "o_proj.weight", 1, q)]  # fmt: skip


def _swin_heads() -> Spec:
    heads = torch.cat([torch.arange(4, 8), torch.arange(0, 4)])
    qkv = torch.cat([heads + 8 * i for i in range(3)])
    p = "blocks.0."
    return [(p + "qkv.weight", 0, qkv), (p + "qkv.bias", 0, qkv), (p + "proj.weight", 1, heads),
            (p + "relative_position_bias_table", 1, torch.tensor([1, 0]))]  # fmt: skip


PERMUTATIONS: dict[str, Callable[[], Spec]] = {
    # the 24 expanded channels of the first inverted residual (through its SE gate)
    "mobilenet_v3": lambda: _same(
        [("blocks.0.block.0.weight", 0), *_bn("blocks.0.block.1"), ("blocks.0.block.3.weight", 0),
         *_bn("blocks.0.block.4"), ("blocks.0.block.6.fc1.weight", 1),
         ("blocks.0.block.6.fc2.weight", 0), ("blocks.0.block.6.fc2.bias", 0),
         ("blocks.0.block.7.weight", 1)], _perm(24),
    ),  # fmt: skip
    # Swin: the two heads of block 0 (q, k, v blocks of the fused qkv, proj's columns and the
    # relative position bias table's head columns)
    "swin": _swin_heads,
    # ResNet: the stem's channels, which the first (identity-shortcut) block adds to and the
    # second stage's conv and downsample read
    "resnet": lambda: _same(
        [("conv1.weight", 0), *_bn("bn1"), ("layer1.0.conv1.weight", 1),
         ("layer1.0.conv2.weight", 0), *_bn("layer1.0.bn2"), ("layer2.0.conv1.weight", 1),
         ("layer2.0.downsample.0.weight", 1)], _perm(8),
    ),  # fmt: skip
    # the hidden neurons of ConvNeXt's first MLP
    "convnext": lambda: _same(
        [("blocks.0.mlp.0.weight", 0), ("blocks.0.mlp.0.bias", 0), ("blocks.0.mlp.2.weight", 1)],
        _perm(32),
    ),
    # DenseNet: the transition conv's outputs, which read the concatenation of every layer
    "densenet": lambda: _same(
        [("trans.2.weight", 0), ("trans.2.bias", 0), ("fc.weight", 1)], _perm(8)
    ),
    "gpt2": _gpt2_heads,
    # Llama with grouped-query attention: swap the two key/value heads of layer 0 with their
    # query groups, and the two query heads within each group
    "llama_gqa": _gqa_heads,
    "llama_gqa_eager": _gqa_heads,
    # Llama: the SwiGLU hidden neurons of layer 1
    "llama": lambda: _same(
        [("model.layers.1.mlp.gate_proj.weight", 0), ("model.layers.1.mlp.up_proj.weight", 0),
         ("model.layers.1.mlp.down_proj.weight", 1)], _perm(32),
    ),  # fmt: skip
}


def _degrees(g: ParamGraph) -> tuple[list[int], list[int]]:
    n = g.num_nodes
    deg_in = torch.bincount(g.edge_index[1], minlength=n)
    deg_out = torch.bincount(g.edge_index[0], minlength=n)
    return sorted(deg_in.tolist()), sorted(deg_out.tolist())


@pytest.mark.parametrize("graph_model", ["GMN", "NGT"])
@pytest.mark.parametrize("family", list(PERMUTATIONS))
def test_permuted_hidden_units_give_an_isomorphic_graph(family: str, graph_model: str) -> None:
    """Depthwise + SE (MobileNetV3), channels-last MLP (ConvNeXt), concatenation (DenseNet),
    attention heads (GPT-2), gated MLP (Llama): permuting hidden units gives an isomorphic graph
    on which every graph metanetwork gives the same invariant output."""
    module, x, g, _ = _build(family)
    with torch.no_grad():
        ref = _logits(module(x))
        permuted = _permute(module, PERMUTATIONS[family]())
        torch.testing.assert_close(_logits(permuted(x)), ref, atol=1e-5, rtol=1e-5)
    gp = from_module(permuted, x, max_kernel_size=FAMILIES[family][2])
    assert (gp.num_nodes, gp.num_edges) == (g.num_nodes, g.num_edges)
    assert _degrees(gp) == _degrees(g)
    assert not torch.equal(gp.edge_attr, g.edge_attr)  # the weights did move
    torch.manual_seed(0)
    cls = {"GMN": GMN, "NGT": NGT}[graph_model]
    model = cls(edge_in_dim=g.edge_attr.size(1), hidden=16, num_layers=2).eval()
    model.calibrate(g)
    with torch.no_grad():
        torch.testing.assert_close(model(gp), model(g), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- several outputs
class TwoHeads(nn.Module):
    """GoogLeNet / Inception-style: a main classifier and an auxiliary head on an inner layer,
    returned together (as a dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.inner = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.aux = nn.Linear(6, 4)
        self.main = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.body(x)
        return {"logits": self.main(self.inner(h).mean((2, 3))), "aux": self.aux(h.mean((2, 3)))}


def test_a_module_with_several_outputs() -> None:
    """Every returned tensor's neurons are OUTPUT nodes, numbered in return order; the graph
    writes back exactly, and permuting the shared body's channels gives an isomorphic graph."""
    torch.manual_seed(0)
    module = _randomize(TwoHeads(), 0)
    x = _example(IMAGE)
    g = from_module(module, x)
    out = g.node_type == NodeType.OUTPUT
    assert int(out.sum()) == 9 and sorted(g.node_pos[out].tolist()) == list(range(9))
    fresh = _randomize(TwoHeads(), 5)
    with torch.no_grad():
        g.load_into(fresh)
        for key in ("logits", "aux"):
            torch.testing.assert_close(fresh(x)[key], module(x)[key])
    perm = _perm(6)
    spec = [("body.0.weight", 0, perm), ("body.0.bias", 0, perm), ("inner.0.weight", 1, perm),
            ("aux.weight", 1, perm)]  # fmt: skip
    permuted = _permute(copy.deepcopy(module), spec)
    gp = from_module(permuted, x)
    assert _degrees(gp) == _degrees(g)
    model = GMN(hidden=16, num_layers=2).eval()
    model.calibrate(g)
    with torch.no_grad():
        torch.testing.assert_close(model(gp), model(g), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- errors
def test_unsupported_ops_name_the_op_and_module_path() -> None:
    class RelPosBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)
            self.bias = nn.Parameter(torch.zeros(3, 3))

        def forward(self, x: Tensor) -> Tensor:
            return (self.q(x) @ self.k(x).transpose(-2, -1) + self.bias).softmax(-1) @ x

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = RelPosBias()

        def forward(self, x: Tensor) -> Tensor:
            return self.attn(x)

    module = Wrapper()
    with torch.no_grad():
        module.attn.bias.copy_(torch.randn(3, 3))
    g = from_module(module, torch.randn(2, 3, 4))  # one head: a per-head score bias
    assert torch.equal(g.to_state_dict()["attn.bias"], module.attn.bias)

    class SharedBias(nn.Module):
        """Two heads biased by one shared table: no per-head construction."""

        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)
            self.bias = nn.Parameter(torch.zeros(3, 3))

        def forward(self, x: Tensor) -> Tensor:
            q, k = self.q(x).view(2, 3, 2, 2).transpose(1, 2), self.k(x).view(2, 3, 2, 2)
            return (q @ k.permute(0, 2, 3, 1) + self.bias).softmax(-1)

    class Wrapper2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = SharedBias()

        def forward(self, x: Tensor) -> Tensor:
            return self.attn(x)

    with pytest.raises(UnsupportedOpError, match=r"at module path 'attn'.*one value"):
        from_module(Wrapper2(), torch.randn(2, 3, 4))


def test_build_times_are_small() -> None:
    times = {f: _build(f)[3] for f in ("mobilenet_v2", "gpt2", "llama")}
    assert all(t < 5.0 for t in times.values()), times
