"""The target density: a Gaussian prior plus the full-batch log-likelihood.

The posterior of the paper: ``N(0, prior_scale^2)`` on every weight and bias
plus the log-likelihood of *all* training points, summed (the original code
restarted HMC on every data batch, so each run conditioned on one batch
only).  Prior and likelihood are separate pure functions; the likelihood is a
sum over fixed-size data shards of :func:`shard_log_likelihood`, so it can be
split across replicas with one all-reduce
(:func:`replicated_log_likelihood`), and its gradient is accumulated shard by
shard so activations stay bounded.
"""

from __future__ import annotations

from typing import Callable, Sequence

import tensorflow as tf

from tfp_bnn_adv import distribute
from tfp_bnn_adv import validate
from tfp_bnn_adv.inference import density
from tfp_bnn_adv.network import Network

__all__ = ["shard_data", "shard_log_likelihood", "log_likelihood",
           "replicated_log_likelihood", "log_prior", "auto_shard_size",
           "check_parallelism", "PARALLELISMS"]

PARALLELISMS = ("data", "chains")
# Bytes of activations one data shard may hold across all chains (forward and
# backward): large enough for big matmuls, small enough for 24 GB hosts.
_SHARD_MEMORY_BUDGET = 1024 * 2**20


def shard_data(x, y, shard_size: int):
    """Splits a dataset into equal shards, padding the last with masked rows.

    The shard size is reduced to ``ceil(N / num_shards)`` so padding is
    minimal; every shard has the same static shape, so a compiled loop over
    shards compiles once.

    Args:
      x: float32 ``[N, *input_shape]``.
      y: int32 labels ``[N]``.
      shard_size: maximum examples per shard (>= 1).

    Returns:
      ``(x_shards, y_shards, mask_shards)``: float32 ``[K, M, *input_shape]``,
      int32 ``[K, M]`` and float32 ``[K, M]`` (1 for real rows, 0 for
      padding), with ``K * M >= N``.

    Example:
      >>> xs, ys, ms = shard_data(tf.zeros([10, 2]), tf.zeros([10], tf.int32), 4)
      >>> xs.shape, float(tf.reduce_sum(ms))
      (TensorShape([3, 4, 2]), 10.0)
    """
    validate.positive_int(shard_size, "shard_size")
    x = tf.convert_to_tensor(x, tf.float32)
    y = tf.convert_to_tensor(y, tf.int32)
    return _shard(x, y, tf.ones([int(x.shape[0])]), shard_size)


def _shard(x, y, mask, shard_size: int):
    """:func:`shard_data` for rows that already carry a mask."""
    n = int(x.shape[0])
    num_shards = -(-n // shard_size)
    size = -(-n // num_shards)
    pad = num_shards * size - n
    mask = tf.concat([mask, tf.zeros([pad])], axis=0)
    x = tf.concat([x, tf.zeros([pad] + x.shape[1:].as_list())], axis=0)
    y = tf.concat([y, tf.zeros([pad], tf.int32)], axis=0)
    return (tf.reshape(x, [num_shards, size] + x.shape[1:].as_list()),
            tf.reshape(y, [num_shards, size]),
            tf.reshape(mask, [num_shards, size]))


def shard_log_likelihood(network: Network, params: Sequence[tf.Tensor], x, y,
                         mask=None) -> tf.Tensor:
    """Log-likelihood of one data shard under every chain's weights.

    Pure and XLA-compilable.

    Args:
      network: the :class:`~tfp_bnn_adv.network.Network`.
      params: list of float32 tensors ``[C, *shape]`` (``C`` chains).
      x: float32 ``[M, *input_shape]``.
      y: int32 labels ``[M]``.
      mask: optional float32 ``[M]`` weights (0 drops a padded row).

    Returns:
      float32 ``[C]``: ``sum_m mask_m * log softmax(f(x_m, w_c))[y_m]``.
    """
    return density.log_likelihood(network, params, x, y, mask)


def log_likelihood(network: Network, params: Sequence[tf.Tensor], x_shards,
                   y_shards, mask_shards) -> tf.Tensor:
    """Full-batch log-likelihood: the sum over shards of the shard term.

    The shards are visited in a ``tf.while_loop``.  Its gradient is
    accumulated shard by shard in the forward pass (a custom gradient), so
    memory holds one shard's activations, not the whole dataset's; with one
    shard it is plain autodiff.  Pure and XLA-compilable.

    Args:
      network: the :class:`~tfp_bnn_adv.network.Network`.
      params: list of float32 tensors ``[C, *shape]``.
      x_shards: float32 ``[K, M, *input_shape]`` (see :func:`shard_data`).
      y_shards: int32 ``[K, M]``.
      mask_shards: float32 ``[K, M]``.

    Returns:
      float32 ``[C]``: the summed (not averaged) log-likelihood per chain.

    Example:
      >>> shards = shard_data(x, y, shard_size=1000)
      >>> ll = log_likelihood(net, net.init_params(0, num_samples=4), *shards)
      >>> ll.shape
      TensorShape([4])
    """
    params = list(params)
    num_shards = int(x_shards.shape[0])
    if num_shards == 1:
        return shard_log_likelihood(network, params, x_shards[0], y_shards[0],
                                    mask_shards[0])

    @tf.custom_gradient
    def summed(*ps):
        # The weights ride along as loop variables: a tape inside the loop
        # body only sees gradients to tensors of the body itself.
        def body(i, ws, total, grads):
            with tf.GradientTape() as tape:
                tape.watch(ws)
                value = shard_log_likelihood(network, ws, x_shards[i],
                                             y_shards[i], mask_shards[i])
                # Chains are independent, so the gradient of the sum over
                # chains is every chain's own gradient.
                summed_value = tf.reduce_sum(value)
            g = tape.gradient(summed_value, ws)
            return i + 1, ws, total + value, [a + b for a, b in zip(grads, g)]

        init = (tf.constant(0), list(ps), tf.zeros([ps[0].shape[0]]),
                [tf.zeros_like(p) for p in ps])
        _, _, total, grads = tf.while_loop(lambda i, *_: i < num_shards, body,
                                           init)

        def grad_fn(upstream):
            return [g * tf.reshape(upstream, [-1] + [1] * (g.shape.rank - 1))
                    for g in grads]

        return total, grad_fn

    return summed(*params)


def _value_and_grad(network, params, x_shards, y_shards, mask_shards):
    """Per-chain log-likelihood ``[C]`` and its gradient, one device."""
    params = list(params)
    with tf.GradientTape() as tape:
        tape.watch(params)
        value = log_likelihood(network, params, x_shards, y_shards, mask_shards)
        # Chains are independent: the gradient of the sum over chains is
        # every chain's own gradient.
        total = tf.reduce_sum(value)
    return value, tape.gradient(total, params)


def check_parallelism(parallelism: str, num_chains, replicas: int) -> None:
    """``parallelism`` is known; with "chains", the chains split evenly."""
    validate.choice(parallelism, PARALLELISMS, "parallelism")
    if replicas > 1 and parallelism == "chains" and (
            num_chains is None or num_chains % replicas):
        raise ValueError(f"parallelism='chains' needs num_chains divisible by "
                         f"the {replicas} replicas, got num_chains="
                         f"{num_chains!r}.")


def replicated_log_likelihood(network: Network, strategy, x, y, *,
                              shard_size: int, parallelism: str = "data",
                              num_chains: int | None = None,
                              jit_compile: bool = False) -> Callable:
    """The full-batch log-likelihood, evaluated across a strategy's replicas.

    Call the result inside a ``tf.function`` (HMC's compiled segment): each
    call is one ``strategy.run``.  With ``parallelism="data"`` replica ``r``
    holds the ``r``-th of ``R`` equal, padded and masked parts of the data,
    computes that part's log-likelihood and gradient for every chain, and a
    single all-reduce (SUM) of ``[value, *gradients]`` gives every replica
    the totals.  With ``parallelism="chains"`` every replica holds all the
    data and evaluates its ``C / R`` chains; the all-reduce of zero-padded
    rows assembles them in chain order.  Either way the value carries a custom gradient: the reduced
    gradient, so autodiff never differentiates through the collective.

    Args:
      network: the :class:`~tfp_bnn_adv.network.Network`.
      strategy: a ``tf.distribute.Strategy``.
      x: float32 ``[N, *input_shape]``.
      y: int32 ``[N]``.
      shard_size: rows per shard within a replica (bounded memory).
      parallelism: ``"data"`` or ``"chains"``.
      num_chains: ``C``; required for ``"chains"`` (divisible by ``R``).
      jit_compile: compile each replica's local computation with XLA (on a
        TPU, the replica function is compiled anyway).

    Returns:
      ``fn(*params) -> [C]`` with params float32 ``[C, *shape]``.

    Raises:
      ValueError: for an unknown ``parallelism`` or chains that do not split
        evenly across the replicas.

    Example:
      >>> ll = replicated_log_likelihood(net, strategy, x, y, shard_size=1000)
      >>> tf.function(ll)(*params)       # == log_likelihood on one device
    """
    r = distribute.num_replicas(strategy)
    check_parallelism(parallelism, num_chains, r)
    x = tf.convert_to_tensor(x, tf.float32)
    y = tf.convert_to_tensor(y, tf.int32)
    n = int(x.shape[0])
    if parallelism == "data":
        if n < r:
            raise ValueError(f"{n} training points cannot be split across {r} "
                             "replicas.")
        per = -(-n // r)
        pad = r * per - n
        mask = tf.concat([tf.ones([n]), tf.zeros([pad])], axis=0)
        xp = tf.concat([x, tf.zeros([pad] + x.shape[1:].as_list())], axis=0)
        yp = tf.concat([y, tf.zeros([pad], tf.int32)], axis=0)
        parts = [_shard(xp[i * per:(i + 1) * per], yp[i * per:(i + 1) * per],
                        mask[i * per:(i + 1) * per], shard_size)
                 for i in range(r)]
        chains_per_replica = None
    else:
        parts = [shard_data(x, y, shard_size)] * r
        chains_per_replica = num_chains // r
    # One copy of each replica's data on its own device, made once.
    data = strategy.experimental_distribute_values_from_function(
        lambda ctx: parts[ctx.replica_id_in_sync_group])
    local = tf.function(
        lambda ps, xs, ys, ms: _value_and_grad(network, ps, xs, ys, ms),
        jit_compile=bool(jit_compile), autograph=False)

    def replica_fn(params, shards):
        ctx = tf.distribute.get_replica_context()
        if chains_per_replica is not None:
            first = ctx.replica_id_in_sync_group * chains_per_replica
            params = [tf.gather(p, first + tf.range(chains_per_replica))
                      for p in params]
        value, grads = local(list(params), *shards)
        if chains_per_replica is not None:
            # Each replica fills its own chains' rows of zero [C, ...]
            # tensors, so the sum below assembles all chains in order.
            rows = first + tf.range(chains_per_replica)
            value, grads = tf.nest.map_structure(
                lambda t: tf.scatter_nd(rows[:, None], t, tf.concat(
                    [[num_chains], tf.shape(t)[1:]], axis=0)), (value, grads))
        # The all-reduce: every replica gets the same sums.
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, (value, grads))

    def combine(t):  # identical on every replica
        return strategy.experimental_local_results(t)[0]

    @tf.custom_gradient
    def summed(*params):
        out = strategy.run(replica_fn, args=(list(params), data))
        value, grads = tf.nest.map_structure(combine, out)

        def grad_fn(upstream):
            return [g * tf.reshape(upstream, [-1] + [1] * (g.shape.rank - 1))
                    for g in grads]

        return value, grad_fn

    return summed


def log_prior(params: Sequence[tf.Tensor], prior_scale: float) -> tf.Tensor:
    """Log-density of the prior ``N(0, prior_scale^2)`` on every weight.

    Args:
      params: list of float32 tensors ``[C, *shape]``.
      prior_scale: prior standard deviation (> 0).

    Returns:
      float32 ``[C]``, the normalised log-density per chain.

    Example:
      >>> log_prior([tf.zeros([2, 3])], 1.0).numpy()   # 3 * log N(0; 0, 1)
      array([-2.7568157, -2.7568157], dtype=float32)
    """
    return density.gaussian_log_prior(params, prior_scale)


def auto_shard_size(network: Network, num_chains: int, n: int) -> int:
    """Training points per shard that keep one shard's activations of all
    chains under about 1 GiB."""
    per_example = 3 * 4 * num_chains * max(1, network.activation_size_per_example())
    return int(max(1, min(n, _SHARD_MEMORY_BUDGET // per_example)))
