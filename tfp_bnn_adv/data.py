"""The project's one data loader: half-moons, MNIST and Fashion-MNIST.

Every loader returns a ``Dataset`` with float32 inputs in [0, 1] and int32
labels, split into train and test. Image sets keep a trailing channel axis, so
their inputs are ``[N, 28, 28, 1]``; half-moons inputs are ``[N, 2]``.

Image sets are read from one of two sources:

* IDX: the four standard ``*-ubyte(.gz)`` files in a directory (the format of
  the original MNIST release and of Debian's ``dataset-fashion-mnist`` package,
  which installs them in ``/usr/share/datasets/fashion-mnist``).
* TFDS: ``tensorflow_datasets.load``, which needs the dataset to have been
  prepared once with internet access (``tfds build mnist``).

Nothing is read or imported at module import time; ``tensorflow_datasets`` is
imported only when a TFDS source is tried.
"""

import dataclasses
import functools
import gzip
import math
import numbers
import os
import struct

import numpy as np

from tfp_bnn_adv import validate

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "HALF_MOONS_SCALINGS",
    "PAPER_POOL_SIZE",
    "fashion_mnist",
    "half_moons",
    "load_dataset",
    "mnist",
]

DATASET_NAMES = ("half_moons", "mnist", "fashion_mnist")

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_SOURCES = ("auto", "idx", "tfds")
_IMAGE_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions.
_LABEL_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension.
_IMAGE_SIDE = 28
_NUM_IMAGE_CLASSES = 10
_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A classification data set split into train and test parts.

    Attributes:
      name: Name of the data set, e.g. ``"fashion_mnist"``.
      train_x: float32 ``[N_train, *input_shape]``, values in [0, 1].
      train_y: int32 ``[N_train]``, values in ``[0, num_classes)``.
      test_x: float32 ``[N_test, *input_shape]``, values in [0, 1].
      test_y: int32 ``[N_test]``, values in ``[0, num_classes)``.
      num_classes: Number of classes (labels are ``0 .. num_classes - 1``).

    Equality is identity (``eq=False``): element-wise array comparison has no
    single truth value.

    Raises:
      TypeError: If an array has the wrong dtype.
      ValueError: If shapes disagree (inputs vs labels, train vs test) or
        ``num_classes < 1``.

    Example:
      >>> ds = half_moons(n=100)
      >>> ds.train_x.shape, ds.input_shape, ds.num_classes
      ((80, 2), (2,), 2)
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int

    def __post_init__(self):
        for field in ("train_x", "test_x"):
            value = getattr(self, field)
            if not isinstance(value, np.ndarray) or value.dtype != np.float32:
                raise TypeError(
                    f"Dataset.{field} must be a float32 numpy array, got "
                    f"{type(value).__name__} of dtype "
                    f"{getattr(value, 'dtype', None)}")
            if value.ndim < 2:
                raise ValueError(
                    f"Dataset.{field} must have shape [N, *input_shape], got "
                    f"{value.shape}")
        for field in ("train_y", "test_y"):
            value = getattr(self, field)
            if not isinstance(value, np.ndarray) or value.dtype != np.int32:
                raise TypeError(
                    f"Dataset.{field} must be an int32 numpy array, got "
                    f"{type(value).__name__} of dtype "
                    f"{getattr(value, 'dtype', None)}")
            if value.ndim != 1:
                raise ValueError(
                    f"Dataset.{field} must have shape [N], got {value.shape}")
        for part in ("train", "test"):
            x, y = getattr(self, f"{part}_x"), getattr(self, f"{part}_y")
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"Dataset.{part}_x has {x.shape[0]} rows but {part}_y has "
                    f"{y.shape[0]}")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(
                f"Dataset.train_x has input shape {self.train_x.shape[1:]} but "
                f"test_x has {self.test_x.shape[1:]}")
        if (not isinstance(self.num_classes, numbers.Integral)
                or isinstance(self.num_classes, bool) or self.num_classes < 1):
            raise ValueError(f"Dataset.num_classes must be an int >= 1, got "
                             f"{self.num_classes!r}")

    @property
    def input_shape(self):
        """Shape of one input, without the batch axis, e.g. ``(28, 28, 1)``."""
        return tuple(self.train_x.shape[1:])

    def subset(self, num_train=None, num_test=None, seed=0):
        """Returns a random subset of the train and/or test rows.

        Rows are drawn without replacement by ``np.random.default_rng`` seeded
        from ``seed`` (no global random state is touched, so the same seed
        gives the same subset) and kept in their original order. Train and
        test rows come from independent streams spawned from ``seed``, so
        changing ``num_test`` does not change the train subset.

        Args:
          num_train: int in ``[1, N_train]``, or None to keep every training
            row.
          num_test: int in ``[1, N_test]``, or None to keep every test row.
          seed: Non-negative int seed.

        Returns:
          A new ``Dataset`` with ``num_train`` / ``num_test`` rows (new arrays;
          this dataset is not modified).

        Raises:
          TypeError: If a size or ``seed`` is not an int.
          ValueError: If a size is < 1 or larger than the rows available, or
            ``seed`` is negative.

        Example:
          >>> small = half_moons(n=100).subset(num_train=10, seed=1)
          >>> small.train_x.shape, small.test_x.shape
          ((10, 2), (20, 2))
        """
        _check_seed(seed)
        sizes = {}
        for arg, value, available in (
                ("num_train", num_train, len(self.train_y)),
                ("num_test", num_test, len(self.test_y))):
            if value is None:
                continue
            validate.integer(value, arg)
            if not 1 <= value <= available:
                raise ValueError(
                    f"{arg} must be in [1, {available}] (the rows available), "
                    f"got {value}")
            sizes[arg] = value
        train_seq, test_seq = np.random.SeedSequence(seed).spawn(2)
        train_x, train_y = _take_rows(self.train_x, self.train_y,
                                      sizes.get("num_train"), train_seq)
        test_x, test_y = _take_rows(self.test_x, self.test_y,
                                    sizes.get("num_test"), test_seq)
        return dataclasses.replace(self, train_x=train_x, train_y=train_y,
                                   test_x=test_x, test_y=test_y)


HALF_MOONS_SCALINGS = ("per_feature", "paper")
# The authors' fixed pool of half-moons points, scaled and sliced.
PAPER_POOL_SIZE = 30000


def _moons_points(n, noise, rng):
    """``n`` unscaled, unshuffled half-moons points: class 0, then class 1.

    Draws ``t0``, ``t1`` and then the noise from ``rng``, in that order.
    Returns float64 ``[n, 2]`` inputs and int32 ``[n]`` labels.
    """
    n0 = n // 2
    n1 = n - n0
    t0 = rng.uniform(0.0, np.pi, size=n0)
    t1 = rng.uniform(0.0, np.pi, size=n1)
    x = np.concatenate([
        np.stack([np.cos(t0), np.sin(t0)], axis=1),
        np.stack([1.0 - np.cos(t1), 1.0 - np.sin(t1) - 0.5], axis=1),
    ])
    y = np.concatenate([np.zeros(n0, np.int32), np.ones(n1, np.int32)])
    if noise > 0:
        x = x + rng.normal(0.0, noise, size=x.shape)
    return x, y


def half_moons(n=1000, noise=0.1, seed=0, test_fraction=0.2, *,
               scaling="per_feature", pool_size=PAPER_POOL_SIZE):
    """Two interleaving half circles, min-max scaled to [0, 1].

    Class 0 is the upper half circle ``(cos t, sin t)``, class 1 the shifted
    lower one ``(1 - cos t, 1 - sin t - 0.5)``, with ``t ~ Uniform[0, pi]``;
    class 0 has ``n // 2`` points and class 1 ``n - n // 2``. Gaussian noise of
    standard deviation ``noise`` is added to both coordinates, then each
    feature is scaled to [0, 1] with the minimum and maximum of all ``n`` points
    (so over train and test together every feature has minimum exactly 0 and
    maximum exactly 1). The points are shuffled and the last
    ``n_test = round(n * test_fraction)`` (clamped to ``[1, n - 1]`` so neither
    split is empty) form the test set.

    ``scaling="paper"`` scales as the authors' code did: a pool of
    ``pool_size`` points (30,000 there) is drawn the same way (class 0 then
    class 1, then the noise, from ``seed``), the whole pool is scaled by ONE
    scalar minimum and maximum (over both features of all its points, so
    neither feature need span [0, 1] exactly), and shuffled once, as
    scikit-learn's ``make_moons`` does; its first ``n`` points, in that
    order, are split by the rule above (the first ``n - n_test`` train, the
    rest test), with no further shuffling (the authors' loader was
    unshuffled).  A point's value does not depend on ``n``: a larger ``n``
    extends the same pool prefix.

    Args:
      n: Total number of points, int >= 2.
      noise: Standard deviation of the Gaussian noise, float >= 0.
      seed: Non-negative int seed for ``np.random.default_rng``; the same seed
        gives identical arrays.
      test_fraction: Fraction of points in the test set, float in (0, 1).
      scaling: ``"per_feature"`` (default: each feature over the ``n``
        points) or ``"paper"`` (one global scale over a fixed pool).
      pool_size: the pool's size with ``scaling="paper"``, int ``>= n``;
        only the default applies to ``scaling="per_feature"``.

    Returns:
      A ``Dataset`` named ``"half_moons"`` with ``num_classes=2``, float32
      inputs ``[N_train, 2]`` / ``[N_test, 2]`` and int32 labels ``[N_train]`` /
      ``[N_test]``.

    Raises:
      TypeError: If ``n``, ``seed`` or ``pool_size`` is not an int, or
        ``noise`` / ``test_fraction`` is not a real number.
      ValueError: If ``n < 2``, ``noise < 0`` or not finite, ``seed < 0``,
        ``test_fraction`` is not in (0, 1), ``scaling`` is not one of
        ``HALF_MOONS_SCALINGS``, ``pool_size < n`` (with ``"paper"``), or
        ``pool_size`` is not the default with ``"per_feature"``.

    Example:
      >>> ds = half_moons(n=1000, noise=0.1, seed=0)
      >>> ds.train_x.shape, ds.test_x.shape, ds.train_x.dtype
      ((800, 2), (200, 2), dtype('float32'))
      >>> paper = half_moons(n=1000, scaling="paper")   # pool of 30,000
    """
    validate.integer(n, "n", minimum=2)
    validate.nonnegative_real(noise, "noise")
    _check_seed(seed)
    validate.real(test_fraction, "test_fraction", minimum=0.0, maximum=1.0,
                  min_open=True, max_open=True)
    validate.choice(scaling, HALF_MOONS_SCALINGS, "scaling")
    validate.integer(pool_size, "pool_size", minimum=2)
    if scaling == "paper" and pool_size < n:
        raise ValueError(f"pool_size must be >= n={n} with scaling='paper', "
                         f"got pool_size={pool_size!r}.")
    if scaling == "per_feature" and pool_size != PAPER_POOL_SIZE:
        raise ValueError(f"pool_size={pool_size!r} applies only to "
                         "scaling='paper'; scaling='per_feature' scales the n "
                         "points themselves.")

    rng = np.random.default_rng(seed)
    if scaling == "per_feature":
        x, y = _moons_points(n, noise, rng)
        lo, hi = x.min(axis=0), x.max(axis=0)
        x = ((x - lo) / (hi - lo)).astype(np.float32)
        order = rng.permutation(n)
    else:
        x, y = _moons_points(pool_size, noise, rng)
        lo, hi = x.min(), x.max()
        x = ((x - lo) / (hi - lo)).astype(np.float32)
        order = rng.permutation(pool_size)[:n]
    x, y = x[order], y[order]
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    n_train = n - n_test
    return Dataset(name="half_moons", train_x=x[:n_train], train_y=y[:n_train],
                   test_x=x[n_train:], test_y=y[n_train:], num_classes=2)


def mnist(data_dir=None, source="auto"):
    """Loads MNIST: 60000 train and 10000 test 28x28 grey-scale digits.

    Sources, for ``source="auto"``, tried in this order:
      1. the four IDX files (``train-images-idx3-ubyte.gz``,
         ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
         ``t10k-labels-idx1-ubyte.gz``, each also accepted without ``.gz``) in
         ``data_dir``, if it is given and holds all four;
      2. TFDS data already prepared in ``data_dir`` (or TFDS's default directory
         when ``data_dir`` is None), loaded with ``download=False``;
      3. only when ``data_dir`` is None: a TFDS download into TFDS's default
         directory.
    An explicit ``data_dir`` holding neither is an error naming the missing
    IDX files: no other copy is substituted for the directory the caller
    named.  ``source="idx"`` uses only step 1 and ``source="tfds"`` only a
    TFDS load (with download).

    Decoded IDX files are cached in-process per (path, modification time,
    size); every call returns fresh arrays, so callers cannot corrupt the cache.

    Args:
      data_dir: Directory (str or path-like) holding the IDX files and/or the
        TFDS data, or None. Required for ``source="idx"``.
      source: One of ``"auto"``, ``"idx"``, ``"tfds"``.

    Returns:
      A ``Dataset`` named ``"mnist"`` with ``num_classes=10``, float32 inputs
      ``[60000, 28, 28, 1]`` / ``[10000, 28, 28, 1]`` equal to the uint8 pixels
      divided by 255, and int32 labels ``[60000]`` / ``[10000]`` in [0, 9].

    Raises:
      TypeError: If ``data_dir`` is not None, a str or a path-like object.
      ValueError: If ``source`` is not one of the allowed values, ``data_dir``
        is not an existing directory, ``source="idx"`` without ``data_dir``, or
        the data are corrupt (unreadable file, bad magic number, wrong
        dimensions, truncated payload, images/labels count mismatch, labels
        outside [0, 9]); the message names the file.
      FileNotFoundError: If no source has the data, or an explicit
        ``data_dir`` lacks them. The message names the missing IDX files,
        lists every place tried and how to get the data.

    Example:
      >>> ds = mnist(data_dir="/data/mnist")  # doctest: +SKIP
      >>> ds.train_x.shape, ds.input_shape  # doctest: +SKIP
      ((60000, 28, 28, 1), (28, 28, 1))
    """
    return _load_image_dataset("mnist", data_dir, source, debian_dir=None)


def fashion_mnist(data_dir=None, source="auto"):
    """Loads Fashion-MNIST: 60000 train and 10000 test 28x28 clothing images.

    Same sources as ``mnist``, plus Debian's ``dataset-fashion-mnist`` package,
    whose IDX files are in ``/usr/share/datasets/fashion-mnist``:
      * ``source="idx"`` reads ``data_dir``, or the Debian directory when
        ``data_dir`` is None;
      * ``source="auto"`` tries the IDX files in ``data_dir``, then prepared
        TFDS data (``download=False``); then, only when ``data_dir`` is None,
        the Debian directory and a TFDS download.  An explicit ``data_dir``
        without the data is an error naming the missing files, never
        replaced by the Debian copy.

    Args:
      data_dir: Directory (str or path-like) holding the IDX files and/or the
        TFDS data, or None.
      source: One of ``"auto"``, ``"idx"``, ``"tfds"``.

    Returns:
      A ``Dataset`` named ``"fashion_mnist"`` with ``num_classes=10``, float32
      inputs ``[60000, 28, 28, 1]`` / ``[10000, 28, 28, 1]`` equal to the uint8
      pixels divided by 255, and int32 labels ``[60000]`` / ``[10000]`` in
      [0, 9].

    Raises:
      TypeError: If ``data_dir`` is not None, a str or a path-like object.
      ValueError: If ``source`` is not one of the allowed values, ``data_dir``
        is not an existing directory, or the data are corrupt (see ``mnist``).
      FileNotFoundError: If no source has the data, or an explicit
        ``data_dir`` lacks them. The message names the missing IDX files,
        lists every place tried and how to get the data (e.g.
        ``apt-get install dataset-fashion-mnist``).

    Example:
      >>> ds = fashion_mnist(source="idx")  # doctest: +SKIP
      >>> int(ds.train_y[0])  # Ankle boot.  # doctest: +SKIP
      9
    """
    return _load_image_dataset("fashion_mnist", data_dir, source,
                               debian_dir=DEBIAN_FASHION_MNIST_DIR)


def load_dataset(name, *, data_dir=None, source="auto", **kwargs):
    """Loads a data set by name; the single entry point for launch scripts.

    Args:
      name: One of ``DATASET_NAMES``: ``"half_moons"``, ``"mnist"``,
        ``"fashion_mnist"``.
      data_dir: Passed to ``mnist`` / ``fashion_mnist``; must be None for
        ``"half_moons"``.
      source: Passed to ``mnist`` / ``fashion_mnist``; must be ``"auto"`` for
        ``"half_moons"``.
      **kwargs: ``n``, ``noise``, ``seed``, ``test_fraction``, ``scaling``,
        ``pool_size`` for ``half_moons``; must be empty for the image sets.

    Returns:
      The ``Dataset`` built by the named loader (see its docstring for shapes).

    Raises:
      ValueError: If ``name`` is unknown (the message lists the valid names), or
        an argument does not apply to the named data set; plus whatever the
        named loader raises.
      TypeError: If ``kwargs`` holds a keyword ``half_moons`` does not take.

    Example:
      >>> ds = load_dataset("half_moons", n=200, seed=3)
      >>> ds.train_x.shape
      (160, 2)
    """
    if name not in DATASET_NAMES:
        raise ValueError(
            f"name must be one of {DATASET_NAMES}, got {name!r}")
    if name == "half_moons":
        if data_dir is not None:
            raise ValueError(
                f"data_dir does not apply to 'half_moons', got {data_dir!r}")
        if source != "auto":
            raise ValueError(
                f"source does not apply to 'half_moons', got {source!r}")
        return half_moons(**kwargs)
    if kwargs:
        raise ValueError(
            f"{name!r} takes only data_dir and source, got extra arguments "
            f"{sorted(kwargs)}")
    loader = mnist if name == "mnist" else fashion_mnist
    return loader(data_dir=data_dir, source=source)


def _check_seed(seed):
    # Any int >= 0: numpy's SeedSequence and default_rng take big ints, so
    # validate.seed_int's int32 bound would refuse seeds that work here.
    validate.integer(seed, "seed", minimum=0)


def _take_rows(x, y, size, seed_seq):
    if size is None:
        return x.copy(), y.copy()
    rows = np.sort(np.random.default_rng(seed_seq).choice(
        len(y), size=size, replace=False))
    return x[rows], y[rows]


def _load_image_dataset(name, data_dir, source, debian_dir):
    """Validates the arguments, then tries the sources (see ``mnist``)."""
    if source not in _SOURCES:
        raise ValueError(f"source must be one of {_SOURCES}, got {source!r}")
    if data_dir is not None:
        if not isinstance(data_dir, (str, os.PathLike)):
            raise TypeError(
                f"data_dir must be None, a str or a path-like object, got "
                f"{data_dir!r} ({type(data_dir).__name__})")
        data_dir = os.fspath(data_dir)
        if not os.path.isdir(data_dir):
            raise ValueError(
                f"data_dir must be an existing directory, got {data_dir!r}")

    if source == "idx":
        idx_dir = data_dir if data_dir is not None else debian_dir
        if idx_dir is None:
            raise ValueError(
                f"data_dir is required for source='idx' with {name!r}, got "
                f"None")
        paths, missing = _find_idx_files(idx_dir)
        if missing:
            raise FileNotFoundError(
                f"No {name} data: IDX files missing in {idx_dir!r}: "
                f"{', '.join(missing)}.\n{_how_to_get(name, debian_dir)}")
        return _dataset_from_idx(name, paths)

    tfds_where = f"TFDS data_dir={data_dir!r}" if data_dir else (
        "the default TFDS data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)")
    if source == "tfds":
        try:
            splits = _tfds_load(name, data_dir, download=True)
        except _TfdsUnavailable as e:
            raise FileNotFoundError(
                f"No {name} data: tensorflow_datasets.load({name!r}) in "
                f"{tfds_where} failed: {e}\n"
                f"{_how_to_get(name, debian_dir)}") from e
        return _dataset_from_tfds(name, splits)

    # source == "auto": each failed attempt is recorded for the final error.
    tried = []
    if data_dir is None:
        tried.append("IDX files in data_dir: data_dir not given (None)")
    else:
        paths, missing = _find_idx_files(data_dir)
        if not missing:
            return _dataset_from_idx(name, paths)
        tried.append(
            f"IDX files in {data_dir!r}: missing {', '.join(missing)}")
    try:
        return _dataset_from_tfds(
            name, _tfds_load(name, data_dir, download=False))
    except _TfdsUnavailable as e:
        tried.append(f"prepared TFDS data (download=False) in {tfds_where}: "
                     f"{e}")
    if data_dir is not None:
        # The user named where the data are: loading another copy (Debian's,
        # or a download) instead would hide a wrong or incomplete directory.
        raise FileNotFoundError(
            f"No {name} data in data_dir={data_dir!r}: IDX files missing: "
            f"{', '.join(missing)}; and no prepared TFDS data there. Tried:\n"
            + "".join(f"  - {t}\n" for t in tried)
            + "Put the four IDX files there, pass source='tfds' to download "
            "into it, or leave data_dir unset to use the other sources.")
    if debian_dir is not None:
        paths, missing = _find_idx_files(debian_dir)
        if not missing:
            return _dataset_from_idx(name, paths)
        tried.append(f"IDX files in {debian_dir!r} (Debian package "
                     f"dataset-fashion-mnist): missing {', '.join(missing)}")
    try:
        return _dataset_from_tfds(
            name, _tfds_load(name, data_dir, download=True))
    except _TfdsUnavailable as e:
        tried.append(f"TFDS download into {tfds_where}: {e}")
    raise FileNotFoundError(
        f"No {name} data found. Tried:\n"
        + "".join(f"  - {t}\n" for t in tried)
        + _how_to_get(name, debian_dir))


class _TfdsUnavailable(Exception):
    """A TFDS load failed; the message is the cause's type and first line."""


def _how_to_get(name, debian_dir):
    ways = []
    if debian_dir is not None:
        ways.append(f"`apt-get install dataset-{name.replace('_', '-')}` "
                    f"(installs the IDX files in {debian_dir})")
    ways.append(
        "download the four IDX files (" + ", ".join(
            f"{f}.gz" for f in _IDX_FILES.values())
        + ") into a directory and pass data_dir=<that directory>")
    ways.append(f"run `tfds build {name}` (or tensorflow_datasets.load("
                f"{name!r})) once with internet access")
    return "To get the data: " + "; or ".join(ways) + "."


def _find_idx_files(directory):
    """Returns ({key: path}, [missing names]) for the four IDX files."""
    paths, missing = {}, []
    for key, base in _IDX_FILES.items():
        for candidate in (base + ".gz", base):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                paths[key] = path
                break
        else:
            missing.append(base + "[.gz]")
    return paths, missing


def _dataset_from_idx(name, paths):
    images = {part: _read_idx(paths[f"{part}_x"], _IMAGE_MAGIC)
              for part in ("train", "test")}
    labels = {part: _read_idx(paths[f"{part}_y"], _LABEL_MAGIC)
              for part in ("train", "test")}
    for part in ("train", "test"):
        x_path, y_path = paths[f"{part}_x"], paths[f"{part}_y"]
        if images[part].shape[1:] != (_IMAGE_SIDE, _IMAGE_SIDE):
            raise ValueError(
                f"{x_path}: expected {_IMAGE_SIDE}x{_IMAGE_SIDE} images, got "
                f"{images[part].shape[1]}x{images[part].shape[2]}")
        if len(images[part]) != len(labels[part]):
            raise ValueError(
                f"{x_path} has {len(images[part])} images but {y_path} has "
                f"{len(labels[part])} labels")
        _check_labels(labels[part], y_path)
    return Dataset(
        name=name,
        train_x=_to_unit_float(images["train"][..., np.newaxis]),
        train_y=labels["train"].astype(np.int32),
        test_x=_to_unit_float(images["test"][..., np.newaxis]),
        test_y=labels["test"].astype(np.int32),
        num_classes=_NUM_IMAGE_CLASSES)


def _read_idx(path, magic):
    """Reads an unsigned-byte IDX file; the result is cached and read-only."""
    stat = os.stat(path)
    return _read_idx_cached(os.path.realpath(path), stat.st_mtime_ns,
                            stat.st_size, magic)


@functools.lru_cache(maxsize=16)
def _read_idx_cached(path, mtime_ns, size, magic):
    del mtime_ns, size  # Only part of the cache key: a rewritten file reloads.
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(
            f"{path}: cannot read ({type(e).__name__}: {e})") from e
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(
            f"{path}: truncated header ({len(raw)} bytes, expected at least "
            f"{header_size})")
    (found_magic,) = struct.unpack(">i", raw[:4])
    if found_magic != magic:
        raise ValueError(
            f"{path}: bad magic number {found_magic}, expected {magic} "
            f"({'images' if magic == _IMAGE_MAGIC else 'labels'}, unsigned "
            f"bytes, {ndim} dimension(s))")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    if ndim > 1 and min(dims[1:]) < 1:
        raise ValueError(f"{path}: bad dimensions {dims}")
    expected = math.prod(dims)
    payload = len(raw) - header_size
    if payload != expected:
        problem = ("truncated payload" if payload < expected
                   else "trailing bytes")
        raise ValueError(
            f"{path}: {problem}: header dimensions {dims} need {expected} "
            f"bytes after the {header_size}-byte header, found {payload}")
    array = np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)
    array.setflags(write=False)
    return array


def _check_labels(labels, where):
    if labels.size and (labels.min() < 0 or labels.max() >= _NUM_IMAGE_CLASSES):
        raise ValueError(
            f"{where}: labels must be in [0, {_NUM_IMAGE_CLASSES - 1}], found "
            f"values in [{labels.min()}, {labels.max()}]")


def _to_unit_float(pixels):
    x = pixels.astype(np.float32)
    x /= np.float32(255.0)
    return x


def _tfds_load(name, data_dir, download):
    """``tfds.load`` of both splits; a failure raises ``_TfdsUnavailable``."""
    # TFDS raises assorted exception types for "not installed", "not prepared"
    # and network failures; each only means this source is unavailable.
    try:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
        return tfds.load(name, split=["train", "test"], data_dir=data_dir,
                         batch_size=-1, as_supervised=True, download=download)
    except Exception as e:  # pylint: disable=broad-except
        text = str(e).strip()
        first_line = text.splitlines()[0] if text else "(no message)"
        raise _TfdsUnavailable(f"{type(e).__name__}: {first_line}") from e


def _dataset_from_tfds(name, splits):
    """Converts ``[(images, labels)] * 2`` from ``tfds.load`` to a Dataset."""
    arrays = {}
    for part, (images, labels) in zip(("train", "test"), splits):
        images, labels = np.asarray(images), np.asarray(labels)
        where = f"tensorflow_datasets.load({name!r}) split {part!r}"
        if (images.dtype != np.uint8 or images.ndim != 4
                or images.shape[1:] != (_IMAGE_SIDE, _IMAGE_SIDE, 1)):
            raise ValueError(
                f"{where}: expected uint8 images [N, 28, 28, 1], got "
                f"{images.dtype} {images.shape}")
        if labels.shape != images.shape[:1]:
            raise ValueError(
                f"{where}: {images.shape[0]} images but labels of shape "
                f"{labels.shape}")
        _check_labels(labels, where)
        arrays[part] = (_to_unit_float(images), labels.astype(np.int32))
    return Dataset(name=name, train_x=arrays["train"][0],
                   train_y=arrays["train"][1], test_x=arrays["test"][0],
                   test_y=arrays["test"][1], num_classes=_NUM_IMAGE_CLASSES)
