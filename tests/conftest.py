"""Shared pytest set-up: quiet TensorFlow, CPU only, fixed seeds, and a
factory of HMC metadata with known diagnostics."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# Two logical CPU devices, so multi-device code (tf.distribute strategies,
# sharded HMC and attacks) runs in the tests; configured before any op runs.
# Everything else keeps running on /cpu:0 as before.
from tfp_bnn_adv import distribute  # pylint: disable=g-import-not-at-top,wrong-import-position

distribute.configure_logical_cpus(2)

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


def _hmc_metadata(rhat, *, traces=False):
    """Ensemble metadata of an HMC posterior with a known function R-hat."""
    from tfp_bnn_adv.inference import hmc  # pylint: disable=g-import-not-at-top
    diag = hmc.Diagnostics(
        kernel="hmc", num_chains=4, num_results=20,
        acceptance_rate=(0.6, 0.7, 0.8, 0.9),
        burnin_acceptance_rate=(0.5,) * 4, step_size=(0.01,) * 4,
        num_divergent=3, num_divergent_burnin=1, rhat_log_likelihood=1.2,
        ess_log_likelihood=30.0, rhat_projection=3.0, ess_projection=4.0,
        wall_seconds=1.0, compile_seconds=0.5, leapfrog_steps_per_second=9.0,
        num_leapfrog_steps=100, jit="default", num_segments=2,
        function_rhat_median=rhat, function_rhat_p90=2.0,
        function_rhat_frac_below=0.25, function_ess_min=12.4,
        function_ess_median=40.0, num_probe_points=8, probe_source="held_out")
    meta = {"method": "hmc", "diagnostics": diag.to_dict()}
    if traces:
        rng = np.random.default_rng(0)
        meta["traces"] = {"log_likelihood": rng.normal(size=(20, 4)).tolist(),
                          "weight_projection": rng.normal(size=(20, 4)).tolist()}
    return meta


@pytest.fixture
def hmc_metadata():
    """``f(rhat, traces=False)``: HMC ensemble metadata of a known R-hat.

    The diagnostics are a real ``hmc.Diagnostics(...).to_dict()`` with the
    given function-space R-hat median (other fields fixed: acceptance
    0.6/0.7/0.8/0.9, 3 divergences, 25% of probe points below 1.1, ESS min
    12.4); with ``traces``, random ``[20, 4]`` traces for the trace plot.
    """
    return _hmc_metadata


def _logistic_quadrature(x, y, prior_var, *, half_width=7, points=61):
    """Posterior mean and covariance of logistic regression, by quadrature.

    Parameters ``(bias, w_1, ..., w_D)`` with prior ``N(0, prior_var I)``;
    the grid spans ``half_width`` Laplace standard deviations either side of
    the mode (found by Newton's method), ``points`` per axis.
    """
    xb = np.concatenate([np.ones((len(x), 1)), x.astype(np.float64)], axis=1)
    d = xb.shape[1]
    theta = np.zeros(d)
    for _ in range(50):
        p = 1 / (1 + np.exp(-xb @ theta))
        grad = xb.T @ (y - p) - theta / prior_var
        hess = -(xb.T * (p * (1 - p))) @ xb - np.eye(d) / prior_var
        theta = theta - np.linalg.solve(hess, grad)
    sd = np.sqrt(np.diag(np.linalg.inv(-hess)))
    axes = [np.linspace(m - half_width * s, m + half_width * s, points)
            for m, s in zip(theta, sd)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, d)
    logits = grid @ xb.T
    logp = (np.sum(y * logits - np.logaddexp(0, logits), axis=1) -
            0.5 * np.sum(grid**2, axis=1) / prior_var)
    w = np.exp(logp - logp.max())
    w /= w.sum()
    mean = w @ grid
    cov = (grid - mean).T @ ((grid - mean) * w[:, None])
    return mean, cov


@pytest.fixture
def logistic_quadrature():
    """``f(x, y, prior_var, *, half_width=7, points=61) -> (mean, cov)``: the
    exact logistic-regression posterior moments by grid quadrature."""
    return _logistic_quadrature
