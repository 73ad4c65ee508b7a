"""Lightning checkpoints that can be shared: a pickle-free ``.safetensors`` copy beside each.

:class:`ModelCheckpoint` is Lightning's own callback (same arguments, same ``.ckpt`` files, so
``--ckpt_path`` resuming works as before) that also writes, after each checkpoint, the same
checkpoint without optimizer and loop state as one safetensors file
(:func:`metanet.serialization.save_tree`: tensors plus a JSON tree of the hyperparameters and
metanet's payload): ``best.ckpt`` -> ``best.safetensors``. Every metanet loader
(``predict-accuracy --predictor``, ``GHN.load``, ``load_generator``) reads either file; the
``.safetensors`` one is what to hand to someone else, since reading it involves no pickle at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

#: Checkpoint entries that only resuming needs; the exported copy leaves them out.
RESUME_ONLY_KEYS = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


def export_path(ckpt_path: str | os.PathLike) -> Path:
    """Where the safetensors copy of ``ckpt_path`` goes (same name, ``.safetensors``)."""
    return Path(ckpt_path).with_suffix(".safetensors")


def export_checkpoint(ckpt_path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the pickle-free copy of a Lightning checkpoint written by ``metanet fit``.

    The ``.ckpt`` is read tensors-only; optimizer and loop state are dropped.

    Raises:
        metanet.serialization.FileError: ``ckpt_path`` cannot be read tensors-only.
        TypeError: the checkpoint holds a value that cannot be stored without pickle.
    """
    from metanet.serialization import load_file, save_tree

    ckpt: Any = load_file(ckpt_path)
    if not isinstance(ckpt, dict):
        raise TypeError(f"{ckpt_path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    kept = {k: v for k, v in ckpt.items() if k not in RESUME_ONLY_KEYS}
    return save_tree(export_path(ckpt_path) if out is None else out, kept)


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` plus a ``.safetensors`` copy of every checkpoint it keeps
    (see the module docstring); the copy is removed when Lightning removes the ``.ckpt``."""

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if not trainer.is_global_zero:
            return
        try:
            export_checkpoint(filepath)
        except (TypeError, ValueError) as err:  # training goes on; the .ckpt is there
            rank_zero_warn(f"no safetensors copy of {filepath}: {err}")

    def _remove_checkpoint(self, trainer: Any, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        copy = export_path(filepath)
        if trainer.is_global_zero and copy.exists() and copy != Path(filepath):
            copy.unlink()


__all__ = ["ModelCheckpoint", "export_checkpoint", "export_path", "RESUME_ONLY_KEYS"]
