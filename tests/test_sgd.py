"""SGD baseline and deep ensembles."""

import numpy as np
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


# --------------------------------------------------------------------------
# The trainer (train_stack) against an independent computation.
# --------------------------------------------------------------------------
import keras  # pylint: disable=g-import-not-at-top,wrong-import-position,wrong-import-order
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position,wrong-import-order

from tfp_bnn_adv import seeds
from tfp_bnn_adv.network import Network


def _tanh_net(dropout=None):
    layers = [keras.Input((3,)), keras.layers.Dense(4, activation="tanh")]
    if dropout is not None:
        layers.append(keras.layers.Dropout(dropout))
    return keras.Sequential(layers + [keras.layers.Dense(3)])


def _numpy_fit(w, x, y, orders, batch_size, lr, optimizer):
    """Plain float64 minibatch Adam / momentum SGD on a 3-4-3 tanh MLP."""
    w = [p.astype(np.float64) for p in w]
    m = [np.zeros_like(p) for p in w]
    v = [np.zeros_like(p) for p in w]
    t = 0
    for order in orders:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            xb, yb = x[idx].astype(np.float64), y[idx]
            h = np.tanh(xb @ w[0] + w[1])
            logits = h @ w[2] + w[3]
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            g = (p - np.eye(3)[yb]) / len(idx)  # d mean-CE / d logits
            gh = (g @ w[2].T) * (1 - h**2)
            grads = [xb.T @ gh, gh.sum(0), h.T @ g, g.sum(0)]
            t += 1
            for i, gi in enumerate(grads):
                if optimizer == "adam":
                    m[i] = 0.9 * m[i] + 0.1 * gi
                    v[i] = 0.999 * v[i] + 0.001 * gi**2
                    mhat, vhat = m[i] / (1 - 0.9**t), v[i] / (1 - 0.999**t)
                    # Keras' epsilon sits outside the bias correction of v.
                    w[i] = w[i] - lr * mhat / (
                        np.sqrt(vhat) + 1e-7 / np.sqrt(1 - 0.999**t))
                else:
                    m[i] = 0.9 * m[i] - lr * gi
                    w[i] = w[i] + m[i]
    return w


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_train_stack_matches_a_per_member_numpy_loop(optimizer):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=10).astype(np.int32)
    net = Network.from_keras(_tanh_net())
    init = net.init_params(4, num_samples=2)
    member_seeds = seeds.split(9, 2)
    # Batches of 4, 4 and 2 rows: the short last batch is a batch mean too.
    trained = sgd.train_stack(net, init, x, y, epochs=3, batch_size=4,
                              learning_rate=0.05, optimizer=optimizer,
                              seed=member_seeds, jit_compile=False)
    for k in range(2):
        shuffle_seed = tf.unstack(seeds.split(member_seeds[k], 2))[0]
        orders = [sgd.epoch_order(shuffle_seed, e, 10).numpy() for e in range(3)]
        assert all(sorted(o) == list(range(10)) for o in orders)
        assert not np.array_equal(orders[0], orders[1])
        want = _numpy_fit([p[k].numpy() for p in init], x, y, orders, 4, 0.05,
                          optimizer)
        for got, ref in zip(trained, want):
            np.testing.assert_allclose(got[k].numpy(), ref, rtol=1e-4, atol=1e-5)


def test_train_stack_lowers_the_loss_to_high_accuracy_on_blobs():
    rng = np.random.default_rng(0)
    y = np.arange(300) % 3
    x = (np.eye(3)[y] * 3 + rng.normal(size=(300, 3))).astype(np.float32)
    net = Network.from_keras(_tanh_net())
    history = []
    sgd.train_stack(net, net.init_params(0, num_samples=3), x, y, epochs=15,
                    batch_size=32, learning_rate=0.02, seed=seeds.split(1, 3),
                    on_epoch=lambda e, p, m: history.append(m))
    assert len(history) == 15
    assert np.all(history[-1]["loss"] < 0.3 * history[0]["loss"])
    assert np.all(history[-1]["accuracy"] > 0.95)


@pytest.mark.parametrize("dropout", [None, 0.3])
def test_a_member_does_not_depend_on_the_ensemble_size(dropout):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    kwargs = dict(epochs=3, batch_size=16, learning_rate=1e-2, verbose=0)
    three = sgd.train_ensemble(_tanh_net(dropout), x, y, num_members=3, seed=4,
                               **kwargs)
    two = sgd.train_ensemble(_tanh_net(dropout), x, y, num_members=2, seed=5,
                             **kwargs)
    for p, q in zip(three.params, two.params):  # members 2, 3 of 3 = 1, 2 of 2
        np.testing.assert_array_equal(p[1:].numpy(), q.numpy())
    for k in range(3):
        one = sgd.train(_tanh_net(dropout), x, y, seed=4 + k, **kwargs)
        for p, q in zip(three.params, one.params):
            if dropout is None:
                # TF multiplies a batch of one matrix with another kernel than
                # a batch of several: the same member, rounded differently.
                np.testing.assert_allclose(p[k].numpy(), q[0].numpy(),
                                           rtol=1e-5, atol=1e-6)
            else:  # dropout trains member by member: bit for bit
                np.testing.assert_array_equal(p[k].numpy(), q[0].numpy())


def test_dropout_is_active_in_training_and_reproducible():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 3)).astype(np.float32)
    y = (x[:, 1] > 0).astype(np.int32)
    kwargs = dict(epochs=2, batch_size=16, learning_rate=1e-2, seed=3, verbose=0)
    a = sgd.train(_tanh_net(0.5), x, y, **kwargs)
    b = sgd.train(_tanh_net(0.5), x, y, **kwargs)
    off = sgd.train(_tanh_net(0.0), x, y, **kwargs)  # same start, no masks
    for p, q, r in zip(a.params, b.params, off.params):
        np.testing.assert_array_equal(p.numpy(), q.numpy())
    assert not np.allclose(a.params[0].numpy(), off.params[0].numpy())


def test_validation_split_holds_out_the_last_rows(moons, capsys):
    x, y = moons.train_x, moons.train_y
    at = int(len(x) * 0.75)
    kwargs = dict(epochs=2, batch_size=32, seed=6)
    held = sgd.train(models.mlp((2,), 2, (8,)), x, y, validation_split=0.25,
                     verbose=2, **kwargs)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Epoch 1/2 - ") and len(lines) == 2
    for key in ("accuracy", "loss", "val_accuracy", "val_loss"):
        assert f" - {key}: " in lines[1]
    plain = sgd.train(models.mlp((2,), 2, (8,)), x[:at], y[:at], verbose=0,
                      **kwargs)
    for p, q in zip(held.params, plain.params):  # held-out rows never trained on
        np.testing.assert_array_equal(p.numpy(), q.numpy())
    final = held.metadata["members"][0]
    assert sorted(final) == ["accuracy", "loss", "val_accuracy", "val_loss"]
    assert final["val_accuracy"] == pytest.approx(
        np.mean(held.predict(x[at:]) == y[at:]))
    assert held.metadata["settings"]["num_train"] == len(x)
    with pytest.raises(ValueError, match="validation_split"):
        sgd.train(models.mlp((2,), 2, (8,)), x[:1], y[:1],
                  validation_split=0.5, verbose=0)  # nothing left to train on
