"""Flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023) on flat vectors.

Training pairs noise ``x_0 ~ N(0, I)`` with a data point ``x_1`` on the straight path
``x_t = (1 - (1 - sigma_min) t) x_0 + t x_1``. With ``prediction="data"`` (default) the model
predicts the clean end point ``x_1`` (loss: its squared error) and the velocity is derived from it,
``v = x1_hat - (1 - sigma_min) (x_t - t x1_hat) / (1 - (1 - sigma_min) t)``; with
``prediction="velocity"`` it regresses the path's velocity ``x_1 - (1 - sigma_min) x_0`` directly.

Why data prediction: the velocity contains ``-x_0``, a full-rank (identity-like) function of the
input, which a backbone with a narrow hidden layer (``D = 2778`` weights through ``hidden = 256``)
cannot represent, so velocity-trained samples kept most of their initial noise (generated digits
MLPs near chance). The clean weights of a zoo lie near a low-dimensional set that a narrow
backbone *can* output (JiT, Li & He 2025 make the same point for images). Sampling integrates
``dx/dt = v`` from ``t = 0`` to ``1`` with Euler or Heun steps. Classifier-free guidance mixes
conditional and null-condition model outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from metanet.generate.backbones import guided_output

__all__ = ["FlowMatching"]

SAMPLERS = ("euler", "heun")
PREDICTIONS = ("data", "velocity")


class FlowMatching(nn.Module):
    """Conditional flow matching with a linear (optimal-transport) path.

    Args:
        sigma_min: width of the data end of the path (0: rectified flow).
        prediction: ``"data"`` (the model outputs ``x_1``; default) or ``"velocity"``.
    """

    def __init__(self, sigma_min: float = 0.0, prediction: str = "data") -> None:
        super().__init__()
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.sigma_min = sigma_min
        self.prediction = prediction

    def loss(self, model: nn.Module, x1: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the prediction (``x_1`` or the velocity) at uniform times."""
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=x1.device)
        tt = t.view(-1, *([1] * (x1.dim() - 1)))
        xt = (1 - (1 - self.sigma_min) * tt) * x0 + tt * x1
        if self.prediction == "data":
            target = x1
        else:
            target = x1 - (1 - self.sigma_min) * x0
        return torch.mean((model(xt, t, c) - target) ** 2)

    def velocity(
        self,
        model: nn.Module,
        x: torch.Tensor,
        t: float,
        c: torch.Tensor,
        guidance: float = 1.0,
        null: int = 0,
    ) -> torch.Tensor:
        """The ODE's velocity ``[B, ...]`` at ``x`` and scalar time ``t`` (guided)."""
        out = guided_output(model, x, t, c, guidance, null)
        if self.prediction == "velocity":
            return out
        k = 1.0 - self.sigma_min
        x0 = (x - t * out) / max(1.0 - k * t, 1e-4)
        return out - k * x0

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        shape: tuple[int, ...],
        c: torch.Tensor,
        steps: int = 50,
        method: str = "heun",
        guidance: float = 1.0,
        null_condition: int = 0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Integrate the learned ODE from noise to ``shape[0]`` samples.

        Args:
            model: velocity field ``(x, t in [0,1], c) -> v``.
            shape: ``(B, *dims)``.
            c: ``[B]`` condition indices.
            steps: integration steps (Heun uses two model calls per step).
            method: ``"euler"`` or ``"heun"``.
            temperature: scale of the initial noise (< 1 trades diversity for typicality).
        """
        if method not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {method!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        x = temperature * torch.randn(shape, generator=generator, device=device)
        dt = 1.0 / steps
        for i in range(steps):
            t = i * dt
            v = self.velocity(model, x, t, c, guidance, null_condition)
            # with data prediction the Euler step onto t = 1 lands on the predicted x_1 (exactly
            # for sigma_min = 0); a Heun correction would evaluate the velocity at t = 1, where
            # deriving it from the prediction divides by ~0
            last = self.prediction == "data" and i == steps - 1
            if method == "euler" or last:
                x = x + dt * v
            else:
                x_e = x + dt * v
                v2 = self.velocity(model, x_e, t + dt, c, guidance, null_condition)
                x = x + 0.5 * dt * (v + v2)
        return x
