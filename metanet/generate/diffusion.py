"""DDPM (Ho et al. 2020) on flat vectors: noise schedules, the denoising loss, and DDPM /
DDIM (Song et al. 2021) sampling.

The forward process is ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` for ``t = 0..T-1``. The
model ``f_theta(x_t, t / T, c)`` predicts (``prediction``) the noise ``eps`` (Ho et al.), the clean
sample ``x_0`` (the default), or the velocity ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0``
(Salimans & Ho 2022). ``eps`` prediction is unstable at the noisiest steps of a cosine schedule
(``abar_T ~ 1e-8``: ``x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)`` multiplies the model's error
by ``1e4``), which made DDIM samples diverge; ``v`` and ``x0`` stay bounded at every step, and
``x0`` learned the latents of a digits-MLP zoo fastest. The training loss is the mean squared error
of the predicted quantity. Sampling runs the reverse chain with the posterior variance (DDPM, all
``T`` steps or a strided subset) or deterministically (DDIM, ``eta = 0``). Classifier-free
guidance mixes conditional and null-condition outputs: ``f = f_null + w (f_cond - f_null)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from metanet.generate.backbones import guided_output

__all__ = ["GaussianDiffusion", "make_betas"]

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "ddim")
PREDICTIONS = ("eps", "x0", "v")


def make_betas(num_steps: int, kind: str = "cosine") -> torch.Tensor:
    """``[T]`` noise variances: ``"linear"`` (1e-4 .. 0.02 scaled to ``T``) or ``"cosine"``
    (Nichol & Dhariwal 2021, clipped at 0.999)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if kind == "linear":
        scale = 1000.0 / num_steps
        return torch.linspace(
            scale * 1e-4, min(scale * 0.02, 0.999), num_steps, dtype=torch.float64
        )
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")


class GaussianDiffusion(nn.Module):
    """The diffusion process (no learnable parameters; buffers only).

    Args:
        num_steps: ``T``, diffusion steps in training.
        schedule: ``"cosine"`` or ``"linear"``.
        prediction: what the model predicts: ``"x0"`` (default), ``"v"`` or ``"eps"``.
    """

    def __init__(
        self, num_steps: int = 1000, schedule: str = "cosine", prediction: str = "x0"
    ) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction
        betas = make_betas(num_steps, schedule)
        abar = torch.cumprod(1 - betas, 0)
        self.num_steps = num_steps
        self.schedule = schedule
        self.register_buffer("betas", betas.float())
        self.register_buffer("abar", abar.float())

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t`` for integer steps ``t [B]``."""
        a = self.abar[t].view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the model should output for ``x_t = q_sample(x0, t, noise)``."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a = self.abar[t].view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def loss(self, model: nn.Module, x0: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the predicted quantity at uniformly drawn steps."""
        t = torch.randint(0, self.num_steps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        pred = model(self.q_sample(x0, t, noise), t.float() / self.num_steps, c)
        return torch.mean((pred - self.target(x0, t, noise)) ** 2)

    def _x0_eps(
        self, model: nn.Module, x: torch.Tensor, t: int, c: torch.Tensor, guidance: float, null: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted ``(x_0, eps)`` at integer step ``t`` (guided model output converted)."""
        out = guided_output(model, x, t / self.num_steps, c, guidance, null)
        a = self.abar[t]
        if self.prediction == "eps":
            return (x - (1 - a).sqrt() * out) / a.sqrt(), out
        if self.prediction == "x0":
            return out, (x - a.sqrt() * out) / (1 - a).sqrt()
        return a.sqrt() * x - (1 - a).sqrt() * out, (1 - a).sqrt() * x + a.sqrt() * out

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        shape: tuple[int, ...],
        c: torch.Tensor,
        steps: int | None = None,
        method: str = "ddim",
        eta: float = 0.0,
        guidance: float = 1.0,
        null_condition: int = 0,
        generator: torch.Generator | None = None,
        clip: float | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Draw ``shape[0]`` samples.

        Args:
            model: ``(x, t in [0,1], c) ->`` the ``prediction`` of this process.
            shape: ``(B, *dims)``.
            c: ``[B]`` condition indices.
            steps: reverse steps (a strided subset of the ``T`` training steps; default ``T``).
            method: ``"ddpm"`` (stochastic, posterior variance) or ``"ddim"`` (``eta`` noise).
            guidance: classifier-free guidance weight (1: plain conditional sampling).
            null_condition: index of the null condition (for guidance).
            clip: clamp the predicted ``x_0`` to ``[-clip, clip]`` at every step.
            temperature: scale of the initial and per-step noise (< 1: less diverse samples).
        """
        if method not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {method!r}")
        steps = self.num_steps if steps is None else int(steps)
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps must be in 1..{self.num_steps}, got {steps}")
        device = self.abar.device
        ts = torch.linspace(self.num_steps - 1, 0, steps, dtype=torch.float64).round().long()
        ts = torch.unique_consecutive(ts).tolist()
        x = temperature * torch.randn(shape, generator=generator, device=device)
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            a_t = self.abar[t]
            a_prev = self.abar[t_prev] if t_prev >= 0 else torch.tensor(1.0, device=device)
            x0, eps = self._x0_eps(model, x, t, c, guidance, null_condition)
            if clip is not None:
                x0 = x0.clamp(-clip, clip)
                eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            if method == "ddpm":
                beta = 1 - a_t / a_prev  # effective beta of this (possibly strided) step
                mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + (
                    (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)
                ) * x
                var = beta * (1 - a_prev) / (1 - a_t)
            else:
                var = eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
                mean = a_prev.sqrt() * x0 + (1 - a_prev - var).clamp_min(0).sqrt() * eps
            if t_prev >= 0 and float(var) > 0:
                x = mean + temperature * var.sqrt() * torch.randn(
                    shape, generator=generator, device=device
                )
            else:
                x = mean
        return x
