"""``provider: image_folder`` - image files, one subfolder per class (``root/<class>/*.png``).

Keys: ``root`` (one folder, split by ``test_fraction`` / ``val_fraction``) or ``train`` (and
``test`` / ``val``) folders of the same layout; ``size: [H, W]`` (resize, bilinear; without it
every image must have the same size), ``channels`` (1 or 3; default 1 if every image is
grayscale, else 3), ``extensions`` (default common image suffixes), ``stream`` (read files on
demand), ``split_seed``. Labels are the indices of the sorted class names of the train folder.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from metanet.data.providers.assemble import (
    Part,
    SplitOptions,
    assemble_task,
    is_grayscale_mode,
    pil_to_tensor,
)
from metanet.data.providers.config import ProviderConfig, check_fits_memory
from metanet.data.tasks import SPLITS, LazyArray, TaskData, register_provider

__all__ = ["IMAGE_EXTENSIONS", "image_folder_provider"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm",
                    ".ppm")  # fmt: skip
_PROGRESS_MIN_ITEMS = 1000


def _class_folders(cfg: ProviderConfig, key: str, root: str) -> list[str]:
    names = sorted(
        d for d in os.listdir(root)
        if not d.startswith(".") and os.path.isdir(os.path.join(root, d))
    )  # fmt: skip
    if not names:
        raise cfg.error(key, "has no class subfolders (expected root/<class>/<image>)", root)
    return names


def _list_images(cfg: ProviderConfig, key: str, root: str, extensions: tuple[str, ...]):
    """``(file paths, class names per file)`` under ``root``, sorted by class then file name."""
    files, labels = [], []
    for name in _class_folders(cfg, key, root):
        folder = os.path.join(root, name)
        found = sorted(
            f for f in os.listdir(folder)
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions
        )  # fmt: skip
        if not found:
            raise cfg.error(key, f"class folder holds no images with extensions {list(extensions)}",
                            folder)  # fmt: skip
        files += [os.path.join(folder, f) for f in found]
        labels += [name] * len(found)
    return files, labels


class _Images:
    """Reads the image files of one split with fixed channels and size."""

    def __init__(self, cfg: ProviderConfig, key: str, root: str, files: list[str]) -> None:
        self.cfg, self.key, self.root, self.files = cfg, key, root, files

    def open(self, path: str):
        from PIL import Image, UnidentifiedImageError

        try:
            return Image.open(path)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise self.cfg.error(self.key, f"cannot be read as an image: {err}", path) from None

    def headers(self) -> list[tuple[str, tuple[int, int]]]:
        """``(mode, (width, height))`` of every file (reads headers only)."""
        out = []
        for path in self.files:
            with self.open(path) as image:
                out.append((image.mode, image.size))
        return out

    def load(self, path: str, channels: int, size: tuple[int, int] | None) -> torch.Tensor:
        from PIL import Image

        with self.open(path) as image:
            try:
                if channels == 1 and (not is_grayscale_mode(image.mode) or image.mode == "LA"):
                    image = image.convert("L")
                elif channels == 3 and image.mode != "RGB":
                    image = image.convert("RGB")
                if size is not None and image.size != (size[1], size[0]):
                    image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                return pil_to_tensor(image)
            except (OSError, ValueError) as err:
                raise self.cfg.error(self.key, f"cannot be read as an image: {err}",
                                     path) from None  # fmt: skip


def _check_sizes(images: _Images, headers, size_key: str) -> tuple[int, int]:
    first_w, first_h = headers[0][1]
    for path, (_, (w, h)) in zip(images.files, headers):
        if (w, h) != (first_w, first_h):
            raise images.cfg.error(
                images.key, f"samples of different shapes: image is {h}x{w} (HxW), the first "
                f"({os.path.basename(images.files[0])}) {first_h}x{first_w}; set {size_key}: "
                "[H, W] to resize", path,
            )  # fmt: skip
    return first_h, first_w


def _read_split(images: _Images, channels: int, size: tuple[int, int], stream: bool,
                stream_key: str):  # fmt: skip
    shape = (len(images.files), channels, *size)
    if stream:
        read = lambda rows: torch.stack(  # noqa: E731
            [images.load(images.files[int(i)], channels, size) for i in rows]
        )
        return LazyArray(shape, read, f"{images.cfg.key(images.key)} ({images.root})")
    check_fits_memory(int(np.prod(shape)) * 4, images.cfg, images.key, None,
                      f"set {stream_key}: true")  # fmt: skip
    from tqdm.auto import tqdm

    x = torch.empty(shape)
    bar = tqdm(images.files, desc="reading images", unit="img", dynamic_ncols=True,
               disable=len(images.files) <= _PROGRESS_MIN_ITEMS)  # fmt: skip
    for i, path in enumerate(bar):
        x[i] = images.load(path, channels, size)
    return x


def _folders(cfg: ProviderConfig) -> dict[str, tuple[str, str]]:
    """``{split: (config key, folder)}`` from ``root`` or ``train`` / ``test`` / ``val``."""
    if cfg.has("root") and cfg.has("train"):
        raise cfg.error("root", "give either root or train (and test / val) folders")
    if not cfg.has("root") and not cfg.has("train"):
        raise cfg.error("root", "missing (or give train and test folders)")
    if cfg.has("root"):
        for split in ("test", "val"):
            if cfg.has(split):
                raise cfg.error(split, "goes with a train folder, not with root (root is split "
                                "by test_fraction / val_fraction)")  # fmt: skip
        return {"train": ("root", cfg.file("root", folder=True))}
    folders = {}
    for split in SPLITS:
        if cfg.has(split):
            folders[split] = (split, cfg.file(split, folder=True))
        else:
            cfg.get(split)  # a null value is allowed
    return folders


def _options(cfg: ProviderConfig) -> tuple[tuple[int, int] | None, int | None, tuple[str, ...]]:
    """``size``, ``channels`` and ``extensions``, checked."""
    size = cfg.shape("size", 2)
    channels = cfg.get("channels")
    if channels not in (None, 1, 3) or isinstance(channels, bool):
        raise cfg.error("channels", f"must be 1 or 3 (got {channels!r})")
    extensions = cfg.get("extensions", list(IMAGE_EXTENSIONS))
    if not isinstance(extensions, (list, tuple)) or not all(isinstance(e, str) for e in extensions):
        raise cfg.error("extensions", f"must be a list of file suffixes (got {extensions!r})")
    extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    return size, channels, extensions


def _labels(cfg: ProviderConfig, key: str, folder: str, names: list[str], classes) -> torch.Tensor:
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise cfg.error(key, f"class {unknown[0]!r} is not a class of the train folder "
                        f"({list(classes)})", folder)  # fmt: skip
    index = {name: i for i, name in enumerate(classes)}
    return torch.tensor([index[n] for n in names], dtype=torch.int64)


@register_provider("image_folder")
def image_folder_provider(cfg: ProviderConfig) -> TaskData:
    """Read class-per-subfolder images into a classification task."""
    folders = _folders(cfg)
    size, channels, extensions = _options(cfg)
    stream = cfg.flag("stream", False)
    options = SplitOptions(cfg.fraction("val_fraction", 0.0), cfg.fraction("test_fraction", None),
                           cfg.integer("split_seed", 0), "classes", None)  # fmt: skip
    cfg.finish()
    listed = {s: _list_images(cfg, key, root, extensions) for s, (key, root) in folders.items()}
    classes = tuple(dict.fromkeys(listed["train"][1]))
    images = {s: _Images(cfg, *folders[s], files) for s, (files, _) in listed.items()}
    headers = {s: split.headers() for s, split in images.items()}
    if channels is None:
        gray = all(is_grayscale_mode(mode) for h in headers.values() for mode, _ in h)
        channels = cfg.resolved["channels"] = 1 if gray else 3
    if size is None:
        sizes = {s: _check_sizes(split, headers[s], cfg.key("size")) for s, split in images.items()}
        size = sizes["train"]  # other sizes are caught as shape mismatches
    parts = {}
    for s, (key, folder) in folders.items():
        y = _labels(cfg, key, folder, listed[s][1], classes)
        x = _read_split(images[s], channels, size, stream, cfg.key("stream"))
        parts[s] = Part(x, y, key, folder)
    name = os.path.basename(os.path.normpath(folders["train"][1]))
    return assemble_task(cfg, name, parts, options, classes=classes)
