"""Signals for implicit neural representations (INRs): each sample as coordinates -> values.

:class:`SignalData` turns images ``[N, C, H, W]`` of any size and channel count, volumes, or 1-D
signals ``[N, L]`` / ``[N, C, L]`` into one coordinate grid ``[P, d]`` in [-1, 1]^d (from
:func:`coordinates`) and per-sample values ``[N, P, C]``, ``P`` the number of grid points.

``provider: signals`` does this for the splits of another provider's data::

    data:
      provider: signals
      source: {provider: image_folder, root: data/faces, size: [48, 64], channels: 3}
      dims: 2            # optional: signal dimensions (default: 1 for [N, L], else x.ndim - 2)

The task's splits are ``x = coordinates`` ``[N, P, d]`` (one shared grid, expanded without
copying) and ``y = values`` ``[N, P, C]`` (target kind ``regression``); ``task.source`` keeps the
source task, whose labels :meth:`SignalData.from_task` attaches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from metanet.data.providers.config import ProviderConfig
from metanet.data.tasks import (
    LazyArray,
    Split,
    TaskData,
    TaskDataError,
    load_from_config,
    register_provider,
)

__all__ = ["SignalData", "coordinates", "signal_layout", "signals_provider"]


def coordinates(shape: Sequence[int]) -> torch.Tensor:
    """Grid coordinates in [-1, 1]^d of a signal of spatial ``shape``: ``[prod(shape), d]``.

    Row-major (the last axis varies fastest), axis ``k`` sampled at ``linspace(-1, 1, shape[k])``
    - for ``(size, size)`` exactly :func:`metanet.data.digits.digit_image_coordinates`.
    """
    if not shape or any(int(s) < 1 for s in shape):
        raise ValueError(f"a signal shape needs positive sizes (got {tuple(shape)})")
    axes = [torch.linspace(-1.0, 1.0, int(s)) for s in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=-1)


def _signal_dims(x_shape: tuple[int, ...], dims: int | None) -> tuple[int, bool]:
    """``(signal dims, has a channel axis)`` for inputs ``[N, (C,) *signal]``."""
    ndim = len(x_shape)
    if dims is None:
        return (1, False) if ndim == 2 else (ndim - 2, True)
    if ndim in (dims + 1, dims + 2):
        return dims, ndim == dims + 2
    raise TaskDataError(
        f"data.dims: inputs of shape {x_shape} are neither [N, *signal] nor [N, C, *signal] "
        f"with {dims} signal dims"
    )


def signal_layout(task: TaskData) -> tuple[int, int]:
    """``(signal dims d, channels C)`` of the signals :meth:`SignalData.from_task` makes of
    ``task``, from its input shape alone (no data is read): an INR of it maps ``d -> C``."""
    dims = None
    if task.config.get("provider") == "signals" and task.source is not None:
        dims = task.config.get("dims")
        task = task.source
    shape = tuple(task.input_shape)
    d, has_channels = _signal_dims((1, *shape), dims)
    return d, (int(shape[0]) if has_channels else 1)


@dataclass(frozen=True, eq=False)
class SignalData:
    """Signals on one grid: ``coords`` ``[P, d]``, ``values`` ``[N, P, C]``.

    Attributes:
        coords: grid coordinates in [-1, 1]^d, row-major over :attr:`shape`.
        values: the signal values at ``coords``, one row per sample.
        shape: the spatial shape of one signal (``(H, W)`` for images, ``(L,)`` for 1-D).
        labels: the source samples' targets (class labels) where known, else ``None``.
    """

    coords: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]
    labels: torch.Tensor | None = None

    @classmethod
    def from_tensor(
        cls, x: torch.Tensor | LazyArray, labels: torch.Tensor | None = None,
        dims: int | None = None,
    ) -> SignalData:  # fmt: skip
        """Signals from inputs ``[N, C, *signal]`` (``[N, L]`` and, with ``dims``,
        ``[N, *signal]`` are one channel). ``dims`` defaults to 1 for 2-D ``x``, else
        ``x.ndim - 2`` (``[N, C, L]`` is 1-D, ``[N, C, H, W]`` 2-D)."""
        if x.ndim < 2:
            raise TaskDataError(f"data.dims: inputs of shape {tuple(x.shape)} have no signal axis")
        d, has_channels = _signal_dims(tuple(x.shape), dims)
        x = x.materialize() if isinstance(x, LazyArray) else torch.as_tensor(x)
        if not has_channels:
            x = x.unsqueeze(1)
        n, c, shape = x.shape[0], x.shape[1], tuple(x.shape[2:])
        values = x.reshape(n, c, -1).transpose(1, 2).to(torch.float32).contiguous()
        return cls(coordinates(shape), values, shape, labels)

    @classmethod
    def from_split(cls, split: Split, dims: int | None = None) -> SignalData:
        """Signals from a split's inputs, labelled with its targets."""
        return cls.from_tensor(split.x, split.y, dims)

    @classmethod
    def from_task(cls, task: TaskData, split: str = "train", dims: int | None = None,
                  rows: Sequence[int] | None = None) -> SignalData:  # fmt: skip
        """Signals of one split of ``task`` (of its source, for a ``signals`` task); with
        ``rows``, only those samples, in that order (a split on disk is read for them only)."""
        if task.config.get("provider") == "signals" and task.source is not None:
            dims = task.config.get("dims", dims)
            task = task.source
        part = task.split(split)
        if rows is None:
            return cls.from_split(part, dims)
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= part.num_samples):
            raise TaskDataError(f"data ({task.name}): sample {int(idx.max())} is outside the "
                                f"{split} split ({part.num_samples} samples)")  # fmt: skip
        x, y = part.batch(idx)  # reads only these rows of a split on disk
        return cls.from_tensor(x, y, dims)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(coords [P, d], values [P, C])`` of signal ``index`` (what one INR is fitted to)."""
        return self.coords, self.values[index]

    @property
    def channels(self) -> int:
        return int(self.values.shape[2])

    @property
    def dims(self) -> int:
        return len(self.shape)

    def to_signal(self, values: torch.Tensor) -> torch.Tensor:
        """Values ``[..., P, C]`` (e.g. an INR's outputs at :attr:`coords`) back to
        ``[..., C, *shape]``."""
        lead = values.shape[:-2]
        moved = values.transpose(-1, -2)
        return moved.reshape(*lead, self.channels, *self.shape)

    def as_split(self) -> Split:
        """The signals as a split: ``x`` the grid ``[N, P, d]`` (expanded, not copied), ``y``
        the values ``[N, P, C]``."""
        return Split(self.coords.expand(len(self), *self.coords.shape), self.values)


@register_provider("signals")
def signals_provider(cfg: ProviderConfig) -> TaskData:
    """Another provider's data (``source:``, default digits) as coordinate -> value signals."""
    source_cfg = cfg.sub("source", {"provider": "digits"})
    dims = cfg.integer("dims", None, minimum=1)
    cfg.finish(children=False)  # the source's keys are checked when it is loaded
    source = load_from_config(source_cfg)
    try:
        signals = {name: SignalData.from_split(s, dims) for name, s in source.splits.items()}
    except TaskDataError as err:
        raise cfg.error("dims", str(err).split(": ", 1)[-1], source.name) from None
    train = signals["train"]
    return TaskData(
        name=f"signals({source.name})",
        train=train.as_split(),
        test=signals["test"].as_split(),
        val=signals["val"].as_split() if "val" in signals else None,
        target_kind="regression",
        input_shape=tuple(train.coords.shape),
        num_classes=None,
        source=source,
    )
