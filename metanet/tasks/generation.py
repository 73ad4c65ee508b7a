"""Weight generators as LightningModules (``metanet fit --config configs/generate/...``): the
shared base :class:`GenerationTask` (data, conditions, standardization, sampling, checkpoint
payload; :func:`metanet.tasks.generators.load_generator` reads any of them back); one module
per generator:

* :class:`~metanet.tasks.flow_generation.FlowGenerationTask`:
  flow matching directly on (canonicalized, standardized) flat weights
  (DeepWeightFlow); the backbone (residual MLP or a transformer over chunk tokens) predicts the
  clean weights and the ODE's velocity is derived from that prediction; Euler/Heun ODE sampler.
* :class:`~metanet.tasks.latent_diffusion.LatentDiffusionTask`:
  p-diff / D2NWG: a parameter autoencoder (first ``ae_fraction`` of
  the steps) and then a DDPM in its latent space (the rest; the denoiser predicts clean latents
  by default), DDPM or DDIM sampling.

Both read :class:`metanet.generate.data.GeneratorDataModule` and support conditioning on the data
module's condition vocabulary (classifier-free guidance: the condition is dropped with
probability ``cond_dropout`` in training). Checkpoints carry ``checkpoint["metanet"]`` with the
task name ``"generation"``, the target architecture (arch dict and :class:`WeightSpaceSpec`), the
condition vocabulary, the classes of each condition's task, the zoo it was trained on and, for
networks without a weight space, their flat parameter layout (``info["layout"]``:
:class:`metanet.generate.data.FlatLayout`, read by :func:`metanet.generate.data.network_layout`),
so :func:`metanet.tasks.generators.load_generator` rebuilds a generator without the data and
``metanet generate`` writes networks that load into ``build_module(arch)``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from metanet.weightspace import WeightSpace, WeightSpaceSpec

__all__ = [
    "GenerationError",
    "GenerationTask",
]

TASK_NAME = "generation"
PAYLOAD_KEY = "metanet"
PAYLOAD_VERSION = 1
_INFO_FROM_DM = ("conditions", "task_classes", "zoo_info", "reference_index")


class GenerationError(ValueError):
    """Bad input to a generator (unknown condition, foreign checkpoint, n <= 0, ...)."""


class GenerationTask(L.LightningModule):
    """Base of the weight generators: data description, normalization, conditions, sampling.

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        cosine: anneal the learning rate to 0 over ``trainer.max_steps`` (per step).
        cond_dropout: probability of replacing the condition by the null condition in training.
        sampler: default sampler of :meth:`sample`.
        sample_steps: default number of sampler steps.
        guidance: default classifier-free guidance weight (1: none).
        temperature: default scale of the sampler's noise (1: the learned distribution).
    """

    task_name = TASK_NAME
    generator_kind = ""
    legacy_hparams: dict[str, Any] = {}

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        cosine: bool = True,
        cond_dropout: float = 0.1,
        sampler: str = "",
        sample_steps: int = 50,
        guidance: float = 1.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise GenerationError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= cond_dropout < 1.0:
            raise GenerationError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        if sample_steps < 1:
            raise GenerationError(f"sample_steps must be >= 1, got {sample_steps}")
        self.info: dict[str, Any] | None = None
        self.spec: WeightSpaceSpec | None = None

    # -- building -------------------------------------------------------------------------------
    def build(self, info: dict[str, Any]) -> None:
        """Create buffers and networks for data described by ``info`` (plain python)."""
        if self.info is not None:
            return
        self.info = copy.deepcopy(info)
        self.spec = WeightSpaceSpec.from_dict(info["spec"])
        dim = int(info["dim"])
        if dim != self.spec.num_params:
            raise GenerationError(f"dim {dim} does not match the spec's {self.spec.num_params}")
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("reference", torch.zeros(dim))
        self._build_nets(dim, len(info["conditions"]))

    def _build_nets(self, dim: int, num_conditions: int) -> None:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if self.info is not None:
            return
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "vectors"):
            raise GenerationError(
                f"{type(self).__name__} needs a metanet.generate.data.GeneratorDataModule"
            )
        dm.setup(stage)
        info = {k: copy.deepcopy(getattr(dm, k)) for k in _INFO_FROM_DM}
        info.update(
            spec=dm.spec.to_dict(),
            arch=dict(dm.arch),
            dim=int(dm.dim),
            canonicalized=bool(dm.canonicalize),
            normalize=str(dm.normalize),
            condition_name=dm.condition,
        )
        held = getattr(dm, "holdout_records", None)
        if held is not None and len(held):  # zoo records the generator never saw
            info["holdout_records"] = [int(i) for i in held]
        layout = getattr(dm, "layout", None)
        if layout is not None:  # a flat parameter layout (network_layout(info) reads it back)
            info["layout"] = layout.to_dict()
        self.build(info)
        self.mean.copy_(dm.mean)
        self.std.copy_(dm.std)
        self.reference.copy_(dm.reference_vector)

    # -- conditions -----------------------------------------------------------------------------
    @property
    def conditions(self) -> list[str]:
        """The condition vocabulary (empty for an unconditional generator)."""
        self._require_built()
        return list(self.info["conditions"])

    @property
    def null_condition(self) -> int:
        return len(self.conditions)

    def condition_indices(self, n: int, condition: str | Sequence[str] | None) -> torch.Tensor:
        """``[n]`` condition indices: ``condition`` for all, or every condition in turn if None.

        Raises:
            GenerationError: a condition outside the vocabulary, a condition for an
                unconditional generator, ``n <= 0``.
        """
        if not isinstance(n, int) or n <= 0:
            raise GenerationError(f"n must be a positive integer, got {n!r}")
        vocab = self.conditions
        if condition is None:
            if not vocab:
                return torch.zeros(n, dtype=torch.long)
            return torch.arange(n) % len(vocab)
        names = [condition] if isinstance(condition, str) else list(condition)
        if not vocab:
            raise GenerationError(f"this generator is unconditional; got condition(s) {names}")
        unknown = [c for c in names if c not in vocab]
        if unknown:
            raise GenerationError(
                f"unknown condition(s) {unknown}; this generator was trained with {vocab}"
            )
        idx = torch.tensor([vocab.index(c) for c in names])
        return idx[torch.arange(n) % len(idx)]

    def _drop_conditions(self, c: torch.Tensor) -> torch.Tensor:
        p = float(self.hparams.cond_dropout)
        if not self.conditions or p <= 0:
            return c if self.conditions else torch.full_like(c, self.null_condition)
        drop = torch.rand(c.shape, device=c.device) < p
        return torch.where(drop, torch.full_like(c, self.null_condition), c)

    # -- sampling -------------------------------------------------------------------------------
    def _require_built(self) -> None:
        if self.info is None:
            raise GenerationError(f"{type(self).__name__} is not built (no data / checkpoint yet)")

    def sample_vectors(
        self,
        c: torch.Tensor,
        steps: int,
        method: str,
        guidance: float,
        generator: torch.Generator | None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Normalized samples ``[len(c), D]`` for condition indices ``c``."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self,
        n: int,
        condition: str | Sequence[str] | None = None,
        steps: int | None = None,
        method: str | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        batch_size: int = 512,
        temperature: float | None = None,
    ) -> tuple[WeightSpace, list[str | None]]:
        """Draw ``n`` networks of the target architecture.

        Args:
            n: networks to draw.
            condition: a condition name, a list cycled over, or None (unconditional / every
                condition in turn).
            steps, method, guidance, temperature: sampler settings (default: the task's).
            seed: seeds the sampler's noise.
            batch_size: networks per sampler call.

        Returns:
            ``(WeightSpace of n networks in raw weight units, condition name per network)``.
        """
        self._require_built()
        c = self.condition_indices(n, condition)
        steps = int(steps or self.hparams.sample_steps)
        method = method or self.hparams.sampler
        guidance = float(self.hparams.guidance if guidance is None else guidance)
        temperature = float(self.hparams.temperature if temperature is None else temperature)
        if temperature <= 0:
            raise GenerationError(f"temperature must be > 0, got {temperature}")
        if guidance != 1.0 and not self.conditions:
            raise GenerationError("guidance needs a conditional generator")
        gen = torch.Generator(device=self.mean.device)
        gen.manual_seed(int(seed) if seed is not None else torch.seed() % (2**63))
        was_training = self.training
        self.eval()
        try:
            parts = [
                self.sample_vectors(
                    c[i : i + batch_size].to(self.mean.device),
                    steps,
                    method,
                    guidance,
                    gen,
                    temperature,
                )
                for i in range(0, n, batch_size)
            ]
        finally:
            self.train(was_training)
        flat = torch.cat(parts) * self.std + self.mean
        vocab = self.conditions
        names = [vocab[int(i)] for i in c] if vocab else [None] * n
        return WeightSpace.unflatten(flat.float().cpu(), self.spec), names

    # -- optimization ---------------------------------------------------------------------------
    def _optimizer(self, params) -> Any:
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if not self.hparams.cosine:
            return opt, None
        total = (
            int(self.trainer.max_steps)
            if self.trainer.max_steps and self.trainer.max_steps > 0
            else int(self.trainer.estimated_stepping_batches)
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
        return opt, sched

    # -- checkpoints ----------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        """Plain-python description stored in checkpoints under ``"metanet"``."""
        self._require_built()
        return {
            "version": PAYLOAD_VERSION,
            "task": self.task_name,
            "generator": self.generator_kind,
            "task_class": f"{type(self).__module__}.{type(self).__qualname__}",
            "info": copy.deepcopy(self.info),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[PAYLOAD_KEY] = self.payload()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        payload = checkpoint.get(PAYLOAD_KEY)
        if not isinstance(payload, dict) or payload.get("task") != self.task_name:
            task = payload.get("task") if isinstance(payload, dict) else None
            raise GenerationError(
                f"not a weight-generator checkpoint (task {task!r}, expected '{self.task_name}')"
            )
        self.build(payload["info"])
