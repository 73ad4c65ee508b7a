"""``metanet init-weights``: write GHN-predicted initial weights of a model as a state_dict.

    metanet init-weights --ghn RUN.ckpt --model package.module:ClassName \\
        [--kwargs '{"width": 64}' | --kwargs width=64 depth=3] -o init.safetensors [--fallback-init]
        [--keep-output]
        [--input-shape 1,3,224,224 | --input-shape 1,16 --input-vocab 50257] [--quiet]
        [--calibrate-bn 8 --data digits [--batch-size 64]]

``--ghn`` takes a Lightning checkpoint of :class:`metanet.tasks.hypernet.GHNTask` (read
tensors-only; ``--trust-pickle`` allows a full unpickle) or a file from
:meth:`metanet.hyper.ghn.GHN.save`. The model class is imported and instantiated with the
keyword arguments (JSON object, or ``key=value`` pairs whose values are parsed as JSON when they
can be, else kept as strings): that runs the user's own code, named on the command line, never
code from a file. ``--model`` may name a class or any factory function returning an
``nn.Module`` (e.g. one building a Hugging Face model from a small config). The model's forward
is recorded on ``--input-shape`` (float inputs, or token ids below ``--input-vocab``), or on an
input guessed from the model (Hugging Face config, first layer). The output is the model's
state_dict, as a safetensors file (or with ``torch.save`` when OUT ends in ``.pt``/``.pth``;
both load tensors-only), written atomically.

With ``--calibrate-bn N`` the BatchNorm running statistics (buffers, which a GHN does not
predict) are reset and recomputed on ``N`` training batches of ``--data`` (a provider name such
as ``digits``, a JSON/YAML provider mapping, or a YAML file holding one, see
:func:`metanet.data.tasks.load_task_data`), as GHN-2/3 do before evaluating predicted
parameters (:func:`metanet.hyper.calibrate.calibrate_batchnorm`); each sample is reshaped to
``--input-shape`` (without its batch axis) when one is given. A model without BatchNorm is left
as it is, and the output says so.

It prints how many tensors / parameters were predicted and how many keep the model's own
initialisation (with ``--fallback-init``, and the output layer with ``--keep-output``; each with
its reason), then (unless ``--quiet``) the
name of every predicted and kept tensor. :func:`main` returns the exit code; ``run`` returns the
:class:`~metanet.hyper.ghn.InitReport` too.
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

__all__ = ["main", "parse_input_shape", "parse_kwargs", "resolve_class", "run"]


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


def parse_input_shape(spec: str | None, vocab: int | None) -> torch.Tensor | None:
    """``"1,3,32,32"`` -> a random float input of that shape (token ids below ``vocab`` when
    given); ``None`` without a shape."""
    if spec is None:
        if vocab is not None:
            raise ValueError("--input-vocab needs --input-shape (e.g. --input-shape 1,16)")
        return None
    try:
        shape = tuple(int(d) for d in spec.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise ValueError(f"--input-shape must be integers like 1,3,32,32, got {spec!r}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"--input-shape must be positive integers like 1,3,32,32, got {spec!r}")
    gen = torch.Generator().manual_seed(0)
    if vocab is not None:
        if vocab < 1:
            raise ValueError(f"--input-vocab must be >= 1, got {vocab}")
        return torch.randint(0, vocab, shape, generator=gen)
    return torch.randn(shape, generator=gen)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``metanet init-weights``; returns the exit code (2 on bad input)."""
    return run(argv)[0]


def run(argv: Sequence[str] | None = None) -> tuple[int, Any]:
    """``metanet init-weights``: ``(exit code, InitReport or None on error)``."""
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
    ap.add_argument("--keep-output", action="store_true",
                    help="leave the output layer (classifier head) to the model's own init: "
                         "for an initialisation that will be trained (listed as kept)")  # fmt: skip
    ap.add_argument("--input-shape", default=None,
                    help="shape of the input to record the forward on, e.g. 1,3,224,224 "
                         "(default: guessed from the model)")  # fmt: skip
    ap.add_argument("--input-vocab", type=int, default=None,
                    help="make the input token ids below this vocabulary size")
    ap.add_argument("--quiet", action="store_true",
                    help="print only the predicted / kept counts, not every tensor name")
    ap.add_argument("--calibrate-bn", type=int, default=None, metavar="N",
                    help="recompute BatchNorm running statistics on N training batches of "
                         "--data after the prediction (GHN-2/3's calibration)")  # fmt: skip
    ap.add_argument("--data", default=None,
                    help="task data for --calibrate-bn: a provider name (digits), a JSON/YAML "
                         "provider mapping, or a YAML file holding one")  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=64,
                    help="samples per calibration batch (default 64)")
    ap.add_argument("--seed", type=int, default=0, help="order of the calibration samples")
    args = ap.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    from metanet.graph.arch import ArchTraceError
    from metanet.hyper.ghn import GHN, GHNVocabularyError
    from metanet.serialization import save_state_dict

    calib = None
    try:
        task = _calibration_data(args.calibrate_bn, args.data, args.batch_size)
        example = parse_input_shape(args.input_shape, args.input_vocab)
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
        with torch.no_grad():
            params = ghn.predict(model, fallback_init=args.fallback_init, example_input=example,
                                 keep_output=args.keep_output)  # fmt: skip
            named = dict(model.named_parameters())
            for name, value in params.items():
                named[name].copy_(value.to(named[name].device, named[name].dtype))
        if task is not None:
            from metanet.hyper.calibrate import calibrate_batchnorm, task_batches

            shape = tuple(example.shape[1:]) if example is not None else None
            calib = calibrate_batchnorm(model, task_batches(
                task, args.calibrate_bn, args.batch_size, seed=args.seed, input_shape=shape))
        out = save_state_dict(args.output, model.state_dict())
    except (ValueError, FileNotFoundError, GHNVocabularyError, ArchTraceError,
            RuntimeError) as exc:  # fmt: skip
        print(f"metanet init-weights: error: {exc}", file=sys.stderr)
        return 2, None
    report = params.report
    print(f"{type(model).__name__}: {report.summary()}")
    if not args.quiet:
        for name in report.predicted:
            print(f"  predicted {name} {list(named[name].shape)}")
        for line in report.lines()[1:]:
            print(line)
    if calib is not None:
        print(f"BatchNorm: {calib.summary()}")
        if not args.quiet:
            for layer in calib.layers:
                print(f"  calibrated {layer}")
    print(f"wrote {out}")
    return 0, report


def _calibration_data(num_batches: int | None, data: str | None, batch_size: int) -> Any:
    """The task data of ``--calibrate-bn`` (``None`` without the flag); checks the flags."""
    if num_batches is None:
        if data is not None:
            raise ValueError("--data is read only for --calibrate-bn N; pass both")
        return None
    if num_batches < 1:
        raise ValueError(f"--calibrate-bn must be >= 1 batches, got {num_batches}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if data is None:
        raise ValueError("--calibrate-bn needs --data (the task data to calibrate on, e.g. "
                         "--data digits)")  # fmt: skip
    import os
    from collections.abc import Mapping

    import yaml

    from metanet.data.tasks import TaskDataError, load_task_data

    try:
        if os.path.isfile(data):
            with open(data) as fh:
                config = yaml.safe_load(fh)
        else:
            config = yaml.safe_load(data)
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--data: cannot read {data!r} ({exc})") from None
    if isinstance(config, Mapping) and isinstance(config.get("data"), (Mapping, str)):
        config = config["data"]  # a recipe or training config: its data entry
    if not isinstance(config, (Mapping, str)):
        raise ValueError(f"--data must name a data provider or give its mapping, got {data!r}")
    try:
        return load_task_data(config)
    except TaskDataError as exc:
        raise ValueError(f"--data: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
