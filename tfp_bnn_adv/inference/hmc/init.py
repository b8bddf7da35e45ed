"""Initial states: over-dispersed starting points, one per chain.

``"prior"`` draws each chain's weights from the prior ``N(0, prior_scale^2)``:
starts spread across the whole prior, so chains that agree afterwards have
found the same posterior from very different places (the point of R-hat).
``"sgd"`` fits each chain's own Keras initialisation to its MAP with a short
minibatch Adam run (:func:`tfp_bnn_adv.inference.sgd.train_stack`, the
package's one SGD trainer) and adds jitter: chains start near modes, but
possibly different ones.
"""

from __future__ import annotations

import time

from absl import logging
import tensorflow as tf

from tfp_bnn_adv import files
from tfp_bnn_adv import seeds
from tfp_bnn_adv.inference import sgd
from tfp_bnn_adv.network import Network

__all__ = ["prior_init", "sgd_init", "check_explicit_init", "check_state",
           "array_hash"]


def prior_init(network: Network, num_chains: int, prior_scale: float, seed):
    parts = seeds.split(seed, len(network.param_shapes))
    return [prior_scale * seeds.normal([num_chains] + list(shape), s)
            for shape, s in zip(network.param_shapes, tf.unstack(parts))]


def sgd_init(network: Network, x, y, *, num_chains, prior_scale, seed, steps,
              batch_size, learning_rate, jitter, use_xla):
    """A short Adam fit of each chain to its MAP, plus Gaussian jitter.

    Every chain starts from its own draw of the Keras initialisers and
    follows minibatch Adam on ``-(N/B * batch log-lik + log prior) / N``
    (:func:`~tfp_bnn_adv.inference.sgd.train_stack`, batches drawn with
    replacement and shared by the chains); chains are independent,
    vectorised along the leading axis.
    """
    init_seed, batch_seed, jitter_seed = tf.unstack(seeds.split(seed, 3))
    params = network.init_params(init_seed, num_samples=num_chains)
    tic = time.perf_counter()
    fitted = sgd.train_stack(
        network, params, x, y, epochs=1, steps_per_epoch=steps,
        batch_size=batch_size, learning_rate=learning_rate, optimizer="adam",
        seed=batch_seed, sampling="replacement", prior_scale=prior_scale,
        jit_compile=use_xla)
    logging.info("HMC: initial states from %d Adam steps per chain (%.1f s).",
                 steps, time.perf_counter() - tic)
    noise_seeds = tf.unstack(seeds.split(jitter_seed, len(fitted)))
    return [p + jitter * seeds.normal(tf.shape(p), s)
            for p, s in zip(fitted, noise_seeds)]


array_hash = files.array_digest


def check_explicit_init(network: Network, num_chains: int, init):
    """Validates an explicit initial state; returns its fingerprint and state."""
    state = network.check_params(init, stacked=True, name="init")
    if state[0].shape[0] != num_chains:
        raise ValueError(f"init has {state[0].shape[0]} chains on its leading "
                         f"axis; num_chains is {num_chains}.")
    state = check_state(state, "init")
    return {"kind": "explicit",
            "hash": array_hash(*[s.numpy() for s in state])}, state


def check_state(initial_state, name: str = "initial_state") -> list[tf.Tensor]:
    """A non-empty list of finite float32 ``[C, *shape]`` tensors."""
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
