"""Full-batch HMC/NUTS posteriors over any imported Keras network.

The target density is the posterior of the paper: a Gaussian prior
``N(0, prior_scale^2)`` on every weight and bias plus the log-likelihood of
*all* training points, summed (the original code restarted HMC on every data
batch, so each run conditioned on one batch only).  Prior and likelihood are
separate pure functions; the likelihood is a sum over fixed-size data shards
of :func:`shard_log_likelihood`, so it can later be split across replicas
with one all-reduce, and its gradient is accumulated shard by shard so
activations stay bounded.

The sampler composes TFP kernels: ``HamiltonianMonteCarlo`` or
``NoUTurnSampler`` inside ``DualAveragingStepSizeAdaptation`` (adapting one
step size per chain during the first ``num_adaptation_steps`` burn-in steps),
driven by ``tfp.mcmc.sample_chain`` with a minimal ``trace_fn``.  Chains are a
leading batch axis of every state tensor, so all chains advance in one
vectorised compiled step.

Runs go in segments of about ``checkpoint_every`` iterations; each segment is
one compiled call.  With a ``checkpoint_dir`` the chain state, every tensor of
the kernel results (the dual-averaging state included), the counters and the
samples so far are written atomically after each segment, and a run started
again with the same arguments continues from there and produces bit-identical
samples, because every segment's seed is derived statelessly from
``(seed, segment index)``.

Compilers: segments run under XLA (``jit_compile=True``), with TensorFlow's
default kernels (``False``), or, with ``"auto"`` on CPU, whichever ran a short
loop of target gradients faster (XLA wins for small networks, where per-op
overhead dominates; default kernels won for a full-batch Fashion-MNIST MLP).
Both sample the same posterior, but not the same chain: under XLA
TensorFlow's stateless normal/uniform draws use another algorithm, so one
seed gives different (equally valid) samples on the two paths.  A run is
reproducible on its own path, and a resumed ``"auto"`` run keeps the path it
started on.

Scale-out (``strategy=``, see :mod:`tfp_bnn_adv.distribute`): with a
``tf.distribute`` strategy of ``R > 1`` replicas, each target evaluation
inside the compiled segment is one ``strategy.run``:

* ``parallelism="data"``: the training set is split into ``R`` equal,
  static-shape parts (padded with masked points, so XLA/TPU compile once);
  each replica computes its part's log-likelihood and gradient for every
  chain, and one all-reduce (``ReplicaContext.all_reduce``, SUM) adds them.
* ``parallelism="chains"``: for small data; every replica holds the whole
  training set and evaluates ``C / R`` of the chains; an all-reduce of
  zero-padded rows assembles them in chain order.

The chain state (parameters, momenta, step sizes, the Metropolis test) is
one float32 copy held by the segment's loop; every evaluation hands that
same copy to all replicas, and the all-reduced sum is the same on every
replica (we read replica 0's).  So replicas cannot drift apart, and the
chain is the single-device chain up to the float round-off of summing the
shards in another order: the same seed gives the same samples on 1 or R
devices, within float tolerance (tested on logical CPU devices).  Prior,
momenta and kinetic energy stay float32; ``matmul_precision`` (default
``"highest"``) decides whether the likelihood's matmuls may use TF32 or
TPU bfloat16 passes, which can make HMC diverge.

Two entry points: :func:`sample` (a network and a dataset in, a
:class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble` out) and the network-free
:func:`run_chains`, which samples any batched ``target_log_prob_fn``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_bnn_adv import distribute
from tfp_bnn_adv import files
from tfp_bnn_adv import seeds
from tfp_bnn_adv import xla
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.network import Network

__all__ = ["sample", "run_chains", "log_likelihood", "shard_log_likelihood",
           "log_prior", "shard_data", "Diagnostics", "ChainResult",
           "KERNELS", "PARALLELISMS", "CHECKPOINT_FILE",
           "replicated_log_likelihood"]

KERNELS = ("hmc", "nuts")
PARALLELISMS = ("data", "chains")
CHECKPOINT_FILE = "hmc_checkpoint.npz"
_SEGMENT_FILE = "hmc_samples_{:05d}.npz"
_FORMAT = "tfp_bnn_adv.hmc_checkpoint"
_FORMAT_VERSION = 1
# NUTS' own threshold for a divergent transition, applied to HMC as well so
# both kernels count divergences by the same rule.
_MAX_ENERGY_ERROR = 1000.0
# Bytes of activations one data shard may hold across all chains (forward and
# backward): large enough for big matmuls, small enough for 24 GB hosts.
_SHARD_MEMORY_BUDGET = 1024 * 2**20
_PROJECTION_SEED = (20200, 3)
# Gradients per timing of the "auto" compiler choice.
_PROBE_STEPS = 4
_INITS = ("prior", "sgd")


# --------------------------------------------------------------------------
# The target density.
# --------------------------------------------------------------------------
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
    _check_int(shard_size, "shard_size", 1)
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
    logits = network.apply_stack(list(params), x)  # [C, M, K]
    labels = tf.broadcast_to(y[None], tf.shape(logits)[:2])
    ll = -tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels,
                                                         logits=logits)
    if mask is not None:
        ll = ll * mask[None]
    return tf.reduce_sum(ll, axis=1)


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


def _check_parallelism(parallelism: str, num_chains, replicas: int) -> None:
    """``parallelism`` is known; with "chains", the chains split evenly."""
    if parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism must be one of {PARALLELISMS}, got "
                         f"{parallelism!r}.")
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
    _check_parallelism(parallelism, num_chains, r)
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
    total = 0.0
    const = math.log(prior_scale) + 0.5 * math.log(2.0 * math.pi)
    for p in params:
        axes = list(range(1, p.shape.rank))
        count = float(np.prod(p.shape[1:].as_list()))
        total += (-0.5 / prior_scale**2) * tf.reduce_sum(tf.square(p), axis=axes)
        total -= count * const
    return total


# --------------------------------------------------------------------------
# Counting wrapper: exact per-segment counts however the chain is thinned.
# --------------------------------------------------------------------------
class _CountedResults(
        collections.namedtuple("_CountedResults", [
            "inner_results", "accept_prob_sum", "num_divergent",
            "num_leapfrogs"])):
    """Adapted-kernel results plus per-chain counters since the last reset."""
    __slots__ = ()


def _target_log_prob(adapted) -> tf.Tensor:
    """Target log-density ``[C]`` from the step-size adaptation's results."""
    base = adapted.inner_results
    if hasattr(base, "accepted_results"):  # HMC (Metropolis-Hastings)
        return base.accepted_results.target_log_prob
    return base.target_log_prob  # NUTS


def _per_chain_step_size(adapted) -> tf.Tensor:
    return tf.reshape(tf.nest.flatten(adapted.new_step_size)[0], [-1])


class _Counted(tfp.mcmc.TransitionKernel):
    """Wraps an adapted HMC/NUTS kernel and counts what each step did.

    Results add, per chain: the summed Metropolis acceptance probability, the
    number of divergent transitions (non-finite energy or an energy error
    above 1000, NUTS' rule) and the number of leapfrog steps.
    """

    def __init__(self, inner_kernel, num_leapfrog_steps: int | None):
        self._inner = inner_kernel
        self._num_leapfrog_steps = num_leapfrog_steps
        self._parameters = dict(inner_kernel=inner_kernel,
                                num_leapfrog_steps=num_leapfrog_steps)

    @property
    def parameters(self):
        return self._parameters

    @property
    def is_calibrated(self):
        return self._inner.is_calibrated

    def bootstrap_results(self, init_state):
        return _zero_counters(self._inner.bootstrap_results(init_state))

    def one_step(self, current_state, previous_kernel_results, seed=None):
        state, inner = self._inner.one_step(
            current_state, previous_kernel_results.inner_results, seed=seed)
        base = inner.inner_results
        lar = base.log_accept_ratio
        finite = tf.math.is_finite(lar)
        accept = tf.where(finite, tf.exp(tf.minimum(lar, 0.0)), 0.0)
        if self._num_leapfrog_steps is None:  # NUTS
            divergent = base.has_divergence
            leapfrogs = base.leapfrogs_taken
        else:
            divergent = ~finite | (lar < -_MAX_ENERGY_ERROR)
            leapfrogs = tf.fill(tf.shape(lar), self._num_leapfrog_steps)
        prev = previous_kernel_results
        return state, _CountedResults(
            inner_results=inner,
            accept_prob_sum=prev.accept_prob_sum + accept,
            num_divergent=prev.num_divergent + tf.cast(divergent, tf.int32),
            num_leapfrogs=prev.num_leapfrogs + tf.cast(leapfrogs, tf.int32))


def _zero_counters(adapted) -> _CountedResults:
    tlp = _target_log_prob(adapted)
    izeros = tf.zeros(tf.shape(tlp), tf.int32)
    return _CountedResults(adapted, tf.zeros_like(tlp), izeros, izeros)


def _build_kernel(target_log_prob_fn, state, settings: dict):
    step_size = [tf.fill([s.shape[0]] + [1] * (s.shape.rank - 1),
                         tf.constant(settings["step_size"], tf.float32))
                 for s in state]
    if settings["kernel"] == "hmc":
        inner = tfp.mcmc.HamiltonianMonteCarlo(
            target_log_prob_fn, step_size=step_size,
            num_leapfrog_steps=settings["num_leapfrog_steps"])
        leapfrogs = settings["num_leapfrog_steps"]
    else:
        inner = tfp.mcmc.NoUTurnSampler(
            target_log_prob_fn, step_size=step_size,
            max_tree_depth=settings["max_tree_depth"])
        leapfrogs = None
    adapted = tfp.mcmc.DualAveragingStepSizeAdaptation(
        inner, num_adaptation_steps=settings["num_adaptation_steps"],
        target_accept_prob=settings["target_accept_prob"])
    return _Counted(adapted, leapfrogs)


# --------------------------------------------------------------------------
# Results.
# --------------------------------------------------------------------------
def _finite_or_none(v):
    v = float(v)
    return v if math.isfinite(v) else None


@dataclasses.dataclass(frozen=True)
class Diagnostics:
    """What a run did and how well it mixed.

    Attributes:
      kernel: ``"hmc"`` or ``"nuts"``.
      num_chains: ``C``.
      num_results: kept samples per chain ``R``.
      acceptance_rate: per chain, mean Metropolis acceptance probability
        ``min(1, exp(log_accept_ratio))`` over all post-burn-in steps.
      burnin_acceptance_rate: the same over the burn-in steps (NaN without
        burn-in).
      step_size: per chain, the final (adapted) step size.
      num_divergent: divergent transitions (non-finite energy or energy error
        above 1000) after burn-in, summed over chains; counted, never raised.
      num_divergent_burnin: the same during burn-in.
      rhat_log_likelihood: split R-hat (``potential_scale_reduction``) of the
        traced log-likelihood (of the target log-density when
        :func:`run_chains` has no ``monitor_fn``); NaN with fewer than 4
        kept samples.
      ess_log_likelihood: its effective sample size, pooled over chains.
      rhat_projection: split R-hat of a fixed random unit projection of all
        weights.
      ess_projection: its effective sample size, pooled over chains.
      wall_seconds: wall time of all segments (over resumed runs too),
        compilation included.
      compile_seconds: estimated compilation time (first call of each
        compiled segment shape minus its steady-state running time); NaN if
        no segment shape ran twice.
      leapfrog_steps_per_second: steady-state leapfrog steps per second,
        summed over chains (all chains advance together), compilation
        excluded when it could be estimated.
      num_leapfrog_steps: leapfrog steps of the whole run, summed over chains.
      jit: ``"xla"`` or ``"default"`` (TF kernels): how segments ran.
      num_segments: compiled calls the run was split into.

    Example:
      >>> _, diag = sample(model, x, y, num_chains=4, seed=0)
      >>> diag.rhat_log_likelihood < 1.1, diag.num_divergent
      (True, 0)
      >>> files.write_json("diagnostics.json", diag.to_dict())
    """

    kernel: str
    num_chains: int
    num_results: int
    acceptance_rate: tuple
    burnin_acceptance_rate: tuple
    step_size: tuple
    num_divergent: int
    num_divergent_burnin: int
    rhat_log_likelihood: float
    ess_log_likelihood: float
    rhat_projection: float
    ess_projection: float
    wall_seconds: float
    compile_seconds: float
    leapfrog_steps_per_second: float
    num_leapfrog_steps: int
    jit: str
    num_segments: int

    def to_dict(self) -> dict:
        """A JSON-able dict; non-finite numbers become ``None``."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = [_finite_or_none(e) for e in v]
            elif isinstance(v, float):
                v = _finite_or_none(v)
            out[f.name] = v
        return out


class ChainResult(NamedTuple):
    """What :func:`run_chains` returns.

    Attributes:
      states: list of float32 numpy arrays ``[R, C, *shape]``: the kept
        samples of every chain after burn-in and thinning.
      trace: float32 numpy ``[R, C]``: the monitored value (target
        log-density, or ``monitor_fn``) at each kept sample.
      diagnostics: a :class:`Diagnostics`.
    """

    states: list
    trace: np.ndarray
    diagnostics: Diagnostics


# --------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------
def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}.")
    return int(value)


def _check_positive_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                         np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def _check_seed(seed) -> list[int]:
    """A stateless seed ``[2]`` as a JSON-able list (for the fingerprint)."""
    return [int(v) for v in seeds.stateless(seed).numpy()]


def _settings(*, num_burnin_steps, num_results, thinning, step_size,
              num_leapfrog_steps, kernel, max_tree_depth, target_accept_prob,
              num_adaptation_steps, checkpoint_every, jit_compile) -> dict:
    """Validated sampler settings (everything but the target and state)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
    b = _check_int(num_burnin_steps, "num_burnin_steps", 0)
    r = _check_int(num_results, "num_results", 1)
    t = _check_int(thinning, "thinning", 1)
    if num_adaptation_steps is None:
        num_adaptation_steps = int(0.8 * b)
    a = _check_int(num_adaptation_steps, "num_adaptation_steps", 0)
    if a > b:
        raise ValueError(f"num_adaptation_steps ({a}) must not exceed "
                         f"num_burnin_steps ({b}): samples drawn while the step "
                         "size adapts are not from the posterior.")
    tap = target_accept_prob
    if isinstance(tap, bool) or not isinstance(tap, (int, float)) or not 0 < tap < 1:
        raise ValueError(f"target_accept_prob must be in (0, 1), got {tap!r}.")
    total = b + r * t
    if checkpoint_every is None:
        checkpoint_every = max(1, -(-total // 10))
    mode = xla.resolve_jit(jit_compile)
    return {
        "kernel": kernel, "num_burnin_steps": b, "num_results": r,
        "thinning": t, "step_size": _check_positive_real(step_size, "step_size"),
        "num_leapfrog_steps": _check_int(num_leapfrog_steps,
                                         "num_leapfrog_steps", 1),
        "max_tree_depth": _check_int(max_tree_depth, "max_tree_depth", 1),
        "target_accept_prob": float(tap), "num_adaptation_steps": a,
        "checkpoint_every": _check_int(checkpoint_every, "checkpoint_every", 1),
        "jit_compile": mode if isinstance(mode, str) else bool(mode),
    }


def _check_state(initial_state, name: str = "initial_state") -> list[tf.Tensor]:
    if not isinstance(initial_state, (list, tuple)) or not initial_state:
        raise TypeError(f"{name} must be a non-empty list of tensors with a "
                        f"leading chains axis, got {type(initial_state).__name__}.")
    state = [tf.convert_to_tensor(s, tf.float32) for s in initial_state]
    chains = state[0].shape[0] if state[0].shape.rank else None
    for i, s in enumerate(state):
        if s.shape.rank < 1 or s.shape[0] != chains or chains == 0:
            raise ValueError(f"{name}[{i}] has shape {tuple(s.shape)}; every "
                             "part needs the same non-empty leading chains "
                             "axis.")
        if not bool(tf.reduce_all(tf.math.is_finite(s))):
            raise ValueError(f"{name}[{i}] contains NaN or infinite values.")
    return state


# --------------------------------------------------------------------------
# Segments and checkpoints.
# --------------------------------------------------------------------------
def _plan(settings: dict) -> list[tuple[str, int, int]]:
    """Segments as ``(phase, steps, kept)``; none straddles burn-in's end."""
    every, thin = settings["checkpoint_every"], settings["thinning"]
    plan = []
    left = settings["num_burnin_steps"]
    while left > 0:
        n = min(every, left)
        plan.append(("burnin", n, 0))
        left -= n
    per = max(1, every // thin)
    left = settings["num_results"]
    while left > 0:
        n = min(per, left)
        plan.append(("sampling", n * thin, n))
        left -= n
    return plan


def _fingerprint_diff(saved: dict, current: dict) -> str | None:
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            return key
    return None


def _describe(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _load_checkpoint(path: str, config: dict):
    """Reads a checkpoint, refusing one from a different configuration."""
    arrays, meta = files.load_arrays(path)
    if meta.get("format") != _FORMAT or meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{path!r} is not an HMC checkpoint of this version "
                         f"(format={meta.get('format')!r}).")
    field = _fingerprint_diff(meta["config"], config)
    if field is not None:
        raise ValueError(
            f"The checkpoint in {os.path.dirname(path)!r} comes from a "
            f"different configuration: {field} is "
            f"{_describe(meta['config'].get(field))} there but "
            f"{_describe(config.get(field))} now. Use another checkpoint_dir "
            "or delete it to start afresh; runs are never mixed.")
    return arrays, meta


def _restore(path: str, arrays: dict, template, state_template):
    """The chain state and kernel results, checked against their templates."""
    state = [arrays[f"state_{i}"] for i in range(len(state_template))]
    leaves = tf.nest.flatten(template)
    loaded = [arrays[f"results_{i}"] for i in range(len(leaves))]
    for i, (a, t) in enumerate(zip(state + loaded,
                                   list(state_template) + leaves)):
        if tuple(a.shape) != tuple(t.shape) or a.dtype != t.dtype.as_numpy_dtype:
            raise ValueError(f"{path!r}: tensor {i} has shape {a.shape} and "
                             f"dtype {a.dtype}; expected {tuple(t.shape)} "
                             f"{t.dtype.name}. The checkpoint is corrupt.")
    results = tf.nest.pack_sequence_as(template, [tf.constant(a) for a in loaded])
    return [tf.constant(s) for s in state], results


def _load_segment(directory: str, index: int, digest: str, num_parts: int):
    path = os.path.join(directory, _SEGMENT_FILE.format(index))
    arrays, meta = files.load_arrays(path)
    if meta.get("digest") != digest or meta.get("segment") != index:
        raise ValueError(f"{path!r} belongs to another run than the checkpoint "
                         f"next to it; delete {directory!r} to start afresh.")
    return [arrays[f"state_{i}"] for i in range(num_parts)], arrays["trace"]


def _digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _choose_jit(target_log_prob_fn, state, mode, compiler_key) -> bool:
    """Resolves ``"auto"``: times a short compiled loop of target gradients.

    A loop, not one gradient, because a segment is a loop: for small
    networks the per-call overhead of a single gradient would hide what
    matters, the cost per leapfrog step inside compiled code.
    :mod:`tfp_bnn_adv.xla` remembers the choice per machine, name and state
    shapes; ``compiler_key`` goes into the name so that targets of other
    sizes (e.g. more data) are timed afresh.
    """
    if mode != "auto":
        return bool(mode)
    name = "hmc_gradient_loop" + (f"_{compiler_key}" if compiler_key else "")

    def gradient_loop(*parts):
        def body(i, ps):
            _, grads = tfp.math.value_and_gradient(target_log_prob_fn, ps)
            # A vanishing move keeps the gradient from being hoisted.
            return i + 1, [p + 1e-30 * g for p, g in zip(ps, grads)]
        return tf.while_loop(lambda i, _: i < _PROBE_STEPS, body,
                             (tf.constant(0), list(parts)))[1]

    probe = xla.compile_fn(gradient_loop, "auto", name)
    probe(*state)
    return next(iter(probe.choices.values()))[0]


def _projection(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    """A fixed random unit vector over all weights, one array per part."""
    vs = [tf.random.stateless_normal(p.shape[2:], seed=[_PROJECTION_SEED[0],
                                                         _PROJECTION_SEED[1] + i],
                                     dtype=tf.float64).numpy()
          for i, p in enumerate(parts)]
    norm = math.sqrt(sum(float(np.sum(v * v)) for v in vs))
    return [v / norm for v in vs]


@contextlib.contextmanager
def _quiet_tf_logger():
    # TFP's FFT autocorrelation casts complex to real on purpose and warns
    # about it on every call.
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        yield
    finally:
        logger.setLevel(level)


def _rhat_ess(trace: np.ndarray) -> tuple[float, float]:
    """Split R-hat and pooled ESS of a ``[R, C]`` trace (NaN if too short)."""
    r, c = trace.shape
    if r < 4 or not np.all(np.isfinite(trace)):
        return float("nan"), float("nan")
    t = tf.constant(trace, tf.float64)
    rhat = float(tfp.mcmc.potential_scale_reduction(t, split_chains=True))
    with _quiet_tf_logger():
        ess = tfp.mcmc.effective_sample_size(
            t, filter_beyond_positive_pairs=True,
            cross_chain_dims=1 if c > 1 else None)
    return rhat, float(tf.reduce_sum(ess))


def _target_log_prob_monitor(state_parts, target_log_prob):
    del state_parts  # the default monitor is the target density itself
    return target_log_prob


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# --------------------------------------------------------------------------
# The sampler core.
# --------------------------------------------------------------------------
def run_chains(target_log_prob_fn: Callable[..., tf.Tensor],
               initial_state: Sequence, *,
               num_burnin_steps: int = 200, num_results: int = 100,
               thinning: int = 1, step_size: float = 0.01,
               num_leapfrog_steps: int = 10, kernel: str = "hmc",
               max_tree_depth: int = 10, target_accept_prob: float = 0.75,
               num_adaptation_steps: int | None = None, seed=0,
               checkpoint_dir: str | None = None,
               checkpoint_every: int | None = None, jit_compile=None,
               monitor_fn: Callable | None = None,
               monitor_name: str = "target log-prob",
               fingerprint: dict | None = None,
               compiler_key: str | None = None,
               segment_callback: Callable[[dict], Any] | None = None
               ) -> ChainResult:
    """Runs ``C`` independent adaptive HMC/NUTS chains on any batched target.

    The chain runs ``num_burnin_steps + num_results * thinning`` iterations;
    it keeps the state after every ``thinning``-th post-burn-in iteration.
    The step size (one per chain) adapts by dual averaging over the first
    ``num_adaptation_steps`` iterations and is fixed afterwards.

    Args:
      target_log_prob_fn: ``(*state_parts) -> [C]`` float32, the unnormalised
        log-density of each chain's state; pure and XLA-compilable.
      initial_state: list of float32 tensors ``[C, *shape]``.
      num_burnin_steps: iterations discarded before the first sample (>= 0).
      num_results: kept samples per chain ``R`` (>= 1).
      thinning: iterations per kept sample after burn-in (>= 1).
      step_size: initial leapfrog step size (> 0), the same for every chain.
      num_leapfrog_steps: leapfrog steps per HMC iteration (>= 1; unused by
        NUTS).
      kernel: ``"hmc"`` (``tfp.mcmc.HamiltonianMonteCarlo``) or ``"nuts"``
        (``tfp.mcmc.NoUTurnSampler``).
      max_tree_depth: NUTS' maximum tree depth (>= 1).
      target_accept_prob: acceptance probability dual averaging aims for.
      num_adaptation_steps: burn-in iterations that adapt the step size;
        default ``int(0.8 * num_burnin_steps)``; 0 keeps ``step_size`` fixed.
      seed: an int in ``[0, 2**31 - 1]`` or a stateless seed ``[2]`` (see
        :mod:`tfp_bnn_adv.seeds`).  Segment ``j`` runs with
        ``fold_in(seed, j)``.
      checkpoint_dir: directory for checkpoints (``None``: none written).  A
        run started again with the same arguments resumes from it.
      checkpoint_every: iterations per segment (compiled call, progress line
        and checkpoint); default about a tenth of the run.  Sampling
        segments hold ``max(1, checkpoint_every // thinning)`` samples.
      jit_compile: ``True`` (XLA), ``False`` (TF default kernels), ``"auto"``
        or ``None`` (environment default; ``"auto"`` times one target
        gradient both ways on CPU and keeps the faster).
      monitor_fn: ``(state_parts, target_log_prob) -> [C]``, the value traced
        at every kept sample and diagnosed (default: the target log-density).
      monitor_name: its name in progress lines.
      fingerprint: extra JSON-able fields identifying the target (e.g. a data
        hash); a checkpoint whose fields differ is refused.
      compiler_key: what, besides the state shapes, sets the target's cost
        (e.g. the architecture and data size); runs with the same key share
        the remembered ``"auto"`` compiler choice.
      segment_callback: called after each segment (and its checkpoint) with
        a dict of progress figures (``segment``, ``num_segments``,
        ``phase``, ``step``, ``num_steps``, ``acceptance``, ``step_size``,
        ``monitor``, ``rhat``, ``num_divergent``, ``leapfrogs_per_second``,
        ``eta_seconds``); an exception it raises stops the run with every
        finished segment saved.

    Returns:
      A :class:`ChainResult`: kept states ``[R, C, *shape]``, the monitored
      trace ``[R, C]`` and :class:`Diagnostics`.

    Raises:
      ValueError / TypeError: for bad settings or state, naming the argument;
        ValueError for a checkpoint from a different configuration, naming
        the differing field.

    Example:
      >>> def target(x):                  # C chains of a 2-D standard normal
      ...     return -0.5 * tf.reduce_sum(x**2, axis=-1)
      >>> out = run_chains(target, [tf.zeros([4, 2])], num_burnin_steps=100,
      ...                  num_results=200, step_size=0.5, seed=1)
      >>> out.states[0].shape
      (200, 4, 2)
    """
    settings = _settings(
        num_burnin_steps=num_burnin_steps, num_results=num_results,
        thinning=thinning, step_size=step_size,
        num_leapfrog_steps=num_leapfrog_steps, kernel=kernel,
        max_tree_depth=max_tree_depth, target_accept_prob=target_accept_prob,
        num_adaptation_steps=num_adaptation_steps,
        checkpoint_every=checkpoint_every, jit_compile=jit_compile)
    state = _check_state(initial_state)
    seed = _check_seed(seed)
    if not callable(target_log_prob_fn):
        raise TypeError("target_log_prob_fn must be callable.")
    if segment_callback is not None and not callable(segment_callback):
        raise TypeError("segment_callback must be callable or None.")
    if checkpoint_dir is not None and not isinstance(checkpoint_dir,
                                                     (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a path or None, got "
                        f"{checkpoint_dir!r}.")
    config = dict(fingerprint or {})
    config.update(settings)
    config["seed"] = seed
    config["state_shapes"] = [list(s.shape) for s in state]
    # As it will read back from a checkpoint (tuples become lists).
    config = json.loads(json.dumps(config))
    return _Run(target_log_prob_fn, state, settings, config, monitor_fn,
                monitor_name, checkpoint_dir, segment_callback,
                compiler_key).run()


class _Run:
    """One (possibly resumed) run: the host loop over compiled segments."""

    def __init__(self, target_log_prob_fn, state, settings, config, monitor_fn,
                 monitor_name, checkpoint_dir, segment_callback, compiler_key):
        self.target = target_log_prob_fn
        self.state = state
        self.settings = settings
        self.config = config
        self.digest = _digest(config)
        self.monitor_fn = monitor_fn or _target_log_prob_monitor
        self.monitor_name = monitor_name
        self.dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.callback = segment_callback
        self.compiler_key = compiler_key
        self.plan = _plan(settings)
        self.kernel = _build_kernel(target_log_prob_fn, state, settings)
        self.samples: list[list[np.ndarray]] = []
        self.traces: list[np.ndarray] = []
        self.summaries: list[dict] = []
        self.wall = 0.0
        self.use_xla = None

    # ----------------------------------------------------------- compiling
    def _compile(self):
        kernel, monitor_fn = self.kernel, self.monitor_fn

        def segment(state, results, seed, num_first, num_between, num_kept):
            results = _zero_counters(results.inner_results)
            out = tfp.mcmc.sample_chain(
                num_results=num_kept, current_state=list(state),
                previous_kernel_results=results, kernel=kernel,
                num_burnin_steps=num_first,
                num_steps_between_results=num_between,
                trace_fn=lambda s, r: monitor_fn(
                    s, _target_log_prob(r.inner_results)),
                return_final_kernel_results=True, seed=seed)
            final = out.final_kernel_results
            summary = {"accept_prob_sum": final.accept_prob_sum,
                       "num_divergent": final.num_divergent,
                       "num_leapfrogs": final.num_leapfrogs,
                       "step_size": _per_chain_step_size(final.inner_results)}
            return out.all_states, out.trace, final, summary

        self.segment = xla.compile_fn(segment, self.use_xla, "hmc_segment")
        # Runs once per run: TF kernels spare an XLA compilation.
        self.bootstrap = xla.compile_fn(
            lambda s: kernel.bootstrap_results(list(s)), False,
            "hmc_bootstrap")

    # ---------------------------------------------------------- checkpoints
    def _ckpt_path(self):
        return os.path.join(self.dir, CHECKPOINT_FILE)

    def _try_resume(self) -> int:
        if self.dir is None or not os.path.exists(self._ckpt_path()):
            return 0
        arrays, meta = _load_checkpoint(self._ckpt_path(), self.config)
        # An "auto" run keeps the compiler it chose first, so the resumed
        # samples stay bit-identical.
        self.use_xla = bool(meta["use_xla"])
        done = int(meta["segments_done"])
        if done < len(self.plan):
            self._compile()
            template = self.bootstrap(self.state)
            self.state, self.results = _restore(self._ckpt_path(), arrays,
                                                template, self.state)
        self.summaries = list(meta["summaries"])
        self.wall = float(meta["wall_seconds"])
        for j in range(done):
            if self.plan[j][0] == "sampling":
                parts, trace = _load_segment(self.dir, j, self.digest,
                                             len(self.state))
                self.samples.append(parts)
                self.traces.append(trace)
        logging.info("HMC: resuming from %s after segment %d/%d.",
                     self._ckpt_path(), done, len(self.plan))
        return done

    def _save(self, j: int, kept_parts, trace):
        if self.dir is None:
            return
        if kept_parts is not None:
            arrays = {f"state_{i}": p for i, p in enumerate(kept_parts)}
            arrays["trace"] = trace
            files.save_arrays(os.path.join(self.dir, _SEGMENT_FILE.format(j)),
                              arrays, {"digest": self.digest, "segment": j})
        arrays = {f"state_{i}": s.numpy() for i, s in enumerate(self.state)}
        for i, leaf in enumerate(tf.nest.flatten(self.results)):
            arrays[f"results_{i}"] = leaf.numpy()
        files.save_arrays(self._ckpt_path(), arrays, {
            "format": _FORMAT, "format_version": _FORMAT_VERSION,
            "config": self.config, "digest": self.digest,
            "segments_done": j + 1,
            "iteration": sum(x["steps"] for x in self.summaries),
            "summaries": self.summaries,
            "wall_seconds": self.wall, "use_xla": bool(self.use_xla)})

    # ----------------------------------------------------------------- loop
    def run(self) -> ChainResult:
        start_segment = self._try_resume()
        if start_segment == 0:
            self.use_xla = _choose_jit(self.target, self.state,
                                       self.config["jit_compile"],
                                       self.compiler_key)
            self._compile()
            self.results = self.bootstrap(self.state)
        base_seed = tf.constant(self.config["seed"], tf.int32)
        seen_shapes = set()  # compiled in this process
        try:
            for j in range(start_segment, len(self.plan)):
                phase, steps, kept = self.plan[j]
                if phase == "burnin":
                    num_first, num_between, num_kept = steps - 1, 0, 1
                else:
                    thin = self.settings["thinning"]
                    num_first, num_between, num_kept = thin - 1, thin - 1, kept
                seed = seeds.fold_in(base_seed, j)
                tic = time.perf_counter()
                states, trace, self.results, summary = self.segment(
                    self.state, self.results, seed, tf.constant(num_first),
                    tf.constant(num_between), num_kept=num_kept)
                trace = trace.numpy()
                seconds = time.perf_counter() - tic
                self.wall += seconds
                self.state = [s[-1] for s in states]
                kept_parts = None
                if phase == "sampling":
                    kept_parts = [s.numpy() for s in states]
                    self.samples.append(kept_parts)
                    self.traces.append(trace)
                summary = {k: v.numpy().tolist() for k, v in summary.items()}
                summary.update(segment=j, phase=phase, steps=steps,
                               num_kept=num_kept, seconds=seconds,
                               first_call=num_kept not in seen_shapes,
                               monitor=trace[-1].tolist())
                seen_shapes.add(num_kept)
                self.summaries.append(summary)
                self._save(j, kept_parts, trace)
                info = self._progress(j, summary)
                if self.callback is not None:
                    self.callback(info)
        except KeyboardInterrupt:
            logging.warning(
                "HMC: interrupted; %d segments are saved%s.",
                len(self.summaries),
                f" in {self.dir!r}; run again with the same arguments to "
                "resume" if self.dir else " nowhere (no checkpoint_dir)")
            raise
        return self._result()

    def _progress(self, j: int, s: dict) -> dict:
        steps = sum(x["steps"] for x in self.summaries)
        total = sum(p[1] for p in self.plan)
        chains = len(s["step_size"])
        leapfrogs = float(sum(s["num_leapfrogs"]))
        rate = leapfrogs / max(s["seconds"], 1e-9)
        remaining = (total - steps) * leapfrogs / max(s["steps"], 1)
        info = {
            "segment": j, "num_segments": len(self.plan), "phase": s["phase"],
            "step": steps, "num_steps": total,
            "acceptance": float(np.sum(s["accept_prob_sum"])) / (
                s["steps"] * chains),
            "step_size": float(np.mean(s["step_size"])),
            "monitor": float(np.mean(s["monitor"])),
            "num_divergent": int(np.sum(s["num_divergent"])),
            "leapfrogs_per_second": rate,
            "eta_seconds": remaining / rate if rate > 0 else float("inf"),
            "rhat": (_rhat_ess(np.concatenate(self.traces).astype(np.float64))[0]
                     if self.traces else float("nan")),
        }
        logging.info(
            "HMC segment %d/%d (%s): step %d/%d, acceptance %.3f, step size "
            "%.3g, %s %.4g (R-hat so far %.3f), divergent %d, %.4g leapfrog "
            "steps/s, ETA %s",
            j + 1, len(self.plan), s["phase"], steps, total,
            info["acceptance"], info["step_size"], self.monitor_name,
            info["monitor"], info["rhat"], info["num_divergent"], rate,
            _format_eta(info["eta_seconds"]))
        return info

    def _result(self) -> ChainResult:
        parts = [np.concatenate([seg[i] for seg in self.samples], axis=0)
                 for i in range(len(self.state))]
        trace = np.concatenate(self.traces, axis=0)
        diagnostics = self._diagnostics(parts, trace)
        logging.info(
            "HMC done: acceptance %s, %d divergent, R-hat %.3f / ESS %.0f (%s), "
            "R-hat %.3f / ESS %.0f (weight projection), %.4g leapfrog steps/s, "
            "%.0f s (compilation ~%.0f s), %s",
            np.round(diagnostics.acceptance_rate, 3), diagnostics.num_divergent,
            diagnostics.rhat_log_likelihood, diagnostics.ess_log_likelihood,
            self.monitor_name, diagnostics.rhat_projection,
            diagnostics.ess_projection, diagnostics.leapfrog_steps_per_second,
            diagnostics.wall_seconds, diagnostics.compile_seconds,
            diagnostics.jit)
        return ChainResult(parts, trace, diagnostics)

    def _diagnostics(self, parts, trace) -> Diagnostics:
        sums = self.summaries
        chains = trace.shape[1]

        def phase_total(key, phase):
            rows = [np.asarray(s[key], np.float64) for s in sums
                    if s["phase"] == phase]
            return np.sum(rows, axis=0) if rows else np.zeros(chains)

        def phase_steps(phase):
            return sum(s["steps"] for s in sums if s["phase"] == phase)

        post = phase_steps("sampling")
        burn = phase_steps("burnin")
        acc = phase_total("accept_prob_sum", "sampling") / post
        burn_acc = (phase_total("accept_prob_sum", "burnin") / burn if burn
                    else np.full(chains, np.nan))
        proj = sum(np.tensordot(p.astype(np.float64), v, axes=v.ndim)
                   for p, v in zip(parts, _projection(parts)))
        rhat_ll, ess_ll = _rhat_ess(trace.astype(np.float64))
        rhat_p, ess_p = _rhat_ess(proj)
        leapfrogs = [float(np.sum(s["num_leapfrogs"])) for s in sums]
        steady = [(l, s["seconds"]) for l, s in zip(leapfrogs, sums)
                  if not s["first_call"]]
        if steady:
            rate = sum(l for l, _ in steady) / max(sum(t for _, t in steady),
                                                   1e-9)
            compile_s = sum(max(0.0, s["seconds"] - l / rate)
                            for l, s in zip(leapfrogs, sums) if s["first_call"])
        else:
            rate = sum(leapfrogs) / max(self.wall, 1e-9)
            compile_s = float("nan")
        return Diagnostics(
            kernel=self.settings["kernel"], num_chains=chains,
            num_results=trace.shape[0],
            acceptance_rate=tuple(float(a) for a in acc),
            burnin_acceptance_rate=tuple(float(a) for a in burn_acc),
            step_size=tuple(float(v) for v in sums[-1]["step_size"]),
            num_divergent=int(phase_total("num_divergent", "sampling").sum()),
            num_divergent_burnin=int(phase_total("num_divergent", "burnin").sum()),
            rhat_log_likelihood=rhat_ll, ess_log_likelihood=ess_ll,
            rhat_projection=rhat_p, ess_projection=ess_p,
            wall_seconds=float(self.wall), compile_seconds=float(compile_s),
            leapfrog_steps_per_second=float(rate),
            num_leapfrog_steps=int(sum(leapfrogs)),
            jit="xla" if self.use_xla else "default",
            num_segments=len(self.plan))


# --------------------------------------------------------------------------
# Initial states.
# --------------------------------------------------------------------------
def _prior_init(network: Network, num_chains: int, prior_scale: float, seed):
    parts = seeds.split(seed, len(network.param_shapes))
    return [prior_scale * tf.random.stateless_normal([num_chains] + list(shape),
                                                     seed=s)
            for shape, s in zip(network.param_shapes, tf.unstack(parts))]


def _sgd_init(network: Network, x, y, *, num_chains, prior_scale, seed, steps,
              batch_size, learning_rate, jitter, use_xla):
    """A short Adam fit of each chain to its MAP, plus Gaussian jitter.

    Every chain starts from its own draw of the Keras initialisers and
    follows minibatch Adam on ``-(N/B * batch log-lik + log prior) / N``;
    chains are independent, vectorised along the leading axis.
    """
    init_seed, batch_seed, jitter_seed = tf.unstack(seeds.split(seed, 3))
    params = network.init_params(init_seed, num_samples=num_chains)
    n = int(x.shape[0])
    b = min(batch_size, n)
    beta1, beta2, eps = 0.9, 0.999, 1e-7

    def fit(params, x, y):
        def loss_fn(ps, t):
            idx = tf.random.stateless_uniform(
                [b], seeds.fold_in(batch_seed, t),
                maxval=n, dtype=tf.int32)
            ll = shard_log_likelihood(network, ps, tf.gather(x, idx),
                                      tf.gather(y, idx))
            return -tf.reduce_sum(n / b * ll + log_prior(ps, prior_scale)) / n

        def body(t, ps, m, v):
            with tf.GradientTape() as tape:
                tape.watch(ps)
                loss = loss_fn(ps, t)
            g = tape.gradient(loss, ps)
            tf_ = tf.cast(t + 1, tf.float32)
            m = [beta1 * a + (1 - beta1) * c for a, c in zip(m, g)]
            v = [beta2 * a + (1 - beta2) * tf.square(c) for a, c in zip(v, g)]
            lr = learning_rate * tf.sqrt(1 - beta2**tf_) / (1 - beta1**tf_)
            ps = [p - lr * a / (tf.sqrt(c) + eps) for p, a, c in zip(ps, m, v)]
            return t + 1, ps, m, v

        zeros = [tf.zeros_like(p) for p in params]
        _, params, _, _ = tf.while_loop(lambda t, *_: t < steps, body,
                                        (tf.constant(0), list(params), zeros,
                                         zeros))
        return params

    tic = time.perf_counter()
    fitted = xla.compile_fn(fit, use_xla, "hmc_sgd_init")(params, x, y)
    logging.info("HMC: initial states from %d Adam steps per chain (%.1f s).",
                 steps, time.perf_counter() - tic)
    noise_seeds = tf.unstack(seeds.split(jitter_seed, len(fitted)))
    return [p + jitter * tf.random.stateless_normal(tf.shape(p), seed=s)
            for p, s in zip(fitted, noise_seeds)]


# --------------------------------------------------------------------------
# The entry point.
# --------------------------------------------------------------------------
def _architecture_hash(network: Network) -> str:
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != "name"}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    # Keras numbers layer names per process ("dense_3"), so names are left
    # out: the same architecture resumes in a new process.
    cfg = strip(network.get_config())
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def _array_hash(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(repr((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _auto_shard_size(network: Network, num_chains: int, n: int) -> int:
    per_example = 3 * 4 * num_chains * max(1, network.activation_size_per_example())
    return int(max(1, min(n, _SHARD_MEMORY_BUDGET // per_example)))


def sample(network, train_x, train_y, *, num_chains: int = 4,
           num_burnin_steps: int = 200, num_results: int = 100,
           thinning: int = 1, step_size: float = 0.005,
           num_leapfrog_steps: int = 10, kernel: str = "hmc",
           prior_scale: float = 1.0, seed=0,
           checkpoint_dir: str | None = None,
           checkpoint_every: int | None = None,
           max_tree_depth: int = 10, target_accept_prob: float = 0.75,
           num_adaptation_steps: int | None = None,
           init="prior", init_steps: int = 300, init_batch_size: int = 256,
           init_learning_rate: float = 1e-3, init_jitter: float = 0.01,
           shard_size: int | None = None, jit_compile=None,
           segment_callback: Callable[[dict], Any] | None = None,
           strategy=None, parallelism: str = "data",
           matmul_precision: str = "highest"
           ) -> tuple[PosteriorEnsemble, Diagnostics]:
    """Samples a BNN posterior with full-batch HMC (or NUTS).

    The target is ``log p(w) + sum_n log softmax(f(x_n, w))[y_n]`` with the
    prior ``N(0, prior_scale^2)`` on every weight and bias and the
    likelihood summed over *all* training points.  ``num_chains`` chains
    advance together in one compiled, vectorised step; see
    :func:`run_chains` for adaptation, segments and checkpoints.

    Args:
      network: a :class:`~tfp_bnn_adv.network.Network` or a built Keras 3
        model (imported with ``Network.from_keras``).
      train_x: inputs ``[N, *input_shape]``.
      train_y: integer labels ``[N]`` in ``[0, num_classes)``.
      num_chains: independent chains ``C`` (>= 1).
      num_burnin_steps: discarded iterations per chain (>= 0).
      num_results: kept samples per chain ``R`` (>= 1).
      thinning: iterations per kept sample (>= 1).
      step_size: initial leapfrog step size (> 0); adapted per chain during
        burn-in.
      num_leapfrog_steps: leapfrog steps per HMC iteration (>= 1).
      kernel: ``"hmc"`` or ``"nuts"``.
      prior_scale: prior standard deviation (> 0); the paper uses 1.
      seed: an int in ``[0, 2**31 - 1]`` or a stateless seed ``[2]``; the same
        seed gives the same samples.
      checkpoint_dir: where to checkpoint and resume (``None``: nowhere).
      checkpoint_every: iterations per segment; default about a tenth.
      max_tree_depth: NUTS' maximum tree depth.
      target_accept_prob: acceptance probability the adaptation aims for.
      num_adaptation_steps: adapting burn-in iterations; default
        ``int(0.8 * num_burnin_steps)``; 0 keeps ``step_size`` fixed.
      init: ``"prior"`` (a prior draw per chain), ``"sgd"`` (each chain's
        Keras initialisation fitted by ``init_steps`` minibatch Adam steps on
        the log-posterior, plus ``N(0, init_jitter^2)`` noise) or an explicit
        list of float32 arrays ``[C, *shape]``.
      init_steps: Adam steps for ``init="sgd"``.
      init_batch_size: minibatch size for ``init="sgd"``.
      init_learning_rate: Adam learning rate for ``init="sgd"``.
      init_jitter: standard deviation of the noise added after the fit.
      shard_size: training points per likelihood shard; default: as many as
        keep one shard's activations of all chains under ~1 GiB.
      jit_compile: ``True``, ``False``, ``"auto"`` or ``None`` (see
        :func:`tfp_bnn_adv.xla.compile_fn`).
      segment_callback: called with progress figures after every segment.
      strategy: a ``tf.distribute.Strategy`` to spread the likelihood over
        (see the module docstring); ``None`` uses the strategy whose scope
        is open, if any.  With one replica nothing changes.
      parallelism: with several replicas, ``"data"`` (split the training
        set; the all-reduce adds the parts) or ``"chains"`` (split the
        chains; ``num_chains`` must divide evenly).
      matmul_precision: ``"highest"`` (full float32 matmuls, the default) or
        ``"default"`` (the hardware's: TF32 on Ampere GPUs, bfloat16 passes
        on TPUs; faster, but may make HMC diverge).  See
        :func:`tfp_bnn_adv.distribute.matmul_precision`.

    Returns:
      ``(ensemble, diagnostics)``: a
      :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble` of ``S = C * R`` weight
      sets (chain-major: sample ``c * R + r`` is chain ``c``'s ``r``-th kept
      state), float32 parameters ``[S, *shape]``, with ``metadata``
      ``{"method": "hmc", "settings": ..., "diagnostics": ...}``; and the
      :class:`Diagnostics`.

    Raises:
      ValueError / TypeError: for a bad setting (non-positive step size,
        chains, results or thinning, negative burn-in, unknown kernel, ...),
        inputs whose shape does not fit the network, ``train_x``/``train_y``
        length mismatch, non-integer or out-of-range labels, or a checkpoint
        written by a different configuration (naming the field).

    Example:
      >>> data = tfp_bnn_adv.data.half_moons(n=500)
      >>> model = tfp_bnn_adv.models.mlp((2,), 2, hidden=(64,))
      >>> ens, diag = sample(model, data.train_x, data.train_y, num_chains=4,
      ...                    num_burnin_steps=500, num_results=200, seed=0)
      >>> ens.num_samples, diag.rhat_log_likelihood < 1.1
      (800, True)
    """
    if not isinstance(network, Network):
        network = Network.from_keras(network)
    x, y = network.check_inputs(train_x, train_y, x_name="train_x",
                                y_name="train_y")
    num_chains = _check_int(num_chains, "num_chains", 1)
    prior_scale = _check_positive_real(prior_scale, "prior_scale")
    n = int(x.shape[0])
    if shard_size is None:
        shard_size = _auto_shard_size(network, num_chains, n)
    shard_size = _check_int(shard_size, "shard_size", 1)
    settings = _settings(
        num_burnin_steps=num_burnin_steps, num_results=num_results,
        thinning=thinning, step_size=step_size,
        num_leapfrog_steps=num_leapfrog_steps, kernel=kernel,
        max_tree_depth=max_tree_depth, target_accept_prob=target_accept_prob,
        num_adaptation_steps=num_adaptation_steps,
        checkpoint_every=checkpoint_every, jit_compile=jit_compile)
    base_seed = _check_seed(seed)
    strategy = distribute.current_strategy(strategy)
    replicas = distribute.num_replicas(strategy)
    _check_parallelism(parallelism, num_chains, replicas)
    distribute.check_matmul_precision(matmul_precision)
    init_cfg, explicit = _check_init(network, num_chains, init, init_steps,
                                     init_batch_size, init_learning_rate,
                                     init_jitter)
    fingerprint = {"architecture": _architecture_hash(network),
                   "data": _array_hash(x.numpy(), y.numpy()),
                   "num_train": n, "num_chains": num_chains,
                   "prior_scale": prior_scale, "shard_size": shard_size,
                   "init": init_cfg}

    run_jit = settings["jit_compile"]
    if replicas == 1:
        shards = shard_data(x, y, shard_size)

        def likelihood(*params):
            return log_likelihood(network, params, *shards)
    else:
        # The segment loop holds one copy of the state and runs on the host
        # device; each replica's likelihood gradient is compiled on its own.
        local_jit = xla.resolve_jit(run_jit)
        if local_jit == "auto":  # time one replica's share on one device
            per = -(-n // replicas) if parallelism == "data" else n
            probe_shards = shard_data(x[:per], y[:per], shard_size)
            local_jit = _choose_jit(
                lambda *ps: log_likelihood(network, ps, *probe_shards),
                _prior_init(network, num_chains, prior_scale, base_seed),
                "auto", f"replica_{per}_{shard_size}_{fingerprint['architecture'][:8]}")
        likelihood = replicated_log_likelihood(
            network, strategy, x, y, shard_size=shard_size,
            parallelism=parallelism, num_chains=num_chains,
            jit_compile=local_jit)
        run_jit = False
        logging.info("HMC over %d replicas (%s-parallel, per-replica XLA: %s).",
                     replicas, parallelism, local_jit)

    def target(*params):
        return likelihood(*params) + log_prior(params, prior_scale)

    def monitor(params, tlp):
        return tlp - log_prior(params, prior_scale)

    init_seed, chain_seed = tf.unstack(seeds.split(base_seed, 2))
    if explicit is not None:
        state = explicit
    elif init == "prior" or _has_checkpoint(checkpoint_dir):
        # A resumed run only needs the state's shapes; the SGD fit is skipped.
        state = _prior_init(network, num_chains, prior_scale, init_seed)
    else:
        # A short one-off loop: XLA unless pinned off (auto-tuning would run
        # the whole fit several times).
        state = _sgd_init(network, x, y, num_chains=num_chains,
                          prior_scale=prior_scale, seed=init_seed,
                          steps=init_steps, batch_size=init_batch_size,
                          learning_rate=init_learning_rate, jitter=init_jitter,
                          use_xla=settings["jit_compile"] is not False)
    with distribute.matmul_precision(matmul_precision):
        result = _run_chains_for_sample(
            target, state, chain_seed, checkpoint_dir, monitor, fingerprint,
            segment_callback, settings, run_jit)
    # [R, C, ...] -> chain-major [C * R, ...].
    params = [np.reshape(np.swapaxes(p, 0, 1), (-1,) + p.shape[2:])
              for p in result.states]
    diagnostics = result.diagnostics
    settings_out = dict(fingerprint)
    settings_out.update(settings)
    settings_out["seed"] = base_seed
    settings_out["num_replicas"] = replicas
    settings_out["parallelism"] = parallelism
    settings_out["matmul_precision"] = matmul_precision
    metadata = {"method": "hmc", "settings": settings_out,
                "diagnostics": diagnostics.to_dict()}
    return PosteriorEnsemble(network, params, metadata=metadata), diagnostics


def _run_chains_for_sample(target, state, chain_seed, checkpoint_dir, monitor,
                           fingerprint, segment_callback, settings, run_jit):
    """:func:`run_chains` with :func:`sample`'s target and settings."""
    settings = dict(settings, jit_compile=run_jit)
    return run_chains(
        target, state, seed=[int(v) for v in chain_seed.numpy()],
        checkpoint_dir=checkpoint_dir, monitor_fn=monitor,
        monitor_name="log-likelihood", fingerprint=fingerprint,
        compiler_key=_digest({k: fingerprint[k] for k in (
            "architecture", "num_train", "shard_size")})[:12],
        segment_callback=segment_callback,
        **{k: settings[k] for k in (
            "num_burnin_steps", "num_results", "thinning", "step_size",
            "num_leapfrog_steps", "kernel", "max_tree_depth",
            "target_accept_prob", "num_adaptation_steps", "checkpoint_every",
            "jit_compile")})


def _has_checkpoint(checkpoint_dir) -> bool:
    return checkpoint_dir is not None and os.path.exists(
        os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_FILE))


def _check_init(network, num_chains, init, steps, batch_size, learning_rate,
                jitter):
    """Validates ``init``; returns its fingerprint and an explicit state."""
    if isinstance(init, str):
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS} or a list of "
                             f"arrays [C, *shape], got {init!r}.")
        if init == "prior":
            return "prior", None
        cfg = {"kind": "sgd",
               "steps": _check_int(steps, "init_steps", 1),
               "batch_size": _check_int(batch_size, "init_batch_size", 1),
               "learning_rate": _check_positive_real(learning_rate,
                                                     "init_learning_rate")}
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or (
                not math.isfinite(jitter) or jitter < 0):
            raise ValueError(f"init_jitter must be a finite number >= 0, got "
                             f"{jitter!r}.")
        cfg["jitter"] = float(jitter)
        return cfg, None
    state = network.check_params(init, stacked=True, name="init")
    if state[0].shape[0] != num_chains:
        raise ValueError(f"init has {state[0].shape[0]} chains on its leading "
                         f"axis; num_chains is {num_chains}.")
    state = _check_state(state, "init")
    return {"kind": "explicit",
            "hash": _array_hash(*[s.numpy() for s in state])}, state
