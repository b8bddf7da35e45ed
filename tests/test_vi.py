"""Tests for tfp_bnn_adv.inference.vi.

Expected values come from independent computations: the user's own Keras 3
model run with a given weight set (layout), closed-form normal moments and
the closed-form normal-normal KL (sampling and the loss), Monte Carlo error
bars estimated from the draws themselves (agreement), and the known optimum
of a KL-only objective, the prior (KL weight).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_bnn_adv import data
from tfp_bnn_adv import files
from tfp_bnn_adv import models
from tfp_bnn_adv import seeds
from tfp_bnn_adv import xla
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.gradients import expected_loss_gradient
from tfp_bnn_adv.inference import vi
from tfp_bnn_adv.network import Network

tfd = tfp.distributions


# ------------------------------------------------------------------ fixtures
def _mlp_with_every_layer():
    """Functional MLP with a nested Sequential, Reshape, every activation kind
    and a final softmax (which the VI model must drop)."""
    inner = keras.Sequential([
        keras.Input((2, 3)),
        keras.layers.Dense(4, activation="sigmoid"),  # on a rank-3 input
        keras.layers.Flatten(),
        keras.layers.Dense(7, activation="tanh"),
        keras.layers.LeakyReLU(negative_slope=0.1),
    ], name="inner")
    x = keras.Input((6,))
    h = keras.layers.Reshape((2, 3))(x)
    h = inner(h)
    h = keras.layers.Dense(5, use_bias=False)(h)
    h = keras.layers.ReLU(max_value=1.5, negative_slope=0.05, threshold=0.1)(h)
    h = keras.layers.Dropout(0.3)(h)
    h = keras.layers.Dense(4, activation="leaky_relu")(h)
    h = keras.layers.Activation("elu")(h)
    out = keras.layers.Dense(3, activation="softmax")(h)
    return keras.Model(x, out, name="every_layer_mlp")


def _small_cnn():
    """Non-square kernels, strides, 'same' padding, both poolings, a conv
    without bias, and a final Activation('softmax') layer."""
    return keras.Sequential([
        keras.Input((9, 8, 2)),
        keras.layers.Conv2D(3, (3, 2), strides=(1, 2), padding="same",
                            activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(4, 2, use_bias=False, activation="selu"),
        keras.layers.AveragePooling2D((2, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
        keras.layers.Activation("softmax"),
    ], name="small_cnn")


def _random_posterior(model, seed, scale_range=(0.1, 0.4), loc_gain=1.0,
                      bias_scale_range=None, **kwargs):
    """A posterior with (scaled) Keras-initialiser locs and uneven scales,
    drawn from ``bias_scale_range`` for biases if given."""
    net = Network.from_keras(model)
    rng = np.random.default_rng(seed)
    loc = [loc_gain * p.numpy() for p in net.init_params(seed)]
    scale = [rng.uniform(*(bias_scale_range if bias_scale_range and len(s) == 1
                           else scale_range), size=s).astype(np.float32)
             for s in net.param_shapes]
    return vi.VIPosterior(net, loc, scale, **kwargs)


def _inputs(net, n, seed):
    return np.random.default_rng(seed).uniform(
        0, 1, size=(n,) + net.input_shape).astype(np.float32)


def _closed_form_kl(loc, scale, prior_scale):
    """sum KL(N(m, s^2) || N(0, p^2)) = log(p/s) + (s^2 + m^2)/(2 p^2) - 1/2."""
    total = 0.0
    for m, s in zip(loc, scale):
        m, s = np.float64(m), np.float64(s)
        total += np.sum(np.log(prior_scale / s) +
                        (s**2 + m**2) / (2 * prior_scale**2) - 0.5)
    return total


@pytest.fixture(scope="module")
def moons():
    return data.half_moons(n=5000, noise=0.1, seed=0)


# ----------------------------------------------------- the variational model
@pytest.mark.parametrize("estimator, dense_cls, conv_cls", [
    ("flipout", "DenseFlipout", "Conv2DFlipout"),
    ("reparameterization", "DenseReparameterization",
     "Conv2DReparameterization"),
])
def test_variational_layers_priors_and_posteriors(estimator, dense_cls, conv_cls):
    post = _random_posterior(_small_cnn(), seed=0, estimator=estimator,
                             prior_scale=0.7)
    names = [type(l).__name__ for l in post.variational_model.layers]
    assert names == [conv_cls, "MaxPooling2D", conv_cls, "AveragePooling2D",
                     "Flatten", dense_cls]  # the final softmax layer is gone
    for layer in post.variational_model.layers:
        if not hasattr(layer, "kernel_posterior"):
            continue
        pairs = [(layer.kernel_posterior, layer.kernel_prior)]
        if layer.bias_posterior is not None:
            pairs.append((layer.bias_posterior, layer.bias_prior))
        for q, p in pairs:
            # Normal posteriors for kernels AND biases (not Deterministic).
            assert isinstance(q.distribution, tfd.Normal)
            assert isinstance(p.distribution, tfd.Normal)
            np.testing.assert_allclose(p.distribution.mean(), 0.0)
            np.testing.assert_allclose(p.distribution.stddev(), 0.7)
    # The second conv has no bias, so 2 + 1 + 2 posteriors.
    assert [q.shape for q in post.posterior_loc()] == list(
        post.network.param_shapes)


@pytest.mark.parametrize("make_model", [_mlp_with_every_layer, _small_cnn])
@pytest.mark.parametrize("estimator", vi.ESTIMATORS)
def test_layout_matches_keras_model_for_a_fixed_weight_draw(make_model, estimator):
    model = make_model()
    net = Network.from_keras(model)
    weights = [p[0] for p in _random_posterior(
        model, seed=1).sample_ensemble(1, seed=5).params]
    # With a negligible scale, every layer's noise vanishes: the variational
    # model is the deterministic network at ``weights``.
    post = vi.VIPosterior(net, weights,
                          [np.full(s, 1e-7, np.float32) for s in net.param_shapes],
                          estimator=estimator)
    x = _inputs(net, 16, seed=2)
    logits = post.variational_model(x, training=False).numpy()
    model.set_weights([w.numpy() for w in weights])
    keras_probs = np.asarray(model(x, training=False))
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), keras_probs,
                               atol=2e-5)
    np.testing.assert_allclose(logits, net.apply(weights, x).numpy(), atol=2e-5)
    # Logits, not probabilities: rows do not sum to one.
    assert np.abs(logits.sum(-1) - 1).max() > 1e-2


# ------------------------------------------------------------------ sampling
def test_sample_moments_match_posterior_loc_and_scale():
    post = _random_posterior(_small_cnn(), seed=3, scale_range=(0.05, 0.5))
    s = 4000
    ens = post.sample_ensemble(s, seed=11)
    assert isinstance(ens, PosteriorEnsemble) and ens.num_samples == s
    assert ens.metadata["method"] == "vi"
    locs, scales = post.posterior_loc(), post.posterior_scale()
    z_mean, z_std = [], []
    for p, m, sd in zip(ens.params, locs, scales):
        assert p.dtype == tf.float32 and p.shape == (s,) + m.shape
        p = p.numpy().astype(np.float64)
        z_mean.append(((p.mean(0) - m) / (sd / np.sqrt(s))).ravel())
        # The sample std has standard error ~ sigma / sqrt(2 (S - 1)).
        z_std.append(((p.std(0, ddof=1) - sd) / (sd / np.sqrt(2 * (s - 1)))).ravel())
    z_mean, z_std = np.concatenate(z_mean), np.concatenate(z_std)
    n = z_mean.size
    for z in (z_mean, z_std):
        assert np.abs(z).max() < 5.5
        assert abs(np.mean(z**2) - 1.0) < 5 * np.sqrt(2.0 / n)
    # Mean-field: different weights are uncorrelated across samples.
    kernel = ens.params[0].numpy().reshape(s, -1)
    corr = np.corrcoef(kernel[:, :20], rowvar=False)[np.triu_indices(20, 1)]
    assert np.abs(corr).max() < 5.5 / np.sqrt(s)


def test_sampling_is_deterministic_in_its_seed():
    post = _random_posterior(models.mlp((2,), 2, hidden=(8,)), seed=0)
    a, b = post.sample_ensemble(3, seed=7), post.sample_ensemble(3, seed=7)
    c = post.sample_ensemble(3, seed=[0, 7])
    for pa, pb, pc in zip(a.params, b.params, c.params):
        np.testing.assert_array_equal(pa.numpy(), pb.numpy())
        assert not np.array_equal(pa.numpy(), pc.numpy())
    x = _inputs(post.network, 5, seed=1)
    p7 = post.predict_proba_flipout(x, num_samples=20, seed=7)
    np.testing.assert_array_equal(
        p7, post.predict_proba_flipout(x, num_samples=20, seed=7))
    assert not np.array_equal(
        p7, post.predict_proba_flipout(x, num_samples=20, seed=8))


def test_ensemble_draws_are_the_same_with_and_without_xla():
    post = _random_posterior(_small_cnn(), seed=2)
    seed = [3, 9]
    ens = post.sample_ensemble(4, seed=seed)
    per_param = tf.unstack(seeds.split(seed, len(ens.params)))

    @tf.function(jit_compile=True)
    def xla_eps(shape, s):
        return seeds.normal(shape, s)

    for p, m, sd, s in zip(ens.params, post.posterior_loc(),
                           post.posterior_scale(), per_param):
        eps = xla_eps([4] + list(m.shape), s).numpy()
        # Equal up to the last bit of log/cos, which XLA and Eigen may round
        # differently; tf.random.stateless_normal differs entirely.
        np.testing.assert_allclose(p.numpy(), m + sd * eps, rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("make_model, scale_range, bias_scale_range", [
    (lambda: models.mlp((2, 3), 4, hidden=(16, 16)), (0.1, 0.5), None),
    (_small_cnn, (0.1, 0.5), None),
    # Noise in the biases only: checks that the layers sample their biases.
    (lambda: models.mlp((2, 3), 4, hidden=(16, 16)), (1e-7, 2e-7), (0.5, 1.5)),
])
def test_ensemble_predictive_agrees_with_flipout_monte_carlo(
        make_model, scale_range, bias_scale_range):
    # Larger locs than the initialiser's make the predictive far from both
    # uniform and the posterior mean's prediction.
    post = _random_posterior(make_model(), seed=4, scale_range=scale_range,
                             loc_gain=2.0, bias_scale_range=bias_scale_range)
    net = post.network
    x = _inputs(net, 48, seed=5)
    s, m = 2000, 400
    ens = post.sample_ensemble(s, seed=6)
    per_sample = tf.nn.softmax(ens.logits(x)).numpy()  # [S, B, C]
    p_ens = ens.predict_proba(x)
    np.testing.assert_allclose(p_ens, per_sample.mean(0), atol=1e-5)
    p_flip = post.predict_proba_flipout(x, num_samples=m, seed=7)
    assert p_flip.shape == p_ens.shape
    np.testing.assert_allclose(p_flip.sum(-1), 1.0, atol=1e-5)
    # Per example, a Flipout pass is an exact draw of softmax f(x, w), w ~ q,
    # so both estimates share the per-draw variance.  Near 0 or 1 the draws
    # are too skewed for a normal error bar, so those entries are left out.
    var = per_sample.var(0)
    se = np.sqrt(var / s + var / m)
    keep = (p_ens > 0.05) & (p_ens < 0.95)
    assert keep.mean() > 0.5

    def max_z(p):
        return np.abs((p - p_flip)[keep] / se[keep]).max()

    assert max_z(p_ens) < 5.0
    # The check has power: it rejects the posterior mean's prediction and an
    # ensemble with tripled scales.
    assert max_z(tf.nn.softmax(net.apply(post.posterior_loc(), x)).numpy()) > 5.0
    wide = vi.VIPosterior(net, post.posterior_loc(),
                          [3.0 * sc for sc in post.posterior_scale()])
    assert max_z(wide.sample_ensemble(s, seed=6).predict_proba(x)) > 5.0


def test_ensemble_feeds_the_gradient_code():
    post = _random_posterior(models.mlp((2,), 2, hidden=(8,)), seed=0)
    ens = post.sample_ensemble(5, seed=1)
    x = _inputs(post.network, 4, seed=2)
    y = np.array([0, 1, 1, 0], np.int32)
    grad = expected_loss_gradient(ens, x, y)
    # Independent: average of per-sample gradients from a GradientTape.
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
            tf.broadcast_to(y, [5, 4]), post.network.apply_stack(ens.params, xt))
        loss = tf.reduce_sum(tf.reduce_mean(ce, 0))
    np.testing.assert_allclose(grad, tape.gradient(loss, xt).numpy(), atol=1e-5)


# -------------------------------------------------------------- the training loss
@pytest.mark.parametrize("kl_weight, prior_scale", [(1.0, 1.0), (3.0, 0.5)])
def test_kl_term_enters_the_compiled_training_loss(kl_weight, prior_scale):
    ds = data.half_moons(n=250, seed=1)
    model = models.mlp((2,), 2, hidden=(16,))
    n, seed, init_scale = ds.train_x.shape[0], 3, 1e-4
    # One epoch of one full batch: the loss fit reports is computed before the
    # update, at the initial posterior (loc from the Keras initialisers).
    post = vi.fit(model, ds.train_x, ds.train_y, epochs=1, batch_size=n,
                  init_scale=init_scale, kl_weight=kl_weight,
                  prior_scale=prior_scale, seed=seed, verbose=0)
    vmodel = post.variational_model
    assert not vmodel.run_eagerly
    assert isinstance(vmodel.train_function, tf.types.experimental.GenericFunction)
    net = Network.from_keras(model)
    loc0 = [p.numpy() for p in net.init_params(seed)]
    logits = net.apply(loc0, ds.train_x).numpy().astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.mean(logp[np.arange(n), ds.train_y])
    kl = _closed_form_kl(loc0, [np.full(s, init_scale) for s in net.param_shapes],
                         prior_scale)
    expected = nll + kl_weight * kl / n
    assert kl_weight * kl / n > 2 * nll  # the KL term is far from negligible
    np.testing.assert_allclose(post.history["loss"][0], expected, rtol=2e-4)
    # And the public KL of the trained posterior is the closed form.
    np.testing.assert_allclose(
        post.kl_divergence(),
        _closed_form_kl(post.posterior_loc(), post.posterior_scale(), prior_scale),
        rtol=1e-4)


def test_huge_kl_weight_collapses_the_posterior_to_the_prior():
    ds = data.half_moons(n=250, seed=2)
    model = models.mlp((2,), 2, hidden=(6,))
    kwargs = dict(epochs=100, batch_size=50, learning_rate=0.05, prior_scale=0.5,
                  init_scale=1e-2, seed=0, verbose=0)
    collapsed = vi.fit(model, ds.train_x, ds.train_y, kl_weight=1e4, **kwargs)
    normal = vi.fit(model, ds.train_x, ds.train_y, kl_weight=1.0, **kwargs)

    def distance_to_prior(post):
        loc = np.concatenate([m.ravel() for m in post.posterior_loc()])
        scale = np.concatenate([s.ravel() for s in post.posterior_scale()])
        return np.abs(loc).max(), np.abs(scale - 0.5).max()

    loc_gap, scale_gap = distance_to_prior(collapsed)
    assert loc_gap < 0.1 and scale_gap < 0.1
    loc_gap1, scale_gap1 = distance_to_prior(normal)
    assert loc_gap1 > 0.5 and scale_gap1 > 0.3
    assert collapsed.kl_divergence() < 0.01 * normal.kl_divergence()


def test_same_seed_same_posterior_and_validation_split(moons):
    ds = moons.subset(num_train=400, seed=0)
    kwargs = dict(epochs=3, batch_size=64, learning_rate=1e-2,
                  validation_split=0.25, verbose=0)
    model = models.mlp((2,), 2, hidden=(8,))
    a = vi.fit(model, ds.train_x, ds.train_y, seed=5, **kwargs)
    b = vi.fit(model, ds.train_x, ds.train_y, seed=5, **kwargs)
    c = vi.fit(model, ds.train_x, ds.train_y, seed=6, **kwargs)
    # Bit for bit: every draw is a stateless function of the seed.
    assert a.history == b.history
    for get in ("posterior_loc", "posterior_untransformed_scale"):
        for ma, mb in zip(getattr(a, get)(), getattr(b, get)()):
            np.testing.assert_array_equal(ma, mb)
    assert max(np.abs(ma - mc).max()
               for ma, mc in zip(a.posterior_loc(), c.posterior_loc())) > 1e-2
    # The KL is divided by the points actually trained on.
    assert a.settings["num_train"] == 300 and a.settings["validation_size"] == 100
    assert len(a.history["val_loss"]) == 3 == a.settings["epochs_run"]


def _graph_op_types(function) -> set:
    """Op types of every traced graph of a tf.function, nested ones included."""
    types = set()
    for concrete in function._list_all_concrete_functions():  # pylint: disable=protected-access
        graph_def = concrete.graph.as_graph_def()
        types.update(node.op for node in graph_def.node)
        for fn in graph_def.library.function:
            types.update(node.op for node in fn.node_def)
    return types


def _stateful_random(types) -> set:
    return {t for t in types if t.startswith(
        ("Random", "Stateful", "TruncatedNormal", "Multinomial"))}


@pytest.mark.parametrize("estimator", vi.ESTIMATORS)
def test_training_and_prediction_draw_no_stateful_random_numbers(estimator):
    # Stateful RNG ops restart their stream in every new process (and every
    # retrace), so a resumed run would replay the first epochs' noise; all
    # noise must come from stateless seeds (Flipout signs, Gaussian
    # perturbations, dropout masks).
    model = keras.Sequential([
        keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3, activation="relu"),
        keras.layers.Flatten(), keras.layers.Dropout(0.25),
        keras.layers.Dense(3)])
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(24, 6, 6, 1)).astype(np.float32)
    y = rng.integers(0, 3, 24)
    post = vi.fit(model, x, y, epochs=1, batch_size=8, validation_split=0.25,
                  estimator=estimator, seed=0, verbose=0)
    post.predict_proba_flipout(x[:4], num_samples=2, seed=0)
    vmodel = post.variational_model
    for name in ("train_function", "test_function", "predict_fn"):
        fn = (post._predict_fn if name == "predict_fn"  # pylint: disable=protected-access
              else getattr(vmodel, name))
        types = _graph_op_types(fn)
        assert not _stateful_random(types), (name, _stateful_random(types))
        assert "StatelessRandomUniformFullIntV2" in types  # it did draw


def test_dropout_and_flipout_noise_change_from_step_to_step():
    # The per-step seeds really vary: with a vanishing learning rate and KL
    # the weights stay put, so one-step epochs differ in loss by their
    # noise (dropout at rate 0.5 and Flipout) alone; a seed fixed across
    # steps would repeat the loss to the last digits.
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16),
                              keras.layers.Dropout(0.5), keras.layers.Dense(2)])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = rng.integers(0, 2, 32)
    loss = vi.fit(model, x, y, epochs=3, batch_size=32, learning_rate=1e-9,
                  init_scale=0.3, kl_weight=1e-9, seed=3, verbose=0
                  ).history["loss"]
    assert min(abs(a - b) for a, b in
               ((loss[0], loss[1]), (loss[1], loss[2]), (loss[0], loss[2]))) > 1e-2


def test_default_compile_path_is_the_stochastic_one(monkeypatch):
    # Never timed: "auto" is TF's kernels on a CPU-only host and XLA with an
    # accelerator, like every stochastic computation of the package.
    monkeypatch.delenv("TFP_BNN_ADV_JIT", raising=False)
    x, y = np.zeros((8, 2), np.float32), np.array([0, 1] * 4)
    model = models.mlp((2,), 2, hidden=(4,))
    post = vi.fit(model, x, y, epochs=1, verbose=0)
    assert post.settings["jit_compile"] is xla.stochastic_jit("auto")
    monkeypatch.setenv("TFP_BNN_ADV_JIT", "default")
    assert vi.fit(model, x, y, epochs=1, verbose=0).settings[
        "compile_path"] == "default"


def test_compile_path_is_an_argument_recorded_in_the_settings():
    ds = data.half_moons(n=200, seed=3)
    model = models.mlp((2,), 2, hidden=(8,))
    kwargs = dict(epochs=2, batch_size=40, learning_rate=1e-2, seed=1,
                  verbose=0)
    default = vi.fit(model, ds.train_x, ds.train_y, jit_compile=False, **kwargs)
    assert default.settings["jit_compile"] is False
    assert default.settings["compile_path"] == "default"
    assert default.variational_model.jit_compile is False
    compiled = vi.fit(model, ds.train_x, ds.train_y, jit_compile=True, **kwargs)
    assert compiled.settings["jit_compile"] is True
    assert compiled.settings["compile_path"] == "xla"
    # The noise is drawn with the same ops on both paths (seeds.normal,
    # seeds.bits), so the two posteriors differ by float rounding only;
    # with TensorFlow's own samplers they would differ at the first step.
    for a, b in zip(default.posterior_loc() + default.posterior_scale(),
                    compiled.posterior_loc() + compiled.posterior_scale()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_early_stopping_on_validation_loss(moons):
    ds = moons.subset(num_train=300, seed=1)
    val = moons.subset(num_train=100, seed=2)
    post = vi.fit(models.mlp((2,), 2, hidden=(8,)), ds.train_x, ds.train_y,
                  epochs=300, batch_size=300, learning_rate=0.05,
                  validation_data=(val.train_x, val.train_y),
                  early_stopping_patience=2, seed=0, verbose=0)
    run = post.settings["epochs_run"]
    assert run < 300 and len(post.history["val_loss"]) == run


# ------------------------------------------------------------------ accuracy
def test_half_moons_accuracy(moons):
    post = vi.fit(models.mlp((2,), 2, hidden=(64, 64)), moons.train_x,
                  moons.train_y, epochs=30, batch_size=128, learning_rate=1e-2,
                  seed=0, verbose=0)
    acc = post.sample_ensemble(100, seed=1).accuracy(moons.test_x, moons.test_y)
    assert acc >= 0.95


def test_fashion_mnist_accuracy():
    ds = data.fashion_mnist().subset(num_train=10000, num_test=2000, seed=0)
    post = vi.fit(models.mlp(ds.input_shape, 10, hidden=(512,)), ds.train_x,
                  ds.train_y, epochs=5, batch_size=128, learning_rate=1e-3,
                  seed=0, verbose=0)
    ens = post.sample_ensemble(20, seed=1)
    assert ens.accuracy(ds.test_x, ds.test_y) >= 0.80


# ----------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path, moons):
    ds = moons.subset(num_train=200, seed=0)
    post = vi.fit(models.mlp((2,), 2, hidden=(8,)), ds.train_x, ds.train_y, epochs=2,
                  batch_size=50, prior_scale=0.8, kl_weight=2.0,
                  estimator="reparameterization", seed=4, verbose=0)
    path = str(tmp_path / "post.npz")
    post.save(path)
    loaded = vi.VIPosterior.load(path)
    assert loaded.settings == post.settings and loaded.history == post.history
    assert loaded.network.param_shapes == post.network.param_shapes
    # Bit for bit (format 1 stored softplus(rho), whose inverse was off by
    # up to ~5e-9).
    for get in ("posterior_loc", "posterior_scale",
                "posterior_untransformed_scale"):
        for a, b in zip(getattr(loaded, get)(), getattr(post, get)()):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(loaded.sample_ensemble(3, seed=2).params,
                    post.sample_ensemble(3, seed=2).params):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(
        loaded.predict_proba_flipout(ds.test_x[:20], 5, 1),
        post.predict_proba_flipout(ds.test_x[:20], 5, 1))


def test_load_reads_format_version_1(tmp_path):
    post = _random_posterior(models.mlp((2,), 2, hidden=(4,)), seed=0)
    arrays, meta = files.load_arrays(_saved(post, tmp_path))
    # A version-1 file as today's main wrote it: scale_i = softplus(rho_i).
    arrays = {k.replace("untransformed_scale", "scale"): v
              for k, v in arrays.items()}
    for i, sd in enumerate(post.posterior_scale()):
        arrays[f"scale_{i}"] = sd
    meta["format_version"] = 1
    files.save_arrays(str(tmp_path / "v1.npz"), arrays, meta)
    loaded = vi.VIPosterior.load(str(tmp_path / "v1.npz"))
    for a, b in zip(loaded.posterior_loc(), post.posterior_loc()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(loaded.posterior_scale(), post.posterior_scale()):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    arrays["scale_0"] = -arrays["scale_0"]
    files.save_arrays(str(tmp_path / "negative.npz"), arrays, meta)
    with pytest.raises(ValueError, match="scale for"):
        vi.VIPosterior.load(str(tmp_path / "negative.npz"))


def _saved(post, tmp_path):
    path = str(tmp_path / "post.npz")
    post.save(path)
    return path


def test_load_rejects_bad_files(tmp_path):
    post = _random_posterior(models.mlp((2,), 2, hidden=(4,)), seed=0)
    good = str(tmp_path / "good.npz")
    post.save(good)
    raw = open(good, "rb").read()

    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        vi.VIPosterior.load(str(corrupt))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        vi.VIPosterior.load(str(garbage))
    with pytest.raises(FileNotFoundError):
        vi.VIPosterior.load(str(tmp_path / "missing.npz"))

    ens_path = str(tmp_path / "ensemble.npz")
    post.sample_ensemble(2, seed=0).save(ens_path)
    with pytest.raises(ValueError, match="not a saved VIPosterior"):
        vi.VIPosterior.load(ens_path)

    arrays, meta = files.load_arrays(good)
    del arrays["untransformed_scale_1"]
    files.save_arrays(str(tmp_path / "missing_array.npz"), arrays, meta)
    with pytest.raises(ValueError, match="untransformed_scale_0"):
        vi.VIPosterior.load(str(tmp_path / "missing_array.npz"))

    arrays, meta = files.load_arrays(good)
    arrays["untransformed_scale_0"][0, 0] = np.nan
    files.save_arrays(str(tmp_path / "nan.npz"), arrays, meta)
    with pytest.raises(ValueError, match="untransformed_scale for"):
        vi.VIPosterior.load(str(tmp_path / "nan.npz"))

    arrays, meta = files.load_arrays(good)
    arrays["loc_0"] = arrays["loc_0"][:, :2]
    files.save_arrays(str(tmp_path / "shape.npz"), arrays, meta)
    with pytest.raises(ValueError, match="shape"):
        vi.VIPosterior.load(str(tmp_path / "shape.npz"))

    for version in (vi.FORMAT_VERSION + 1, "2", 0):
        arrays, meta = files.load_arrays(good)
        meta["format_version"] = version
        files.save_arrays(str(tmp_path / "version.npz"), arrays, meta)
        with pytest.raises(ValueError, match="format version"):
            vi.VIPosterior.load(str(tmp_path / "version.npz"))


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(epochs=0), ValueError, "epochs"),
    (dict(epochs=-3), ValueError, "epochs"),
    (dict(epochs=2.5), TypeError, "epochs"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(learning_rate=0.0), ValueError, "learning_rate"),
    (dict(learning_rate=-1e-3), ValueError, "learning_rate"),
    (dict(learning_rate=float("nan")), ValueError, "learning_rate"),
    (dict(prior_scale=0.0), ValueError, "prior_scale"),
    (dict(init_scale=-1.0), ValueError, "init_scale"),
    (dict(kl_weight=0.0), ValueError, "kl_weight"),
    (dict(estimator="local"), ValueError, "estimator"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(verbose=3), ValueError, "verbose"),
    (dict(jit_compile="yes"), ValueError, "jit_compile"),
    (dict(checkpoint_dir=3), TypeError, "checkpoint_dir"),
    (dict(checkpoint_dir=""), ValueError, "checkpoint_dir"),
    (dict(validation_split=1.0), ValueError, "validation_split"),
    (dict(validation_split="0.1"), TypeError,
     "validation_split must be a real number"),
    (dict(learning_rate=True), TypeError, "learning_rate must be a real number"),
    (dict(seed=2**31), ValueError, "seed must be in"),
    (dict(estimator=["flipout"]), ValueError, "estimator must be one of"),
    (dict(early_stopping_patience=2), ValueError, "validation data"),
    (dict(early_stopping_patience=0, validation_split=0.2), ValueError,
     "early_stopping_patience"),
    (dict(validation_split=0.2, validation_data=(np.zeros((2, 2)), [0, 1])),
     ValueError, "not both"),
    (dict(validation_data=(np.zeros((2, 3)), [0, 1])), ValueError,
     r"validation_data\[0\]"),
])
def test_fit_rejects_bad_arguments(kwargs, error, match):
    x, y = np.zeros((8, 2), np.float32), np.array([0, 1] * 4)
    with pytest.raises(error, match=match):
        vi.fit(models.mlp((2,), 2, hidden=(4,)), x, y, **{"verbose": 0, **kwargs})


def test_fit_rejects_bad_data_and_layers():
    model = models.mlp((2,), 2, hidden=(4,))
    with pytest.raises(ValueError, match="train_y has label 2"):
        vi.fit(model, np.zeros((3, 2)), [0, 1, 2], verbose=0)
    with pytest.raises(ValueError, match="train_x has shape"):
        vi.fit(model, np.zeros((3, 5)), [0, 1, 1], verbose=0)
    with pytest.raises(ValueError, match="train_y has 2 labels"):
        vi.fit(model, np.zeros((3, 2)), [0, 1], verbose=0)
    # (Every layer Network imports is supported, BatchNormalization included:
    # tests/test_vi_generic.py; a subclassed model is refused there.)
    with pytest.raises(TypeError, match="keras.Model"):
        vi.fit("not a model", np.zeros((3, 2)), [0, 1, 1], verbose=0)


def test_posterior_methods_reject_bad_arguments():
    post = _random_posterior(models.mlp((2,), 2, hidden=(4,)), seed=0)
    net = post.network
    for bad, error in ((0, ValueError), (-2, ValueError), (1.5, TypeError)):
        with pytest.raises(error, match="num_samples"):
            post.sample_ensemble(bad, seed=0)
        with pytest.raises(error, match="num_samples"):
            post.predict_proba_flipout(np.zeros((2, 2)), num_samples=bad)
    with pytest.raises(ValueError, match="seed"):
        post.sample_ensemble(2, seed=[1, 2, 3])
    with pytest.raises(TypeError, match="seed"):
        post.sample_ensemble(2, seed=None)
    with pytest.raises(ValueError, match="x has shape"):
        post.predict_proba_flipout(np.zeros((2, 3)), num_samples=2)
    loc = [np.zeros(s, np.float32) for s in net.param_shapes]
    scale = [np.ones(s, np.float32) for s in net.param_shapes]
    scale[1][0] = 0.0
    with pytest.raises(ValueError, match="scale for"):
        vi.VIPosterior(net, loc, scale)
    with pytest.raises(ValueError, match="loc has 3 tensors"):
        vi.VIPosterior(net, loc[:3], scale)


@pytest.mark.parametrize("tail", ["dense_softmax_dropout",
                                  "activation_softmax_flatten"])
def test_softmax_before_trailing_identity_layers_is_not_applied(tail):
    """The variational model outputs logits when the Keras model's softmax
    is followed by Dropout or Flatten: rows of probabilities would sum to 1
    and be positive; logits of a freshly initialised net do not."""
    if tail == "dense_softmax_dropout":
        head = [keras.layers.Dense(3, activation="softmax"),
                keras.layers.Dropout(0.0)]
    else:
        head = [keras.layers.Dense(3), keras.layers.Activation("softmax"),
                keras.layers.Flatten()]
    model = keras.Sequential([keras.Input((2,)),
                              keras.layers.Dense(8, activation="relu")] + head)
    x = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32) * 3
    y = (x[:, 0] > 0).astype(np.int32)
    post = vi.fit(model, x, y, epochs=1, seed=0, verbose=0)
    out = post.variational_model(x, training=False).numpy()
    assert np.min(out) < 0 or not np.allclose(out.sum(axis=-1), 1.0, atol=1e-3)
