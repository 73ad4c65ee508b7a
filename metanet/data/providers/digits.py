"""``provider: digits`` - scikit-learn's bundled 8x8 digits with metanet's fixed split.

Keys: ``split_seed`` (0) and ``test_fraction`` (0.25) of :func:`metanet.data.digits.load_digits`
(1347 train / 450 test by default, so existing zoos keep their data), ``val_fraction`` (0: no val
split; else that share of train, stratified, seeded by ``split_seed``).
"""

from __future__ import annotations

from metanet.data.digits import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, load_digits
from metanet.data.providers.assemble import Part, SplitOptions, assemble_task
from metanet.data.providers.config import ProviderConfig
from metanet.data.tasks import TaskData, register_provider

__all__ = ["digits_provider"]


@register_provider("digits")
def digits_provider(cfg: ProviderConfig) -> TaskData:
    """Digits images ``[N, 1, 8, 8]`` in [0, 1] and labels 0-9."""
    seed = cfg.integer("split_seed", DIGITS_SPLIT_SEED)
    test_fraction = cfg.fraction("test_fraction", DIGITS_TEST_FRACTION)
    if not test_fraction:
        raise cfg.error("test_fraction", "must be in (0, 1) for digits")
    val_fraction = cfg.fraction("val_fraction", 0.0)
    cfg.finish()
    d = load_digits(seed=seed, test_fraction=test_fraction)
    parts = {
        "train": Part(d.x_train, d.y_train, "provider", "digits"),
        "test": Part(d.x_test, d.y_test, "provider", "digits"),
    }
    options = SplitOptions(val_fraction, None, seed, "classes", d.num_classes)
    classes = tuple(str(i) for i in range(d.num_classes))
    return assemble_task(cfg, "digits", parts, options, classes=classes)
