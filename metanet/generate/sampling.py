"""``metanet.generate.sample``: new networks from a trained weight generator."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from metanet.weightspace import WeightSpace

__all__ = ["sample"]


def sample(
    generator: Any,
    n: int,
    condition: str | Sequence[str] | None = None,
    seed: int | None = None,
    trust_pickle: bool = False,
    **sampler: Any,
) -> WeightSpace:
    """Draw ``n`` networks from a weight generator.

    Args:
        generator: a :class:`~metanet.tasks.generation.GenerationTask` or the path of its
            checkpoint (read with :func:`metanet.checkpoints.load`).
        n: networks to draw.
        condition: a condition the generator was trained on (e.g. ``"0-4"``), a list cycled
            over, or None (unconditional; a conditional generator cycles over its conditions).
        seed: seeds the sampler's noise (the same seed gives the same networks).
        trust_pickle: for a path: allow a full unpickle (only for files you trust).
        **sampler: ``steps``, ``method``, ``guidance``, ``temperature``, ``batch_size`` of
            :meth:`GenerationTask.sample <metanet.tasks.generation.GenerationTask.sample>`.
    Returns:
        A :class:`~metanet.weightspace.WeightSpace` of ``n`` networks of the generator's
        architecture, in raw weight units. ``metanet.generate.evaluate.load_network(module,
        ws, i, layout)`` writes network ``i`` into a module, with ``layout =
        metanet.generate.data.network_layout(generator.info)``: ``None`` for a weight-space
        architecture (then ``ws.load_into(module, i)`` is the same), a
        :class:`~metanet.generate.data.FlatLayout` for any other module family (CNNs with
        BatchNorm: pass ``calibration`` batches to recompute the running statistics).
    Raises:
        metanet.checkpoints.CheckpointError: a path that is not a generator checkpoint.
        metanet.tasks.generation.GenerationError: a condition outside the trained set, bad
            sampler settings.
    """
    from metanet.checkpoints import CheckpointError, load
    from metanet.tasks.generation import GenerationTask

    if isinstance(generator, (str, os.PathLike)):
        where = os.fspath(generator)
        generator = load(where, trust_pickle=trust_pickle)
        if not isinstance(generator, GenerationTask):
            raise CheckpointError(f"{where} holds a {type(generator).__name__}, not a generator")
    if not isinstance(generator, GenerationTask):
        raise TypeError(f"generator must be a GenerationTask or a checkpoint path, got "
                        f"{type(generator).__name__}")  # fmt: skip
    ws, _ = generator.sample(n, condition=condition, seed=seed, **sampler)
    return ws
