"""The one place that builds a ``tf.distribute`` strategy, and sharded maps.

:func:`get_strategy` turns the launch scripts' ``--strategy`` / ``--tpu``
flags into a strategy; nothing else in the package constructs one.
:func:`sharded_map` splits a batch across the strategy's replicas, runs a
function on every replica, and gathers the results in the original order:
the building block of sharded gradients and attacks.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from absl import logging
import tensorflow as tf

__all__ = ["STRATEGIES", "get_strategy", "num_replicas", "sharded_map"]

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def get_strategy(name: str = "default", tpu: str | None = None,
                 devices: Sequence[str] | None = None) -> tf.distribute.Strategy:
    """Builds the distribution strategy named by ``--strategy``.

    Args:
      name: ``"default"`` (no distribution), ``"mirrored"`` (all local GPUs,
        or ``devices``), ``"multi_worker"`` (``MultiWorkerMirroredStrategy``
        configured from the ``TF_CONFIG`` environment variable) or ``"tpu"``
        (``TPUStrategy`` on the TPU named by ``tpu``).
      tpu: TPU name or address for ``"tpu"`` (``""`` or ``"local"`` for a TPU
        VM's own chips).
      devices: explicit devices for ``"mirrored"``, e.g. the logical CPUs
        ``["/cpu:0", "/cpu:1"]`` used in tests.

    Returns:
      A ``tf.distribute.Strategy``.

    Raises:
      ValueError: for an unknown name, or a TPU strategy without ``tpu``.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}.")
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "mirrored":
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    elif name == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        if tpu is None:
            raise ValueError("strategy='tpu' needs tpu= (a TPU name, address, "
                             "or 'local' on a TPU VM).")
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu="" if tpu == "local" else tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy = tf.distribute.TPUStrategy(resolver)
    logging.info("Distribution strategy %s with %d replica(s).", name,
                 strategy.num_replicas_in_sync)
    return strategy


def num_replicas(strategy: tf.distribute.Strategy | None) -> int:
    """Replicas of ``strategy`` (1 for ``None``)."""
    return 1 if strategy is None else int(strategy.num_replicas_in_sync)


def sharded_map(strategy: tf.distribute.Strategy | None, fn: Callable,
                arrays: Sequence[tf.Tensor], batch_axis: Sequence[int] | None = None
                ) -> Any:
    """Runs ``fn`` on equal shards of a batch, one per replica, in order.

    Args:
      strategy: the strategy, or ``None`` to call ``fn`` directly.
      fn: ``(*shard_arrays) -> nest of tensors``; shards have ``B / R`` rows.
      arrays: tensors sharing a leading batch dimension ``B`` divisible by the
        number of replicas ``R`` (pad first, e.g. with
        :func:`tfp_bnn_adv.chunking.map_batches`).
      batch_axis: per flattened output, the axis holding the batch (0 by
        default).

    Returns:
      ``fn``'s outputs for the whole batch, concatenated in batch order.

    Raises:
      ValueError: if ``B`` is not divisible by the number of replicas.
    """
    r = num_replicas(strategy)
    if r == 1:
        return fn(*arrays)
    b = int(arrays[0].shape[0])
    if b % r:
        raise ValueError(f"batch of {b} rows does not split across {r} "
                         "replicas; pad it to a multiple first.")
    shard = b // r

    def value_fn(ctx):
        i = ctx.replica_id_in_sync_group
        return tuple(a[i * shard:(i + 1) * shard] for a in arrays)

    per_replica = strategy.experimental_distribute_values_from_function(value_fn)
    result = strategy.run(lambda args: fn(*args), args=(per_replica,))
    flat = tf.nest.flatten(result)
    axes = batch_axis or [0] * len(flat)
    # strategy.gather concatenates in replica order, across hosts too.
    gathered = [strategy.gather(t, axis=ax) for t, ax in zip(flat, axes)]
    return tf.nest.pack_sequence_as(result, gathered)
