"""Weight generators as LightningModules (``metanet fit --config configs/generate/...``).

* :class:`FlowGenerationTask`: flow matching directly on (canonicalized, standardized) flat weights
  (DeepWeightFlow); the backbone (residual MLP or a transformer over chunk tokens) predicts the
  clean weights and the ODE's velocity is derived from that prediction; Euler/Heun ODE sampler.
* :class:`LatentDiffusionTask`: p-diff / D2NWG: a parameter autoencoder (first ``ae_fraction`` of
  the steps) and then a DDPM in its latent space (the rest; the denoiser predicts clean latents
  by default), DDPM or DDIM sampling.

Both read :class:`metanet.generate.data.GeneratorDataModule` and support conditioning on the data
module's condition vocabulary (classifier-free guidance: the condition is dropped with
probability ``cond_dropout`` in training). Checkpoints carry ``checkpoint["metanet"]`` with the
task name ``"generation"``, the target architecture (arch dict and :class:`WeightSpaceSpec`), the
condition vocabulary, the classes of each condition's task, the zoo it was trained on and, for
networks without a weight space, their flat parameter layout (``info["layout"]``:
:class:`metanet.generate.data.FlatLayout`, read by :func:`metanet.generate.data.network_layout`),
so :func:`load_generator` rebuilds a generator without the data and ``metanet generate`` writes
networks that load into ``build_module(arch)``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from metanet.generate.autoencoder import ParamAutoencoder
from metanet.generate.backbones import ResidualMLP, build_backbone
from metanet.generate.diffusion import GaussianDiffusion
from metanet.generate.flow import FlowMatching
from metanet.weightspace import WeightSpace, WeightSpaceSpec

__all__ = [
    "FlowGenerationTask",
    "GenerationError",
    "GenerationTask",
    "LatentDiffusionTask",
    "load_generator",
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


class LatentDiffusionTask(GenerationTask):
    """Latent diffusion over a parameter autoencoder (p-diff; D2NWG when conditioned).

    Training has two phases in one ``fit``: the autoencoder for the first ``ae_fraction`` of
    ``trainer.max_steps``, then the DDPM on the (frozen) encoder's standardized latents.

    Args:
        chunk, ae_hidden, latent, ae_depth, heads: :class:`ParamAutoencoder` sizes.
        ae_mixer: ``"mlp"`` (default) or ``"transformer"`` autoencoder.
        input_noise, latent_noise: the autoencoder's training noise.
        ae_fraction: share of the steps spent on the autoencoder.
        ae_lr: autoencoder learning rate.
        timesteps, schedule: DDPM steps ``T`` and noise schedule (``"cosine"`` / ``"linear"``).
        prediction: what the denoiser predicts: ``"x0"`` (default), ``"v"`` or ``"eps"`` (see
            :mod:`metanet.generate.diffusion`).
        hidden, depth, dropout: the latent denoiser (:class:`ResidualMLP`).
        sampler: ``"ddim"`` (default) or ``"ddpm"``.
        clip: clamp predicted standardized latents to ``[-clip, clip]`` while sampling.
        (other arguments: :class:`GenerationTask`)
    """

    generator_kind = "latent_diffusion"
    # checkpoints written before ``prediction`` existed predicted the noise and (ignoring
    # ``ae_mixer``) always built the transformer autoencoder
    legacy_hparams: dict[str, Any] = {"prediction": "eps", "ae_mixer": "transformer"}

    def __init__(
        self,
        chunk: int = 64,
        ae_hidden: int = 512,
        latent: int = 8,
        ae_mixer: str = "mlp",
        ae_depth: int = 2,
        heads: int = 4,
        input_noise: float = 0.001,
        latent_noise: float = 0.1,
        ae_fraction: float = 0.4,
        ae_lr: float = 1e-3,
        timesteps: int = 1000,
        schedule: str = "cosine",
        prediction: str = "x0",
        hidden: int = 512,
        depth: int = 4,
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        cosine: bool = True,
        cond_dropout: float = 0.1,
        sampler: str = "ddim",
        sample_steps: int = 50,
        guidance: float = 1.0,
        temperature: float = 1.0,
        clip: float | None = 5.0,
    ) -> None:
        super().__init__(
            lr, weight_decay, cosine, cond_dropout, sampler, sample_steps, guidance, temperature
        )
        if sampler not in ("ddpm", "ddim"):
            raise GenerationError(f"diffusion sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        if ae_mixer not in ("mlp", "transformer"):
            raise GenerationError(f"ae_mixer must be 'mlp' or 'transformer', got {ae_mixer!r}")
        if not 0.0 < ae_fraction < 1.0:
            raise GenerationError(f"ae_fraction must be in (0, 1), got {ae_fraction}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        try:
            self.diffusion = GaussianDiffusion(timesteps, schedule, prediction)
        except ValueError as err:
            raise GenerationError(str(err)) from None
        self.ae: ParamAutoencoder | None = None
        self.denoiser: ResidualMLP | None = None

    def _build_nets(self, dim: int, num_conditions: int) -> None:
        h = self.hparams
        self.ae = ParamAutoencoder(
            dim,
            chunk=h.chunk,
            hidden=h.ae_hidden,
            latent=h.latent,
            depth=h.ae_depth,
            heads=h.heads,
            input_noise=h.input_noise,
            latent_noise=h.latent_noise,
            mixer=h.ae_mixer,
        )
        zdim = self.ae.tokens * self.ae.latent
        self.denoiser = ResidualMLP(
            zdim, hidden=h.hidden, depth=h.depth, num_conditions=num_conditions, dropout=h.dropout
        )
        self.register_buffer("latent_mean", torch.zeros(zdim))
        self.register_buffer("latent_std", torch.ones(zdim))
        self.register_buffer("latent_ready", torch.tensor(False))

    def configure_optimizers(self) -> Any:
        h = self.hparams
        opt_ae = torch.optim.AdamW(self.ae.parameters(), lr=h.ae_lr, weight_decay=h.weight_decay)
        opt_diff, sched = self._optimizer(self.denoiser.parameters())
        if sched is None:
            return [opt_ae, opt_diff]
        return [opt_ae, opt_diff], [{"scheduler": sched, "interval": "step"}]

    def _ae_steps(self) -> int:
        total = self.trainer.max_steps
        if not total or total < 0:
            total = int(self.trainer.estimated_stepping_batches)
        return max(1, int(round(self.hparams.ae_fraction * total)))

    @torch.no_grad()
    def _latent_stats(self) -> None:
        dm = self.trainer.datamodule
        x = dm.vectors.to(self.mean.device)
        z = torch.cat([self.ae.encode(x[i : i + 256]).flatten(1) for i in range(0, len(x), 256)])
        self.latent_mean.copy_(z.mean(0))
        self.latent_std.copy_(z.std(0).clamp_min(1e-4) if len(z) > 1 else torch.ones_like(z[0]))
        self.latent_ready.fill_(True)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Standardized flat latents ``[B, T * latent]`` of normalized weights ``x [B, D]``."""
        return (self.ae.encode(x).flatten(1) - self.latent_mean) / self.latent_std

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, c = batch
        opt_ae, opt_diff = self.optimizers()
        if self.trainer.global_step < self._ae_steps():
            loss = self.ae.loss(x)
            opt_ae.zero_grad()
            self.manual_backward(loss)
            opt_ae.step()
            self.log("train/ae_loss", loss, prog_bar=True, batch_size=x.shape[0])
            return
        if not bool(self.latent_ready):
            self._latent_stats()
        with torch.no_grad():
            z = self.encode_latents(x)
        loss = self.diffusion.loss(self.denoiser, z, self._drop_conditions(c))
        opt_diff.zero_grad()
        self.manual_backward(loss)
        opt_diff.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        self.log("train/diffusion_loss", loss, prog_bar=True, batch_size=x.shape[0])

    def sample_vectors(self, c, steps, method, guidance, generator, temperature=1.0):
        if not bool(self.latent_ready):
            raise GenerationError(
                "the latent diffusion phase never ran (train longer or lower ae_fraction)"
            )
        clip = self.hparams.clip
        z = self.diffusion.sample(
            self.denoiser,
            (len(c), self.latent_mean.numel()),
            c,
            steps=steps,
            method=method,
            guidance=guidance,
            null_condition=self.null_condition,
            generator=generator,
            clip=clip,
            temperature=temperature,
        )
        z = z * self.latent_std + self.latent_mean
        return self.ae.decode(z.view(len(c), *self.ae.latent_shape))


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
_GENERATOR_CLASSES = {
    f"{cls.__module__}.{cls.__qualname__}": cls for cls in (FlowGenerationTask, LatentDiffusionTask)
}


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
    cls = _GENERATOR_CLASSES.get(str(payload.get("task_class")))
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
