"""The two terms of every weight-space objective: prior and likelihood.

HMC's target (:mod:`~tfp_bnn_adv.inference.hmc.target`), its SGD start and
the SGD trainer (:mod:`~tfp_bnn_adv.inference.sgd`) all score a stack of
weight sets ``[S, *shape]`` with these functions, so a Gaussian prior and a
categorical log-likelihood are computed one way everywhere.  VI's prior is
the distribution :func:`gaussian_prior` (its KL term needs the distribution,
not a log-density).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_bnn_adv.network import Network

__all__ = ["gaussian_log_prior", "gaussian_prior", "log_likelihood"]


def gaussian_log_prior(params: Sequence[tf.Tensor], scale: float) -> tf.Tensor:
    """Log-density of ``N(0, scale^2)`` on every weight, summed per sample.

    Equal to ``tfd.Normal(0, scale).log_prob(w)`` summed over every weight
    (to float32 rounding).

    Args:
      params: list of float32 tensors ``[S, *shape]``.
      scale: prior standard deviation (> 0).

    Returns:
      float32 ``[S]``, the normalised log-density of each weight set.

    Example:
      >>> gaussian_log_prior([tf.zeros([2, 3])], 1.0).numpy()  # 3 log N(0; 0, 1)
      array([-2.7568157, -2.7568157], dtype=float32)
    """
    # Not tfd.Normal(0, scale).log_prob: summing its per-weight terms rounds
    # differently, and HMC chains (chaotic) started from this formula must
    # stay bit-identical; the closed form also costs one reduction per tensor.
    total = 0.0
    const = math.log(scale) + 0.5 * math.log(2.0 * math.pi)
    for p in params:
        axes = list(range(1, p.shape.rank))
        count = float(np.prod(p.shape[1:].as_list()))
        total += (-0.5 / scale**2) * tf.reduce_sum(tf.square(p), axis=axes)
        total -= count * const
    return total


def gaussian_prior(shape, scale: float, dtype=tf.float32):
    """The prior ``N(0, scale^2)`` on a weight tensor, as a distribution.

    Args:
      shape: the weight tensor's shape.
      scale: prior standard deviation (> 0).
      dtype: the weights' dtype.

    Returns:
      A ``tfd.Independent`` over ``shape`` (event shape ``shape``), for KL
      terms and ``tfp.layers`` priors.

    Example:
      >>> gaussian_prior([3], 1.0).log_prob(tf.zeros([3])).numpy()
      -2.7568157
    """
    return tfp.distributions.Independent(
        tfp.distributions.Normal(loc=tf.zeros(shape, dtype),
                                 scale=tf.cast(scale, dtype)),
        reinterpreted_batch_ndims=len(shape))


def log_likelihood(network: Network, params: Sequence[tf.Tensor], x, y,
                   mask=None, *, per_sample_inputs: bool = False,
                   training: bool = False, seed=None) -> tf.Tensor:
    """Categorical log-likelihood of a batch under every weight set.

    Pure and XLA-compilable.

    Args:
      network: the :class:`~tfp_bnn_adv.network.Network`.
      params: list of float32 tensors ``[S, *shape]``.
      x: float32 ``[M, *input_shape]`` shared by all weight sets, or
        ``[S, M, *input_shape]`` with ``per_sample_inputs``.
      y: int32 labels ``[M]`` (or ``[S, M]`` with ``per_sample_inputs``).
      mask: optional float32 ``[M]`` row weights (0 drops a padded row).
      per_sample_inputs: whether ``x`` and ``y`` carry the sample axis.
      training: apply dropout (needs ``seed``).
      seed: stateless dropout seed when ``training``.

    Returns:
      float32 ``[S]``: ``sum_m mask_m * log softmax(f(x_m, w_s))[y_m]``.
    """
    return tf.reduce_sum(
        log_likelihood_terms(network, params, x, y, mask,
                             per_sample_inputs=per_sample_inputs,
                             training=training, seed=seed)[0], axis=1)


def log_likelihood_terms(network: Network, params: Sequence[tf.Tensor], x, y,
                         mask=None, *, per_sample_inputs: bool = False,
                         training: bool = False, seed=None):
    """Per-row terms of :func:`log_likelihood` and the logits.

    Returns:
      ``(terms, logits)``: float32 ``[S, M]`` (masked rows are 0) and
      ``[S, M, C]``.
    """
    logits = network.apply_stack(list(params), x,
                                 per_sample_inputs=per_sample_inputs,
                                 training=training, seed=seed)  # [S, M, C]
    labels = (y if per_sample_inputs
              else tf.broadcast_to(y[None], tf.shape(logits)[:2]))
    ll = -tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels,
                                                         logits=logits)
    if mask is not None:
        ll = ll * mask[None]
    return ll, logits
