"""The shared prior and likelihood, against TFP's distributions and a loop."""

import numpy as np
import tensorflow as tf  # pylint: disable=wrong-import-position
import tensorflow_probability as tfp  # pylint: disable=wrong-import-position

from tfp_bnn_adv import models  # pylint: disable=wrong-import-position
from tfp_bnn_adv.inference import density  # pylint: disable=wrong-import-position
from tfp_bnn_adv.inference.hmc import target  # pylint: disable=wrong-import-position
from tfp_bnn_adv.network import Network  # pylint: disable=wrong-import-position


def _params(scale=1.5):
    rng = np.random.default_rng(0)
    return [tf.constant(scale * rng.normal(size=s), tf.float32)
            for s in [(3, 4, 5), (3, 5), (3, 2, 2, 1)]]


def test_gaussian_log_prior_is_the_normal_log_density_summed():
    params, scale = _params(), 0.7
    want = sum(tf.reduce_sum(tfp.distributions.Normal(0.0, scale).log_prob(p),
                             axis=list(range(1, p.shape.rank)))
               for p in params)
    np.testing.assert_allclose(density.gaussian_log_prior(params, scale),
                               want, rtol=1e-5)


def test_gaussian_prior_distribution_matches_the_log_prior():
    params, scale = _params(), 2.0
    total = sum(density.gaussian_prior(p.shape[1:], scale).log_prob(p)
                for p in params)
    assert density.gaussian_prior([4, 5], scale).event_shape == [4, 5]
    np.testing.assert_allclose(total, density.gaussian_log_prior(params, scale),
                               rtol=1e-5)


def test_hmc_target_uses_the_shared_functions():
    params = _params()
    np.testing.assert_array_equal(target.log_prior(params, 0.3),
                                  density.gaussian_log_prior(params, 0.3))


def test_log_likelihood_matches_a_per_sample_loop_and_masks_rows():
    net = Network.from_keras(models.mlp((3,), 4, (6,)))
    params = net.init_params(0, num_samples=3)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 3)).astype(np.float32)
    y = rng.integers(0, 4, size=7).astype(np.int32)
    mask = np.array([1, 1, 0, 1, 0, 1, 1], np.float32)
    got = density.log_likelihood(net, params, x, y, mask)
    for s in range(3):
        logits = net.apply([p[s] for p in params], x).numpy().astype(np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        np.testing.assert_allclose(got[s], np.sum(mask * logp[np.arange(7), y]),
                                   rtol=1e-5)
    # Per-sample inputs: sample s sees its own rows.
    xs = np.stack([x, x[::-1], x])
    ys = np.stack([y, y[::-1], y])
    per = density.log_likelihood(net, params, xs, ys, per_sample_inputs=True)
    np.testing.assert_allclose(per[0], density.log_likelihood(net, params, x, y)[0],
                               rtol=1e-6)
    np.testing.assert_allclose(
        per[1], density.log_likelihood(net, params, x[::-1], y[::-1])[1],
        rtol=1e-6)
