"""The ``glyphs`` provider (fonts matplotlib ships, rendered under random affine transforms) and
the glyph INR recipe built through the zoo builder."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import yaml

from metanet.data.providers.glyphs import GlyphStyle, glyph_images, render_glyph
from metanet.data.tasks import TaskDataError, available_providers, load_task_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"provider": "glyphs", "train_samples": 60, "test_samples": 20}


def test_registered():
    assert "glyphs" in available_providers()


def test_images_have_the_right_shape_range_and_balanced_labels():
    task = load_task_data({**SMALL, "size": 32, "val_samples": 10})
    assert task.input_shape == (1, 32, 32)
    assert task.num_classes == 10 and task.target_kind == "classes"
    assert task.classes == tuple("0123456789")
    assert {k: s.num_samples for k, s in task.splits.items()} == {"train": 60, "val": 10,
                                                                  "test": 20}  # fmt: skip
    for split in task.splits.values():
        x, y = split
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        # every image shows a glyph (some ink, mostly background) and uses grey levels
        ink = x.flatten(1).mean(1)
        assert bool((ink > 0.02).all()) and bool((ink < 0.5).all())
        assert float(x.max()) == pytest.approx(1.0, abs=0.02)
        assert ((x > 0.05) & (x < 0.95)).any()
    assert torch.bincount(task.train.y, minlength=10).tolist() == [6] * 10


def test_deterministic_per_seed_and_a_larger_split_extends_a_smaller_one():
    a = load_task_data({**SMALL, "seed": 3})
    b = load_task_data({**SMALL, "seed": 3})
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.x, b.test.x)
    assert a.fingerprint() == b.fingerprint()
    c = load_task_data({**SMALL, "seed": 4})
    assert not torch.equal(a.train.x, c.train.x)
    assert a.fingerprint() != c.fingerprint()
    # image i depends on (seed, split, i) alone
    big = load_task_data({**SMALL, "seed": 3, "train_samples": 80})
    assert torch.equal(big.train.x[:60], a.train.x)
    # train and test images are different draws
    assert not torch.equal(a.train.x[:20], a.test.x)


def test_classes_differ_more_than_samples_of_one_class():
    """Nearest class mean on pixels tells the glyphs apart far above chance (0.1), and the
    per-class mean images are distinct."""
    task = load_task_data({**SMALL, "train_samples": 300, "test_samples": 100})
    x_tr, y_tr = task.train.x.flatten(1), task.train.y
    means = torch.stack([x_tr[y_tr == c].mean(0) for c in range(10)])
    dist = torch.cdist(means, means)
    assert float(dist[~torch.eye(10, dtype=torch.bool)].min()) > 1.0
    x_te, y_te = task.test.x.flatten(1), task.test.y
    pred = torch.cdist(x_te, means).argmin(1)
    assert float((pred == y_te).float().mean()) > 0.4


def test_transform_ranges_change_the_images():
    plain = GlyphStyle(rotation=0.0, scale=(1.0, 1.0), shear=0.0, translate=0.0, stroke=(0.0, 0.0))
    x0, _ = glyph_images(10, style=plain, fonts=["DejaVuSans.ttf"])
    x1, _ = glyph_images(10, style=plain, fonts=["DejaVuSans.ttf"], seed=7)
    assert torch.equal(x0, x1)  # nothing random left: the seed does not matter
    x2, _ = glyph_images(10, fonts=["DejaVuSans.ttf"])
    assert not torch.equal(x0, x2)
    thin = render_glyph("1", "DejaVuSans.ttf", 28)
    thick = render_glyph("1", "DejaVuSans.ttf", 28, stroke=1.5)
    assert thick.sum() > thin.sum() * 1.3
    shifted = render_glyph("1", "DejaVuSans.ttf", 28, shift=(5.0, 0.0))
    cols = lambda img: float((img.sum(0) * np.arange(28)).sum() / img.sum())  # noqa: E731
    assert cols(shifted) - cols(thin) == pytest.approx(5.0, abs=0.5)


def test_letters_and_user_fonts(tmp_path):
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSerif.ttf")
    task = load_task_data({**SMALL, "classes": "ABC", "fonts": [path], "size": 28})
    assert task.num_classes == 3 and task.classes == ("A", "B", "C")


@pytest.mark.parametrize(
    ("over", "key"),
    [
        ({"size": 4}, "data.size"),
        ({"classes": "1"}, "data.classes"),
        ({"classes": "112"}, "data.classes"),
        ({"classes": "a b"}, "data.classes"),
        ({"classes": 12}, "data.classes"),
        ({"train_samples": 0}, "data.train_samples"),
        ({"fonts": ["NoSuchFont.ttf"]}, "data.fonts"),
        ({"fonts": []}, "data.fonts"),
        ({"scale": [1.2, 0.8]}, "data.scale"),
        ({"scale": 1.0}, "data.scale"),
        ({"rotation": -1}, "data.rotation"),
        ({"stroke": [0, 50]}, "data.stroke"),
        ({"translate": float("nan")}, "data.translate"),
        ({"colour": 1}, "data.colour"),
    ],
)
def test_bad_arguments_give_one_line_errors_naming_the_key(over, key):
    with pytest.raises(TaskDataError) as info:
        load_task_data({**SMALL, **over})
    message = str(info.value)
    assert message.startswith(key) and "\n" not in message, message


def test_unknown_font_error_lists_what_matplotlib_ships():
    with pytest.raises(TaskDataError, match=r"DejaVuSans\.ttf"):
        load_task_data({**SMALL, "fonts": ["NoSuchFont.ttf"]})


def test_tiny_recipe_builds_through_the_zoo_builder(tmp_path):
    from metanet.data.providers.signals import SignalData
    from metanet.data.zoo_store import Zoo
    from metanet.zoo.build import build_zoo
    from metanet.zoo.data import recipe_task
    from metanet.zoo.recipe import Recipe

    with open(os.path.join(ROOT, "datasets", "glyphs-siren-tiny.yaml")) as f:
        raw = yaml.safe_load(f)
    assert raw["data"]["size"] >= 28 and "shared_init" not in raw
    raw["data"].update(train_samples=8, test_samples=4, train_images=8, test_images=4)
    raw["hparams"]["epochs"] = 20
    recipe = Recipe.from_dict(raw)
    arch = recipe.architectures[0]
    assert (arch["in"], arch["widths"], arch["out"], arch["w0"]) == (2, [32, 32], 1, 30.0)
    out = build_zoo(recipe, tmp_path / "tiny.h5", progress=False, threads=1)
    task = recipe_task(recipe.data)
    with Zoo.open(out) as zoo:
        g = zoo[zoo.architectures[0]]
        m = g.metrics
        assert len(g) == 12
        assert sorted(zip(m["split"].tolist(), m["image_index"].tolist())) == (
            [(0, i) for i in range(8)] + [(1, i) for i in range(4)])  # fmt: skip
        for i in range(len(g)):
            sig = SignalData.from_task(task, "train" if m["split"][i] == 0 else "test")
            coords, values = sig[int(m["image_index"][i])]
            assert coords.shape == (28 * 28, 2) and values.shape == (28 * 28, 1)
            assert m["label"][i] == int(sig.labels[int(m["image_index"][i])])
            with torch.no_grad():
                mse = float(torch.nn.functional.mse_loss(g.module(i)(coords), values))
            assert m["train_loss"][i] == pytest.approx(mse, rel=1e-4)
            assert math.isfinite(m["psnr"][i]) and 0 < m["steps"][i] <= 20
        # independent inits: no two INRs start (or end) with the same first layer
        w = g.params()["0.weight"].flatten(1)
        assert torch.cdist(w, w).add(torch.eye(len(w)) * 1e3).min() > 1e-3
