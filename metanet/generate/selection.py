"""Choosing a generator's checkpoint on a validation split, never on test.

:class:`SelectOnValidation` is a Lightning callback for the weight generators of
:mod:`metanet.tasks.generation`: every ``every_n_steps`` optimizer steps (and at the last one) it
samples ``n_samples`` networks with a fixed seed, measures their accuracy on the validation split
of the zoo's data (:func:`metanet.generate.evaluate.load_eval_splits`; a condition's own classes
for a task-conditioned generator), logs the median as ``val/median_acc`` (so a
``ModelCheckpoint(monitor="val/median_acc", mode="max")`` keeps the best file) and, at the end of
``fit``, puts the best-scoring weights back into the model (``restore=True``).

Networks of a flat parameter layout (:class:`metanet.generate.data.FlatLayout`: CNNs with
BatchNorm, user modules) are loaded through it; ``calibrate_bn=K`` recomputes their BatchNorm
running statistics on ``K`` batches of the zoo data's train split before they are scored (as
``metanet generate --calibrate-bn K`` does), so the choice is made on the networks one would use.

In a config::

    trainer:
      callbacks:
        - class_path: metanet.generate.selection.SelectOnValidation
          init_args: {every_n_steps: 200, n_samples: 32}
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

__all__ = ["SelectOnValidation"]


class SelectOnValidation(L.Callback):
    """Keep the generator state whose samples score the best median validation accuracy.

    Args:
        every_n_steps: evaluate every this many optimizer steps (and after the last step).
        n_samples: networks sampled per evaluation (same seed every time).
        seed: sampler seed of the evaluations.
        restore: load the best state into the model when ``fit`` ends.
        calibrate_bn: recalibrate BatchNorm running statistics on this many train batches before
            scoring (0: score with the loaded buffers).
        calibrate_batch_size: samples per calibration batch.

    After ``fit``: ``history`` (``[(step, median val acc)]``), ``best_step``, ``best_score``.
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        n_samples: int = 32,
        seed: int = 0,
        restore: bool = True,
        calibrate_bn: int = 0,
        calibrate_batch_size: int = 64,
    ) -> None:
        super().__init__()
        if every_n_steps < 1 or n_samples < 1:
            raise ValueError(
                f"every_n_steps and n_samples must be >= 1, got {every_n_steps}, {n_samples}"
            )
        if calibrate_bn < 0 or calibrate_batch_size < 1:
            raise ValueError(
                f"calibrate_bn must be >= 0 and calibrate_batch_size >= 1, got {calibrate_bn}, "
                f"{calibrate_batch_size}"
            )
        self.calibrate_bn = calibrate_bn
        self.calibrate_batch_size = calibrate_batch_size
        self._layout: Any = None
        self._calibration: list[torch.Tensor] | None = None
        self.every_n_steps = every_n_steps
        self.n_samples = n_samples
        self.seed = seed
        self.restore = restore
        self.history: list[tuple[int, float]] = []
        self.best_step: int | None = None
        self.best_score = float("-inf")
        self._best_state: dict[str, torch.Tensor] | None = None
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from metanet.generate.data import network_layout
        from metanet.generate.evaluate import calibration_batches, can_evaluate, load_eval_splits

        info = getattr(pl_module, "info", None)
        if not info or not can_evaluate(info):
            raise ValueError(
                "SelectOnValidation needs a generator of a classifier zoo whose data this machine "
                "can read"
            )
        splits = load_eval_splits(info)
        self._val = (splits.x_val, splits.y_val)
        self._layout = network_layout(info)
        self._calibration = (
            calibration_batches(info, self.calibrate_bn, self.calibrate_batch_size, self.seed)
            if self.calibrate_bn
            else None
        )
        self.history, self.best_step, self.best_score = [], None, float("-inf")
        self._best_state, self._last_step = None, -1

    @torch.no_grad()
    def _score(self, pl_module: Any) -> float | None:
        from metanet.generate.evaluate import classifier_accuracy

        if hasattr(pl_module, "latent_ready") and not bool(pl_module.latent_ready):
            return None  # latent diffusion still in its autoencoder phase: nothing to sample
        ws, names = pl_module.sample(self.n_samples, seed=self.seed)
        x, y = self._val
        arch = pl_module.info["arch"]
        tasks = pl_module.info.get("task_classes") or {}
        load = {"layout": self._layout, "calibration": self._calibration}
        if not tasks:
            return float(classifier_accuracy(ws, arch, x, y, **load).median())
        accs = torch.empty(len(ws))
        for cond, classes in tasks.items():
            rows = [i for i, c in enumerate(names) if c == cond]
            if rows:
                accs[rows] = classifier_accuracy(ws[rows], arch, x, y, classes, **load)
        return float(accs.median())

    def _maybe_evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = int(trainer.global_step)
        last = bool(trainer.max_steps and trainer.max_steps > 0 and step >= trainer.max_steps)
        if step == self._last_step or not (step % self.every_n_steps == 0 or last):
            return
        self._last_step = step
        score = self._score(pl_module)
        if score is None:
            return
        self.history.append((step, score))
        pl_module.log("val/median_acc", score, prog_bar=True)
        if score > self.best_score:
            self.best_score, self.best_step = score, step
            self._best_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._best_state is None:
            self._maybe_evaluate(trainer, pl_module)
        if self.restore and self._best_state is not None:
            pl_module.load_state_dict(self._best_state)
