"""HMC: known posteriors, a BNN on half-moons, resume, shapes and bad input.

Every expectation is computed independently of the sampler: closed-form
Gaussians, a logistic-regression posterior by grid quadrature in NumPy, a
hand-written MLP likelihood, SciPy's normal density and a NumPy R-hat.
Tolerances come from the Monte Carlo error: |estimate - truth| < 4 sd / sqrt(ESS).
"""

import json
import os

import keras
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
from scipy import stats  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position
import tensorflow_probability as tfp  # pylint: disable=wrong-import-position

from tfp_bnn_adv import data  # pylint: disable=wrong-import-position
from tfp_bnn_adv import files  # pylint: disable=wrong-import-position
from tfp_bnn_adv import models  # pylint: disable=wrong-import-position
from tfp_bnn_adv.inference import hmc  # pylint: disable=wrong-import-position
from tfp_bnn_adv.network import Network  # pylint: disable=wrong-import-position


# --------------------------------------------------------------------------
# Independent references.
# --------------------------------------------------------------------------
def _ess(z):
    """Pooled effective sample size of a ``[R, C]`` series."""
    return float(tfp.mcmc.effective_sample_size(
        tf.constant(z, tf.float64), filter_beyond_positive_pairs=True,
        cross_chain_dims=1))


def _check_moments(samples, mean, cov):
    """Sample mean and covariance of ``[R, C, D]`` draws vs the truth.

    Each estimate is the average of a series (x_i, or centred products
    x_i x_j) and must lie within 4 Monte Carlo standard errors: the series'
    spread over the square root of the smallest ESS of all series, because a
    slowly mixing direction leaks into every coordinate while a fast one can
    make a single series' ESS look larger than it is.
    """
    d = samples.shape[-1]
    centred = samples - mean
    series = {("mean", i): samples[..., i] for i in range(d)}
    series.update({("cov", i, j): centred[..., i] * centred[..., j]
                   for i in range(d) for j in range(i, d)})
    ess = min(_ess(z) for z in series.values())
    assert ess > 100, ess  # otherwise the test would prove little
    for key, z in series.items():
        truth = mean[key[1]] if key[0] == "mean" else cov[key[1], key[2]]
        err = 4 * z.std() / np.sqrt(ess)
        assert abs(z.mean() - truth) < err, (key, z.mean(), truth, err)


def _logistic_data():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(40, 2)).astype(np.float32)
    logit = 0.5 + 1.0 * x[:, 0] - 1.5 * x[:, 1]
    y = (rng.uniform(size=40) < 1 / (1 + np.exp(-logit))).astype(np.int32)
    return x, y


def _rhat_numpy(trace):
    """Split R-hat (Brooks and Gelman's corrected form, as TFP) of [R, C]."""
    r = trace.shape[0] // 2
    chains = np.concatenate([trace[:r], trace[r:2 * r]], axis=1)
    n, m = chains.shape
    w = chains.var(axis=0, ddof=1).mean()
    b_div_n = chains.mean(axis=0).var(ddof=1)
    sigma2 = (n - 1) / n * w + b_div_n
    return (m + 1) / m * sigma2 / w - (n - 1) / (m * n)


def _keras_log_likelihood(network, params, x, y):
    """Per weight set, the summed log-likelihood from Keras, one at a time."""
    model = keras.models.clone_model(network.keras_model)
    out = []
    for s in range(params[0].shape[0]):
        model.set_weights([np.asarray(p[s]) for p in params])
        logp = tf.nn.log_softmax(model(x)).numpy().astype(np.float64)
        out.append(logp[np.arange(len(y)), y].sum())
    return np.array(out)


def _mlp_log_likelihood(params, x, y):
    """A hand-written 2-layer leaky-ReLU MLP likelihood for every chain."""
    k1, b1, k2, b2 = params
    h = tf.einsum("ni,cio->cno", x, k1) + b1[:, None]
    h = tf.nn.leaky_relu(h, alpha=0.2)
    logits = tf.einsum("cni,cio->cno", h, k2) + b2[:, None]
    logp = tf.nn.log_softmax(logits)
    return tf.reduce_sum(logp * tf.one_hot(y, logits.shape[-1])[None],
                         axis=[1, 2])


# --------------------------------------------------------------------------
# The target density.
# --------------------------------------------------------------------------
def test_shard_data_pads_with_masked_rows():
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10, dtype=np.int32)
    xs, ys, ms = hmc.shard_data(x, y, 4)
    assert xs.shape == (3, 4, 2) and ys.shape == (3, 4) and ms.shape == (3, 4)
    keep = ms.numpy().reshape(-1) == 1
    np.testing.assert_array_equal(xs.numpy().reshape(-1, 2)[keep], x)
    np.testing.assert_array_equal(ys.numpy().reshape(-1)[keep], y)
    assert keep.sum() == 10


def test_log_likelihood_and_gradient_match_independent_mlp():
    net = Network.from_keras(models.mlp((3,), 4, (5,)))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 3)).astype(np.float32)
    y = rng.integers(0, 4, size=23).astype(np.int32)
    params = [tf.constant(rng.normal(size=(3,) + s).astype(np.float32))
              for s in net.param_shapes]
    expected = _keras_log_likelihood(net, params, x, y)
    with tf.GradientTape() as tape:
        tape.watch(params)
        reference = _mlp_log_likelihood(params, x, y)
        total = tf.reduce_sum(reference * tf.constant([1.0, 2.0, -1.0]))
    ref_grads = tape.gradient(total, params)
    np.testing.assert_allclose(reference.numpy(), expected, rtol=1e-5)
    for shard_size in (23, 5):  # one shard; five shards with 2 padded rows
        shards = hmc.shard_data(x, y, shard_size)
        for jit in (False, True):
            @tf.function(jit_compile=jit, autograph=False)
            def value_and_grads(ps, shards=shards):
                with tf.GradientTape() as tape:
                    tape.watch(ps)
                    ll = hmc.log_likelihood(net, ps, *shards)
                    total = tf.reduce_sum(ll * tf.constant([1.0, 2.0, -1.0]))
                return ll, tape.gradient(total, ps)
            ll, grads = value_and_grads(params)
            np.testing.assert_allclose(ll.numpy(), expected, rtol=1e-5)
            for g, r in zip(grads, ref_grads):
                np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-4,
                                           atol=1e-5)


def test_log_prior_matches_scipy():
    rng = np.random.default_rng(1)
    params = [rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5))]
    got = hmc.log_prior([tf.constant(p, tf.float32) for p in params], 2.5)
    expected = [sum(stats.norm(0, 2.5).logpdf(p[c]).sum() for p in params)
                for c in range(2)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


# --------------------------------------------------------------------------
# Known posteriors.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("jit", [False, True, "auto"])
def test_correlated_gaussian_moments(jit):
    # XLA draws other random numbers than TF's kernels from the same seed
    # (its stateless normal uses another algorithm), so the two paths are
    # compared by the distribution they sample.
    mean = np.array([1.0, -2.0, 0.5])
    scale = np.array([1.0, 3.0, 0.5])
    corr = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, -0.3], [0.0, -0.3, 1.0]])
    cov = corr * np.outer(scale, scale)
    prec = tf.constant(np.linalg.inv(cov), tf.float32)

    def target(z):  # [C, 3] -> [C]
        d = z - tf.constant(mean, tf.float32)
        return -0.5 * tf.einsum("ci,ij,cj->c", d, prec, d)

    out = hmc.run_chains(target, [tf.zeros([4, 3])], num_burnin_steps=300,
                         num_results=1000, step_size=0.3,
                         num_leapfrog_steps=7, seed=11, jit_compile=jit,
                         checkpoint_every=1300)
    _check_moments(out.states[0].astype(np.float64), mean, cov)
    assert out.diagnostics.num_divergent == 0
    assert out.diagnostics.jit in ({True: ("xla",), False: ("default",)}.get(
        jit, ("xla", "default")))


def test_warmup_windows_follow_stan():
    # Stan's reference manual: 1000 warm-up iterations give a 75-iteration
    # fast window, slow windows of 25, 50, 100, 200 and 500, and a
    # 50-iteration fast window; short warm-ups shrink the buffers to 15% and
    # 10%.
    assert hmc.warmup_windows(1000) == [
        ("fast", 75), ("slow", 25), ("slow", 50), ("slow", 100),
        ("slow", 200), ("slow", 500), ("fast", 50)]
    assert hmc.warmup_windows(100) == [("fast", 15), ("slow", 75),
                                       ("fast", 10)]
    for n in (0, 7, 20, 149, 150, 151, 333, 1000, 2048):
        assert sum(length for _, length in hmc.warmup_windows(n)) == n


def test_mass_matrix_adapts_to_a_badly_scaled_gaussian():
    d = 100
    sd = np.geomspace(1e-2, 1.0, d)
    inv_var = tf.constant(1 / sd**2, tf.float32)

    def target(z):  # [C, d] -> [C]
        return -0.5 * tf.reduce_sum(z**2 * inv_var, axis=1)

    start = [tf.constant(np.random.default_rng(0).normal(size=(4, d)) * sd,
                         tf.float32)]
    budget = dict(num_burnin_steps=1000, num_results=500,
                  trajectory_length=2.0, max_leapfrog_steps=200, seed=7,
                  jit_compile=True, checkpoint_every=1500)
    pre = hmc.run_chains(target, start, **budget)
    plain = hmc.run_chains(target, start, mass_matrix="identity", **budget)
    # Each chain estimates its own; a single chain's estimate from its last
    # 500 warm-up draws has a relative error of about 10%, so the 400
    # estimates are checked through their mean over the 4 chains (about 5%
    # each), as a pooled estimate would be.
    ratio = pre.inverse_mass[0].mean(axis=0) / sd**2
    assert np.all(np.abs(ratio - 1) < 0.25), (ratio.min(), ratio.max())
    per_chain = pre.inverse_mass[0] / sd**2
    assert np.median(np.abs(per_chain - 1)) < 0.15
    np.testing.assert_array_equal(plain.inverse_mass[0], 1.0)

    def ess_per_gradient(out):
        ess = tfp.mcmc.effective_sample_size(
            tf.constant(out.states[0], tf.float64), cross_chain_dims=1,
            filter_beyond_positive_pairs=True).numpy()
        return ess.min() / out.diagnostics.num_leapfrog_steps

    assert ess_per_gradient(pre) >= 5 * ess_per_gradient(plain)
    _check_moments(pre.states[0][:, :, ::33].astype(np.float64),
                   np.zeros(4), np.diag(sd[::33]**2))


def test_logistic_regression_nuts_core(logistic_quadrature):
    x, y = _logistic_data()
    mean, cov = logistic_quadrature(x, y, prior_var=4.0)
    xb = tf.constant(np.concatenate([np.ones((40, 1)), x], 1), tf.float32)
    yf = tf.constant(y, tf.float32)

    def target(theta):  # [C, 3] -> [C]
        logits = tf.matmul(theta, xb, transpose_b=True)
        loglik = tf.reduce_sum(yf * logits - tf.nn.softplus(logits), axis=1)
        return loglik - 0.5 * tf.reduce_sum(theta**2, axis=1) / 4.0

    out = hmc.run_chains(target, [tf.zeros([4, 3])], kernel="nuts",
                         num_burnin_steps=300, num_results=600,
                         step_size=0.1, seed=5, jit_compile=True,
                         checkpoint_every=900)
    _check_moments(out.states[0].astype(np.float64), mean, cov)
    assert out.diagnostics.kernel == "nuts" and out.diagnostics.jit == "xla"


def test_logistic_regression_through_keras_network(logistic_quadrature):
    # A 2-class softmax layer has 6 weights; its likelihood depends only on
    # the differences d = (b1 - b0, w1 - w0), whose prior is N(0, 2 I) and
    # whose posterior is the logistic regression one.  The sums are left
    # with their prior N(0, 2 I), independent of d.
    x, y = _logistic_data()
    mean, cov = logistic_quadrature(x, y, prior_var=2.0)
    model = keras.Sequential([keras.Input((2,)),
                              keras.layers.Dense(2, activation="softmax")])
    ens, diag = hmc.sample(model, x, y, num_chains=4, num_burnin_steps=300,
                           num_results=600, step_size=0.1,
                           num_leapfrog_steps=5, prior_scale=1.0, seed=2,
                           jit_compile=False, checkpoint_every=900)
    kernel, bias = (p.numpy().astype(np.float64) for p in ens.params)
    diff = np.concatenate([(bias[:, 1] - bias[:, 0])[:, None],
                           kernel[:, :, 1] - kernel[:, :, 0]], axis=1)
    summ = np.concatenate([(bias[:, 1] + bias[:, 0])[:, None],
                           kernel[:, :, 1] + kernel[:, :, 0]], axis=1)
    # Chain-major [C * R, 3] -> [R, C, 3].
    diff, summ = (np.swapaxes(v.reshape(4, 600, 3), 0, 1) for v in (diff, summ))
    _check_moments(diff, mean, cov)
    _check_moments(summ, np.zeros(3), 2.0 * np.eye(3))
    assert ens.metadata["method"] == "hmc"
    assert diag.num_divergent == 0


# --------------------------------------------------------------------------
# A BNN.
# --------------------------------------------------------------------------
def _rank_rhat_numpy(trace):
    """Rank-normalised split R-hat of [R, C] (Vehtari et al. 2021) with SciPy:
    average ranks over all draws, normal scores, then the square-root split
    R-hat over the 2C half-chains."""
    r, c = trace.shape
    if np.all(trace == trace.flat[0]):
        return 1.0
    z = stats.norm.ppf((stats.rankdata(trace.reshape(-1)) - 0.375) /
                       (r * c + 0.25)).reshape(r, c)
    n = r // 2
    halves = np.concatenate([z[:n], z[r - n:]], axis=1)
    w = halves.var(axis=0, ddof=1).mean()
    b_over_n = halves.mean(axis=0).var(ddof=1)
    return np.sqrt(((n - 1) / n * w + b_over_n) / w)


def _predictive_rhat_numpy(ens, x, num_chains):
    """Per input, R-hat of p(class 1) from the chain-major ensemble:
    reshaped to [R, C] per point and computed with NumPy and SciPy."""
    logits = ens.network.apply_stack(ens.params, tf.constant(x)).numpy()
    logits = logits.astype(np.float64)
    p = np.exp(logits[..., 1] - np.logaddexp(logits[..., 0], logits[..., 1]))
    p = np.swapaxes(p.reshape(num_chains, -1, len(x)), 0, 1)  # [R, C, P]
    return np.array([_rank_rhat_numpy(p[:, :, i]) for i in range(len(x))])


@pytest.mark.parametrize("width", [16, 64])
def test_half_moons_default_kernel_mixes_in_function_space(width):
    # Default kernel settings (trajectory length, windowed diagonal mass
    # matrix, prior-draw starts) with a modest budget.  With 100 draws per
    # chain, 1 run in 6 (seeds 0-2, oneDNN's and Eigen's rounding) fell just
    # short (88.5% of points below 1.1, on Eigen's); with 200 that run gives
    # 99.5%.
    ds = data.half_moons(n=1000, seed=0)
    model = models.mlp((2,), 2, (width,))
    ens, diag = hmc.sample(model, ds.train_x, ds.train_y, num_chains=4,
                           num_burnin_steps=300, num_results=200,
                           probe_x=ds.test_x, probe_y=ds.test_y, seed=0,
                           jit_compile=True)
    assert ens.num_samples == 800
    assert ens.accuracy(ds.test_x, ds.test_y) >= 0.95
    rhat = _predictive_rhat_numpy(ens, ds.test_x, 4)
    assert np.mean(rhat < 1.1) >= 0.9, np.quantile(rhat, [0.5, 0.9])
    # The reported diagnostics agree with the independent ones.
    assert diag.converged and diag.probe_source == "held_out"
    assert diag.num_probe_points == len(ds.test_x)
    assert abs(diag.function_rhat_frac_below - np.mean(rhat < 1.1)) < 0.1
    assert len(diag.probe_accuracy_per_chain) == 4
    for a in diag.probe_accuracy_per_chain:
        assert a >= 0.9
    loglik = _keras_log_likelihood(ens.network, ens.params, ds.train_x,
                                   ds.train_y)
    assert diag.rhat_log_likelihood == pytest.approx(
        _rhat_numpy(loglik.reshape(4, 200).T), rel=1e-3)
    assert diag.inverse_mass_min < diag.inverse_mass_max
    json.dumps(ens.metadata, allow_nan=False)


def _tiny_bnn_data():
    rng = np.random.default_rng(11)
    x = rng.uniform(-2, 2, size=(12, 1)).astype(np.float32)
    y = (rng.uniform(size=12) < 1 / (1 + np.exp(-2 * x[:, 0]))).astype(np.int32)
    return x, y


def _numpy_mlp_logits(w, x):
    """A 1-3-2 leaky-ReLU MLP for stacked weights w = (k1, b1, k2, b2)."""
    k1, b1, k2, b2 = w
    h = np.einsum("ni,sio->sno", x, k1) + b1[:, None]
    h = np.where(h > 0, h, 0.2 * h)
    return np.einsum("sni,sio->sno", h, k2) + b2[:, None]


def _importance_reference(x, y, grid, draws=400_000, seed=0):
    """Posterior mean of p(y=1 | grid) by self-normalised importance
    sampling from the N(0, 1) prior; returns (mean, standard error, ESS)."""
    rng = np.random.default_rng(seed)
    shapes = [(1, 3), (3,), (3, 2), (2,)]
    logw, pred = [], []
    for _ in range(draws // 50_000):
        w = [rng.normal(size=(50_000,) + s) for s in shapes]
        lg = _numpy_mlp_logits(w, x.astype(np.float64))
        logp = lg - np.logaddexp(lg[..., :1], lg[..., 1:])
        logw.append(logp[:, np.arange(len(y)), y].sum(axis=1))
        gl = _numpy_mlp_logits(w, grid)
        pred.append(1 / (1 + np.exp(gl[..., 0] - gl[..., 1])))
    logw, pred = np.concatenate(logw), np.concatenate(pred)
    w = np.exp(logw - logw.max())
    w /= w.sum()
    mean = w @ pred
    se = np.sqrt(np.sum(w[:, None]**2 * (pred - mean)**2, axis=0))
    return mean, se, 1 / np.sum(w**2)


def test_tiny_bnn_predictive_matches_importance_sampling():
    x, y = _tiny_bnn_data()
    grid = np.linspace(-3, 3, 7)[:, None]
    ref, ref_se, ref_ess = _importance_reference(x, y, grid)
    assert ref_ess > 2000  # the reference is precise enough to test against
    model = models.mlp((1,), 2, (3,))
    ens, diag = hmc.sample(model, x, y, num_chains=4, num_burnin_steps=500,
                           num_results=1000, probe_x=grid, seed=4,
                           jit_compile=True)
    logits = ens.network.apply_stack(ens.params,
                                     tf.constant(grid, tf.float32)).numpy()
    p = 1 / (1 + np.exp(logits[..., 0] - logits[..., 1]))  # [S, 7]
    p = np.swapaxes(p.reshape(4, 1000, 7), 0, 1)  # [R, C, 7]
    for i in range(7):
        ess = _ess(p[:, :, i])
        assert ess > 200, ess
        err = 4 * np.sqrt(p[:, :, i].var() / ess + ref_se[i]**2)
        assert abs(p[:, :, i].mean() - ref[i]) < err, (i, p[:, :, i].mean(),
                                                       ref[i], err)
    assert diag.converged


def test_divergences_are_counted_not_raised():
    def target(z):  # NaN outside the unit box
        inside = tf.reduce_all(tf.abs(z) < 1.0, axis=1)
        return tf.where(inside, -0.5 * tf.reduce_sum(z**2, axis=1), np.nan)

    start = tf.fill([3, 2], 0.5)
    out = hmc.run_chains(target, [start], num_burnin_steps=0, num_results=6,
                         step_size=50.0, num_leapfrog_steps=3, seed=0,
                         jit_compile=False, checkpoint_every=3)
    assert out.diagnostics.num_divergent == 3 * 6
    assert out.diagnostics.acceptance_rate == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(out.states[0],
                                  np.broadcast_to(start.numpy(), (6, 3, 2)))


# --------------------------------------------------------------------------
# Function-space diagnostics and their export.
# --------------------------------------------------------------------------
def _ar1_chains(shift, rng, r=400, c=4, points=3):
    z = np.zeros((r, c, points))
    for t in range(1, r):
        z[t] = 0.7 * z[t - 1] + rng.normal(size=(c, points))
    return z + np.asarray(shift)[None, :, None]


def test_rank_normalized_rhat_and_bulk_ess_match_arviz():
    import arviz  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(0)
    # Long chains: the two ESS estimators truncate the autocorrelation sum
    # differently (TFP: initial positive sequence; ArviZ: initial monotone
    # sequence), which only matters for short chains.
    for shift in ([0, 0, 0, 0], [0, 0, 0, 1.5]):
        draws = np.exp(_ar1_chains(shift, rng, r=4000))  # skewed
        rhat, ess = hmc.diagnostics.rank_normalized_rhat_ess(draws)
        for i in range(draws.shape[-1]):
            assert rhat[i] == pytest.approx(_rank_rhat_numpy(draws[:, :, i]),
                                            rel=1e-9)
            series = draws[:, :, i].T  # ArviZ: [chain, draw]
            assert rhat[i] == pytest.approx(
                float(arviz.rhat(series, method="z_scale")), rel=1e-3)
            if any(shift):  # ESS of chains that disagree is not defined
                continue
            assert ess[i] == pytest.approx(
                float(arviz.ess(series, method="bulk")), rel=0.05)
    mixed = hmc.diagnostics.rank_normalized_rhat_ess(
        _ar1_chains([0, 0, 0, 0], rng))[0]
    stuck = hmc.diagnostics.rank_normalized_rhat_ess(
        _ar1_chains([0, 0, 0, 3.0], rng))[0]
    assert np.all(mixed < 1.05) and np.all(stuck > 1.3)
    # Saturated probabilities: identical in every draw of every chain means
    # agreement; constant per chain but different across chains does not.
    same = np.ones((40, 4, 1))
    apart = np.repeat(np.array([0.1, 0.1, 0.9, 0.9])[None, :, None], 40, 0)
    assert hmc.diagnostics.rank_normalized_rhat_ess(same)[0][0] == 1.0
    assert hmc.diagnostics.rank_normalized_rhat_ess(apart)[0][0] == np.inf


def test_traces_export_to_arviz_and_plot(tmp_path):
    ds = data.half_moons(n=100, seed=1)
    ens, diag = hmc.sample(models.mlp((2,), 2, (8,)), ds.train_x, ds.train_y,
                           **_SMALL)
    idata = hmc.to_inference_data(ens)
    ll = idata.posterior["log_likelihood"].values  # [chain, draw]
    assert ll.shape == (2, 12)
    # The traced log-likelihood is the one of the returned samples.
    expected = _keras_log_likelihood(ens.network, ens.params, ds.train_x,
                                     ds.train_y).reshape(2, 12)
    np.testing.assert_allclose(ll, expected, rtol=1e-4)
    probe = idata.posterior["probe_probability"].values
    assert probe.shape[:2] == (2, 12) and np.all((probe >= 0) & (probe <= 1))
    path = hmc.plot_traces(ens, str(tmp_path / "trace.png"), title="test")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert ens.metadata["converged"] == diag.converged
    with pytest.raises(ValueError, match="no HMC traces"):
        hmc.to_inference_data(ens.__class__(ens.network, ens.params))


# --------------------------------------------------------------------------
# Resume, compilers, shapes.
# --------------------------------------------------------------------------
_SMALL = dict(num_chains=2, num_burnin_steps=20, num_results=12, thinning=2,
              step_size=0.01, num_leapfrog_steps=4, seed=3, jit_compile=False,
              checkpoint_every=8)


class _Stop(Exception):
    pass


def test_resume_is_bit_identical_and_foreign_checkpoints_are_refused(tmp_path):
    ds = data.half_moons(n=100, seed=1)
    model = models.mlp((2,), 2, (8,))
    full, full_diag = hmc.sample(model, ds.train_x, ds.train_y, **_SMALL)

    # 20 warm-up iterations are Stan's windows 3 (fast), 15 (slow), 2
    # (fast): segments 0 | 1, 2 | 3, then sampling 4, 5, 6.  Stop in the
    # middle of the slow window, then with Ctrl-C in the first sampling
    # segment.
    def stop_mid_window(info):
        if info["segment"] == 1:
            raise _Stop()

    with pytest.raises(_Stop):
        hmc.sample(model, ds.train_x, ds.train_y, checkpoint_dir=tmp_path,
                   segment_callback=stop_mid_window, **_SMALL)

    def ctrl_c(info):
        if info["segment"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hmc.sample(model, ds.train_x, ds.train_y, checkpoint_dir=tmp_path,
                   segment_callback=ctrl_c, **_SMALL)
    seen = []
    resumed, resumed_diag = hmc.sample(
        model, ds.train_x, ds.train_y, checkpoint_dir=tmp_path,
        segment_callback=lambda info: seen.append(info["segment"]), **_SMALL)
    assert seen == [5, 6]  # segments 0-4 came from the checkpoint
    for a, b in zip(full.params, resumed.params):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert resumed_diag.acceptance_rate == full_diag.acceptance_rate
    assert resumed_diag.step_size == full_diag.step_size

    with pytest.raises(ValueError, match="num_leapfrog_steps"):
        hmc.sample(model, ds.train_x, ds.train_y, checkpoint_dir=tmp_path,
                   **dict(_SMALL, num_leapfrog_steps=5))
    with pytest.raises(ValueError, match="data"):
        hmc.sample(model, ds.train_x[::-1], ds.train_y[::-1],
                   checkpoint_dir=tmp_path, **_SMALL)
    assert resumed_diag.inverse_mass_max == full_diag.inverse_mass_max
    for a, b in zip(full.metadata["traces"]["log_likelihood"],
                    resumed.metadata["traces"]["log_likelihood"]):
        assert a == b


def test_checkpoint_of_an_older_format_is_refused(tmp_path):
    # A version-1 checkpoint (fixed mass matrix, before windowed adaptation)
    # holds a kernel state this sampler cannot continue.
    files.save_arrays(os.path.join(tmp_path, hmc.CHECKPOINT_FILE),
                      {"state_0": np.zeros((2, 2, 8), np.float32)},
                      {"format": "tfp_bnn_adv.hmc_checkpoint",
                       "format_version": 1, "config": {}})
    ds = data.half_moons(n=100, seed=1)
    with pytest.raises(ValueError, match="format version 1.*start afresh"):
        hmc.sample(models.mlp((2,), 2, (8,)), ds.train_x, ds.train_y,
                   checkpoint_dir=tmp_path, **_SMALL)


def _shape_check(model, x, y):
    # Burn-in and sampling segments of one kept state each: one compiled
    # program, which must compile under XLA.
    ens, diag = hmc.sample(model, x, y, num_chains=2, num_burnin_steps=2,
                           num_results=3, step_size=1e-3, num_leapfrog_steps=2,
                           seed=0, jit_compile=True, checkpoint_every=1)
    net = ens.network
    assert ens.num_samples == 6
    for p, shape in zip(ens.params, net.param_shapes):
        assert p.dtype == tf.float32 and tuple(p.shape) == (6,) + shape
    proba = ens.predict_proba(x)
    assert proba.shape == (len(x), net.num_classes) and proba.dtype == np.float32
    assert diag.num_chains == 2 and diag.num_results == 3 and diag.jit == "xla"
    assert len(diag.acceptance_rate) == 2 and len(diag.step_size) == 2
    json.dumps(diag.to_dict(), allow_nan=False)
    assert ens.metadata["diagnostics"] == diag.to_dict()


def test_shapes_and_dtypes_mlp():
    rng = np.random.default_rng(3)
    _shape_check(models.mlp((3,), 4, (6, 5)),
                 rng.normal(size=(30, 3)).astype(np.float32),
                 rng.integers(0, 4, size=30))


def test_shapes_and_dtypes_cnn():
    rng = np.random.default_rng(4)
    _shape_check(models.cnn((12, 12, 1), 3, filters=(2, 3), kernel_size=3),
                 rng.uniform(size=(20, 12, 12, 1)).astype(np.float32),
                 rng.integers(0, 3, size=20))


def test_explicit_initial_state_is_the_chain_start():
    # With a vanishing step size and no adaptation the chain cannot move.
    model = models.mlp((2,), 2, (4,))
    net = Network.from_keras(model)
    init = net.init_params(tf.constant([1, 2]), num_samples=2)
    x = np.random.default_rng(0).uniform(size=(10, 2)).astype(np.float32)
    y = np.arange(10) % 2
    ens, _ = hmc.sample(net, x, y, num_chains=2, num_burnin_steps=0,
                        num_results=2, step_size=1e-30, num_leapfrog_steps=1,
                        init=init, seed=0, jit_compile=False)
    for p, p0 in zip(ens.params, init):
        np.testing.assert_allclose(p.numpy(), np.repeat(p0.numpy(), 2, axis=0),
                                   atol=1e-6)


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, name", [
    (dict(step_size=0.0), ValueError, "step_size"),
    (dict(step_size=-1.0), ValueError, "step_size"),
    (dict(num_chains=0), ValueError, "num_chains"),
    (dict(num_results=0), ValueError, "num_results"),
    (dict(thinning=0), ValueError, "thinning"),
    (dict(num_burnin_steps=-1), ValueError, "num_burnin_steps"),
    (dict(num_leapfrog_steps=0), ValueError, "num_leapfrog_steps"),
    (dict(kernel="mala"), ValueError, "kernel"),
    (dict(prior_scale=0.0), ValueError, "prior_scale"),
    (dict(checkpoint_every=0), ValueError, "checkpoint_every"),
    (dict(target_accept_prob=1.5), ValueError, "target_accept_prob"),
    (dict(num_adaptation_steps=20), ValueError, "num_adaptation_steps"),
    (dict(init="map"), ValueError, "init"),
    (dict(trajectory_length=0.0), ValueError, "trajectory_length"),
    (dict(trajectory_length=float("nan")), ValueError, "trajectory_length"),
    (dict(trajectory_length=2.0, num_leapfrog_steps=5), ValueError,
     "trajectory_length or num_leapfrog_steps"),
    (dict(trajectory_jitter=1.0), ValueError, "trajectory_jitter"),
    (dict(max_leapfrog_steps=0), ValueError, "max_leapfrog_steps"),
    (dict(mass_matrix="dense"), ValueError, "mass_matrix"),
    (dict(max_rhat=0.99), ValueError, "max_rhat"),
    (dict(probe_x=np.zeros((5, 3), np.float32)), ValueError, "probe_x"),
    (dict(probe_x=np.zeros((5, 2), np.float32),
          probe_y=np.zeros(4, np.int32)), ValueError, "probe_y"),
    (dict(probe_y=np.zeros(4, np.int32)), ValueError, "probe_y"),
    (dict(num_lepfrog_steps=3), TypeError, "num_lepfrog_steps"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(num_chains=2.0), TypeError, "num_chains"),
    (dict(train_y=np.zeros(9, np.int32)), ValueError, "train_y"),
    (dict(train_y=np.full(10, 0.5)), TypeError, "train_y"),
    (dict(train_y=np.full(10, 2)), ValueError, "train_y"),
    (dict(train_x=np.zeros((10, 3), np.float32)), ValueError, "train_x"),
])
def test_bad_input_is_refused(kwargs, error, name):
    args = dict(train_x=np.zeros((10, 2), np.float32),
                train_y=np.zeros(10, np.int32), num_burnin_steps=10)
    args.update(kwargs)
    model = models.mlp((2,), 2, (4,))
    with pytest.raises(error, match=name):
        hmc.sample(model, args.pop("train_x"), args.pop("train_y"), **args)
