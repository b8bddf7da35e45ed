"""The one place that builds a ``tf.distribute`` strategy, and sharded calls.

:func:`get_strategy` turns the launch scripts' ``--strategy`` / ``--tpu``
flags into a strategy; nothing else in the package constructs one.

Every sharding entry point of the package (HMC's ``strategy=``, the
gradients' and attacks' ``strategy=``) takes an explicit strategy, or, when
given ``None``, the strategy whose ``scope()`` is active (what the launch
scripts open).  With one replica, every function takes its single-device
path unchanged.

:func:`sharded_call` splits a batch across the replicas, runs a compiled
function on every replica, and gathers the results in the original order:
the building block of sharded gradients and attacks.

:func:`matmul_precision` makes float32 matmul precision explicit: TPUs run
float32 matmuls in bfloat16 passes by default and Ampere GPUs in
TensorFloat-32, which can make HMC diverge.  The HMC sampler asks for
``"highest"`` (full float32) by default; the Hamiltonian (momenta, kinetic
energy, the Metropolis test) is always float32.

On a CPU-only host, :func:`configure_logical_cpus` splits the CPU into
logical devices, so that multi-device code runs (and is tested) anywhere.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence
import weakref

from absl import logging
import tensorflow as tf

from tfp_bnn_adv import validate
from tfp_bnn_adv import xla

__all__ = ["STRATEGIES", "MATMUL_PRECISIONS", "get_strategy",
           "current_strategy", "num_replicas", "configure_logical_cpus",
           "sharded_call", "round_up_to_replicas", "matmul_precision",
           "check_matmul_precision"]

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
MATMUL_PRECISIONS = ("highest", "default")
_STRATEGIES_MADE: dict = {}


def configure_logical_cpus(count: int) -> list[str]:
    """Splits the first physical CPU into ``count`` logical devices.

    Must run before TensorFlow initialises its devices (before the first
    op); the launch scripts call it for ``--logical_cpus``.  Calling it again
    with the same count is a no-op.

    Args:
      count: logical CPU devices (>= 1).

    Returns:
      The logical CPU device names.

    Raises:
      TypeError: if ``count`` is not an int.
      ValueError: if ``count < 1``, or if TensorFlow already initialised
        its devices with a different number of logical CPUs.
    """
    count = validate.positive_int(count, "count")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if not (current and len(current) == count):
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * count)
        except RuntimeError as e:
            have = len(tf.config.list_logical_devices("CPU"))
            if have != count:
                raise ValueError(
                    f"cannot split the CPU into {count} logical devices: "
                    f"TensorFlow already initialised {have}. Configure them "
                    "before running any TensorFlow op.") from e
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def get_strategy(name: str = "default", tpu: str | None = None,
                 devices: Sequence[str] | None = None) -> tf.distribute.Strategy:
    """Builds the distribution strategy named by ``--strategy``.

    Args:
      name: ``"default"`` (no distribution), ``"mirrored"``
        (``MirroredStrategy`` over ``devices``; by default every local GPU,
        or every logical CPU on a host without GPUs), ``"multi_worker"``
        (``MultiWorkerMirroredStrategy`` configured from the ``TF_CONFIG``
        environment variable) or ``"tpu"`` (``TPUStrategy`` on the TPU named
        by ``tpu``, after ``initialize_tpu_system``).
      tpu: TPU name or address for ``"tpu"`` (``"local"`` for a TPU VM's own
        chips).
      devices: explicit devices for ``"mirrored"``, e.g. ``["/cpu:0",
        "/cpu:1"]``.

    Returns:
      A ``tf.distribute.Strategy``; the same object for the same arguments
      within a process.

    Raises:
      ValueError: for an unknown name, or ``"tpu"`` without ``tpu``.

    Example:
      >>> configure_logical_cpus(2)
      >>> get_strategy("mirrored").num_replicas_in_sync
      2
    """
    validate.choice(name, STRATEGIES, "strategy")
    if name != "tpu" and tpu:
        raise ValueError(f"tpu={tpu!r} is only used with strategy='tpu', got "
                         f"strategy={name!r}.")
    # One strategy per configuration and process: two MirroredStrategy
    # objects would hand out the same collective keys, and a TPU system is
    # initialised once.
    key = (name, tpu, None if devices is None else tuple(devices))
    if key in _STRATEGIES_MADE:
        return _STRATEGIES_MADE[key]
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if devices is None and not tf.config.list_logical_devices("GPU"):
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
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
    _STRATEGIES_MADE[key] = strategy
    return strategy


def current_strategy(strategy: tf.distribute.Strategy | None = None
                     ) -> tf.distribute.Strategy | None:
    """``strategy``, else the one whose ``scope()`` is open, else ``None``.

    Raises:
      TypeError: if ``strategy`` is not a ``tf.distribute.Strategy``.
    """
    if strategy is None:
        if not tf.distribute.has_strategy():
            return None
        strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(f"strategy must be a tf.distribute.Strategy or None, "
                        f"got {strategy!r}.")
    return strategy


def num_replicas(strategy: tf.distribute.Strategy | None) -> int:
    """Replicas of ``strategy`` (1 for ``None``)."""
    return 1 if strategy is None else int(strategy.num_replicas_in_sync)


def round_up_to_replicas(batch_size: int, strategy) -> int:
    """The smallest multiple of the replica count that is >= ``batch_size``."""
    r = num_replicas(strategy)
    return -(-int(batch_size) // r) * r


def _runner(strategy, fn, target, batch_args, batch_axis):
    """A ``tf.function`` running ``target`` per replica and gathering.

    Cached per ``fn`` (weakly, in :func:`tfp_bnn_adv.xla.cached_function`),
    so repeated batches of one shape reuse one trace.  ``target`` is ``fn``
    or the compiled function it selected; the runner reaches both weakly
    (``target`` belongs to ``fn``), so the cache never keeps ``fn`` alive.
    """
    if target is fn:
        target_ref, key_ref = None, None
    else:
        target_ref = key_ref = weakref.ref(target)

    def build(fn_proxy):
        def replica_fn(shared, shards):
            shared, shards = list(shared), list(shards)
            n = len(shared) + len(shards)
            call = fn_proxy if target_ref is None else target_ref()
            return call(*[shards.pop(0) if i in batch_args else shared.pop(0)
                          for i in range(n)])

        @tf.function(autograph=False)
        def run(shared, shards):
            result = strategy.run(replica_fn, args=(shared, shards))
            flat = tf.nest.flatten(result)
            axes = list(batch_axis or [0] * len(flat))
            # strategy.gather concatenates in replica order (across hosts too).
            return tf.nest.pack_sequence_as(
                result,
                [strategy.gather(t, axis=ax) for t, ax in zip(flat, axes)])

        return run

    return xla.cached_function(
        fn, ("sharded_runner", strategy, key_ref, batch_args, batch_axis),
        build)


def sharded_call(strategy: tf.distribute.Strategy | None, fn: Callable,
                 args: Sequence[Any], batch_args: Sequence[int],
                 batch_axis: Sequence[int] | None = None) -> Any:
    """Calls ``fn(*args)`` with a batch split evenly across replicas.

    ``args[i]`` for ``i`` in ``batch_args`` are split along axis 0 into one
    contiguous shard per replica; every other argument (weights, scalars) is
    given whole to every replica.  The outputs are gathered in replica order,
    so the result has the batch in its original order.  With one replica
    (or ``strategy=None``) this is plain ``fn(*args)``.

    ``fn`` may be a :class:`tfp_bnn_adv.xla.CompiledFunction`: its
    ``"auto"`` XLA choice is made once, eagerly, on the first shard, and the
    chosen compiled function runs on every replica.

    Args:
      strategy: a strategy or ``None``.
      fn: a function of tensors returning a nest of tensors.
      args: its arguments.
      batch_args: positions of the batch arguments (same leading size ``B``,
        divisible by the number of replicas; see :func:`round_up_to_replicas`).
      batch_axis: per flattened output, the axis holding the batch (0 by
        default).

    Returns:
      ``fn``'s outputs for the whole batch.

    Raises:
      ValueError: if ``B`` does not split evenly across the replicas.

    Example:
      >>> s = get_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
      >>> sharded_call(s, lambda w, x: x * w, [2.0, tf.range(4.0)], [1])
      <tf.Tensor: shape=(4,), numpy=array([0., 2., 4., 6.], dtype=float32)>
    """
    r = num_replicas(strategy)
    if r == 1:
        return fn(*args)
    args = list(args)
    batch_args = sorted(int(i) for i in batch_args)
    b = int(args[batch_args[0]].shape[0])
    if b % r:
        raise ValueError(f"a batch of {b} rows does not split across {r} "
                         "replicas; pad it to a multiple first.")
    shard = b // r
    for i in batch_args:
        args[i] = tf.convert_to_tensor(args[i])
        if int(args[i].shape[0]) != b:
            raise ValueError(f"batch argument {i} has {args[i].shape[0]} rows, "
                             f"argument {batch_args[0]} has {b}.")
    target = fn
    select = getattr(fn, "select", None)
    if select is not None:
        target = select(*[a[:shard] if i in batch_args else a
                          for i, a in enumerate(args)])
    run = _runner(strategy, fn, target, tuple(batch_args),
                  None if batch_axis is None else tuple(batch_axis))
    shared = tuple(a for i, a in enumerate(args) if i not in batch_args)
    batch = [args[i] for i in batch_args]

    def value_fn(ctx):
        j = ctx.replica_id_in_sync_group
        return tuple(a[j * shard:(j + 1) * shard] for a in batch)

    shards = strategy.experimental_distribute_values_from_function(value_fn)
    return run(shared, shards)


def check_matmul_precision(precision: str) -> str:
    """Validates a ``matmul_precision`` value (see :func:`matmul_precision`).

    Raises:
      ValueError: naming the value, if it is not one of the choices.
    """
    return validate.choice(precision, MATMUL_PRECISIONS, "matmul_precision")


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Sets float32 matmul/convolution precision inside the block.

    Args:
      precision: ``"highest"``: full float32 everywhere (disables
        TensorFloat-32 on GPUs and the bfloat16 passes TPUs use for float32
        matmuls by default); ``"default"``: the hardware's default, faster on
        TPUs and Ampere GPUs but only about 3 significant digits per product.

    Raises:
      ValueError: for another value.
    """
    check_matmul_precision(precision)
    before = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(
        precision == "default")
    try:
        yield
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(before)
