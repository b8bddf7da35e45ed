"""fit_posterior dispatches to every method and records what it did."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from tfp_bnn_adv import data  # pylint: disable=wrong-import-position
from tfp_bnn_adv import models  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies.training import InferenceSettings  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies.training import fit_posterior  # pylint: disable=wrong-import-position


@pytest.mark.parametrize("settings, num_samples", [
    (InferenceSettings(method="hmc", num_chains=2, num_burnin_steps=10,
                       num_results=5, num_leapfrog_steps=3), 10),
    (InferenceSettings(method="vi", epochs=1, vi_samples=7), 7),
    (InferenceSettings(method="sgd", epochs=1), 1),
    (InferenceSettings(method="ensemble", epochs=1, num_members=3), 3)])
def test_every_method_fills_an_ensemble(settings, num_samples, tmp_path):
    ds = data.half_moons(200, seed=1)
    ens, info = fit_posterior(models.mlp((2,), 2, (8,)), ds.train_x, ds.train_y,
                              settings, checkpoint_dir=str(tmp_path))
    assert ens.num_samples == num_samples
    assert ens.metadata["method"] == settings.method
    assert ens.metadata["num_train"] == len(ds.train_x)
    assert info["settings"]["method"] == settings.method
    assert "diagnostics" in info and info["wall_seconds"] > 0
    if settings.method == "vi":
        assert (tmp_path / "vi_posterior.npz").exists()


def test_settings_validation_and_relevant_fields():
    with pytest.raises(ValueError, match="method must be one of"):
        InferenceSettings(method="mcmc")
    hmc = InferenceSettings(method="hmc").relevant()
    assert "step_size" in hmc and "epochs" not in hmc
    assert "num_members" in InferenceSettings(method="ensemble").relevant()
