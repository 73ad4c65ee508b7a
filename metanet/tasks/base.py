"""``MetanetTask``: the LightningModule base of metanet's tasks (metanetwork set-up, optimizer,
checkpoint payload).

Subclasses set :attr:`MetanetTask.task_name` and implement ``training_step`` etc. The metanetwork
is built in :meth:`setup` from the data module (``datamodule.spec`` for weight-space models, the
graph feature sizes for graph models), or explicitly with :meth:`build`. Graph metanetworks also
get the data statistics of the training split (``datamodule.graph_stats``: value standardization,
PNA degrees) before any batch reaches them (:meth:`MetanetTask.hand_data_statistics`), so no
statistic is ever taken from a validation batch. Every checkpoint carries
``checkpoint["metanet"]`` (plain python: task name, model recipe, spec, arch dicts) so the
metanetwork can be rebuilt without the data (:meth:`on_load_checkpoint`, ``predict-accuracy``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from metanet.tasks._common import (
    PAYLOAD_KEY,
    PAYLOAD_VERSION,
    TaskConfigError,
    TrainingDivergedError,
    archs_of,
    build_metanetwork,
    check_input,
    describe_factory,
    input_kind_of,
    plain,
    weight_normalization_of,
)
from metanet.weightspace import WeightSpaceSpec

ModelArg = Callable[[WeightSpaceSpec], nn.Module] | nn.Module

_GRAPH_DIM_ATTRS = ("node_in_dim", "edge_in_dim")


class MetanetTask(L.LightningModule):
    """Base of the tasks: holds the metanetwork ``self.model`` and its provenance.

    Args:
        model: a factory ``spec -> nn.Module`` (weight-space models), a graph-model factory or
            instance, or a recipe dict ``{"class_path", "init_args"}``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        cosine: anneal the learning rate to 0 over the run (cosine schedule, per step).
    """

    task_name: str = ""

    def __init__(
        self,
        model: ModelArg,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        cosine: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model_recipe = describe_factory(model)
        if self.model_recipe is not None:
            # record the metanetwork as a plain recipe (checkpoints stay weights_only-loadable)
            self.save_hyperparameters({**dict(self.hparams), "model": self.model_recipe})
        self.input_kind = input_kind_of(model)
        self._factory = model
        self.model: nn.Module | None = model if isinstance(model, nn.Module) else None
        self.spec: WeightSpaceSpec | None = None
        self.graph_kwargs: dict[str, Any] = {}
        self.archs: list[dict] = []
        self.weight_normalization: dict[str, Any] | None = None
        self._steps_finite: torch.Tensor | None = None  # this epoch's steps, on accelerators

    # -- building -------------------------------------------------------------------------------
    def build(
        self,
        spec: WeightSpaceSpec | None = None,
        graph_kwargs: Mapping[str, Any] | None = None,
        archs: list[dict] | None = None,
    ) -> nn.Module:
        """Build the metanetwork for data of ``spec`` (weight-space) / ``graph_kwargs`` (graph)."""
        self.spec = spec if spec is not None else self.spec
        self.graph_kwargs = dict(graph_kwargs or self.graph_kwargs)
        self.archs = list(archs or self.archs)
        if self.model is None:
            self.model = build_metanetwork(self._factory, self.spec, self.graph_kwargs)
        return self.model

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            if self.model is None:
                raise TaskConfigError(
                    f"{type(self).__name__} needs a data module (or call .build(spec) first)"
                )
            return
        spec = getattr(dm, "spec", None)
        graph_kwargs = {k: getattr(dm, k) for k in _GRAPH_DIM_ATTRS if getattr(dm, k, None)}
        self.read_datamodule(dm)
        if spec is not None:
            self.weight_normalization = weight_normalization_of(dm)
        self.build(spec, graph_kwargs, archs_of(dm))
        if stage == "fit":
            self.hand_data_statistics(dm, train_batch_fallback=True)
        self._materialize_lazy(dm)

    def hand_data_statistics(self, datamodule: Any, train_batch_fallback: bool = False) -> bool:
        """Give a graph metanetwork without data statistics those of the training split.

        Takes ``datamodule.graph_stats`` (:class:`~metanet.nn.graph_features.GraphStats`, see
        :class:`~metanet.data.datamodules.ParamGraphDataModule`) and calls
        ``model.set_data_statistics``. For a data module without ``graph_stats`` and
        ``train_batch_fallback``, the model is calibrated explicitly on the first *training*
        batch, with a warning. A model that already has statistics (calibrated by the user,
        restored from a checkpoint, or handed them in an earlier stage) keeps them; models without
        ``set_data_statistics`` (weight-space models) are left alone.

        Returns:
            Whether statistics were set.
        """
        model = self.model
        if model is None or not hasattr(model, "set_data_statistics"):
            return False
        if getattr(model, "is_calibrated", True):
            return False
        stats = getattr(datamodule, "graph_stats", None)
        if stats is not None:
            model.set_data_statistics(stats)
            return True
        if train_batch_fallback and hasattr(datamodule, "train_dataloader"):
            batch = next(iter(datamodule.train_dataloader()), None)
            if batch is None:  # no training data: nothing to take statistics from
                return False
            rank_zero_warn(
                f"{type(datamodule).__name__} has no graph_stats: calibrating "
                f"{type(model).__name__}'s data statistics on the first training batch (expose "
                "the training split's GraphStats as datamodule.graph_stats to use all of it)"
            )
            inputs, _ = self.split(batch)
            model.calibrate(inputs)
            return True
        return False

    def _statistics_before_evaluation(self) -> None:
        """validate / test / predict without a checkpoint: the training split's statistics (a
        no-op when the model has them, e.g. restored from ``--ckpt_path``)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            self.hand_data_statistics(dm)

    def on_validation_start(self) -> None:
        self._statistics_before_evaluation()

    def on_test_start(self) -> None:
        self._statistics_before_evaluation()

    def on_predict_start(self) -> None:
        self._statistics_before_evaluation()

    # -- divergence -----------------------------------------------------------------------------
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Stop a diverged fit with :class:`TrainingDivergedError` instead of training on NaN.
        On the CPU every step's loss is checked at once (no device sync to pay); on accelerators
        the steps' finiteness is accumulated on the device and read once per epoch."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        finite = torch.isfinite(loss.detach()).all()
        if loss.device.type == "cpu":
            if not bool(finite):
                self._diverged(f"{float(loss):g} at step {self.global_step} "
                               f"(epoch {self.current_epoch})")  # fmt: skip
        else:
            seen = self._steps_finite
            self._steps_finite = finite if seen is None else seen & finite

    def on_train_epoch_end(self) -> None:
        finite, self._steps_finite = self._steps_finite, None
        if finite is not None and not bool(finite):
            self._diverged(f"NaN/inf in epoch {self.current_epoch}")

    def _diverged(self, what: str) -> None:
        raise TrainingDivergedError(
            f"{type(self).__name__}: the training loss is {what}; the fit diverged (lower the "
            f"learning rate, lr={self.hparams.lr:g}); checkpoints written before are kept"
        )

    def read_datamodule(self, datamodule: Any) -> None:
        """Hook for subclasses: read what the task needs from the data module (before build)."""

    def _materialize_lazy(self, dm: Any) -> None:
        """Run one batch through a model with lazy parameters so the optimizer sees real ones."""
        if self.model is None or not any(
            isinstance(p, nn.parameter.UninitializedParameter) for p in self.model.parameters()
        ):
            return
        inputs, _ = self.split(next(iter(dm.train_dataloader())))
        with torch.no_grad():
            self.model(inputs)

    # -- steps ----------------------------------------------------------------------------------
    def split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """``(inputs, targets)`` of a batch, checked against the model's input kind."""
        from metanet.tasks._common import split_batch

        inputs, target = split_batch(batch)
        check_input(inputs, self.input_kind)
        return inputs, target

    def forward(self, inputs: Any) -> torch.Tensor:
        """Raw metanetwork output ``[B, out_dim]``."""
        if self.model is None:
            raise TaskConfigError(f"{type(self).__name__}: the metanetwork is not built yet")
        return self.model(inputs)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        if not self.hparams.cosine:
            return opt
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- checkpoints ----------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild the metanetwork without data (plain python)."""
        return {
            "version": PAYLOAD_VERSION,
            "task": self.task_name,
            "task_class": f"{type(self).__module__}.{type(self).__qualname__}",
            "input_kind": self.input_kind,
            "model": self.model_recipe,
            "model_class": (
                f"{type(self.model).__module__}.{type(self.model).__qualname__}"
                if self.model is not None
                else None
            ),
            "spec": self.spec.to_dict() if self.spec is not None else None,
            "graph_kwargs": plain(self.graph_kwargs),
            "archs": plain(self.archs),
            "weight_normalization": self.weight_normalization,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[PAYLOAD_KEY] = self.payload()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        payload = checkpoint.get(PAYLOAD_KEY)
        if payload is None:
            raise TaskConfigError("the checkpoint was not written by a metanet task")
        if payload.get("task") != self.task_name:
            raise TaskConfigError(
                f"the checkpoint belongs to task '{payload.get('task')}', not '{self.task_name}'"
            )
        spec = WeightSpaceSpec.from_dict(payload["spec"]) if payload.get("spec") else None
        self.weight_normalization = payload.get("weight_normalization")
        self.build(spec, payload.get("graph_kwargs") or {}, payload.get("archs") or [])
