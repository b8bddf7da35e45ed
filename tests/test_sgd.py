"""SGD baseline and deep ensembles."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from tfp_bnn_adv import data  # pylint: disable=wrong-import-position
from tfp_bnn_adv import models  # pylint: disable=wrong-import-position
from tfp_bnn_adv.inference import sgd  # pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def moons():
    return data.half_moons(600, noise=0.1, seed=0)


def test_deterministic_network_fits_half_moons(moons):
    model = models.mlp((2,), 2, (32, 32))
    before = [w.numpy().copy() for w in model.trainable_weights]
    ens = sgd.train(model, moons.train_x, moons.train_y, epochs=60,
                    batch_size=32, learning_rate=1e-2, seed=1, verbose=0)
    assert ens.num_samples == 1 and ens.metadata["method"] == "sgd"
    # A linear boundary gets ~0.88 on moons; the net must bend it.
    preds = ens.predict(moons.test_x)
    assert np.mean(preds == moons.test_y) >= 0.95
    for w, b in zip(model.trainable_weights, before):  # user's model untouched
        np.testing.assert_array_equal(w.numpy(), b)


def test_deep_ensemble_members_differ_and_are_reproducible(moons):
    kwargs = dict(num_members=2, epochs=2, batch_size=64, seed=5, verbose=0)
    a = sgd.train_ensemble(models.mlp((2,), 2, (8,)), moons.train_x, moons.train_y, **kwargs)
    b = sgd.train_ensemble(models.mlp((2,), 2, (8,)), moons.train_x, moons.train_y, **kwargs)
    assert a.num_samples == 2 and a.metadata["method"] == "ensemble"
    assert not np.allclose(a.params[0][0].numpy(), a.params[0][1].numpy())
    for p, q in zip(a.params, b.params):
        np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=1e-6, atol=1e-7)


def test_bad_settings(moons):
    model = models.mlp((2,), 2, (8,))
    x, y = moons.train_x, moons.train_y
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        sgd.train(model, x, y, epochs=0)
    with pytest.raises(ValueError, match="learning_rate"):
        sgd.train(model, x, y, learning_rate=-1.0)
    with pytest.raises(ValueError, match="num_members must be >= 1"):
        sgd.train_ensemble(model, x, y, num_members=0)
    with pytest.raises(ValueError, match="optimizer"):
        sgd.train(model, x, y, optimizer="lbfgs")
    with pytest.raises(ValueError, match="train_y has 3 labels"):
        sgd.train(model, x, y[:3])
    with pytest.raises(TypeError, match="num_members"):
        sgd.train(model, x, y, num_members=3)


def test_numpy_scalars_are_accepted_as_settings(moons):
    ens = sgd.train(models.mlp((2,), 2, (8,)), moons.train_x, moons.train_y,
                    epochs=np.int64(1), batch_size=np.int32(64),
                    learning_rate=np.float32(1e-3), validation_split=np.float64(0.1),
                    seed=np.int64(2), verbose=0)
    settings = ens.metadata["settings"]
    assert settings["learning_rate"] == pytest.approx(1e-3)
    for key in ("epochs", "batch_size", "seed"):
        assert type(settings[key]) is int, key
    assert type(settings["learning_rate"]) is float


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(learning_rate=float("inf")), ValueError, "learning_rate must be a finite number > 0, got inf"),
    (dict(learning_rate=np.float32("nan")), ValueError, "learning_rate must be a finite"),
    (dict(learning_rate=0.0), ValueError, "learning_rate must be a finite number > 0"),
    (dict(learning_rate="1e-3"), TypeError, "learning_rate must be a real number"),
    (dict(learning_rate=True), TypeError, "learning_rate must be a real number"),
    (dict(epochs=2.0), TypeError, "epochs must be an int"),
    (dict(batch_size=np.int64(0)), ValueError, "batch_size must be >= 1"),
    (dict(validation_split="0.1"), TypeError, "validation_split must be a real"),
    (dict(verbose=5), ValueError, r"verbose must be one of \(0, 1, 2, 'auto'\)"),
])
def test_bad_numeric_settings_fail_before_training(moons, kwargs, error, match):
    with pytest.raises(error, match=match):
        sgd.train(models.mlp((2,), 2, (8,)), moons.train_x, moons.train_y,
                  epochs=kwargs.pop("epochs", 1), **kwargs)


def test_diverging_training_fails_naming_the_epoch(moons):
    # A huge plain-SGD step overflows the weights within the first epoch.
    with pytest.raises(ValueError, match=r"member 1/1 diverged: its training "
                       r"loss was nan after epoch 1 of 3; non-finite weights "
                       r"in .*kernel.*learning_rate"):
        sgd.train(models.mlp((2,), 2, (16,)), moons.train_x, moons.train_y,
                  epochs=3, batch_size=16, learning_rate=1e30, optimizer="sgd",
                  verbose=0)
