"""Deterministic networks, deep ensembles, and the one SGD trainer.

:func:`train_stack` trains ``K`` weight sets ``[K, *shape]`` together: one
compiled program per epoch over the leading member axis (a
``tf.while_loop`` over its minibatch steps, no host round-trip inside an
epoch), minibatch Adam or SGD with momentum.  Members are independent: the
gradient of the summed objective is every member's own gradient, and with
``sampling="shuffle"`` every member's data order and dropout masks come
from its own stateless seed, so member ``k`` trains the same whatever ``K``
is (bit for bit among ensembles of two or more members; a lone member's
matmuls run on another TF kernel and round differently).  It fits the deep ensembles below and HMC's ``"sgd"`` start
(:func:`~tfp_bnn_adv.inference.hmc.init.sgd_init`).

:func:`train` fits one network and returns it as a
:class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble` of size 1;
:func:`train_ensemble` fits ``K`` independently initialised copies (a deep
ensemble, Lakshminarayanan et al., 2017) and stacks them into an ensemble of
size ``K``.  The user's model is never modified: each member's weights are
drawn statelessly from its layers' initialisers.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from tfp_bnn_adv import seeds
from tfp_bnn_adv import validate
from tfp_bnn_adv import xla
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.inference import density
from tfp_bnn_adv.network import Network

__all__ = ["train", "train_ensemble", "train_stack", "optimizer_slots",
           "optimizer_update", "epoch_order", "OPTIMIZERS", "SAMPLINGS"]

OPTIMIZERS = ("adam", "sgd")
SAMPLINGS = ("shuffle", "replacement")
# Keras' defaults, so "adam" and "sgd" mean what they meant under Keras fit.
ADAM_BETA_1, ADAM_BETA_2, ADAM_EPSILON = 0.9, 0.999, 1e-7
SGD_MOMENTUM = 0.9
_VERBOSITY = (0, 1, 2, "auto")
# Validation rows scored per compiled call (bounded memory for any N).
_EVAL_ROWS = 1024


# --------------------------------------------------------------------------
# The optimisers: pure, elementwise, so members never mix.
# --------------------------------------------------------------------------
def optimizer_slots(optimizer: str, params: Sequence[tf.Tensor]
                    ) -> list[list[tf.Tensor]]:
    """The zero state of ``optimizer`` for ``params``.

    Returns:
      ``[m, v]`` (Adam's moments) or ``[velocity]`` (momentum SGD), each a
      list of zero tensors shaped like ``params``.
    """
    validate.choice(optimizer, OPTIMIZERS, "optimizer")
    return [[tf.zeros_like(p) for p in params]
            for _ in range(2 if optimizer == "adam" else 1)]


def optimizer_update(optimizer: str, learning_rate: float, step,
                     params: Sequence[tf.Tensor], grads: Sequence[tf.Tensor],
                     slots: list[list[tf.Tensor]]):
    """One optimiser step; pure and XLA-compilable.

    ``"adam"``: Adam (Kingma & Ba, 2015) with Keras' defaults ``beta_1=0.9``,
    ``beta_2=0.999``, ``epsilon=1e-7`` and the bias correction folded into
    the step size.  ``"sgd"``: Keras' SGD with momentum 0.9
    (``u = 0.9 u - lr g``; ``w = w + u``).

    Args:
      optimizer: ``"adam"`` or ``"sgd"``.
      learning_rate: the step size.
      step: int32 scalar, the 0-based index of this step.
      params, grads: lists of float32 tensors of equal shapes.
      slots: the optimiser state (:func:`optimizer_slots`).

    Returns:
      ``(params, slots)`` after the step.
    """
    if optimizer == "adam":
        beta1, beta2, eps = ADAM_BETA_1, ADAM_BETA_2, ADAM_EPSILON
        m, v = slots
        t = tf.cast(step + 1, tf.float32)
        m = [beta1 * a + (1 - beta1) * c for a, c in zip(m, grads)]
        v = [beta2 * a + (1 - beta2) * tf.square(c) for a, c in zip(v, grads)]
        lr = learning_rate * tf.sqrt(1 - beta2**t) / (1 - beta1**t)
        params = [p - lr * a / (tf.sqrt(c) + eps)
                  for p, a, c in zip(params, m, v)]
        return params, [m, v]
    (velocity,) = slots
    velocity = [SGD_MOMENTUM * u - learning_rate * g
                for u, g in zip(velocity, grads)]
    return [p + u for p, u in zip(params, velocity)], [velocity]


def epoch_order(seed, epoch, n: int) -> tf.Tensor:
    """The data order of one epoch: a permutation of ``range(n)``, int32 ``[n]``.

    A stateless function of ``seed`` and ``epoch`` alone (Philox bits, the
    same on every compile path).
    """
    keys = tf.cast(seeds.bits([n], seeds.fold_in(seed, epoch)), tf.int64)
    return tf.cast(tf.argsort(keys, stable=True), tf.int32)


# --------------------------------------------------------------------------
# The trainer.
# --------------------------------------------------------------------------
def train_stack(network: Network, params: Sequence[tf.Tensor], x, y, *,
                epochs: int, batch_size: int, learning_rate: float,
                optimizer: str = "adam", seed, sampling: str = "shuffle",
                steps_per_epoch: int | None = None,
                prior_scale: float | None = None, dropout: bool = False,
                jit_compile=None,
                on_epoch: Callable[[int, list, dict], bool] | None = None
                ) -> list[tf.Tensor]:
    """Trains ``K`` weight sets at once by minibatch Adam or momentum SGD.

    Each step minimises, for every member, the minibatch estimate of the
    negative log-posterior per training point,
    ``-(N / B * sum_batch log p(y | x, w) + log p(w)) / N`` (without
    ``prior_scale``, the batch's mean cross-entropy on the logits); the
    members' objectives are summed, so each gets its own gradient.

    Batches:

    * ``"shuffle"``: an epoch is one pass over the data in a fresh order
      per member (:func:`epoch_order` of the member's seed and the epoch);
      ``ceil(N / B)`` steps, the last batch smaller when ``B`` does not
      divide ``N`` (padded and masked, as Keras ``fit`` did).  Each member
      sees its own inputs, ``[K, B, *input_shape]``.
    * ``"replacement"``: every step draws ``B`` indices with replacement
      from ``seeds.fold_in(seed, step)``, shared by all members (HMC's
      start); an epoch is ``steps_per_epoch`` steps.

    Args:
      network: the :class:`~tfp_bnn_adv.network.Network`.
      params: list of float32 tensors ``[K, *shape]``, the starting weights.
      x: float32 ``[N, *input_shape]``, already validated.
      y: int32 labels ``[N]``.
      epochs: compiled calls; the host checks in between (``on_epoch``).
      batch_size: rows per step ``B`` (at most ``N`` are used).
      learning_rate: the optimiser's step size.
      optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9), see
        :func:`optimizer_update`.
      seed: ``"shuffle"``: int32 ``[K, 2]``, row ``k`` member ``k``'s seed
        (its data orders and dropout masks); ``"replacement"``: one seed.
      sampling: ``"shuffle"`` or ``"replacement"``.
      steps_per_epoch: steps per epoch for ``"replacement"`` (required).
      prior_scale: adds the prior ``N(0, prior_scale^2)`` on every weight
        to the objective (a MAP fit); ``None`` for none.
      dropout: train with the network's dropout active (``"shuffle"``
        only): each member's masks from its own seed, so the forward pass
        then runs member by member within the compiled step.
      jit_compile: ``True``, ``False``, ``"auto"`` or ``None`` (see
        :func:`tfp_bnn_adv.xla.stochastic_jit`; training is never timed).
      on_epoch: called after every epoch as ``on_epoch(epoch, params,
        metrics)`` (0-based epoch; ``metrics`` holds float64 ``[K]`` arrays
        ``"loss"``, the mean training cross-entropy, and ``"accuracy"``,
        both over the epoch's batches as the weights moved); a true return
        value stops training.

    Returns:
      The trained weights, float32 ``[K, *shape]``.

    Raises:
      ValueError/TypeError: for a bad setting, or seeds of the wrong shape.

    Example:
      >>> net = Network.from_keras(models.mlp((2,), 2, (16,)))
      >>> init = net.init_params(0, num_samples=4)
      >>> member_seeds = seeds.split(1, 4)
      >>> trained = train_stack(net, init, x, y, epochs=5, batch_size=32,
      ...                       learning_rate=1e-2, seed=member_seeds)
      >>> trained[0].shape[0]
      4
    """
    validate.choice(sampling, SAMPLINGS, "sampling")
    validate.choice(optimizer, OPTIMIZERS, "optimizer")
    epochs = validate.positive_int(epochs, "epochs")
    batch_size = validate.positive_int(batch_size, "batch_size")
    learning_rate = validate.positive_real(learning_rate, "learning_rate")
    if prior_scale is not None:
        prior_scale = validate.positive_real(prior_scale, "prior_scale")
    params = list(params)
    x = tf.convert_to_tensor(x, tf.float32)
    y = tf.convert_to_tensor(y, tf.int32)
    n = int(x.shape[0])
    b = min(batch_size, n)
    num_members = int(params[0].shape[0])
    if sampling == "shuffle":
        seed = tf.convert_to_tensor(seed)
        if seed.shape.as_list() != [num_members, 2] or not seed.dtype.is_integer:
            raise ValueError(f"seed must be integer seeds [{num_members}, 2] "
                             f"(one per member) for sampling='shuffle', got "
                             f"shape {seed.shape.as_list()}.")
        seed = tf.cast(seed, tf.int32)
        steps = -(-n // b)
        rows_per_epoch = n
    else:
        seed = seeds.stateless(seed)
        steps = validate.positive_int(steps_per_epoch, "steps_per_epoch")
        rows_per_epoch = steps * b
    per_member_dropout = bool(dropout) and network.has_dropout
    if per_member_dropout and sampling != "shuffle":
        raise ValueError("dropout=True needs sampling='shuffle' (per-member "
                         "seeds).")

    def run_epoch(params, slots, first, epoch, x, y, seed):
        # x, y and the seeds are arguments, not constants baked into the
        # program: one trace serves every epoch.
        order, dropout_seeds = None, []
        if sampling == "shuffle":
            # Member k's orders and masks come from row k alone.
            member_seeds = [tf.unstack(seeds.split(seed[k], 2))
                            for k in range(num_members)]
            dropout_seeds = [s[1] for s in member_seeds]
            order = tf.stack([epoch_order(s[0], epoch, n)
                              for s in member_seeds])
            order = tf.pad(order, [[0, 0], [0, steps * b - n]])  # [K, steps*B]

        def batch(t):
            """``(x, y, mask, count, per_member)`` of global step ``t``."""
            if sampling == "replacement":
                idx = seeds.integers([b], seeds.fold_in(seed, t), n)
                return tf.gather(x, idx), tf.gather(y, idx), None, b, False
            start = (t - first) * b
            idx = tf.slice(order, tf.stack([0, start]), [num_members, b])
            mask = tf.cast(start + tf.range(b) < n, tf.float32)
            return (tf.gather(x, idx), tf.gather(y, idx), mask,
                    tf.reduce_sum(mask), True)

        def terms(ps, xb, yb, mask, per_member, t):
            if not per_member_dropout:
                return density.log_likelihood_terms(
                    network, ps, xb, yb, mask, per_sample_inputs=per_member)
            # One member at a time: a stacked call would draw all members'
            # dropout masks from one seed, member k's by its position in the
            # stack, so a member would depend on K.
            outs = [density.log_likelihood_terms(
                network, [p[k:k + 1] for p in ps], xb[k:k + 1], yb[k:k + 1],
                mask, per_sample_inputs=True, training=True,
                seed=seeds.fold_in(dropout_seeds[k], t))
                    for k in range(num_members)]
            return (tf.concat([o[0] for o in outs], 0),
                    tf.concat([o[1] for o in outs], 0))

        def objective(ps, t):
            xb, yb, mask, count, per_member = batch(t)
            ll_terms, logits = terms(ps, xb, yb, mask, per_member, t)
            ll = tf.reduce_sum(ll_terms, axis=1)
            data_term = n / count * ll
            if prior_scale is not None:
                data_term = data_term + density.gaussian_log_prior(
                    ps, prior_scale)
            loss = -tf.reduce_sum(data_term) / n
            right = tf.cast(tf.equal(
                tf.argmax(logits, -1, output_type=tf.int32),
                yb if per_member else yb[None]), tf.float32)
            if mask is not None:
                right = right * mask[None]
            return loss, -ll, tf.reduce_sum(right, axis=1)

        def body(t, ps, slots, loss_sum, correct):
            with tf.GradientTape() as tape:
                tape.watch(ps)
                loss, ce, right = objective(ps, t)
            g = tape.gradient(loss, ps)
            ps, slots = optimizer_update(optimizer, learning_rate, t, ps, g,
                                         slots)
            return t + 1, ps, slots, loss_sum + ce, correct + right

        zeros = tf.zeros([num_members])
        return tf.while_loop(lambda t, *_: t < first + steps, body,
                             (first, list(params), slots, zeros, zeros))

    compiled = xla.compile_fn(run_epoch, jit_compile, "sgd_train_stack",
                              stochastic=True)
    slots = optimizer_slots(optimizer, params)
    step = tf.constant(0, tf.int32)
    for epoch in range(epochs):
        step, params, slots, loss_sum, correct = compiled(
            params, slots, step, tf.constant(epoch, tf.int32), x, y, seed)
        if on_epoch is not None:
            metrics = {
                "loss": loss_sum.numpy().astype(np.float64) / rows_per_epoch,
                "accuracy": correct.numpy().astype(np.float64) / rows_per_epoch}
            if on_epoch(epoch, params, metrics):
                break
    return params


# --------------------------------------------------------------------------
# Deterministic networks and deep ensembles.
# --------------------------------------------------------------------------
def _check_settings(epochs, batch_size, learning_rate, optimizer,
                    validation_split, verbose) -> dict:
    """The settings as plain Python values, or a clear error for a bad one.

    Numpy scalars (``np.int64(10)``, ``np.float32(1e-3)``) are accepted.
    """
    validate.choice(optimizer, OPTIMIZERS, "optimizer")
    verbose = validate.choice(verbose, _VERBOSITY, "verbose")
    return {"epochs": validate.positive_int(epochs, "epochs"),
            "batch_size": validate.positive_int(batch_size, "batch_size"),
            "learning_rate": validate.positive_real(learning_rate,
                                                    "learning_rate"),
            "optimizer": optimizer,
            "validation_split": validate.fraction(validation_split,
                                                  "validation_split"),
            "verbose": verbose if isinstance(verbose, str) else int(verbose)}


def _split(x, y, validation_split: float):
    """Keras ``fit``'s split: the last ``validation_split`` of the rows."""
    if not validation_split:
        return x, y, None
    n = int(x.shape[0])
    at = int(math.floor(n * (1.0 - validation_split)))
    if at in (0, n):
        raise ValueError(f"validation_split={validation_split!r} leaves "
                         f"{at} of {n} training points for training; use more "
                         "data or another split.")
    return x[:at], y[:at], (x[at:], y[at:])


def _evaluator(network: Network, jit_compile=None):
    """``fn(params, x, y) -> (mean cross-entropy [K], accuracy [K])``."""
    def chunk(params, x, y):
        terms, logits = density.log_likelihood_terms(network, params, x, y)
        right = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                                 y[None]), tf.float32)
        return -tf.reduce_sum(terms, axis=1), tf.reduce_sum(right, axis=1)

    compiled = xla.compile_fn(chunk, jit_compile, "sgd_evaluate",
                              stochastic=True)

    def evaluate(params, x, y):
        n = int(x.shape[0])
        ce, right = 0.0, 0.0
        for start in range(0, n, _EVAL_ROWS):
            a, r = compiled(params, x[start:start + _EVAL_ROWS],
                            y[start:start + _EVAL_ROWS])
            ce, right = ce + a.numpy().astype(np.float64), right + r.numpy()
        return ce / n, np.asarray(right, np.float64) / n

    return evaluate


def _epoch_line(epoch, epochs, seconds, rows) -> str:
    def fmt(row):
        return " - ".join(f"{k}: {v:.4f}" for k, v in row.items())

    head = f"Epoch {epoch}/{epochs} - {seconds:.1f}s"
    if len(rows) == 1:
        return f"{head} - {fmt(rows[0])}"
    return "\n".join([head] + [f"  member {k + 1}/{len(rows)} - {fmt(row)}"
                               for k, row in enumerate(rows)])


def train_ensemble(model, train_x, train_y, *, num_members: int = 5,
                   epochs: int = 10, batch_size: int = 128,
                   learning_rate: float = 1e-3, optimizer: str = "adam",
                   validation_split: float = 0.0, seed: int = 0,
                   verbose: int = 1) -> PosteriorEnsemble:
    """Trains ``num_members`` independently initialised networks.

    All members train together in one compiled program per epoch
    (:func:`train_stack`, ``sampling="shuffle"``): softmax cross-entropy on
    the network's logits, minibatches in a fresh order per member and epoch,
    the network's dropout active during training.

    Args:
      model: a built Keras 3 model accepted by
        :meth:`~tfp_bnn_adv.network.Network.from_keras` (not modified).
      train_x: float inputs ``[N, *input_shape]``, scaled as the model
        expects (integer or far-out-of-range inputs are used as given, with
        a :class:`~tfp_bnn_adv.network.UnscaledInputWarning`).
      train_y: int labels ``[N]`` in ``[0, C)``.
      num_members: ensemble size ``K`` (1 gives a deterministic network).
      epochs: passes over the training data.
      batch_size: minibatch size (the last batch of an epoch is smaller
        when it does not divide the training rows).
      learning_rate: optimiser step size.
      optimizer: ``"adam"`` (Keras' defaults) or ``"sgd"`` (with momentum
        0.9).
      validation_split: fraction of the training data held out for
        validation curves (never the test set): the last rows, unshuffled,
        as Keras ``fit`` does.
      seed: member ``k`` uses seed ``seed + k`` for its initial weights,
        data order and dropout masks, and trains the same whatever
        ``num_members`` is.
      verbose: 0 silent; 1, 2 or ``"auto"`` print one line per epoch (and
        member) with the training loss and accuracy (and ``val_loss``,
        ``val_accuracy`` with a validation split).

    Returns:
      A :class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble` with ``S = K``;
      ``metadata`` holds the settings and each member's final metrics.

    Raises:
      ValueError/TypeError: on bad settings (numpy scalars are accepted;
        ``learning_rate`` must be finite and > 0), inputs or labels, or a
        model with unsupported layers; ValueError naming the member, the
        epoch and the non-finite weights if training diverges.

    Example:
      >>> ens = train_ensemble(models.mlp((2,), 2, (64,)), x, y,
      ...                      num_members=5, epochs=20)
      >>> ens.num_samples
      5
    """
    num_members = validate.positive_int(num_members, "num_members")
    seed = validate.seed_int(seed)
    settings = _check_settings(epochs, batch_size, learning_rate, optimizer,
                               validation_split, verbose)
    epochs, verbose = settings["epochs"], settings["verbose"]
    network = Network.from_keras(model)
    x, y = network.check_inputs(train_x, train_y, x_name="train_x",
                                y_name="train_y")
    fit_x, fit_y, held_out = _split(x, y, settings["validation_split"])
    start = time.perf_counter()
    member_seeds = [seed + k for k in range(num_members)]
    init = [network.init_params(s) for s in member_seeds]
    params = [tf.stack(parts) for parts in zip(*init)]
    train_seeds = tf.stack([seeds.fold_in(s, 1) for s in member_seeds])
    evaluate = _evaluator(network) if held_out is not None else None
    history: list[list[dict]] = []
    diverged = {}
    tic = [time.perf_counter()]

    def on_epoch(epoch, params, metrics):
        rows = [{"accuracy": float(metrics["accuracy"][k]),
                 "loss": float(metrics["loss"][k])}
                for k in range(num_members)]
        if evaluate is not None:
            val_loss, val_acc = evaluate(params, *held_out)
            for k, row in enumerate(rows):
                row.update(val_accuracy=float(val_acc[k]),
                           val_loss=float(val_loss[k]))
        history.append(rows)
        if verbose:
            print(_epoch_line(epoch + 1, epochs, time.perf_counter() - tic[0],
                              rows), flush=True)
        tic[0] = time.perf_counter()
        bad = [k for k, row in enumerate(rows) if not math.isfinite(row["loss"])]
        if bad:
            diverged.update(member=bad[0], epoch=epoch + 1,
                            loss=rows[bad[0]]["loss"])
        return bool(bad)

    logging.info("SGD: training %d member(s) together (%d epochs)",
                 num_members, epochs)
    params = train_stack(
        network, params, fit_x, fit_y, epochs=epochs,
        batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"],
        optimizer=settings["optimizer"], seed=train_seeds, sampling="shuffle",
        dropout=True, on_epoch=on_epoch)
    params = [p.numpy() for p in params]
    for k in range(num_members):
        bad = [spec.name for spec, p in zip(network.param_specs, params)
               if not np.all(np.isfinite(p[k]))]
        if diverged.get("member") == k or bad:
            when = (f"its training loss was {diverged['loss']} after epoch "
                    f"{diverged['epoch']} of {epochs}"
                    if diverged.get("member") == k else f"after {epochs} epochs")
            weights = f"; non-finite weights in {', '.join(bad)}" if bad else ""
            raise ValueError(
                f"SGD training of member {k + 1}/{num_members} diverged: "
                f"{when}{weights}. Lower learning_rate (got "
                f"{settings['learning_rate']!r}, optimizer "
                f"{settings['optimizer']!r}) or check that the inputs are "
                "scaled.")
    finals = history[-1]
    for k, final in enumerate(finals):
        logging.info("SGD: member %d/%d done: %s", k + 1, num_members,
                     ", ".join(f"{n}={v:.4f}" for n, v in final.items()))
    metadata = {
        "method": "sgd" if num_members == 1 else "ensemble",
        "settings": {"num_members": num_members, "epochs": epochs,
                     "batch_size": settings["batch_size"],
                     "learning_rate": settings["learning_rate"],
                     "optimizer": settings["optimizer"],
                     "validation_split": settings["validation_split"],
                     "seed": seed, "num_train": int(x.shape[0])},
        "members": finals,
        "wall_time_s": time.perf_counter() - start,
    }
    return PosteriorEnsemble(network, params, metadata=metadata)


def train(model, train_x, train_y, **kwargs) -> PosteriorEnsemble:
    """Trains one deterministic network: an ensemble of size 1.

    Takes the same arguments as :func:`train_ensemble` except
    ``num_members``.

    Example:
      >>> ens = train(models.mlp((28, 28, 1), 10, (512,)), x, y, epochs=5)
      >>> ens.num_samples
      1
    """
    if "num_members" in kwargs:
        raise TypeError("train() takes no num_members; use train_ensemble().")
    return train_ensemble(model, train_x, train_y, num_members=1, **kwargs)
