"""The gradient study: its estimator, its files, and the measured fall."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from tfp_bnn_adv import gradients  # pylint: disable=wrong-import-position
from tfp_bnn_adv import models  # pylint: disable=wrong-import-position
from tfp_bnn_adv.ensemble import PosteriorEnsemble  # pylint: disable=wrong-import-position
from tfp_bnn_adv.network import Network  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies import gradient_study as gs  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies.training import InferenceSettings  # pylint: disable=wrong-import-position


def test_sample_subsets_are_disjoint_and_spread():
    sub = gs.sample_subsets(12, 3, max_subsets=10)
    assert sub.shape == (4, 3)
    assert len(np.unique(sub)) == sub.size  # disjoint
    np.testing.assert_array_equal(sub[0], [0, 4, 8])  # spans the whole stack
    assert gs.sample_subsets(12, 1, max_subsets=5).shape == (5, 1)
    with pytest.raises(ValueError, match="cannot draw 13 of 12"):
        gs.sample_subsets(12, 13, 5)


def test_gradient_sizes_equal_explicit_subset_averages():
    net = Network.from_keras(models.mlp((3,), 3, (6,), activation="tanh"))
    ens = PosteriorEnsemble(net, net.init_params(seed=4, num_samples=8))
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(7, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=7)
    sizes = gs.gradient_sizes(ens, x, y, (1, 4), batch_size=3)
    for k in (1, 4):
        exp_abs, pred_abs, exp_l2 = [], [], []
        for subset in gs.sample_subsets(8, k, 200):
            e = gradients.expected_loss_gradient(ens[subset], x, y)
            p = gradients.predictive_loss_gradient(ens[subset], x, y)
            exp_abs.append(np.abs(e).mean(axis=1))
            pred_abs.append(np.abs(p).mean(axis=1))
            exp_l2.append(np.linalg.norm(e, axis=1))
        np.testing.assert_allclose(sizes[k]["expected"][0], np.mean(exp_abs), rtol=1e-4)
        np.testing.assert_allclose(sizes[k]["expected"][1], np.mean(exp_l2), rtol=1e-4)
        np.testing.assert_allclose(sizes[k]["predictive"][0], np.mean(pred_abs), rtol=1e-4)


def test_config_validation():
    with pytest.raises(ValueError, match="moons_widths"):
        gs.GradientStudyConfig.quick(moons_widths=()).validate()
    with pytest.raises(ValueError, match="image_dataset"):
        gs.GradientStudyConfig.quick(image_dataset="cifar").validate()
    with pytest.raises(ValueError, match="image_methods"):
        gs.GradientStudyConfig.quick(image_methods=("sgd",)).validate()


def test_half_moons_gradient_falls_with_the_number_of_samples(tmp_path):
    # HMC on 400 half-moons points, 4 chains; the gradient of the 50-sample
    # average must be measurably smaller than that of one sample (Theorem 1's
    # cancellation).  Measured with this seed: a fall of about 10%.
    config = gs.GradientStudyConfig.quick(
        moons_widths=(64,), moons_train_sizes=(400,), image_dataset=None,
        include_deterministic=False, sample_counts=(1, 50), num_test=200,
        moons_hmc=InferenceSettings(method="hmc", num_chains=4,
                                    num_burnin_steps=200, num_results=50,
                                    thinning=2, step_size=0.005,
                                    num_leapfrog_steps=20))
    results = gs.run_gradient_study(config, str(tmp_path))
    prefix = "half_moons/hmc/width=64/n_train=400"
    one = results[f"{prefix}/samples=1/grad_mean_abs/expected"]
    fifty = results[f"{prefix}/samples=50/grad_mean_abs/expected"]
    assert fifty < 0.95 * one, (one, fifty)
    assert results[f"{prefix}/test_accuracy"] >= 0.9
    # The files the study promises.
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved[f"{prefix}/samples=50/grad_mean_abs/expected"] == pytest.approx(fifty)
    header = (tmp_path / "gradients.csv").read_text().splitlines()[0]
    assert header == "dataset,method,width,n_train,samples,gradient,mean_abs,l2"
    for stem in ("components_half_moons", "grad_vs_samples", "grad_vs_width",
                 "grad_vs_train_size"):
        assert (tmp_path / "figures" / f"{stem}.png").stat().st_size > 1000
