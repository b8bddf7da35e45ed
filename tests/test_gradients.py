"""Ensemble input gradients against per-sample loops and finite differences."""

import keras
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from tfp_bnn_adv import gradients  # pylint: disable=wrong-import-position
from tfp_bnn_adv.ensemble import PosteriorEnsemble  # pylint: disable=wrong-import-position
from tfp_bnn_adv.network import Network  # pylint: disable=wrong-import-position

L = keras.layers
S = 7


def _mlp(dtype="float32"):
    return keras.Sequential([keras.Input((5,), dtype=dtype),
                             L.Dense(9, activation="tanh", dtype=dtype),
                             L.Dense(7, activation="softplus", dtype=dtype),
                             L.Dense(3, dtype=dtype)])


def _cnn(dtype="float32"):
    return keras.Sequential([
        keras.Input((7, 7, 2), dtype=dtype),
        L.Conv2D(3, 3, activation="tanh", dtype=dtype),
        L.AveragePooling2D(2, dtype=dtype),
        L.Conv2D(4, 2, padding="same", activation="softplus", dtype=dtype),
        L.Flatten(dtype=dtype), L.Dense(3, dtype=dtype)])


BUILDERS = {"mlp": (_mlp, (5,)), "cnn": (_cnn, (7, 7, 2))}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def case(request):
    build, in_shape = BUILDERS[request.param]
    net = Network.from_keras(build())
    ens = PosteriorEnsemble(net, net.init_params(seed=11, num_samples=S))
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(4,) + in_shape).astype(np.float32)
    y = np.array([0, 1, 2, 1])
    # An independent float64 Keras copy per sample, for loops and FD.
    ref_models = []
    for s in range(S):
        m = build("float64")
        m.set_weights([p[s].numpy().astype(np.float64) for p in ens.params])
        ref_models.append(m)
    return ens, x, y, ref_models


def _loop_gradients(models, x, y):
    """Per-sample CE gradients with one GradientTape per Keras model."""
    grads = []
    for m in models:
        xt = tf.constant(x, tf.float64)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = tf.reduce_sum(
                tf.nn.sparse_softmax_cross_entropy_with_logits(y, m(xt)))
        grads.append(tape.gradient(loss, xt).numpy())
    return np.stack(grads)


def _predictive_loss(models, x, y):
    probs = np.mean([tf.nn.softmax(m(tf.constant(x, tf.float64))).numpy()
                     for m in models], axis=0)
    return -np.log(probs[np.arange(len(y)), y])


@pytest.mark.parametrize("chunk_size", [None, 1, 3, S])
@pytest.mark.parametrize("jit", [False, True])
def test_gradients_equal_a_per_sample_loop(case, chunk_size, jit):
    ens, x, y, models = case
    ref = _loop_gradients(models, x, y)
    per = gradients.per_sample_loss_gradients(ens, x, y, chunk_size=chunk_size,
                                              jit_compile=jit)
    exp = gradients.expected_loss_gradient(ens, x, y, chunk_size=chunk_size,
                                           jit_compile=jit)
    assert per.shape == (S,) + x.shape and exp.shape == x.shape
    np.testing.assert_allclose(per, ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(exp, ref.mean(axis=0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, S])
@pytest.mark.parametrize("jit", [False, True])
def test_predictive_gradient_equals_the_gradient_of_a_loop(case, chunk_size, jit):
    ens, x, y, models = case
    xt = tf.constant(x, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        probs = tf.reduce_mean(tf.stack([tf.nn.softmax(m(xt)) for m in models]), 0)
        loss = -tf.reduce_sum(tf.math.log(tf.gather(probs, y, batch_dims=1)))
    ref = tape.gradient(loss, xt).numpy()
    got = gradients.predictive_loss_gradient(ens, x, y, chunk_size=chunk_size,
                                             jit_compile=jit)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_gradients_match_finite_differences(case):
    ens, x, y, models = case
    exp = gradients.expected_loss_gradient(ens, x, y, chunk_size=2)
    pred = gradients.predictive_loss_gradient(ens, x, y, chunk_size=2)
    rng = np.random.default_rng(1)
    h = 1e-5
    flat_size = int(np.prod(x.shape[1:]))
    for b in range(x.shape[0]):
        for k in rng.choice(flat_size, size=4, replace=False):
            idx = (b,) + np.unravel_index(k, x.shape[1:])
            xp, xm = x.astype(np.float64), x.astype(np.float64)
            xp[idx] += h
            xm[idx] -= h

            def mean_ce(xx):
                return np.mean([tf.nn.sparse_softmax_cross_entropy_with_logits(
                    y, m(tf.constant(xx))).numpy()[b] for m in models])

            fd_exp = (mean_ce(xp) - mean_ce(xm)) / (2 * h)
            fd_pred = (_predictive_loss(models, xp, y)[b] -
                       _predictive_loss(models, xm, y)[b]) / (2 * h)
            np.testing.assert_allclose(exp[idx], fd_exp, rtol=2e-3, atol=2e-5)
            np.testing.assert_allclose(pred[idx], fd_pred, rtol=2e-3, atol=2e-5)


def test_predictive_equals_expected_for_one_sample(case):
    ens, x, y, _ = case
    one = ens[2]
    np.testing.assert_allclose(gradients.predictive_loss_gradient(one, x, y),
                               gradients.expected_loss_gradient(one, x, y),
                               rtol=1e-5, atol=1e-7)


def test_predictive_is_stable_for_confident_members():
    # Logits of +-200 overflow a naive softmax average; log-sum-exp does not.
    model = keras.Sequential([keras.Input((2,)), L.Dense(2)])
    net = Network.from_keras(model)
    kernels = np.array([[[100., -100.], [0., 0.]], [[-100., 100.], [0., 0.]]],
                       np.float32)
    ens = PosteriorEnsemble(net, [kernels, np.zeros((2, 2), np.float32)])
    x = np.array([[1.0, 0.5]], np.float32)
    g = gradients.predictive_loss_gradient(ens, x, [0], chunk_size=1)
    # Member 0 gives p(0) ~ 1, member 1 gives p(0) ~ e^-400: the mixture's
    # gradient is member 0's, which is ~0 (it is already certain).
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, 0.0, atol=1e-6)


def test_labels_default_to_the_ensembles_prediction(case):
    ens, x, _, _ = case
    y_hat = ens.predict(x)
    np.testing.assert_allclose(gradients.expected_loss_gradient(ens, x),
                               gradients.expected_loss_gradient(ens, x, y_hat),
                               rtol=1e-4, atol=1e-7)


def test_large_sample_count_is_chunked_and_batched():
    model = keras.Sequential([keras.Input((3,)), L.Dense(4, activation="tanh"),
                              L.Dense(2)])
    net = Network.from_keras(model)
    ens = PosteriorEnsemble(net, net.init_params(0, num_samples=1000))
    x = np.random.default_rng(2).uniform(size=(10, 3)).astype(np.float32)
    y = np.arange(10) % 2
    full = gradients.expected_loss_gradient(ens, x, y, chunk_size=1000)
    chunked = gradients.expected_loss_gradient(ens, x, y, chunk_size=64,
                                               batch_size=3)
    np.testing.assert_allclose(chunked, full, rtol=1e-4, atol=1e-7)
    pred_full = gradients.predictive_loss_gradient(ens, x, y, chunk_size=1000)
    pred_chunked = gradients.predictive_loss_gradient(ens, x, y, chunk_size=64)
    np.testing.assert_allclose(pred_chunked, pred_full, rtol=1e-4, atol=1e-7)


def test_bad_arguments_are_rejected(case):
    ens, x, y, _ = case
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        gradients.expected_loss_gradient(ens, x, y, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        gradients.predictive_loss_gradient(ens, x, y, chunk_size=2.5)
    with pytest.raises(ValueError, match="x has shape"):
        gradients.expected_loss_gradient(ens, x[..., :1], y)
    with pytest.raises(ValueError, match="label 3 outside"):
        gradients.per_sample_loss_gradients(ens, x, [0, 1, 2, 3])
    with pytest.raises(TypeError, match="PosteriorEnsemble"):
        gradients.expected_loss_gradient(ens.network, x, y)
