"""The gradient study: its estimator, its files, and the measured fall."""

import csv
import json

import numpy as np
import pytest  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from tfp_bnn_adv import data  # pylint: disable=wrong-import-position
from tfp_bnn_adv import gradients  # pylint: disable=wrong-import-position
from tfp_bnn_adv import models  # pylint: disable=wrong-import-position
from tfp_bnn_adv import paper  # pylint: disable=wrong-import-position
from tfp_bnn_adv.ensemble import PosteriorEnsemble  # pylint: disable=wrong-import-position
from tfp_bnn_adv.network import Network  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies import common  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies import gradient_study as gs  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies import training  # pylint: disable=wrong-import-position
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
    with pytest.raises(ValueError, match="max_rhat"):
        gs.GradientStudyConfig.quick(max_rhat=0.95).validate()


def test_half_moons_gradient_falls_with_the_number_of_samples(tmp_path,
                                                              monkeypatch):
    # HMC on 400 half-moons points, 4 chains; the gradient of the 50-sample
    # average must be measurably smaller than that of one sample (Theorem 1's
    # cancellation).  Measured with this seed: a fall of about 10%.  The
    # chains' R-hat sits near the 1.1 bar and, float rounding being CPU
    # dependent, lands on either side of it on different CPUs, so the study
    # goes on either way and the test checks that the verdict is reported.
    config = gs.GradientStudyConfig.quick(
        moons_widths=(64,), moons_train_sizes=(400,), image_dataset=None,
        include_deterministic=False, sample_counts=(1, 50), num_test=200,
        allow_unconverged=True,
        moons_hmc=InferenceSettings(method="hmc", num_chains=4,
                                    num_burnin_steps=200, num_results=50,
                                    thinning=2, step_size=0.005,
                                    num_leapfrog_steps=20))
    fitted = []
    real_fit = training.fit_posterior

    def spy(*args, **kwargs):
        fitted.append((real_fit(*args, **kwargs), kwargs))
        return fitted[-1][0]

    monkeypatch.setattr(gs, "fit_posterior", spy)
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
    assert header == ("dataset,method,width,n_train,samples,gradient,mean_abs,"
                      "l2," + ",".join(common.CONVERGENCE_HEADER))
    for stem in ("components_half_moons", "grad_vs_samples", "grad_vs_width",
                 "grad_vs_train_size",
                 "traces_half_moons_hmc_width=64_n_train=400"):
        assert (tmp_path / "figures" / f"{stem}.png").stat().st_size > 1000
    # The posterior's diagnostics, on the held-out test points.
    ((ens, _), kwargs), = fitted
    x_test = data.half_moons(500, noise=0.1, seed=0).test_x[:200]
    np.testing.assert_array_equal(kwargs["probe_x"], x_test)
    diag = saved[f"{prefix}/diagnostics"]
    assert diag == ens.metadata["diagnostics"]
    assert diag["probe_source"] == "held_out"
    assert diag["num_probe_points"] == len(x_test)
    assert saved[f"{prefix}/convergence/converged"] == (
        diag["function_rhat_median"] <= 1.1)


def _fake_fit(rhat, hmc_metadata, calls):
    """A stand-in for fit_posterior: random weights, HMC metadata of a known R-hat."""
    def fit(model, x, y, settings, **kwargs):
        calls.append(kwargs)
        net = Network.from_keras(model)
        return PosteriorEnsemble(net, net.init_params(seed=1, num_samples=4),
                                 metadata=hmc_metadata(rhat, traces=True)), {
                                     "wall_seconds": 0.0}
    return fit


def _tiny_config(**kw):
    return gs.GradientStudyConfig.quick(
        moons_widths=(4,), moons_train_sizes=(40,), image_dataset=None,
        include_deterministic=False, sample_counts=(1, 2), num_test=10, **kw)


def test_unconverged_hmc_stops_the_study_after_saving_it(tmp_path, monkeypatch,
                                                         hmc_metadata):
    calls = []
    monkeypatch.setattr(gs, "fit_posterior", _fake_fit(1.5, hmc_metadata, calls))
    prefix = "half_moons/hmc/width=4/n_train=40"
    with pytest.raises(common.UnconvergedPosteriorError) as e:
        gs.run_gradient_study(_tiny_config(), str(tmp_path))
    msg = str(e.value)
    assert prefix in msg and "1.500" in msg and "--allow_unconverged" in msg
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved[f"{prefix}/diagnostics"] == hmc_metadata(1.5)["diagnostics"]
    assert saved[f"{prefix}/convergence/converged"] is False
    assert (tmp_path / "figures" /
            "traces_half_moons_hmc_width=4_n_train=40.png").exists()
    assert not (tmp_path / "gradients.csv").exists()
    assert not (tmp_path / "figures" / "grad_vs_samples.png").exists()
    # The held-out test points were the probe set (n_total = 40 / 0.8).
    np.testing.assert_array_equal(
        calls[0]["probe_x"], data.half_moons(50, noise=0.1, seed=0).test_x[:10])
    assert calls[0]["max_rhat"] == 1.1


def test_allow_unconverged_marks_rows_and_curves(tmp_path, monkeypatch,
                                                 hmc_metadata):
    monkeypatch.setattr(gs, "fit_posterior", _fake_fit(1.5, hmc_metadata, []))
    results = gs.run_gradient_study(_tiny_config(allow_unconverged=True),
                                    str(tmp_path))
    prefix = "half_moons/hmc/width=4/n_train=40"
    assert results["unconverged"] == [prefix]
    assert results[f"{prefix}/convergence/function_rhat_median"] == 1.5
    with open(tmp_path / "gradients.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2  # two sample counts, two gradients
    for row in rows:
        assert row["method"] == "hmc (UNCONVERGED)"
        assert float(row["R-hat median"]) == 1.5 and row["divergent"] == "3"
    assert "**Warning:**" in (tmp_path / "gradients.md").read_text()
    assert (tmp_path / "figures" / "grad_vs_samples.png").exists()
    # The same posterior judged against a looser threshold is not marked.
    results = gs.run_gradient_study(_tiny_config(max_rhat=2.0),
                                    str(tmp_path / "loose"))
    assert results["unconverged"] == []
    with open(tmp_path / "loose" / "gradients.csv", newline="") as f:
        assert {r["method"] for r in csv.DictReader(f)} == {"hmc"}
    assert "**Warning:**" not in (tmp_path / "loose" / "gradients.md").read_text()


def test_rerun_with_another_configuration_is_refused_not_mixed(
        tmp_path, monkeypatch, hmc_metadata):
    monkeypatch.setattr(gs, "fit_posterior", _fake_fit(1.0, hmc_metadata, []))
    gs.run_gradient_study(_tiny_config(), str(tmp_path))
    before = (tmp_path / "results.json").read_text()
    wider = gs.GradientStudyConfig.quick(
        moons_widths=(8,), moons_train_sizes=(40,), image_dataset=None,
        include_deterministic=False, sample_counts=(1, 2), num_test=10)
    with pytest.raises(ValueError, match=r"moons_widths: \[4\] \(saved\) -> "
                       r"\[8\] \(now\)"):
        gs.run_gradient_study(wider, str(tmp_path))
    assert (tmp_path / "results.json").read_text() == before
    # allow_unconverged only decides whether the study is written.
    gs.run_gradient_study(_tiny_config(allow_unconverged=True), str(tmp_path))
    results = gs.run_gradient_study(wider, str(tmp_path), overwrite=True)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "half_moons/hmc/width=8/n_train=40/samples=2/grad_mean_abs/expected" in saved
    assert not any(k.startswith("half_moons/hmc/width=4/") for k in saved)
    assert results["unconverged"] == []


def test_fingerprint_covers_what_fits_the_image_posteriors(tmp_path):
    config = gs.GradientStudyConfig.quick()
    base = gs.fingerprint(config)
    assert base["fields"]["image_hmc"]["num_results"] == 300
    assert "seed" not in base["fields"]["image_hmc"]  # the study's seed rules
    assert gs.fingerprint(gs.GradientStudyConfig.quick(
        image_vi=config.image_vi.replace(epochs=6))) != base
    # Without an image part, its settings do not count.
    no_images = gs.fingerprint(gs.GradientStudyConfig.quick(image_dataset=None))
    assert "image_hmc" not in no_images["fields"]
    assert gs.fingerprint(gs.GradientStudyConfig.quick(
        image_dataset=None, image_hidden=(8,))) == no_images
    # Given ensembles replace what would fit them.
    net = Network.from_keras(models.mlp((28, 28, 1), 10, (4,)))
    ens = PosteriorEnsemble(net, net.init_params(0, num_samples=2))
    given = gs.fingerprint(config, image_ensembles={"hmc": ens})
    assert set(given["fields"]["image_ensembles"]) == {"hmc"}
    assert "image_hmc" not in given["fields"]


def _image_ensembles(hmc_metadata):
    """HMC: 100 random draws; VI: 10 draws of zero output kernel (a zero
    gradient: no image's norm falls); SGD: one net (k = 1 only)."""
    net = Network.from_keras(models.mlp((28, 28, 1), 10, (4,)))
    vi = net.init_params(1, num_samples=10)
    vi[-2] = tf.zeros_like(vi[-2])
    return {"hmc": PosteriorEnsemble(net, net.init_params(0, num_samples=100),
                                     metadata=hmc_metadata(1.0)),
            "vi": PosteriorEnsemble(net, vi, metadata={"method": "vi"}),
            "sgd": PosteriorEnsemble(net, net.init_params(2, num_samples=1),
                                     metadata={"method": "sgd"})}


def _image_config(**kw):
    # "mnist" names the data so the published numbers sit in their column;
    # the loader is patched to hand Fashion-MNIST (MNIST is not stored here).
    return gs.GradientStudyConfig.quick(**{
        "moons_widths": (4,), "moons_train_sizes": (40,),
        "include_deterministic": False, "image_dataset": "mnist",
        "sample_counts": (1, 2), "num_test": 10, "figure1_images": 12, **kw})


@pytest.fixture
def fashion_as_mnist(monkeypatch, hmc_metadata):
    fashion = data.fashion_mnist().subset(num_test=300, seed=0)
    monkeypatch.setattr(gs.common, "load_data", lambda name, **kw: fashion)
    monkeypatch.setattr(gs, "fit_posterior", _fake_fit(1.0, hmc_metadata, []))
    return fashion


def test_figure1_measure_is_the_authors_on_the_first_images(
        tmp_path, fashion_as_mnist, hmc_metadata):
    ensembles = _image_ensembles(hmc_metadata)
    results = gs.run_gradient_study(_image_config(), str(tmp_path),
                                    image_ensembles=ensembles)
    saved = json.loads((tmp_path / "results.json").read_text())
    x, y = fashion_as_mnist.test_x[:12], fashion_as_mnist.test_y[:12]
    for method, counts in (("hmc", (1, 10, 100)), ("vi", (1, 10)),
                           ("sgd", (1,))):
        key = f"mnist/{method}/width=4/n_train=5000/paper_measure"
        norms = paper.figure1_gradient_norms(ensembles[method], x, y,
                                             sample_counts=counts)
        falls = [i for i in range(12) if len(counts) > 1 and all(
            norms[i, j + 1] < norms[i, j] for j in range(len(counts) - 1))]
        assert saved[f"{key}/sample_counts"] == list(counts)
        assert saved[f"{key}/num_images"] == 12
        for j, k in enumerate(counts):
            base = f"{key}/linf_one_image/samples={k}"
            assert saved[f"{base}/median_all"] == pytest.approx(
                np.median(norms[:, j]), rel=1e-6)
            if falls:
                assert saved[f"{base}/first_selected"] == pytest.approx(
                    norms[falls[0], j], rel=1e-6)
                assert saved[f"{base}/median_selected"] == pytest.approx(
                    np.median(norms[falls, j]), rel=1e-6)
            else:
                assert saved[f"{base}/first_selected"] is None
                assert saved[f"{base}/median_selected"] is None
        for k in set(gs.FIGURE1_SAMPLE_COUNTS) - set(counts):  # above S
            assert f"{key}/linf_one_image/samples={k}/median_all" not in saved
        if method == "hmc":  # random draws: some images fall, some do not
            assert 0 < len(falls) < 12
            assert saved[f"{key}/fraction_selected"] == len(falls) / 12
            assert saved[f"{key}/first_selected_index"] == falls[0]
        elif method == "vi":  # a zero gradient never falls
            assert not falls and saved[f"{key}/fraction_selected"] == 0.0
            assert saved[f"{key}/first_selected_index"] is None
            assert "falls at every step" in saved[f"{key}/no_selection"]
        else:  # one sample: nothing to select from
            assert saved[f"{key}/fraction_selected"] is None
            assert "1 sample(s)" in saved[f"{key}/no_selection"]
    assert results["mnist/hmc/width=4/n_train=5000/paper_measure/"
                   "fraction_selected"] == saved[
                       "mnist/hmc/width=4/n_train=5000/paper_measure/"
                       "fraction_selected"]
    # The Markdown labels each measure; the published numbers sit next to
    # the authors' measure, not next to ours.
    md = (tmp_path / "gradients.md").read_text()
    ours_label = gs.OURS_LABEL.format(n=10).replace("|", r"\|")
    assert ours_label.replace("<", r"\<").replace(">", r"\>") in md
    assert gs.AUTHORS_LABEL in md and "the paper reports" not in md

    def row(method, k):
        rows = [line.strip("| ").split(" | ") for line in md.splitlines()
                if line.startswith(f"| mnist | {method} | {k} |")]
        assert len(rows) == 1, (method, k, rows)
        return [cell.strip() for cell in rows[0]]

    hmc = "mnist/hmc/width=4/n_train=5000"
    for k, published in ((1, "0.574"), (10, "0.045"), (100, "0.011")):
        first = saved[f"{hmc}/paper_measure/linf_one_image/samples={k}/"
                      "first_selected"]
        assert row("HMC", k)[4:6] == [f"{first:.3g}", published]
    ours = saved[f"{hmc}/samples=2/grad_mean_abs/expected"]
    assert row("HMC", 2)[3:6] == [f"{ours:.3g}", "not measured", ""]
    assert row("HMC", 1)[3] == (
        f"{saved[f'{hmc}/samples=1/grad_mean_abs/expected']:.3g}")
    selected = round(12 * saved[f"{hmc}/paper_measure/fraction_selected"])
    assert row("HMC", 1)[-1] == f"{selected} of 12"
    assert row("VI", 1)[4:6] == ["none selected", "4.730"]
    assert row("NN (SGD)", 1)[4:6] == ["n/a", ""]
    assert "NN (SGD): no image selected" in md
    assert (tmp_path / "figures" / "figure1_mnist.png").stat().st_size > 1000


def test_figure1_images_is_validated_and_fingerprinted(
        tmp_path, fashion_as_mnist, hmc_metadata):
    with pytest.raises(ValueError, match="figure1_images"):
        gs.GradientStudyConfig.quick(figure1_images=0).validate()
    assert gs.GradientStudyConfig.quick().figure1_images == 50
    assert gs.GradientStudyConfig.paper().figure1_images == 100
    assert gs.fingerprint(gs.GradientStudyConfig.quick(
        figure1_images=7))["fields"]["figure1_images"] == 7
    ensembles = {"sgd": _image_ensembles(hmc_metadata)["sgd"]}
    gs.run_gradient_study(_image_config(), str(tmp_path),
                          image_ensembles=ensembles)
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(common.ConfigMismatchError,
                       match=r"figure1_images: 12 \(saved\) -> 13 \(now\)"):
        gs.run_gradient_study(_image_config(figure1_images=13), str(tmp_path),
                              image_ensembles=ensembles)
    assert (tmp_path / "results.json").read_text() == before
