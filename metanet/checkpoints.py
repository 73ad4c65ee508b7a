"""One loader for every kind of checkpoint metanet writes.

:func:`load` reads a file once (tensors only unless ``trust_pickle``, see
:mod:`metanet.serialization`) and rebuilds what it holds, in eval mode on the CPU:

* a GHN (``GHN.save``'s safetensors file, or a Lightning checkpoint of
  :class:`metanet.tasks.hypernet.GHNTask`) -> :class:`metanet.hyper.GHN`;
* a weight generator (``metanet fit`` with ``configs/generate/*``) ->
  :class:`metanet.tasks.generation.GenerationTask` (sample with :func:`metanet.generate.sample`);
* an accuracy predictor (``configs/predict_gen/*``) ->
  :class:`metanet.tasks.generalization.GeneralizationTask`;
* any other metanet task (INR classification, ...) -> that :class:`metanet.tasks.base.MetanetTask`
  with its metanetwork rebuilt from the checkpoint's recipe.

The task class is named in the file; only classes of metanet itself are imported from it.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from torch import nn

from metanet.serialization import FileError, load_file

__all__ = ["CheckpointError", "load"]


class CheckpointError(ValueError):
    """A file that is not a metanet checkpoint, or one that cannot be rebuilt (one line)."""


def load(path: str | os.PathLike, trust_pickle: bool = False) -> nn.Module:
    """Rebuild what a metanet checkpoint file holds (see the module docstring), in eval mode.

    Args:
        path: a ``.ckpt`` written by ``metanet fit``, its ``.safetensors`` copy, or a file
            written by ``GHN.save``.
        trust_pickle: allow a full unpickle for a file that needs it (runs code named in the
            file: only for files you trust).
    Raises:
        CheckpointError: unreadable, not a metanet checkpoint, or not rebuildable (names why).
    """
    from metanet.hyper.ghn import FORMAT as GHN_FORMAT
    from metanet.tasks._common import PAYLOAD_KEY

    where = os.fspath(path)
    try:
        ckpt = load_file(where, trust_pickle=trust_pickle)
    except (FileError, FileNotFoundError) as exc:
        raise CheckpointError(f"cannot read {where}: {exc}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{where} holds a {type(ckpt).__name__}, not a metanet checkpoint")
    hparams = ckpt.get("hyper_parameters")
    if ckpt.get("format") == GHN_FORMAT or (isinstance(hparams, dict) and "ghn" in hparams):
        from metanet.hyper.ghn import GHN

        try:
            return GHN.load(where, trust_pickle=trust_pickle).eval()
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{where}: GHN checkpoint does not load ({exc})") from None
    payload = ckpt.get(PAYLOAD_KEY)
    if not isinstance(payload, dict):
        what = "a Lightning checkpoint" if "state_dict" in ckpt else "a state_dict or other file"
        raise CheckpointError(f"{where} is {what} without metanet's task metadata")
    task = payload.get("task")
    if task == "generation":
        from metanet.tasks.generation import GenerationError
        from metanet.tasks.generators import load_generator

        try:
            return load_generator(ckpt)
        except GenerationError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
    if task == "generalization":
        from metanet.tasks.predict_cli import PredictError, load_predictor

        try:
            return load_predictor(where, trust_pickle=trust_pickle)
        except PredictError as exc:
            raise CheckpointError(str(exc)) from None
    return _load_task(ckpt, payload, where)


def _load_task(ckpt: dict[str, Any], payload: dict[str, Any], where: str) -> nn.Module:
    """A :class:`~metanet.tasks.base.MetanetTask` subclass of metanet, rebuilt from its recipe."""
    from metanet.tasks._common import TaskConfigError, import_object
    from metanet.tasks.base import MetanetTask

    name = str(payload.get("task_class") or "")
    if not name.startswith("metanet."):
        raise CheckpointError(f"{where}: task class {name!r} is not one of metanet's")
    try:
        cls = import_object(name)
    except TaskConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, MetanetTask)):
        raise CheckpointError(f"{where}: {name} is not a metanet task")
    if not payload.get("model"):
        raise CheckpointError(f"{where} does not record how to rebuild its metanetwork")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "model"}
    kwargs = {k: v for k, v in hparams.items() if k in accepted}
    try:
        task = cls(model=payload["model"], **kwargs)
        task.on_load_checkpoint(ckpt)
        missing, unexpected = task.load_state_dict(ckpt["state_dict"], strict=False)
    except (TaskConfigError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: cannot rebuild the {name} ({exc})") from None
    if missing or unexpected:
        raise CheckpointError(f"{where}: the stored weights do not fit the rebuilt metanetwork "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")  # fmt: skip
    return task.eval()
