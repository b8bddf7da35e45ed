"""The transition kernel: TFP's HMC/NUTS, preconditioned, with windowed adaptation.

The stack, innermost first:

* ``tfp.mcmc.HamiltonianMonteCarlo`` (or ``NoUTurnSampler``), storing step
  size and leapfrog count in its results so the wrappers can set them;
* :class:`DiagonalPreconditioning` (ours): runs that kernel in whitened
  coordinates ``z = w / sigma``, which is exactly HMC with the diagonal
  mass matrix ``diag(1 / sigma^2)`` (inverse mass ``sigma^2``), and
  estimates ``sigma^2`` per chain with Welford's running variance in the
  slow windows;
* ``tfp.mcmc.DualAveragingStepSizeAdaptation``: one step size per chain;
* :class:`Counted` (ours): sets each HMC iteration's leapfrog count from the
  trajectory length and the current step size, and counts acceptance,
  divergences and leapfrog steps.

Why not ``tfp.experimental.mcmc.PreconditionedHamiltonianMonteCarlo`` with
``DiagonalMassMatrixAdaptation``: they sample the same dynamics, but their
joint-distribution momentum makes graph tracing about 25x slower (14 s
against 0.5 s for a 2-8-2 MLP's segment, measured here), which every run
pays before its first step.  The whitened-coordinates form is the textbook
equivalent (Neal 2011, section 4.1) and keeps TFP's kernels unchanged.

Warm-up follows Stan's windows (:func:`warmup_windows`): a fast initial
window adapts only the step size while the chain travels to the typical set;
slow windows of doubling length each estimate the variance of that window's
draws and, at its end, install ``n / (n + 5) * var + 1e-3 * 5 / (n + 5)``
(Stan's regularised estimate) as the new inverse mass matrix; a fast final
window settles the step size for the final mass matrix.  At the start of
each window :func:`begin_window` restarts dual averaging (its target
``log(10 * step size)``, as Stan) and, for a slow window, the running
variance.  Each window ends with dual averaging's averaged step size; after
warm-up the step size and mass matrix stay fixed, so the kept draws form a
valid Markov chain.  TFP's ``windowed_adaptive_hmc`` arranges the same
windows in one call; we keep them as state in the kernel results instead,
so a run split into checkpointed segments resumes bit-identically in the
middle of a window.  Unlike that function, chains do not pool their
variance estimates: BNN chains sit in different modes, and independent
adaptation keeps them independent chains for R-hat.
"""

from __future__ import annotations

import collections
import math
from typing import Callable

import tensorflow as tf
import tensorflow_probability as tfp

from tfp_bnn_adv import seeds
from tfp_bnn_adv.inference.hmc.config import HMCConfig

__all__ = ["Counted", "CountedResults", "DiagonalPreconditioning",
           "PreconditioningResults", "build_kernel", "warmup_windows",
           "begin_window", "target_log_prob", "per_chain_step_size",
           "inverse_mass", "zero_counters", "MAX_ENERGY_ERROR"]

# NUTS' own threshold for a divergent transition, applied to HMC as well so
# both kernels count divergences by the same rule.
MAX_ENERGY_ERROR = 1000.0
# Stan's windows and regularisation of the variance estimate.
_INIT_BUFFER, _TERM_BUFFER, _BASE_WINDOW = 75, 50, 25
_REG_DRAWS, _REG_VARIANCE = 5.0, 1e-3


def warmup_windows(num_adaptation_steps: int) -> list[tuple[str, int]]:
    """Stan's adaptation windows as ``[(kind, length), ...]``.

    ``kind`` is ``"fast"`` (step size only) or ``"slow"`` (step size and
    mass matrix).  With fewer than 150 steps the buffers shrink to 15% and
    10% of the warm-up (Stan's rule); with fewer than 20 it is one fast
    window.  Slow windows double from 25 steps, the last one stretched to
    the final buffer.

    Example:
      >>> warmup_windows(1000)
      [('fast', 75), ('slow', 25), ('slow', 50), ('slow', 100), ('slow', 200),
       ('slow', 500), ('fast', 50)]
    """
    a = int(num_adaptation_steps)
    if a <= 0:
        return []
    if a < 20:
        return [("fast", a)]
    init, term, base = _INIT_BUFFER, _TERM_BUFFER, _BASE_WINDOW
    if init + term + base > a:
        init, term = int(0.15 * a), int(0.1 * a)
        base = a - init - term
    windows = [("fast", init)] if init else []
    start, end, size = init, a - term, base
    while start < end:
        # Stretch this window to the end if the next one would not fit.
        if start + size + 2 * size > end:
            size = end - start
        windows.append(("slow", size))
        start += size
        size *= 2
    if term:
        windows.append(("fast", term))
    return windows


def _precond(adapted):
    """The :class:`DiagonalPreconditioning` results under dual averaging."""
    return adapted.inner_results


def _innermost(adapted):
    """The HMC/NUTS results (HMC's accepted results under its MH layer)."""
    r = _precond(adapted).inner_results
    return r.accepted_results if hasattr(r, "accepted_results") else r


def _proposal(adapted):
    """The layer holding ``log_accept_ratio`` (MH for HMC, NUTS itself)."""
    return _precond(adapted).inner_results


def target_log_prob(adapted) -> tf.Tensor:
    """Target log-density ``[C]`` from the adaptation stack's results."""
    return _innermost(adapted).target_log_prob


def per_chain_step_size(adapted) -> tf.Tensor:
    """The step size ``[C]`` the next iteration will use."""
    return tf.reshape(tf.nest.flatten(adapted.new_step_size)[0], [-1])


def inverse_mass(adapted) -> list[tf.Tensor]:
    """The diagonal inverse mass matrix per state part, ``[C, *shape]``."""
    return [tf.square(s) for s in _precond(adapted).scale]


class PreconditioningResults(
        collections.namedtuple("PreconditioningResults", [
            "inner_results", "scale", "count", "mean", "m2", "step",
            "num_estimation_steps"])):
    """Results of :class:`DiagonalPreconditioning`.

    Attributes:
      inner_results: the inner kernel's results, in whitened coordinates.
      scale: per state part ``[C, *shape]``, ``sigma`` (inverse mass
        ``sigma^2``).
      count, mean, m2: Welford's running count ``[]`` and per-part mean and
        sum of squared deviations of the window's draws.
      step: iterations since the window began.
      num_estimation_steps: iterations of the current window that estimate
        the variance (0: none); at the last one ``scale`` is updated.
    """
    __slots__ = ()


class DiagonalPreconditioning(tfp.mcmc.TransitionKernel):
    """HMC/NUTS with a diagonal mass matrix, adapted from the chain's draws.

    ``make_inner(target_fn)`` builds the inner kernel for a target in
    whitened coordinates ``z = w / sigma``; it is rebuilt every step with
    the current ``sigma`` (cheap: kernels are plain Python objects).  The
    cached gradient of the inner results is rescaled when ``sigma``
    changes, so no extra gradient is evaluated.
    """

    def __init__(self, target_log_prob_fn: Callable, make_inner: Callable):
        self._target = target_log_prob_fn
        self._make_inner = make_inner
        self._parameters = dict(target_log_prob_fn=target_log_prob_fn,
                                make_inner=make_inner)

    @property
    def parameters(self):
        return self._parameters

    @property
    def is_calibrated(self):
        return True

    def _inner(self, scale):
        def whitened(*z):
            return self._target(*[s * v for s, v in zip(scale, z)])
        return self._make_inner(whitened)

    def bootstrap_results(self, init_state):
        state = list(init_state)
        scale = [tf.ones_like(s) for s in state]
        return PreconditioningResults(
            inner_results=self._inner(scale).bootstrap_results(state),
            scale=scale, count=tf.zeros([]),
            mean=[tf.zeros_like(s) for s in state],
            m2=[tf.zeros_like(s) for s in state],
            step=tf.zeros([], tf.int32),
            num_estimation_steps=tf.zeros([], tf.int32))

    def one_step(self, current_state, previous_kernel_results, seed=None):
        prev = previous_kernel_results
        scale = prev.scale
        z = [w / s for w, s in zip(current_state, scale)]
        z, inner = self._inner(scale).one_step(z, prev.inner_results,
                                               seed=seed)
        state = [s * v for s, v in zip(scale, z)]
        step = prev.step + 1
        estimating = step <= prev.num_estimation_steps
        # Welford's update, applied only while the window estimates.
        count = prev.count + 1.0
        deltas = [w - m for w, m in zip(state, prev.mean)]
        mean = [m + d / count for m, d in zip(prev.mean, deltas)]
        m2 = [q + d * (w - m) for q, d, w, m in zip(prev.m2, deltas, state,
                                                     mean)]
        count = tf.where(estimating, count, prev.count)
        mean = [tf.where(estimating, a, b) for a, b in zip(mean, prev.mean)]
        m2 = [tf.where(estimating, a, b) for a, b in zip(m2, prev.m2)]
        # At the window's last step, Stan's regularised variance becomes
        # the new inverse mass matrix.
        install = tf.equal(step, prev.num_estimation_steps)
        n = tf.maximum(count, 2.0)
        new_scale = [tf.where(install, tf.sqrt(
            n / (n + _REG_DRAWS) * q / (n - 1.0) +
            _REG_VARIANCE * _REG_DRAWS / (n + _REG_DRAWS)), s)
                     for q, s in zip(m2, scale)]
        inner = _rescale_gradients(inner, [a / b for a, b in
                                           zip(new_scale, scale)])
        return state, PreconditioningResults(
            inner_results=inner, scale=new_scale, count=count, mean=mean,
            m2=m2, step=step, num_estimation_steps=prev.num_estimation_steps)


def _rescale_gradients(inner, ratio):
    """Whitened-coordinate gradients for a new scale: ``g * new / old``."""
    base = inner.accepted_results if hasattr(inner, "accepted_results") else inner
    base = base._replace(grads_target_log_prob=[
        g * r for g, r in zip(base.grads_target_log_prob, ratio)])
    if hasattr(inner, "accepted_results"):
        return inner._replace(accepted_results=base)
    return base


class CountedResults(
        collections.namedtuple("CountedResults", [
            "inner_results", "accept_prob_sum", "num_divergent",
            "num_leapfrogs"])):
    """Adaptation-stack results plus per-chain counters since the last reset."""
    __slots__ = ()


def zero_counters(adapted) -> CountedResults:
    tlp = target_log_prob(adapted)
    izeros = tf.zeros(tf.shape(tlp), tf.int32)
    return CountedResults(adapted, tf.zeros_like(tlp), izeros, izeros)


class Counted(tfp.mcmc.TransitionKernel):
    """Outermost wrapper: trajectory length to leapfrog count, and counters.

    For HMC, before each iteration it sets the leapfrog count to
    ``ceil(u * L / eps)`` (``eps`` the geometric mean of the chains' step
    sizes, because chains advance together; ``u`` the jitter), capped at
    ``max_leapfrog_steps``, or to a fixed ``num_leapfrog_steps``.  Results
    add, per chain: the summed Metropolis acceptance probability, divergent
    transitions (non-finite energy or an energy error above 1000, NUTS'
    rule) and leapfrog steps.
    """

    def __init__(self, inner_kernel, config: HMCConfig):
        self._inner = inner_kernel
        self._config = config
        self._parameters = dict(inner_kernel=inner_kernel, config=config)

    @property
    def parameters(self):
        return self._parameters

    @property
    def is_calibrated(self):
        return self._inner.is_calibrated

    def bootstrap_results(self, init_state):
        return zero_counters(self._inner.bootstrap_results(init_state))

    def _leapfrogs(self, adapted, seed) -> tf.Tensor:
        cfg = self._config
        if cfg.num_leapfrog_steps is not None:
            return tf.constant(cfg.num_leapfrog_steps, tf.int32)
        eps = tf.exp(tf.reduce_mean(tf.math.log(per_chain_step_size(adapted))))
        u = seeds.uniform([], seed, minval=1.0 - cfg.trajectory_jitter,
                          maxval=1.0 + cfg.trajectory_jitter)
        n = tf.math.ceil(u * cfg.trajectory_length / eps)
        return tf.cast(tf.clip_by_value(n, 1.0, float(cfg.max_leapfrog_steps)),
                       tf.int32)

    def one_step(self, current_state, previous_kernel_results, seed=None):
        adapted = previous_kernel_results.inner_results
        jitter_seed, step_seed = tf.unstack(seeds.split(seed, 2))
        if self._config.kernel == "hmc":
            n = self._leapfrogs(adapted, jitter_seed)
            pre = _precond(adapted)
            mh = pre.inner_results
            mh = mh._replace(accepted_results=mh.accepted_results._replace(
                num_leapfrog_steps=n))
            adapted = adapted._replace(
                inner_results=pre._replace(inner_results=mh))
        state, adapted = self._inner.one_step(current_state, adapted,
                                              seed=step_seed)
        proposal = _proposal(adapted)
        lar = proposal.log_accept_ratio
        finite = tf.math.is_finite(lar)
        accept = tf.where(finite, tf.exp(tf.minimum(lar, 0.0)), 0.0)
        if self._config.kernel == "nuts":
            divergent = proposal.has_divergence
            leapfrogs = proposal.leapfrogs_taken
        else:
            divergent = ~finite | (lar < -MAX_ENERGY_ERROR)
            leapfrogs = tf.fill(tf.shape(lar), n)
        prev = previous_kernel_results
        return state, CountedResults(
            inner_results=adapted,
            accept_prob_sum=prev.accept_prob_sum + accept,
            num_divergent=prev.num_divergent + tf.cast(divergent, tf.int32),
            num_leapfrogs=prev.num_leapfrogs + tf.cast(leapfrogs, tf.int32))


def build_kernel(target_log_prob_fn: Callable, state, config: HMCConfig
                 ) -> Counted:
    """The full stack for ``C`` chains with state parts ``[C, *shape]``."""
    step_size = [tf.fill([s.shape[0]] + [1] * (s.shape.rank - 1),
                         tf.constant(config.step_size, tf.float32))
                 for s in state]
    if config.kernel == "hmc":
        def make_inner(target):
            return tfp.mcmc.HamiltonianMonteCarlo(
                target, step_size=step_size,
                num_leapfrog_steps=config.num_leapfrog_steps or 1,
                store_parameters_in_results=True)
    else:
        def make_inner(target):
            return tfp.mcmc.NoUTurnSampler(
                target, step_size=step_size,
                max_tree_depth=config.max_tree_depth)
    # Windows restart the adaptation (begin_window); the initial values only
    # matter for a run without warm-up, where nothing adapts.
    adapted = tfp.mcmc.DualAveragingStepSizeAdaptation(
        DiagonalPreconditioning(target_log_prob_fn, make_inner),
        num_adaptation_steps=0, target_accept_prob=config.target_accept_prob)
    return Counted(adapted, config)


def begin_window(results: CountedResults, state, kind: str, length: int,
                 config: HMCConfig) -> CountedResults:
    """Restarts the adaptation for a window of ``length`` iterations.

    Dual averaging starts afresh (as Stan: target ``log(10 * eps)`` at the
    current step size) and adapts for exactly ``length`` iterations, ending
    on its averaged step size.  A slow window with a diagonal mass matrix
    also restarts the running variance and installs its regularised
    estimate as the inverse mass matrix after ``length`` iterations.

    Args:
      results: the kernel results before the window.
      state: the chain state (list of ``[C, *shape]``).
      kind: ``"fast"`` or ``"slow"``.
      length: iterations in the window (>= 1).
      config: the run's :class:`HMCConfig`.
    """
    da = results.inner_results
    eps = tf.nest.flatten(da.new_step_size)
    estimate = kind == "slow" and config.mass_matrix == "diagonal"
    pre = da.inner_results._replace(
        count=tf.zeros([]), mean=[tf.zeros_like(s) for s in state],
        m2=[tf.zeros_like(s) for s in state], step=tf.zeros([], tf.int32),
        num_estimation_steps=tf.constant(length if estimate else 0, tf.int32))
    da = da._replace(
        inner_results=pre,
        step=tf.zeros_like(da.step),
        num_adaptation_steps=tf.constant(length, da.num_adaptation_steps.dtype),
        error_sum=tf.nest.map_structure(tf.zeros_like, da.error_sum),
        log_averaging_step=tf.nest.pack_sequence_as(
            da.log_averaging_step, [tf.math.log(e) for e in eps]),
        log_shrinkage_target=tf.nest.pack_sequence_as(
            da.log_shrinkage_target,
            [tf.math.log(e) + math.log(10.0) for e in eps]))
    return results._replace(inner_results=da)
