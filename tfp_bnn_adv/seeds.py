"""Stateless seeds and random draws that are the same on every compile path.

``tfp.random.sanitize_seed`` turns a Python int into a seed with a *stateful*
op, so two calls with ``seed=7`` differ.  Every public function here takes an
int (or a shape-``[2]`` stateless seed) and converts it with :func:`stateless`.

Path independence: TensorFlow's CPU kernels and XLA agree on one thing
only, measured on TF 2.21: full-range ``int32``/``int64`` draws, splits and
folds with ``alg="philox"`` named explicitly.  Everything else differs
between ``jit_compile=True`` and ``False`` for the same seed: float
uniforms and normals (another bits-to-float mapping), ``uint32`` and
bounded-integer draws, and the default ``"auto_select"`` algorithm for some
seeds (which ``tfp.random.split_seed`` uses).  So every draw here starts
from full-range Philox ``int32`` bits and is shaped with ordinary
arithmetic, the same ops on both paths: seeds (:func:`split`,
:func:`fold_in`), integers (:func:`integers`, a multiply-shift), uniforms
(a 24- or 53-bit grid, exact) and normals (Box-Muller).  Integer and uniform
draws agree bit for bit; normals can differ in the last bit, where XLA's and
Eigen's ``log``/``cos`` round differently.  :func:`portable_samplers` makes
TFP's MCMC kernels draw and split seeds through these functions while a
function is traced.
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np
import tensorflow as tf
from tensorflow_probability.python.internal import samplers as _tfp_samplers

__all__ = ["stateless", "split", "fold_in", "bits", "integers", "uniform",
           "normal", "portable_samplers", "ALGORITHM"]

_MAX = 2**31 - 1
# The one counter-based generator every draw in the package uses.
ALGORITHM = "philox"


def stateless(seed) -> tf.Tensor:
    """A shape-``[2]`` int32 stateless seed from an int or a seed tensor.

    Args:
      seed: an int in ``[0, 2**31 - 1]``, or a shape-``[2]`` integer array or
        tensor (returned as int32).

    Returns:
      int32 tensor ``[2]``; the same input always gives the same seed.

    Raises:
      TypeError/ValueError: for anything else (e.g. ``None``, a negative int).
    """
    if isinstance(seed, bool):
        raise TypeError(f"seed must be an int or a shape-[2] seed, got {seed!r}.")
    if isinstance(seed, (int, np.integer)):
        if not 0 <= seed <= _MAX:
            raise ValueError(f"seed must be in [0, {_MAX}], got {seed!r}.")
        return tf.constant([int(seed), 0], tf.int32)
    if seed is None:
        raise TypeError("seed must be an int or a shape-[2] seed, got None; "
                        "results must be reproducible, so pass a seed.")
    t = tf.convert_to_tensor(seed)
    if not t.dtype.is_integer or t.shape.as_list() != [2]:
        raise ValueError(f"seed must be an int or a shape-[2] integer seed, got "
                         f"{seed!r}.")
    return tf.cast(t, tf.int32)


def split(seed, n: int) -> tf.Tensor:
    """``n`` independent stateless seeds, int32 ``[n, 2]`` (Philox)."""
    return tf.cast(tf.random.split(stateless(seed), n, alg=ALGORITHM),
                   tf.int32)


def fold_in(seed, data) -> tf.Tensor:
    """A new int32 ``[2]`` seed from ``seed`` and an integer ``data`` (a step)."""
    folded = tf.random.experimental.stateless_fold_in(
        stateless(seed), tf.cast(data, tf.int64), alg=ALGORITHM)
    # TFP's samplers want int32 seeds; the cast keeps it a pure function.
    return tf.cast(folded, tf.int32)


def bits(shape, seed) -> tf.Tensor:
    """Uniform random 32-bit words, ``uint32`` of ``shape`` (Philox).

    Drawn as full-range ``int32`` (the one integer draw both compile paths
    agree on) and reinterpreted.
    """
    words = tf.random.stateless_uniform(shape, stateless(seed), minval=None,
                                        maxval=None, dtype=tf.int32,
                                        alg=ALGORITHM)
    return tf.bitcast(words, tf.uint32)


def integers(shape, seed, maxval, minval=0, dtype=tf.int32) -> tf.Tensor:
    """Integers on ``[minval, maxval)``: ``floor(u32 * n / 2**32)`` (bias
    below ``n / 2**32``), the same on every path."""
    minval = tf.cast(minval, tf.int64)
    span = tf.cast(maxval, tf.int64) - minval
    wide = tf.cast(bits(shape, seed), tf.uint64) * tf.cast(span, tf.uint64)
    offset = tf.cast(tf.bitwise.right_shift(wide, tf.constant(32, tf.uint64)),
                     tf.int64)
    return tf.cast(minval + offset, dtype)


def _unit(shape, seed, dtype) -> tf.Tensor:
    """Uniform on ``[0, 1)`` on the grid ``k * 2**-m`` (m = 24 or 53)."""
    dtype = tf.as_dtype(dtype)
    if dtype == tf.float64:
        words = bits(tf.concat([[2], tf.reshape(shape, [-1])], 0), seed)
        hi = tf.cast(tf.bitwise.right_shift(words[0], 5), tf.float64)
        lo = tf.cast(tf.bitwise.right_shift(words[1], 6), tf.float64)
        return (hi * 2.0**26 + lo) * 2.0**-53
    if dtype not in (tf.float32, tf.float16, tf.bfloat16):
        raise TypeError(f"dtype must be a floating dtype, got {dtype!r}.")
    words = tf.bitwise.right_shift(bits(shape, seed), 8)
    unit = tf.cast(words, tf.float32) * 2.0**-24
    return tf.cast(unit, dtype)


def uniform(shape, seed, minval=0.0, maxval=1.0, dtype=tf.float32
            ) -> tf.Tensor:
    """Uniform floats on ``[minval, maxval)``, the same on every path."""
    dtype = tf.as_dtype(dtype)
    u = _unit(shape, seed, dtype)
    minval = tf.cast(minval, dtype)
    return minval + u * (tf.cast(maxval, dtype) - minval)


def normal(shape, seed, mean=0.0, stddev=1.0, dtype=tf.float32) -> tf.Tensor:
    """Standard-normal floats by Box-Muller, the same ops on every path."""
    dtype = tf.as_dtype(dtype)
    compute = tf.float64 if dtype == tf.float64 else tf.float32
    s1, s2 = tf.unstack(split(seed, 2))
    # 1 - u lies in (0, 1], so the log is finite.
    radius = tf.sqrt(-2.0 * tf.math.log(1.0 - _unit(shape, s1, compute)))
    angle = (2.0 * math.pi) * _unit(shape, s2, compute)
    z = radius * tf.cos(angle)
    return tf.cast(tf.cast(mean, compute) + tf.cast(stddev, compute) * z, dtype)


# ---------------------------------------------------------------------------
# TFP's kernels draw through tensorflow_probability.python.internal.samplers.
# ---------------------------------------------------------------------------
_PATCHED = ("normal", "uniform", "split_seed", "fold_in")
_ORIGINAL = {name: getattr(_tfp_samplers, name) for name in _PATCHED}
_LOCK = threading.RLock()
_DEPTH = [0]


def _tfp_normal(shape, mean=0.0, stddev=1.0, dtype=tf.float32, seed=None,
                name=None):
    if _tfp_samplers.is_stateful_seed(seed):
        return _ORIGINAL["normal"](shape, mean, stddev, dtype, seed, name)
    with tf.name_scope(name or "portable_normal"):
        seed = _tfp_samplers.sanitize_seed(seed)
        return normal(shape, seed, mean, stddev, dtype)


def _tfp_uniform(shape, minval=0, maxval=None, dtype=tf.float32, seed=None,
                 name=None):
    dtype = tf.as_dtype(dtype)
    if _tfp_samplers.is_stateful_seed(seed) or (
            not dtype.is_floating and maxval is None):
        return _ORIGINAL["uniform"](shape, minval, maxval, dtype, seed, name)
    with tf.name_scope(name or "portable_uniform"):
        seed = _tfp_samplers.sanitize_seed(seed)
        if not dtype.is_floating:
            return integers(shape, seed, maxval, minval, dtype)
        return uniform(shape, seed, minval, 1.0 if maxval is None else maxval,
                       dtype)


def _tfp_fold_in(seed, salt):
    if isinstance(salt, int):  # TFP xors Python salts in: path-independent
        return _ORIGINAL["fold_in"](seed, salt)
    return tf.cast(tf.random.experimental.stateless_fold_in(
        seed, tf.cast(salt, tf.int64), alg=ALGORITHM), tf.int32)


def _tfp_split_seed(seed, n=2, salt=None, name=None):
    if isinstance(n, int) and n < 1:
        return _ORIGINAL["split_seed"](seed, n, salt, name)
    with tf.name_scope(name or "portable_split_seed"):
        seed = _tfp_samplers.sanitize_seed(seed, salt=salt)
        out = tf.cast(tf.random.split(seed, n, alg=ALGORITHM), tf.int32)
        return tf.unstack(out) if isinstance(n, int) else out


@contextlib.contextmanager
def portable_samplers():
    """While active, TFP's samplers draw through this module: ``normal``,
    ``uniform`` (floats and bounded integers), ``split_seed`` and
    ``fold_in``.

    Wrap the body of a function that runs TFP MCMC kernels (HMC, NUTS,
    Metropolis-Hastings) so its trace uses path-independent draws.  Only
    graph construction is affected; re-entrant and thread-safe (a lock is
    held while active, so concurrent traces wait for each other).
    """
    with _LOCK:
        if _DEPTH[0] == 0:
            _tfp_samplers.normal = _tfp_normal
            _tfp_samplers.uniform = _tfp_uniform
            _tfp_samplers.split_seed = _tfp_split_seed
            _tfp_samplers.fold_in = _tfp_fold_in
        _DEPTH[0] += 1
        try:
            yield
        finally:
            _DEPTH[0] -= 1
            if _DEPTH[0] == 0:
                for name in _PATCHED:
                    setattr(_tfp_samplers, name, _ORIGINAL[name])
