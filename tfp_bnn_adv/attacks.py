"""Adversarial attacks on posterior ensembles: FGSM, PGD, APGD, random, Square
Attack, and AutoAttack's per-example worst case.

Every attack is a pure function in the shape of cleverhans' attacks,
``attack(ensemble, x, y, eps, ...) -> x_adv``: it returns float32 inputs of
the shape of ``x`` inside the threat set, the ``eps``-ball around ``x`` (L-inf
or L2) intersected with the data range ``clip``.  ``y=None`` attacks the
ensemble's own predictions.

Gradient attacks (:func:`fgsm`, :func:`pgd`, :func:`apgd`) take ``gradient=``:

* ``"expected"``: Theorem 1's expected loss gradient
  ``(1/S) sum_s grad_x CE(f(x, w_s), y)`` (Carbone et al., 2020); Theorem 1
  says it vanishes for ideal BNNs, which is what makes these attacks weak.
* ``"predictive"``: the gradient of the loss of the posterior predictive,
  ``grad_x -log (1/S) sum_s softmax(f(x, w_s))[y]`` (Feng et al., 2024).
* ``"paper"``: what the authors' code attacked, on purpose:
  ``grad_x CE(y, logits = (1/S) sum_s softmax(f(x, w_s)))``, a second softmax
  over the predictive probabilities (:func:`~tfp_bnn_adv.gradients.paper_loss_gradient`;
  :mod:`tfp_bnn_adv.paper` adds the authors' first-10-samples and PGD
  schedule).
* ``"sample"``: the cross-entropy gradient of one posterior sample, drawn
  afresh at every step, as an expectation-over-transformation attacker would.

:func:`apgd` is Croce & Hein's (2020) step-size-free PGD (momentum,
checkpoints that halve the step, best-point tracking) with the
cross-entropy or the scale-free DLR loss, untargeted or targeted; on an
ensemble its "logits" follow ``gradient`` (for ``"predictive"``, the log
posterior-predictive probabilities), and ``eot_samples`` draws a few
posterior samples per step for very large ensembles.

:func:`random_attack` needs no gradient, and :func:`square_attack`
(Andriushchenko et al., 2020) only queries the posterior predictive
(log-probability margins): it tells real robustness from gradients that
merely vanish.  :func:`auto_attack` runs APGD-CE, APGD-T and Square (or the
"rand" or a custom list) each on the points still robust, and reports per
example which attack broke it (:class:`AutoAttackResult`).

How it runs: the data stream through fixed-size batches, the last one padded
(:func:`tfp_bnn_adv.chunking.map_batches`), and each batch is attacked by one
compiled function (PGD's and APGD's steps, restarts and targets, the random
trials and the Square Attack's queries are ``tf.while_loop``s inside it),
compiled once per network and configuration
(:func:`tfp_bnn_adv.xla.cached_function`).  ``eps``, step sizes, step and
query counts are tensors, so sweeping them does not recompile.

Randomness is stateless: the same ``seed`` gives the same ``x_adv``.  Random
starts and random-attack noise come from one stream per example (seed,
restart or trial, example index), so they do not depend on ``batch_size``;
the sample draws of ``gradient="sample"`` and ``eot_samples`` and the Square
Attack's proposals come from one stream per batch, so they do.  Every draw
goes through :mod:`tfp_bnn_adv.seeds`, which builds floats from Philox
integer bits because TensorFlow's and XLA's float samplers differ.  The
random attack, the Square Attack, ``gradient="sample"`` and APGD's
``eot_samples`` are stochastic code in the sense of :mod:`tfp_bnn_adv.xla`:
their ``jit_compile="auto"`` path is fixed by the platform (XLA on GPU/TPU,
TF's kernels on CPU), never chosen by a timing, so a seed gives the same
``x_adv`` on every run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from absl import logging
import numpy as np
import tensorflow as tf

from tfp_bnn_adv import chunking
from tfp_bnn_adv import distribute
from tfp_bnn_adv import seeds
from tfp_bnn_adv import validate
from tfp_bnn_adv import xla
from tfp_bnn_adv.ensemble import check_ensemble
from tfp_bnn_adv.ensemble import log_predictive_graph
from tfp_bnn_adv.ensemble import predict_proba_checked
from tfp_bnn_adv.ensemble import predict_proba_graph
from tfp_bnn_adv.gradients import loss_gradient_graph
from tfp_bnn_adv.gradients import predictive_log_prob_graph
from tfp_bnn_adv.gradients import prepare_inputs

__all__ = ["fgsm", "pgd", "apgd", "random_attack", "square_attack",
           "square_attack_with_queries", "auto_attack", "AutoAttackResult",
           "NORMS", "GRADIENTS", "RANDOM_KINDS", "APGD_LOSSES", "AUTO_ATTACKS",
           "AUTO_VERSIONS"]

NORMS = (np.inf, 2)
GRADIENTS = ("expected", "predictive", "paper", "sample")
RANDOM_KINDS = ("ternary", "uniform")
APGD_LOSSES = ("ce", "dlr")
AUTO_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "square")
AUTO_VERSIONS = ("standard", "rand", "custom")

# Square Attack: p is halved once the query count, rescaled to a budget of
# 10000, passes each of these (Andriushchenko et al., 2020, L-inf schedule).
_SQUARE_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
# A finite stand-in for -inf: never the maximum, and exp() of it is 0.
_NEG = -1e30


# --------------------------------------------------------------------------
# Argument checks (all run before any work starts).
# --------------------------------------------------------------------------
def _check_eps(eps) -> float:
    if eps is None:
        raise TypeError("eps is required: the radius of the threat ball, "
                        "e.g. eps=0.25 for [0, 1] pixels.")
    return validate.nonnegative_real(eps, "eps")


def _check_norm(norm) -> float:
    return float(validate.choice(norm, NORMS, "norm"))


@dataclasses.dataclass(frozen=True, eq=False)
class _AttackOptions:
    """The checked settings every attack call shares.

    ``clip`` is ``None`` or ``(low, high)``; ``seed`` a stateless int32
    ``[2]`` seed; the rest as the public attacks take them.
    """
    eps: float
    clip: tuple[float, float] | None
    seed: tf.Tensor
    batch_size: int | None
    chunk_size: int | None
    jit_compile: Any
    strategy: Any

    @property
    def has_clip(self) -> bool:
        return self.clip is not None

    def clip_args(self) -> tuple[tf.Tensor, tf.Tensor]:
        """``(low, high)`` as float32 scalars (zeros without a clip)."""
        lo, hi = self.clip if self.clip is not None else (0.0, 0.0)
        return tf.constant(lo, tf.float32), tf.constant(hi, tf.float32)


@dataclasses.dataclass(frozen=True)
class _GradientSteps:
    """What makes a gradient attack FGSM or PGD (checked)."""
    norm: float
    steps: int
    step_size: float
    random_start: bool
    restarts: int
    gradient: str


def _prepare(ensemble, x, y, options: _AttackOptions, cache_bound: bool = True):
    """The call's checked inputs (:func:`tfp_bnn_adv.gradients.prepare_inputs`)
    and the global index of every example, int32 ``[B]``."""
    inputs = prepare_inputs(
        ensemble, x, y, batch_size=options.batch_size,
        chunk_size=options.chunk_size, jit_compile=options.jit_compile,
        strategy=options.strategy, clip=options.clip, cache_bound=cache_bound)
    return inputs, tf.range(inputs.x.shape[0], dtype=tf.int32)


def _stream(name, fn, ensemble, inputs, idx, scalars):
    """Runs the compiled ``fn`` over fixed-size batches, logging progress.

    Each batch is split across the strategy's replicas and gathered in
    order.  Example ``i``'s random streams fold in its global index, so
    sharding does not change them.
    """
    arrays, strategy = [inputs.x, inputs.y, idx], inputs.strategy
    total = -(-int(arrays[0].shape[0]) // inputs.batch)
    start, done = time.perf_counter(), [0]

    def run(*batch_arrays):
        k = len(batch_arrays)
        out = distribute.sharded_call(
            strategy, fn, [ensemble.params, *batch_arrays, *scalars],
            range(1, 1 + k))
        done[0] += 1
        logging.info("%s: batch %d/%d done, %.1f s", name, done[0], total,
                     time.perf_counter() - start)
        return out

    return chunking.map_batches(run, arrays, inputs.batch,
                                multiple_of=distribute.num_replicas(strategy))


# --------------------------------------------------------------------------
# Graph building blocks: pure and traceable, for the compiled batch functions.
# --------------------------------------------------------------------------
def _per_example(fn, seed, idx, shape, dtype=tf.float32):
    """Stacks ``fn(example_seed) -> [*shape]`` over the batch.

    Each example's seed folds its global index into ``seed``, so its draw
    does not depend on the batch it lands in.  (A ``tf.map_fn``: ``pfor``
    has no converter for stateless samplers and would loop anyway.)
    """
    return tf.map_fn(lambda i: fn(seeds.fold_in(seed, i)), idx,
                     fn_output_signature=tf.TensorSpec(shape, dtype))


def _example_reduce(fn, t):
    return fn(t, axis=list(range(1, t.shape.rank)), keepdims=True)


def _l2_direction(g):
    """``g / ||g||_2`` per example; zero where ``g`` is zero.

    Dividing by the largest component first keeps the squares from
    underflowing, so a vanishingly small (but non-zero) gradient, the very
    thing Theorem 1 predicts, still gives a unit step.
    """
    g = tf.math.divide_no_nan(g, _example_reduce(tf.reduce_max, tf.abs(g)))
    return tf.math.divide_no_nan(g, tf.sqrt(_example_reduce(tf.reduce_sum, g * g)))


def _project(x0, x, eps, norm, lo, hi, has_clip):
    """Projects ``x`` onto the ``eps``-ball around ``x0``, then the data range.

    Clipping to the data range after the ball only moves coordinates towards
    ``x0`` (which lies in the range), so the result stays in the ball.
    """
    d = x - x0
    if norm == np.inf:
        d = tf.clip_by_value(d, -eps, eps)
    else:
        # float32 rounding of the norm, of the rescale (relative, < 2^-20)
        # and of x0 + d (< 2^-24 |x0 + d| per component) can push the
        # returned point a few ulps past eps; shrinking the radius by those
        # bounds keeps the float32 result itself within eps.
        size = float(np.prod(d.shape[1:]))
        scale = _example_reduce(tf.reduce_max, tf.abs(x0)) + eps
        radius = tf.maximum(
            eps - 2.0 ** -20 * eps - 2.0 ** -23 * math.sqrt(size) * scale, 0.0)
        norm2 = tf.sqrt(_example_reduce(tf.reduce_sum, d * d))
        d = d * tf.minimum(1.0, tf.math.divide_no_nan(radius, norm2))
    out = x0 + d
    return tf.clip_by_value(out, lo, hi) if has_clip else out


def _random_start(x0, eps, norm, seed, idx):
    """A uniform draw from the ``eps``-ball around each example."""
    shape = x0.shape[1:]
    size = int(np.prod(shape))
    if norm == np.inf:
        u = _per_example(lambda s: seeds.uniform(shape, s), seed, idx, shape)
        return x0 + eps * (2.0 * u - 1.0)
    # Uniform in the L2 ball: a Gaussian direction (Box-Muller) and a radius
    # eps * u^(1/d).
    u = _per_example(lambda s: seeds.uniform([2 * size + 1], s), seed, idx,
                     [2 * size + 1])
    u1, u2, u3 = 1.0 - u[:, :size], u[:, size:2 * size], u[:, 2 * size]
    z = tf.sqrt(-2.0 * tf.math.log(u1)) * tf.cos(2.0 * math.pi * u2)
    z = tf.reshape(_l2_direction(z), tf.shape(x0))
    radius = eps * tf.pow(u3, 1.0 / size)
    return x0 + tf.reshape(radius, [-1] + [1] * (x0.shape.rank - 1)) * z


def _step_direction(g, norm):
    return tf.sign(g) if norm == np.inf else _l2_direction(g)


def _loss_gradient(network, params, x, y, gradient, chunk, seed):
    """Input gradient of the attacker's loss, ``[B, *input_shape]``."""
    if gradient != "sample":
        return loss_gradient_graph(network, params, x, y, gradient, chunk)[0]
    s = params[0].shape[0]
    pick = seeds.integers([1], seed, s)
    one = [tf.gather(p, pick) for p in params]
    return loss_gradient_graph(network, one, x, y, "expected", 1)[0]


def _score(network, params, x, y, chunk):
    """What makes an adversarial example worse: ``(misclassified, loss)``.

    Both come from the posterior predictive, the classifier being attacked,
    whichever gradient the attacker followed.
    """
    p = predict_proba_graph(network, params, x, chunk)
    p_y = tf.gather(p, y, batch_dims=1)
    wrong = tf.not_equal(tf.argmax(p, axis=-1, output_type=tf.int32), y)
    return wrong, -tf.math.log(p_y)


def _keep_worse(best, new):
    """Per example, the candidate that is misclassified, else has more loss."""
    (x_b, wrong_b, loss_b), (x_n, wrong_n, loss_n) = best, new
    take = (wrong_n & ~wrong_b) | ((wrong_n == wrong_b) & (loss_n > loss_b))
    mask = tf.reshape(take, [-1] + [1] * (x_b.shape.rank - 1))
    return (tf.where(mask, x_n, x_b), wrong_b | wrong_n,
            tf.where(take, loss_n, loss_b))


def _best_of(run, score, count: int):
    """Runs ``run(r)`` for ``r < count`` and keeps the worst case per example.

    ``run(0)`` is what a single run returns, so more runs never weaken the
    attack.
    """
    x = run(tf.constant(0))
    if count == 1:
        return x
    first = (x,) + score(x)

    def body(r, best):
        x_r = run(r)
        return r + 1, _keep_worse(best, (x_r,) + score(x_r))

    _, best = tf.while_loop(lambda r, best: r < count, body,
                            (tf.constant(1), first))
    return best[0]


def _pgd_graph(network, params, x0, y, idx, seed, eps, step_size, steps,
               lo, hi, *, norm, gradient, random_start, restarts, chunk,
               has_clip):
    """PGD on one batch: ``restarts`` runs of ``steps`` projected steps."""

    def run(r):
        run_seed = seeds.fold_in(seed, r)
        start_seed, sample_seed = tf.unstack(seeds.split(run_seed, 2))
        # One stream per batch for the sample draws, keyed by its first row.
        sample_seed = seeds.fold_in(sample_seed, idx[0])
        x = x0
        if random_start:
            x = _project(x0, _random_start(x0, eps, norm, start_seed, idx), eps,
                         norm, lo, hi, has_clip)

        def body(t, x):
            g = _loss_gradient(network, params, x, y, gradient, chunk,
                               seeds.fold_in(sample_seed, t))
            x = x + step_size * _step_direction(g, norm)
            return t + 1, _project(x0, x, eps, norm, lo, hi, has_clip)

        return tf.while_loop(lambda t, x: t < steps, body,
                             (tf.constant(0), x))[1]

    return _best_of(run, lambda x: _score(network, params, x, y, chunk),
                    restarts)


def _random_graph(network, params, x0, y, idx, seed, eps, lo, hi, *, kind,
                  trials, chunk, has_clip):
    """``trials`` random perturbations per example; keeps the worst."""
    shape = x0.shape[1:]

    def run(t):
        trial_seed = seeds.fold_in(seed, t)
        if kind == "ternary":
            u = _per_example(lambda s: seeds.integers(shape, s, 3), trial_seed,
                             idx, shape, tf.int32)
            u = tf.cast(u - 1, tf.float32)
        else:
            u = 2.0 * _per_example(lambda s: seeds.uniform(shape, s), trial_seed,
                                   idx, shape) - 1.0
        return _project(x0, x0 + eps * u, eps, np.inf, lo, hi, has_clip)

    return _best_of(run, lambda x: _score(network, params, x, y, chunk), trials)


def _image_layout(input_shape) -> tuple[int, int, int]:
    """``(H, W, C)`` the Square Attack places its squares in."""
    if len(input_shape) == 1:
        return 1, input_shape[0], 1
    if len(input_shape) == 2:
        return input_shape[0], input_shape[1], 1
    return tuple(input_shape)


def _square_side(p, height, width):
    """Side of a square covering a fraction ``p`` of the pixels, per example."""
    if height == 1:  # a vector: windows are 1 x side segments
        side = tf.round(p * width)
        cap = max(width - 1, 1)
    else:
        side = tf.round(tf.sqrt(p * height * width))
        cap = max(min(height, width) - 1, 1)
    return tf.cast(tf.clip_by_value(side, 1.0, float(cap)), tf.int32)


def _square_graph(network, params, x0, y, idx, seed, eps, max_queries, p_init,
                  lo, hi, *, layout, chunk, has_clip):
    """Square Attack (L-inf) on one batch: returns ``(x_adv, queries)``."""
    height, width, channels = layout
    batch = tf.shape(x0)[0]
    img0 = tf.reshape(x0, [-1, height, width, channels])
    seed = seeds.fold_in(seed, idx[0])
    init_seed, loop_seed = tf.unstack(seeds.split(seed, 2))

    def margin(img):
        # One query: log p(y) - max_{c != y} log p(c) of the posterior
        # predictive, negative once the example is misclassified.  In logs,
        # so a posterior whose p(y) rounds to 1.0 in float32 still shows
        # every proposal's progress.
        log_p = log_predictive_graph(
            network, params, tf.reshape(img, tf.shape(x0)), chunk)
        is_y = tf.one_hot(y, network.num_classes) > 0
        return (tf.reduce_sum(tf.where(is_y, log_p, 0.0), -1) -
                tf.reduce_max(tf.where(is_y, _NEG, log_p), -1))

    def perturb(v):
        out = img0 + eps * tf.cast(v, tf.float32)
        return tf.clip_by_value(out, lo, hi) if has_clip else out

    # Vertical stripes: one random sign per column and channel.
    m_clean = margin(img0)
    stripes = perturb(
        2 * seeds.integers([batch, 1, width, channels], init_seed, 2) - 1)
    todo = m_clean >= 0  # already misclassified examples are left alone
    m_init = margin(stripes)
    x_best = tf.where(todo[:, None, None, None], stripes, img0)
    m_best = tf.where(todo, m_init, m_clean)
    queries = tf.cast(todo, tf.int32)
    rows = tf.range(height)[None, :, None, None]
    cols = tf.range(width)[None, None, :, None]
    budget = tf.cast(max_queries, tf.float32)

    def active(m_best, queries):
        return (m_best >= 0) & (queries < max_queries)

    def cond(i, x_best, m_best, queries):
        return tf.reduce_any(active(m_best, queries))

    def body(i, x_best, m_best, queries):
        s_pos, s_sign, s_flip = tf.unstack(
            seeds.split(seeds.fold_in(loop_seed, i), 3))
        done = tf.cast(queries - 1, tf.float32) * 10000.0 / budget
        halvings = tf.add_n([tf.cast(done > t, tf.float32)
                             for t in _SQUARE_HALVINGS])
        side = _square_side(p_init * tf.pow(0.5, halvings), height, width)
        side_h = tf.minimum(side, height)
        pos = seeds.uniform([batch, 2], s_pos)
        top = tf.cast(pos[:, 0] * tf.cast(height - side_h + 1, tf.float32),
                      tf.int32)
        left = tf.cast(pos[:, 1] * tf.cast(width - side + 1, tf.float32),
                       tf.int32)
        top, left = top[:, None, None, None], left[:, None, None, None]
        window = ((rows >= top) & (rows < top + side_h[:, None, None, None]) &
                  (cols >= left) & (cols < left + side[:, None, None, None]))
        v = 2 * seeds.integers([batch, 1, 1, channels], s_sign, 2) - 1
        cand = tf.where(window, perturb(v), x_best)
        # A proposal equal to the current point would waste a query, so it
        # is redrawn without one, as in the paper's reference code: flip the
        # signs of a random subset of channels (all of them if the draw
        # picks none), which for one channel is exactly the other sign.
        same = tf.reduce_all(tf.equal(cand, x_best), axis=[1, 2, 3])
        flip = seeds.integers([batch, 1, 1, channels], s_flip, 2)
        flip = tf.where(tf.reduce_any(flip > 0, axis=-1, keepdims=True),
                        flip, tf.ones_like(flip))
        v = tf.where(same[:, None, None, None], v * (1 - 2 * flip), v)
        cand = tf.where(window, perturb(v), x_best)
        m_cand = margin(cand)
        live = active(m_best, queries)
        accept = live & (m_cand < m_best)
        x_best = tf.where(accept[:, None, None, None], cand, x_best)
        m_best = tf.where(accept, m_cand, m_best)
        return i + 1, x_best, m_best, queries + tf.cast(live, tf.int32)

    _, x_best, _, queries = tf.while_loop(
        cond, body, (tf.constant(0), x_best, m_best, queries))
    return tf.reshape(x_best, tf.shape(x0)), queries


# --------------------------------------------------------------------------
# APGD (Croce & Hein, 2020): losses, scores and the step-size schedule.
# --------------------------------------------------------------------------
# The published checkpoints p_0 = 0, p_1 = 0.22,
# p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), in hundredths: every
# increment is a multiple of 0.01, so integers keep w_j = ceil(p_j N) exact
# (0.22 * 100 is 22.000000000000004 in floating point).
def _checkpoint_percents() -> tuple[int, ...]:
    p = [0, 22]
    while p[-1] < 100:
        p.append(p[-1] + max(p[-1] - p[-2] - 3, 6))
    return tuple(p)


_APGD_CHECKPOINTS = _checkpoint_percents()
_DLR_DELTA = 1e-12


def _class_value(z, c):
    """``z[..., b, c_b]`` for labels ``c`` ``[B]`` and scores ``[..., B, C]``."""
    return tf.reduce_sum(z * tf.one_hot(c, z.shape[-1], dtype=z.dtype), -1)


def _dlr_loss(z, y):
    """DLR loss ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``.

    ``z`` ``[..., B, C]`` (C >= 3), ``y`` int ``[B]``; returns ``[..., B]``.
    ``pi`` sorts the scores in decreasing order, so the loss does not change
    when every score is shifted by a constant or scaled by a positive factor.
    """
    top = tf.math.top_k(z, 3).values
    other = tf.reduce_max(
        tf.where(tf.one_hot(y, z.shape[-1]) > 0, _NEG, z), axis=-1)
    return -(_class_value(z, y) - other) / (
        top[..., 0] - top[..., 2] + _DLR_DELTA)


def _targeted_dlr_loss(z, y, t):
    """Targeted DLR ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``.

    ``z`` ``[..., B, C]`` (C >= 4), labels ``y`` and targets ``t`` int
    ``[B]``; returns ``[..., B]``, growing as ``z_t`` overtakes ``z_y``.
    """
    top = tf.math.top_k(z, 4).values
    return -(_class_value(z, y) - _class_value(z, t)) / (
        top[..., 0] - 0.5 * (top[..., 2] + top[..., 3]) + _DLR_DELTA)


def _ce_loss(z, c, log_probs):
    """Cross-entropy of class ``c`` under scores ``z`` ``[..., B, C]``.

    ``log_probs``: ``z`` already holds log-probabilities (the predictive's
    ``log p_bar``), so the loss is ``-z_c`` exactly; otherwise ``z`` are
    logits and a softmax normalises them.
    """
    if log_probs:
        return -_class_value(z, c)
    labels = tf.broadcast_to(c, tf.shape(z)[:-1])
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, z)


@dataclasses.dataclass(frozen=True)
class _LogProbLoss:
    """``z -> sign * z[..., b, c_b]``: cross-entropy on log-probabilities.

    ``sign=-1`` with the labels is the untargeted CE ``-log p_bar(y)``;
    ``sign=+1`` with the targets is the targeted one, ``log p_bar(t)``.
    Linear in one score per example, so the predictive objective needs one
    pass over several sample chunks (:func:`_objective_predictive`).
    """
    classes: Any
    sign: float

    def __call__(self, z):
        return self.sign * _class_value(z, self.classes)


def _apgd_loss(loss, targeted, y, t, log_probs):
    """``z -> [..., B]``: the loss APGD maximises, from scores ``z``."""
    if loss == "dlr":
        return ((lambda z: _targeted_dlr_loss(z, y, t)) if targeted else
                (lambda z: _dlr_loss(z, y)))
    if log_probs:  # -CE(z, y), or towards t: log p(t) = -CE(z, t)
        return _LogProbLoss(t, 1.0) if targeted else _LogProbLoss(y, -1.0)
    if targeted:  # towards t: maximise log p(t), i.e. minimise CE(z, t)
        return lambda z: -_ce_loss(z, t, log_probs)
    return lambda z: _ce_loss(z, y, log_probs)


def _objective_of_scores(network, params, x, loss_fn, chunk, *, scores,
                         stack_scores, linearised):
    """``L(z)`` for scores ``z`` of the whole stack: ``(loss [B], grad, z)``.

    ``scores(logits [S, B, C]) -> z [B, C]`` in one tape when one chunk
    holds every sample.  Otherwise ``L`` is a nonlinear function of a sum
    over samples, so it takes two passes (memory stays one chunk): the
    first computes ``z = stack_scores(network, params, x, chunk)``, the
    second back-propagates the fixed cotangent ``u = dL/dz`` through every
    chunk's ``linearised(logits [c, B, C], z)``, whose input gradient
    contracted with ``u`` is that chunk's share of ``u . dz/dx``.
    """
    if chunk >= params[0].shape[0]:
        with tf.GradientTape() as tape:
            tape.watch(x)
            z = scores(network.apply_stack(params, x))
            f = loss_fn(z)
            total = tf.reduce_sum(f)
        return f, tape.gradient(total, x), z
    z = stack_scores(network, params, x, chunk)
    with tf.GradientTape() as tape:
        tape.watch(z)
        f = loss_fn(z)
        total = tf.reduce_sum(f)
    u = tape.gradient(total, z)

    def body(grad, chunk_params):
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(
                u * linearised(network.apply_stack(chunk_params, x), z))
        return grad + tape.gradient(total, x)

    grad = chunking.fold_sample_chunks(params, chunk, body, tf.zeros_like(x))
    return f, grad, z


def _objective_predictive(network, params, x, loss_fn, chunk):
    """``L(z)`` with ``z = log p_bar``: ``(loss [B], grad, z [B, C])``.

    With several chunks, ``dz_c/dx = sum_s w_sc d log softmax_sc / dx`` with
    ``w_sc = exp(log softmax_sc - log S - z_c)``, which never divides by a
    tiny ``p_bar``.
    """
    log_s = math.log(params[0].shape[0])
    if chunk < params[0].shape[0] and isinstance(loss_fn, _LogProbLoss):
        return _objective_log_prob(network, params, x, loss_fn, chunk)

    def linearised(logits, z):
        ls = tf.nn.log_softmax(logits)
        return tf.stop_gradient(tf.exp(ls - log_s - z)) * ls

    return _objective_of_scores(
        network, params, x, loss_fn, chunk,
        scores=lambda logits: tf.reduce_logsumexp(
            tf.nn.log_softmax(logits), axis=0) - log_s,
        stack_scores=log_predictive_graph, linearised=linearised)


def _objective_log_prob(network, params, x, loss_fn, chunk):
    """:func:`_objective_predictive` for a :class:`_LogProbLoss`, in one pass.

    The loss is ``sign * z_c`` with ``z_c = log p_bar(c)`` for one class
    ``c`` per example, so its gradient needs no second pass (the two passes
    of :func:`_objective_of_scores` cost APGD-100 1.5x: 25 s against 17 s
    on 200 images, ``S=100``, in chunks of 10): the predictive gradient's
    running-maximum fold (:func:`tfp_bnn_adv.gradients.
    predictive_log_prob_graph`), which also accumulates the scores of every
    class ``z`` for the misclassification test.
    """
    _, grad, z = predictive_log_prob_graph(network, params, x, loss_fn.classes,
                                           chunk, with_scores=True)
    return loss_fn(z), loss_fn.sign * grad, z


def _objective_paper(network, params, x, loss_fn, chunk):
    """``L(z)`` with ``z = p_bar`` taken as logits (the authors' code)."""
    s = params[0].shape[0]
    return _objective_of_scores(
        network, params, x, loss_fn, chunk,
        scores=lambda logits: tf.reduce_mean(tf.nn.softmax(logits), axis=0),
        stack_scores=predict_proba_graph,
        linearised=lambda logits, z: tf.nn.softmax(logits) / s)


def _objective_expected(network, params, x, loss_fn, chunk):
    """The mean over samples of ``L(f(x, w_s))`` on per-sample logits; the
    third output is ``p_bar`` (accumulated in the same pass)."""
    s = params[0].shape[0]

    def body(state, chunk_params):
        grad, f_sum, p_sum = state
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = network.apply_stack(chunk_params, x)
            f = loss_fn(logits)
            total = tf.reduce_sum(f)
        return (grad + tape.gradient(total, x), f_sum + tf.reduce_sum(f, 0),
                p_sum + tf.reduce_sum(tf.nn.softmax(logits), 0))

    b = tf.shape(x)[:1]
    init = (tf.zeros_like(x), tf.zeros(b, tf.float32),
            tf.zeros([b[0], network.num_classes], tf.float32))
    grad, f_sum, p_sum = chunking.fold_sample_chunks(params, chunk, body, init)
    return f_sum / s, grad / s, p_sum / s


_OBJECTIVES = {"predictive": _objective_predictive, "paper": _objective_paper,
               "expected": _objective_expected}


def _draw_samples(params, k, seed):
    """``k`` distinct posterior samples, a stateless uniform draw."""
    s = params[0].shape[0]
    order = tf.argsort(seeds.uniform([s], seed), stable=True)
    pick = order[:k]
    return [tf.gather(p, pick) for p in params]


def _apgd_loop(objective, x0, x_start, eps, steps, rho, alpha, lo, hi, *,
               norm, has_clip, stop_early, trace=False):
    """One APGD run of ``steps`` steps from ``x_start`` (Croce & Hein, 2020).

    ``objective(x, t) -> (loss [B], grad, wrong [B])`` evaluates the loss to
    maximise, its input gradient and whether ``x`` is misclassified; ``t``
    is -1 at the start, then the step index.  Per example: ``eta`` starts at
    ``2 eps``; step ``t`` moves to ``z = P(x + eta dir(g))`` and then
    ``P(x + a (z - x) + (1 - a)(x - x_prev))``, ``a = 1`` at ``t = 0`` and
    ``alpha`` after; after ``n`` steps, ``n`` a checkpoint ``w_j``,
    ``eta`` is halved and the run restarts from the best point if the loss
    rose in fewer than ``rho`` of the steps since the last checkpoint or if
    ``eta`` was not halved there and the best loss has not improved since.
    The loss of the restarted point is its best loss, which the next step's
    rise is compared with.

    ``stop_early``: ``wrong`` is final (the posterior predictive's own
    verdict), so the first misclassified point is kept and the loop ends
    once every example has one; the result then does not depend on which
    examples share the batch.  Otherwise (``wrong`` from drawn samples, to
    be confirmed by the caller) the misclassified point of the highest loss
    is kept and every step runs.

    Returns:
      ``(x_wrong, found, x_best, f_best)``: the misclassified point kept
      (``found`` says whether there is one), and the best-loss point and its
      loss; with ``trace``, also ``eta`` ``[T, B]`` and ``x`` ``[T, B, ...]``
      after each step's checkpoint.
    """
    ex = [-1] + [1] * (x0.shape.rank - 1)
    batch = tf.shape(x0)[0]
    f, g, wrong = objective(x_start, tf.constant(-1))
    checkpoints = (tf.constant(_APGD_CHECKPOINTS[1:], tf.int32) * steps +
                   99) // 100
    eta = tf.fill([batch], 2.0 * eps)
    state = dict(
        t=tf.constant(0), x=x_start, x_prev=x_start, g=g, f=f,
        x_best=x_start, g_best=g, f_best=f, x_wrong=x_start, f_wrong=f,
        found=wrong, eta=eta, rises=tf.zeros([batch], tf.int32),
        last=tf.constant(0), f_best_last=f,
        halved_last=tf.zeros([batch], tf.bool))
    if trace:
        state["eta_trace"] = tf.TensorArray(x0.dtype, size=steps)
        state["x_trace"] = tf.TensorArray(x0.dtype, size=steps)

    def cond(st):
        go = st["t"] < steps
        if stop_early:
            go = go & ~tf.reduce_all(st["found"])
        return go

    def body(st):
        t, x = st["t"], st["x"]
        a = tf.where(t == 0, tf.ones_like(alpha), alpha)
        eta_x = tf.reshape(st["eta"], ex)
        z = _project(x0, x + eta_x * _step_direction(st["g"], norm), eps, norm,
                     lo, hi, has_clip)
        x_new = _project(x0, x + a * (z - x) + (1.0 - a) * (x - st["x_prev"]),
                         eps, norm, lo, hi, has_clip)
        f_new, g_new, wrong = objective(x_new, t)
        rises = st["rises"] + tf.cast(f_new > st["f"], tf.int32)
        take = wrong & ~st["found"]
        if not stop_early:
            take |= wrong & (f_new > st["f_wrong"])
        x_wrong = tf.where(tf.reshape(take, ex), x_new, st["x_wrong"])
        f_wrong = tf.where(take, f_new, st["f_wrong"])
        better = f_new > st["f_best"]
        better_x = tf.reshape(better, ex)
        x_best = tf.where(better_x, x_new, st["x_best"])
        g_best = tf.where(better_x, g_new, st["g_best"])
        f_best = tf.where(better, f_new, st["f_best"])
        n = t + 1
        at_check = tf.reduce_any(tf.equal(checkpoints, n))
        since = tf.cast(n - st["last"], rho.dtype)
        oscillating = tf.cast(rises, rho.dtype) < rho * since
        stalled = ~st["halved_last"] & (f_best <= st["f_best_last"])
        halve = at_check & (oscillating | stalled)
        halve_x = tf.reshape(halve, ex)
        eta = tf.where(halve, 0.5 * st["eta"], st["eta"])
        out = dict(
            t=n, x=tf.where(halve_x, x_best, x_new), x_prev=x,
            g=tf.where(halve_x, g_best, g_new),
            f=tf.where(halve, f_best, f_new), x_best=x_best, g_best=g_best,
            f_best=f_best, x_wrong=x_wrong, f_wrong=f_wrong,
            found=st["found"] | wrong, eta=eta,
            rises=tf.where(at_check, 0, rises),
            last=tf.where(at_check, n, st["last"]),
            f_best_last=tf.where(at_check, f_best, st["f_best_last"]),
            halved_last=tf.where(at_check, halve, st["halved_last"]))
        if trace:
            out["eta_trace"] = st["eta_trace"].write(t, eta)
            out["x_trace"] = st["x_trace"].write(t, out["x"])
        return (out,)

    (st,) = tf.while_loop(cond, body, (state,))
    result = (st["x_wrong"], st["found"], st["x_best"], st["f_best"])
    if trace:
        result += (st["eta_trace"].stack(), st["x_trace"].stack())
    return result


def _targets(network, params, x0, y, num_targets, chunk):
    """Per example the ``num_targets`` other classes the clean posterior
    predictive ranks highest, int32 ``[B, num_targets]``."""
    p = predict_proba_graph(network, params, x0, chunk)
    p = tf.where(tf.one_hot(y, network.num_classes) > 0, -1.0, p)
    return tf.math.top_k(p, num_targets).indices


def _apgd_takes_two_passes(gradient: str, loss: str) -> bool:
    """Whether APGD's objective passes twice over a stack split in chunks.

    The DLR loss on the posterior predictive, and any loss on the paper's
    ``p_bar`` taken as logits, are nonlinear in a sum over samples
    (:func:`_objective_of_scores`); CE on the predictive and every loss on
    per-sample logits take one pass.  An automatic chunk size for these
    keeps the memory bound alone, so the stack stays one chunk wherever
    memory allows: the cache bound (:func:`tfp_bnn_adv.chunking.
    auto_chunk_size`) gains less than the extra pass costs.  Measured,
    APGD-100 on 200 images, S=100 MLP 784-512-512-10, batch 100, chunks of
    100 against 10 (2-core Zen 5): DLR 18.0 against 26.8 s (oneDNN) and
    24.4 against 42.6 s (Eigen/AVX2 kernels, XLA); the paper's CE 18.4
    against 27.2 s (oneDNN).
    """
    return gradient == "paper" or (gradient == "predictive" and loss == "dlr")


def _apgd_graph(network, params, x0, y, idx, seed, eps, steps, rho, alpha,
                lo, hi, *, norm, gradient, loss, targeted, num_targets,
                restarts, eot_samples, chunk, has_clip, random_start):
    """APGD on one batch: ``restarts`` runs per target (one target if
    untargeted), the worst case kept per example."""
    s = params[0].shape[0]
    drawn = gradient == "sample" or eot_samples is not None
    k = eot_samples or (1 if gradient == "sample" else s)
    kind = "expected" if gradient == "sample" else gradient
    draw_chunk = min(chunk, k)
    targets = (_targets(network, params, x0, y, num_targets, chunk)
               if targeted else None)

    def run(r):
        target = targets[:, r // restarts] if targeted else None
        loss_fn = _apgd_loss(loss, targeted, y, target, kind == "predictive")
        start_seed, sample_seed = tf.unstack(
            seeds.split(seeds.fold_in(seed, r), 2))
        # One stream per batch for the sample draws, keyed by its first row.
        sample_seed = seeds.fold_in(sample_seed, idx[0])

        def objective(x, t):
            used, used_chunk = params, chunk
            if drawn:
                used = _draw_samples(params, k, seeds.fold_in(sample_seed, t + 1))
                used_chunk = draw_chunk
            f, g, z = _OBJECTIVES[kind](network, used, x, loss_fn, used_chunk)
            return f, g, tf.not_equal(tf.argmax(z, -1, output_type=tf.int32), y)

        x_start = x0
        if random_start:
            x_start = _project(x0, _random_start(x0, eps, norm, start_seed, idx),
                               eps, norm, lo, hi, has_clip)
        x_wrong, found, x_best, _ = _apgd_loop(
            objective, x0, x_start, eps, steps, rho, alpha, lo, hi,
            norm=norm, has_clip=has_clip, stop_early=not drawn)
        if drawn:
            # Misclassified by the drawn samples is a candidate; the posterior
            # predictive, the classifier attacked, decides.
            found &= _score(network, params, x_wrong, y, chunk)[0]
        return tf.where(tf.reshape(found, [-1] + [1] * (x0.shape.rank - 1)),
                        x_wrong, x_best)

    return _best_of(run, lambda x: _score(network, params, x, y, chunk),
                    restarts * (num_targets if targeted else 1))


# --------------------------------------------------------------------------
# Public attacks.
# --------------------------------------------------------------------------
def _run_gradient_attack(name, ensemble, x, y, options: _AttackOptions,
                         steps: _GradientSteps):
    inputs, idx = _prepare(ensemble, x, y, options)
    chunk, has_clip = inputs.chunk, options.has_clip
    key = ("attack", "pgd", steps.norm, steps.gradient, steps.random_start,
           steps.restarts, chunk, has_clip, options.jit_compile)
    fn = xla.cached_function(ensemble.network, key, lambda net: xla.compile_fn(
        lambda p, xb, yb, ib, *scalars: _pgd_graph(
            net, p, xb, yb, ib, *scalars, norm=steps.norm,
            gradient=steps.gradient, random_start=steps.random_start,
            restarts=steps.restarts, chunk=chunk, has_clip=has_clip),
        options.jit_compile, "gradient_attack",
        stochastic=steps.gradient == "sample"))
    scalars = (options.seed, tf.constant(options.eps, tf.float32),
               tf.constant(steps.step_size, tf.float32),
               tf.constant(steps.steps, tf.int32), *options.clip_args())
    return _stream(name, fn, ensemble, inputs, idx, scalars)


def fgsm(ensemble, x, y=None, eps=None, *, norm=np.inf, gradient="expected",
         clip=(0.0, 1.0), seed=0, batch_size=None, chunk_size=None,
         jit_compile=None, strategy=None) -> np.ndarray:
    """Fast gradient method: one step of size ``eps`` along the loss gradient.

    L-inf: ``x + eps * sign(g)``; L2: ``x + eps * g / ||g||_2``; then clipped
    to ``clip``.  Where ``g`` is exactly zero the step is zero (never NaN).

    Args:
      ensemble: a :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble` with ``S``
        samples.
      x: inputs ``[B, *input_shape]``, values inside ``clip``.
      y: int labels ``[B]`` in ``[0, C)``; ``None`` attacks the ensemble's own
        predictions.
      eps: radius of the threat ball, >= 0 (required).
      norm: ``np.inf`` or ``2``.
      gradient: ``"expected"``, ``"predictive"``, ``"paper"`` or
        ``"sample"`` (see the module docstring).
      clip: ``(low, high)`` data range, or ``None`` for no clipping.
      seed: int or stateless seed; used by ``gradient="sample"``.
      batch_size: inputs per compiled call (the last batch is padded).
      chunk_size: posterior samples per chunk inside the call (memory).
      jit_compile: ``True``/``False``/``"auto"``/``None``, see
        :func:`tfp_bnn_adv.xla.compile_fn`.
      strategy: a ``tf.distribute.Strategy``: every batch is split evenly
        across its replicas and the results gathered in order (the same
        ``x_adv`` as unsharded, except for ``gradient="sample"``, whose
        sample choice follows each shard's first example); ``None`` uses
        the strategy whose scope is open, if any.

    Returns:
      float32 numpy array ``[B, *input_shape]`` with ``||x_adv - x|| <= eps``.

    Raises:
      TypeError/ValueError: naming the argument, for a bad ``ensemble``,
        ``eps``, ``norm``, ``gradient``, ``clip``, ``chunk_size``, a shape
        mismatch between ``x`` and ``y`` or the network, labels out of range,
        or ``x`` outside ``clip``.

    Example:
      >>> x_adv = fgsm(ens, x_test, y_test, eps=0.1, gradient="predictive")
    """
    check_ensemble(ensemble)
    eps = _check_eps(eps)
    norm = _check_norm(norm)
    gradient = validate.choice(gradient, GRADIENTS, "gradient")
    clip = validate.value_range(clip, "clip")
    options = _AttackOptions(eps, clip, seeds.stateless(seed), batch_size,
                             chunk_size, jit_compile, strategy)
    return _run_gradient_attack(
        "fgsm", ensemble, x, y, options,
        _GradientSteps(norm=norm, steps=1, step_size=eps, random_start=False,
                       restarts=1, gradient=gradient))


def pgd(ensemble, x, y=None, eps=None, *, norm=np.inf, steps=40,
        step_size=None, random_start=True, restarts=1, gradient="expected",
        clip=(0.0, 1.0), seed=0, batch_size=None, chunk_size=None,
        jit_compile=None, strategy=None) -> np.ndarray:
    """Projected gradient descent (Madry et al., 2018) on the ensemble's loss.

    Each of ``steps`` steps moves ``step_size`` along ``sign(g)`` (L-inf) or
    ``g / ||g||_2`` (L2) and projects back onto the ``eps``-ball around ``x``
    and into ``clip``.  With ``restarts > 1`` the attack runs again from new
    random starts and keeps, per example, the worst case for the posterior
    predictive: misclassified first, then the higher loss
    ``-log p(y | x_adv)``.  Restart 0 is the single run (same seed stream), so
    restarts never weaken the attack.

    Args:
      ensemble: a :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble` with ``S``
        samples.
      x: inputs ``[B, *input_shape]``, values inside ``clip``.
      y: int labels ``[B]``; ``None`` attacks the ensemble's own predictions.
      eps: radius of the threat ball, >= 0 (required).
      norm: ``np.inf`` or ``2``.
      steps: number of gradient steps, >= 1.
      step_size: step length; default ``2.5 * eps / steps``, which reaches the
        boundary of the ball without saturating it in one step.
      random_start: start from a uniform draw in the ball.
      restarts: number of runs, >= 1 (they differ only with a random start or
        ``gradient="sample"``).
      gradient: ``"expected"``, ``"predictive"``, ``"paper"`` or
        ``"sample"``.
      clip: ``(low, high)`` data range, or ``None``.
      seed: int or stateless seed.
      batch_size, chunk_size, jit_compile, strategy: as in :func:`fgsm`.

    Returns:
      float32 numpy array ``[B, *input_shape]`` with ``||x_adv - x|| <= eps``.

    Raises:
      TypeError/ValueError: as :func:`fgsm`, and for ``steps < 1``,
        ``restarts < 1`` or a negative ``step_size``.

    Example:
      >>> x_adv = pgd(ens, x_test, y_test, eps=0.25, steps=40, restarts=3,
      ...             gradient="expected")
    """
    check_ensemble(ensemble)
    eps = _check_eps(eps)
    norm = _check_norm(norm)
    steps = validate.positive_int(steps, "steps")
    restarts = validate.positive_int(restarts, "restarts")
    step_size = (2.5 * eps / steps if step_size is None else
                 validate.nonnegative_real(step_size, "step_size"))
    if not isinstance(random_start, bool):
        raise TypeError(f"random_start must be a bool, got {random_start!r}.")
    gradient = validate.choice(gradient, GRADIENTS, "gradient")
    clip = validate.value_range(clip, "clip")
    options = _AttackOptions(eps, clip, seeds.stateless(seed), batch_size,
                             chunk_size, jit_compile, strategy)
    return _run_gradient_attack(
        "pgd", ensemble, x, y, options,
        _GradientSteps(norm=norm, steps=steps, step_size=step_size,
                       random_start=random_start, restarts=restarts,
                       gradient=gradient))


def _check_apgd_loss(loss, targeted, num_classes, dlr_fallback) -> str:
    """The loss APGD runs: ``loss``, or ``"ce"`` for a DLR the classes
    cannot support when ``dlr_fallback`` allows it."""
    loss = validate.choice(loss, APGD_LOSSES, "loss")
    need = 4 if targeted else 3
    if loss == "dlr" and num_classes < need:
        name = "targeted DLR" if targeted else "DLR"
        if not dlr_fallback:
            raise ValueError(
                f"loss='dlr' ({name}) needs at least {need} classes, the "
                f"network has {num_classes}; use loss='ce' or pass "
                "dlr_fallback=True to fall back to cross-entropy.")
        logging.warning("apgd: %s needs at least %d classes, the network has "
                        "%d; falling back to %scross-entropy (dlr_fallback)",
                        name, need, num_classes,
                        "targeted " if targeted else "")
        return "ce"
    return loss


def _check_bool(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}.")
    return value


def _check_eot(eot_samples, num_samples):
    if eot_samples is None:
        return None
    return validate.integer(eot_samples, "eot_samples", minimum=1,
                            maximum=num_samples)


def apgd(ensemble, x, y=None, eps=None, *, loss="ce", targeted=False,
         num_targets=9, steps=100, restarts=1, norm=np.inf,
         gradient="predictive", eot_samples=None, rho=0.75, alpha=0.75,
         clip=(0.0, 1.0), seed=0, batch_size=None, chunk_size=None,
         jit_compile=None, strategy=None, dlr_fallback=False,
         _random_start=True) -> np.ndarray:
    """Auto-PGD (Croce & Hein, 2020): PGD with the published step-size rule.

    Per example: a random start in the ``eps``-ball (clipped to ``clip``),
    step size ``eta = 2 eps``, and ``steps`` steps
    ``z = P(x_k + eta sign(g_k))`` (L2: ``g_k / ||g_k||_2``),
    ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))`` with
    ``a = 1`` on the first step and ``alpha`` after (``P`` projects onto
    the ball and ``clip``).  At the checkpoints ``w_j = ceil(p_j steps)``,
    ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``,
    ``eta`` is halved and the run restarts from its best point if the loss
    rose in fewer than a fraction ``rho`` of the steps since the last
    checkpoint, or if ``eta`` was not halved there and the best loss did
    not improve since.  A run returns a point the posterior predictive
    misclassifies if it met one (the first; it stops early once every
    example of the batch has one), else its best-loss point.  Across restarts and targets each example keeps the
    worst case for the posterior predictive (misclassified first, then the
    higher ``-log p(y | x_adv)``); run 0 is the single run.

    Scores ``z`` per ``gradient`` (``S`` posterior samples):
    ``"predictive"``: ``z = log (1/S) sum_s softmax f(x, w_s)`` (a
    log-sum-exp; scale-free like logits); ``"expected"``: the loss of every
    sample's logits, averaged over samples; ``"paper"``:
    ``z = (1/S) sum_s softmax f(x, w_s)`` taken as logits, as the authors'
    code did; ``"sample"``: the logits of one posterior sample drawn afresh
    at every step (``eot_samples`` of them, loss averaged, if given).
    ``loss="ce"`` is the cross-entropy of ``z`` (``-log p_bar_y`` for
    ``"predictive"``); ``loss="dlr"`` is
    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``, ``pi`` sorting
    ``z`` in decreasing order.  ``targeted=True`` runs, for each of the
    ``num_targets`` classes other than ``y`` that the clean posterior
    predictive ranks highest (ranks 2 to ``num_targets + 1`` for a correctly
    classified point), ``restarts`` runs of ``steps`` steps on the targeted
    DLR ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``
    (``loss="dlr"``) or on ``-CE(z, t)`` (``loss="ce"``); any
    misclassification counts as success.

    ``eot_samples=k`` evaluates every step on ``k`` distinct posterior
    samples drawn afresh (stateless, per batch and step) instead of all
    ``S``; the loss of the drawn samples drives the step-size rule and the
    best point, and the full posterior predictive decides whether the
    returned point is misclassified.  The whole run (steps, restarts and
    targets) is one compiled ``tf.while_loop`` per batch; ``eps``, ``steps``,
    ``rho`` and ``alpha`` are tensors, so sweeping them does not
    recompile.

    Args:
      ensemble: a :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble` with ``S``
        samples and ``C`` classes.
      x: inputs ``[B, *input_shape]``, values inside ``clip``.
      y: int labels ``[B]``; ``None`` attacks the ensemble's own predictions.
      eps: radius of the threat ball, >= 0 (required).
      loss: ``"ce"`` or ``"dlr"`` (:data:`APGD_LOSSES`).
      targeted: run the targeted variant.
      num_targets: targets per example when ``targeted``, in ``[1, C - 1]``.
      steps: steps per run, >= 1.
      restarts: runs per target, >= 1, each from a new random start.
      norm: ``np.inf`` or ``2``.
      gradient: ``"predictive"``, ``"expected"``, ``"paper"`` or
        ``"sample"``.
      eot_samples: ``None`` (all ``S``) or posterior samples per step in
        ``[1, S]``.
      rho: the oscillation threshold, in ``(0, 1]``.
      alpha: the paper's momentum parameter ``alpha``: the weight of the new
        step ``z - x_k`` against the previous step ``x_k - x_{k-1}``, in
        ``[0, 1]``; ``1`` means no momentum (``x_{k+1} = z``).
      clip: ``(low, high)`` data range, or ``None``.
      seed: int or stateless seed.
      batch_size, chunk_size, jit_compile, strategy: as in :func:`fgsm`.
      dlr_fallback: when the DLR loss needs more classes than the network
        has (3, or 4 when targeted), use cross-entropy (targeted when
        ``targeted``) and log a warning instead of raising.

    Returns:
      float32 numpy array ``[B, *input_shape]`` with ``||x_adv - x|| <= eps``,
      inside ``clip``.

    Raises:
      TypeError/ValueError: naming the argument, as :func:`fgsm`, and for an
        unknown ``loss``, DLR with fewer than 3 classes (targeted DLR with
        fewer than 4) unless ``dlr_fallback``, ``num_targets`` outside
        ``[1, C - 1]`` when ``targeted``, ``eot_samples`` outside ``[1, S]``,
        ``steps`` or ``restarts`` below 1, ``rho`` outside ``(0, 1]`` or
        ``alpha`` outside ``[0, 1]``.

    Example:
      >>> x_adv = apgd(ens, x_test, y_test, eps=8 / 255, loss="dlr",
      ...              targeted=True, num_targets=9, steps=100)
    """
    check_ensemble(ensemble)
    eps = _check_eps(eps)
    norm = _check_norm(norm)
    targeted = _check_bool(targeted, "targeted")
    dlr_fallback = _check_bool(dlr_fallback, "dlr_fallback")
    num_classes = ensemble.network.num_classes
    loss = _check_apgd_loss(loss, targeted, num_classes, dlr_fallback)
    if targeted:
        num_targets = validate.integer(num_targets, "num_targets", minimum=1,
                                       maximum=num_classes - 1)
    steps = validate.positive_int(steps, "steps")
    restarts = validate.positive_int(restarts, "restarts")
    gradient = validate.choice(gradient, GRADIENTS, "gradient")
    eot_samples = _check_eot(eot_samples, ensemble.num_samples)
    if eot_samples == ensemble.num_samples and gradient != "sample":
        eot_samples = None  # every sample, in a random order: the same loss
    rho = validate.real(rho, "rho", minimum=0.0, maximum=1.0, min_open=True)
    alpha = validate.real(alpha, "alpha", minimum=0.0, maximum=1.0)
    random_start = _check_bool(_random_start, "_random_start")
    clip = validate.value_range(clip, "clip")
    options = _AttackOptions(eps, clip, seeds.stateless(seed), batch_size,
                             chunk_size, jit_compile, strategy)
    inputs, idx = _prepare(ensemble, x, y, options,
                           cache_bound=not _apgd_takes_two_passes(gradient, loss))
    chunk, has_clip = inputs.chunk, options.has_clip
    config = dict(norm=norm, gradient=gradient, loss=loss, targeted=targeted,
                  num_targets=num_targets if targeted else 1,
                  restarts=restarts, eot_samples=eot_samples, chunk=chunk,
                  has_clip=has_clip, random_start=random_start)
    key = ("attack", "apgd", *sorted(config.items()), jit_compile)
    fn = xla.cached_function(ensemble.network, key, lambda net: xla.compile_fn(
        lambda p, xb, yb, ib, *scalars: _apgd_graph(net, p, xb, yb, ib,
                                                    *scalars, **config),
        jit_compile, "apgd",
        stochastic=gradient == "sample" or eot_samples is not None))
    scalars = (options.seed, tf.constant(eps, tf.float32),
               tf.constant(steps, tf.int32), tf.constant(rho, tf.float32),
               tf.constant(alpha, tf.float32), *options.clip_args())
    return _stream("apgd", fn, ensemble, inputs, idx, scalars)


def random_attack(ensemble, x, y=None, eps=None, *, kind="ternary", trials=1,
                  clip=(0.0, 1.0), seed=0, batch_size=None, chunk_size=None,
                  jit_compile=None, strategy=None) -> np.ndarray:
    """Random perturbations in the L-inf ball: the paper's baseline attack.

    ``kind="ternary"`` is the paper's ``x + eps * u`` with every pixel's ``u``
    uniform over ``{-1, 0, 1}``; ``kind="uniform"`` draws ``u`` uniformly
    from ``[-1, 1]``.  With ``trials > 1`` each example keeps the draw that is
    worst for the posterior predictive (misclassified first, then the higher
    loss ``-log p(y | x_adv)``); trial 0 is the single-trial draw.

    Args:
      ensemble: a :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble`.
      x: inputs ``[B, *input_shape]``, values inside ``clip``.
      y: int labels ``[B]``; ``None`` uses the ensemble's own predictions
        (only the choice among ``trials`` depends on it).
      eps: radius of the L-inf ball, >= 0 (required).
      kind: ``"ternary"`` or ``"uniform"``.
      trials: number of random draws per example, >= 1.
      clip: ``(low, high)`` data range, or ``None``.
      seed: int or stateless seed.
      batch_size, chunk_size, jit_compile, strategy: as in :func:`fgsm`.

    Returns:
      float32 numpy array ``[B, *input_shape]`` with
      ``||x_adv - x||_inf <= eps``.

    Raises:
      TypeError/ValueError: naming the argument, for a bad ``eps``, ``kind``,
        ``trials``, ``clip`` or shapes.

    Example:
      >>> x_adv = random_attack(ens, x_test, y_test, eps=0.25)
    """
    check_ensemble(ensemble)
    eps = _check_eps(eps)
    kind = validate.choice(kind, RANDOM_KINDS, "kind")
    trials = validate.positive_int(trials, "trials")
    clip = validate.value_range(clip, "clip")
    options = _AttackOptions(eps, clip, seeds.stateless(seed), batch_size,
                             chunk_size, jit_compile, strategy)
    inputs, idx = _prepare(ensemble, x, y, options)
    chunk, has_clip = inputs.chunk, options.has_clip
    key = ("attack", "random", kind, trials, chunk, has_clip, jit_compile)
    fn = xla.cached_function(ensemble.network, key, lambda net: xla.compile_fn(
        lambda p, xb, yb, ib, *scalars: _random_graph(
            net, p, xb, yb, ib, *scalars, kind=kind, trials=trials,
            chunk=chunk, has_clip=has_clip), jit_compile, "random_attack",
        stochastic=True))
    scalars = (options.seed, tf.constant(eps, tf.float32),
               *options.clip_args())
    return _stream("random_attack", fn, ensemble, inputs, idx, scalars)


def square_attack(ensemble, x, y=None, eps=None, *, max_queries=1000,
                  p_init=0.3, clip=(0.0, 1.0), seed=0, batch_size=None,
                  chunk_size=None, jit_compile=None, strategy=None,
                  return_queries=False):
    """Square Attack (Andriushchenko et al., 2020), L-inf, score-based.

    Uses only forward passes of the posterior predictive ``p(c | x)``, never
    a gradient.  It minimises the log margin
    ``log p(y) - max_{c != y} log p(c)``, each ``log p`` a log-sum-exp over
    the ensemble's log-softmax, so progress registers even where ``p(y)``
    rounds to 1.0 in float32 (a probability margin would be stuck at 1): start
    from vertical stripes (each column and channel at ``+-eps``); then
    repeatedly set a random square window, one per example, to ``+-eps``
    (one random sign per channel, i.e. a ``+-2 eps`` step projected onto the
    ball) and keep it if the margin decreases.  The square covers a fraction
    ``p`` of the pixels, halved as the example's queries pass fixed fractions
    of the budget.  An example stops as soon as it is misclassified or has
    used ``max_queries`` queries.  Inputs of rank 1 are treated as a
    ``1 x D`` image (squares become segments), rank 2 as one channel.

    Args:
      ensemble: a :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble`.
      x: inputs ``[B, *input_shape]`` (input rank 1 to 3), inside ``clip``.
      y: int labels ``[B]``; ``None`` attacks the ensemble's own predictions.
      eps: radius of the L-inf ball, >= 0 (required).
      max_queries: forward passes allowed per example (the stripe start
        included, the clean prediction not), >= 1.
      p_init: initial fraction of pixels a square covers, in ``(0, 1]``.
        The paper uses 0.05 on ImageNet-size images with 10000 queries; on
        28x28 images and budgets of a few hundred queries larger squares
        work better (Fashion-MNIST MLP, eps=0.1, 500 queries: success 0.78
        with 0.3, 0.55 with 0.05).
      clip: ``(low, high)`` data range, or ``None``.
      seed: int or stateless seed.
      batch_size, chunk_size, jit_compile, strategy: as in :func:`fgsm`.
      return_queries: the old spelling of :func:`square_attack_with_queries`:
        ``True`` returns its pair ``(x_adv, queries)`` instead of ``x_adv``.

    Returns:
      float32 numpy array ``[B, *input_shape]`` with
      ``||x_adv - x||_inf <= eps`` (with ``return_queries``, the pair of
      :func:`square_attack_with_queries`).

    Raises:
      TypeError/ValueError: naming the argument, for a bad ``eps``,
        ``max_queries``, ``p_init``, ``clip``, shapes, or an input rank above 3.

    Example:
      >>> x_adv = square_attack(ens, x_test, y_test, eps=0.1, max_queries=5000)
    """
    if not isinstance(return_queries, bool):
        raise TypeError(f"return_queries must be a bool, got {return_queries!r}.")
    x_adv, queries = square_attack_with_queries(
        ensemble, x, y, eps, max_queries=max_queries, p_init=p_init, clip=clip,
        seed=seed, batch_size=batch_size, chunk_size=chunk_size,
        jit_compile=jit_compile, strategy=strategy)
    return (x_adv, queries) if return_queries else x_adv


def square_attack_with_queries(ensemble, x, y=None, eps=None, *,
                               max_queries=1000, p_init=0.3, clip=(0.0, 1.0),
                               seed=0, batch_size=None, chunk_size=None,
                               jit_compile=None, strategy=None
                               ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`square_attack`, also returning the queries each example used.

    Args:
      ensemble, x, y, eps, max_queries, p_init, clip, seed, batch_size,
        chunk_size, jit_compile, strategy: as in :func:`square_attack`.

    Returns:
      ``(x_adv, queries)``: float32 ``[B, *input_shape]`` with
      ``||x_adv - x||_inf <= eps``, and int32 ``[B]``, the forward passes
      each example used (0 for examples misclassified before the attack).

    Raises:
      TypeError/ValueError: as :func:`square_attack`.

    Example:
      >>> x_adv, queries = square_attack_with_queries(ens, x_test, y_test,
      ...                                             eps=0.1)
      >>> queries.mean()        # mean queries per example
    """
    check_ensemble(ensemble)
    eps = _check_eps(eps)
    max_queries = validate.positive_int(max_queries, "max_queries")
    p_init = validate.real(p_init, "p_init", minimum=0.0, maximum=1.0,
                           min_open=True)
    clip = validate.value_range(clip, "clip")
    options = _AttackOptions(eps, clip, seeds.stateless(seed), batch_size,
                             chunk_size, jit_compile, strategy)
    input_shape = ensemble.network.input_shape
    if len(input_shape) > 3:
        raise ValueError(f"square_attack needs inputs of rank 1 to 3; the "
                         f"network's input shape is {input_shape}.")
    inputs, idx = _prepare(ensemble, x, y, options)
    if eps == 0.0:  # every proposal would equal x: skip the query loop
        return inputs.x.numpy(), np.zeros(inputs.x.shape[0], np.int32)
    layout = _image_layout(input_shape)
    chunk, has_clip = inputs.chunk, options.has_clip
    key = ("attack", "square", chunk, has_clip, jit_compile)
    fn = xla.cached_function(ensemble.network, key, lambda net: xla.compile_fn(
        lambda p, xb, yb, ib, *scalars: _square_graph(
            net, p, xb, yb, ib, *scalars, layout=layout, chunk=chunk,
            has_clip=has_clip), jit_compile, "square_attack",
        stochastic=True))
    scalars = (options.seed, tf.constant(eps, tf.float32),
               tf.constant(max_queries, tf.int32),
               tf.constant(p_init, tf.float32), *options.clip_args())
    x_adv, queries = _stream("square_attack", fn, ensemble, inputs, idx,
                             scalars)
    return x_adv, queries


# --------------------------------------------------------------------------
# The per-example worst case over attacks (AutoAttack).
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AutoAttackResult:
    """What :func:`auto_attack` found, per example and per attack.

    Attributes:
      x_adv: float32 ``[B, *input_shape]``: per example the point of the
        attack that broke it, else ``x`` (misclassified clean, or robust).
      robust: bool ``[B]``: correctly classified clean and every attack
        failed on it.
      broken_by: numpy unicode ``[B]``: ``""`` for a robust example,
        ``"clean"`` for one misclassified before any attack, else the name
        of the first attack that broke it.
      attacks: the names of the attacks run, in order.
      clean_accuracy: the posterior predictive's accuracy on ``x``.
      accuracy_after: attack name -> robust accuracy after the attacks up
        to and including it (the last one is the worst case).
      settings: JSON-serialisable: attack name -> every setting it ran
        with (its derived seed included), and ``"common"`` -> the shared
        ones (version, eps, norm, clip, seed, skipped attacks).
    """
    x_adv: np.ndarray
    robust: np.ndarray
    broken_by: np.ndarray
    attacks: tuple
    clean_accuracy: float
    accuracy_after: dict
    settings: dict

    @property
    def worst_case_accuracy(self) -> float:
        """Robust accuracy under the per-example worst case: ``robust.mean()``."""
        return float(np.mean(self.robust))


def _auto_attack_names(version, attacks, norm) -> tuple[list, dict]:
    """The attacks a version runs, and the ones it skips with the reason."""
    if version == "custom":
        if attacks is None:
            raise ValueError("version='custom' needs attacks=, a sequence "
                             f"of names from {AUTO_ATTACKS}.")
        if isinstance(attacks, str):
            raise TypeError(f"attacks must be a sequence of names from "
                            f"{AUTO_ATTACKS}, got the string {attacks!r}.")
        names = [validate.choice(a, AUTO_ATTACKS, "attacks[]")
                 for a in attacks]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"attacks must be a non-empty sequence of "
                             f"distinct names from {AUTO_ATTACKS}, got "
                             f"{attacks!r}.")
        if "square" in names and norm != np.inf:
            raise ValueError("attacks includes 'square', which is an L-inf "
                             f"attack, but norm={norm:g}.")
        return names, {}
    if attacks is not None:
        raise ValueError(f"attacks= is only for version='custom', got "
                         f"version={version!r} with attacks={attacks!r}.")
    if version == "rand":
        return ["apgd-ce", "apgd-dlr"], {}
    if norm != np.inf:
        return ["apgd-ce", "apgd-t"], {
            "square": "the Square Attack here is L-inf only"}
    return ["apgd-ce", "apgd-t", "square"], {}


def _auto_attack_run(name, ensemble, x, y, eps, config, common):
    """Runs one attack of :func:`auto_attack` on ``x``, returns ``x_adv``."""
    kwargs = {k: v for k, v in config.items() if k not in ("attack", "seed")}
    seed = np.asarray(config["seed"], np.int32)
    if name == "square":
        return square_attack(ensemble, x, y, eps, seed=seed, **kwargs, **common)
    kwargs["norm"] = np.inf if kwargs["norm"] == "inf" else kwargs["norm"]
    return apgd(ensemble, x, y, eps, seed=seed, **kwargs, **common)


def auto_attack(ensemble, x, y=None, eps=None, *, version="standard",
                gradient="predictive", attacks=None, norm=np.inf, steps=100,
                num_targets=None, square_queries=5000, eot_samples=None,
                clip=(0.0, 1.0), seed=0, batch_size=None, chunk_size=None,
                jit_compile=None, strategy=None,
                dlr_fallback=False) -> AutoAttackResult:
    """The per-example worst case over AutoAttack's attacks (Croce & Hein,
    2020) on a posterior ensemble.

    The attacks run in order, each only on the points still robust (clean
    correct and not broken by an earlier attack), so a point counts as
    robust only if every attack failed on it.  A point is broken when the
    posterior predictive misclassifies the attack's output.

    * ``"standard"``: ``"apgd-ce"`` (:func:`apgd`, cross-entropy, ``steps``
      steps, no restarts), ``"apgd-t"`` (targeted DLR, ``num_targets``
      targets of ``steps`` steps each) and ``"square"``
      (:func:`square_attack`, ``square_queries`` queries; L-inf only, so it
      is skipped with a logged note for ``norm=2``).  AutoAttack's FAB-T is
      not implemented.
    * ``"rand"`` (for randomised models): ``"apgd-ce"`` and ``"apgd-dlr"``
      (untargeted DLR), each step on ``eot_samples`` posterior samples,
      ``min(20, S)`` unless given.
    * ``"custom"``: the names in ``attacks``, from :data:`AUTO_ATTACKS`, in
      that order.

    Each attack gets its own seed, derived from ``seed`` and the attack's
    name.

    Args:
      ensemble: a :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble` with ``S``
        samples and ``C`` classes.
      x: inputs ``[B, *input_shape]``, values inside ``clip``.
      y: int labels ``[B]``; ``None`` attacks the ensemble's own predictions.
      eps: radius of the threat ball, >= 0 (required).
      version: ``"standard"``, ``"rand"`` or ``"custom"``
        (:data:`AUTO_VERSIONS`).
      gradient: the APGD attacks' gradient definition (see :func:`apgd`).
      attacks: with ``version="custom"`` only (and required then): a
        sequence of distinct names from :data:`AUTO_ATTACKS`.
      norm: ``np.inf`` or ``2``.
      steps: APGD steps per run, >= 1.
      num_targets: targets of ``"apgd-t"``, in ``[1, C - 1]``; ``None``
        means ``min(9, C - 1)``.
      square_queries: the Square Attack's query budget, >= 1.
      eot_samples: posterior samples per APGD step, in ``[1, S]``; ``None``
        uses all ``S`` (``"rand"``: ``min(20, S)``).
      clip: ``(low, high)`` data range, or ``None``.
      seed: int or stateless seed.
      batch_size, chunk_size, jit_compile, strategy: as in :func:`fgsm`.
      dlr_fallback: as in :func:`apgd`: with too few classes for a DLR
        loss, fall back to cross-entropy instead of raising.

    Returns:
      An :class:`AutoAttackResult`.

    Raises:
      TypeError/ValueError: naming the argument, before any attack runs:
        as :func:`apgd`, and for an unknown ``version``, ``attacks`` without
        ``version="custom"`` (or missing with it, unknown or repeated
        names, or ``"square"`` with ``norm=2``), ``square_queries < 1``.

    Example:
      >>> result = auto_attack(ens, x_test, y_test, eps=8 / 255)
      >>> result.worst_case_accuracy, result.accuracy_after
    """
    check_ensemble(ensemble)
    eps = _check_eps(eps)
    norm = _check_norm(norm)
    version = validate.choice(version, AUTO_VERSIONS, "version")
    names, skipped = _auto_attack_names(version, attacks, norm)
    gradient = validate.choice(gradient, GRADIENTS, "gradient")
    steps = validate.positive_int(steps, "steps")
    square_queries = validate.positive_int(square_queries, "square_queries")
    num_classes, num_samples = ensemble.network.num_classes, ensemble.num_samples
    if num_targets is None:
        num_targets = min(9, num_classes - 1)
    num_targets = validate.integer(num_targets, "num_targets", minimum=1,
                                   maximum=num_classes - 1)
    eot_samples = _check_eot(eot_samples, num_samples)
    if version == "rand" and eot_samples is None:
        eot_samples = min(20, num_samples)
    dlr_fallback = _check_bool(dlr_fallback, "dlr_fallback")
    clip = validate.value_range(clip, "clip")
    base_seed = seeds.stateless(seed)
    norm_setting = "inf" if norm == np.inf else int(norm)
    settings = {}
    for name in names:
        attack_seed = seeds.fold_in(base_seed, AUTO_ATTACKS.index(name))
        config = {"seed": [int(v) for v in attack_seed.numpy()]}
        if name == "square":
            config.update(attack="square_attack", max_queries=square_queries,
                          p_init=0.3)
        else:
            targeted = name == "apgd-t"
            loss = "ce" if name == "apgd-ce" else _check_apgd_loss(
                "dlr", targeted, num_classes, dlr_fallback)
            config.update(attack="apgd", loss=loss, targeted=targeted,
                          steps=steps, restarts=1, norm=norm_setting,
                          gradient=gradient, eot_samples=eot_samples,
                          rho=0.75, alpha=0.75)
            if targeted:
                config["num_targets"] = num_targets
        settings[name] = config
    for name, why in skipped.items():
        logging.info("auto_attack: %s skipped: %s (norm=%s).", name, why,
                     norm_setting)
    settings["common"] = {
        "version": version, "eps": eps, "norm": norm_setting,
        "clip": list(clip) if clip is not None else None,
        "seed": [int(v) for v in base_seed.numpy()],
        "skipped": dict(skipped), "fab_t": "not implemented"}

    options = _AttackOptions(eps, clip, base_seed, batch_size, chunk_size,
                             jit_compile, strategy)
    inputs, _ = _prepare(ensemble, x, y, options)
    x_np, y_np = inputs.x.numpy(), inputs.y.numpy()

    def predicted(points):
        return np.argmax(predict_proba_checked(
            ensemble, tf.constant(points), inputs.batch, inputs.chunk,
            jit_compile), axis=-1)

    robust = predicted(x_np) == y_np
    clean_accuracy = float(np.mean(robust))
    broken_by = np.where(robust, "", "clean").astype(
        f"<U{max(len(n) for n in AUTO_ATTACKS + ('clean',))}")
    x_adv = x_np.copy()
    common = dict(clip=clip, batch_size=batch_size, chunk_size=chunk_size,
                  jit_compile=jit_compile, strategy=strategy)
    accuracy_after = {}
    for name in names:
        todo = np.flatnonzero(robust)
        if todo.size:
            start = time.perf_counter()
            out = np.asarray(_auto_attack_run(name, ensemble, x_np[todo],
                                              y_np[todo], eps, settings[name],
                                              common), np.float32)
            hit = predicted(out) != y_np[todo]
            x_adv[todo[hit]] = out[hit]
            robust[todo[hit]] = False
            broken_by[todo[hit]] = name
            logging.info("auto_attack: %s broke %d of %d points, %.1f s", name,
                         int(hit.sum()), todo.size, time.perf_counter() - start)
        accuracy_after[name] = float(np.mean(robust))
    return AutoAttackResult(
        x_adv=x_adv, robust=robust, broken_by=broken_by, attacks=tuple(names),
        clean_accuracy=clean_accuracy, accuracy_after=accuracy_after,
        settings=settings)
