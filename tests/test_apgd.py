"""Tests of APGD, the AutoAttack worst case and the Square Attack's log
margins, against NumPy re-implementations, closed forms, finite differences
and per-attack bookkeeping done by hand."""

import fractions
import json
import math

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

JIT = False  # TF default kernels: fast to trace on this CPU.
LO, HI = 0.1, 0.9


# --------------------------------------------------------------------------
# Independent NumPy references.
# --------------------------------------------------------------------------
def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def mlp_logits(params, x):
    """NumPy forward of a Dense/leaky-ReLU(0.2) MLP, one weight set."""
    h = x.reshape(x.shape[0], -1).astype(np.float64)
    layers = list(zip(params[::2], params[1::2]))
    for i, (w, b) in enumerate(layers):
        h = h @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
        if i < len(layers) - 1:
            h = np.where(h > 0, h, 0.2 * h)
    return h


def sample_logits(ens, x):
    """``[S, B, C]`` float64 logits of every posterior sample."""
    return np.stack([mlp_logits([t[s].numpy() for t in ens.params], x)
                     for s in range(ens.num_samples)])


def log_predictive(ens, x):
    """``log mean_s softmax``, float64 ``[B, C]``, by log-sum-exp."""
    ls = log_softmax(sample_logits(ens, x))
    m = ls.max(axis=0)
    return m + np.log(np.exp(ls - m).mean(axis=0))


def np_dlr(z, y):
    """The DLR loss, written out per example from its definition."""
    out = []
    for zb, yb in zip(z, y):
        srt = np.sort(zb)[::-1]
        other = max(zb[c] for c in range(len(zb)) if c != yb)
        out.append(-(zb[yb] - other) / (srt[0] - srt[2] + 1e-12))
    return np.array(out)


def np_targeted_dlr(z, y, t):
    out = []
    for zb, yb, tb in zip(z, y, t):
        srt = np.sort(zb)[::-1]
        out.append(-(zb[yb] - zb[tb]) / (srt[0] - 0.5 * (srt[2] + srt[3]) + 1e-12))
    return np.array(out)


def finite_difference(loss, x, h=1e-4):
    """Central differences of ``loss(x) -> [B]`` per example, float64."""
    x = x.astype(np.float64)
    flat = x.reshape(x.shape[0], -1)
    grad = np.zeros_like(flat)
    for i in range(flat.shape[1]):
        up, down = flat.copy(), flat.copy()
        up[:, i] += h
        down[:, i] -= h
        grad[:, i] = (loss(up.reshape(x.shape)) -
                      loss(down.reshape(x.shape))) / (2 * h)
    return grad.reshape(x.shape)


def distance(x_adv, x, norm):
    d = (x_adv.astype(np.float64) - x.astype(np.float64)).reshape(len(x), -1)
    return np.abs(d).max(axis=1) if norm == np.inf else np.linalg.norm(d, axis=1)


def published_checkpoints(n):
    """``{ceil(p_j n)}``, ``j >= 1``, with exact rational ``p_j``."""
    p = [fractions.Fraction(0), fractions.Fraction(22, 100)]
    while p[-1] <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - fractions.Fraction(3, 100),
                             fractions.Fraction(6, 100)))
    return {math.ceil(q * n) for q in p[1:]}


def numpy_apgd(loss, grad, x0, x_start, eps, steps, rho=0.75, alpha=0.75,
               lo=0.0, hi=1.0):
    """APGD (L-inf) as published, one example at a time, float64.

    ``loss(x, k)``/``grad(x, k)`` of one example at the ``k``-th evaluation
    (0 at the start).  Returns the eta and x traces and the best point.
    """
    ckpts = published_checkpoints(steps)
    etas, xs, best = [], [], []
    for b in range(len(x0)):
        def proj(v):
            return np.clip(x0[b] + np.clip(v - x0[b], -eps, eps), lo, hi)

        eta = 2 * eps
        x = x_prev = x_start[b]
        f, g = loss(x, 0, b), grad(x, 0, b)
        x_max, f_max, g_max = x, f, g
        last, rises, f_max_last, halved_last = 0, 0, f, False
        eta_b, x_b = [], []
        for k in range(steps):
            a = 1.0 if k == 0 else alpha
            z = proj(x + eta * np.sign(g))
            x_new = proj(x + a * (z - x) + (1 - a) * (x - x_prev))
            f_new, g_new = loss(x_new, k + 1, b), grad(x_new, k + 1, b)
            rises += f_new > f
            if f_new > f_max:
                x_max, f_max, g_max = x_new, f_new, g_new
            x_prev, x, f, g = x, x_new, f_new, g_new
            if k + 1 in ckpts:
                cond1 = rises < rho * (k + 1 - last)
                cond2 = not halved_last and f_max <= f_max_last
                halve = cond1 or cond2
                if halve:
                    eta /= 2
                    x, f, g = x_max, f_max, g_max
                halved_last, f_max_last, rises, last = halve, f_max, 0, k + 1
            eta_b.append(eta)
            x_b.append(x)
        etas.append(eta_b)
        xs.append(x_b)
        best.append((x_max, f_max))
    return np.array(etas).T, np.swapaxes(np.array(xs), 0, 1), best


# --------------------------------------------------------------------------
# Fixtures.
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    """A 3-sample MLP on 4x4x1 images with 5 classes, inputs in [LO, HI]."""
    net = Network.from_keras(models.mlp((4, 4, 1), 5, hidden=(8,)))
    ens = PosteriorEnsemble(net, net.init_params(seed=1, num_samples=3))
    x = np.random.default_rng(0).uniform(LO, HI, (6, 4, 4, 1)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 5, 6).astype(np.int32)
    return ens, x, y


@pytest.fixture(scope="module")
def fashion():
    """A 784-32-10 MLP trained briefly on Fashion-MNIST, made a 3-sample
    ensemble by small weight perturbations."""
    ds = data.fashion_mnist().subset(num_train=2000, num_test=80, seed=0)
    keras.utils.set_random_seed(0)
    model = models.mlp(ds.input_shape, 10, hidden=(32,))
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(ds.train_x, ds.train_y, epochs=3, batch_size=64, verbose=0)
    base = PosteriorEnsemble.from_keras(model)
    rng = np.random.default_rng(0)
    params = [np.concatenate([p.numpy()] + [
        p.numpy() + 0.02 * rng.normal(size=p.shape).astype(np.float32)
        for _ in range(2)]) for p in base.params]
    return PosteriorEnsemble(base.network, params), ds.test_x, ds.test_y


# --------------------------------------------------------------------------
# The step-size schedule.
# --------------------------------------------------------------------------
def _run_loop(loss_tf, grad_tf, x0, x_start, eps, steps, rho=0.75, alpha=0.75):
    def objective(x, t):
        return loss_tf(x, t + 1), grad_tf(x, t + 1), tf.zeros(
            tf.shape(x)[:1], tf.bool)

    out = attacks._apgd_loop(
        objective, tf.constant(x0), tf.constant(x_start),
        tf.constant(eps, tf.float64), tf.constant(steps),
        tf.constant(rho, tf.float64), tf.constant(alpha, tf.float64),
        tf.constant(0.0, tf.float64), tf.constant(1.0, tf.float64),
        norm=np.inf, has_clip=True, stop_early=True, trace=True)
    return [o.numpy() for o in out]


@pytest.mark.parametrize("steps", [10, 37, 100])
def test_schedule_matches_numpy_on_a_toy_loss(steps):
    # A smooth, non-symmetric loss with its maximum inside the ball: sign
    # steps overshoot and oscillate, so the step size must be halved.
    rng = np.random.default_rng(steps)
    b, d, eps = 4, 6, 0.3
    x0 = rng.uniform(0.2, 0.8, (b, d))
    c = x0 + rng.uniform(-0.2, 0.2, (b, d))
    a = rng.uniform(0.5, 2.0, (b, d))
    x_start = np.clip(x0 + rng.uniform(-eps, eps, (b, d)), 0, 1)

    def np_loss(x, k, i):
        return float(-np.sum(a[i] * (x - c[i]) ** 2) + 0.1 * np.sum(np.sin(5 * x)))

    def np_grad(x, k, i):
        return -2 * a[i] * (x - c[i]) + 0.5 * np.cos(5 * x)

    def tf_loss(x, k):
        return -tf.reduce_sum(a * (x - c) ** 2, 1) + 0.1 * tf.reduce_sum(
            tf.sin(5 * x), 1)

    def tf_grad(x, k):
        return -2 * a * (x - c) + 0.5 * tf.cos(5 * x)

    _, _, x_best, f_best, eta, xs = _run_loop(tf_loss, tf_grad, x0, x_start,
                                              eps, steps)
    ref_eta, ref_x, ref_best = numpy_apgd(np_loss, np_grad, x0, x_start, eps,
                                          steps)
    np.testing.assert_array_equal(eta, ref_eta)
    np.testing.assert_allclose(xs, ref_x, atol=1e-12)
    np.testing.assert_allclose(x_best, [xb for xb, _ in ref_best], atol=1e-12)
    np.testing.assert_allclose(f_best, [fb for _, fb in ref_best], atol=1e-12)
    assert (eta[-1] < 2 * eps).all()  # the schedule did act


def test_schedule_follows_scripted_losses_and_both_conditions():
    # Losses scripted per evaluation (independent of x), so each halving
    # condition is exercised on its own.  Example 0 rises at every step but
    # never beats its start: only condition (ii) halves.  Example 1 rises
    # at every step and improves: no halving.  Examples 2-5 are random.
    steps, b, d, eps = 50, 6, 3, 0.25
    rng = np.random.default_rng(7)
    table = rng.normal(size=(steps + 1, b))
    table[:, 0] = np.concatenate([[100.0], np.arange(steps)])
    table[:, 1] = np.arange(steps + 1)
    direction = rng.normal(size=(b, d))
    x0 = rng.uniform(0.3, 0.7, (b, d))

    _, _, _, f_best, eta, _ = _run_loop(
        lambda x, k: tf.gather(tf.constant(table), k),
        lambda x, k: tf.constant(direction), x0, x0, eps, steps)
    ref_eta, _, ref_best = numpy_apgd(
        lambda x, k, i: table[k, i], lambda x, k, i: direction[i], x0, x0,
        eps, steps)
    np.testing.assert_array_equal(eta, ref_eta)
    np.testing.assert_array_equal(f_best, [f for _, f in ref_best])
    ckpts = sorted(published_checkpoints(steps))
    assert ckpts[:3] == [11, 21, 29]  # ceil(0.22 * 50), ceil(0.41 * 50), ...
    # Condition (ii) alone: halved at the first checkpoint, then not at the
    # next (it was halved there), then again, alternating.
    first = ckpts[0] - 1
    assert eta[first - 1, 0] == 2 * eps and eta[first, 0] == eps
    assert eta[ckpts[1] - 1, 0] == eps and eta[ckpts[2] - 1, 0] == eps / 2
    assert np.all(eta[:, 1] == 2 * eps)


def test_one_step_without_momentum_is_a_signed_step(small):
    # alpha=1 is no momentum; any alpha gives the same single step.
    # Without the random start, one step of APGD is z = P(x + 2 eps sign(g)):
    # the L-inf ball makes that x + eps sign(g), clipped; whatever the
    # momentum (it does not act on the first step).  Labels are the clean
    # predictions: a misclassified start would itself be the point returned.
    ens, x, _ = small
    y = log_predictive(ens, x).argmax(1)
    eps = 0.05
    g = finite_difference(lambda v: -log_predictive(ens, v)[np.arange(len(y)), y],
                          x)
    expected = np.clip(x + eps * np.sign(g), LO, HI).astype(np.float32)
    for alpha in (0.0, 0.75, 1.0):
        x_adv = attacks.apgd(ens, x, y, eps=eps, steps=1, alpha=alpha,
                             clip=(LO, HI), _random_start=False,
                             jit_compile=JIT)
        np.testing.assert_allclose(x_adv, expected, atol=1e-6)


# --------------------------------------------------------------------------
# The losses and their gradients.
# --------------------------------------------------------------------------
def test_dlr_losses_equal_their_formulas_and_are_scale_free():
    z = np.array([[3.0, 1.0, -2.0, 0.5, 0.0],    # y is the top class
                  [0.2, 4.0, 1.0, -1.0, 2.0],    # y is not
                  [1.0, 1.0, 0.0, -3.0, 0.5]])   # a tie at the top
    y = np.array([0, 0, 1])
    t = np.array([3, 4, 0])
    # By hand: (3 - 1) / (3 - 0.5); (0.2 - 4) / (4 - 1); (1 - 1) / (1 - 0.5).
    np.testing.assert_allclose(np_dlr(z, y), [-2 / 2.5, 3.8 / 3.0, 0.0])
    for scale, shift in ((1.0, 0.0), (7.5, -3.0), (0.01, 100.0)):
        zz = tf.constant(scale * z + shift, tf.float64)
        np.testing.assert_allclose(attacks._dlr_loss(zz, tf.constant(y)).numpy(),
                                   np_dlr(z, y), rtol=1e-9)
        np.testing.assert_allclose(
            attacks._targeted_dlr_loss(zz, tf.constant(y), tf.constant(t)).numpy(),
            np_targeted_dlr(z, y, t), rtol=1e-9)
    # Targeted, by hand: -(3 - 0.5) / (3 - (0.5 + 0) / 2) for the first row.
    assert np_targeted_dlr(z, y, t)[0] == pytest.approx(-2.5 / 2.75)


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("loss, targeted", [("dlr", False), ("dlr", True),
                                            ("ce", False), ("ce", True)])
def test_predictive_gradients_equal_finite_differences(small, chunk, loss,
                                                       targeted):
    ens, x, y = small
    t = (y + 2) % 5
    if loss == "dlr":
        np_loss = ((lambda v: np_targeted_dlr(log_predictive(ens, v), y, t))
                   if targeted else (lambda v: np_dlr(log_predictive(ens, v), y)))
    else:
        c, sign = (t, 1.0) if targeted else (y, -1.0)
        np_loss = lambda v: sign * log_predictive(ens, v)[np.arange(len(y)), c]
    loss_fn = attacks._apgd_loss(loss, targeted, tf.constant(y), tf.constant(t),
                                 True)
    f, g, z = attacks._objective_predictive(
        ens.network, ens.params, tf.constant(x), loss_fn, chunk or 3)
    np.testing.assert_allclose(z.numpy(), log_predictive(ens, x), atol=1e-5)
    np.testing.assert_allclose(f.numpy(), np_loss(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g.numpy(), finite_difference(np_loss, x),
                               rtol=1e-2, atol=2e-4)


@pytest.mark.parametrize("kind", ["predictive", "expected", "paper"])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_ce_gradient_equals_the_gradients_module(small, kind, chunk):
    ens, x, y = small
    loss_fn = attacks._apgd_loss("ce", False, tf.constant(y), None,
                                 kind == "predictive")
    f, g, _ = attacks._OBJECTIVES[kind](ens.network, ens.params,
                                        tf.constant(x), loss_fn, chunk)
    ref_g, ref_f = gradients.loss_gradient_graph(
        ens.network, ens.params, tf.constant(x), tf.constant(y), kind, chunk)
    np.testing.assert_allclose(g.numpy(), ref_g.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(f.numpy(), ref_f.numpy(), rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("targeted", [False, True])
def test_one_pass_log_prob_objective_equals_a_direct_tape(chunk, targeted):
    # Several chunks (a loop, and a remainder for chunk 3 of S=7) and weights
    # scaled up so log p(c) spans tens of nats between samples: the running
    # log-sum-exp must rescale the gradient exactly.  The reference is one
    # tape over the whole stack, written here.
    net = Network.from_keras(models.mlp((4, 4, 1), 5, hidden=(8,)))
    params = [p * 6.0 for p in net.init_params(seed=3, num_samples=7)]
    rng = np.random.default_rng(4)
    x = tf.constant(rng.uniform(LO, HI, (6, 4, 4, 1)).astype(np.float32))
    y = tf.constant(rng.integers(0, 5, 6).astype(np.int32))
    t = (y + 1) % 5
    loss_fn = attacks._apgd_loss("ce", targeted, y, t, True)
    f, g, z = attacks._objective_predictive(net, params, x, loss_fn, chunk)
    c, sign = (t, 1.0) if targeted else (y, -1.0)
    with tf.GradientTape() as tape:
        tape.watch(x)
        ls = tf.nn.log_softmax(net.apply_stack(params, x))  # [S, B, C]
        ref_z = tf.reduce_logsumexp(ls, axis=0) - np.log(7.0)
        ref_f = sign * tf.gather(ref_z, c, batch_dims=1)
        total = tf.reduce_sum(ref_f)
    ref_g = tape.gradient(total, x)
    assert float(tf.reduce_max(tf.abs(ref_z))) > 5.0  # far from uniform
    np.testing.assert_allclose(z.numpy(), ref_z.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f.numpy(), ref_f.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.numpy(), ref_g.numpy(), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------
# Strength, the threat set, seeds.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("norm, eps", [(np.inf, 0.04), (2, 0.6)])
def test_apgd_at_least_as_strong_as_pgd_and_in_the_ball(fashion, norm, eps):
    ens, x, y = fashion
    kw = dict(eps=eps, norm=norm, steps=20, seed=3, jit_compile=JIT)
    pgd = attacks.pgd(ens, x, y, gradient="predictive", **kw)
    for loss in ("ce", "dlr"):
        x_adv = attacks.apgd(ens, x, y, loss=loss, **kw)
        assert np.all(distance(x_adv, x, norm) <= eps * (1 + 1e-6))
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
        robust_apgd = ens.predict(x_adv) == y
        robust_pgd = ens.predict(pgd) == y
        assert robust_apgd.mean() <= robust_pgd.mean(), loss
        # Per example: hardly a point survives APGD that PGD broke.
        assert np.mean(robust_apgd & ~robust_pgd) <= 0.05, loss
    assert ens.accuracy(x, y) - robust_pgd.mean() > 0.1  # a real attack


@pytest.mark.parametrize("gradient", attacks.GRADIENTS)
def test_every_gradient_and_eot_stays_in_the_ball_and_is_seeded(small, gradient):
    ens, x, y = small
    for norm, eot, restarts in ((np.inf, None, 2), (2, 2, 1)):
        kw = dict(eps=0.2, norm=norm, steps=4, restarts=restarts,
                  gradient=gradient, eot_samples=eot, clip=(LO, HI), seed=5,
                  jit_compile=JIT)
        x_adv = attacks.apgd(ens, x, y, **kw)
        assert x_adv.dtype == np.float32 and x_adv.shape == x.shape
        assert np.all(distance(x_adv, x, norm) <= 0.2 * (1 + 1e-6))
        assert x_adv.min() >= LO and x_adv.max() <= HI
        np.testing.assert_array_equal(attacks.apgd(ens, x, y, **kw), x_adv)
        other = attacks.apgd(ens, x, y, **dict(kw, seed=6))
        assert not np.array_equal(other, x_adv)


def test_batches_do_not_change_the_result_and_xla_agrees(small):
    # Random starts are per example and a batch stops only once every
    # example in it has a misclassified point, which is then frozen.
    ens, x, y = small
    kw = dict(eps=0.3, loss="dlr", steps=6, restarts=2, seed=4, chunk_size=2)
    whole = attacks.apgd(ens, x, y, jit_compile=JIT, **kw)
    assert (np.exp(log_predictive(ens, whole)).argmax(1) != y).any()
    np.testing.assert_array_equal(
        attacks.apgd(ens, x, y, batch_size=2, jit_compile=JIT, **kw), whole)
    kw = dict(eps=0.3, loss="dlr", steps=6, seed=4)
    np.testing.assert_allclose(attacks.apgd(ens, x, y, jit_compile=True, **kw),
                               attacks.apgd(ens, x, y, jit_compile=JIT, **kw),
                               atol=1e-5)


def test_targets_are_the_runners_up_and_more_targets_never_weaker(small):
    ens, x, y = small
    p = np.exp(log_predictive(ens, x))
    got = attacks._targets(ens.network, ens.params, tf.constant(x),
                           tf.constant(y), 3, 2).numpy()
    for b in range(len(y)):
        ranked = [c for c in np.argsort(-p[b], kind="stable") if c != y[b]]
        assert list(got[b]) == ranked[:3]
        if p[b].argmax() == y[b]:  # ranks 2, 3, 4 of all classes
            assert list(got[b]) == list(np.argsort(-p[b])[1:4])
    kw = dict(eps=0.15, loss="dlr", targeted=True, steps=5, seed=2,
              jit_compile=JIT)
    one = attacks.apgd(ens, x, y, num_targets=1, **kw)
    four = attacks.apgd(ens, x, y, num_targets=4, **kw)
    wrong_one = np.exp(log_predictive(ens, one)).argmax(1) != y
    wrong_four = np.exp(log_predictive(ens, four)).argmax(1) != y
    assert np.all(wrong_four >= wrong_one)


# --------------------------------------------------------------------------
# Bad input: clear errors before any work.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(eps=-0.1), ValueError, "eps"),
    (dict(eps=None), TypeError, "eps"),
    (dict(eps=0.1, loss="hinge"), ValueError, "loss"),
    (dict(eps=0.1, targeted=True, num_targets=5), ValueError, "num_targets"),
    (dict(eps=0.1, targeted=True, num_targets=0), ValueError, "num_targets"),
    (dict(eps=0.1, eot_samples=4), ValueError, "eot_samples"),
    (dict(eps=0.1, eot_samples=0), ValueError, "eot_samples"),
    (dict(eps=0.1, steps=0), ValueError, "steps"),
    (dict(eps=0.1, restarts=0), ValueError, "restarts"),
    (dict(eps=0.1, rho=0.0), ValueError, "rho"),
    (dict(eps=0.1, rho=1.5), ValueError, "rho"),
    (dict(eps=0.1, alpha=-0.1), ValueError, "alpha"),
    (dict(eps=0.1, alpha=1.1), ValueError, "alpha"),
    (dict(eps=0.1, gradient="exact"), ValueError, "gradient"),
    (dict(eps=0.1, norm=1), ValueError, "norm"),
    (dict(eps=0.1, targeted=1), TypeError, "targeted"),
])
def test_bad_arguments_raise_before_work(small, monkeypatch, kwargs, error,
                                         match):
    ens, x, y = small
    monkeypatch.setattr(attacks, "_prepare", _no_work)
    with pytest.raises(error, match=match):
        attacks.apgd(ens, x, y, **kwargs)


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the arguments were checked")


def test_dlr_needs_enough_classes_unless_fallback(monkeypatch):
    net3 = Network.from_keras(models.mlp((4,), 3, hidden=(4,)))
    ens3 = PosteriorEnsemble(net3, net3.init_params(seed=0, num_samples=2))
    net2 = Network.from_keras(models.mlp((4,), 2, hidden=(4,)))
    ens2 = PosteriorEnsemble(net2, net2.init_params(seed=0, num_samples=2))
    x = np.full((3, 4), 0.5, np.float32)
    y = np.array([0, 1, 0], np.int32)
    with monkeypatch.context() as m:
        m.setattr(attacks, "_prepare", _no_work)
        with pytest.raises(ValueError, match="at least 3 classes"):
            attacks.apgd(ens2, x, y, eps=0.1, loss="dlr")
        with pytest.raises(ValueError, match="targeted DLR.*at least 4 classes"):
            attacks.apgd(ens3, x, y, eps=0.1, loss="dlr", targeted=True,
                         num_targets=2)
    # The fallback is cross-entropy: the same points as loss="ce".
    kw = dict(eps=0.1, steps=3, seed=1, jit_compile=JIT)
    np.testing.assert_array_equal(
        attacks.apgd(ens2, x, y, loss="dlr", dlr_fallback=True, **kw),
        attacks.apgd(ens2, x, y, loss="ce", **kw))
    np.testing.assert_array_equal(
        attacks.apgd(ens3, x, y, loss="dlr", targeted=True, num_targets=2,
                     dlr_fallback=True, **kw),
        attacks.apgd(ens3, x, y, loss="ce", targeted=True, num_targets=2, **kw))


# --------------------------------------------------------------------------
# The worst case over attacks.
# --------------------------------------------------------------------------
def identity_ensemble(num_classes=4):
    """A linear 1-sample ensemble predicting ``argmax x``."""
    net = Network.from_keras(keras.Sequential(
        [keras.Input((num_classes,)), keras.layers.Dense(num_classes)]))
    w = np.eye(num_classes, dtype=np.float32)[None]
    return PosteriorEnsemble(net, [w, np.zeros((1, num_classes), np.float32)])


def test_auto_attack_worst_case_counts_robust_only_if_every_attack_failed(
        monkeypatch):
    ens = identity_ensemble()
    y = np.array([0, 1, 2, 3, 0, 1], np.int32)
    x = np.repeat(0.3 + 0.01 * np.arange(6, dtype=np.float32)[:, None], 4, 1)
    x[np.arange(6), y] = 0.6
    x[0] = [0.3, 0.6, 0.3, 0.3]  # misclassified before any attack
    # Which examples each (fake) attack breaks, if it is given them: every
    # attack would also break example 1, which apgd-ce takes first.
    breaks = {"apgd-ce": {1}, "apgd-t": {1, 2}, "square": {1, 2, 3}}
    seen = {}

    def fake_run(name, ensemble, xs, ys, eps, config, common):
        rows = [int(np.flatnonzero((x == row).all(1))[0]) for row in xs]
        seen[name] = rows
        out = xs.copy()
        for i, row in enumerate(rows):
            if row in breaks[name]:
                out[i] = np.roll(xs[i], 1)  # the label's 0.6 moves on
        return out

    monkeypatch.setattr(attacks, "_auto_attack_run", fake_run)
    result = attacks.auto_attack(ens, x, y, eps=0.1, seed=3)
    assert result.attacks == ("apgd-ce", "apgd-t", "square")
    assert seen == {"apgd-ce": [1, 2, 3, 4, 5], "apgd-t": [2, 3, 4, 5],
                    "square": [3, 4, 5]}
    np.testing.assert_array_equal(result.robust, [0, 0, 0, 0, 1, 1])
    assert list(result.broken_by) == ["clean", "apgd-ce", "apgd-t", "square",
                                      "", ""]
    assert result.clean_accuracy == pytest.approx(5 / 6)
    assert result.accuracy_after == pytest.approx(
        {"apgd-ce": 4 / 6, "apgd-t": 3 / 6, "square": 2 / 6})
    assert result.worst_case_accuracy == pytest.approx(2 / 6)
    for i in (1, 2, 3):
        np.testing.assert_array_equal(result.x_adv[i], np.roll(x[i], 1))
    np.testing.assert_array_equal(result.x_adv[[0, 4, 5]], x[[0, 4, 5]])
    # Every attack has its own seed, recorded with its settings.
    seeds_used = [tuple(result.settings[n]["seed"]) for n in result.attacks]
    assert len(set(seeds_used)) == 3
    json.dumps(result.settings, allow_nan=False)


def test_auto_attack_runs_the_real_attacks_consistently(small):
    ens, x, y = small
    kw = dict(eps=0.15, steps=4, square_queries=20, num_targets=2,
              clip=(LO, HI), seed=1, jit_compile=JIT)
    result = attacks.auto_attack(ens, x, y, **kw)
    pred_adv = np.exp(log_predictive(ens, result.x_adv)).argmax(1)
    pred = np.exp(log_predictive(ens, x)).argmax(1)
    broken = np.isin(result.broken_by, result.attacks)
    np.testing.assert_array_equal(pred_adv[broken] != y[broken], True)
    np.testing.assert_array_equal(result.robust, (pred == y) & ~broken)
    np.testing.assert_array_equal(result.broken_by == "clean", pred != y)
    np.testing.assert_array_equal(result.x_adv[~broken], x[~broken])
    assert np.all(distance(result.x_adv, x, np.inf) <= 0.15 + 1e-6)
    assert result.settings["apgd-t"]["num_targets"] == 2
    # The same seed, the same result.
    again = attacks.auto_attack(ens, x, y, **kw)
    np.testing.assert_array_equal(again.x_adv, result.x_adv)
    np.testing.assert_array_equal(again.broken_by, result.broken_by)


def test_auto_attack_versions(small, monkeypatch):
    ens, x, y = small
    calls = []

    def fake_run(name, ensemble, xs, ys, eps, config, common):
        calls.append((name, dict(config)))
        return xs

    monkeypatch.setattr(attacks, "_auto_attack_run", fake_run)
    rand = attacks.auto_attack(ens, x, y, eps=0.1, version="rand")
    assert rand.attacks == ("apgd-ce", "apgd-dlr")
    assert [c["eot_samples"] for _, c in calls] == [3, 3]  # min(20, S = 3)
    assert calls[1][1]["loss"] == "dlr" and not calls[1][1]["targeted"]
    l2 = attacks.auto_attack(ens, x, y, eps=0.1, norm=2)
    assert l2.attacks == ("apgd-ce", "apgd-t")  # Square is L-inf only
    assert "square" in l2.settings["common"]["skipped"]
    assert l2.settings["apgd-t"]["num_targets"] == 4  # min(9, C - 1)
    custom = attacks.auto_attack(ens, x, y, eps=0.1, version="custom",
                                 attacks=["square", "apgd-ce"])
    assert custom.attacks == ("square", "apgd-ce")
    assert tuple(custom.accuracy_after) == ("square", "apgd-ce")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(eps=0.1, version="plus"), ValueError, "version"),
    (dict(eps=0.1, version="custom"), ValueError, "attacks="),
    (dict(eps=0.1, attacks=["apgd-ce"]), ValueError, "only for version='custom'"),
    (dict(eps=0.1, version="custom", attacks=["fab-t"]), ValueError, "attacks"),
    (dict(eps=0.1, version="custom", attacks=["square", "square"]), ValueError,
     "distinct"),
    (dict(eps=0.1, version="custom", attacks=["square"], norm=2), ValueError,
     "L-inf"),
    (dict(eps=0.1, num_targets=5), ValueError, "num_targets"),
    (dict(eps=0.1, square_queries=0), ValueError, "square_queries"),
    (dict(eps=0.1, eot_samples=9), ValueError, "eot_samples"),
    (dict(eps=2.0 ** 0.5, gradient="none"), ValueError, "gradient"),
    (dict(eps=-1.0), ValueError, "eps"),
])
def test_auto_attack_bad_arguments_raise_before_work(small, monkeypatch,
                                                     kwargs, error, match):
    ens, x, y = small
    monkeypatch.setattr(attacks, "_prepare", _no_work)
    with pytest.raises(error, match=match):
        attacks.auto_attack(ens, x, y, **kwargs)


def test_auto_attack_dlr_class_check_and_fallback(monkeypatch):
    ens = identity_ensemble(3)
    x = np.array([[0.6, 0.4, 0.4], [0.4, 0.6, 0.4]], np.float32)
    y = np.array([0, 1], np.int32)
    with monkeypatch.context() as m:
        m.setattr(attacks, "_prepare", _no_work)
        with pytest.raises(ValueError, match="at least 4 classes"):
            attacks.auto_attack(ens, x, y, eps=0.05)
    result = attacks.auto_attack(ens, x, y, eps=0.05, steps=2,
                                 square_queries=5, dlr_fallback=True,
                                 jit_compile=JIT)
    assert result.settings["apgd-t"]["loss"] == "ce"
    assert result.settings["apgd-t"]["targeted"]


# --------------------------------------------------------------------------
# The Square Attack's log margins.
# --------------------------------------------------------------------------
def test_square_attack_progresses_where_p_y_rounds_to_one():
    # Two classes, logits (0, 10 sum(x) - 260 + small per-sample offsets):
    # at x = 0.5 the logit gap is about 100, so p(y = 0) is exactly 1.0 in
    # float32 and a probability margin stays 1.0 until the gap falls below
    # ~17 (sum(x) > 24); a square moves sum(x) by at most ~10 of the needed
    # 10.  Breaking the point takes a sequence of accepted squares, each
    # visible only in the log margin.
    d = 32
    net = Network.from_keras(keras.Sequential([keras.Input((d,)),
                                               keras.layers.Dense(2)]))
    w = np.zeros((3, d, 2), np.float32)
    w[:, :, 1] = 10.0
    b = np.zeros((3, 2), np.float32)
    b[:, 1] = [-260.0, -259.0, -261.0]
    ens = PosteriorEnsemble(net, [w, b])
    x = np.full((2, d), 0.5, np.float32)
    y = np.zeros(2, np.int32)
    p = ens.predict_proba(x)
    assert np.all(p[:, 0] == np.float32(1.0))
    x_adv, queries = attacks.square_attack_with_queries(
        ens, x, y, eps=0.5, max_queries=300, seed=0, jit_compile=JIT)
    assert np.all(ens.predict(x_adv) == 1)
    assert np.all(queries < 300)
    assert np.all(distance(x_adv, x, np.inf) <= 0.5 + 1e-6)


@pytest.mark.parametrize("gradient, loss, chunk_size, expected", [
    ("predictive", "ce", None, 2), ("expected", "ce", None, 2),
    ("expected", "dlr", None, 2),
    # Two passes over a split stack: the memory bound alone (all 5 samples).
    ("predictive", "dlr", None, 5), ("paper", "ce", None, 5),
    ("paper", "dlr", None, 5),
    ("predictive", "dlr", 1, 1),  # a size asked for is kept
])
def test_apgd_keeps_one_chunk_where_splitting_costs_a_pass(
        monkeypatch, gradient, loss, chunk_size, expected):
    from tfp_bnn_adv import chunking  # pylint: disable=g-import-not-at-top
    from tfp_bnn_adv import xla  # pylint: disable=g-import-not-at-top
    net = Network.from_keras(models.mlp((4, 4, 1), 5, hidden=(8,)))
    ens = PosteriorEnsemble(net, net.init_params(seed=2, num_samples=5))
    x = np.random.default_rng(0).uniform(LO, HI, (6, 4, 4, 1)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 5, 6).astype(np.int32)
    # 8 + 5 weight-dependent floats x 6 inputs x 4 bytes x 2 = 624 bytes:
    # at most 2 samples per chunk, 5 samples -> chunks of 2.
    monkeypatch.setattr(xla, "has_accelerator", lambda: False)
    monkeypatch.setattr(chunking, "CPU_CACHE_BUDGET", 624)
    seen = []
    graph = attacks._apgd_graph

    def recording(*args, **kwargs):
        seen.append(kwargs["chunk"])
        return graph(*args, **kwargs)

    monkeypatch.setattr(attacks, "_apgd_graph", recording)
    out = attacks.apgd(ens, x, y, 0.05, loss=loss, gradient=gradient, steps=2,
                       chunk_size=chunk_size, clip=(LO, HI))
    assert set(seen) == {expected}
    assert np.max(np.abs(out - x)) <= 0.05 + 1e-6
