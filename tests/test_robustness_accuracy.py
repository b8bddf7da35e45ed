"""The robustness-accuracy sweep: its measurements and its resume."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from tfp_bnn_adv import attacks  # pylint: disable=wrong-import-position
from tfp_bnn_adv import data  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies import robustness_accuracy as ra  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies import training  # pylint: disable=wrong-import-position


def _config(**kw):
    return ra.RobustnessAccuracyConfig.quick(
        dataset="half_moons", half_moons_n=500, methods=("sgd",), widths=(4, 8),
        depths=(1,), training_lengths=(2,), num_test=50, **kw)


def test_sweep_measures_softmax_robustness(tmp_path, monkeypatch):
    fitted = {}
    real_fit = training.fit_posterior

    def spy(model, x, y, settings, **kwargs):
        ens, info = real_fit(model, x, y, settings, **kwargs)
        fitted[(model.layers[0].units, settings.epochs)] = ens
        return ens, info

    monkeypatch.setattr(ra, "fit_posterior", spy)
    results = ra.run_robustness_accuracy(_config(), str(tmp_path))
    assert results["num_models"] == 2 and results["num_skipped"] == 0
    ds = data.half_moons(500)
    x, y = ds.test_x[:50], ds.test_y[:50]
    ens = fitted[(8, 2)]
    p = ens.predict_proba(x)
    for eps in (0.25, 0.025, 0.0025):  # the SGD radii of the paper
        x_adv = attacks.fgsm(ens, x, y, eps, gradient="expected", seed=0)
        q = ens.predict_proba(x_adv)
        expected = 1 - np.mean(np.max(np.abs(p - q), axis=1))
        key = f"sgd-d1-w8-L2-s0/test/softmax_robustness/fgsm/expected/eps={eps:g}"
        assert results[key] == pytest.approx(expected, abs=1e-6)
    assert results["sgd-d1-w8-L2-s0/test/accuracy"] == pytest.approx(
        np.mean(p.argmax(1) == y))
    for stem in ("robustness_vs_accuracy", "robustness_vs_width",
                 "robustness_vs_neurons"):
        assert (tmp_path / "figures" / f"{stem}.png").exists()
    assert len((tmp_path / "sweep.csv").read_text().splitlines()) == 1 + 2 * 3


def test_resume_redoes_nothing_finished(tmp_path, monkeypatch):
    ra.run_robustness_accuracy(_config(), str(tmp_path))
    kept = tmp_path / "runs" / "sgd-d1-w4-L2-s0.json"
    before = kept.read_text()
    (tmp_path / "runs" / "sgd-d1-w8-L2-s0.json").unlink()  # "interrupted"
    calls = []
    real_fit = training.fit_posterior
    monkeypatch.setattr(ra, "fit_posterior",
                        lambda *a, **k: calls.append(a[3]) or real_fit(*a, **k))
    results = ra.run_robustness_accuracy(_config(), str(tmp_path))
    assert [s.seed for s in calls] == [0] and len(calls) == 1
    assert results["num_skipped"] == 1 and results["num_models"] == 2
    assert kept.read_text() == before
    assert json.loads((tmp_path / "runs" / "sgd-d1-w8-L2-s0.json").read_text())[
        "width"] == 8


def test_run_ids_and_validation():
    ids = ra.run_ids(ra.RobustnessAccuracyConfig.quick(methods=("sgd", "hmc")))
    assert "sgd-d1-w32-L1-s0" in ids and "hmc-d1-w128-L100-s0" in ids
    assert len(ids) == len(set(ids))
    assert len(ra.run_ids(ra.RobustnessAccuracyConfig.paper())) >= 1000
    with pytest.raises(ValueError, match="attack"):
        ra.RobustnessAccuracyConfig(attack="cw").validate()
    with pytest.raises(ValueError, match="methods"):
        ra.RobustnessAccuracyConfig(methods=("mcdropout",)).validate()
