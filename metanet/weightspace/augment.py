"""Weight-space data augmentations (Shamsian et al. 2023, "Data Augmentations in Deep Weight
Spaces"), as transforms on batches of networks.

Every transform takes a :class:`WeightSpace` batch ``[B, ...]`` and, optionally, the batch's targets
``[B]`` (or ``[B, C]``), and returns new ones: ``ws = t(ws)`` or ``ws, y = t(ws, y)``. The
DataModules of :mod:`metanet.data.datamodules` call them on every training batch.

* :class:`RandomPermutation` - a fresh random hidden-neuron permutation per network (the function
  of every network is unchanged).
* :class:`ReLUScale` - positive per-neuron rescaling (function unchanged for ReLU / LeakyReLU
  networks without norm layers; do not use it on tanh/sine networks).
* :class:`RandomSignFlip` - flip the sign of random hidden neurons (function unchanged for
  networks with odd activations: SIRENs, tanh networks; not for ReLU).
* :class:`GaussianNoise` - additive noise, per layer relative to that layer's weight std.
* :class:`WeightDropout` - zeroes each weight with probability ``p``.
* :class:`RandomInputAffine` - for coordinate networks (INRs): rotate, zoom and shift the input,
  exactly, in the first layer's weights (:mod:`metanet.weightspace.input_transform`). The
  function changes (the image is rotated / zoomed / shifted) and the class label does not.
* :class:`AlignedMixUp` - weight-space MixUp: each network is paired with another network of the
  batch, the partner is aligned to it by Git Re-Basin weight matching, and both weights and targets
  are interpolated with ``lam ~ Beta(alpha, alpha)``.

Randomness comes from ``generator`` when given, else from torch's global RNG (which DataLoader
seeds differently in every worker).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from metanet.weightspace.align import interpolate, weight_matching
from metanet.weightspace.input_transform import affine_input, random_affine
from metanet.weightspace.space import WeightSpace
from metanet.weightspace.spec import WeightSpaceError
from metanet.weightspace.symmetry import (
    flip_signs,
    permute,
    random_relu_scale,
    random_signs,
    relu_scale,
)

__all__ = [
    "AlignedMixUp",
    "Compose",
    "GaussianNoise",
    "RandomInputAffine",
    "RandomPermutation",
    "RandomSignFlip",
    "ReLUScale",
    "WeightDropout",
    "WeightSpaceTransform",
]

Target = torch.Tensor | None


class WeightSpaceTransform:
    """Base class: subclasses implement :meth:`apply`.

    ``t(ws)`` returns the new WeightSpace; ``t(ws, target)`` returns ``(ws, target)``.
    """

    def apply(
        self, ws: WeightSpace, target: Target, generator: torch.Generator | None
    ) -> tuple[WeightSpace, Target]:
        raise NotImplementedError

    def __call__(
        self, ws: WeightSpace, target: Target = None, generator: torch.Generator | None = None
    ):
        if not isinstance(ws, WeightSpace):
            raise TypeError(f"{type(self).__name__} expects a WeightSpace, got {type(ws).__name__}")
        out, new_target = self.apply(ws, target, generator)
        return out if target is None else (out, new_target)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Compose(WeightSpaceTransform):
    """Apply ``transforms`` in order."""

    def __init__(self, transforms: Sequence[WeightSpaceTransform]) -> None:
        self.transforms = list(transforms)

    def apply(self, ws, target, generator):
        for t in self.transforms:
            ws, target = t.apply(ws, target, generator)
        return ws, target


def _batch_perms(sizes: Sequence[int], batch: int, generator) -> list[torch.Tensor]:
    return [torch.rand(batch, n, generator=generator).argsort(dim=1) for n in sizes]


class RandomPermutation(WeightSpaceTransform):
    """Permute the hidden neurons of every network independently (function-preserving)."""

    def apply(self, ws, target, generator):
        return permute(ws, _batch_perms(ws.spec.perm_sizes, len(ws), generator)), target


class ReLUScale(WeightSpaceTransform):
    """Multiply each hidden neuron's incoming weights and bias by ``s ~ LogUniform(low, high)`` and
    divide its outgoing weights by ``s`` (function-preserving for positively homogeneous
    activations such as ReLU)."""

    def __init__(self, low: float = 0.5, high: float = 2.0) -> None:
        if not 0 < low <= high:
            raise ValueError(f"need 0 < low <= high, got low={low}, high={high}")
        self.low, self.high = float(low), float(high)

    def apply(self, ws, target, generator):
        scales = random_relu_scale(ws.spec, len(ws), self.low, self.high, generator=generator)
        return relu_scale(ws, scales), target


class RandomSignFlip(WeightSpaceTransform):
    """Flip each hidden neuron's sign (incoming weights, bias and outgoing weights times -1) with
    probability 1/2, independently per network (:func:`metanet.weightspace.symmetry.flip_signs`;
    function-preserving for odd activations such as sine and tanh)."""

    def apply(self, ws, target, generator):
        return flip_signs(ws, random_signs(ws.spec, len(ws), generator)), target


def _layer_std(t: torch.Tensor) -> torch.Tensor:
    """Per-network std of a ``[B, ...]`` tensor, shaped to broadcast against it."""
    flat = t.flatten(1)
    std = flat.std(dim=1, unbiased=False) if flat.shape[1] > 1 else flat.abs().mean(dim=1)
    return std.reshape(-1, *([1] * (t.dim() - 1)))


class GaussianNoise(WeightSpaceTransform):
    """Add ``N(0, (sigma * std_l)^2)`` to every weight and bias of layer ``l``, where ``std_l`` is
    that network's std of the layer's weights (biases: of its biases; of its weights when the layer
    has a single bias). Absent biases stay zero."""

    def __init__(self, sigma: float = 0.1, biases: bool = True) -> None:
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma, self.biases = float(sigma), biases

    def apply(self, ws, target, generator):
        weights, biases = [], []
        for layer, w, b in zip(ws.spec.layers, ws.weights, ws.biases):
            w_std = _layer_std(w)
            noise = torch.randn(w.shape, generator=generator, dtype=w.dtype)
            weights.append(w + self.sigma * w_std * noise.to(w.device))
            if self.biases and layer.has_bias:
                b_std = _layer_std(b) if b.shape[1] > 1 else w_std.reshape(-1, 1)
                noise = torch.randn(b.shape, generator=generator, dtype=b.dtype)
                b = b + self.sigma * b_std * noise.to(b.device)
            biases.append(b)
        return WeightSpace(ws.spec, weights, biases), target


class WeightDropout(WeightSpaceTransform):
    """Set each weight (and, with ``biases=True``, each bias) to zero with probability ``p``;
    ``rescale=True`` multiplies the kept ones by ``1 / (1 - p)`` as in activation dropout."""

    def __init__(self, p: float = 0.1, biases: bool = False, rescale: bool = False) -> None:
        if not 0 <= p < 1:
            raise ValueError(f"p must be in [0, 1), got {p}")
        self.p, self.biases, self.rescale = float(p), biases, rescale

    def _drop(self, t: torch.Tensor, generator) -> torch.Tensor:
        keep = (torch.rand(t.shape, generator=generator) >= self.p).to(t.device, t.dtype)
        out = t * keep
        return out / (1 - self.p) if self.rescale else out

    def apply(self, ws, target, generator):
        weights = [self._drop(w, generator) for w in ws.weights]
        biases = [self._drop(b, generator) if self.biases else b for b in ws.biases]
        return WeightSpace(ws.spec, weights, biases), target


class RandomInputAffine(WeightSpaceTransform):
    """Compose every coordinate network with its own random affine map of the input:
    ``g(x) = f(s R(theta) x + t)``, made exactly in the first layer (``W0 <- s W0 R``,
    ``b0 <- b0 + W0 t``; see :func:`metanet.weightspace.input_transform.affine_input`).

    For INRs of images this is rotating, zooming and shifting the image, the weight-space
    counterpart of image augmentation. DWSNets' INR augmentation draws rotations of up to 45
    degrees, a first-layer scale of 1 +- 0.2 and a shift into the first bias.

    Args:
        degrees: rotation angle ``theta ~ U(-degrees, degrees)`` (needs 2-D coordinates).
        translate: every coordinate of ``t`` is ``U(-translate, translate)`` (in input units:
            on the ``[-1, 1]`` pixel grid 0.25 is an eighth of the image).
        scale: ``s ~ U(low, high)``.
    """

    def __init__(
        self, degrees: float = 45.0, translate: float = 0.25, scale: Sequence[float] = (0.8, 1.2)
    ) -> None:
        low, high = (float(v) for v in scale)
        random_affine(1, 2, degrees, translate, (low, high))  # validates the ranges
        self.degrees, self.translate, self.scale = float(degrees), float(translate), (low, high)

    def apply(self, ws, target, generator):
        dim = ws.spec.layers[0].in_features
        matrix, offset = random_affine(
            len(ws), dim, self.degrees, self.translate, self.scale, generator
        )
        return affine_input(ws, matrix, offset if self.translate > 0 else None), target


class AlignedMixUp(WeightSpaceTransform):
    """Weight-space MixUp after alignment.

    Each network ``i`` is paired with another network ``j = pi(i)`` of the same batch (``pi`` a
    random cyclic pairing); network ``j`` is aligned to ``i`` by :func:`weight_matching` (unless
    ``align=False``), then ``w_i <- (1 - lam_i) w_i + lam_i * aligned(w_j)`` and the targets alike,
    with ``lam_i ~ Beta(alpha, alpha)``. Integer class targets become soft ``[B, num_classes]``
    targets (``num_classes`` required); float targets ``[B]`` or ``[B, C]`` are mixed directly.

    Args:
        alpha: Beta distribution parameter (small alpha: lam near 0 or 1).
        align: align partners by weight matching first (the point of the method).
        max_iter: weight-matching sweeps per pair.
        num_classes: classes of integer targets.
    """

    def __init__(
        self,
        alpha: float = 0.4,
        align: bool = True,
        max_iter: int = 20,
        num_classes: int | None = None,
    ) -> None:
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha, self.align, self.max_iter, self.num_classes = (
            float(alpha),
            align,
            int(max_iter),
            num_classes,
        )

    def _partners(self, ws: WeightSpace, partner: torch.Tensor, seeds: np.ndarray) -> WeightSpace:
        if not self.align:
            return ws[partner]
        parts = []
        for i, j in enumerate(partner.tolist()):
            b = ws[j]
            if i != j:
                perms = weight_matching(ws[i], b, max_iter=self.max_iter, seed=int(seeds[i]))
                b = permute(b, perms)
            parts.append(b)
        return WeightSpace.cat(parts)

    def apply(self, ws, target, generator):
        n = len(ws)
        # a random cyclic pairing: nobody is paired with itself (unless the batch has one net)
        order = torch.randperm(n, generator=generator)
        partner = torch.empty(n, dtype=torch.long)
        partner[order] = order.roll(-1)
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        lam = torch.from_numpy(rng.beta(self.alpha, self.alpha, size=n)).to(torch.float32)
        mixed = interpolate(ws, self._partners(ws, partner, rng.integers(0, 2**31, n)), lam)
        if target is None:
            return mixed, None
        y = target
        if not torch.is_floating_point(y):
            if self.num_classes is None:
                raise WeightSpaceError(
                    "AlignedMixUp got integer (class) targets: pass num_classes to mix them as "
                    "soft labels"
                )
            y = torch.nn.functional.one_hot(y.long(), self.num_classes).to(torch.float32)
        lam_y = lam.to(y).reshape(-1, *([1] * (y.dim() - 1)))
        return mixed, (1 - lam_y) * y + lam_y * y[partner.to(y.device)]
