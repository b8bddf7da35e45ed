"""Unscaled inputs (integer pixels, values far outside [0, 1]) warn once.

The check is shared: ``Network.check_inputs`` runs it for prediction
(``PosteriorEnsemble.logits`` / ``predict_proba``), for SGD training and for
every other public entry point; each calling line warns once per process.
"""

import warnings

import keras  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from tfp_bnn_adv import network as network_lib  # pylint: disable=wrong-import-position
from tfp_bnn_adv.ensemble import PosteriorEnsemble  # pylint: disable=wrong-import-position
from tfp_bnn_adv.inference import sgd  # pylint: disable=wrong-import-position

L = keras.layers


@pytest.fixture(autouse=True)
def _fresh_warning_sites(monkeypatch):
    """Every test starts as a fresh process would: no site has warned yet."""
    monkeypatch.setattr(network_lib, "_UNSCALED_WARNED", set())


def _ensemble():
    model = keras.Sequential([keras.Input((3, 3, 1)), L.Flatten(),
                              L.Dense(4, activation="relu"), L.Dense(2)])
    net = network_lib.Network.from_keras(model)
    return PosteriorEnsemble(net, net.init_params(seed=0, num_samples=2))


def _unscaled(record):
    return [w for w in record
            if issubclass(w.category, network_lib.UnscaledInputWarning)]


def _pixels(dtype=np.uint8):
    return np.random.default_rng(0).integers(0, 256, (4, 3, 3, 1)).astype(dtype)


def test_integer_pixels_warn_once_per_calling_line():
    ens = _ensemble()
    x = _pixels()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            ens.predict_proba(x)
        ens.logits(x)
    found = _unscaled(record)
    # predict_proba warned once in three calls; logits is another line.
    assert len(found) == 2, [str(w.message) for w in found]
    message = str(found[0].message)
    assert "x has an integer dtype and values in [" in message
    assert "255" in message and "UnscaledInputWarning" in message
    assert found[0].filename.endswith("ensemble.py")


@pytest.mark.parametrize("make", [
    lambda: _pixels(np.float32),                    # float 0..255
    lambda: tf.constant(_pixels(np.float32) - 300.0),  # a tensor, far below 0
    lambda: tf.constant(_pixels(np.int32)),        # an integer tensor
])
def test_far_out_of_range_values_warn(make):
    with pytest.warns(network_lib.UnscaledInputWarning, match="x has"):
        _ensemble().predict_proba(make())


@pytest.mark.parametrize("make", [
    lambda: np.random.default_rng(1).uniform(size=(4, 3, 3, 1)),
    lambda: np.random.default_rng(1).normal(size=(4, 3, 3, 1)),  # standardised
    lambda: np.random.default_rng(1).integers(0, 2, (4, 3, 3, 1)),  # binary ints
])
def test_scaled_inputs_do_not_warn(make):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _ensemble().predict_proba(make())
    assert not _unscaled(record)


def test_sgd_training_on_integer_pixels_warns_naming_train_x():
    model = keras.Sequential([keras.Input((3, 3, 1)), L.Flatten(), L.Dense(2)])
    x = _pixels()
    y = np.array([0, 1, 0, 1])
    with pytest.warns(network_lib.UnscaledInputWarning,
                      match="train_x has an integer dtype"):
        sgd.train(model, x, y, epochs=1, batch_size=4, verbose=0)
