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
