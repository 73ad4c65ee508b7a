"""Architecture families for GHN training: a YAML recipe of MLPs/CNNs to sample from.

A family recipe (``datasets/ghn-digits-family.yaml``)::

    name: ghn-digits-family
    seed: 0
    train:                      # one entry per sampler; each sample picks an entry uniformly
      - type: mlp
        depth: [1, 3]           # hidden layers: integer range, inclusive
        width: [16, 24, 32]     # one width per network, chosen from the list
        activation: [relu, tanh]  # any other arch key: a list to choose from
      - type: cnn
        depth: [1, 3]
        width: [8, 16]
        kernel: [3, 5]
        residual: [false, true]
        norm: [null, batch, group]
      - class_path: mypackage.models:Net     # a user's model family: a factory class and
        init_args: {width: {choice: [16, 32]}, depth: 2}   # init_args, {choice: [...]} sampled
    held_out:                   # fixed arch dicts (metanet.zoo.architectures), never sampled
      - {type: mlp, widths: [128, 128, 128, 128]}

Samples are arch dicts for :func:`metanet.zoo.architectures.build_module`. Given the task data
the networks will run on (``task``), the sizes that follow from it (inputs, classes) are filled
in from the data (:func:`metanet.zoo.data.fill_arch_from_data`); without it, built-in archs get
the digits sizes and user modules need ``input_shape``.

:class:`PatchTransformer` is a small ViT-like classifier (patch embedding, position embedding,
pre-LayerNorm attention + MLP blocks, mean pool, linear head) that family recipes name as
``class_path: metanet.hyper.family:PatchTransformer`` to put transformers into a GHN's
training family (``configs/ghn/digits-transformer-family.yaml``).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from metanet.zoo.architectures import (
    ArchError,
    module_of,
    normalize_arch,
    resolve_module_class,
    trust_code,
)

__all__ = ["ArchFamily", "FamilyError", "PatchTransformer"]

_SAMPLER_KEYS = {"type", "depth", "width"}
_MODULE_KEYS = {"type", "class_path", "init_args", "input_shape"}


class FamilyError(ValueError):
    """A family recipe with a missing/unknown key or impossible value (names key and file)."""


class ArchFamily:
    """Samplers of arch dicts (``train``) plus fixed held-out archs (``held_out``)."""

    def __init__(self, train: list[Mapping[str, Any]], held_out: list[Mapping[str, Any]] = (),
                 name: str = "family", seed: int = 0, source: str = "<dict>",
                 task: Any = None) -> None:  # fmt: skip
        self.name, self.seed, self.source, self.task = name, int(seed), source, task
        if not train:
            raise FamilyError(f"{source}: 'train' must list at least one sampler")
        self.train = [self._check_sampler(dict(s), i) for i, s in enumerate(train)]
        self.held_out = [self._finish(dict(a), f"held_out[{i}]") for i, a in enumerate(held_out)]

    def _finish(self, arch: dict[str, Any], where: str) -> dict[str, Any]:
        """A drawn or listed arch, sized from the task data when there is one, normalized."""
        if isinstance(arch.get("class_path"), str) and arch["class_path"]:
            trust_code(module_of(arch["class_path"]) or arch["class_path"])  # the user's recipe
        try:
            if self.task is None:
                return normalize_arch(arch)
            from metanet.zoo.data import fill_arch_from_data

            def fail(key: str, why: str) -> FamilyError:
                return FamilyError(f"{self.source}: {key}: {why}")

            return fill_arch_from_data(arch, self.task, "classifier", fail, where)
        except ArchError as exc:
            raise FamilyError(f"{self.source}: {where}: {exc}") from None

    def _check_sampler(self, s: dict[str, Any], i: int) -> dict[str, Any]:
        where = f"{self.source}: train[{i}]"
        if "class_path" in s:
            return self._check_module_sampler(s, i)
        if s.get("type") not in ("mlp", "cnn"):
            raise FamilyError(f"{where}: 'type' must be mlp or cnn, or give a class_path "
                              f"(got {s.get('type')!r})")  # fmt: skip
        depth = s.get("depth", [1, 2])
        if (not isinstance(depth, list) or len(depth) != 2 or not all(isinstance(d, int)
                                                                      for d in depth)
                or not 1 <= depth[0] <= depth[1]):  # fmt: skip
            raise FamilyError(f"{where}: 'depth' must be [min, max] with 1 <= min <= max "
                              f"(got {depth!r})")  # fmt: skip
        width = s.get("width", [32])
        if not isinstance(width, list) or not width or not all(
            isinstance(w, int) and w > 0 for w in width
        ):
            raise FamilyError(f"{where}: 'width' must be a list of positive ints (got {width!r})")
        for key, value in s.items():
            if key not in _SAMPLER_KEYS and not isinstance(value, list):
                raise FamilyError(f"{where}: '{key}' must be a list of choices (got {value!r})")
        out = dict(s, depth=depth, width=width)
        self._probe(out, i)
        return out

    def _check_module_sampler(self, s: dict[str, Any], i: int) -> dict[str, Any]:
        where = f"{self.source}: train[{i}]"
        unknown = sorted(set(s) - _MODULE_KEYS)
        if unknown:
            raise FamilyError(f"{where}: unknown key(s) {unknown} for a class_path sampler; "
                              f"allowed: {sorted(_MODULE_KEYS)}")  # fmt: skip
        args = s.get("init_args") or {}
        if not isinstance(args, Mapping):
            raise FamilyError(f"{where}: 'init_args' must be a mapping (got {args!r})")
        for key, value in args.items():
            if isinstance(value, Mapping) and set(value) == {"choice"} and not (
                isinstance(value["choice"], list) and value["choice"]
            ):
                raise FamilyError(f"{where}: init_args.{key}: 'choice' needs a non-empty list")
        out = {**s, "type": "module", "init_args": dict(args)}
        self._probe(out, i)
        arch = self._draw(out, random.Random(0), f"train[{i}]")
        try:  # the class imports, builds and (given the data) maps inputs to one logit per class
            if self.task is None:
                resolve_module_class(arch["class_path"])
            else:
                from metanet.zoo.data import check_module_output

                def fail(key: str, why: str) -> FamilyError:
                    return FamilyError(f"{self.source}: {key}: {why}")

                check_module_output(arch, self.task, fail, f"train[{i}]")
        except ArchError as exc:
            raise FamilyError(f"{where}: {exc}") from None
        return out

    def _probe(self, sampler: dict[str, Any], i: int) -> None:
        """Every combination must be a valid arch: draw a few and check each."""
        probe = random.Random(0)
        for _ in range(8):
            self._draw(sampler, probe, f"train[{i}]")

    def _draw(self, s: Mapping[str, Any], rng: random.Random, where: str) -> dict[str, Any]:
        if s["type"] == "module":
            args = {k: rng.choice(v["choice"]) if isinstance(v, Mapping) and set(v) == {"choice"}
                    else v for k, v in s["init_args"].items()}  # fmt: skip
            return self._finish({**s, "init_args": args}, where)
        depth = rng.randint(s["depth"][0], s["depth"][1])
        width = rng.choice(s["width"])
        arch: dict[str, Any] = {"type": s["type"]}
        for key, choices in s.items():
            if key not in _SAMPLER_KEYS:
                arch[key] = rng.choice(choices)
        if s["type"] == "mlp":
            arch["widths"] = [width] * depth
        else:
            arch["channels"] = [width] * depth
            channels_in = (self.task.input_shape[0] if self.task is not None
                           else arch.get("in_channels", 1))  # fmt: skip
            if depth == 1 and channels_in != width:
                arch["residual"] = False  # no conv keeps its input shape: nothing to skip
        return self._finish(arch, where)

    def sample(self, rng: random.Random) -> dict[str, Any]:
        """One arch dict: a sampler chosen uniformly, then each of its choices."""
        i = rng.randrange(len(self.train))
        return self._draw(self.train[i], rng, f"train[{i}]")

    @classmethod
    def from_yaml(cls, path: str | Path, task: Any = None) -> ArchFamily:
        """Read a family recipe; ``task`` (:class:`metanet.data.tasks.TaskData`) sizes its
        archs from the data the networks will run on.

        Raises:
            FileNotFoundError: no such file. FamilyError: bad keys/values (names key and file).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"architecture family recipe not found: {path}")
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise FamilyError(f"{path}: a family recipe must be a mapping")
        unknown = sorted(set(data) - {"name", "seed", "train", "held_out"})
        if unknown:
            raise FamilyError(f"{path}: unknown key(s) {unknown}; allowed: name, seed, train, "
                              "held_out")  # fmt: skip
        return cls(data.get("train") or [], data.get("held_out") or [],
                   name=str(data.get("name", path.stem)), seed=int(data.get("seed", 0)),
                   source=str(path), task=task)  # fmt: skip


class PatchTransformer(nn.Module):
    """A small ViT-like classifier of ``[N, C, H, W]`` images (attention + LayerNorm).

    ``H x W`` images are cut into ``patch x patch`` patches (tokens), each embedded by a linear
    layer, plus a learned position embedding; ``depth`` pre-LayerNorm blocks
    ``x + attn(ln(x))``, ``x + mlp(ln(x))`` (``mlp``: Linear ``dim -> mlp_ratio * dim``, GELU,
    Linear back); a final LayerNorm, the mean over tokens and a linear head.

    Args:
        dim: token width. depth: blocks. heads: attention heads (``dim % heads == 0``).
        mlp_ratio: hidden width of the MLP over ``dim``. patch: patch side (divides H and W).
        in_channels, image_size: input images ``[in_channels, image_size, image_size]``.
        classes: outputs.
        attention: ``"mha"`` (``nn.MultiheadAttention``, fused ``in_proj_weight``) or ``"qkv"``
            (separate query/key/value linears and ``scaled_dot_product_attention``, the layout of
            Hugging Face's ViT/BERT/Llama).
    """

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4, mlp_ratio: int = 2,
                 patch: int = 2, in_channels: int = 1, image_size: int = 8, classes: int = 10,
                 attention: str = "mha") -> None:  # fmt: skip
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        if image_size % patch:
            raise ValueError(f"patch ({patch}) must divide image_size ({image_size})")
        if attention not in ("mha", "qkv"):
            raise ValueError(f"attention must be 'mha' or 'qkv', got {attention!r}")
        self.patch, self.heads, self.attention = int(patch), int(heads), attention
        tokens = (image_size // patch) ** 2
        self.embed = nn.Linear(in_channels * patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(
            [_Block(dim, heads, mlp_ratio, attention) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        x = self.embed(x.reshape(n, (h // p) * (w // p), c * p * p)) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


class _Block(nn.Module):
    """Pre-LayerNorm transformer block of :class:`PatchTransformer`."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, attention: str) -> None:
        super().__init__()
        self.heads, self.kind = heads, attention
        self.ln1 = nn.LayerNorm(dim)
        if attention == "mha":
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        if self.kind == "mha":
            a = self.attn(h, h, h, need_weights=False)[0]
        else:
            n, t, d = h.shape
            q, k, v = (f(h).reshape(n, t, self.heads, d // self.heads).transpose(1, 2)
                       for f in (self.q, self.k, self.v))  # fmt: skip
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            a = self.proj(a.transpose(1, 2).reshape(n, t, d))
        x = x + a
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))
