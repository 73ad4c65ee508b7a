"""Flow matching in weight space as a LightningModule (DeepWeightFlow;
``configs/generate/flow*.yaml``).

The shared data, condition, standardization and checkpoint logic is
:class:`metanet.tasks.generation.GenerationTask`'s.
"""

from __future__ import annotations

from typing import Any

import torch

from metanet.generate.backbones import build_backbone
from metanet.generate.flow import FlowMatching
from metanet.tasks.generation import GenerationError, GenerationTask

__all__ = ["FlowGenerationTask"]


class FlowGenerationTask(GenerationTask):
    """Flow matching in weight space (DeepWeightFlow).

    Args:
        backbone: ``"mlp"`` (:class:`ResidualMLP`) or ``"transformer"`` (chunk tokens).
        hidden, depth: backbone width and depth.
        chunk, heads: transformer backbone only.
        dropout: backbone dropout.
        sigma_min: width of the data end of the probability path.
        prediction: ``"data"`` (the backbone predicts clean weights; default) or ``"velocity"``
            (see :mod:`metanet.generate.flow` for why data prediction is the default).
        sampler: ``"heun"`` (default) or ``"euler"``.
        (other arguments: :class:`GenerationTask`)
    """

    generator_kind = "flow"
    # checkpoints written before ``prediction`` existed regressed the velocity
    legacy_hparams: dict[str, Any] = {"prediction": "velocity"}

    def __init__(
        self,
        backbone: str = "mlp",
        hidden: int = 512,
        depth: int = 4,
        chunk: int = 64,
        heads: int = 4,
        dropout: float = 0.0,
        sigma_min: float = 0.0,
        prediction: str = "data",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        cosine: bool = True,
        cond_dropout: float = 0.1,
        sampler: str = "heun",
        sample_steps: int = 32,
        guidance: float = 1.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(
            lr, weight_decay, cosine, cond_dropout, sampler, sample_steps, guidance, temperature
        )
        if sampler not in ("euler", "heun"):
            raise GenerationError(f"flow sampler must be 'euler' or 'heun', got {sampler!r}")
        self.save_hyperparameters()
        try:
            self.flow = FlowMatching(sigma_min, prediction)
        except ValueError as err:
            raise GenerationError(str(err)) from None
        self.net: torch.nn.Module | None = None

    def _build_nets(self, dim: int, num_conditions: int) -> None:
        h = self.hparams
        kwargs: dict[str, Any] = {"hidden": h.hidden, "depth": h.depth, "dropout": h.dropout}
        if h.backbone == "transformer":
            kwargs.update(chunk=h.chunk, heads=h.heads)
        self.net = build_backbone(h.backbone, dim, num_conditions, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, c = batch
        loss = self.flow.loss(self.net, x, self._drop_conditions(c))
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        opt, sched = self._optimizer(self.parameters())
        if sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def sample_vectors(self, c, steps, method, guidance, generator, temperature=1.0):
        return self.flow.sample(
            self.net,
            (len(c), int(self.info["dim"])),
            c,
            steps=steps,
            method=method,
            guidance=guidance,
            null_condition=self.null_condition,
            generator=generator,
            device=self.mean.device,
            temperature=temperature,
        )
