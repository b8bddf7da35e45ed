"""Input gradients of the loss over a whole posterior ensemble.

Four definitions.  The first three start from per-sample *logits* and
apply softmax once, inside the cross-entropy:

* ``expected``: Theorem 1's expected loss gradient
  ``<grad_x L(x, w)> = (1/S) sum_s grad_x CE(f(x, w_s), y)``
  (Carbone et al., 2020, eq. 3; Theorem 1 says it vanishes on the data
  manifold for ideal BNNs).
* ``predictive``: the gradient of the loss of the posterior predictive,
  ``grad_x -log (1/S) sum_s softmax(f(x, w_s))[y]``, computed with a running
  log-sum-exp over sample chunks (Feng et al., 2024, attack this one).
* ``per_sample``: every ``grad_x CE(f(x, w_s), y)``, shape ``[S, B, ...]``.

The fourth is what the authors' code attacked (``../shared/PAPER.md``, "The
original code, exactly", item 1), reproduced on purpose, never by accident:

* ``paper``: ``grad_x CE(y, logits = p_bar)`` with
  ``p_bar = (1/S) sum_s softmax(f(x, w_s))``: the posterior-predictive
  *probabilities* fed to a cross-entropy as if they were logits, so softmax
  is applied twice.  It is neither ``expected`` nor ``predictive``.  The
  authors used the first 10 samples; pass ``ensemble[:10]`` (or use
  :mod:`tfp_bnn_adv.paper`) for that.

The ``*_graph`` functions are pure and traceable, for use inside other
compiled code (the attacks' ``tf.while_loop``).  The public functions
validate their inputs, stream the batch through fixed-size calls, chunk the
sample axis to bound memory, and compile with XLA (see :mod:`tfp_bnn_adv.xla`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from tfp_bnn_adv import chunking
from tfp_bnn_adv import distribute
from tfp_bnn_adv import validate
from tfp_bnn_adv import xla
from tfp_bnn_adv.ensemble import check_ensemble
from tfp_bnn_adv.ensemble import predict_proba_checked
from tfp_bnn_adv.ensemble import predict_proba_graph

__all__ = ["expected_loss_gradient", "predictive_loss_gradient",
           "per_sample_loss_gradients", "paper_loss_gradient",
           "paper_expected_loss_gradient",
           "loss_gradient_graph", "predictive_log_prob_graph",
           "per_sample_gradient_graph", "prepare_inputs", "PreparedInputs",
           "GRADIENT_KINDS"]

GRADIENT_KINDS = ("expected", "predictive", "paper")
# A finite stand-in for -inf in the running maximum: exp(_NEG - m) == 0.
_NEG = -1e30


def _per_sample_ce(network, params, x, y, double_softmax=False):
    """Cross-entropy of every sample: ``[c, B]`` from logits ``[c, B, C]``.

    ``double_softmax`` takes the per-sample softmax as the logits, as the
    authors' code did (Figure 1's per-sample loss).
    """
    logits = network.apply_stack(params, x)
    if double_softmax:
        logits = tf.nn.softmax(logits)
    return _ce_of_logits(logits, y)


def _ce_of_logits(logits, y):
    """Cross-entropy ``[c, B]`` of labels ``y`` ``[B]`` under ``[c, B, C]``."""
    labels = tf.broadcast_to(y[None], tf.shape(logits)[:2])
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)


def _expected(network, params, x, y, chunk_size, double_softmax=False):
    s = params[0].shape[0]

    def body(state, chunk):
        grad, loss = state
        with tf.GradientTape() as tape:
            tape.watch(x)
            ce = tf.reduce_sum(_per_sample_ce(network, chunk, x, y,
                                              double_softmax), axis=0)
        # Each example's loss depends only on its own input, so the gradient
        # of the batch sum holds every example's own gradient.
        return grad + tape.gradient(ce, x), loss + ce

    init = (tf.zeros_like(x), tf.zeros(tf.shape(x)[:1], tf.float32))
    grad, loss = chunking.fold_sample_chunks(params, chunk_size, body, init)
    return grad / s, loss / s


def predictive_log_prob_graph(network, params, x, classes, chunk_size, *,
                              with_scores: bool = False):
    """``log p_bar(c_b | x_b)`` and its input gradient, in one pass over ``S``.

    ``p_bar`` is the posterior predictive ``(1/S) sum_s softmax f(x, w_s)``
    and ``c`` one class per example (the label, or an attack's target).
    Pure and traceable, chunked over ``S`` (memory stays one chunk).

    Args:
      network, params: the network and its stack ``[S, ...]``.
      x: inputs ``[B, ...]``.
      classes: int32 ``[B]``.
      chunk_size: samples per chunk.
      with_scores: also return ``log p_bar`` of every class, ``[B, C]``,
        accumulated in the same pass (no gradient).

    Returns:
      ``(log_p [B], grad [B, ...])``, plus ``scores [B, C]`` with
      ``with_scores``.
    """
    s = params[0].shape[0]
    ex_shape = [-1] + [1] * (x.shape.rank - 1)

    def body(state, chunk):
        m_old, denom, grad = state[:3]
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = network.apply_stack(chunk, x)
            log_p = -_ce_of_logits(logits, classes)  # [c, B]
            m_chunk = tf.stop_gradient(tf.reduce_max(log_p, axis=0))
            w = tf.stop_gradient(tf.exp(log_p - m_chunk))
            weighted = tf.reduce_sum(w * log_p)
        # d/dx log sum_s p_s = sum_s p_s d/dx log p_s / sum_s p_s: accumulate
        # the numerator and denominator relative to a running maximum.
        g_chunk = tape.gradient(weighted, x)
        d_chunk = tf.reduce_sum(w, axis=0)
        m_new = tf.maximum(m_old, m_chunk)
        a_old, a_chunk = tf.exp(m_old - m_new), tf.exp(m_chunk - m_new)
        grad = (grad * tf.reshape(a_old, ex_shape) +
                g_chunk * tf.reshape(a_chunk, ex_shape))
        out = (m_new, denom * a_old + d_chunk * a_chunk, grad)
        if with_scores:  # a running log-sum-exp of every class
            lse = tf.stop_gradient(tf.reduce_logsumexp(
                tf.nn.log_softmax(logits), axis=0))
            out += (tf.reduce_logsumexp(tf.stack([state[3], lse]), axis=0),)
        return out

    b = tf.shape(x)[:1]
    init = (tf.fill(b, tf.constant(_NEG, tf.float32)),
            tf.zeros(b, tf.float32), tf.zeros_like(x))
    if with_scores:
        init += (tf.fill([b[0], network.num_classes],
                         tf.constant(_NEG, tf.float32)),)
    state = chunking.fold_sample_chunks(params, chunk_size, body, init)
    m, denom, grad = state[:3]
    log_s = tf.math.log(tf.cast(s, tf.float32))
    out = (m + tf.math.log(denom) - log_s, grad / tf.reshape(denom, ex_shape))
    return out + ((state[3] - log_s,) if with_scores else ())


def _predictive(network, params, x, y, chunk_size):
    log_p, grad = predictive_log_prob_graph(network, params, x, y, chunk_size)
    return -grad, -log_p


def _paper(network, params, x, y, chunk_size):
    """``grad_x CE(y, logits=p_bar)``, ``p_bar`` the mean per-sample softmax.

    The loss is a nonlinear function of a sum over samples, so it takes two
    passes over the sample chunks: the first accumulates ``p_bar``; the
    second back-propagates the fixed cotangent
    ``dL/dp_bar = softmax(p_bar) - onehot(y)`` through every chunk's softmax
    (the chain rule, exactly; memory stays one chunk).
    """
    s = params[0].shape[0]
    p_bar = tf.stop_gradient(predict_proba_graph(network, params, x,
                                                 chunk_size))
    log_q = tf.nn.log_softmax(p_bar)
    loss = -tf.gather(log_q, y, batch_dims=1)
    cotangent = tf.exp(log_q) - tf.one_hot(y, network.num_classes,
                                           dtype=tf.float32)

    def body(grad, chunk):
        with tf.GradientTape() as tape:
            tape.watch(x)
            p = tf.reduce_sum(tf.nn.softmax(network.apply_stack(chunk, x)),
                              axis=0)
            total = tf.reduce_sum(cotangent * p)
        return grad + tape.gradient(total, x)

    grad = chunking.fold_sample_chunks(params, chunk_size, body,
                                       tf.zeros_like(x))
    return grad / s, loss


def loss_gradient_graph(network, params, x, y, kind: str, chunk_size: int):
    """Input gradient and loss of one ensemble definition; pure, traceable.

    Args:
      network: the :class:`~tfp_bnn_adv.network.Network`.
      params: stack of float32 tensors ``[S, ...]`` (static ``S``).
      x: float32 ``[B, *input_shape]``.
      y: int32 labels ``[B]``.
      kind: ``"expected"``, ``"predictive"`` or ``"paper"``.
      chunk_size: samples per chunk.

    Returns:
      ``(grad, loss)``: float32 ``[B, *input_shape]`` and ``[B]``; ``loss`` is
      the mean per-sample cross-entropy (expected), the negative log
      posterior-predictive probability of ``y`` (predictive) or the
      cross-entropy of the predictive probabilities taken as logits (paper).
    """
    if kind == "expected":
        return _expected(network, params, x, y, chunk_size)
    if kind == "predictive":
        return _predictive(network, params, x, y, chunk_size)
    if kind == "paper":
        return _paper(network, params, x, y, chunk_size)
    raise ValueError(f"kind must be one of {GRADIENT_KINDS}, got {kind!r}.")


def per_sample_gradient_graph(network, params, x, y, chunk_size: int):
    """Every sample's input gradient; pure, traceable.

    Returns:
      ``(grads, losses)``: float32 ``[S, B, *input_shape]`` and ``[S, B]``.
    """
    def fn(chunk):
        c = chunk[0].shape[0]
        xs = tf.broadcast_to(x[None], tf.concat([[c], tf.shape(x)], axis=0))
        with tf.GradientTape() as tape:
            tape.watch(xs)
            logits = network.apply_stack(chunk, xs, per_sample_inputs=True)
            labels = tf.broadcast_to(y[None], tf.shape(logits)[:2])
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
            total = tf.reduce_sum(ce)
        return tape.gradient(total, xs), ce

    return chunking.map_sample_chunks(params, chunk_size, fn)


class PreparedInputs(NamedTuple):
    """The checked inputs of one gradient or attack call.

    Attributes:
      x: float32 tensor ``[B, *input_shape]``.
      y: int32 tensor ``[B]``: the labels given, or the ensemble's own
        predictions.
      batch: rows per compiled call, a multiple of the replica count.
      chunk: posterior samples per chunk inside the call.
      strategy: the ``tf.distribute.Strategy`` to shard over, or ``None``.
    """
    x: tf.Tensor
    y: tf.Tensor
    batch: int
    chunk: int
    strategy: Any


def prepare_inputs(ensemble, x, y, *, batch_size, chunk_size, jit_compile,
                   strategy, clip=None, cache_bound: bool = True
                   ) -> PreparedInputs:
    """Checks a call's inputs once: the one preparation of gradients and
    attacks.

    ``x`` and ``y`` are validated once (``Network.check_inputs``), the batch
    and chunk sizes chosen once (:meth:`PosteriorEnsemble.batch_and_chunk`),
    and missing labels predicted from the checked ``x`` with the caller's
    ``jit_compile`` and chunk size; every replica then gets an equal shard
    of each batch.

    Args:
      ensemble: a checked :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble`.
      x: inputs ``[B, *input_shape]``.
      y: int labels ``[B]``, or ``None`` for the ensemble's predictions.
      batch_size, chunk_size: ``None`` or ints >= 1.
      jit_compile: see :func:`tfp_bnn_adv.xla.compile_fn`.
      strategy: a ``tf.distribute.Strategy`` or ``None`` (the open scope's).
      clip: ``None``, or a checked ``(low, high)`` that ``x`` must lie in.
      cache_bound: whether an automatic chunk size keeps the host's cache
        bound (:meth:`PosteriorEnsemble.batch_and_chunk`).

    Returns:
      A :class:`PreparedInputs`.

    Raises:
      TypeError/ValueError: naming the argument, for a bad strategy, ``x``,
        ``y``, ``batch_size`` or ``chunk_size``, or ``x`` outside ``clip``.
    """
    strategy = distribute.current_strategy(strategy)
    x, y = ensemble.network.check_inputs(x, y)
    if clip is not None:
        lo, hi = float(tf.reduce_min(x)), float(tf.reduce_max(x))
        if lo < clip[0] or hi > clip[1]:
            raise ValueError(
                f"x has values in [{lo:g}, {hi:g}], outside clip={clip}; "
                "rescale x into the data range or pass clip=None.")
    batch, chunk = ensemble.batch_and_chunk(x.shape[0], batch_size, chunk_size,
                                            cache_bound=cache_bound)
    if y is None:
        y = tf.constant(np.argmax(predict_proba_checked(
            ensemble, x, batch, chunk, jit_compile), axis=-1), tf.int32)
    return PreparedInputs(x, y, distribute.round_up_to_replicas(batch, strategy),
                          chunk, strategy)


def _map(fn, ensemble, inputs: PreparedInputs, batch_axis=None):
    """``fn(params, xb, yb)`` over fixed-size batches, each sharded."""
    return chunking.map_batches(
        lambda xb, yb: distribute.sharded_call(
            inputs.strategy, fn, [ensemble.params, xb, yb], [1, 2], batch_axis),
        [inputs.x, inputs.y], inputs.batch, batch_axis=batch_axis,
        multiple_of=distribute.num_replicas(inputs.strategy))


def _ensemble_gradient(kind, ensemble, x, y, chunk_size, batch_size, jit_compile,
                       strategy):
    """``kind`` is one of :data:`GRADIENT_KINDS`, ``"per_sample"`` or
    ``"paper_expected"``."""
    check_ensemble(ensemble)
    inputs = prepare_inputs(ensemble, x, y, batch_size=batch_size,
                            chunk_size=chunk_size, jit_compile=jit_compile,
                            strategy=strategy)
    chunk = inputs.chunk

    def build(net):
        if kind == "per_sample":
            return xla.compile_fn(
                lambda p, xb, yb: per_sample_gradient_graph(
                    net, p, xb, yb, chunk)[0],
                jit_compile, "per_sample_loss_gradients")
        if kind == "paper_expected":
            return xla.compile_fn(
                lambda p, xb, yb: _expected(net, p, xb, yb, chunk,
                                            double_softmax=True)[0],
                jit_compile, "paper_expected_loss_gradient")
        return xla.compile_fn(
            lambda p, xb, yb: loss_gradient_graph(net, p, xb, yb, kind,
                                                  chunk)[0],
            jit_compile, f"{kind}_loss_gradient")

    fn = xla.cached_function(ensemble.network,
                             ("grad", kind, chunk, jit_compile), build)
    return _map(fn, ensemble, inputs,
                [1] if kind == "per_sample" else None)


def expected_loss_gradient(ensemble, x, y=None, *, chunk_size=None,
                           batch_size=None, jit_compile=None,
                           strategy=None) -> np.ndarray:
    """The paper's expected loss gradient ``(1/S) sum_s grad_x CE(f(x,w_s), y)``.

    Args:
      ensemble: a :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble`.
      x: inputs ``[B, *input_shape]``.
      y: int labels ``[B]`` in ``[0, C)``; ``None`` uses the ensemble's own
        predictions.
      chunk_size: posterior samples per chunk (memory bound); ``None`` picks
        the largest chunk within :data:`chunking.DEFAULT_MEMORY_BUDGET`.
      batch_size: inputs per compiled call (the last batch is padded).
      jit_compile: ``True``/``False``/``"auto"``/``None``, see
        :func:`tfp_bnn_adv.xla.compile_fn`.
      strategy: a ``tf.distribute.Strategy`` whose replicas each take an
        equal shard of every batch (results gathered in order); ``None``
        uses the strategy whose scope is open, if any (see
        :mod:`tfp_bnn_adv.distribute`).

    Returns:
      float32 numpy array ``[B, *input_shape]``.

    Raises:
      ValueError/TypeError: on a bad shape of ``x``, labels out of range or
        not integers, or ``chunk_size < 1``.

    Example:
      >>> g = expected_loss_gradient(ens, x_test[:100], y_test[:100])
      >>> np.abs(g).mean()      # the paper's mean |<grad L>|
    """
    return _ensemble_gradient("expected", ensemble, x, y, chunk_size,
                              batch_size, jit_compile, strategy)


def predictive_loss_gradient(ensemble, x, y=None, *, chunk_size=None,
                             batch_size=None, jit_compile=None,
                             strategy=None) -> np.ndarray:
    """``grad_x -log (1/S) sum_s softmax(f(x, w_s))[y]``, via log-sum-exp.

    Args and Raises as :func:`expected_loss_gradient`.

    Returns:
      float32 numpy array ``[B, *input_shape]``.
    """
    return _ensemble_gradient("predictive", ensemble, x, y, chunk_size,
                              batch_size, jit_compile, strategy)


def paper_loss_gradient(ensemble, x, y=None, *, num_samples=None,
                        chunk_size=None, batch_size=None, jit_compile=None,
                        strategy=None) -> np.ndarray:
    """The authors' attack gradient: ``grad_x CE(y, logits = p_bar)``.

    ``p_bar = (1/n) sum_{s<n} softmax(f(x, w_s))`` over the first ``n``
    samples; the cross-entropy then applies a second softmax to these
    probabilities (``../shared/PAPER.md``, "The original code, exactly",
    item 1).  For the study of why the paper's attacks were weak; an honest
    attack on a BNN follows :func:`predictive_loss_gradient`.

    Args:
      num_samples: ``n``, the first samples used (the authors: 10); ``None``
        uses all.  Must not exceed the ensemble's size.
      Others and Raises as :func:`expected_loss_gradient`.

    Returns:
      float32 numpy array ``[B, *input_shape]``.

    Example:
      >>> g = paper_loss_gradient(ens, x_test[:100], y_test[:100],
      ...                         num_samples=10)
    """
    check_ensemble(ensemble)
    if num_samples is not None:
        n = validate.positive_int(num_samples, "num_samples")
        if n > ensemble.num_samples:
            raise ValueError(f"num_samples must be at most the ensemble's "
                             f"{ensemble.num_samples} samples, got {n}.")
        ensemble = ensemble[:n]
    return _ensemble_gradient("paper", ensemble, x, y, chunk_size,
                              batch_size, jit_compile, strategy)


def paper_expected_loss_gradient(ensemble, x, y=None, *, chunk_size=None,
                                 batch_size=None, jit_compile=None,
                                 strategy=None) -> np.ndarray:
    """Figure 1's gradient: ``(1/S) sum_s grad_x CE(y, logits = softmax f(x, w_s))``.

    The expected gradient as the authors' code computed it for Figure 1
    (``../shared/PAPER.md``, item 7): each sample's softmax taken as logits
    by the cross-entropy.  :func:`tfp_bnn_adv.paper.figure1_gradient_norms`
    measures it as the paper did.

    Args and Raises as :func:`expected_loss_gradient`.

    Returns:
      float32 numpy array ``[B, *input_shape]``.
    """
    return _ensemble_gradient("paper_expected", ensemble, x, y, chunk_size,
                              batch_size, jit_compile, strategy)


def per_sample_loss_gradients(ensemble, x, y=None, *, chunk_size=None,
                              batch_size=None, jit_compile=None,
                              strategy=None) -> np.ndarray:
    """Each posterior sample's ``grad_x CE(f(x, w_s), y)``.

    Args and Raises as :func:`expected_loss_gradient`.

    Returns:
      float32 numpy array ``[S, B, *input_shape]``.
    """
    return _ensemble_gradient("per_sample", ensemble, x, y, chunk_size,
                              batch_size, jit_compile, strategy)
