"""The task-data interface: every provider on small data written here, signals, fingerprints and
one-line errors naming the config key and the file or class at fault."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from metanet.data import digit_image_coordinates, load_digits
from metanet.data.providers.signals import SignalData, coordinates
from metanet.data.tasks import (
    LazyArray,
    TaskData,
    TaskDataError,
    available_providers,
    load_task_data,
    register_provider,
)

HERE = __name__  # the import name of this file, for class_path


# ------------------------------------------------------------------------------------------------
# Dataset classes a user might write (loaded by class_path)
# ------------------------------------------------------------------------------------------------
class ProceduralShapes(torch.utils.data.Dataset):
    """28x28 grayscale images: class ``c`` draws a bright row band at ``4 c``; pixel (0, 0) holds
    the item index, so tests can tell which items ended up in which split."""

    def __init__(self, n: int = 60, num_classes: int = 3, form: str = "pil", seed: int = 0):
        self.n, self.num_classes, self.form, self.seed = n, num_classes, form, seed
        self.targets = [i % num_classes for i in range(n)]
        self.classes = [f"shape{c}" for c in range(num_classes)]

    def __len__(self) -> int:
        return self.n

    def image(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, i])
        arr = rng.integers(0, 60, size=(28, 28), dtype=np.uint8)
        c = self.targets[i]
        arr[4 * c : 4 * c + 3] = 250
        arr[0, 0] = i % 256
        return arr

    def __getitem__(self, i: int):
        arr = self.image(i)
        if self.form == "pil":
            x = Image.fromarray(arr, mode="L")
        elif self.form == "numpy":
            x = arr[None]
        else:
            x = torch.from_numpy(arr.astype(np.float32) / 255.0)[None]
        return x, self.targets[i]


class RaggedImages(ProceduralShapes):
    """Item 5 is one pixel narrower than the others."""

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return (x[..., :-1] if i == 5 else x), y


class BrokenDataset(torch.utils.data.Dataset):
    def __init__(self, root: str = "nowhere"):
        raise RuntimeError(f"boom: no data under\n{root}")


class NaNAtThree(ProceduralShapes):
    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return (torch.full((1, 28, 28), float("nan")) if i == 3 else x), y


class _Payload:
    """A plain Python object: storing it in a .pt file needs pickle."""


class _Evil:
    """Unpickling this creates the file ``path`` (what a malicious data file could do)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _shapes(**init_args) -> dict:
    return {"provider": "dataset", "class_path": f"{HERE}.ProceduralShapes",
            "init_args": init_args}  # fmt: skip


def _ids(x: torch.Tensor) -> list[int]:
    return sorted(int(round(v * 255)) for v in x[:, 0, 0, 0].tolist())


# ------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> TaskData:
    return load_task_data("digits")


def test_digits_provider_is_load_digits(digits):
    ref = load_digits()
    assert torch.equal(digits.train.x, ref.x_train) and torch.equal(digits.train.y, ref.y_train)
    assert torch.equal(digits.test.x, ref.x_test) and torch.equal(digits.test.y, ref.y_test)
    assert (digits.train.num_samples, digits.test.num_samples, digits.val) == (1347, 450, None)
    assert (digits.target_kind, digits.num_classes, digits.input_shape) == ("classes", 10,
                                                                          (1, 8, 8))  # fmt: skip
    assert digits.fingerprint() == load_task_data({"provider": "digits"}).fingerprint()
    assert set(available_providers()) >= {"digits", "dataset", "tensors", "image_folder",
                                          "signals"}  # fmt: skip


def test_digits_val_split_is_carved_from_train(digits):
    task = load_task_data({"provider": "digits", "val_fraction": 0.1})
    assert torch.equal(task.test.x, digits.test.x)
    assert (task.train.num_samples, task.val.num_samples) == (1212, 135)
    rows = lambda x: sorted(r.numpy().tobytes() for r in x.flatten(1))  # noqa: E731
    assert rows(torch.cat([task.train.x, task.val.x])) == rows(digits.train.x)
    counts = torch.bincount(task.val.y, minlength=10)
    assert int(counts.min()) >= 13 and int(counts.max()) <= 14  # stratified: ~10% of each digit
    assert task.fingerprint() != digits.fingerprint()


# ------------------------------------------------------------------------------------------------
# dataset (class_path + init_args)
# ------------------------------------------------------------------------------------------------
def test_dataset_class_path_with_stratified_split():
    cfg = {**_shapes(n=60), "val_fraction": 0.2, "test_fraction": 0.25, "split_seed": 3}
    task = load_task_data(cfg)
    assert task.name == "ProceduralShapes" and task.input_shape == (1, 28, 28)
    assert (task.num_classes, task.classes) == (3, ("shape0", "shape1", "shape2"))
    assert [s.num_samples for s in task.splits.values()] == [36, 9, 15]
    assert torch.bincount(task.test.y).tolist() == [5, 5, 5]
    assert torch.bincount(task.val.y).tolist() == [3, 3, 3]
    ids = [_ids(s.x) for s in task.splits.values()]
    assert sorted(sum(ids, [])) == list(range(60))  # disjoint and complete
    assert 0 <= float(task.train.x.min()) and float(task.train.x.max()) <= 1
    again = load_task_data({**cfg, "class_path": f"{HERE}:ProceduralShapes"})
    assert torch.equal(again.test.x, task.test.x) and torch.equal(again.val.y, task.val.y)
    assert again.fingerprint() == task.fingerprint()
    other_seed = load_task_data({**cfg, "split_seed": 4})
    assert _ids(other_seed.test.x) != ids[2]


@pytest.mark.parametrize("form", ["tensor", "numpy"])
def test_dataset_items_as_tensors_or_arrays_equal_pil(form):
    pil = load_task_data(_shapes(n=12))
    other = load_task_data(_shapes(n=12, form=form))
    assert torch.allclose(other.train.x, pil.train.x) and torch.equal(other.test.y, pil.test.y)


def test_dataset_test_subconfig_inherits_class_and_args():
    task = load_task_data({**_shapes(n=30), "test": {"init_args": {"n": 9, "seed": 1}}})
    assert (task.train.num_samples, task.test.num_samples) == (30, 9)
    assert task.config["test"]["init_args"] == {"n": 9, "seed": 1}
    assert task.config["test"]["class_path"] == f"{HERE}.ProceduralShapes"


def test_dataset_stream_reads_items_lazily():
    eager = load_task_data({**_shapes(n=24), "val_fraction": 0.25})
    lazy = load_task_data({**_shapes(n=24), "val_fraction": 0.25, "stream": True})
    assert isinstance(lazy.train.x, LazyArray) and lazy.train.lazy
    assert lazy.train.x.shape == tuple(eager.train.x.shape)
    assert torch.equal(lazy.val.x[:], eager.val.x) and torch.equal(lazy.val.y, eager.val.y)
    assert torch.equal(lazy.train.x[3], eager.train.x[3])
    xb, yb = lazy.train.batch([0, 2])
    assert torch.equal(xb, eager.train.x[[0, 2]]) and torch.equal(yb, eager.train.y[[0, 2]])
    assert lazy.fingerprint() == eager.fingerprint()  # same data; stream is not part of it
    x0, y0 = lazy.train.as_dataset()[1]
    assert torch.equal(x0, eager.train.x[1]) and int(y0) == int(eager.train.y[1])


def test_stream_checks_nan_on_read():
    task = load_task_data({**_shapes(n=8), "class_path": f"{HERE}.NaNAtThree", "stream": True,
                           "test_fraction": 0.25})  # fmt: skip
    with pytest.raises(TaskDataError, match=r"data\.class_path .*NaNAtThree.*sample 3 has NaN"):
        task.train.x[:]


# ------------------------------------------------------------------------------------------------
# tensors (.pt / .npz / .npy / .safetensors)
# ------------------------------------------------------------------------------------------------
def _arrays(n: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g), torch.arange(n) % 4


def test_tensors_pt_with_split_keys(tmp_path):
    (xa, ya), (xb, yb) = _arrays(20), _arrays(8, seed=1)
    path = tmp_path / "data.pt"
    torch.save({"x_train": xa, "y_train": ya, "x_test": xb, "y_test": yb}, path)
    task = load_task_data({"provider": "tensors", "path": str(path)})
    assert torch.equal(task.train.x, xa) and torch.equal(task.test.y, yb)
    assert (task.name, task.num_classes, task.input_shape) == ("data", 4, (1, 4, 4))


def test_tensors_npz_pool_and_custom_keys(tmp_path):
    x, y = _arrays(20)
    path = tmp_path / "pool.npz"
    np.savez(path, images=(x.numpy() * 255).astype(np.uint8), labels=y.numpy().astype(np.int32))
    task = load_task_data({"provider": "tensors", "path": str(path), "x_key": "images",
                           "y_key": "labels", "test_fraction": 0.2})  # fmt: skip
    assert (task.train.num_samples, task.test.num_samples) == (16, 4)
    assert torch.bincount(task.test.y).tolist() == [1, 1, 1, 1]
    everything = torch.cat([task.train.x, task.test.x])
    expected = torch.from_numpy((x.numpy() * 255).astype(np.uint8)).float() / 255
    order = lambda t: t.flatten(1)[torch.argsort(t.flatten(1)[:, 0])]  # noqa: E731
    assert torch.allclose(order(everything), order(expected))
    assert task.train.y.dtype == torch.int64 and task.train.x.dtype == torch.float32


def test_tensors_npy_pairs_and_split_mappings(tmp_path):
    (xa, ya), (xb, yb) = _arrays(12), _arrays(6, seed=2)
    for name, arr in {"xa": xa, "ya": ya, "xb": xb, "yb": yb}.items():
        np.save(tmp_path / f"{name}.npy", arr.numpy())
    pair = lambda a, b: {"x": str(tmp_path / f"{a}.npy"), "y": str(tmp_path / f"{b}.npy")}  # noqa
    task = load_task_data({"provider": "tensors", "train": pair("xa", "ya"),
                           "test": pair("xb", "yb")})  # fmt: skip
    assert torch.equal(task.train.x, xa) and torch.equal(task.train.y, ya)
    assert torch.equal(task.test.x, xb) and torch.equal(task.test.y, yb)
    pool = load_task_data({"provider": "tensors", **pair("xa", "ya"), "test_fraction": 0.5})
    assert pool.train.num_samples == pool.test.num_samples == 6


def test_tensors_safetensors_and_regression(tmp_path):
    from safetensors.torch import save_file

    x, _ = _arrays(10)
    y = torch.randn(10, 2)
    path = tmp_path / "reg.safetensors"
    save_file({"x": x, "y": y}, str(path))
    task = load_task_data({"provider": "tensors", "train": str(path), "test": str(path)})
    assert torch.equal(task.train.x, x) and torch.equal(task.test.y, y)
    assert (task.target_kind, task.num_classes, task.target_shape) == ("regression", None, (2,))


def test_files_over_the_memory_limit_stay_on_disk(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    x, y = _arrays(40)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    save_file({"x": x, "y": y}, str(tmp_path / "d.safetensors"))
    monkeypatch.setenv("METANET_MEMORY_LIMIT_GB", str(1000 / 1024**3))  # 1000 bytes
    task = load_task_data({"provider": "tensors", "x": str(tmp_path / "x.npy"),
                           "y": str(tmp_path / "y.npy"), "test_fraction": 0.25})  # fmt: skip
    assert isinstance(task.train.x, LazyArray) and len(task.train.x) == 30
    rows = torch.cat([task.train.x[:], task.test.x[:]])
    assert torch.allclose(rows.sum(0), x.sum(0))
    st = load_task_data({"provider": "tensors", "path": str(tmp_path / "d.safetensors"),
                         "test_fraction": 0.25})  # fmt: skip
    assert isinstance(st.test.x, LazyArray) and torch.equal(st.test.x[:], task.test.x[:])
    monkeypatch.delenv("METANET_MEMORY_LIMIT_GB")
    eager = load_task_data({"provider": "tensors", "x": str(tmp_path / "x.npy"),
                            "y": str(tmp_path / "y.npy"), "test_fraction": 0.25})  # fmt: skip
    assert not eager.train.lazy and eager.fingerprint() == task.fingerprint()


# ------------------------------------------------------------------------------------------------
# image folders
# ------------------------------------------------------------------------------------------------
def _write_folder(root, classes=("cat", "ant", "bee"), per_class=4, mode="RGB", size=(5, 6)):
    """PNGs ``root/<class>/<i>.png``; red (or gray) = 40 * sorted class index + i."""
    for c, name in enumerate(sorted(classes)):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            value = 40 * c + i
            color = (value, 7, 200) if mode == "RGB" else value
            Image.new(mode, size, color).save(root / name / f"{i}.png")
    return root


def test_image_folder_labels_from_sorted_class_names(tmp_path):
    root = _write_folder(tmp_path / "pets")
    task = load_task_data({"provider": "image_folder", "root": str(root), "test_fraction": 0.25})
    assert task.classes == ("ant", "bee", "cat") and task.num_classes == 3
    assert task.input_shape == (3, 6, 5) and task.config["channels"] == 3
    assert torch.bincount(task.test.y).tolist() == [1, 1, 1]
    for split in task.splits.values():
        red = torch.round(split.x[:, 0, 0, 0] * 255).long()
        assert torch.equal(red // 40, split.y)
        assert torch.allclose(split.x[:, 2], torch.full_like(split.x[:, 2], 200 / 255))


def test_image_folder_gray_resize_channels_and_split_folders(tmp_path):
    train = _write_folder(tmp_path / "train", mode="L", size=(7, 3))
    test = _write_folder(tmp_path / "test", classes=("ant", "cat"), per_class=2, mode="L",
                         size=(7, 3))  # fmt: skip
    cfg = {"provider": "image_folder", "train": str(train), "test": str(test)}
    gray = load_task_data(cfg)
    assert gray.input_shape == (1, 3, 7) and gray.test.y.tolist() == [0, 0, 2, 2]  # train's labels
    assert gray.train.num_samples == 12
    resized = load_task_data({**cfg, "size": [4, 4], "channels": 3})
    assert resized.input_shape == (3, 4, 4)
    assert torch.allclose(resized.test.x[:, 0], resized.test.x[:, 2])


# ------------------------------------------------------------------------------------------------
# signals (INRs)
# ------------------------------------------------------------------------------------------------
def test_coordinates_generalize_digit_coordinates():
    assert torch.equal(coordinates((8, 8)), digit_image_coordinates(8))
    grid = coordinates((2, 3, 4))
    assert grid.shape == (24, 3) and torch.equal(grid[0], torch.tensor([-1.0, -1.0, -1.0]))
    assert torch.allclose(grid[1 * 12 + 2 * 4 + 1], torch.tensor([1.0, 1.0, -1 / 3]))


def test_signals_of_non_square_color_images():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    sig = SignalData.from_tensor(x, labels=torch.tensor([4, 9]))
    assert sig.coords.shape == (35, 2) and sig.values.shape == (2, 35, 3)
    assert (sig.shape, sig.channels, sig.dims) == ((5, 7), 3, 2)
    p = 3 * 7 + 5  # row 3, column 5
    assert torch.allclose(sig.coords[p], torch.tensor([0.5, 2 / 3]))
    assert float(sig.values[1, p, 2]) == float(x[1, 2, 3, 5])
    coords, values = sig[1]
    assert torch.equal(coords, sig.coords) and torch.equal(values, sig.values[1])
    assert torch.equal(sig.to_signal(sig.values), x)


def test_signals_of_1d_inputs():
    mono = torch.randn(4, 10)
    sig = SignalData.from_tensor(mono)
    assert sig.coords.shape == (10, 1) and sig.values.shape == (4, 10, 1)
    assert torch.equal(sig.coords[:, 0], torch.linspace(-1, 1, 10))
    assert float(sig.values[2, 6, 0]) == float(mono[2, 6])
    multi = torch.randn(4, 2, 10)
    sig2 = SignalData.from_tensor(multi)
    assert sig2.values.shape == (4, 10, 2) and float(sig2.values[3, 9, 1]) == float(multi[3, 1, 9])
    flat_images = SignalData.from_tensor(torch.randn(3, 5, 6), dims=2)
    assert (flat_images.shape, flat_images.channels) == ((5, 6), 1)
    with pytest.raises(TaskDataError, match="data.dims"):
        SignalData.from_tensor(torch.randn(3, 5, 6), dims=4)


def test_signals_provider_wraps_any_source(tmp_path):
    root = _write_folder(tmp_path / "faces", per_class=2)
    task = load_task_data({"provider": "signals", "source": {
        "provider": "image_folder", "root": str(root), "test_fraction": 0.5}})  # fmt: skip
    assert task.target_kind == "regression" and task.input_shape == (30, 2)
    assert task.train.x.shape == (3, 30, 2) and task.train.y.shape == (3, 30, 3)
    assert torch.equal(task.train.x[2], coordinates((6, 5)))
    sig = SignalData.from_task(task, "test")
    assert torch.equal(sig.values, task.test.y) and torch.equal(sig.labels, task.source.test.y)
    assert torch.equal(sig.to_signal(sig.values), task.source.test.x)


# ------------------------------------------------------------------------------------------------
# fingerprints and the registry
# ------------------------------------------------------------------------------------------------
def test_fingerprint_follows_the_data_not_its_location(tmp_path):
    x, y = _arrays(12)
    for folder in ("a", "b"):
        os.makedirs(tmp_path / folder)
        np.savez(tmp_path / folder / "d.npz", x=x.numpy(), y=y.numpy())
    x2 = x.clone()
    x2[3, 0, 1, 1] += 1e-3
    np.savez(tmp_path / "changed.npz", x=x2.numpy(), y=y.numpy())
    fp = lambda p, **kw: load_task_data({"provider": "tensors", "path": str(p), **kw}).fingerprint()  # noqa
    first = fp(tmp_path / "a" / "d.npz")
    assert len(first) == 64 and int(first, 16) >= 0
    assert first == fp(tmp_path / "b" / "d.npz")
    assert first != fp(tmp_path / "changed.npz")
    assert first != fp(tmp_path / "a" / "d.npz", split_seed=1)
    code = ("from metanet.data.tasks import load_task_data; print(load_task_data({'provider': "
            f"'tensors', 'path': {str(tmp_path / 'a' / 'd.npz')!r}}}).fingerprint())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})  # fmt: skip
    assert out.stdout.strip() == first


def test_register_provider_adds_a_provider():
    @register_provider("test_constant")
    def constant(cfg):
        from metanet.data.providers.assemble import Part, SplitOptions, assemble_task

        n = cfg.integer("n", 6, minimum=2)
        options = SplitOptions.read(cfg)
        cfg.finish()
        x = torch.arange(n, dtype=torch.float32)[:, None]
        return assemble_task(cfg, "constant", {"train": Part(x, x[:, 0] * 2, "n")}, options)

    task = load_task_data({"provider": "test_constant", "n": 10, "test_fraction": 0.3})
    assert (task.target_kind, task.train.num_samples, task.test.num_samples) == ("regression", 7, 3)
    assert torch.equal(task.test.y, task.test.x[:, 0] * 2)
    with pytest.raises(ValueError, match="registered already"):
        register_provider("test_constant")(lambda cfg: None)


# ------------------------------------------------------------------------------------------------
# errors: one line, naming the key and the file / class
# ------------------------------------------------------------------------------------------------
def _save_pt(path, **arrays):
    torch.save(arrays, path)
    return str(path)


def _save_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _bad_image_folder(tmp_path):
    root = _write_folder(tmp_path / "imgs", per_class=2)
    (root / "bee" / "broken.png").write_bytes(b"not a png at all")
    return {"provider": "image_folder", "root": str(root)}, str(root / "bee" / "broken.png")


def _ragged_folder(tmp_path):
    root = _write_folder(tmp_path / "ragged", per_class=2)
    Image.new("RGB", (9, 9)).save(root / "cat" / "big.png")
    return {"provider": "image_folder", "root": str(root)}, "data.size"


def _tensors(path, **kw):
    return {"provider": "tensors", "path": path, **kw}


def _case_unknown_provider(tmp):
    return {"provider": "mnist-from-mars"}, ["data.provider", "mnist-from-mars"]


def _case_unknown_key(tmp):
    return {"provider": "digits", "val_fractoin": 0.1}, ["data.val_fractoin", "unknown key"]


def _case_bad_fraction(tmp):
    return {"provider": "digits", "val_fraction": 1.5}, ["data.val_fraction", "[0, 1)"]


def _case_missing_module(tmp):
    cfg = {"provider": "dataset", "class_path": "no_such_pkg_xyz.data.Mnist"}
    return cfg, ["data.class_path", "no_such_pkg_xyz", "cannot import"]


def _case_missing_class(tmp):
    cfg = {"provider": "dataset", "class_path": f"{HERE}.NoSuchDataset"}
    return cfg, ["data.class_path", "NoSuchDataset"]


def _case_constructor_raises(tmp):
    cfg = {"provider": "dataset", "class_path": f"{HERE}.BrokenDataset",
           "init_args": {"root": "/data/x"}}  # fmt: skip
    return cfg, ["data.init_args", "BrokenDataset", "RuntimeError: boom", "/data/x"]


def _case_test_constructor_raises(tmp):
    cfg = {**_shapes(n=6), "test": {"class_path": f"{HERE}.BrokenDataset"}}
    return cfg, ["data.test.init_args", "BrokenDataset"]


def _case_unknown_nested_key(tmp):
    cfg = {**_shapes(n=6), "test": {"init_arg": {"n": 3}}}
    return cfg, ["data.test.init_arg", "unknown key"]


def _case_dataset_over_memory_limit(tmp, monkeypatch):
    monkeypatch.setenv("METANET_MEMORY_LIMIT_GB", str(1000 / 1024**3))
    return _shapes(n=6), ["data.class_path", "ProceduralShapes", "memory limit", "data.stream"]


def _case_ragged_samples(tmp):
    cfg = {**_shapes(n=8, form="tensor"), "class_path": f"{HERE}.RaggedImages"}
    return cfg, ["data.class_path", "RaggedImages", "different shapes", "item 5"]


def _case_nan_dataset(tmp):
    cfg = {**_shapes(n=8), "class_path": f"{HERE}.NaNAtThree"}
    return cfg, ["data.class_path", "NaNAtThree", "NaN"]


def _case_length_mismatch(tmp):
    path = _save_pt(tmp / "len.pt", x=torch.zeros(5, 3), y=torch.zeros(4, dtype=torch.long))
    return _tensors(path), ["data.path", path, "5 samples", "y has 4"]


def _case_label_out_of_range(tmp):
    path = _save_npz(tmp / "big.npz", x=np.zeros((6, 2)), y=np.array([0, 1, 2, 3, 4, 7]))
    return _tensors(path, num_classes=5), ["data.path", path, "label 7", "[0, 5)",
                                           "data.num_classes"]  # fmt: skip


def _case_negative_label(tmp):
    path = _save_npz(tmp / "neg.npz", x=np.zeros((6, 2)), y=np.array([0, 1, -1, 1, 0, 1]))
    return _tensors(path), ["data.path", path, "label -1"]


def _case_non_integer_label(tmp):
    path = _save_npz(tmp / "frac.npz", x=np.zeros((6, 2)), y=np.array([0, 1, 0.5, 1, 0, 1]))
    return _tensors(path, target_kind="classes"), ["data.path", path, "non-integer label 0.5"]


def _case_nan_in_x(tmp):
    x = np.zeros((6, 2), dtype=np.float32)
    x[4, 1] = np.inf
    path = _save_npz(tmp / "nan.npz", x=x, y=np.arange(6) % 2)
    return _tensors(path), ["data.path", path, "sample 4 has NaN or inf"]


def _case_empty_split(tmp):
    path = _save_npz(tmp / "empty.npz", x_train=np.zeros((0, 3)), y_train=np.zeros(0, np.int64),
                     x_test=np.zeros((2, 3)), y_test=np.zeros(2, np.int64))  # fmt: skip
    return _tensors(path), ["data.path", path, "train split", "empty"]


def _case_fraction_empties_train(tmp):
    path = _save_npz(tmp / "two.npz", x=np.zeros((2, 3)), y=np.array([0, 1]))
    return _tensors(path, test_fraction=0.9), ["data.test_fraction", "train split empty"]


def _case_missing_file(tmp):
    path = str(tmp / "nope" / "data.pt")
    return _tensors(path), ["data.path", path, "does not exist"]


def _case_missing_key(tmp):
    path = _save_npz(tmp / "nokey.npz", x=np.zeros((4, 2)), labels=np.zeros(4))
    return _tensors(path), ["data.path", path, "no key 'y'", "labels", "data.y_key"]


def _case_pickled_pt(tmp):
    path = _save_pt(tmp / "obj.pt", x=_Payload(), y=torch.zeros(1))
    return _tensors(path), ["data.path", path,
                            "holds pickled Python objects; metanet reads tensors only"]  # fmt: skip


def _case_pickled_npy(tmp):
    np.save(tmp / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(tmp / "y.npy", np.array([0, 1]))
    cfg = {"provider": "tensors", "x": str(tmp / "obj.npy"), "y": str(tmp / "y.npy")}
    return cfg, ["data.x", str(tmp / "obj.npy"), "holds pickled Python objects"]


def _case_unsupported_suffix(tmp):
    (tmp / "d.csv").write_text("1,2\n")
    return _tensors(str(tmp / "d.csv")), ["data.path", "d.csv", "unsupported file type"]


def _case_over_memory_limit(tmp, monkeypatch):
    path = _save_pt(tmp / "huge.pt", x=torch.zeros(400, 4), y=torch.zeros(400, dtype=torch.long))
    monkeypatch.setenv("METANET_MEMORY_LIMIT_GB", str(1000 / 1024**3))
    return _tensors(path), ["data.path", path, "memory limit", "METANET_MEMORY_LIMIT_GB"]


def _case_unreadable_image(tmp):
    cfg, broken = _bad_image_folder(tmp)
    return cfg, ["data.root", broken, "cannot be read as an image"]


def _case_images_of_different_sizes(tmp):
    cfg, key = _ragged_folder(tmp)
    return cfg, ["data.root", "big.png", "different shapes", key]


def _case_bad_dims(tmp):
    return {"provider": "signals", "dims": 5}, ["data.dims", "digits", "signal dims"]


CASES = [v for k, v in sorted(globals().items()) if k.startswith("_case_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[6:] for c in CASES])
def test_bad_input_raises_one_line_error(case, tmp_path, monkeypatch):
    monkeypatch.delenv("METANET_MEMORY_LIMIT_GB", raising=False)
    wants_env = "monkeypatch" in case.__code__.co_varnames
    cfg, expected = case(tmp_path, monkeypatch) if wants_env else case(tmp_path)
    with pytest.raises(TaskDataError) as info:
        load_task_data(cfg)
    message = str(info.value)
    assert "\n" not in message and message.startswith("data.")
    for part in expected:
        assert part in message, (part, message)


def test_bad_memory_limit_env_is_named(tmp_path, monkeypatch):
    path = _save_pt(tmp_path / "d.pt", x=torch.zeros(4, 2), y=torch.zeros(4, dtype=torch.long))
    monkeypatch.setenv("METANET_MEMORY_LIMIT_GB", "lots")
    with pytest.raises(TaskDataError, match="METANET_MEMORY_LIMIT_GB.*'lots'"):
        load_task_data(_tensors(path))


@pytest.mark.parametrize("fmt", ["pt", "npz", "npy"])
def test_pickle_payload_never_runs(tmp_path, fmt):
    sentinel = tmp_path / "pwned"
    evil = _Evil(str(sentinel))
    path = tmp_path / f"evil.{fmt}"
    if fmt == "pt":
        torch.save({"x": evil, "y": torch.zeros(1)}, path)
        cfg = _tensors(str(path))
    elif fmt == "npz":
        np.savez(path, x=np.array([evil], dtype=object), y=np.zeros(1))
        cfg = _tensors(str(path))
    else:
        np.save(path, np.array([evil], dtype=object), allow_pickle=True)
        np.save(tmp_path / "y.npy", np.zeros(1))
        cfg = {"provider": "tensors", "x": str(path), "y": str(tmp_path / "y.npy")}
    assert not sentinel.exists()
    with pytest.raises(TaskDataError, match="holds pickled Python objects"):
        load_task_data(cfg)
    assert not sentinel.exists()
