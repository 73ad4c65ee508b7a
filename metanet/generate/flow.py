"""Flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023) on flat vectors.

Training pairs noise ``x_0 ~ N(0, I)`` with a data point ``x_1`` on the straight path
``x_t = (1 - (1 - sigma_min) t) x_0 + t x_1`` and regresses the model ``v_theta(x_t, t, c)`` on the
path's velocity ``x_1 - (1 - sigma_min) x_0``. Sampling integrates ``dx/dt = v_theta`` from
``t = 0`` to ``1`` with Euler or Heun steps. Classifier-free guidance mixes conditional and
null-condition velocities.
"""

from __future__ import annotations

import torch
from torch import nn

from metanet.generate.backbones import guided_output

__all__ = ["FlowMatching"]

SAMPLERS = ("euler", "heun")


class FlowMatching(nn.Module):
    """Conditional flow matching with a linear (optimal-transport) path.

    Args:
        sigma_min: width of the data end of the path (0: rectified flow).
    """

    def __init__(self, sigma_min: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
        self.sigma_min = sigma_min

    def loss(self, model: nn.Module, x1: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Mean squared velocity error at uniformly drawn times."""
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=x1.device)
        tt = t.view(-1, *([1] * (x1.dim() - 1)))
        xt = (1 - (1 - self.sigma_min) * tt) * x0 + tt * x1
        target = x1 - (1 - self.sigma_min) * x0
        return torch.mean((model(xt, t, c) - target) ** 2)

    @staticmethod
    def _velocity(
        model: nn.Module, x: torch.Tensor, t: float, c: torch.Tensor, guidance: float, null: int
    ) -> torch.Tensor:
        return guided_output(model, x, t, c, guidance, null)

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
            v = self._velocity(model, x, t, c, guidance, null_condition)
            if method == "euler":
                x = x + dt * v
            else:
                x_e = x + dt * v
                v2 = self._velocity(model, x_e, t + dt, c, guidance, null_condition)
                x = x + 0.5 * dt * (v + v2)
        return x
