"""The robustness-accuracy sweep: its measurements and its resume."""

import csv
import json

import numpy as np
import pytest  # pylint: disable=wrong-import-position

from tfp_bnn_adv import attacks  # pylint: disable=wrong-import-position
from tfp_bnn_adv import data  # pylint: disable=wrong-import-position
from tfp_bnn_adv.ensemble import PosteriorEnsemble  # pylint: disable=wrong-import-position
from tfp_bnn_adv.network import Network  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies import common  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies import robustness_accuracy as ra  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies import training  # pylint: disable=wrong-import-position


def _config(**kw):
    return ra.RobustnessAccuracyConfig.quick(**{
        "dataset": "half_moons", "half_moons_n": 500, "methods": ("sgd",),
        "widths": (4, 8), "depths": (1,), "training_lengths": (2,),
        "num_test": 50, **kw})


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
    assert "sgd-d1-w32-L1-s0" in ids and "hmc-d1-w128-L700-s0" in ids
    assert len(ids) == len(set(ids))
    assert len(ra.run_ids(ra.RobustnessAccuracyConfig.paper())) >= 1000
    with pytest.raises(ValueError, match="attack"):
        ra.RobustnessAccuracyConfig(attack="cw").validate()
    with pytest.raises(ValueError, match="methods"):
        ra.RobustnessAccuracyConfig(methods=("mcdropout",)).validate()
    with pytest.raises(ValueError, match="max_rhat"):
        ra.RobustnessAccuracyConfig(max_rhat=0.5).validate()


def test_unconverged_hmc_run_blocks_the_summary_until_allowed(
        tmp_path, monkeypatch, hmc_metadata):
    calls = []
    real_fit = training.fit_posterior

    def fit(model, x, y, settings, **kwargs):
        calls.append((settings.method, kwargs))
        if settings.method != "hmc":
            return real_fit(model, x, y, settings, **kwargs)
        net = Network.from_keras(model)
        return PosteriorEnsemble(net, net.init_params(seed=2, num_samples=4),
                                 metadata=hmc_metadata(1.5, traces=True)), {
                                     "wall_seconds": 0.0}

    monkeypatch.setattr(ra, "fit_posterior", fit)
    config = ra.RobustnessAccuracyConfig
    kw = dict(dataset="half_moons", half_moons_n=500, methods=("sgd", "hmc"),
              widths=(4,), depths=(1,), training_lengths=(2,), hmc_lengths=(3,),
              num_test=20)
    run = "hmc-d1-w4-L3-s0"
    with pytest.raises(common.UnconvergedPosteriorError) as e:
        ra.run_robustness_accuracy(config.quick(**kw), str(tmp_path))
    msg = str(e.value)
    assert f"'{run}'" in msg and "1.500" in msg and "--allow_unconverged" in msg
    assert "sgd-d1-w4-L2-s0" not in msg
    # Every run and its diagnostics are saved; the summary is not written.
    saved_run = json.loads((tmp_path / "runs" / f"{run}.json").read_text())
    assert saved_run["diagnostics"] == hmc_metadata(1.5)["diagnostics"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved[f"{run}/diagnostics"] == saved_run["diagnostics"]
    assert saved[f"{run}/convergence/converged"] is False
    assert (tmp_path / "figures" / f"traces_{run}.png").exists()
    assert not (tmp_path / "sweep.csv").exists()
    assert not (tmp_path / "figures" / "robustness_vs_accuracy.png").exists()
    # HMC was diagnosed on the held-out test points.
    hmc_kwargs = [k for m, k in calls if m == "hmc"][0]
    np.testing.assert_array_equal(hmc_kwargs["probe_x"],
                                  data.half_moons(500).test_x[:20])

    # Allowed: nothing is refitted, the summary marks the run.
    calls.clear()
    results = ra.run_robustness_accuracy(
        config.quick(allow_unconverged=True, **kw), str(tmp_path))
    assert calls == [] and results["num_skipped"] == 2
    assert results["unconverged"] == [run]
    with open(tmp_path / "sweep.csv", newline="") as f:
        rows = {r["run_id"]: r for r in csv.DictReader(f)}
    assert rows[run]["method"] == "hmc (UNCONVERGED)"
    assert float(rows[run]["R-hat median"]) == 1.5
    assert rows["sgd-d1-w4-L2-s0"]["method"] == "sgd"
    assert rows["sgd-d1-w4-L2-s0"]["R-hat median"] == ""
    assert (tmp_path / "figures" / "robustness_vs_accuracy.png").exists()

    # Re-judged from the saved diagnostics under a looser threshold.
    results = ra.run_robustness_accuracy(config.quick(max_rhat=2.0, **kw),
                                         str(tmp_path))
    assert results["unconverged"] == []
    assert results[f"{run}/convergence/converged"] is True


def test_other_settings_do_not_reuse_finished_runs(tmp_path, monkeypatch):
    ra.run_robustness_accuracy(_config(widths=(4,)), str(tmp_path))
    before = (tmp_path / "runs" / "sgd-d1-w4-L2-s0.json").read_text()
    calls = []
    monkeypatch.setattr(ra, "fit_posterior",
                        lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
                            AssertionError("fitted")))
    # Another test set would give other numbers under the same run id.
    with pytest.raises(ValueError, match=r"num_test: 50 \(saved\) -> 40 "
                       r"\(now\)") as e:
        ra.run_robustness_accuracy(_config(widths=(4,), num_test=40),
                                   str(tmp_path))
    assert "--overwrite" in str(e.value) and calls == []
    assert (tmp_path / "runs" / "sgd-d1-w4-L2-s0.json").read_text() == before
    # A run file that is not this sweep's is refused, not reused.
    run = json.loads(before)
    run["fingerprint"] = "0" * 64
    (tmp_path / "runs" / "sgd-d1-w4-L2-s0.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match="sgd-d1-w4-L2-s0.json.*another "
                       "configuration"):
        ra.run_robustness_accuracy(_config(widths=(4,)), str(tmp_path))


def test_changed_axes_reuse_runs_and_results_show_this_sweep_only(
        tmp_path, monkeypatch):
    ra.run_robustness_accuracy(_config(), str(tmp_path))  # widths 4 and 8
    assert "sgd-d1-w8-L2-s0/test/accuracy" in json.loads(
        (tmp_path / "results.json").read_text())
    calls = []
    real_fit = training.fit_posterior
    monkeypatch.setattr(ra, "fit_posterior",
                        lambda *a, **k: calls.append(a) or real_fit(*a, **k))
    # max_rhat and allow_unconverged are re-judged, not part of the runs.
    results = ra.run_robustness_accuracy(
        _config(widths=(4,), max_rhat=1.3, allow_unconverged=True),
        str(tmp_path))
    assert calls == [] and results["num_skipped"] == 1
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "sgd-d1-w4-L2-s0/test/accuracy" in saved
    assert not any(k.startswith("sgd-d1-w8-") for k in saved)
    with open(tmp_path / "sweep.csv", newline="") as f:
        assert {r["run_id"] for r in csv.DictReader(f)} == {"sgd-d1-w4-L2-s0"}
    assert (tmp_path / "runs" / "sgd-d1-w8-L2-s0.json").exists()  # kept
    # --overwrite starts afresh: every run is fitted again.
    results = ra.run_robustness_accuracy(_config(widths=(4,)), str(tmp_path),
                                         overwrite=True)
    assert len(calls) == 1 and results["num_skipped"] == 0
    assert not (tmp_path / "runs" / "sgd-d1-w8-L2-s0.json").exists()
