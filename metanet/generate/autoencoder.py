"""The parameter autoencoder of latent weight diffusion (p-diff, Wang et al. 2024; D2NWG).

A flat, normalized weight vector ``[B, D]`` is cut into ``T = ceil(D / chunk)`` tokens of
``chunk`` scalars (zero-padded); the latent code has ``latent`` numbers per token,
``[B, T, latent]``. Two mixers: ``"transformer"`` embeds the tokens with learned positions, mixes
them with a small transformer and projects each token to its latent (the decoder mirrors it);
``"mlp"`` (cheaper on CPU, and better on small zoos) maps the whole padded vector through one
hidden layer to all latent tokens and back. In training, Gaussian noise is added to the input
(``input_noise``) and to the latent code (``latent_noise``), which p-diff found essential for the
decoder to produce working networks from imperfect latents.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ParamAutoencoder"]


def _encoder(hidden: int, depth: int, heads: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        hidden, heads, 2 * hidden, dropout=0.0, batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class ParamAutoencoder(nn.Module):
    """Chunked-token autoencoder for flat parameter vectors.

    Args:
        dim: ``D``, scalars per network.
        chunk: scalars per token.
        hidden: token width inside encoder and decoder.
        latent: latent numbers per token.
        depth: transformer layers in the encoder and in the decoder.
        heads: attention heads.
        input_noise: std of the noise added to inputs in training.
        latent_noise: std of the noise added to latent codes in training.
        mixer: ``"transformer"`` or ``"mlp"`` (see the module docstring).
    """

    def __init__(
        self,
        dim: int,
        chunk: int = 64,
        hidden: int = 128,
        latent: int = 8,
        depth: int = 2,
        heads: int = 4,
        input_noise: float = 0.001,
        latent_noise: float = 0.1,
        mixer: str = "transformer",
    ) -> None:
        super().__init__()
        if min(dim, chunk, hidden, latent, depth, heads) < 1:
            raise ValueError("dim, chunk, hidden, latent, depth and heads must be >= 1")
        if mixer not in ("transformer", "mlp"):
            raise ValueError(f"mixer must be 'transformer' or 'mlp', got {mixer!r}")
        self.mixer = mixer
        self.dim, self.chunk, self.latent = dim, chunk, latent
        self.tokens = math.ceil(dim / chunk)
        self.input_noise, self.latent_noise = input_noise, latent_noise
        if mixer == "mlp":
            padded, code = self.tokens * chunk, self.tokens * latent
            self.enc_mlp = nn.Sequential(
                nn.Linear(padded, hidden), nn.SiLU(), nn.LayerNorm(hidden), nn.Linear(hidden, code)
            )
            self.dec_mlp = nn.Sequential(
                nn.Linear(code, hidden), nn.SiLU(), nn.LayerNorm(hidden), nn.Linear(hidden, padded)
            )
            return
        self.enc_in = nn.Linear(chunk, hidden)
        self.enc_pos = nn.Parameter(torch.randn(self.tokens, hidden) * 0.02)
        self.enc = _encoder(hidden, depth, heads)
        self.enc_out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, latent))
        self.dec_in = nn.Linear(latent, hidden)
        self.dec_pos = nn.Parameter(torch.randn(self.tokens, hidden) * 0.02)
        self.dec = _encoder(hidden, depth, heads)
        self.dec_out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, chunk))

    @property
    def latent_shape(self) -> tuple[int, int]:
        """``(T, latent)``: the shape of one network's latent code."""
        return (self.tokens, self.latent)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D] -> [B, T, latent]``."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected [B, {self.dim}], got {tuple(x.shape)}")
        pad = self.tokens * self.chunk - self.dim
        tok = nn.functional.pad(x, (0, pad)).view(x.shape[0], self.tokens, self.chunk)
        if self.mixer == "mlp":
            return self.enc_mlp(tok.flatten(1)).view(x.shape[0], self.tokens, self.latent)
        return self.enc_out(self.enc(self.enc_in(tok) + self.enc_pos))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, T, latent] -> [B, D]``."""
        if self.mixer == "mlp":
            return self.dec_mlp(z.flatten(1))[:, : self.dim]
        h = self.dec(self.dec_in(z) + self.dec_pos)
        return self.dec_out(h).reshape(z.shape[0], -1)[:, : self.dim]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction ``[B, D]`` and latent ``[B, T, latent]``; noisy in training mode."""
        if self.training and self.input_noise > 0:
            x = x + self.input_noise * torch.randn_like(x)
        z = self.encode(x)
        zn = z + self.latent_noise * torch.randn_like(z) if self.training else z
        return self.decode(zn), z

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Mean squared reconstruction error (with the training noise)."""
        recon, _ = self(x)
        return torch.mean((recon - x) ** 2)
