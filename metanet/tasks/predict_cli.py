"""``metanet predict-accuracy``: rank ordinary checkpoints by predicted test accuracy.

::

    metanet predict-accuracy --predictor runs/nfn_np/.../last.ckpt model_a.pt model_b.pt ...

``--predictor`` is a checkpoint of :class:`~metanet.tasks.generalization.GeneralizationTask`
(written by ``metanet fit --config configs/predict_gen/<model>.yaml``). Each network file may be

* a ``state_dict`` (``torch.save(model.state_dict(), path)`` or a ``.safetensors`` file),
* a Lightning checkpoint of a classifier (its ``state_dict``; a common key prefix such as
  ``model.`` is stripped),
* a pickled module (``torch.save(model, path)``) only with ``--trust-pickle``: unpickling it runs
  code named in the file, so metanet refuses it unless told the file is trusted.

Every file is read tensors-only (:func:`metanet.serialization.load_file`); the predictor may be the
Lightning ``.ckpt`` or its pickle-free ``.safetensors`` copy written beside it by
:class:`metanet.tasks.checkpoint.ModelCheckpoint`.

Weight-space predictors (StatNN, DWS, NFN, UNF) read networks of the architecture they were trained
on (same layer shapes; layer names may differ); graph predictors (GMN, NG-T) read any architecture
metanet can trace — a bare state_dict then needs ``--arch`` (an arch dict as JSON/YAML) unless it
matches one of the predictor's training architectures. Output: one line per network, best first
(predicted accuracies are clipped to [0, 1]).
User errors (missing file, wrong kind of checkpoint, an architecture that does not fit, an
unsupported layer, NaN weights) print ``error: ...`` to stderr and return exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metanet.metrics import kendall_tau
from metanet.tasks._common import PAYLOAD_KEY, TaskConfigError, apply_weight_normalization


class PredictError(Exception):
    """A user error: printed as ``error: <message>`` with exit code 2."""


@dataclass
class Network:
    """One input network: the file, its parameters, and its module when one is known."""

    path: str
    state_dict: dict[str, torch.Tensor]
    module: nn.Module | None


# ------------------------------------------------------------------------------------------------
# loading files
# ------------------------------------------------------------------------------------------------
def _load(path: str, trust_pickle: bool) -> Any:
    """The contents of ``path``, read tensors-only unless ``trust_pickle``."""
    from metanet.serialization import FileError, load_file

    try:
        return load_file(path, trust_pickle=trust_pickle)
    except FileError as err:
        raise PredictError(str(err)) from None


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def load_predictor(path: str, trust_pickle: bool = False) -> Any:
    """The :class:`GeneralizationTask` stored in a predictor checkpoint (a ``metanet fit`` .ckpt
    or its ``.safetensors`` copy), in eval mode. ``trust_pickle`` allows a full unpickle.

    Raises:
        PredictError: not a metanet checkpoint, a checkpoint of another task, or a metanetwork
            that cannot be rebuilt.
    """
    from metanet.tasks.generalization import GeneralizationTask
    from metanet.weightspace import WeightSpaceSpec

    ckpt = _load(path, trust_pickle)
    if not isinstance(ckpt, Mapping):
        raise PredictError(
            f"{path} is not a predictor checkpoint (it holds a {type(ckpt).__name__}); pass the "
            ".ckpt written by `metanet fit --config configs/predict_gen/<model>.yaml`"
        )
    payload = ckpt.get(PAYLOAD_KEY)
    if not isinstance(payload, Mapping):
        what = "a Lightning checkpoint" if "state_dict" in ckpt else "a state_dict or other file"
        raise PredictError(
            f"{path} is {what} without metanet's predictor metadata; pass the .ckpt written by "
            "`metanet fit --config configs/predict_gen/<model>.yaml`"
        )
    task = payload.get("task")
    if task != GeneralizationTask.task_name:
        raise PredictError(
            f"{path} is a checkpoint of the '{task}' task, not an accuracy predictor; pass a "
            "checkpoint trained with metanet.tasks.GeneralizationTask"
        )
    if not payload.get("model"):
        raise PredictError(
            f"{path} does not record how to rebuild its metanetwork (it was trained with a model "
            "given as an object); train it through `metanet fit` or pass the model as a class or "
            "functools.partial"
        )
    try:
        hparams = dict(ckpt.get("hyper_parameters") or {})
        kwargs = {k: hparams[k] for k in ("loss", "target") if k in hparams}
        model = GeneralizationTask(model=payload["model"], plot=False, **kwargs)
        spec = WeightSpaceSpec.from_dict(payload["spec"]) if payload.get("spec") else None
        model.build(spec, payload.get("graph_kwargs") or {}, payload.get("archs") or [])
        model.weight_normalization = payload.get("weight_normalization")
        missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    except (TaskConfigError, ValueError, TypeError, KeyError) as err:
        raise PredictError(f"{path}: cannot rebuild the predictor ({_short(err)})") from None
    if missing or unexpected:
        raise PredictError(
            f"{path}: the stored weights do not fit the rebuilt metanetwork "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.payload_loaded = dict(payload)
    return model.eval()


def load_network(path: str, trust_pickle: bool = False) -> Network:
    """Read a network file (state_dict, Lightning checkpoint, or with ``trust_pickle`` a pickled
    module)."""
    obj = _load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return Network(path, _tensors(obj.state_dict(), path), obj)
    if isinstance(obj, Mapping):
        if PAYLOAD_KEY in obj:
            raise PredictError(
                f"{path} is a metanet task checkpoint (a metanetwork), not a network to score"
            )
        if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            sd = _tensors(obj["state_dict"], path)
            return Network(path, _strip_common_prefix(sd), None)
        for key in ("model_state_dict", "model"):
            if isinstance(obj.get(key), nn.Module):
                return Network(path, _tensors(obj[key].state_dict(), path), obj[key])
            if isinstance(obj.get(key), Mapping):
                return Network(path, _tensors(obj[key], path), None)
        return Network(path, _tensors(obj, path), None)
    raise PredictError(
        f"{path} holds a {type(obj).__name__}; expected a state_dict, a pickled nn.Module or a "
        "Lightning checkpoint"
    )


def _tensors(sd: Mapping[str, Any], path: str) -> dict[str, torch.Tensor]:
    from metanet.serialization import FileError, check_state_dict

    try:
        check_state_dict(sd, path)
    except FileError as err:
        raise PredictError(str(err)) from None
    return OrderedDict((str(k), v.detach().cpu()) for k, v in sd.items())


def _strip_common_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a module-path prefix shared by all keys (``model.0.weight`` -> ``0.weight``)."""
    keys = list(sd)
    first = keys[0].split(".")
    depth = 0
    while depth < len(first) - 1 and all(
        k.split(".")[: depth + 1] == first[: depth + 1] and len(k.split(".")) > depth + 2
        for k in keys
    ):
        depth += 1
    if depth == 0:
        return sd
    return OrderedDict((".".join(k.split(".")[depth:]), v) for k, v in sd.items())


# ------------------------------------------------------------------------------------------------
# networks -> predictor inputs
# ------------------------------------------------------------------------------------------------
def _describe(spec) -> str:
    return ", ".join(
        f"{layer.name}:{'x'.join(map(str, layer.module_weight_shape))}" for layer in spec.layers
    )


def _network_spec(net: Network):
    """The WeightSpaceSpec of an input network (from its module, else its state_dict)."""
    from metanet.weightspace import WeightSpaceSpec

    if net.module is not None:
        return WeightSpaceSpec.from_module(net.module)
    names = []
    for key, value in net.state_dict.items():
        leaf = key.rsplit(".", 1)[-1]
        prefix = key[: -len(leaf) - 1] if "." in key else ""
        if leaf == "weight" and value.dim() >= 2:
            names.append(prefix)
        elif leaf not in ("weight", "bias"):
            raise PredictError(
                f"{net.path}: parameter '{key}' belongs to a layer a weight-space predictor "
                "cannot read (only Linear/Conv layers); use a graph predictor (GMN / NG-T)"
            )
        elif value.dim() == 1 and leaf == "weight":
            raise PredictError(
                f"{net.path}: '{key}' looks like a normalization layer, which a weight-space "
                "predictor cannot read; use a graph predictor (GMN / NG-T)"
            )
    if not names:
        raise PredictError(f"{net.path}: no Linear/Conv weights found")
    return WeightSpaceSpec.from_state_dict(net.state_dict, names)


def to_weightspace(nets: Sequence[Network], spec):
    """Stack networks into a :class:`WeightSpace` of the predictor's ``spec`` (layers matched in
    order; names may differ). Raises PredictError when a network does not fit."""
    from metanet.weightspace import WeightSpace, WeightSpaceError

    renamed = []
    for net in nets:
        try:
            own = _network_spec(net)
        except WeightSpaceError as err:
            raise PredictError(
                f"{net.path}: {err} (a weight-space predictor reads Linear/Conv chains only; "
                "train a graph predictor, configs/predict_gen/gmn.yaml, for other networks)"
            ) from None
        fits = own.num_layers == spec.num_layers and all(
            a.kind == b.kind
            and a.module_weight_shape == b.module_weight_shape
            and a.in_repeat == b.in_repeat
            and a.has_bias == b.has_bias
            for a, b in zip(own.layers, spec.layers)
        )
        if not fits:
            raise PredictError(
                f"{net.path} does not fit the predictor's architecture family: the predictor "
                f"reads networks with layers [{_describe(spec)}], this network has "
                f"[{_describe(own)}] (weight-space predictors need the architecture they were "
                "trained on; graph predictors read any)"
            )
        sd = {}
        for a, b in zip(own.layers, spec.layers):
            sd[b.weight_key] = net.state_dict[a.weight_key]
            if b.has_bias:
                sd[b.bias_key] = net.state_dict[a.bias_key]
        renamed.append(sd)
    try:
        return WeightSpace.from_state_dicts(renamed, spec)
    except WeightSpaceError as err:
        raise PredictError(str(err)) from None


def _yaml_argument(flag: str, text: str) -> Any:
    """A command-line value given as JSON/YAML text or as the path of a YAML file."""
    import yaml

    try:
        if os.path.isfile(text):
            with open(text) as fh:
                return yaml.safe_load(fh)
        return yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as err:
        raise PredictError(f"{flag}: cannot read {text!r} ({_short(err)})") from None


def _parse_arch(text: str | None) -> dict | None:
    if text is None:
        return None
    arch = _yaml_argument("--arch", text)
    if not isinstance(arch, Mapping):
        raise PredictError(f"--arch must be an arch dict (JSON/YAML mapping), got {text!r}")
    return dict(arch)


def _module_for(
    net: Network, archs: Sequence[Mapping], arch: Mapping | None
) -> tuple[nn.Module, Mapping | None]:
    """A module with ``net``'s weights for graph predictors and its arch dict when known (its own
    module, ``--arch``, or the first training architecture whose state_dict keys and shapes
    match)."""
    from metanet.zoo.architectures import ArchError, build_module

    if net.module is not None:
        return net.module, arch
    candidates = [arch] if arch is not None else list(archs)
    for cand in candidates:
        try:
            module = build_module(cand)
        except ArchError as err:
            raise PredictError(f"--arch: {err}") from None
        own = module.state_dict()
        if set(own) == set(net.state_dict) and all(
            own[k].shape == net.state_dict[k].shape for k in own
        ):
            module.load_state_dict(net.state_dict)
            return module.eval(), cand
        if arch is not None:
            raise PredictError(
                f"{net.path}: its state_dict does not match --arch (keys/shapes differ)"
            )
    raise PredictError(
        f"{net.path} is a bare state_dict whose architecture the predictor cannot tell; save the "
        "whole module (torch.save(model, path)) or pass --arch '{\"type\": \"cnn\", ...}'"
    )


def _example_input(arch: Mapping | None) -> torch.Tensor | None:
    """An input for tracing from the network's arch dict when known, else None (the tracer then
    tries common input shapes)."""
    from metanet.zoo.architectures import ArchError, input_shape

    if arch is not None:
        try:
            return torch.zeros(1, *input_shape(arch))
        except ArchError:
            return None
    return None


def to_graphs(
    nets: Sequence[Network], payload: Mapping, arch: Mapping | None, max_kernel_size: int = 9
) -> Any:
    """A PyG batch of the networks' parameter graphs (any architecture metanet can trace), with
    ``max_kernel_size`` kernel elements per edge (the graph model's ``edge_in_dim``)."""
    from torch_geometric.data import Batch

    from metanet.graph import UnsupportedOpError, from_module

    graphs = []
    for net in nets:
        module, known = _module_for(net, payload.get("archs") or [], arch)
        try:
            graphs.append(
                from_module(module.eval(), _example_input(known), max_kernel_size=max_kernel_size)
            )
        except (UnsupportedOpError, ValueError, TypeError) as err:
            raise PredictError(f"{net.path}: cannot be read as a parameter graph: {err}") from None
    return Batch.from_data_list(graphs)


def predict(predictor: Any, nets: Sequence[Network], arch: Mapping | None = None,
            batch_size: int = 64) -> list[float]:  # fmt: skip
    """Predicted test accuracy of each network (in input order; not clipped)."""
    payload = predictor.payload_loaded
    out: list[float] = []
    for start in range(0, len(nets), batch_size):
        chunk = nets[start : start + batch_size]
        if predictor.input_kind == "weightspace":
            inputs = apply_weight_normalization(
                to_weightspace(chunk, predictor.spec), payload.get("weight_normalization")
            )
        else:
            from metanet.nn.graph_features import DEFAULT_EDGE_DIM

            edges = getattr(predictor.model, "edges", None)
            width = getattr(edges, "edge_in_dim", DEFAULT_EDGE_DIM)
            inputs = to_graphs(chunk, payload, arch, width)
        with torch.no_grad():
            out += predictor.predict_accuracy(inputs).reshape(-1).tolist()
    return out


def _parse_data(text: str) -> Any:
    """``--data``: a provider name, a JSON/YAML mapping, or a YAML file holding one."""
    value = _yaml_argument("--data", text)
    if isinstance(value, Mapping) and isinstance(value.get("data"), (Mapping, str)):
        value = value["data"]  # a recipe or config file: its data entry
    if not isinstance(value, (Mapping, str)):
        raise PredictError(f"--data must name a data provider or give its mapping, got {text!r}")
    return value


def true_accuracies(nets: Sequence[Network], payload: Mapping, arch: Mapping | None,
                    data: Any) -> list[float]:  # fmt: skip
    """Each network's measured accuracy on the test split of ``data`` (a task-data provider
    config, :func:`metanet.data.tasks.load_task_data`). The test inputs are read in chunks, so a
    split larger than memory is streamed from disk (each chunk once for all networks)."""
    from metanet.data.tasks import TaskDataError, load_task_data
    from metanet.zoo.architectures import ArchError, input_shape
    from metanet.zoo.data import stream_rows, streamed

    try:
        task = load_task_data(data)
        x, y = streamed(task.test, "test")
    except (TaskDataError, MemoryError) as err:
        raise PredictError(f"--data: {err}") from None
    if task.target_kind != "classes":
        raise PredictError(f"--data: {task.name} has {task.target_kind} targets, not classes")
    modules, shapes = [], []
    for net in nets:
        try:
            module, known = _module_for(net, payload.get("archs") or [], arch)
        except PredictError as err:
            raise PredictError(f"--data: cannot measure the accuracy of {err}") from None
        try:
            shapes.append(input_shape(known) if known is not None else tuple(x.shape[1:]))
        except ArchError:
            shapes.append(tuple(x.shape[1:]))
        modules.append(module.eval())
    correct = [0] * len(nets)
    step = stream_rows(x)
    for start in range(0, len(y), step):
        try:
            xb = x[start : start + step]
        except (TaskDataError, MemoryError) as err:
            raise PredictError(f"--data: {err}") from None
        yb = y[start : start + step]
        for i, (net, module, shape) in enumerate(zip(nets, modules, shapes)):
            inputs = xb.reshape(len(xb), *shape)
            try:
                with torch.no_grad():
                    logits = module(inputs)
            except Exception as err:  # noqa: BLE001 - the user's network can raise anything
                raise PredictError(f"--data: {net.path} does not run on the data's test inputs "
                                   f"{[len(y), *shape]} ({_short(err)})") from None  # fmt: skip
            if logits.dim() != 2 or logits.shape[1] < int(task.num_classes or 0):
                raise PredictError(f"--data: {net.path} gives outputs {list(logits.shape)}, not "
                                   f"one logit per class of {task.name}")  # fmt: skip
            correct[i] += int((logits.argmax(1) == yb).sum())
    return [c / max(1, len(y)) for c in correct]


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise PredictError(f"{message}\n{self.format_usage().strip()}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="metanet predict-accuracy",
        description="Rank checkpoints by the test accuracy a trained predictor expects of them.",
    )
    parser.add_argument("--predictor", required=True, help="predictor .ckpt (metanet fit run)")
    parser.add_argument("networks", nargs="+", help="network files: state_dict / module / .ckpt")
    parser.add_argument("--arch", default=None,
                        help="arch dict (JSON/YAML text or file) for bare state_dicts (graph "
                             "predictors)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow files that need the full unpickler (pickled modules); this "
                             "runs code named in the files: only for files you trust")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--data", default=None,
                        help="also measure each checkpoint's true test accuracy on this data "
                             "(a provider name, a JSON/YAML mapping, or a YAML file)")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``metanet predict-accuracy``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.batch_size < 1:
            raise PredictError("--batch-size must be at least 1")
        predictor = load_predictor(args.predictor, args.trust_pickle)
        arch = _parse_arch(args.arch)
        nets = [load_network(p, args.trust_pickle) for p in args.networks]
        preds = predict(predictor, nets, arch, args.batch_size)
        target = str(predictor.hparams.get("target", "test_acc"))
        if target.endswith("acc"):  # an accuracy: a regression outside [0, 1] means 0 or 1
            preds = [min(1.0, max(0.0, p)) for p in preds]
        true = None
        if args.data is not None:
            true = true_accuracies(nets, predictor.payload_loaded, arch, _parse_data(args.data))
    except PredictError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    order = sorted(range(len(nets)), key=lambda i: -preds[i])
    if args.json:
        rows = [{"rank": r + 1, "path": nets[i].path, f"predicted_{target}": preds[i],
                 **({"true_test_acc": true[i]} if true is not None else {})}
                for r, i in enumerate(order)]  # fmt: skip
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(n.path) for n in nets)
    extra = f"  {'true test_acc':>13}" if true is not None else ""
    print(f"{'rank':>4}  {'predicted ' + target:>18}{extra}  checkpoint")
    for r, i in enumerate(order):
        cell = f"  {true[i]:>13.4f}" if true is not None else ""
        print(f"{r + 1:>4}  {preds[i]:>18.4f}{cell}  {nets[i].path:<{width}}")
    if true is not None and len(nets) > 1:
        print(f"Kendall's tau (predicted vs true test accuracy): {kendall_tau(preds, true):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
