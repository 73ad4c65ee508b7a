"""``metanet init-weights``: write GHN-predicted initial weights of a model as a state_dict.

    metanet init-weights --ghn RUN.ckpt --model package.module:ClassName \\
        [--kwargs '{"width": 64}' | --kwargs width=64 depth=3] -o init.safetensors [--fallback-init]

``--ghn`` takes a Lightning checkpoint of :class:`metanet.tasks.hypernet.GHNTask` (read
tensors-only; ``--trust-pickle`` allows a full unpickle) or a file from
:meth:`metanet.hyper.ghn.GHN.save`. The model class is imported and instantiated with the
keyword arguments (JSON object, or ``key=value`` pairs whose values are parsed as JSON when they
can be, else kept as strings): that runs the user's own code, named on the command line, never
code from a file. The output is the model's state_dict, as a safetensors file (or with
``torch.save`` when OUT ends in ``.pt``/``.pth``; both load tensors-only), written atomically.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["main", "parse_kwargs", "resolve_class"]


def resolve_class(spec: str) -> type:
    """Import ``package.module:ClassName`` (``package.module.ClassName`` also accepted)."""
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
    else:
        mod_name, _, attr = spec.rpartition(".")
    if not mod_name or not attr:
        raise ValueError(f"--model must look like package.module:ClassName, got {spec!r}")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"--model {spec!r}: cannot import module {mod_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--model {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--model {spec!r} is not a class or callable")
    return obj


def parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``['{"a": 1}']`` or ``['a=1', 'b=relu']`` -> keyword arguments."""
    if not items:
        return {}
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            value = json.loads(items[0])
        except json.JSONDecodeError as exc:
            raise ValueError(f"--kwargs is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError("--kwargs JSON must be an object")
        return value
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--kwargs item {item!r} must be key=value (or one JSON object)")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``metanet init-weights``; returns the exit code (2 on bad input)."""
    ap = argparse.ArgumentParser(
        prog="metanet init-weights",
        description="Predict initial parameters of a model with a trained graph hypernetwork.",
    )
    ap.add_argument("--ghn", required=True, help="GHN checkpoint (Lightning .ckpt or GHN.save)")
    ap.add_argument("--model", required=True, help="package.module:ClassName of the model")
    ap.add_argument("--kwargs", nargs="*", default=[], help="JSON object or key=value pairs")
    ap.add_argument("-o", "--output", required=True,
                    help="where to write the state_dict (.safetensors, or .pt for torch.save)")
    ap.add_argument("--trust-pickle", action="store_true",
                    help="allow a GHN checkpoint that needs the full unpickler (runs code named "
                         "in the file: only for files you trust)")  # fmt: skip
    ap.add_argument("--fallback-init", action="store_true",
                    help="keep the model's own init for ops the GHN cannot predict (logged)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    from metanet.graph.arch import ArchTraceError
    from metanet.hyper.ghn import GHN, GHNVocabularyError
    from metanet.serialization import save_state_dict

    try:
        ghn = GHN.load(args.ghn, trust_pickle=args.trust_pickle)
        cls = resolve_class(args.model)
        kwargs = parse_kwargs(args.kwargs)
        try:
            model = cls(**kwargs)
        except TypeError as exc:
            raise ValueError(f"cannot build {args.model} with {kwargs}: {exc}") from exc
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"{args.model} did not return an nn.Module")
        ghn.eval()
        ghn.apply(model, fallback_init=args.fallback_init)
        out = save_state_dict(args.output, model.state_dict())
    except (ValueError, FileNotFoundError, GHNVocabularyError, ArchTraceError) as exc:
        print(f"metanet init-weights: error: {exc}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n} predicted/initialised parameters of {type(model).__name__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
