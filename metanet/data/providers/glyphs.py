"""``provider: glyphs`` - characters rendered from the fonts matplotlib ships, under random affine
transforms and stroke widths: an offline, seeded image-classification task of any size.

Every image is one character of ``classes`` (label = its position there), drawn white on black
with one of ``fonts`` (TrueType files under matplotlib's ``mpl-data/fonts/ttf``, or paths), its
strokes thickened by a random ``stroke`` width, then rotated, scaled, sheared and translated at
random, rendered at ``oversample`` times the final size and box-filtered down (anti-aliased, values
in [0, 1], ``[N, 1, size, size]``)::

    data:
      provider: glyphs
      size: 28                 # image side in pixels (>= 8)
      classes: "0123456789"    # one class per character (default: the ten digits)
      train_samples: 10000     # images per split (labels cycle through the classes: balanced)
      test_samples: 1000
      val_samples: 0           # optional validation split
      seed: 0                  # every image is drawn from (seed, split, index) alone
      fonts: [DejaVuSans.ttf, DejaVuSerif-Bold.ttf]   # default: nine DejaVu faces
      rotation: 15             # max |angle| in degrees
      scale: [0.8, 1.1]        # glyph size factor range
      shear: 12                # max |shear| in degrees
      translate: 0.08          # max shift, as a fraction of ``size``
      stroke: [0.0, 1.5]       # extra stroke width range, in pixels of the final image

Image ``i`` of a split depends only on ``(seed, split, i)`` and the transform ranges, so a larger
split starts with the images of a smaller one. Nothing is downloaded: the fonts come with
matplotlib (a dependency of metanet).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from metanet.data.providers.assemble import Part, SplitOptions, assemble_task
from metanet.data.providers.config import ProviderConfig, check_fits_memory
from metanet.data.tasks import TaskData, register_provider

__all__ = [
    "DEFAULT_FONTS",
    "GlyphStyle",
    "font_path",
    "glyph_images",
    "glyphs_provider",
    "render_glyph",
]

DEFAULT_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
)
_SPLIT_SALT = {"train": 0, "val": 1, "test": 2}
_FONT_SIZE = 0.8  # em size as a fraction of the canvas: digits fill ~60% of its height


@dataclass(frozen=True)
class GlyphStyle:
    """The ranges the random transform of every glyph is drawn from (see the module doc)."""

    rotation: float = 15.0
    scale: tuple[float, float] = (0.8, 1.1)
    shear: float = 12.0
    translate: float = 0.08
    stroke: tuple[float, float] = (0.0, 1.5)


def font_path(name: str) -> str:
    """The TrueType file ``name``: a path, or a file name under matplotlib's ``fonts/ttf``.

    Raises:
        FileNotFoundError: neither exists (the message lists the fonts matplotlib ships).
    """
    if os.path.isfile(os.path.expanduser(name)):
        return os.path.expanduser(name)
    import matplotlib

    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        shipped = sorted(f for f in os.listdir(folder) if f.endswith(".ttf")) if os.path.isdir(
            folder) else []  # fmt: skip
        raise FileNotFoundError(
            f"no font file {name!r} (neither a path nor in {folder}; matplotlib ships "
            f"{shipped[:12]}{' ...' if len(shipped) > 12 else ''})"
        )
    return path


@functools.lru_cache(maxsize=64)
def _font(path: str, pixels: int):  # -> PIL.ImageFont.FreeTypeFont
    from PIL import ImageFont

    return ImageFont.truetype(path, pixels)


def render_glyph(
    char: str,
    font: str,
    size: int,
    *,
    angle: float = 0.0,
    scale: float = 1.0,
    shear: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
    stroke: float = 0.0,
    oversample: int = 4,
) -> np.ndarray:
    """One character as a float32 ``[size, size]`` image in [0, 1] (glyph 1, background 0).

    Args:
        char: the character to draw.
        font: a TrueType file (see :func:`font_path`).
        size: the side of the image in pixels.
        angle: rotation in degrees (counter-clockwise).
        scale: size factor of the glyph (1: digits fill about 60% of the height).
        shear: horizontal shear in degrees.
        shift: translation ``(dx, dy)`` in pixels of the final image.
        stroke: extra stroke width in pixels of the final image (rounded to 1/oversample).
        oversample: the glyph is drawn at ``oversample * size`` and box-filtered down.
    """
    from PIL import Image, ImageDraw

    big = size * oversample
    face = _font(font_path(font), max(1, int(round(_FONT_SIZE * big))))
    width = max(0, int(round(stroke * oversample)))
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=face, anchor="lt",
                                             stroke_width=width)  # fmt: skip
    origin = (big / 2 - (left + right) / 2, big / 2 - (top + bottom) / 2)
    draw.text(origin, char, font=face, fill=255, anchor="lt", stroke_width=width, stroke_fill=255)
    # forward map about the centre: out = A (in - c) + c + t, A = rotation @ shear @ scale
    a, sh = math.radians(angle), math.tan(math.radians(shear))
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])  # y axis points down
    fwd = rot @ np.array([[1.0, sh], [0.0, 1.0]]) @ np.diag([scale, scale])
    inv = np.linalg.inv(fwd)
    c = np.array([big / 2, big / 2])
    t = np.asarray(shift, dtype=np.float64) * oversample
    offset = c - inv @ (c + t)  # in = inv @ out + offset
    coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    warped = canvas.transform((big, big), Image.Transform.AFFINE, coeffs,
                              resample=Image.Resampling.BILINEAR)  # fmt: skip
    small = warped.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def glyph_images(
    count: int,
    *,
    classes: str = "0123456789",
    size: int = 28,
    seed: int = 0,
    split: str = "train",
    fonts: Sequence[str] = DEFAULT_FONTS,
    style: GlyphStyle = GlyphStyle(),
    oversample: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` glyph images ``[count, 1, size, size]`` (float32 in [0, 1]) and their labels
    ``[count]`` (int64; image ``i`` shows ``classes[i % len(classes)]``).

    Image ``i`` is drawn from ``numpy.random.default_rng([seed, split salt, i])`` alone: font,
    stroke width, rotation, scale, shear and shift uniform in the ranges of ``style``.
    """
    if split not in _SPLIT_SALT:
        raise ValueError(f"split must be one of {list(_SPLIT_SALT)} (got {split!r})")
    paths = [font_path(f) for f in fonts]
    images = np.zeros((count, 1, size, size), dtype=np.float32)
    labels = np.arange(count, dtype=np.int64) % len(classes)
    for i in range(count):
        rng = np.random.default_rng([seed, _SPLIT_SALT[split], i])
        font = paths[int(rng.integers(len(paths)))]
        stroke = rng.uniform(*style.stroke)
        angle = rng.uniform(-style.rotation, style.rotation)
        scale = rng.uniform(*style.scale)
        shear = rng.uniform(-style.shear, style.shear)
        shift = tuple(rng.uniform(-style.translate, style.translate, size=2) * size)
        images[i, 0] = render_glyph(classes[labels[i]], font, size, angle=angle, scale=scale,
                                    shear=shear, shift=shift, stroke=stroke,
                                    oversample=oversample)  # fmt: skip
    return torch.from_numpy(images), torch.from_numpy(labels)


def _number(cfg: ProviderConfig, name: str, default: float, low: float, high: float) -> float:
    value = cfg.get(name, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not low <= value <= high:
        raise cfg.error(name, f"must be a number in [{low}, {high}] (got {value!r})")
    return float(value)


def _range(cfg: ProviderConfig, name: str, default: tuple[float, float], low: float,
           high: float) -> tuple[float, float]:  # fmt: skip
    value = cfg.get(name, list(default))
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(v) for v in value))  # fmt: skip
    if not ok or not low <= value[0] <= value[1] <= high:
        raise cfg.error(name, f"must be [min, max] with {low} <= min <= max <= {high} "
                        f"(got {value!r})")  # fmt: skip
    cfg.resolved[name] = [float(v) for v in value]
    return float(value[0]), float(value[1])


@register_provider("glyphs")
def glyphs_provider(cfg: ProviderConfig) -> TaskData:
    """Glyph images ``[N, 1, size, size]`` in [0, 1] rendered offline; labels index ``classes``."""
    size = cfg.integer("size", 28, minimum=8)
    classes = cfg.text("classes", "0123456789")
    if len(classes) < 2 or len(set(classes)) != len(classes) or not classes.isprintable() or any(
            ch.isspace() for ch in classes):  # fmt: skip
        raise cfg.error("classes", f"must be at least 2 distinct printable, non-space characters "
                        f"(got {classes!r})")  # fmt: skip
    counts = {
        "train": cfg.integer("train_samples", 1000, minimum=1),
        "test": cfg.integer("test_samples", 250, minimum=1),
        "val": cfg.integer("val_samples", 0),
    }
    seed = cfg.integer("seed", 0)
    fonts = cfg.get("fonts", list(DEFAULT_FONTS))
    if not isinstance(fonts, (list, tuple)) or not fonts or not all(
            isinstance(f, str) and f for f in fonts):  # fmt: skip
        raise cfg.error("fonts", f"must be a non-empty list of font files (got {fonts!r})")
    for f in fonts:
        try:
            font_path(f)
        except FileNotFoundError as err:
            raise cfg.error("fonts", str(err)) from None
    cfg.resolved["fonts"] = list(fonts)
    style = GlyphStyle(
        rotation=_number(cfg, "rotation", 15.0, 0.0, 180.0),
        scale=_range(cfg, "scale", (0.8, 1.1), 0.05, 4.0),
        shear=_number(cfg, "shear", 12.0, 0.0, 60.0),
        translate=_number(cfg, "translate", 0.08, 0.0, 0.5),
        stroke=_range(cfg, "stroke", (0.0, 1.5), 0.0, float(size) / 4),
    )
    oversample = cfg.integer("oversample", 4, minimum=1)
    cfg.finish()
    total = sum(counts.values()) * size * size * 4
    check_fits_memory(total, cfg, "train_samples", None, "ask for fewer or smaller images")
    parts = {}
    for split, n in counts.items():
        if n:
            x, y = glyph_images(n, classes=classes, size=size, seed=seed, split=split,
                                fonts=fonts, style=style, oversample=oversample)  # fmt: skip
            parts[split] = Part(x, y, f"{split}_samples", "glyphs")
    options = SplitOptions(0.0, None, seed, "classes", len(classes))
    return assemble_task(cfg, f"glyphs({classes})", parts, options, classes=tuple(classes))
