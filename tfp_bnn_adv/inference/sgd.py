"""Deterministic networks and deep ensembles: the non-Bayesian comparison.

:func:`train` fits one network with Keras ``fit`` and returns it as a
:class:`~tfp_bnn_adv.ensemble.PosteriorEnsemble` of size 1; :func:`train_ensemble`
fits ``K`` independently initialised copies (a deep ensemble,
Lakshminarayanan et al., 2017) and stacks them into an ensemble of size ``K``.
The user's model is never modified: each member is a clone whose weights are
drawn statelessly from its layers' initialisers.
"""

from __future__ import annotations

import math
import numbers
import time

from absl import logging
import numpy as np

from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.network import Network
from tfp_bnn_adv.network import check_positive_float
from tfp_bnn_adv.network import check_positive_int

__all__ = ["train", "train_ensemble"]

_OPTIMIZERS = ("adam", "sgd")


def _check_settings(epochs, batch_size, learning_rate, optimizer,
                    validation_split, verbose) -> dict:
    """The settings as plain Python values, or a clear error for a bad one.

    Numpy scalars (``np.int64(10)``, ``np.float32(1e-3)``) are accepted.
    """
    if not isinstance(optimizer, str) or optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got "
                         f"{optimizer!r}.")
    if isinstance(validation_split, (bool, np.bool_)) or not isinstance(
            validation_split, numbers.Real):
        raise TypeError(f"validation_split must be a real number, got "
                        f"{validation_split!r}.")
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got "
                         f"{validation_split!r}.")
    if verbose not in (0, 1, 2, "auto") or isinstance(verbose, (bool, np.bool_)):
        raise ValueError(f"verbose must be 0, 1, 2 or 'auto', got {verbose!r}.")
    return {"epochs": check_positive_int(epochs, "epochs"),
            "batch_size": check_positive_int(batch_size, "batch_size"),
            "learning_rate": check_positive_float(learning_rate,
                                                  "learning_rate"),
            "optimizer": optimizer,
            "validation_split": float(validation_split),
            "verbose": verbose if isinstance(verbose, str) else int(verbose)}


def _fit_member(network: Network, train_x, train_y, *, epochs, batch_size,
                learning_rate, optimizer, validation_split, seed, verbose,
                member):
    """Trains one clone; raises if its loss or weights stop being finite."""
    import keras  # pylint: disable=g-import-not-at-top
    # Keras shuffling and dropout draw from the global seed; fixing it per
    # member makes every member reproducible on its own.
    keras.utils.set_random_seed(int(seed))
    model = keras.models.clone_model(network.keras_model)
    # Supported layers hold only trainable weights, in Network order.
    model.set_weights([p.numpy() for p in network.init_params(seed)])
    from_logits = network.stripped_output_activation != "softmax"
    opt = (keras.optimizers.Adam(learning_rate) if optimizer == "adam"
           else keras.optimizers.SGD(learning_rate, momentum=0.9))
    model.compile(optimizer=opt,
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=from_logits),
                  metrics=["accuracy"])
    diverged = {}

    def stop_on_non_finite_loss(epoch, logs):
        # Epoch-end only: a per-batch hook would make Keras sync every step.
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            diverged.update(epoch=epoch + 1, loss=float(loss))
            model.stop_training = True

    history = model.fit(
        train_x, train_y, epochs=epochs, batch_size=batch_size,
        validation_split=validation_split, shuffle=True, verbose=verbose,
        callbacks=[keras.callbacks.LambdaCallback(
            on_epoch_end=stop_on_non_finite_loss)])
    params = [w.numpy() for w in model.trainable_weights]
    bad = [w.path for w, p in zip(model.trainable_weights, params)
           if not np.all(np.isfinite(p))]
    if diverged or bad:
        when = (f"its training loss was {diverged['loss']} after epoch "
                f"{diverged['epoch']} of {epochs}" if diverged
                else f"after {epochs} epochs")
        weights = f"; non-finite weights in {', '.join(bad)}" if bad else ""
        raise ValueError(
            f"SGD training of member {member} diverged: {when}{weights}. "
            f"Lower learning_rate (got {learning_rate!r}, optimizer "
            f"{optimizer!r}) or check that the inputs are scaled.")
    final = {k: float(v[-1]) for k, v in history.history.items()}
    return params, final


def train_ensemble(model, train_x, train_y, *, num_members: int = 5,
                   epochs: int = 10, batch_size: int = 128,
                   learning_rate: float = 1e-3, optimizer: str = "adam",
                   validation_split: float = 0.0, seed: int = 0,
                   verbose: int = 1) -> PosteriorEnsemble:
    """Trains ``num_members`` independently initialised networks.

    Args:
      model: a built Keras 3 model accepted by
        :meth:`~tfp_bnn_adv.network.Network.from_keras` (not modified).
      train_x: float inputs ``[N, *input_shape]``, scaled as the model
        expects (integer or far-out-of-range inputs are used as given, with
        a :class:`~tfp_bnn_adv.network.UnscaledInputWarning`).
      train_y: int labels ``[N]`` in ``[0, C)``.
      num_members: ensemble size ``K`` (1 gives a deterministic network).
      epochs: passes over the training data.
      batch_size: minibatch size.
      learning_rate: optimiser step size.
      optimizer: ``"adam"`` or ``"sgd"`` (with momentum 0.9).
      validation_split: fraction of the training data held out for
        validation curves (never the test set).
      seed: member ``k`` uses seed ``seed + k`` for its initial weights and
        data order.
      verbose: Keras progress output (0 silent, 1 progress bar, 2 per epoch).

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
    num_members = check_positive_int(num_members, "num_members")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
    seed = int(seed)
    settings = _check_settings(epochs, batch_size, learning_rate, optimizer,
                               validation_split, verbose)
    epochs = settings["epochs"]
    network = Network.from_keras(model)
    x, y = network.check_inputs(train_x, train_y, x_name="train_x",
                                y_name="train_y")
    x, y = x.numpy(), y.numpy()
    members, finals = [], []
    start = time.perf_counter()
    for k in range(num_members):
        logging.info("SGD: training member %d/%d (%d epochs)", k + 1,
                     num_members, epochs)
        params, final = _fit_member(
            network, x, y, **settings, seed=seed + k,
            member=f"{k + 1}/{num_members}")
        members.append(params)
        finals.append(final)
        logging.info("SGD: member %d/%d done: %s", k + 1, num_members,
                     ", ".join(f"{n}={v:.4f}" for n, v in final.items()))
    stacked = [np.stack([m[i] for m in members]) for i in range(len(members[0]))]
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
    return PosteriorEnsemble(network, stacked, metadata=metadata)


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
