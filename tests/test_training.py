"""fit_posterior dispatches to every method and records what it did."""

import math
import types

import numpy as np
import pytest  # pylint: disable=wrong-import-position
import tf_keras  # pylint: disable=wrong-import-position

from tfp_bnn_adv import data  # pylint: disable=wrong-import-position
from tfp_bnn_adv import models  # pylint: disable=wrong-import-position
from tfp_bnn_adv.ensemble import PosteriorEnsemble  # pylint: disable=wrong-import-position
from tfp_bnn_adv.inference import hmc  # pylint: disable=wrong-import-position
from tfp_bnn_adv.inference import vi  # pylint: disable=wrong-import-position
from tfp_bnn_adv.network import Network  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies import training  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies.training import InferenceSettings  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies.training import elbo_plateau  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies.training import fit_posterior  # pylint: disable=wrong-import-position


@pytest.mark.parametrize("settings, num_samples", [
    (InferenceSettings(method="hmc", num_chains=2, num_burnin_steps=10,
                       num_results=5, num_leapfrog_steps=3), 10),
    (InferenceSettings(method="vi", epochs=3, vi_samples=7), 7),
    (InferenceSettings(method="sgd", epochs=1), 1),
    (InferenceSettings(method="ensemble", epochs=1, num_members=3), 3)])
def test_every_method_fills_an_ensemble(settings, num_samples, tmp_path):
    ds = data.half_moons(200, seed=1)
    ens, info = fit_posterior(models.mlp((2,), 2, (8,)), ds.train_x, ds.train_y,
                              settings, checkpoint_dir=str(tmp_path),
                              probe_x=ds.test_x, probe_y=ds.test_y)
    assert ens.num_samples == num_samples
    assert ens.metadata["method"] == settings.method
    assert ens.metadata["num_train"] == len(ds.train_x)
    assert info["settings"]["method"] == settings.method
    assert "diagnostics" in info and info["wall_seconds"] > 0
    diag = info["diagnostics"]
    if settings.method == "hmc":
        # The function-space diagnostics are on the held-out points given.
        assert diag["probe_source"] == "held_out"
        assert diag["num_probe_points"] == len(ds.test_x)
        assert len(diag["probe_accuracy_per_chain"]) == 2
        assert ens.metadata["diagnostics"] == diag
        assert ens.metadata["converged"] == diag["converged"]
    if settings.method == "vi":
        assert (tmp_path / "vi_posterior.npz").exists()
        assert (tmp_path / vi.CHECKPOINT_FILE).exists()
        trace = diag["loss_trace"]
        assert len(trace) == 3 and diag["final_loss"] == trace[-1]
        # Three epochs: windows of one epoch, the last against the second.
        change = abs(trace[2] - trace[1]) / abs(trace[1])
        assert diag["relative_change"] == pytest.approx(change)
        assert diag["plateaued"] == (change < 0.01)
        assert ens.metadata["diagnostics"] == diag


def test_vi_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    ds = data.half_moons(200, seed=2)
    model = models.mlp((2,), 2, (8,))
    settings = InferenceSettings(method="vi", epochs=4, batch_size=32,
                                 learning_rate=1e-2, vi_samples=3, seed=5)
    reference, _ = fit_posterior(model, ds.train_x, ds.train_y, settings,
                                 checkpoint_dir=str(tmp_path / "reference"))
    ckpt = str(tmp_path / "resumed")
    fit_posterior(model, ds.train_x, ds.train_y, settings.replace(epochs=2),
                  checkpoint_dir=ckpt)
    keras_fit, first_epochs = tf_keras.Model.fit, []

    def recording_fit(self, *args, **kwargs):
        first_epochs.append(kwargs.get("initial_epoch", 0))
        return keras_fit(self, *args, **kwargs)

    monkeypatch.setattr(tf_keras.Model, "fit", recording_fit)
    resumed, info = fit_posterior(model, ds.train_x, ds.train_y, settings,
                                  checkpoint_dir=ckpt)
    assert first_epochs == [2]  # epochs 3 and 4 only
    assert (tmp_path / "resumed" / vi.CHECKPOINT_FILE).exists()
    assert len(info["diagnostics"]["loss_trace"]) == 4
    for a, b in zip(resumed.params, reference.params):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_resumed_hmc_fit_counts_the_earlier_runs_time(tmp_path,
                                                       monkeypatch):
    ds = data.half_moons(200, seed=3)
    model = models.mlp((2,), 2, (8,))
    settings = InferenceSettings(method="hmc", num_chains=2,
                                 num_burnin_steps=10, num_results=5,
                                 num_leapfrog_steps=3, seed=4)
    _, first = fit_posterior(model, ds.train_x, ds.train_y, settings,
                             checkpoint_dir=str(tmp_path))
    sampled = first["diagnostics"]["wall_seconds"]
    assert 0 < sampled <= first["wall_seconds"]
    # Every segment is on disk: the rerun only reloads them.  With this
    # call's own clock frozen, the earlier sampling time must still count.
    monkeypatch.setattr(training, "time",
                        types.SimpleNamespace(perf_counter=lambda: 0.0))
    _, again = fit_posterior(model, ds.train_x, ds.train_y, settings,
                             checkpoint_dir=str(tmp_path))
    assert again["diagnostics"]["wall_seconds"] == pytest.approx(sampled)
    assert again["wall_seconds"] == pytest.approx(sampled)


@pytest.mark.parametrize("method", ["hmc", "vi"])
def test_a_checkpoint_dir_that_is_a_file_is_refused_up_front(
        method, tmp_path, monkeypatch):
    path = tmp_path / "a_file"
    path.write_text("not a directory")

    def no_work(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(hmc, "sample", no_work)
    monkeypatch.setattr(vi, "fit", no_work)
    ds = data.half_moons(50, seed=1)
    with pytest.raises(ValueError,
                       match=f"checkpoint_dir='{path}' cannot be a directory"):
        fit_posterior(models.mlp((2,), 2, (4,)), ds.train_x, ds.train_y,
                      InferenceSettings(method=method), checkpoint_dir=str(path))


def test_hmc_settings_and_probe_set_reach_the_sampler(monkeypatch):
    net = Network.from_keras(models.mlp((2,), 2, (4,)))
    seen = {}

    def fake_sample(model, x, y, **kwargs):
        seen.update(kwargs)
        ens = PosteriorEnsemble(net, net.init_params(0, num_samples=2),
                                metadata={"method": "hmc"})
        return ens, types.SimpleNamespace(to_dict=lambda: {"converged": True})

    monkeypatch.setattr(hmc, "sample", fake_sample)
    rng = np.random.default_rng(0)
    probe_x = rng.uniform(size=(1000, 2)).astype(np.float32)
    probe_y = (probe_x[:, 0] > 0.5).astype(np.int32)
    settings = InferenceSettings(method="hmc", trajectory_length=2.5,
                                 max_leapfrog_steps=7, mass_matrix="identity",
                                 num_chains=3)
    fit_posterior(models.mlp((2,), 2, (4,)), probe_x[:50], probe_y[:50],
                  settings, probe_x=probe_x, probe_y=probe_y, max_rhat=1.3)
    assert seen["trajectory_length"] == 2.5 and seen["num_leapfrog_steps"] is None
    assert seen["max_leapfrog_steps"] == 7 and seen["mass_matrix"] == "identity"
    assert seen["num_chains"] == 3 and seen["max_rhat"] == 1.3
    # A large held-out set is thinned to MAX_PROBE_POINTS distinct points of
    # it, spread from its first to its last, labels kept aligned.
    px, py = np.asarray(seen["probe_x"]), np.asarray(seen["probe_y"])
    assert len(px) == training.MAX_PROBE_POINTS == 256
    rows = [int(np.flatnonzero((probe_x == p).all(axis=1))[0]) for p in px]
    assert len(set(rows)) == 256 and rows[0] == 0 and rows[-1] == 999
    np.testing.assert_array_equal(py, probe_y[rows])
    with pytest.raises(ValueError, match="probe_y was given without probe_x"):
        fit_posterior(models.mlp((2,), 2, (4,)), probe_x[:50], probe_y[:50],
                      settings, probe_y=probe_y)


def test_settings_validation_and_relevant_fields():
    with pytest.raises(ValueError, match="method must be one of"):
        InferenceSettings(method="mcmc")
    with pytest.raises(ValueError, match="not both"):
        InferenceSettings(trajectory_length=3.0, num_leapfrog_steps=10)
    with pytest.raises(ValueError, match="mass_matrix"):
        InferenceSettings(mass_matrix="dense")
    hmc_fields = InferenceSettings(method="hmc").relevant()
    assert "step_size" in hmc_fields and "epochs" not in hmc_fields
    for key in ("trajectory_length", "max_leapfrog_steps", "mass_matrix"):
        assert key in hmc_fields
    assert "num_members" in InferenceSettings(method="ensemble").relevant()
    # The HMC defaults are the sampler's own.
    defaults, config = InferenceSettings(), hmc.HMCConfig()
    for key in ("num_chains", "num_burnin_steps", "num_results", "step_size",
                "max_leapfrog_steps", "mass_matrix", "kernel"):
        assert getattr(defaults, key) == getattr(config, key), key
    assert defaults.num_leapfrog_steps is None and config.num_leapfrog_steps is None


def test_elbo_plateau_on_hand_made_series():
    # Ten epochs: windows of two.  Still falling: (1.02 + 1.01) / 2 = 1.015
    # against (1.1 + 1.05) / 2 = 1.075.
    falling = [5, 4, 3, 2, 1.5, 1.2, 1.1, 1.05, 1.02, 1.01]
    out = elbo_plateau(falling)
    assert out["window"] == 2 and out["plateaued"] is False
    assert out["relative_change"] == pytest.approx(0.06 / 1.075)
    # Flat tail: 1.0005 against 1.001.
    flat = [5, 4, 3, 2, 1.5, 1.2, 1.004, 0.998, 1.001, 1.0]
    out = elbo_plateau(flat)
    assert out["plateaued"] is True
    assert out["relative_change"] == pytest.approx(0.0005 / 1.001)
    # 25 epochs: windows of exactly five; the 2.0 at epoch 15 sits just
    # outside the compared windows (a window of six would see it).
    series = [3.0] * 14 + [2.0] + [1.0] * 10
    out = elbo_plateau(series)
    assert out == {"plateaued": True, "relative_change": 0.0, "window": 5}
    moved = [3.0] * 15 + [2.0] + [1.0] * 9  # now inside: 1.0 against 1.2
    assert elbo_plateau(moved)["relative_change"] == pytest.approx(0.2 / 1.2)
    # The tolerance is relative and strict: a 1% change is not a plateau.
    assert elbo_plateau([1.01, 1.0], tolerance=0.02)["plateaued"] is True
    assert elbo_plateau([100.0, 99.0])["plateaued"] is False
    # Too short or not finite: no plateau shown.
    assert elbo_plateau([1.0]) == {"plateaued": False, "relative_change": None,
                                   "window": 1}
    assert elbo_plateau([1.0, 1.0])["plateaued"] is True
    assert elbo_plateau([1.0, 2.0, math.nan, 1.0])["plateaued"] is False
    assert elbo_plateau([2.0, 2.0, 0.0, 1.0]) == {  # from 0: no finite change
        "plateaued": False, "relative_change": None, "window": 1}
    with pytest.raises(ValueError, match="window"):
        elbo_plateau(falling, window=0.6)
    with pytest.raises(ValueError, match="tolerance"):
        elbo_plateau(falling, tolerance=0)
