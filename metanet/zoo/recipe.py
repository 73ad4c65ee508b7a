"""Zoo recipes: YAML files that say which networks a zoo holds and how each one is trained.

A recipe (see ``datasets/*.yaml``)::

    name: digits-cnn            # zoo name; default output .cache/zoos/<name>.h5
    kind: classifier            # classifier (digits) | siren (one INR per digit image)
    seed: 0                     # every network's seed derives from (seed, run_id)
    data: {split_seed: 0, test_fraction: 0.25}      # + train_images/test_images for siren
    architectures:              # arch dicts (metanet.zoo.architectures), one HDF5 group each
      - {type: cnn, channels: [8, 16], kernel: 3}
    networks_per_arch: 300      # classifier zoos (siren: one network per image)
    chunk_size: 64              # networks trained together in one torch.func.vmap batch
    keep_fractions: [0.25, 0.5, 1.0]   # checkpoints kept at round(f * epochs) of each network
    hparams:                    # per-network samplers: a constant, {uniform: [a, b]},
      lr: {log_uniform: [1.0e-3, 0.3]}   # {log_uniform: [a, b]}, {int_uniform: [a, b]},
      optimizer: {choice: [sgd, adam]}   # {choice: [...]}
    tasks: {0-4: [0, 1, 2, 3, 4], 5-9: [5, 6, 7, 8, 9]}   # optional: each network learns one
                                # class subset (its train subset and its val/test metrics use
                                # only those classes; hparam ``task``), for conditional generators
    shared_init: 1              # optional: networks of an architecture start from this many
                                # shared initializations (network j uses init j % shared_init);
                                # default: every network its own (seeded by its run)

SIREN zoos fit one INR per image (or 1-D signal) of any provider, sized from the data (2-D
coordinates -> C channels). The DWS/NFN INR protocol is ``architectures: [{type: siren,
widths: [32, 32], w0: 30}]`` with ``hparams: {lr: 5.0e-4, epochs: 1000, psnr_target: 40}``:
full-batch Adam, up to 1000 steps, each INR stopping once its training PSNR reaches the target
(records get a ``steps`` column: the updates it made).

INR zoos for classification by weights may use ``shared_init`` (as some MNIST-INR zoos of
DWS/NFN/NG): INRs fitted from one shared initialization stay in one basin, so their weights are
comparable; independent inits (the default) are what invariant models are for.

Unknown keys and impossible values raise :class:`RecipeError` naming the key and the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from metanet.data.tasks import TaskDataError
from metanet.zoo.architectures import module_of, trust_code
from metanet.zoo.data import (
    check_module_output,
    expand_module_choices,
    fill_arch_from_data,
    normalize_data,
    recipe_task,
)

KINDS = ("classifier", "siren")
OPTIMIZERS = ("sgd", "adam")
INIT_SCHEMES = (
    "default", "kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal",
    "orthogonal", "normal",
)  # fmt: skip

# hparam -> (default, validator(value) -> error message or None)
_NUM = (int, float)


def _yaml_problem(err: Exception) -> str:
    """PyYAML's error in one line: the problem and where (``line 2, column 7``)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{problem}{where}"


def _positive(v: Any) -> str | None:
    ok = isinstance(v, _NUM) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    return None if ok else "must be a positive number"


def _nonneg(v: Any) -> str | None:
    ok = isinstance(v, _NUM) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
    return None if ok else "must be a number >= 0"


def _unit_open(v: Any) -> str | None:  # [0, 1)
    ok = isinstance(v, _NUM) and not isinstance(v, bool) and 0 <= v < 1
    return None if ok else "must be in [0, 1)"


def _unit_closed(v: Any) -> str | None:  # [0, 1]
    ok = isinstance(v, _NUM) and not isinstance(v, bool) and 0 <= v <= 1
    return None if ok else "must be in [0, 1]"


def _fraction(v: Any) -> str | None:  # (0, 1]
    ok = isinstance(v, _NUM) and not isinstance(v, bool) and 0 < v <= 1
    return None if ok else "must be in (0, 1]"


def _pos_int(v: Any) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and v > 0
    return None if ok else "must be a positive integer"


def _one_of(options: tuple[str, ...]):
    def check(v: Any) -> str | None:
        return None if v in options else f"must be one of {list(options)}"

    return check


HPARAMS: dict[str, dict[str, tuple[Any, Any]]] = {
    "classifier": {
        "lr": (0.01, _positive),
        "weight_decay": (0.0, _nonneg),
        "momentum": (0.9, _unit_open),
        "dropout": (0.0, _unit_open),
        "init": ("default", _one_of(INIT_SCHEMES)),
        "init_scale": (1.0, _positive),
        "optimizer": ("adam", _one_of(OPTIMIZERS)),
        "train_fraction": (1.0, _fraction),
        "label_noise": (0.0, _unit_closed),
        "batch_size": (32, _pos_int),
        "epochs": (10, _pos_int),
    },
    "siren": {
        "lr": (1e-3, _positive),
        "weight_decay": (0.0, _nonneg),
        "momentum": (0.9, _unit_open),
        "optimizer": ("adam", _one_of(OPTIMIZERS)),
        "epochs": (300, _pos_int),
        # optional: a network stops updating once its training PSNR reaches this (dB)
        "psnr_target": (None, _positive),
    },
}
_TOP_KEYS = {
    "name", "kind", "seed", "data", "architectures", "networks_per_arch", "chunk_size",
    "keep_fractions", "hparams", "description", "shared_init", "tasks",
}  # fmt: skip
_SAMPLERS = ("uniform", "log_uniform", "int_uniform", "choice")


class RecipeError(ValueError):
    """A recipe with an unknown key or an impossible value; the message names key and file."""


@dataclass(frozen=True)
class NetworkPlan:
    """One network of a zoo: its run id, architecture, seed and sampled hyperparameters."""

    run_id: int
    arch_index: int
    seed: int
    hparams: dict[str, Any]
    image_index: int = -1  # siren zoos: index of the image in its split
    split: int = -1  # siren zoos: 0 = digits train split, 1 = test split
    init_seed: int = -1  # seed of the initial weights (-1: ``seed``; set by ``shared_init``)

    @property
    def weight_seed(self) -> int:
        """The seed of this network's initial weights."""
        return self.init_seed if self.init_seed >= 0 else self.seed


@dataclass
class Recipe:
    """A validated recipe (see the module docstring for the YAML keys)."""

    name: str
    kind: str
    seed: int
    data: dict[str, Any]
    architectures: list[dict[str, Any]]
    hparams: dict[str, Any]
    networks_per_arch: int = 0
    chunk_size: int = 64
    keep_fractions: list[float] = field(default_factory=lambda: [1.0])
    description: str = ""
    shared_init: int | None = None
    tasks: dict[str, list[int]] | None = None
    source: str = "<dict>"

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        """Read and validate a YAML recipe file."""
        import yaml

        path = os.fspath(path)
        try:
            with open(path) as fh:
                raw = yaml.safe_load(fh)
        except FileNotFoundError:
            raise FileNotFoundError(f"recipe file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<dict>") -> Recipe:
        """Validate a recipe given as a mapping; ``source`` names it in error messages."""

        def fail(key: str, why: str) -> RecipeError:
            return RecipeError(f"{source}: recipe key '{key}': {why}")

        if not isinstance(raw, Mapping):
            raise RecipeError(f"{source}: a recipe must be a YAML mapping")
        unknown = sorted(set(raw) - _TOP_KEYS)
        if unknown:
            raise fail(unknown[0], f"unknown key (allowed: {sorted(_TOP_KEYS)})")
        for key in ("name", "architectures"):
            if key not in raw:
                raise fail(key, "missing")
        name = raw["name"]
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise fail("name", f"must be a plain non-empty string (got {name!r})")
        kind = raw.get("kind", "classifier")
        if kind not in KINDS:
            raise fail("kind", f"must be one of {list(KINDS)} (got {kind!r})")
        seed = raw.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise fail("seed", f"must be an integer >= 0 (got {seed!r})")

        data = normalize_data(raw.get("data"), kind, fail)
        try:
            task = recipe_task(data)
        except TaskDataError as err:
            raise fail("data", str(err)) from None
        if kind == "classifier" and (task.target_kind != "classes" or not task.num_classes):
            raise fail("data", f"a classifier zoo needs class labels; {task.name} has "
                       f"{task.target_kind} targets")  # fmt: skip

        archs_raw = raw["architectures"]
        if not isinstance(archs_raw, list) or not archs_raw:
            raise fail("architectures", "must be a non-empty list of arch mappings")
        archs = []
        for i, arch in enumerate(archs_raw):
            where = f"architectures[{i}]"
            if not isinstance(arch, Mapping):
                raise fail(where, f"an arch must be a mapping, got {type(arch).__name__}")
            if isinstance(arch.get("class_path"), str) and arch["class_path"]:
                trust_code(module_of(arch["class_path"]) or arch["class_path"])  # the user's code
            for expanded in expand_module_choices(arch, fail, where):
                a = fill_arch_from_data(expanded, task, kind, fail, where)
                if (kind == "siren") != (a["type"] == "siren"):
                    why = f"a '{kind}' recipe cannot train '{a['type']}' networks"
                    raise fail(f"{where}.type", why)
                if a["type"] == "module":
                    check_module_output(a, task, fail, where)
                archs.append(a)
        if len({json.dumps(a, sort_keys=True) for a in archs}) != len(archs):
            raise fail("architectures", "lists the same architecture twice")

        npa = raw.get("networks_per_arch", 0 if kind == "siren" else None)
        if kind == "classifier":
            if npa is None:
                raise fail("networks_per_arch", "missing")
            if not isinstance(npa, int) or isinstance(npa, bool) or npa <= 0:
                raise fail("networks_per_arch", f"must be a positive integer (got {npa!r})")
        elif "networks_per_arch" in raw:
            raise fail("networks_per_arch", "siren zoos fit one network per image (use data.*)")
        chunk = raw.get("chunk_size", 64)
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0:
            raise fail("chunk_size", f"must be a positive integer (got {chunk!r})")
        keep = raw.get("keep_fractions", [1.0])
        if (
            not isinstance(keep, list)
            or not keep
            or not all(isinstance(f, _NUM) and 0 < f <= 1 for f in keep)
        ):
            raise fail("keep_fractions", f"needs numbers in (0, 1] (got {keep!r})")
        keep = sorted({float(f) for f in keep})
        tasks = _validate_tasks(raw.get("tasks"), kind, task, fail)
        shared = raw.get("shared_init")
        if shared is not None and (
            not isinstance(shared, int) or isinstance(shared, bool) or shared <= 0
        ):
            raise fail("shared_init", f"must be a positive integer or null (got {shared!r})")

        hp_raw = raw.get("hparams") or {}
        if not isinstance(hp_raw, Mapping):
            raise fail("hparams", "must be a mapping")
        allowed = HPARAMS[kind]
        bad = sorted(set(hp_raw) - set(allowed))
        if bad:
            raise fail(f"hparams.{bad[0]}", f"unknown hyperparameter (allowed: {sorted(allowed)})")
        hparams = {}
        for key, (default, check) in allowed.items():
            if default is None and key not in hp_raw:  # optional and not asked for
                continue
            spec = hp_raw.get(key, default)
            hparams[key] = _validate_sampler(
                spec, check, lambda why, k=key: fail(f"hparams.{k}", why)
            )
        if kind == "classifier" and _may_be_nonzero(hparams["dropout"]):
            archs = [{**a, "dropout": True} for a in archs]
        return cls(
            name=name,
            kind=kind,
            seed=seed,
            data=data,
            architectures=archs,
            hparams=hparams,
            networks_per_arch=int(npa or 0),
            chunk_size=chunk,
            keep_fractions=keep,
            description=str(raw.get("description", "")),
            shared_init=shared,
            tasks=tasks,
            source=source,
        )

    # -- derived -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The normalized recipe as plain data (stored in the zoo file)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "seed": self.seed,
            "data": self.data,
            "architectures": self.architectures,
            "networks_per_arch": self.networks_per_arch,
            "chunk_size": self.chunk_size,
            "keep_fractions": self.keep_fractions,
            "hparams": self.hparams,
            "description": self.description,
            # only when set, so fingerprints of recipes without it stay as they were
            **({"shared_init": self.shared_init} if self.shared_init is not None else {}),
            **({"tasks": self.tasks} if self.tasks is not None else {}),
        }

    def fingerprint(self, limit: int | None = None, engines: list[str] | None = None) -> str:
        """Hash of everything that determines the zoo's content: the recipe (with its data's
        fingerprint for providers other than the bundled digits), ``limit`` and, when given, the
        training engine of each architecture (:func:`metanet.zoo.train.resolve_engine`)."""
        content: dict[str, Any] = {"recipe": self.to_dict(), "limit": limit, "v": 1}
        if engines is not None:
            content["engines"] = list(engines)
        blob = json.dumps(content, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def num_networks(self) -> int:
        if self.kind == "siren":
            return len(self.architectures) * (self.data["train_images"] + self.data["test_images"])
        return len(self.architectures) * self.networks_per_arch

    def plan(self, limit: int | None = None) -> list[NetworkPlan]:
        """Every network of the zoo (the first ``limit`` run ids if given), with sampled
        hyperparameters. Run ids interleave architectures, so a limit keeps all of them."""
        archs = len(self.architectures)
        total = self.num_networks if limit is None else min(limit, self.num_networks)
        images = []
        if self.kind == "siren":
            images = [(0, i) for i in range(self.data["train_images"])] + [
                (1, i) for i in range(self.data["test_images"])
            ]
        plans = []
        for run_id in range(total):
            j, a = divmod(run_id, archs)
            seed = int(np.random.SeedSequence([self.seed, run_id]).generate_state(1)[0] >> 1)
            rng = np.random.default_rng(seed)
            hp = {k: _sample(spec, rng) for k, spec in self.hparams.items()}
            if self.tasks is not None:  # networks of an architecture cycle through the tasks
                hp["task"] = list(self.tasks)[j % len(self.tasks)]
            split, image = images[j] if images else (-1, -1)
            init_seed = -1
            if self.shared_init is not None:
                init_seed = int(
                    np.random.SeedSequence(
                        [self.seed, 104729, a, j % self.shared_init]
                    ).generate_state(1)[0]
                    >> 1
                )
            plans.append(NetworkPlan(run_id, a, seed, hp, image_index=image, split=split,
                                     init_seed=init_seed))  # fmt: skip
        return plans


def _validate_tasks(raw: Any, kind: str, task: Any, fail) -> dict[str, list[int]] | None:
    """``tasks: {name: [class, ...]}``: each network learns one class subset of the data."""
    if raw is None:
        return None
    if kind != "classifier":
        raise fail("tasks", "only classifier zoos have class-subset tasks")
    if not isinstance(raw, Mapping) or not raw:
        raise fail("tasks", "must map task names to lists of classes")
    out = {}
    for name, classes in raw.items():
        ok = isinstance(classes, list) and classes and all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c < task.num_classes
            for c in classes
        )
        if not ok:
            raise fail(f"tasks.{name}", f"must be a non-empty list of classes in "
                       f"[0, {task.num_classes}) (got {classes!r})")  # fmt: skip
        out[str(name)] = sorted(set(classes))
    return out


def _may_be_nonzero(spec: Any) -> bool:
    if isinstance(spec, Mapping):
        ((kind, args),) = spec.items()
        return any(float(v) != 0 for v in args)
    return float(spec) != 0


def _validate_sampler(spec: Any, check, fail) -> Any:
    """Check a constant or a sampler mapping; every value it can produce must pass ``check``."""
    if not isinstance(spec, Mapping):
        why = check(spec)
        if why:
            raise fail(f"{why} (got {spec!r})")
        return spec
    if len(spec) != 1 or next(iter(spec)) not in _SAMPLERS:
        raise fail(f"a sampler is one of {{{', '.join(_SAMPLERS)}: ...}} (got {dict(spec)!r})")
    ((kind, args),) = spec.items()
    if not isinstance(args, list) or not args:
        raise fail(f"'{kind}' needs a non-empty list (got {args!r})")
    if kind == "choice":
        for v in args:
            why = check(v)
            if why:
                raise fail(f"choice {v!r} {why}")
        return {"choice": list(args)}
    if len(args) != 2:
        raise fail(f"'{kind}' needs [low, high] (got {args!r})")
    low, high = args
    for v in (low, high):
        if kind == "int_uniform" and (not isinstance(v, int) or isinstance(v, bool)):
            raise fail(f"'int_uniform' bounds must be integers (got {args!r})")
        why = check(v)
        if why:
            raise fail(f"bound {v!r} {why}")
    if not low <= high:
        raise fail(f"'{kind}' needs low <= high (got {args!r})")
    if kind == "log_uniform" and low <= 0:
        raise fail(f"'log_uniform' needs positive bounds (got {args!r})")
    if kind == "uniform" and isinstance(low, int) and isinstance(high, int):
        low, high = float(low), float(high)
    return {kind: [low, high]}


def _sample(spec: Any, rng: np.random.Generator) -> Any:
    if not isinstance(spec, Mapping):
        return spec
    ((kind, args),) = spec.items()
    if kind == "choice":
        return args[int(rng.integers(len(args)))]
    low, high = args
    if kind == "uniform":
        return float(rng.uniform(low, high))
    if kind == "log_uniform":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return int(rng.integers(low, high + 1))
