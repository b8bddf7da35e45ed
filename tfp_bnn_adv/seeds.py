"""Stateless seeds: the same seed gives the same result, everywhere.

``tfp.random.sanitize_seed`` turns a Python int into a seed with a *stateful*
op, so two calls with ``seed=7`` differ.  Every public function here takes an
int (or a shape-``[2]`` stateless seed) and converts it with :func:`stateless`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

__all__ = ["stateless", "split", "fold_in"]

_MAX = 2**31 - 1


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
    """``n`` independent stateless seeds, int32 ``[n, 2]``."""
    return tf.reshape(tf.stack(tfp.random.split_seed(stateless(seed), n=n)),
                      [n, 2])


def fold_in(seed, data) -> tf.Tensor:
    """A new int32 ``[2]`` seed from ``seed`` and an integer ``data`` (a step)."""
    folded = tf.random.experimental.stateless_fold_in(
        stateless(seed), tf.cast(data, tf.int64))
    # TFP's samplers want int32 seeds; the cast keeps it a pure function.
    return tf.cast(folded, tf.int32)
