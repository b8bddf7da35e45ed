"""Tests for tfp_bnn_adv.data.

Every expected value comes from an independent computation: closed-form
half-moon geometry, IDX files whose bytes the test writes with its own
``struct`` headers, the published class balance and first label of
Fashion-MNIST, and a separate decode of the real files.
"""

import os

import gzip
import pathlib
import socket
import struct

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tfp_bnn_adv import data

FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """No test may reach the network: TFDS and sockets fail unless faked."""

    def refuse_tfds(*args, **kwargs):
        raise RuntimeError("tfds.load is disabled in tests")

    def refuse_connect(*args, **kwargs):
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(tfds, "load", refuse_tfds)
    monkeypatch.setattr(socket.socket, "connect", refuse_connect)


# ----------------------------------------------------------------- half moons


def _union(ds):
    return (np.concatenate([ds.train_x, ds.test_x]),
            np.concatenate([ds.train_y, ds.test_y]))


def test_half_moons_shapes_dtypes_and_range():
    ds = data.half_moons(n=1000, noise=0.1, seed=0)
    assert ds.name == "half_moons" and ds.num_classes == 2
    assert ds.train_x.shape == (800, 2) and ds.test_x.shape == (200, 2)
    assert ds.train_y.shape == (800,) and ds.test_y.shape == (200,)
    assert ds.train_x.dtype == np.float32 and ds.test_x.dtype == np.float32
    assert ds.train_y.dtype == np.int32 and ds.test_y.dtype == np.int32
    assert ds.input_shape == (2,)
    x, y = _union(ds)
    np.testing.assert_array_equal(x.min(axis=0), [0.0, 0.0])
    np.testing.assert_array_equal(x.max(axis=0), [1.0, 1.0])
    assert set(np.unique(y)) == {0, 1}


@pytest.mark.parametrize("n", [1000, 1001, 2])
def test_half_moons_classes_are_balanced(n):
    _, y = _union(data.half_moons(n=n, seed=3))
    np.testing.assert_array_equal(np.bincount(y, minlength=2),
                                  [n // 2, n - n // 2])


@pytest.mark.parametrize("n, test_fraction, n_test", [
    (1000, 0.2, 200),
    (10, 0.3, 3),
    (2, 0.2, 1),  # Clamped up: the test set is never empty.
    (5, 0.99, 4),  # Clamped down: the train set is never empty.
])
def test_half_moons_split_sizes(n, test_fraction, n_test):
    ds = data.half_moons(n=n, test_fraction=test_fraction)
    assert len(ds.test_y) == n_test and len(ds.test_x) == n_test
    assert len(ds.train_y) == n - n_test and len(ds.train_x) == n - n_test


def test_half_moons_is_deterministic_in_seed():
    a = data.half_moons(n=300, noise=0.2, seed=7)
    b = data.half_moons(n=300, noise=0.2, seed=7)
    c = data.half_moons(n=300, noise=0.2, seed=8)
    for field in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.train_x, c.train_x)


def test_half_moons_noiseless_points_lie_on_the_two_half_circles():
    ds = data.half_moons(n=2000, noise=0.0, seed=1)
    x, y = _union(ds)
    # Undo the min-max scaling with the closed-form noiseless extents
    # x in [-1, 2], y in [-0.5, 1]. The extremes are at stationary points of
    # cos/sin, so 1000 uniform draws per class reach them to ~1e-5.
    u = x[:, 0].astype(np.float64) * 3.0 - 1.0
    v = x[:, 1].astype(np.float64) * 1.5 - 0.5
    upper, lower = y == 0, y == 1
    np.testing.assert_allclose(np.hypot(u[upper], v[upper]), 1.0, atol=1e-3)
    assert np.all(v[upper] >= -1e-3)
    np.testing.assert_allclose(np.hypot(u[lower] - 1.0, v[lower] - 0.5), 1.0,
                               atol=1e-3)
    assert np.all(v[lower] <= 0.5 + 1e-3)


def test_half_moons_noise_moves_points_off_the_circles():
    ds = data.half_moons(n=2000, noise=0.1, seed=1)
    x, y = _union(ds)
    u = x[:, 0].astype(np.float64) * 3.0 - 1.0
    v = x[:, 1].astype(np.float64) * 1.5 - 0.5
    radius = np.hypot(u[y == 0], v[y == 0])
    # Noise of std 0.1 (the extents now only roughly undone) spreads the
    # radii by about 0.1; a noiseless generator would give ~0.
    assert 0.05 < np.std(radius) < 0.2


# ----------------------------------------------------------------- IDX reader


def _idx_bytes(magic, dims, payload):
    return struct.pack(">i", magic) + struct.pack(f">{len(dims)}I",
                                                  *dims) + payload


def _write(path, raw, gz):
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def _write_idx_set(directory, arrays, gz=True):
    """Writes train/test images and labels as IDX files; returns their paths."""
    suffix = ".gz" if gz else ""
    paths = {}
    for key, base in IDX_NAMES.items():
        array = arrays[key]
        magic = 2051 if key.endswith("_x") else 2049
        path = directory / (base + suffix)
        _write(path, _idx_bytes(magic, array.shape, array.tobytes()), gz)
        paths[key] = path
    return paths


def _random_arrays(seed=0, n_train=50, n_test=20):
    rng = np.random.default_rng(seed)
    return {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def _assert_matches(ds, arrays):
    for part in ("train", "test"):
        x, y = getattr(ds, f"{part}_x"), getattr(ds, f"{part}_y")
        assert x.dtype == np.float32 and y.dtype == np.int32
        expected_x = arrays[f"{part}_x"][..., None].astype(np.float32) / 255
        np.testing.assert_array_equal(x, expected_x)
        np.testing.assert_array_equal(y, arrays[f"{part}_y"].astype(np.int32))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_are_decoded_exactly(tmp_path, gz):
    arrays = _random_arrays()
    _write_idx_set(tmp_path, arrays, gz=gz)
    ds = data.mnist(data_dir=str(tmp_path), source="idx")
    assert ds.name == "mnist" and ds.num_classes == 10
    assert ds.train_x.shape == (50, 28, 28, 1)
    assert ds.test_x.shape == (20, 28, 28, 1)
    assert ds.input_shape == (28, 28, 1)
    _assert_matches(ds, arrays)


def test_auto_prefers_idx_in_data_dir_and_accepts_pathlike(tmp_path):
    arrays = _random_arrays(seed=1)
    _write_idx_set(tmp_path, arrays)
    _assert_matches(data.mnist(data_dir=tmp_path), arrays)  # tfds.load refuses.
    _assert_matches(data.fashion_mnist(data_dir=tmp_path, source="idx"),
                    arrays)


def test_idx_cache_returns_fresh_arrays_and_sees_rewritten_files(tmp_path):
    arrays = _random_arrays(seed=2)
    paths = _write_idx_set(tmp_path, arrays)
    first = data.mnist(data_dir=tmp_path, source="idx")
    first.train_x[...] = 0.5
    first.train_y[...] = 7
    _assert_matches(data.mnist(data_dir=tmp_path, source="idx"), arrays)

    new = _random_arrays(seed=3)
    arrays["train_y"] = new["train_y"]
    _write(paths["train_y"],
           _idx_bytes(2049, new["train_y"].shape, new["train_y"].tobytes()),
           gz=True)
    stat = os.stat(paths["train_y"])
    os.utime(paths["train_y"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _assert_matches(data.mnist(data_dir=tmp_path, source="idx"), arrays)


def _corrupt_bad_magic(paths, arrays):
    x = arrays["train_x"]
    _write(paths["train_x"], _idx_bytes(2049, x.shape, x.tobytes()), gz=True)
    return paths["train_x"], "magic"


def _corrupt_truncated(paths, arrays):
    x = arrays["test_x"]
    _write(paths["test_x"], _idx_bytes(2051, x.shape, x.tobytes()[:-10]),
           gz=True)
    return paths["test_x"], "truncated"


def _corrupt_trailing_bytes(paths, arrays):
    y = arrays["test_y"]
    _write(paths["test_y"], _idx_bytes(2049, y.shape, y.tobytes() + b"\0"),
           gz=True)
    return paths["test_y"], "trailing"


def _corrupt_count_mismatch(paths, arrays):
    y = arrays["train_y"][:-1]
    _write(paths["train_y"], _idx_bytes(2049, y.shape, y.tobytes()), gz=True)
    return paths["train_x"], "49 labels"


def _corrupt_label_range(paths, arrays):
    y = arrays["train_y"].copy()
    y[3] = 10
    _write(paths["train_y"], _idx_bytes(2049, y.shape, y.tobytes()), gz=True)
    return paths["train_y"], r"\[0, 9\]"


def _corrupt_image_size(paths, arrays):
    x = arrays["test_x"][:, :27, :27].copy()
    _write(paths["test_x"], _idx_bytes(2051, x.shape, x.tobytes()), gz=True)
    return paths["test_x"], "28x28"


def _corrupt_not_gzip(paths, arrays):
    paths["train_y"].write_bytes(b"this is not gzip data")
    return paths["train_y"], "cannot read"


@pytest.mark.parametrize("corrupt", [
    _corrupt_bad_magic, _corrupt_truncated, _corrupt_trailing_bytes,
    _corrupt_count_mismatch, _corrupt_label_range, _corrupt_image_size,
    _corrupt_not_gzip,
])
def test_corrupt_idx_raises_value_error_naming_the_file(tmp_path, corrupt):
    arrays = _random_arrays(seed=4)
    paths = _write_idx_set(tmp_path, arrays)
    bad_path, what = corrupt(paths, arrays)
    with pytest.raises(ValueError, match=what) as info:
        data.mnist(data_dir=tmp_path, source="idx")
    assert bad_path.name in str(info.value)


def test_missing_idx_file_raises_file_not_found(tmp_path):
    paths = _write_idx_set(tmp_path, _random_arrays())
    paths["test_y"].unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data.mnist(data_dir=tmp_path, source="idx")


@pytest.mark.parametrize("keep", [(), ("train_x", "train_y", "test_x")])
@pytest.mark.parametrize("loader", [data.mnist, data.fashion_mnist])
def test_explicit_data_dir_without_the_files_is_an_error(tmp_path, monkeypatch,
                                                          loader, keep):
    # A complete set elsewhere (standing in for Debian's copy) must not be
    # substituted for the directory the caller named, nor a download.
    debian = tmp_path / "debian"
    debian.mkdir()
    _write_idx_set(debian, _random_arrays(seed=6))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", str(debian))
    given = tmp_path / "given"
    given.mkdir()
    arrays = _random_arrays(seed=7)
    for key in keep:
        (given / (IDX_NAMES[key] + ".gz")).write_bytes(
            gzip.compress(_idx_bytes(2051 if key.endswith("_x") else 2049,
                                     arrays[key].shape, arrays[key].tobytes())))
    downloads = []

    def not_prepared(name, **kwargs):
        downloads.append(kwargs["download"])
        raise AssertionError(f"Dataset {name}: could not find data")

    monkeypatch.setattr(tfds, "load", not_prepared)
    with pytest.raises(FileNotFoundError) as info:
        loader(data_dir=given)
    message = str(info.value)
    assert str(given) in message and "source='tfds'" in message
    for key, base in IDX_NAMES.items():
        assert (base in message) == (key not in keep), (base, message)
    assert str(debian) not in message
    assert downloads == [False]


# ------------------------------------------------------- real Fashion-MNIST


def _read_idx_independently(path, header_size):
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header_size)


@pytest.fixture(scope="module")
def fashion():
    missing = [n for n in IDX_NAMES.values()
               if not (FASHION_DIR / (n + ".gz")).is_file()]
    if missing:
        pytest.fail(f"Fashion-MNIST IDX files {missing} are missing from "
                    f"{FASHION_DIR}; run "
                    f"`apt-get install dataset-fashion-mnist`")
    return data.fashion_mnist(source="idx")


def test_real_fashion_mnist_shapes_range_and_known_labels(fashion):
    assert fashion.name == "fashion_mnist" and fashion.num_classes == 10
    assert fashion.train_x.shape == (60000, 28, 28, 1)
    assert fashion.test_x.shape == (10000, 28, 28, 1)
    assert fashion.train_x.dtype == np.float32
    assert fashion.train_y.dtype == np.int32
    for x in (fashion.train_x, fashion.test_x):
        assert x.min() == 0.0 and x.max() == 1.0
    # Fashion-MNIST is exactly balanced; its first training image is an
    # ankle boot (class 9).
    np.testing.assert_array_equal(np.bincount(fashion.train_y), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(fashion.test_y), [1000] * 10)
    assert fashion.train_y[0] == 9


def test_real_fashion_mnist_matches_an_independent_decode(fashion):
    labels = _read_idx_independently(
        FASHION_DIR / "train-labels-idx1-ubyte.gz", 8)
    np.testing.assert_array_equal(fashion.train_y, labels)
    labels = _read_idx_independently(
        FASHION_DIR / "t10k-labels-idx1-ubyte.gz", 8)
    np.testing.assert_array_equal(fashion.test_y, labels)
    pixels = _read_idx_independently(
        FASHION_DIR / "t10k-images-idx3-ubyte.gz", 16)
    expected = pixels.reshape(10000, 28, 28, 1).astype(np.float32) / 255
    np.testing.assert_array_equal(fashion.test_x, expected)


def test_fashion_auto_falls_back_to_debian_without_downloading(
        fashion, monkeypatch):
    downloads = []

    def not_prepared(name, **kwargs):
        downloads.append(kwargs["download"])
        raise AssertionError(f"Dataset {name}: could not find data")

    monkeypatch.setattr(tfds, "load", not_prepared)
    ds = data.fashion_mnist()
    assert downloads == [False]
    np.testing.assert_array_equal(ds.test_x, fashion.test_x)
    np.testing.assert_array_equal(ds.train_y, fashion.train_y)


# ----------------------------------------------------------------------- TFDS


def _fake_tfds_splits(seed=0, n_train=12, n_test=5):
    """What tfds.load(batch_size=-1, as_supervised=True) returns, and arrays."""
    arrays = _random_arrays(seed, n_train, n_test)
    splits = [(tf.constant(arrays[f"{part}_x"][..., None]),
               tf.constant(arrays[f"{part}_y"].astype(np.int64)))
              for part in ("train", "test")]
    return splits, arrays


@pytest.mark.parametrize("loader, name", [
    (data.mnist, "mnist"), (data.fashion_mnist, "fashion_mnist")])
def test_tfds_source_converts_tensors(tmp_path, monkeypatch, loader, name):
    splits, arrays = _fake_tfds_splits()
    calls = []

    def fake_load(name, **kwargs):
        calls.append((name, kwargs))
        return splits

    monkeypatch.setattr(tfds, "load", fake_load)
    ds = loader(data_dir=tmp_path, source="tfds")
    assert ds.name == name and ds.num_classes == 10
    assert ds.train_x.shape == (12, 28, 28, 1) and ds.test_y.shape == (5,)
    _assert_matches(ds, arrays)
    [(called_name, kwargs)] = calls
    assert called_name == name
    assert kwargs["split"] == ["train", "test"]
    assert kwargs["batch_size"] == -1 and kwargs["as_supervised"] is True
    assert kwargs["data_dir"] == str(tmp_path)


def test_auto_uses_prepared_tfds_without_downloading(monkeypatch):
    splits, arrays = _fake_tfds_splits(seed=5)
    downloads = []

    def prepared(name, **kwargs):
        downloads.append(kwargs["download"])
        return splits

    monkeypatch.setattr(tfds, "load", prepared)
    _assert_matches(data.mnist(), arrays)
    assert downloads == [False]


def test_auto_without_any_source_raises_a_clear_error(monkeypatch):
    downloads = []

    def unavailable(name, **kwargs):
        downloads.append(kwargs["download"])
        raise OSError("no internet")

    monkeypatch.setattr(tfds, "load", unavailable)
    with pytest.raises(FileNotFoundError) as info:
        data.mnist()
    message = str(info.value)
    assert downloads == [False, True]
    for needle in ("data_dir", "download=False", "TFDS download",
                   "tfds build mnist", "t10k-images-idx3-ubyte.gz",
                   "no internet"):
        assert needle in message, (needle, message)
    assert "apt-get" not in message  # There is no Debian package for MNIST.


def test_fashion_auto_without_any_source_suggests_apt(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        data.fashion_mnist()
    message = str(info.value)
    for needle in ("apt-get install dataset-fashion-mnist", str(tmp_path),
                   "data_dir", "tfds build fashion_mnist"):
        assert needle in message, (needle, message)


def test_tfds_source_failure_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="disabled in tests"):
        data.mnist(data_dir=tmp_path, source="tfds")


def test_malformed_tfds_output_raises(monkeypatch):
    splits = [(tf.zeros([3, 28, 28, 1], tf.float32), tf.zeros([3], tf.int64))
              ] * 2
    monkeypatch.setattr(tfds, "load", lambda name, **kwargs: splits)
    with pytest.raises(ValueError, match="uint8"):
        data.mnist(source="tfds")


# -------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kwargs, error, arg", [
    (dict(n=1), ValueError, "n"),
    (dict(n=10.0), TypeError, "n"),
    (dict(n=True), TypeError, "n"),
    (dict(noise=-0.1), ValueError, "noise"),
    (dict(noise=float("nan")), ValueError, "noise"),
    (dict(noise="0.1"), TypeError, "noise"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(test_fraction=0.0), ValueError, "test_fraction"),
    (dict(test_fraction=1.0), ValueError, "test_fraction"),
    (dict(test_fraction=-0.5), ValueError, "test_fraction"),
])
def test_half_moons_bad_arguments(kwargs, error, arg):
    ((_, value),) = kwargs.items()
    with pytest.raises(error, match=rf"^{arg} ") as info:
        data.half_moons(**kwargs)
    assert repr(value) in str(info.value) or str(value) in str(info.value)


def test_image_loaders_validate_before_any_work(tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("loading started before validation")

    monkeypatch.setattr(tfds, "load", must_not_run)
    with pytest.raises(ValueError, match="source.*'web'"):
        data.fashion_mnist(source="web")
    with pytest.raises(ValueError, match="data_dir.*no-such-dir"):
        data.mnist(data_dir=tmp_path / "no-such-dir")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="data_dir.*a-file"):
        data.mnist(data_dir=tmp_path / "a-file")
    with pytest.raises(TypeError, match="data_dir.*123"):
        data.mnist(data_dir=123)
    with pytest.raises(ValueError, match="data_dir.*None"):
        data.mnist(source="idx")


def test_load_dataset_dispatches():
    assert data.DATASET_NAMES == ("half_moons", "mnist", "fashion_mnist")
    a = data.load_dataset("half_moons", n=40, noise=0.3, seed=2,
                          test_fraction=0.5)
    b = data.half_moons(n=40, noise=0.3, seed=2, test_fraction=0.5)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    np.testing.assert_array_equal(a.test_y, b.test_y)


def test_load_dataset_dispatches_to_image_loaders(tmp_path):
    arrays = _random_arrays(seed=6)
    _write_idx_set(tmp_path, arrays)
    ds = data.load_dataset("mnist", data_dir=tmp_path, source="idx")
    assert ds.name == "mnist"
    _assert_matches(ds, arrays)
    ds = data.load_dataset("fashion_mnist", data_dir=tmp_path)
    assert ds.name == "fashion_mnist"
    _assert_matches(ds, arrays)


def test_load_dataset_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="cifar10") as info:
        data.load_dataset("cifar10")
    for name in data.DATASET_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match=r"\['n'\]"):
        data.load_dataset("mnist", data_dir=tmp_path, n=5)
    with pytest.raises(ValueError, match="data_dir"):
        data.load_dataset("half_moons", data_dir=tmp_path)
    with pytest.raises(ValueError, match="source"):
        data.load_dataset("half_moons", source="idx")
    with pytest.raises(TypeError, match="bogus"):
        data.load_dataset("half_moons", bogus=1)


def test_dataset_rejects_inconsistent_arrays():
    x = np.zeros([4, 2], np.float32)
    y = np.zeros([4], np.int32)
    with pytest.raises(TypeError, match="train_x"):
        data.Dataset("d", x.astype(np.float64), y, x, y, 2)
    with pytest.raises(TypeError, match="test_y"):
        data.Dataset("d", x, y, x, y.astype(np.int64), 2)
    with pytest.raises(ValueError, match="train_y"):
        data.Dataset("d", x, y[:3], x, y, 2)
    with pytest.raises(ValueError, match="input shape"):
        data.Dataset("d", x, y, np.zeros([4, 3], np.float32), y, 2)
    with pytest.raises(ValueError, match="num_classes"):
        data.Dataset("d", x, y, x, y, 0)


# --------------------------------------------------------------------- subset


def _indexed_dataset(n_train=100, n_test=40):
    """Rows whose single feature encodes their index, to recover them."""
    return data.Dataset(
        name="indexed",
        train_x=(np.arange(n_train, dtype=np.float32) / n_train)[:, None],
        train_y=(np.arange(n_train) % 7).astype(np.int32),
        test_x=(np.arange(n_test, dtype=np.float32) / n_test)[:, None],
        test_y=(np.arange(n_test) % 7).astype(np.int32),
        num_classes=7)


def _rows(x, n):
    return np.rint(x[:, 0].astype(np.float64) * n).astype(int)


def test_subset_sizes_rows_and_no_duplicates():
    full = _indexed_dataset()
    sub = full.subset(num_train=30, num_test=10, seed=4)
    assert sub.train_x.shape == (30, 1) and sub.test_x.shape == (10, 1)
    assert sub.name == "indexed" and sub.num_classes == 7
    for part, n in (("train", 100), ("test", 40)):
        rows = _rows(getattr(sub, f"{part}_x"), n)
        assert len(np.unique(rows)) == len(rows)
        assert rows.min() >= 0 and rows.max() < n
        np.testing.assert_array_equal(getattr(sub, f"{part}_y"), rows % 7)


def test_subset_is_deterministic_and_none_keeps_all():
    full = _indexed_dataset()
    a = full.subset(num_train=30, seed=4)
    b = full.subset(num_train=30, seed=4)
    c = full.subset(num_train=30, seed=5)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    assert not np.array_equal(a.train_x, c.train_x)
    np.testing.assert_array_equal(a.test_x, full.test_x)
    np.testing.assert_array_equal(a.test_y, full.test_y)
    # The train draw does not depend on whether test is subset too.
    d = full.subset(num_train=30, num_test=5, seed=4)
    np.testing.assert_array_equal(a.train_x, d.train_x)
    # The subset owns its arrays.
    a.test_x[...] = -1.0
    assert full.test_x.min() == 0.0


def test_subset_of_all_rows_is_a_permutation_free_copy():
    full = _indexed_dataset()
    sub = full.subset(num_train=100, num_test=40, seed=9)
    np.testing.assert_array_equal(sub.train_x, full.train_x)
    np.testing.assert_array_equal(sub.test_y, full.test_y)


@pytest.mark.parametrize("kwargs, error, arg", [
    (dict(num_train=0), ValueError, "num_train"),
    (dict(num_train=101), ValueError, "num_train"),
    (dict(num_test=41), ValueError, "num_test"),
    (dict(num_test=-3), ValueError, "num_test"),
    (dict(num_train=2.0), TypeError, "num_train"),
    (dict(seed=-1), ValueError, "seed"),
])
def test_subset_bad_arguments(kwargs, error, arg):
    with pytest.raises(error, match=rf"^{arg} "):
        _indexed_dataset().subset(**kwargs)
