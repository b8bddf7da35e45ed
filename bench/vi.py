"""VI cost: training epochs against a deterministic net, and two predictives.

Measures, in one process, on a 10k Fashion-MNIST training subset and a
784-512-10 Leaky-ReLU MLP (batch 128, Adam):

(a) seconds per training epoch (after the first, which traces) of the
    variational model with Flipout and with reparameterization layers, and
    of the same Keras 3 model trained deterministically (the baseline);
    ratios VI / deterministic;
(b) the posterior predictive on 2000 test points from S = M = 100 weight
    draws two ways: ``sample_ensemble(S).predict_proba`` (one vectorised,
    compiled call per batch) against ``predict_proba_flipout(M)`` (M passes
    of the tf_keras Flipout model); ratio flipout / ensemble.  Both estimate
    the same predictive; the accuracy of each is printed as a sanity check.

The posteriors are trained for ``1 + EPOCHS`` epochs only: a speed
measurement, not a fitted posterior.  Beside the accuracies, each
estimator's training-loss (negative ELBO) trace is checked for a plateau
(:func:`tfp_bnn_adv.studies.training.elbo_plateau`):
``convergence/<estimator>_elbo_plateaued`` and ``..._relative_change``, so
no accuracy is read as a converged posterior's.

Run: ``python -m bench.vi [--json]``.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags

from bench import common

import keras  # pylint: disable=g-import-not-at-top,wrong-import-order
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-order
import tf_keras  # pylint: disable=g-import-not-at-top,wrong-import-order

from tfp_bnn_adv import data  # pylint: disable=g-import-not-at-top
from tfp_bnn_adv import models
from tfp_bnn_adv.inference import vi
from tfp_bnn_adv.studies import training

flags.adopt_module_key_flags(common)  # --json in every --help

EPOCHS = 3
BATCH = 128
S = 100


def _epoch_seconds(base):
    """A Keras callback class (from ``base``) recording each epoch's time."""

    class EpochTimer(base):

        def __init__(self):
            super().__init__()
            self.seconds = []
            self._start = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def _vi_epoch(ds, estimator):
    post = vi.fit(models.mlp(ds.input_shape, 10, hidden=(512,)), ds.train_x,
                  ds.train_y, epochs=1, batch_size=BATCH, estimator=estimator,
                  seed=0, verbose=0)
    timer = _epoch_seconds(tf_keras.callbacks.Callback)
    more = post.variational_model.fit(ds.train_x, ds.train_y, epochs=EPOCHS,
                                      batch_size=BATCH, callbacks=[timer],
                                      verbose=0)
    losses = list(post.history.get("loss", [])) + list(more.history["loss"])
    return min(timer.seconds), post, losses


def _deterministic_epoch(ds):
    model = models.mlp(ds.input_shape, 10, hidden=(512,))
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    timer = _epoch_seconds(keras.callbacks.Callback)
    model.fit(ds.train_x, ds.train_y, epochs=EPOCHS + 1, batch_size=BATCH,
              callbacks=[timer], verbose=0)
    return min(timer.seconds[1:])


def main(argv) -> None:
    del argv
    ds = data.fashion_mnist().subset(num_train=10000, num_test=2000, seed=0)
    results = dict(common.machine_info())
    common.log("deterministic epochs")
    det = _deterministic_epoch(ds)
    results["epoch_s/deterministic"] = det
    post = None
    for estimator in vi.ESTIMATORS:
        common.log(f"VI epochs ({estimator})")
        seconds, trained, losses = _vi_epoch(ds, estimator)
        results[f"epoch_s/{estimator}"] = seconds
        results[f"epoch_ratio/{estimator}_vs_deterministic"] = seconds / det
        plateau = training.elbo_plateau(losses)
        results[f"convergence/{estimator}_epochs"] = len(losses)
        results[f"convergence/{estimator}_elbo_plateaued"] = plateau["plateaued"]
        results[f"convergence/{estimator}_elbo_relative_change"] = (
            plateau["relative_change"])
        post = post or trained

    common.log("predictives")
    x, y = ds.test_x, ds.test_y
    ens_s = common.time_call(
        lambda: post.sample_ensemble(S, seed=1).predict_proba(x), repeats=3)
    flip_s = common.time_call(
        lambda: post.predict_proba_flipout(x, num_samples=S, seed=1), repeats=3)
    results["predictive_s/ensemble"] = ens_s
    results["predictive_s/flipout"] = flip_s
    results["predictive_ratio/flipout_vs_ensemble"] = flip_s / ens_s
    results["accuracy/ensemble"] = float(np.mean(
        post.sample_ensemble(S, seed=1).predict(x) == y))
    results["accuracy/flipout"] = float(np.mean(
        post.predict_proba_flipout(x, num_samples=S, seed=1).argmax(-1) == y))
    common.report(results, common.FLAGS.json)


if __name__ == "__main__":
    app.run(main)
