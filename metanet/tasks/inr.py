"""INR classification: tell which digit a SIREN represents from the SIREN's weights alone.

:class:`INRClassificationTask` trains any metanetwork (weight-space or graph) with
``out_dim = num_classes`` on a ``digits-siren`` zoo (the data module serves ``label`` as the
target) and logs cross-entropy and accuracy on train/val/test.

Example config (``metanet fit --config configs/inr/nfn_np.yaml``)::

    model:
      class_path: metanet.tasks.INRClassificationTask
      init_args:
        model: {class_path: metanet.nn.nfn.NFN, init_args: {mode: np, out_dim: 10}}
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from metanet.tasks._common import TaskConfigError, batch_size_of
from metanet.tasks.base import MetanetTask, ModelArg


class INRClassificationTask(MetanetTask):
    """Classify INRs (e.g. SIRENs of digit images) by their weights.

    Args:
        model: metanetwork factory / graph model with ``out_dim = num_classes``.
        num_classes: number of classes (10 digits).
        label_smoothing: cross-entropy label smoothing.
        lr, weight_decay, cosine: AdamW settings (see :class:`MetanetTask`).
    """

    task_name = "inr_classification"

    def __init__(
        self,
        model: ModelArg,
        num_classes: int = 10,
        label_smoothing: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        cosine: bool = False,
    ) -> None:
        super().__init__(model, lr=lr, weight_decay=weight_decay, cosine=cosine)
        self.last_metrics: dict[str, float] = {}

    def read_datamodule(self, datamodule: Any) -> None:
        """Check that the data's classes fit ``num_classes``."""
        found = getattr(datamodule, "num_classes", None)
        if found is not None and int(found) > self.hparams.num_classes:
            raise TaskConfigError(
                f"the data has {found} classes but the task was set up for num_classes="
                f"{self.hparams.num_classes}"
            )

    def logits(self, inputs: Any) -> torch.Tensor:
        """Class scores ``[B, num_classes]``."""
        out = self(inputs)
        k = self.hparams.num_classes
        if out.dim() != 2 or out.shape[1] != k:
            raise TaskConfigError(
                f"the metanetwork returned shape {tuple(out.shape)}; INR classification needs "
                f"[B, {k}] (set out_dim: {k} in the model's init_args)"
            )
        return out

    def _step(self, batch: Any, split: str) -> torch.Tensor:
        inputs, y = self.split(batch)
        if y.is_floating_point() and y.dim() == 2:  # soft labels (AlignedMixUp): [B, classes]
            return self._soft_step(inputs, y, split)
        y = y.reshape(-1).long()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.hparams.num_classes):
            raise TaskConfigError(
                f"{split} labels must lie in [0, {self.hparams.num_classes}); got "
                f"[{int(y.min())}, {int(y.max())}]"
            )
        logits = self.logits(inputs)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        acc = (logits.argmax(1) == y).float().mean()
        return self._log_step(split, loss, acc, batch_size_of(inputs))

    def _soft_step(self, inputs: Any, y: torch.Tensor, split: str) -> torch.Tensor:
        """Cross-entropy against class probabilities ``y [B, classes]``; accuracy against their
        most probable class."""
        k = self.hparams.num_classes
        if y.shape[1] != k:
            raise TaskConfigError(f"{split} soft labels have {y.shape[1]} classes, the task "
                                  f"{k} (num_classes of AlignedMixUp?)")  # fmt: skip
        logits = self.logits(inputs)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        acc = (logits.argmax(1) == y.argmax(1)).float().mean()
        return self._log_step(split, loss, acc, batch_size_of(inputs))

    def _log_step(self, split: str, loss: torch.Tensor, acc: torch.Tensor, n: int) -> torch.Tensor:
        self.log(f"{split}/loss", loss, batch_size=n, on_epoch=True, on_step=False,
                 prog_bar=split != "test")  # fmt: skip
        self.log(f"{split}/acc", acc, batch_size=n, on_epoch=True, on_step=False, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs = self.split(batch)[0] if isinstance(batch, (tuple, list, dict)) else batch
        return self.logits(inputs).argmax(1)

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        from metanet.tasks.plots import training_curves_from_logger

        training_curves_from_logger(self.trainer)

    def payload(self) -> dict[str, Any]:
        out = super().payload()
        out["num_classes"] = int(self.hparams.num_classes)
        return out
