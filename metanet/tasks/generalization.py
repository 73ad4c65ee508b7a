"""Generalization prediction: regress a checkpoint's test accuracy from its weights.

:class:`GeneralizationTask` trains any metanetwork (weight-space or graph, chosen by its
``input_kind``) to predict a zoo metric (``test_acc`` by default) and logs, per epoch, the loss,
Kendall's tau and R² of the predictions on the validation and test splits. Its ``test`` run writes
``predicted_vs_true.png`` (and the predictions as CSV) into the run folder.

Example config (``metanet fit --config configs/predict_gen/nfn_np.yaml``)::

    model:
      class_path: metanet.tasks.GeneralizationTask
      init_args:
        model: {class_path: metanet.nn.nfn.NFN, init_args: {mode: np, hidden: 32}}
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from metanet.metrics import kendall_tau, r2_score
from metanet.tasks._common import TaskConfigError, batch_size_of
from metanet.tasks.base import MetanetTask, ModelArg
from metanet.tasks.plots import predicted_vs_true, training_curves_from_logger

log = logging.getLogger(__name__)

LOSSES = ("mse", "huber", "bce")


class GeneralizationTask(MetanetTask):
    """Regress a network's test accuracy (or another zoo metric) from its weights.

    The metanetwork outputs one number per network in *normalized* target units; the data
    module's target normalization (``target_mean`` / ``target_std``) is stored in the task's
    buffers ``target_loc`` / ``target_scale`` so :meth:`predict_accuracy` returns accuracies.

    Args:
        model: metanetwork factory (``spec -> nn.Module``) or graph model; see :class:`MetanetTask`.
        lr, weight_decay, cosine: AdamW settings (see :class:`MetanetTask`).
        loss: ``"mse"``, ``"huber"`` or ``"bce"`` (binary cross-entropy on the raw target in
            [0, 1]; only without target normalization).
        target: the zoo metric predicted (recorded in checkpoints; the data module serves it).
        plot: write the predicted-vs-true PNG and predictions CSV at the end of ``test``.
    """

    task_name = "generalization"

    def __init__(
        self,
        model: ModelArg,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        cosine: bool = False,
        loss: str = "mse",
        target: str = "test_acc",
        plot: bool = True,
    ) -> None:
        if loss not in LOSSES:
            raise TaskConfigError(f"loss must be one of {LOSSES}, got {loss!r}")
        super().__init__(model, lr=lr, weight_decay=weight_decay, cosine=cosine)
        self.register_buffer("target_loc", torch.zeros(()))
        self.register_buffer("target_scale", torch.ones(()))
        self._outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}
        self.last_metrics: dict[str, float] = {}

    # -- data -----------------------------------------------------------------------------------
    def read_datamodule(self, datamodule: Any) -> None:
        """Copy the data module's target normalization (mean/std of the training targets)."""
        loc, scale = target_normalization(datamodule)
        self.target_loc.fill_(loc)
        self.target_scale.fill_(scale)
        if self.hparams.loss == "bce" and (loc != 0.0 or scale != 1.0):
            raise TaskConfigError("loss 'bce' needs raw targets in [0, 1]: turn off normalization")

    # -- prediction -----------------------------------------------------------------------------
    def predict_normalized(self, inputs: Any) -> torch.Tensor:
        """Metanetwork output ``[B]`` in normalized target units."""
        out = self(inputs)
        if out.dim() == 2 and out.shape[1] == 1:
            out = out[:, 0]
        if out.dim() != 1:
            raise TaskConfigError(
                f"the metanetwork returned shape {tuple(out.shape)}; generalization prediction "
                "needs one number per network (set out_dim=1)"
            )
        return out

    def predict_accuracy(self, inputs: Any) -> torch.Tensor:
        """Predicted target (test accuracy) ``[B]`` in the metric's own units."""
        out = self.predict_normalized(inputs)
        if self.hparams.loss == "bce":
            out = torch.sigmoid(out)
        return self.target_loc + self.target_scale * out

    def _denormalize(self, y: torch.Tensor) -> torch.Tensor:
        return self.target_loc + self.target_scale * y

    # -- steps ----------------------------------------------------------------------------------
    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.hparams.loss == "mse":
            return F.mse_loss(out, y)
        if self.hparams.loss == "huber":
            return F.huber_loss(out, y, delta=1.0)
        return F.binary_cross_entropy_with_logits(out, y)

    def _step(self, batch: Any, split: str) -> torch.Tensor:
        inputs, y = self.split(batch)
        y = y.to(self.target_loc.dtype).reshape(-1)
        if not bool(torch.isfinite(y).all()):
            raise TaskConfigError(f"{split} batch has NaN/inf targets")
        out = self.predict_normalized(inputs)
        loss = self._loss(out, y)
        n = batch_size_of(inputs)
        self.log(f"{split}/loss", loss, batch_size=n, prog_bar=split != "test", on_epoch=True,
                 on_step=False)  # fmt: skip
        if split in self._outputs:
            pred = torch.sigmoid(out) if self.hparams.loss == "bce" else out
            self._outputs[split].append((pred.detach(), y.detach()))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs = self.split(batch)[0] if not _is_bare_input(batch) else batch
        return self.predict_accuracy(inputs)

    def on_validation_epoch_start(self) -> None:
        self._outputs["val"] = []

    def on_test_epoch_start(self) -> None:
        self._outputs["test"] = []

    def _collect(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        outs = self._outputs[split]
        if not outs:
            return torch.zeros(0), torch.zeros(0)
        pred = torch.cat([p for p, _ in outs])
        true = torch.cat([t for _, t in outs])
        if self.trainer is not None and self.trainer.world_size > 1:
            pred = self.all_gather(pred).reshape(-1)
            true = self.all_gather(true).reshape(-1)
        if self.hparams.loss != "bce":
            pred = self._denormalize(pred)
        return pred.cpu(), self._denormalize(true).cpu()

    def _epoch_metrics(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        pred, true = self._collect(split)
        if pred.numel() >= 2:
            tau, r2 = kendall_tau(pred, true), r2_score(pred, true)
            self.log(f"{split}/kendall_tau", tau, prog_bar=True)
            self.log(f"{split}/r2", r2, prog_bar=split == "val")
            self.last_metrics.update({f"{split}/kendall_tau": tau, f"{split}/r2": r2})
        return pred, true

    def on_validation_epoch_end(self) -> None:
        if self.trainer is not None and self.trainer.sanity_checking:
            self._outputs["val"] = []
            return
        self._epoch_metrics("val")
        self._outputs["val"] = []

    def on_test_epoch_end(self) -> None:
        pred, true = self._epoch_metrics("test")
        self._outputs["test"] = []
        if not self.hparams.plot or pred.numel() < 2 or not self.trainer.is_global_zero:
            return
        folder = run_folder(self.trainer)
        target = self.hparams.target
        label = {"test_acc": "test accuracy", "train_acc": "train accuracy"}.get(target, target)
        path = predicted_vs_true(
            pred.numpy(), true.numpy(), os.path.join(folder, "predicted_vs_true.png"),
            title=f"{self.model_label()}: {label} of held-out networks", label=label,
        )  # fmt: skip
        csv = os.path.join(folder, "test_predictions.csv")
        np.savetxt(csv, np.stack([true.numpy(), pred.numpy()], 1), delimiter=",",
                   header="true,predicted", comments="", fmt="%.6f")  # fmt: skip
        self.test_plot_path = path
        log.info("predicted-vs-true plot written to %s", path)
        print(f"metanet: predicted-vs-true plot: {path}")

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        training_curves_from_logger(self.trainer)

    def model_label(self) -> str:
        """Short name of the metanetwork for plot titles."""
        if self.model is None:
            return "model"
        mode = getattr(self.model, "mode", None)
        name = type(self.model).__name__
        return f"{name}-{mode}" if isinstance(mode, str) else name

    def payload(self) -> dict[str, Any]:
        out = super().payload()
        out.update(
            target=self.hparams.target,
            loss=self.hparams.loss,
            target_loc=float(self.target_loc),
            target_scale=float(self.target_scale),
        )
        return out


def _is_bare_input(batch: Any) -> bool:
    from metanet.weightspace import WeightSpace

    return isinstance(batch, WeightSpace) or (
        hasattr(batch, "num_graphs") and getattr(batch, "y", None) is None
    )


def target_normalization(datamodule: Any) -> tuple[float, float]:
    """``(mean, std)`` the data module subtracts/divides targets by; ``(0, 1)`` if it does not."""
    for loc_name, scale_name in (
        ("target_mean", "target_std"),
        ("target_loc", "target_scale"),
        ("y_mean", "y_std"),
    ):
        loc, scale = getattr(datamodule, loc_name, None), getattr(datamodule, scale_name, None)
        if loc is not None and scale is not None:
            return float(loc), float(scale)
    stats = getattr(datamodule, "target_stats", None)
    if isinstance(stats, Mapping) and "mean" in stats and "std" in stats:
        return float(stats["mean"]), float(stats["std"])
    if isinstance(stats, (tuple, list)) and len(stats) == 2:
        return float(stats[0]), float(stats[1])
    return 0.0, 1.0


def run_folder(trainer: Any) -> str:
    """The run's folder: the logger's versioned folder, else ``trainer.default_root_dir``."""
    folder = None
    try:
        folder = trainer.log_dir
    except Exception:  # noqa: BLE001 - some loggers have no folder
        folder = None
    folder = folder or trainer.default_root_dir
    os.makedirs(folder, exist_ok=True)
    return folder
