"""Networks that predict noise (DDPM) or velocity (flow matching) for flat vectors ``[B, D]``.

Both take ``(x [B, D], t [B] in [0, 1], c [B] condition index)`` and return ``[B, D]``:

* :class:`ResidualMLP`: pre-norm residual MLP blocks; time and condition embeddings are added to
  the hidden state of every block.
* :class:`TokenTransformer`: the vector is cut into ``chunk``-sized tokens (a layer-agnostic
  version of per-layer tokens), embedded with learned positions, and mixed by a transformer
  encoder; time and condition enter as an extra token.

Condition index ``num_conditions`` (one past the vocabulary) is the *null* condition used for
classifier-free guidance.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "BACKBONES",
    "ResidualMLP",
    "TokenTransformer",
    "build_backbone",
    "guided_output",
    "time_embedding",
]


def time_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` of times ``t [B]`` in ``[0, 1]`` (scaled by 1000)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class _Conditioning(nn.Module):
    """``(t [B], c [B]) -> [B, hidden]``: MLP of the time embedding plus a condition embedding."""

    def __init__(self, hidden: int, num_conditions: int) -> None:
        super().__init__()
        self.num_conditions = num_conditions
        self.time = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.cond = nn.Embedding(num_conditions + 1, hidden)
        nn.init.normal_(self.cond.weight, std=0.02)

    def forward(self, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.time(time_embedding(t, self.time[0].in_features)) + self.cond(c)


class _Block(nn.Module):
    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(
            nn.Linear(hidden, 2 * hidden),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(2 * hidden, hidden),
        )

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.ff(self.norm(h + emb))


class ResidualMLP(nn.Module):
    """Residual MLP over flat vectors.

    Args:
        dim: vector size ``D``.
        hidden: width of the residual stream.
        depth: residual blocks.
        num_conditions: size of the condition vocabulary (0: unconditional).
        dropout: dropout inside the blocks.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 512,
        depth: int = 4,
        num_conditions: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_conditions = num_conditions
        self.inp = nn.Linear(dim, hidden)
        self.emb = _Conditioning(hidden, num_conditions)
        self.blocks = nn.ModuleList(_Block(hidden, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``x [B, D]``, ``t [B]``, ``c [B]`` -> ``[B, D]``."""
        emb = self.emb(t, c)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(self.out_norm(h))


class TokenTransformer(nn.Module):
    """Transformer over ``chunk``-sized tokens of the flat vector.

    Args:
        dim: vector size ``D`` (padded to a multiple of ``chunk``).
        chunk: scalars per token.
        hidden: token width.
        depth: encoder layers.
        heads: attention heads.
        num_conditions: condition vocabulary size.
    """

    def __init__(
        self,
        dim: int,
        chunk: int = 64,
        hidden: int = 128,
        depth: int = 3,
        heads: int = 4,
        num_conditions: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim, self.chunk = dim, chunk
        self.num_conditions = num_conditions
        self.tokens = math.ceil(dim / chunk)
        self.inp = nn.Linear(chunk, hidden)
        self.pos = nn.Parameter(torch.randn(self.tokens + 1, hidden) * 0.02)
        self.emb = _Conditioning(hidden, num_conditions)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, 2 * hidden, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, chunk)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``x [B, D]``, ``t [B]``, ``c [B]`` -> ``[B, D]``."""
        b = x.shape[0]
        pad = self.tokens * self.chunk - self.dim
        tok = nn.functional.pad(x, (0, pad)).view(b, self.tokens, self.chunk)
        h = torch.cat([self.emb(t, c)[:, None], self.inp(tok)], dim=1) + self.pos
        h = self.encoder(h)[:, 1:]
        return self.out(self.out_norm(h)).reshape(b, -1)[:, : self.dim]


BACKBONES = {"mlp": ResidualMLP, "transformer": TokenTransformer}


def build_backbone(kind: str, dim: int, num_conditions: int, **kwargs) -> nn.Module:
    """A backbone by name (``"mlp"`` or ``"transformer"``) for vectors of size ``dim``."""
    if kind not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {kind!r}")
    return BACKBONES[kind](dim, num_conditions=num_conditions, **kwargs)


def guided_output(
    model: nn.Module, x: torch.Tensor, t: float, c: torch.Tensor, guidance: float, null: int
) -> torch.Tensor:
    """``model(x, t, c)`` with classifier-free guidance: ``u + guidance * (model(c) - u)`` where
    ``u`` is the output for the null condition ``null`` (one batched call; ``guidance == 1`` is
    the plain conditional output). ``x`` ``[B, ...]``, ``t`` a scalar time, ``c`` ``[B]``."""
    tt = torch.full((x.shape[0],), t, device=x.device)
    if guidance == 1.0:
        return model(x, tt, c)
    both = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([c, torch.full_like(c, null)]))
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)
