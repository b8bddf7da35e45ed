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
from tfp_bnn_adv import xla

__all__ = ["auto_chunk_size", "fold_sample_chunks", "map_sample_chunks",
           "map_batches", "check_chunk_size", "host_cache_budget",
           "DEFAULT_MEMORY_BUDGET", "CPU_CACHE_BUDGET"]

# Bytes of activations one chunk may hold (forward + backward, roughly).
DEFAULT_MEMORY_BUDGET = 512 * 2**20
# Bytes of weight-dependent forward activations one chunk of a dense network
# may hold on a CPU-only host (:func:`auto_chunk_size`).
CPU_CACHE_BUDGET = 4 * 2**20


def check_chunk_size(chunk_size, name: str = "chunk_size") -> int | None:
    """Validates a sample-chunk size: ``None`` (pick one) or an int >= 1.

    Raises:
      TypeError: if it is neither ``None`` nor an int.
      ValueError: if it is < 1.
    """
    return validate.optional_positive_int(chunk_size, name)


def host_cache_budget() -> int | None:
    """:data:`CPU_CACHE_BUDGET` on a CPU-only host, ``None`` with a GPU or
    TPU (whose kernels want the largest chunks memory allows)."""
    return None if xla.has_accelerator() else CPU_CACHE_BUDGET


def _weight_dependent_floats(network) -> int | None:
    """Floats of one example and sample from the first layer with weights
    on, for a network on the fast path without convolutions; else ``None``.

    The layers before it (a ``Flatten`` of the shared input) are computed
    once for all samples, so they do not grow with the chunk.
    """
    ops = tuple(getattr(network, "ops", ()))
    if not ops or any(op.kind == "conv2d" for op in ops):
        return None
    first = next((i for i, op in enumerate(ops) if op.num_tensors), None)
    if first is None:
        return None
    return sum(int(np.prod(op.out_shape)) for op in ops[first:])


def auto_chunk_size(network, num_samples: int, batch_size: int,
                    memory_budget: int = DEFAULT_MEMORY_BUDGET,
                    cache_budget: int | None = None) -> int:
    """The sample-chunk size ``None`` picks: memory-bound, cache-sized.

    * **Memory**: the largest chunk whose activations fit in
      ``memory_budget`` bytes, counting every layer output of one example
      and sample, times 3 for the backward pass and layout copies, in
      float32.
    * **Cache** (``cache_budget`` bytes, :func:`host_cache_budget` for the
      host the call runs on): for a network of dense layers (the fast path,
      no convolution), at most as many samples as keep the weight-dependent
      forward activations of the batch within ``cache_budget``.  On CPUs
      the per-sample matmuls of a large chunk run out of cache.  Measured
      on a 2-core Zen 5, expected input gradient on the path ``auto``
      takes, seconds over two runs, the memory bound alone against both
      bounds (:data:`CPU_CACHE_BUDGET`): with TF's kernels held to Eigen
      and AVX2 as on a Zen 3 (``auto`` takes XLA there), and with
      oneDNN's kernels and AVX-512 (``auto`` takes TF's kernels):

      ========================  ===========  ==============  ==============
      MLP, ``S``, ``B``          chunk        AVX2, XLA       oneDNN
      ========================  ===========  ==============  ==============
      784-512-512-10, 100, 128  100 -> 7     0.23 -> 0.12    0.12 -> 0.12
      2-512-2, 1000, 500        174 -> 4     0.71 -> 0.34    0.36 -> 0.17
      784-100-100-10, 200, 256  175 -> 19    0.12 -> 0.078   0.079 -> 0.071
      784-1024-10, 50, 128      50 -> 7      0.16 -> 0.11    0.07 -> 0.07
      2-64-64-2, 400, 500       400 -> 16    0.11 -> 0.037   0.060 -> 0.040
      2-16-2, 1000, 500         1000 -> 112  0.054 -> 0.019  0.030 -> 0.021
      784-16-10, 500, 500       110 -> 72    0.049 -> 0.046  0.050 -> 0.052
      ========================  ===========  ==============  ==============

      (784-1024-10 with oneDNN: 0.066-0.12 s at either size over five
      runs, noise.)

      Convolutional networks keep the memory bound alone: their chunk
      size changed their time little on either kernel set, and chunks of
      one sample lose the grouped convolutions (a CNN with 8 and 16
      filters, ``S=100``: 0.39 s against 0.24 s with oneDNN).

    The chunks are then balanced: the fewest chunks those bounds allow,
    of equal size as far as ``num_samples`` divides.  Chunking changes the
    order of a sum over samples, so results differ between chunk sizes by
    float rounding only; the choice is a fixed function of the network,
    the sizes and the host's kind, never a timing.
    """
    per_sample = 3 * 4 * batch_size * max(1, network.activation_size_per_example())
    chunk = max(1, min(num_samples, memory_budget // max(1, per_sample)))
    floats = None if cache_budget is None else _weight_dependent_floats(network)
    if floats:
        chunk = max(1, min(chunk, cache_budget // (4 * batch_size * floats)))
    num_chunks = -(-num_samples // chunk)
    return int(-(-num_samples // num_chunks))


def _split(params: Sequence[tf.Tensor], chunk: int):
    """``(n_full, tail)``: the number of full chunks and the remainder's
    parameters (``None`` if ``chunk`` divides ``S``)."""
    s = params[0].shape[0]
    n_full, rem = divmod(s, chunk)
    tail = [p[n_full * chunk:] for p in params] if rem else None
    return n_full, tail


def _chunk(params: Sequence[tf.Tensor], i, chunk: int) -> list:
    """Chunk ``i`` (a scalar tensor) of every parameter: rows
    ``[i * chunk, (i + 1) * chunk)``, with a static shape.

    A slice at a run-time offset reads that chunk alone; slicing the full
    chunks out of the stack first (``p[:n * chunk]``, then reshaping) made
    XLA copy the whole stack on every call whenever ``chunk`` does not
    divide ``S``.  One expected gradient of a 784-512-512-10 MLP,
    ``S=100``, under XLA (2-core Zen 5, AVX2 kernels): 0.21 s in chunks of
    7 against 0.12 s in chunks of 5 that way; 0.12 s for both this way.
    """
    start = i * chunk
    return [tf.slice(p, tf.stack([start] + [0] * (p.shape.rank - 1)),
                     [chunk] + p.shape[1:].as_list()) for p in params]


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
    n_full, tail = _split(params, chunk_size)
    state = init
    if n_full == 1:
        state = body(state, [p[:chunk_size] for p in params])
    elif n_full > 1:
        def loop_body(i, st):
            return i + 1, body(st, _chunk(params, i, chunk_size))
        # A static trip count: XLA can then differentiate through the loop.
        _, state = tf.while_loop(lambda i, st: i < n_full, loop_body,
                                 (tf.constant(0), state),
                                 maximum_iterations=n_full)
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
    n_full, tail = _split(params, chunk_size)
    parts = []
    if n_full == 1:
        parts.append(fn([p[:chunk_size] for p in params]))
    elif n_full > 1:
        def chunk_fn(i):
            return fn(_chunk(params, i, chunk_size))

        probe = tf.nest.map_structure(
            lambda t: tf.TensorSpec(t.shape, t.dtype),
            chunk_fn(tf.constant(0)))
        stacked = tf.map_fn(chunk_fn, tf.range(n_full),
                            fn_output_signature=probe)
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
