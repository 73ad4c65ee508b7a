"""Reading trained weight generators back from their checkpoints (:func:`load_generator`)."""

from __future__ import annotations

from typing import Any

from metanet.tasks.flow_generation import FlowGenerationTask
from metanet.tasks.generation import PAYLOAD_KEY, TASK_NAME, GenerationError, GenerationTask
from metanet.tasks.latent_diffusion import LatentDiffusionTask

__all__ = ["load_generator"]


def _generator_classes() -> dict[str, type[GenerationTask]]:
    """Generator classes by the ``task_class`` a checkpoint records (their module path; the
    path of ``metanet.tasks.generation``, where both lived before, too)."""
    out: dict[str, type[GenerationTask]] = {}
    for cls in (FlowGenerationTask, LatentDiffusionTask):
        out[f"{cls.__module__}.{cls.__qualname__}"] = cls
        out[f"metanet.tasks.generation.{cls.__qualname__}"] = cls
    return out


def _read_checkpoint(path: str, trust_pickle: bool = False) -> dict[str, Any]:
    from metanet.serialization import FileError, load_file

    try:
        ckpt = load_file(path, trust_pickle=trust_pickle)
    except FileError as err:
        raise GenerationError(str(err)) from None
    if not isinstance(ckpt, dict):
        raise GenerationError(f"{path}: not a checkpoint (a {type(ckpt).__name__})")
    return ckpt


def load_generator(
    path_or_checkpoint: str | dict[str, Any], trust_pickle: bool = False
) -> GenerationTask:
    """A trained generator from a checkpoint written by ``metanet fit`` (a Lightning ``.ckpt``,
    read tensors-only, or its pickle-free ``.safetensors`` copy), on CPU in eval mode.

    ``trust_pickle`` allows a full unpickle of a ``.ckpt`` that needs it (runs code named in the
    file: only for files you trust).

    Raises:
        GenerationError: the file is missing/corrupt or a checkpoint of another task.
    """
    if isinstance(path_or_checkpoint, dict):
        ckpt, where = path_or_checkpoint, "checkpoint"
    else:
        where = str(path_or_checkpoint)
        ckpt = _read_checkpoint(where, trust_pickle)
    payload = ckpt.get(PAYLOAD_KEY)
    if not isinstance(payload, dict):
        raise GenerationError(f"{where}: not a metanet checkpoint (no '{PAYLOAD_KEY}' entry)")
    if payload.get("task") != TASK_NAME:
        raise GenerationError(
            f"{where}: a checkpoint of task '{payload.get('task')}', not a weight generator"
        )
    cls = _generator_classes().get(str(payload.get("task_class")))
    if cls is None:
        raise GenerationError(f"{where}: unknown generator class {payload.get('task_class')!r}")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if "prediction" not in hparams:  # an older checkpoint: rebuild what it was trained as
        hparams.update(cls.legacy_hparams)
    try:
        model = cls(**hparams)
        model.on_load_checkpoint(ckpt)
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, KeyError, RuntimeError) as err:
        raise GenerationError(f"{where}: generator checkpoint does not load ({err})") from None
    return model.eval()
