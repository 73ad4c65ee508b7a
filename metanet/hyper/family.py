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
    held_out:                   # fixed arch dicts (metanet.zoo.architectures), never sampled
      - {type: mlp, widths: [128, 128, 128, 128]}

Samples are arch dicts for :func:`metanet.zoo.architectures.build_module`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from metanet.zoo.architectures import ArchError, normalize_arch

__all__ = ["ArchFamily", "FamilyError"]

_SAMPLER_KEYS = {"type", "depth", "width"}


class FamilyError(ValueError):
    """A family recipe with a missing/unknown key or impossible value (names key and file)."""


class ArchFamily:
    """Samplers of arch dicts (``train``) plus fixed held-out archs (``held_out``)."""

    def __init__(self, train: list[Mapping[str, Any]], held_out: list[Mapping[str, Any]] = (),
                 name: str = "family", seed: int = 0, source: str = "<dict>") -> None:  # fmt: skip
        self.name, self.seed, self.source = name, int(seed), source
        if not train:
            raise FamilyError(f"{source}: 'train' must list at least one sampler")
        self.train = [self._check_sampler(dict(s), i) for i, s in enumerate(train)]
        self.held_out = []
        for i, a in enumerate(held_out):
            try:
                self.held_out.append(normalize_arch(a))
            except ArchError as exc:
                raise FamilyError(f"{source}: held_out[{i}]: {exc}") from exc

    def _check_sampler(self, s: dict[str, Any], i: int) -> dict[str, Any]:
        where = f"{self.source}: train[{i}]"
        if s.get("type") not in ("mlp", "cnn"):
            raise FamilyError(f"{where}: 'type' must be mlp or cnn (got {s.get('type')!r})")
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
        # every combination must be a valid arch: check the extremes of each choice
        probe = random.Random(0)
        for _ in range(8):
            try:
                self._draw(out, probe)
            except ArchError as exc:
                raise FamilyError(f"{where}: {exc}") from exc
        return out

    @staticmethod
    def _draw(s: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
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
            if depth == 1 and arch.get("in_channels", 1) != width:
                arch["residual"] = False  # no conv keeps its input shape: nothing to skip
        return normalize_arch(arch)

    def sample(self, rng: random.Random) -> dict[str, Any]:
        """One arch dict: a sampler chosen uniformly, then each of its choices."""
        return self._draw(rng.choice(self.train), rng)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ArchFamily:
        """Read a family recipe.

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
                   source=str(path))  # fmt: skip
