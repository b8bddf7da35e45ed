"""Tests of tfp_bnn_adv.attacks against closed forms, finite differences and
independent loop implementations."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfp_bnn_adv import attacks
from tfp_bnn_adv import data
from tfp_bnn_adv import gradients
from tfp_bnn_adv import models
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.network import Network

JIT = False  # TF default kernels: fast to trace; XLA has its own test below.
LO, HI = 0.1, 0.9  # a data range that is not [0, 1], so clipping shows


# --------------------------------------------------------------------------
# Independent numpy references.
# --------------------------------------------------------------------------
def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def mlp_logits(params, x):
    """numpy forward of a Dense/leaky-ReLU(0.2) MLP, one weight set."""
    h = x.reshape(x.shape[0], -1).astype(np.float64)
    layers = list(zip(params[::2], params[1::2]))
    for i, (w, b) in enumerate(layers):
        h = h @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
        if i < len(layers) - 1:
            h = np.where(h > 0, h, 0.2 * h)
    return h


def expected_loss(ens, x, y):
    """Per example ``(1/S) sum_s CE_s``, float64."""
    losses = []
    for s in range(ens.num_samples):
        p = softmax(mlp_logits([t[s].numpy() for t in ens.params], x))
        losses.append(-np.log(p[np.arange(len(y)), y]))
    return np.mean(losses, axis=0)


def predictive_loss(ens, x, y):
    """Per example ``-log (1/S) sum_s softmax_s[y]``, float64."""
    p = np.mean([softmax(mlp_logits([t[s].numpy() for t in ens.params], x))
                 for s in range(ens.num_samples)], axis=0)
    return -np.log(p[np.arange(len(y)), y])


def finite_difference(loss, x, h=1e-4):
    """Central differences of ``loss(x) -> [B]`` per example, float64."""
    x = x.astype(np.float64)
    flat = x.reshape(x.shape[0], -1)
    grad = np.zeros_like(flat)
    for i in range(flat.shape[1]):
        up, down = flat.copy(), flat.copy()
        up[:, i] += h
        down[:, i] -= h
        grad[:, i] = (loss(up.reshape(x.shape)) - loss(down.reshape(x.shape))) / (2 * h)
    return grad.reshape(x.shape)


def distance(x_adv, x, norm):
    d = (x_adv.astype(np.float64) - x.astype(np.float64)).reshape(len(x), -1)
    return np.abs(d).max(axis=1) if norm == np.inf else np.linalg.norm(d, axis=1)


def predictive(ens, x):
    """Posterior predictive from per-sample logits, in numpy."""
    return softmax(ens.logits(x).astype(np.float64)).mean(axis=0)


def wrong_and_loss(ens, x, y):
    p = predictive(ens, x)
    return p.argmax(axis=1) != y, -np.log(p[np.arange(len(y)), y])


# --------------------------------------------------------------------------
# Fixtures.
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    """A 3-sample MLP on 4x4x1 images, inputs inside [LO, HI]."""
    net = Network.from_keras(models.mlp((4, 4, 1), 3, hidden=(8,)))
    ens = PosteriorEnsemble(net, net.init_params(seed=1, num_samples=3))
    x = np.random.default_rng(0).uniform(LO, HI, (7, 4, 4, 1)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 7).astype(np.int32)
    return ens, x, y


@pytest.fixture(scope="module")
def fashion():
    """A deterministic 784-64-10 MLP trained briefly on Fashion-MNIST."""
    ds = data.fashion_mnist().subset(num_train=3000, num_test=100, seed=0)
    keras.utils.set_random_seed(0)
    model = models.mlp(ds.input_shape, 10, hidden=(64,))
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(ds.train_x, ds.train_y, epochs=4, batch_size=64, verbose=0)
    ens = PosteriorEnsemble.from_keras(model)
    return ens, model, ds.test_x, ds.test_y


def linear_ensemble(num_samples, dim=5, classes=3, seed=0):
    net = Network.from_keras(keras.Sequential([keras.Input((dim,)),
                                               keras.layers.Dense(classes)]))
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(num_samples, dim, classes)).astype(np.float32)
    b = rng.normal(size=(num_samples, classes)).astype(np.float32)
    return PosteriorEnsemble(net, [w, b]), w.astype(np.float64), b.astype(np.float64)


# --------------------------------------------------------------------------
# The threat set: eps = 0, the ball, the data range.
# --------------------------------------------------------------------------
def _all_attacks():
    cases = []
    for name, fn in (("fgsm", attacks.fgsm), ("pgd", attacks.pgd)):
        for norm in attacks.NORMS:
            for g in attacks.GRADIENTS:
                kw = dict(norm=norm, gradient=g)
                if name == "pgd":
                    kw.update(steps=4, restarts=2)
                cases.append(pytest.param(fn, kw, norm, id=f"{name}-{norm}-{g}"))
    for kind in attacks.RANDOM_KINDS:
        cases.append(pytest.param(attacks.random_attack, dict(kind=kind, trials=2),
                                  np.inf, id=f"random-{kind}"))
    cases.append(pytest.param(attacks.square_attack, dict(max_queries=30),
                              np.inf, id="square"))
    return cases


@pytest.mark.parametrize("attack, kwargs, norm", _all_attacks())
def test_threat_set(small, attack, kwargs, norm):
    ens, x, y = small
    same = attack(ens, x, y, eps=0.0, clip=(LO, HI), jit_compile=JIT, **kwargs)
    assert same.dtype == np.float32 and same.shape == x.shape
    np.testing.assert_array_equal(same, x)
    eps = 0.3 if norm == np.inf else 0.8
    x_adv = attack(ens, x, y, eps=eps, clip=(LO, HI), seed=3, jit_compile=JIT,
                   **kwargs)
    assert x_adv.dtype == np.float32 and x_adv.shape == x.shape
    assert np.all(distance(x_adv, x, norm) <= eps + 1e-6)
    assert x_adv.min() >= LO and x_adv.max() <= HI
    # The attack moved the points, and far enough to meet the data range.
    assert distance(x_adv, x, norm).max() > 0.5 * eps
    assert np.isclose(x_adv, LO).any() or np.isclose(x_adv, HI).any()


@pytest.mark.parametrize("norm, eps", [(np.inf, 0.1), (2, 2.0)])
def test_pgd_ball_in_784_dimensions(fashion, norm, eps):
    ens, _, x, y = fashion
    x_adv = attacks.pgd(ens, x[:50], y[:50], eps=eps, norm=norm, steps=10,
                        jit_compile=JIT)
    dist = distance(x_adv, x[:50], norm)
    assert np.all(dist <= eps + 1e-6)
    assert np.median(dist) > 0.9 * eps  # the attack does use the ball
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_clip_none_leaves_the_data_range(small):
    ens, x, y = small
    x_adv = attacks.fgsm(ens, x, y, eps=0.3, clip=None, jit_compile=JIT)
    assert x_adv.max() > HI + 0.1 or x_adv.min() < LO - 0.1
    assert np.all(distance(x_adv, x, np.inf) <= 0.3 + 1e-6)


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("attack, kwargs, error, match", [
    (attacks.fgsm, dict(eps=0.1, norm=1), ValueError, "norm"),
    (attacks.pgd, dict(eps=0.1, norm="inf"), ValueError, "norm"),
    (attacks.fgsm, dict(eps=-0.1), ValueError, "eps"),
    (attacks.pgd, dict(eps=float("nan")), ValueError, "eps"),
    (attacks.random_attack, dict(eps=-1.0), ValueError, "eps"),
    (attacks.square_attack, dict(eps=-0.5), ValueError, "eps"),
    (attacks.fgsm, dict(), TypeError, "eps"),
    (attacks.pgd, dict(eps="0.1"), TypeError, "eps"),
    (attacks.pgd, dict(eps=0.1, steps=0), ValueError, "steps"),
    (attacks.pgd, dict(eps=0.1, steps=2.5), TypeError, "steps"),
    (attacks.pgd, dict(eps=0.1, restarts=0), ValueError, "restarts"),
    (attacks.pgd, dict(eps=0.1, step_size=-1.0), ValueError, "step_size"),
    (attacks.pgd, dict(eps=0.1, random_start=1), TypeError, "random_start"),
    (attacks.random_attack, dict(eps=0.1, trials=0), ValueError, "trials"),
    (attacks.random_attack, dict(eps=0.1, kind="gauss"), ValueError, "kind"),
    (attacks.fgsm, dict(eps=0.1, gradient="mean"), ValueError, "gradient"),
    (attacks.pgd, dict(eps=0.1, gradient=None), ValueError, "gradient"),
    (attacks.square_attack, dict(eps=0.1, max_queries=0), ValueError, "max_queries"),
    (attacks.square_attack, dict(eps=0.1, p_init=0.0), ValueError, "p_init"),
    (attacks.fgsm, dict(eps=0.1, clip=(1.0, 0.0)), ValueError, "clip"),
    (attacks.fgsm, dict(eps=0.1, clip=0.5), TypeError, "clip"),
    (attacks.fgsm, dict(eps=0.1, clip=(0.5, 1.0)), ValueError, "clip"),
    (attacks.fgsm, dict(eps=0.1, seed="a"), (TypeError, ValueError), "seed"),
    (attacks.pgd, dict(eps=0.1, seed=None), (TypeError, ValueError), "seed"),
    (attacks.fgsm, dict(eps=0.1, chunk_size=0), ValueError, "chunk_size"),
])
def test_bad_arguments_raise(small, attack, kwargs, error, match):
    ens, x, y = small
    with pytest.raises(error, match=match):
        attack(ens, x, y, jit_compile=JIT, **kwargs)


def test_bad_data_raises(small):
    ens, x, y = small
    with pytest.raises(ValueError, match="y has 6 labels"):
        attacks.pgd(ens, x, y[:6], eps=0.1)
    with pytest.raises(ValueError, match="x has shape"):
        attacks.fgsm(ens, x.reshape(7, 16), y, eps=0.1)
    with pytest.raises(ValueError, match="label 3 outside"):
        attacks.random_attack(ens, x, np.full(7, 3), eps=0.1)
    with pytest.raises(TypeError, match="ensemble"):
        attacks.square_attack(ens.network, x, y, eps=0.1)


# --------------------------------------------------------------------------
# FGSM against closed forms and finite differences.
# --------------------------------------------------------------------------
def linear_gradients(w, b, x, y):
    """Closed-form input gradients of a linear softmax ensemble.

    Per sample, ``grad_x CE_s = W_s (p_s - onehot(y))``; the predictive
    gradient is ``sum_s p_s[y] grad_x CE_s / sum_s p_s[y]``.
    """
    x = x.astype(np.float64)
    onehot = np.eye(w.shape[2])[y]
    p = softmax(np.einsum("bd,sdc->sbc", x, w) + b[:, None])     # [S, B, C]
    per_sample = np.einsum("sdc,sbc->sbd", w, p - onehot)          # [S, B, D]
    p_y = p[:, np.arange(len(y)), y]                               # [S, B]
    predictive = np.einsum("sb,sbd->bd", p_y, per_sample) / p_y.sum(0)[:, None]
    return per_sample, per_sample.mean(axis=0), predictive


def fgsm_step(x, g, eps, norm):
    if norm == np.inf:
        return np.clip(x + eps * np.sign(g), 0.0, 1.0)
    return np.clip(x + eps * g / np.linalg.norm(g, axis=1, keepdims=True), 0, 1)


@pytest.mark.parametrize("norm", attacks.NORMS)
def test_fgsm_linear_model_closed_form(norm):
    ens, w, b = linear_ensemble(num_samples=3)
    rng = np.random.default_rng(2)
    x = rng.uniform(0.3, 0.7, (6, 5)).astype(np.float32)
    y = rng.integers(0, 3, 6)
    per_sample, expected, predictive_g = linear_gradients(w, b, x, y)
    eps = 0.1
    for gradient, g in (("expected", expected), ("predictive", predictive_g)):
        x_adv = attacks.fgsm(ens, x, y, eps=eps, norm=norm, gradient=gradient,
                             jit_compile=JIT)
        np.testing.assert_allclose(x_adv, fgsm_step(x, g, eps, norm), atol=1e-5)
    # "sample": the whole batch follows one posterior sample's gradient.
    drawn = set()
    for seed in range(8):
        x_adv = attacks.fgsm(ens, x, y, eps=eps, norm=norm, gradient="sample",
                             seed=seed, jit_compile=JIT)
        matches = [s for s in range(3) if np.allclose(
            x_adv, fgsm_step(x, per_sample[s], eps, norm), atol=1e-5)]
        assert len(matches) == 1
        drawn.add(matches[0])
    assert len(drawn) >= 2


def test_fgsm_matches_finite_difference_sign():
    net = Network.from_keras(models.mlp((3,), 2, hidden=(4,)))
    ens = PosteriorEnsemble(net, net.init_params(seed=4, num_samples=2))
    rng = np.random.default_rng(5)
    x = rng.uniform(0.2, 0.8, (5, 3)).astype(np.float32)
    y = rng.integers(0, 2, 5)
    for gradient, loss in (("expected", expected_loss),
                           ("predictive", predictive_loss)):
        fd = finite_difference(lambda v, loss=loss: loss(ens, v, y), x)
        assert np.abs(fd).min() > 1e-5  # signs are well defined
        x_adv = attacks.fgsm(ens, x, y, eps=0.05, gradient=gradient,
                             jit_compile=JIT)
        np.testing.assert_allclose(x_adv, np.clip(x + 0.05 * np.sign(fd), 0, 1),
                                   atol=1e-6)


def test_zero_and_tiny_gradients():
    # Zero kernel: the loss does not depend on x, so no step and no NaN.
    ens, _, _ = linear_ensemble(num_samples=2)
    zero = PosteriorEnsemble(ens.network, [tf.zeros_like(ens.params[0]),
                                           ens.params[1]])
    x = np.full((3, 5), 0.5, np.float32)
    for norm in attacks.NORMS:
        np.testing.assert_array_equal(
            attacks.fgsm(zero, x, eps=0.1, norm=norm, jit_compile=JIT), x)
    # A kernel of 1e-30: the squared gradient underflows in float32, yet the
    # normalised L2 step still has length eps.
    tiny = PosteriorEnsemble(ens.network, [ens.params[0] * 1e-30, ens.params[1]])
    assert np.all(np.abs(gradients.expected_loss_gradient(tiny, x)) < 1e-25)
    x_adv = attacks.fgsm(tiny, x, eps=0.1, norm=2, jit_compile=JIT)
    np.testing.assert_allclose(distance(x_adv, x, 2), 0.1, rtol=1e-4)


# --------------------------------------------------------------------------
# The paper's mechanism in miniature: two members with opposite gradients.
# --------------------------------------------------------------------------
def test_opposite_members_cancel_expected_not_predictive():
    """Member 1 has logit gap z1 = w.x + b1, member 2 z2 = -c w.x + b2.

    With y = 1, grad_x CE_s = -(1 - sigmoid(z_s)) w_s.  Choosing
    c = (1 - sigmoid(z1)) / (1 - sigmoid(z2)) at x0 cancels the expected
    gradient exactly; as the members differ in confidence (z1 = 1, z2 = 3),
    the predictive gradient is -(1 - s1)(s1 - s2) w / (s1 + s2) != 0.
    """
    sig = lambda z: 1 / (1 + np.exp(-z))  # pylint: disable=unnecessary-lambda-assignment
    w = np.array([1.0, -2.0, 0.5])
    x0 = np.full((1, 3), 0.5)
    z1, z2 = 1.0, 3.0
    s1, s2 = sig(z1), sig(z2)
    c = (1 - s1) / (1 - s2)
    kernels = np.zeros((2, 3, 2))
    kernels[0, :, 1], kernels[1, :, 1] = w, -c * w
    biases = np.zeros((2, 2))
    biases[0, 1] = z1 - w @ x0[0]
    biases[1, 1] = z2 + c * w @ x0[0]
    net = Network.from_keras(keras.Sequential([keras.Input((3,)),
                                               keras.layers.Dense(2)]))
    ens = PosteriorEnsemble(net, [kernels.astype(np.float32),
                                  biases.astype(np.float32)])
    x = x0.astype(np.float32)
    y = np.array([1])
    # The graph function the attacks call, inside one compiled call.
    grads = {kind: tf.function(lambda kind=kind: gradients.loss_gradient_graph(
        net, ens.params, tf.constant(x), tf.constant(y, tf.int32), kind, 2)[0])(
        ).numpy() for kind in gradients.GRADIENT_KINDS}
    closed = -(1 - s1) * (s1 - s2) * w / (s1 + s2)
    assert np.linalg.norm(grads["expected"]) < 1e-6
    assert np.linalg.norm(closed) > 0.05
    np.testing.assert_allclose(grads["predictive"][0], closed, rtol=1e-4)
    fd_pred = finite_difference(lambda v: predictive_loss(ens, v, y), x)
    fd_exp = finite_difference(lambda v: expected_loss(ens, v, y), x)
    np.testing.assert_allclose(fd_pred[0], closed, rtol=1e-4)
    assert np.linalg.norm(fd_exp) < 1e-6
    # The predictive attacker follows that direction (an L2 step of eps).
    x_adv = attacks.fgsm(ens, x, y, eps=0.2, norm=2, gradient="predictive",
                         jit_compile=JIT)
    np.testing.assert_allclose(x_adv[0], x0[0] + 0.2 * closed /
                               np.linalg.norm(closed), atol=1e-5)
    assert predictive_loss(ens, x_adv, y) > predictive_loss(ens, x, y) + 0.01


# --------------------------------------------------------------------------
# PGD against an independent loop; restarts; seeds and batching.
# --------------------------------------------------------------------------
def keras_pgd(model, x, y, eps, norm, steps):
    """PGD written directly on the Keras model with a GradientTape loop."""
    x0 = tf.constant(x)
    xa = x0
    step = 2.5 * eps / steps
    for _ in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(xa)
            loss = keras.losses.sparse_categorical_crossentropy(
                y, model(xa), from_logits=True)
        g = tape.gradient(loss, xa).numpy().astype(np.float64)
        if norm == np.inf:
            d = xa.numpy() + step * np.sign(g) - x
            d = np.clip(d, -eps, eps)
        else:
            n = np.linalg.norm(g.reshape(len(x), -1), axis=1)
            d = xa.numpy() + step * g / n[:, None, None, None] - x
            dn = np.linalg.norm(d.reshape(len(x), -1), axis=1)
            d = d * np.minimum(1.0, eps / dn)[:, None, None, None]
        xa = tf.constant(np.clip(x + d, 0.0, 1.0).astype(np.float32))
    return xa.numpy()


@pytest.mark.parametrize("norm, eps", [(2, 1.0), (np.inf, 0.05)])
def test_pgd_one_sample_matches_keras_loop(fashion, norm, eps):
    ens, model, x, y = fashion
    x, y = x[:20], y[:20]
    ref = keras_pgd(model, x, y, eps, norm, steps=5)
    # With one sample every definition but the authors' double-softmax loss
    # is the sample's cross-entropy (that one: tests/test_paper.py).
    outs = [attacks.pgd(ens, x, y, eps=eps, norm=norm, steps=5,
                        random_start=False, gradient=g, jit_compile=JIT)
            for g in attacks.GRADIENTS if g != "paper"]
    for out in outs:
        if norm == 2:
            np.testing.assert_allclose(out, ref, atol=1e-4)
        else:
            # A sign may flip where a gradient component is ~0 in float32.
            assert np.mean(np.abs(out - ref) > 1e-5) < 1e-3
    assert np.mean(np.abs(outs[0] - x) > 1e-3) > 0.3


def test_pgd_beats_fgsm_beats_random(fashion):
    ens, _, x, y = fashion
    correct = ens.predict(x) == y
    assert correct.mean() > 0.7

    def success(x_adv):
        return np.mean(ens.predict(x_adv)[correct] != y[correct])

    eps = 0.1
    rates = {
        "random": success(attacks.random_attack(ens, x, y, eps=eps, jit_compile=JIT)),
        "fgsm": success(attacks.fgsm(ens, x, y, eps=eps, jit_compile=JIT)),
        "pgd": success(attacks.pgd(ens, x, y, eps=eps, steps=10, jit_compile=JIT)),
    }
    assert rates["pgd"] >= rates["fgsm"], rates
    assert rates["fgsm"] >= rates["random"] + 0.4, rates
    assert rates["pgd"] > 0.85, rates


def test_restarts_and_trials_never_weaker(fashion):
    ens, _, x, y = fashion
    # Small steps from random starts, so the runs end at different points.
    for attack, kw, extra in (
            (attacks.pgd, dict(eps=0.03, steps=3, step_size=0.005),
             dict(restarts=4)),
            (attacks.random_attack, dict(eps=0.15), dict(trials=4))):
        single = attack(ens, x, y, seed=7, jit_compile=JIT, **kw)
        multi = attack(ens, x, y, seed=7, jit_compile=JIT, **kw, **extra)
        wrong_1, loss_1 = wrong_and_loss(ens, single, y)
        wrong_k, loss_k = wrong_and_loss(ens, multi, y)
        assert np.all(wrong_k >= wrong_1)
        same_wrong = wrong_1 == wrong_k
        assert np.all(loss_k[same_wrong] >= loss_1[same_wrong] - 1e-5)
        # The first run is the single run: it is replaced only by a worse case.
        changed = np.any(np.abs(multi - single) > 1e-6, axis=(1, 2, 3))
        assert 10 < changed.sum() < len(x)
        np.testing.assert_array_equal(multi[~changed], single[~changed])
        assert np.all((wrong_k > wrong_1)[changed] |
                      (loss_k > loss_1 - 1e-5)[changed])


def test_l2_ball_holds_exactly_in_784_dimensions(fashion):
    # Without clipping nothing pulls points back inside; the projection's
    # margin for float32 rounding must keep ||x_adv - x||_2 <= eps exactly.
    ens = fashion[0]
    x = np.random.default_rng(0).uniform(0.2, 0.8, (200, 28, 28, 1)).astype(
        np.float32)
    for eps in (0.5, 3.0):
        for x_adv in (attacks.fgsm(ens, x, eps=eps, norm=2, clip=None,
                                   jit_compile=JIT),
                      attacks.pgd(ens, x, eps=eps, norm=2, steps=3, clip=None,
                                  jit_compile=JIT)):
            dist = distance(x_adv, x, 2)
            assert np.all(dist <= eps) and dist.min() > eps * (1 - 1e-4)


def test_seeds_and_batching(small):
    ens, x, y = small
    kw = dict(eps=0.2, steps=3, jit_compile=JIT)
    a = attacks.pgd(ens, x, y, seed=1, batch_size=7, **kw)
    np.testing.assert_array_equal(a, attacks.pgd(ens, x, y, seed=1, batch_size=7, **kw))
    # Random starts are drawn per example: padded batches of 3 agree.
    np.testing.assert_allclose(
        a, attacks.pgd(ens, x, y, seed=1, batch_size=3, **kw), atol=1e-6)
    assert not np.allclose(a, attacks.pgd(ens, x, y, seed=2, batch_size=7, **kw))
    r = attacks.random_attack(ens, x, y, eps=0.2, seed=[4, 5], jit_compile=JIT)
    np.testing.assert_array_equal(r, attacks.random_attack(
        ens, x, y, eps=0.2, seed=[4, 5], batch_size=2, jit_compile=JIT))


def test_labels_default_to_predictions(small):
    ens, x, _ = small
    own = ens.predict(x)
    np.testing.assert_array_equal(
        attacks.pgd(ens, x, eps=0.2, steps=3, jit_compile=JIT),
        attacks.pgd(ens, x, own, eps=0.2, steps=3, jit_compile=JIT))


# --------------------------------------------------------------------------
# Random attack.
# --------------------------------------------------------------------------
def test_random_attack_distributions(small):
    ens, _, _ = small
    x = np.full((200, 4, 4, 1), 0.5, np.float32)
    u = (attacks.random_attack(ens, x, eps=0.25, kind="ternary",
                               jit_compile=JIT) - x) / 0.25
    np.testing.assert_allclose(u, np.round(u), atol=1e-5)
    counts = np.array([np.mean(np.round(u) == v) for v in (-1, 0, 1)])
    np.testing.assert_allclose(counts, 1 / 3, atol=0.03)
    v = (attacks.random_attack(ens, x, eps=0.25, kind="uniform",
                               jit_compile=JIT) - x) / 0.25
    assert np.abs(v).max() <= 1 + 1e-5
    # Uniform on [-1, 1]: mean 0, variance 1/3, fraction below -0.5 = 1/4.
    assert abs(v.mean()) < 0.03 and abs(v.var() - 1 / 3) < 0.02
    assert abs(np.mean(v < -0.5) - 0.25) < 0.02


# --------------------------------------------------------------------------
# Square Attack: no gradients, a query budget, lower accuracy.
# --------------------------------------------------------------------------
def no_gradient_ensemble(ens):
    """The same ensemble on a network that fails if asked for a gradient."""
    net = Network.from_keras(ens.network.keras_model)
    apply_stack = net.apply_stack

    def guarded(params, x, **kwargs):
        @tf.custom_gradient
        def no_grad(v):
            def grad(_):
                raise RuntimeError("a gradient of the network was requested")
            return tf.identity(v), grad
        return apply_stack(params, no_grad(x), **kwargs)

    net.apply_stack = guarded
    return PosteriorEnsemble(net, ens.params)


def test_square_attack_needs_no_gradient(fashion):
    ens, _, x, y = fashion
    guarded = no_gradient_ensemble(ens)
    with pytest.raises(RuntimeError, match="gradient"):  # the guard works
        attacks.fgsm(guarded, x[:5], y[:5], eps=0.1, jit_compile=JIT)
    correct = ens.predict(x) == y
    x_adv, queries = attacks.square_attack(
        guarded, x, y, eps=0.1, max_queries=500, seed=0,
        return_queries=True, jit_compile=JIT)
    assert np.all(distance(x_adv, x, np.inf) <= 0.1 + 1e-6)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    wrong = ens.predict(x_adv) != y
    assert ens.accuracy(x, y) - np.mean(~wrong) > 0.4
    assert np.all(queries <= 500)
    # Misclassified from the start: untouched, no queries.
    assert np.all(queries[~correct] == 0)
    np.testing.assert_array_equal(x_adv[~correct], x[~correct])
    # Stopped early once fooled; never gave up on the rest before the budget.
    fooled = correct & wrong
    assert np.all(queries[fooled] < 500) and np.all(queries[correct & ~wrong] == 500)


def test_square_attack_on_vectors():
    # A rank-1 input: squares become segments; the ball and range still hold.
    net = Network.from_keras(models.mlp((12,), 3, hidden=(8,)))
    ens = PosteriorEnsemble(net, net.init_params(seed=2, num_samples=2))
    x = np.random.default_rng(3).uniform(LO, HI, (9, 12)).astype(np.float32)
    x_adv, queries = attacks.square_attack(ens, x, eps=0.2, max_queries=40,
                                           clip=(LO, HI), return_queries=True,
                                           jit_compile=JIT)
    assert np.all(distance(x_adv, x, np.inf) <= 0.2 + 1e-6)
    assert x_adv.min() >= LO and x_adv.max() <= HI
    assert np.all((queries >= 1) & (queries <= 40))


def test_square_attack_with_queries_is_return_queries_true(small):
    ens, x, y = small
    kw = dict(eps=0.2, max_queries=15, seed=4, jit_compile=JIT)
    x_adv, queries = attacks.square_attack_with_queries(ens, x, y, **kw)
    old_x, old_queries = attacks.square_attack(ens, x, y, return_queries=True,
                                               **kw)
    np.testing.assert_array_equal(x_adv, old_x)
    np.testing.assert_array_equal(queries, old_queries)
    assert queries.dtype == np.int32 and queries.shape == (len(x),)
    np.testing.assert_array_equal(attacks.square_attack(ens, x, y, **kw), x_adv)
    with pytest.raises(TypeError, match="return_queries"):
        attacks.square_attack(ens, x, y, return_queries=1, **kw)


@pytest.mark.parametrize("attack", [attacks.fgsm, attacks.random_attack,
                                    attacks.square_attack])
def test_inputs_are_checked_once_and_labels_predicted_once(
        small, monkeypatch, attack):
    # y=None: x is checked, and batch and chunk chosen, once per call; the
    # labels are the ensemble's predictions with the caller's settings.
    ens, x, _ = small
    net, calls = ens.network, {"check_inputs": 0, "batch_and_chunk": 0}
    for name, owner in (("check_inputs", net), ("batch_and_chunk", ens)):
        original = getattr(owner, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    x_adv = attack(ens, x, None, eps=0.2, seed=1, chunk_size=2, batch_size=4,
                   jit_compile=JIT)
    assert calls == {"check_inputs": 1, "batch_and_chunk": 1}
    monkeypatch.undo()
    y = ens.predict(x, chunk_size=2, batch_size=4, jit_compile=JIT)
    np.testing.assert_array_equal(
        x_adv, attack(ens, x, y, eps=0.2, seed=1, chunk_size=2, batch_size=4,
                      jit_compile=JIT))


# --------------------------------------------------------------------------
# XLA.
# --------------------------------------------------------------------------
def test_every_attack_compiles_with_xla(small):
    ens, x, y = small
    for attack, kw in ((attacks.pgd, dict(norm=2, steps=3, restarts=2,
                                          gradient="sample")),
                       (attacks.random_attack, dict(trials=2))):
        xla_out = attack(ens, x, y, eps=0.3, jit_compile=True, **kw)
        np.testing.assert_allclose(
            xla_out, attack(ens, x, y, eps=0.3, jit_compile=False, **kw),
            atol=1e-5)
    x_adv = attacks.square_attack(ens, x, y, eps=0.3, max_queries=20,
                                  jit_compile=True)
    assert np.all(distance(x_adv, x, np.inf) <= 0.3 + 1e-6)
