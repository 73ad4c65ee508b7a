"""Latent diffusion over a parameter autoencoder as a LightningModule (p-diff, D2NWG;
``configs/generate/latent-diffusion*.yaml``).

The shared data, condition, standardization and checkpoint logic is
:class:`metanet.tasks.generation.GenerationTask`'s.
"""

from __future__ import annotations

from typing import Any

import torch

from metanet.generate.autoencoder import ParamAutoencoder
from metanet.generate.backbones import ResidualMLP
from metanet.generate.diffusion import GaussianDiffusion
from metanet.tasks.generation import GenerationError, GenerationTask

__all__ = ["LatentDiffusionTask"]


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
