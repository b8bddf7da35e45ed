"""The training-side switches that reproduce the authors' code (PAPER.md,
"The original code, exactly", items 8-10), each off by default.

Expected values come from independent computations: NumPy forward passes
of the Leaky-ReLU nets, a NumPy re-derivation of the half-moons pool and of
today's per-feature scaling, the sample moments of N(0, 1) and of a
standard normal's mass within one sd, the closed-form normal-normal KL,
and NumPy's softplus.
"""

import keras
import numpy as np
import pytest
import tf_keras

from tfp_bnn_adv import data
from tfp_bnn_adv import files
from tfp_bnn_adv import models
from tfp_bnn_adv.inference import hmc
from tfp_bnn_adv.inference import sgd
from tfp_bnn_adv.inference import vi
from tfp_bnn_adv.network import Network


# ------------------------------------------------------------------ helpers
def _numpy_mlp(params, x, slope):
    """Logits of a Dense/Leaky-ReLU stack with kernels and biases ``params``
    (alternating), computed in float64."""
    h = np.asarray(x, np.float64).reshape(len(x), -1)
    pairs = list(zip(params[::2], params[1::2]))
    for i, (k, b) in enumerate(pairs):
        h = h @ np.float64(k) + np.float64(b)
        if i < len(pairs) - 1:
            h = np.where(h > 0, h, slope * h)
    return h


def _closed_form_kl(loc, scale, prior_scale=1.0):
    """sum KL(N(m, s^2) || N(0, p^2)) = log(p/s) + (s^2 + m^2)/(2 p^2) - 1/2."""
    return sum(np.sum(np.log(prior_scale / np.float64(s)) + (
        np.float64(s)**2 + np.float64(m)**2) / (2 * prior_scale**2) - 0.5)
               for m, s in zip(loc, scale))


def _moons_numpy(n, noise, rng):
    """The half-moons generator, written out: class 0 then class 1, noise."""
    t0 = rng.uniform(0.0, np.pi, size=n // 2)
    t1 = rng.uniform(0.0, np.pi, size=n - n // 2)
    x = np.concatenate([np.c_[np.cos(t0), np.sin(t0)],
                        np.c_[1.0 - np.cos(t1), 0.5 - np.sin(t1)]])
    y = np.r_[np.zeros(n // 2), np.ones(n - n // 2)].astype(np.int32)
    return x + rng.normal(0.0, noise, size=x.shape), y


def _split(x, y, n, test_fraction):
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    return x[:n - n_test], y[:n - n_test], x[n - n_test:], y[n - n_test:]


@pytest.fixture(scope="module")
def moons():
    return data.half_moons(n=200, seed=3)


# ------------------------------------------------------- Leaky-ReLU slope
def test_negative_slope_builds_dense_then_leaky_relu_with_that_slope():
    model = models.mlp((2,), 2, hidden=(16, 8), negative_slope=0.01)
    assert [type(layer).__name__ for layer in model.layers] == [
        "Dense", "LeakyReLU", "Dense", "LeakyReLU", "Dense"]
    assert all(layer.get_config()["activation"] == "linear"
               for layer in model.layers if isinstance(layer, keras.layers.Dense))
    # Many negative pre-activations: wide inputs around zero.
    x = np.random.default_rng(0).normal(0.0, 3.0, (64, 2)).astype(np.float32)
    weights = model.get_weights()
    keras_out = model(x).numpy()
    np.testing.assert_allclose(keras_out, _numpy_mlp(weights, x, 0.01),
                               rtol=1e-5, atol=1e-5)
    # Keras' string activation has slope 0.2; it gives other logits.
    assert np.abs(keras_out - _numpy_mlp(weights, x, 0.2)).max() > 1e-2
    # The slope itself, on negative inputs.
    leaky = model.layers[1]
    neg = -np.linspace(0.1, 5.0, 11, dtype=np.float32)[None]
    np.testing.assert_allclose(leaky(neg).numpy(), 0.01 * neg, rtol=1e-6)
    net = Network.from_keras(model)
    np.testing.assert_allclose(net.apply(weights, x).numpy(), keras_out,
                               rtol=1e-5, atol=1e-6)


def test_default_slope_keeps_the_keras_string_activation():
    model = models.mlp((2,), 2, hidden=(16, 8))
    assert [type(layer).__name__ for layer in model.layers] == ["Dense"] * 3
    assert [layer.get_config()["activation"] for layer in model.layers] == [
        "leaky_relu", "leaky_relu", "linear"]
    x = np.random.default_rng(1).normal(0.0, 3.0, (64, 2)).astype(np.float32)
    np.testing.assert_allclose(model(x).numpy(),
                               _numpy_mlp(model.get_weights(), x, 0.2),
                               rtol=1e-5, atol=1e-5)


def test_paper_mnist_net_2x512_with_slope_0_01():
    model = models.mlp((28, 28, 1), 10, hidden=(512, 512), negative_slope=0.01)
    net = Network.from_keras(model)
    assert net.param_shapes == ((784, 512), (512,), (512, 512), (512,),
                                (512, 10), (10,))
    x = np.random.default_rng(2).uniform(size=(8, 28, 28, 1)).astype(np.float32)
    weights = [w + np.random.default_rng(3).normal(0, 0.1, w.shape).astype(
        np.float32) for w in model.get_weights()]  # non-zero biases
    model.set_weights(weights)
    expected = _numpy_mlp(weights, x, 0.01)
    np.testing.assert_allclose(model(x).numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(net.apply(weights, x).numpy(), expected,
                               rtol=1e-4, atol=1e-4)


def test_cnn_negative_slope_matches_the_network_function():
    model = models.cnn((12, 12, 1), 3, filters=(4, 5), kernel_size=3,
                       hidden=(6,), activation="leaky_relu", negative_slope=0.01)
    assert [type(layer).__name__ for layer in model.layers] == [
        "Conv2D", "LeakyReLU", "MaxPooling2D", "Conv2D", "LeakyReLU",
        "MaxPooling2D", "Flatten", "Dense", "LeakyReLU", "Dense"]
    assert all(layer.negative_slope == pytest.approx(0.01)
               for layer in model.layers
               if isinstance(layer, keras.layers.LeakyReLU))
    x = np.random.default_rng(4).normal(size=(5, 12, 12, 1)).astype(np.float32)
    net = Network.from_keras(model)
    np.testing.assert_allclose(net.apply(model.get_weights(), x).numpy(),
                               model(x).numpy(), rtol=1e-5, atol=1e-5)


def _check_slope_net_ensemble(ens, x):
    """Every weight set's logits are the NumPy slope-0.01 forward pass."""
    params = [p.numpy() for p in ens.params]
    logits = ens.logits(x)
    for s in range(ens.num_samples):
        np.testing.assert_allclose(
            logits[s], _numpy_mlp([p[s] for p in params], x, 0.01),
            rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["hmc", "vi", "sgd"])
def test_every_inference_accepts_the_slope_0_01_net(moons, method):
    model = models.mlp((2,), 2, hidden=(8, 8), negative_slope=0.01)
    x = np.random.default_rng(5).normal(0.0, 3.0, (16, 2)).astype(np.float32)
    if method == "hmc":
        ens, _ = hmc.sample(model, moons.train_x, moons.train_y, num_chains=2,
                            num_burnin_steps=4, num_results=2, step_size=0.01,
                            num_leapfrog_steps=2, seed=1, jit_compile=False)
    elif method == "vi":
        post = vi.fit(model, moons.train_x, moons.train_y, epochs=1,
                      batch_size=64, seed=1, init="paper", verbose=0)
        slopes = [layer.alpha for layer in post.variational_model.layers
                  if isinstance(layer, tf_keras.layers.LeakyReLU)]
        assert slopes == [pytest.approx(0.01)] * 2
        ens = post.sample_ensemble(3, seed=2)
    else:
        ens = sgd.train(model, moons.train_x, moons.train_y, epochs=1,
                        batch_size=64, seed=1, verbose=0)
    _check_slope_net_ensemble(ens, x)


# ----------------------------------------------------------- VI init="paper"
def _initial_posterior(model, moons, **kwargs):
    """The posterior after one Adam step of 1e-7: Adam moves every parameter
    by at most the learning rate, so this is the initial one to 1e-7."""
    kwargs = {"epochs": 1, "batch_size": moons.train_x.shape[0],
              "learning_rate": 1e-7, "verbose": 0, **kwargs}
    return vi.fit(model, moons.train_x, moons.train_y, **kwargs)


def test_paper_init_draws_loc_and_rho_from_a_standard_normal(moons):
    model = models.mlp((2,), 2, hidden=(300, 10))
    post = _initial_posterior(model, moons, init="paper", seed=11)
    loc, rho = post.posterior_loc(), post.posterior_untransformed_scale()
    for name, tensors in (("loc", loc), ("rho", rho)):
        flat = np.concatenate([t.ravel() for t in tensors]).astype(np.float64)
        n = flat.size  # 2*300 + 300 + 300*10 + 10 + 10*2 + 2 = 3932
        assert abs(flat.mean()) < 4 / np.sqrt(n), name
        assert abs(flat.std() - 1) < 4 / np.sqrt(2 * n), name
        # Normal, not just unit variance: 68.27% within one sd.
        assert abs(np.mean(np.abs(flat) < 1) - 0.6827) < 4 * 0.466 / np.sqrt(n)
        # Every weight and bias, kernels and biases alike.
        for t in tensors:
            if t.size >= 300:
                assert abs(t.std() - 1) < 0.15, (name, t.shape)
    for scale, r in zip(post.posterior_scale(), rho):
        np.testing.assert_allclose(scale, np.log1p(np.exp(np.float64(r))),
                                   rtol=1e-6)
    # loc and rho (and the tensors among themselves) are independent draws.
    assert abs(np.corrcoef(loc[0].ravel(), rho[0].ravel())[0, 1]) < 0.15
    assert not np.allclose(loc[1], rho[1])
    assert post.settings["init"] == "paper"
    assert post.settings["init_scale"] is None


def test_default_init_is_the_keras_initialiser_and_init_scale(moons):
    model = models.mlp((2,), 2, hidden=(300, 10))
    post = _initial_posterior(model, moons, seed=11, init_scale=0.05)
    expected = Network.from_keras(model).init_params(11)
    for m, e in zip(post.posterior_loc(), expected):
        np.testing.assert_allclose(m, e.numpy(), atol=2e-7)
    for s in post.posterior_scale():
        np.testing.assert_allclose(s, 0.05, atol=2e-7)
    assert post.settings["init"] == "default"
    assert post.settings["init_scale"] == 0.05


def test_kl_weight_n_over_b_scales_only_the_kl_term(moons):
    # One full batch: the epoch's loss is the loss at the initial posterior,
    # with the same Flipout noise for both weights (same seed, same step).
    model = models.mlp((2,), 2, hidden=(16,), negative_slope=0.01)
    n = moons.train_x.shape[0]
    a = n / 16  # the authors' N / B for batches of 16
    heavy = _initial_posterior(model, moons, init="paper", seed=2, kl_weight=a)
    plain = _initial_posterior(model, moons, init="paper", seed=2)
    kl = plain.kl_divergence()
    np.testing.assert_allclose(
        kl, _closed_form_kl(plain.posterior_loc(), plain.posterior_scale()),
        rtol=1e-5)
    difference = heavy.history["loss"][0] - plain.history["loss"][0]
    assert (a - 1) * kl / n > 1  # far from rounding: a real test of the weight
    np.testing.assert_allclose(difference, (a - 1) * kl / n, rtol=1e-4)
    assert heavy.settings["kl_weight"] == a


def test_init_enters_the_checkpoint_fingerprint_and_the_saved_settings(
        moons, tmp_path):
    model = models.mlp((2,), 2, hidden=(6,))
    kwargs = dict(batch_size=64, seed=4, verbose=0)
    ckpt = str(tmp_path / "ckpt")
    vi.fit(model, moons.train_x, moons.train_y, epochs=1, init="paper",
           checkpoint_dir=ckpt, **kwargs)
    with pytest.raises(ValueError, match="init is 'paper' there but 'default'"):
        vi.fit(model, moons.train_x, moons.train_y, epochs=2,
               checkpoint_dir=ckpt, **kwargs)
    resumed = vi.fit(model, moons.train_x, moons.train_y, epochs=2,
                     init="paper", checkpoint_dir=ckpt, **kwargs)
    whole = vi.fit(model, moons.train_x, moons.train_y, epochs=2,
                   init="paper", **kwargs)
    for r, w in zip(resumed.posterior_untransformed_scale(),
                    whole.posterior_untransformed_scale()):
        np.testing.assert_array_equal(r, w)
    path = str(tmp_path / "post.npz")
    resumed.save(path)
    loaded = vi.VIPosterior.load(path)
    assert loaded.settings["init"] == "paper"
    assert loaded.settings["init_scale"] is None
    for r, w in zip(loaded.posterior_untransformed_scale(),
                    whole.posterior_untransformed_scale()):
        np.testing.assert_array_equal(r, w)


def test_checkpoints_from_before_init_resume_as_default(moons, tmp_path):
    model = models.mlp((2,), 2, hidden=(6,))
    kwargs = dict(batch_size=64, seed=4, verbose=0)
    ckpt = str(tmp_path / "ckpt")
    vi.fit(model, moons.train_x, moons.train_y, epochs=1, checkpoint_dir=ckpt,
           **kwargs)
    path = str(tmp_path / "ckpt" / vi.CHECKPOINT_FILE)
    arrays, meta = files.load_arrays(path)
    del meta["config"]["init"]  # as written before the option existed
    files.save_arrays(path, arrays, meta)
    with pytest.raises(ValueError, match="init is 'default' there but 'paper'"):
        vi.fit(model, moons.train_x, moons.train_y, epochs=2, init="paper",
               checkpoint_dir=ckpt, **kwargs)
    resumed = vi.fit(model, moons.train_x, moons.train_y, epochs=2,
                     checkpoint_dir=ckpt, **kwargs)
    assert resumed.settings["epochs_run"] == 2
    assert resumed.history["loss"][0] == meta["history"]["loss"][0]


# ------------------------------------------------- half-moons, paper scaling
@pytest.mark.parametrize("seed, n, noise", [(0, 1000, 0.1), (5, 301, 0.3)])
def test_paper_scaling_is_one_global_min_max_over_the_pool(seed, n, noise):
    ds = data.half_moons(n=n, noise=noise, seed=seed, scaling="paper")
    rng = np.random.default_rng(seed)
    pool_x, pool_y = _moons_numpy(30000, noise, rng)
    lo, hi = pool_x.min(), pool_x.max()  # scalars over both features
    scaled = ((pool_x - lo) / (hi - lo)).astype(np.float32)
    order = rng.permutation(30000)[:n]
    expected = _split(scaled[order], pool_y[order], n, 0.2)
    for got, want in zip((ds.train_x, ds.train_y, ds.test_x, ds.test_y),
                         expected):
        np.testing.assert_array_equal(got, want)
    union = np.concatenate([ds.train_x, ds.test_x])
    assert union.min() >= 0 and union.max() <= 1
    # Not per-feature: the second feature's range is well inside [0, 1].
    assert union[:, 1].max() - union[:, 1].min() < 0.9
    assert 0.4 < np.mean(np.r_[ds.train_y, ds.test_y]) < 0.6


def test_paper_scaling_whole_pool_spans_0_1_once():
    ds = data.half_moons(n=30000, seed=2, scaling="paper")
    x = np.concatenate([ds.train_x, ds.test_x])
    assert x.min() == 0 and x.max() == 1
    # Feature 0 spans the pool's extremes; feature 1 is scaled by the same
    # scalar, so it does not reach 0 or 1.
    assert x[:, 0].min() == 0 and x[:, 0].max() == 1
    assert x[:, 1].min() > 0.05 and x[:, 1].max() < 0.95


def test_paper_scaling_takes_a_prefix_of_the_same_pool():
    small = data.half_moons(n=100, seed=4, scaling="paper")
    large = data.half_moons(n=1000, seed=4, scaling="paper")
    np.testing.assert_array_equal(small.train_x, large.train_x[:80])
    np.testing.assert_array_equal(small.test_x, large.train_x[80:100])
    smaller_pool = data.half_moons(n=100, seed=4, scaling="paper",
                                   pool_size=100)
    assert not np.array_equal(smaller_pool.train_x, small.train_x)
    via_loader = data.load_dataset("half_moons", n=100, seed=4,
                                   scaling="paper")
    np.testing.assert_array_equal(via_loader.train_x, small.train_x)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_default_scaling_is_per_feature_over_the_n_points(seed):
    ds = data.half_moons(n=257, noise=0.3, seed=seed, test_fraction=0.5)
    rng = np.random.default_rng(seed)
    x, y = _moons_numpy(257, 0.3, rng)
    x = ((x - x.min(0)) / (x.max(0) - x.min(0))).astype(np.float32)
    order = rng.permutation(257)
    expected = _split(x[order], y[order], 257, 0.5)
    for got, want in zip((ds.train_x, ds.train_y, ds.test_x, ds.test_y),
                         expected):
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("call, error, match", [
    (lambda: models.mlp((2,), 2, activation="relu", negative_slope=0.01),
     ValueError, r"negative_slope=0.01 .*activation='relu'"),
    (lambda: models.cnn((8, 8, 1), 2, negative_slope=0.01), ValueError,
     r"negative_slope=0.01 .*activation='relu'"),
    (lambda: models.mlp((2,), 2, negative_slope=-0.1), ValueError,
     r"negative_slope must be finite and >= 0, got -0.1"),
    (lambda: models.mlp((2,), 2, negative_slope="0.01"), TypeError,
     "negative_slope must be a real number"),
    (lambda: data.half_moons(10, scaling="global"), ValueError,
     r"scaling must be one of \('per_feature', 'paper'\), got 'global'"),
    (lambda: data.half_moons(10, scaling="paper", pool_size=9), ValueError,
     r"pool_size must be >= n=10 .*got pool_size=9"),
    (lambda: data.half_moons(10, scaling="paper", pool_size=20.0), TypeError,
     "pool_size must be an int, got 20.0"),
    (lambda: data.half_moons(10, pool_size=100), ValueError,
     r"pool_size=100 applies only to scaling='paper'"),
])
def test_bad_model_and_data_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(init="Paper"), ValueError,
     r"init must be one of \('default', 'paper'\), got 'Paper'"),
    (dict(init=None), ValueError, "init must be one of"),
    (dict(init="paper", init_scale=0.1), ValueError,
     r"init_scale=0.1 has no effect with init='paper'"),
])
def test_bad_vi_init_arguments(kwargs, error, match):
    x, y = np.zeros((8, 2), np.float32), np.array([0, 1] * 4)
    with pytest.raises(error, match=match):
        vi.fit(models.mlp((2,), 2, hidden=(4,)), x, y, verbose=0, **kwargs)

