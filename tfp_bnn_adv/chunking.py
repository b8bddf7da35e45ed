"""Bounded-memory loops over the posterior sample axis and the data batch.

Two helpers every ensemble computation shares:

* :func:`fold_sample_chunks` / :func:`map_sample_chunks` walk the sample axis
  ``S`` of a parameter stack in chunks of static size inside the compiled
  graph (a ``tf.while_loop`` over full chunks, plus one remainder chunk), so a
  1000-sample posterior never materialises 1000 sets of activations.
* :func:`map_batches` streams a large input through fixed-size batches, the
  last one padded, so a compiled function traces and compiles once.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

from tfp_bnn_adv import validate

__all__ = ["auto_chunk_size", "fold_sample_chunks", "map_sample_chunks",
           "map_batches", "check_chunk_size", "DEFAULT_MEMORY_BUDGET"]

# Bytes of activations one chunk may hold (forward + backward, roughly).
DEFAULT_MEMORY_BUDGET = 512 * 2**20


def check_chunk_size(chunk_size, name: str = "chunk_size") -> int | None:
    """Validates a sample-chunk size: ``None`` (pick one) or an int >= 1.

    Raises:
      TypeError: if it is neither ``None`` nor an int.
      ValueError: if it is < 1.
    """
    return validate.optional_positive_int(chunk_size, name)


def auto_chunk_size(network, num_samples: int, batch_size: int,
                    memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Largest sample chunk whose activations fit in ``memory_budget`` bytes.

    Counts every layer output of one example and sample, times 3 for the
    backward pass and layout copies, in float32.
    """
    per_sample = 3 * 4 * batch_size * max(1, network.activation_size_per_example())
    return int(max(1, min(num_samples, memory_budget // max(1, per_sample))))


def _split(params: Sequence[tf.Tensor], chunk: int):
    s = params[0].shape[0]
    n_full, rem = divmod(s, chunk)
    full = None
    if n_full > 1:
        full = [tf.reshape(p[:n_full * chunk], [n_full, chunk] + p.shape[1:].as_list())
                for p in params]
    elif n_full == 1:
        full = [p[:chunk] for p in params]
    tail = [p[n_full * chunk:] for p in params] if rem else None
    return n_full, full, tail


def fold_sample_chunks(params: Sequence[tf.Tensor], chunk_size: int,
                       body: Callable[[Any, list], Any], init: Any) -> Any:
    """Folds ``body(state, params_chunk)`` over chunks of the sample axis.

    Traced inside a compiled function: full chunks run in a
    ``tf.while_loop`` (no unrolling), the remainder (``S % chunk_size``
    samples) in one extra static step.  ``state`` is a nest of tensors with
    fixed shapes.

    Args:
      params: list of tensors ``[S, ...]`` with a static ``S``.
      chunk_size: samples per chunk (>= 1).
      body: ``(state, list of [c, ...] tensors) -> state``.
      init: initial state.

    Returns:
      The final state.
    """
    n_full, full, tail = _split(params, chunk_size)
    state = init
    if n_full == 1:
        state = body(state, full)
    elif n_full > 1:
        def loop_body(i, st):
            return i + 1, body(st, [f[i] for f in full])
        _, state = tf.while_loop(lambda i, st: i < n_full, loop_body,
                                 (tf.constant(0), state))
    if tail is not None:
        state = body(state, tail)
    return state


def _merge_chunk_axis(t: tf.Tensor) -> tf.Tensor:
    """``[n, c, ...] -> [n * c, ...]``, also where a trailing dimension is
    only known at run time (a batch of unknown size)."""
    merged = tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], axis=0))
    merged.set_shape(tf.TensorShape([t.shape[0] * t.shape[1]]).concatenate(
        t.shape[2:]))
    return merged


def map_sample_chunks(params: Sequence[tf.Tensor], chunk_size: int,
                      fn: Callable[[list], Any]) -> Any:
    """Applies ``fn`` to sample chunks and concatenates along axis 0.

    Args:
      params: list of tensors ``[S, ...]`` with a static ``S``.
      chunk_size: samples per chunk (>= 1).
      fn: ``list of [c, ...] tensors -> nest of [c, ...] tensors``.

    Returns:
      The nest of ``[S, ...]`` tensors.
    """
    n_full, full, tail = _split(params, chunk_size)
    parts = []
    if n_full == 1:
        parts.append(fn(full))
    elif n_full > 1:
        probe = tf.nest.map_structure(
            lambda t: tf.TensorSpec(t.shape, t.dtype),
            fn([f[0] for f in full]))
        stacked = tf.map_fn(fn, full, fn_output_signature=probe)
        parts.append(tf.nest.map_structure(_merge_chunk_axis, stacked))
    if tail is not None:
        parts.append(fn(tail))
    if len(parts) == 1:
        return parts[0]
    return tf.nest.map_structure(lambda *ts: tf.concat(ts, axis=0), *parts)


def map_batches(fn: Callable, arrays: Sequence, batch_size: int,
                batch_axis: Sequence[int] | None = None,
                multiple_of: int = 1) -> Any:
    """Runs ``fn`` over fixed-size batches of ``arrays`` and concatenates.

    The last batch is padded (by repeating its final row) to ``batch_size`` so
    ``fn`` always sees the same shapes and compiles once; the padded rows are
    dropped from the result.

    Args:
      fn: ``(*batch_arrays) -> nest of tensors`` with the batch on axis
        ``batch_axis`` of its outputs (0 by default for every output).
      arrays: arrays sharing their leading dimension ``N``.
      batch_size: rows per call (>= 1).
      batch_axis: per flattened output, the axis that holds the batch.
      multiple_of: keep every call's batch a multiple of this (e.g. the
        number of replicas), padding even a dataset smaller than one batch.

    Returns:
      The nest of outputs, each with ``N`` rows along its batch axis, as
      numpy arrays.
    """
    n = int(np.shape(arrays[0])[0])
    batch_size = int(min(batch_size, -(-n // multiple_of) * multiple_of))
    outs = []
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        chunk = [np.asarray(a[start:stop]) if not isinstance(a, tf.Tensor)
                 else a[start:stop] for a in arrays]
        pad = batch_size - (stop - start)
        if pad:
            chunk = [tf.concat([c, tf.repeat(c[-1:], pad, axis=0)], axis=0)
                     for c in chunk]
        result = fn(*chunk)
        flat = tf.nest.flatten(result)
        axes = batch_axis or [0] * len(flat)
        flat = [np.take(np.asarray(t), np.arange(stop - start), axis=ax)
                for t, ax in zip(flat, axes)]
        outs.append(flat)
    axes = batch_axis or [0] * len(outs[0])
    merged = [np.concatenate([o[i] for o in outs], axis=axes[i])
              for i in range(len(outs[0]))]
    return tf.nest.pack_sequence_as(result, merged)
