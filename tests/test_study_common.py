"""The study output writer: atomic results, tables, figures."""

import hashlib
import json
import os

import numpy as np
import pytest

from tfp_bnn_adv import attacks
from tfp_bnn_adv import data
from tfp_bnn_adv import models
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.network import Network
from tfp_bnn_adv.studies import common


def test_tables_render_exactly():
    md = common.markdown_table(["a", "b"], [["x", 0.12345], ["y", None]])
    assert md == "| a | b |\n|---|---|\n| x | 0.123 |\n| y |  |\n"
    md = common.markdown_table(["name", "v"], [["long name", 1.0]])
    assert md.splitlines()[0] == "| name | v |"
    assert md.splitlines()[2] == "| long name | 1.000 |"


def test_results_merge_and_survive_reopening(tmp_path):
    out = common.StudyOutput(str(tmp_path), "t")
    out.update({"test/accuracy": 0.5})
    out.update({"test/adv_accuracy/pgd/expected": 0.25, "note": "x"})
    again = common.StudyOutput(str(tmp_path), "t")
    assert again.results == {"test/accuracy": 0.5, "note": "x",
                             "test/adv_accuracy/pgd/expected": 0.25}
    assert json.loads((tmp_path / "results.json").read_text()) == again.results
    assert list((tmp_path / "tensorboard").iterdir())  # scalars were written
    md = out.table("t", ["k", "v"], [["a", 1]], note="n")
    assert (tmp_path / "t.csv").read_bytes() == b"k,v\r\na,1\r\n"
    assert md.endswith("\nn\n")
    plt = common.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    path = out.save_figure(fig, "line")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="output_dir"):
        common.StudyOutput("", "t")


class _Posterior:  # the part of a PosteriorEnsemble the helpers read
    def __init__(self, metadata):
        self.metadata = metadata


@pytest.mark.parametrize("rhat, max_rhat, converged", [
    (1.02, 1.1, True), (1.1, 1.1, True), (1.3, 1.1, False), (1.3, 1.5, True),
    (float("nan"), 1.1, False)])
def test_hmc_report_judges_the_function_space_rhat(rhat, max_rhat, converged,
                                                   hmc_metadata):
    meta = hmc_metadata(rhat)
    report = common.convergence_report(meta, max_rhat)
    assert report["converged"] is converged
    assert common.is_unconverged(report) is (not converged)
    assert common.mark("HMC", report) == (
        "HMC" if converged else "HMC (UNCONVERGED)")
    shown = None if rhat != rhat else rhat  # NaN is reported as missing
    assert common.convergence_columns(report) == [
        shown, 0.25, 12, pytest.approx((0.6 + 0.7 + 0.8 + 0.9) / 4), 3, None]
    res = common.convergence_results("moons/hmc", report)
    assert res["moons/hmc/diagnostics"] == meta["diagnostics"]
    assert res["moons/hmc/convergence/function_rhat_median"] == shown
    assert res["moons/hmc/convergence/converged"] is converged
    assert res["moons/hmc/convergence/max_rhat"] == max_rhat
    assert json.loads(json.dumps(res)) == res  # JSON-able


def test_missing_diagnostics_count_as_unconverged():
    report = common.convergence_report({"method": "hmc"})
    assert report["converged"] is False and report["diagnostics"] is None
    assert "R-hat median missing" in common.describe("HMC", report)


def test_vi_and_sgd_reports_are_not_gated():
    vi = common.convergence_report({"method": "vi", "diagnostics": {
        "loss_trace": [2.0, 1.0], "plateaued": False,
        "relative_change": 0.5}})
    assert not common.is_unconverged(vi) and vi["converged"] is None
    assert common.convergence_columns(vi) == [None] * 5 + ["no"]
    assert common.convergence_results("VI", vi) == {
        "VI/diagnostics": {"loss_trace": [2.0, 1.0], "plateaued": False,
                           "relative_change": 0.5},
        "VI/convergence/elbo_plateaued": False,
        "VI/convergence/elbo_relative_change": 0.5}
    sgd = common.convergence_report({"method": "sgd"})
    assert common.convergence_results("NN", sgd) == {}
    assert common.convergence_columns(sgd) == [None] * 6
    assert common.mark("NN", sgd) == "NN"


def test_gate_refuses_naming_the_posterior_its_rhat_and_the_flag(hmc_metadata):
    reports = {"HMC": common.convergence_report(hmc_metadata(1.3)),
               "HMC long": common.convergence_report(hmc_metadata(1.01)),
               "VI": common.convergence_report({"method": "vi"})}
    with pytest.raises(common.UnconvergedPosteriorError) as e:
        common.require_converged(reports, allow_unconverged=False,
                                 what="the table", saved_to="/x/results.json")
    msg = str(e.value)
    assert "'HMC'" in msg and "1.300" in msg and "--allow_unconverged" in msg
    assert "the table" in msg and "/x/results.json" in msg
    assert "HMC long" not in msg and "'VI'" not in msg
    assert common.require_converged(reports, allow_unconverged=True,
                                    what="the table") == ["HMC"]
    del reports["HMC"]
    assert common.require_converged(reports, allow_unconverged=False,
                                    what="the table") == []


@pytest.mark.parametrize("bad", [0.99, 0, float("nan"), float("inf"), True,
                                 "1.1", None])
def test_max_rhat_below_one_is_refused(bad):
    with pytest.raises(ValueError, match="--max_rhat must be a finite number"):
        common.check_max_rhat(bad, "--max_rhat")
    with pytest.raises(ValueError, match="max_rhat"):
        common.convergence_report({"method": "hmc"}, bad)


def test_record_posterior_saves_results_trace_plot_and_label(tmp_path,
                                                           hmc_metadata):
    out = common.StudyOutput(str(tmp_path), "t")
    meta = hmc_metadata(1.5, traces=True)
    report = common.record_posterior(out, "half_moons/hmc/width=8", _Posterior(meta))
    assert common.is_unconverged(report)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["half_moons/hmc/width=8/diagnostics"] == meta["diagnostics"]
    assert saved["half_moons/hmc/width=8/convergence/converged"] is False
    assert saved["half_moons/hmc/width=8/convergence/function_rhat_median"] == 1.5
    png = tmp_path / "figures" / "traces_half_moons_hmc_width=8.png"
    assert saved["half_moons/hmc/width=8/figures/traces"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Without traces (e.g. a hand-made ensemble) there is no plot.
    common.record_posterior(out, "bare", _Posterior(hmc_metadata(1.0)))
    assert not (tmp_path / "figures" / "traces_bare.png").exists()
    assert common.StudyOutput(str(tmp_path), "t").results[
        "bare/convergence/converged"] is True


def _fp(**fields):
    base = {"eps": 0.25, "settings": {"num_results": 100, "seed": 0}}
    base.update(fields)
    return common.fingerprint("attack_table", base, inputs={"path": "/x"})


def test_results_of_another_configuration_are_refused_naming_the_fields(
        tmp_path):
    out = common.StudyOutput(str(tmp_path), "t", fingerprint=_fp())
    out.update({"HMC/eps=0.25/test/adv_accuracy/pgd/expected": 0.5})
    before = (tmp_path / "results.json").read_text()
    other = _fp(eps=0.1, settings={"num_results": 50, "seed": 0})
    with pytest.raises(common.ConfigMismatchError) as e:
        common.StudyOutput(str(tmp_path), "t", fingerprint=other)
    msg = str(e.value)
    assert "eps: 0.25 (saved) -> 0.1 (now)" in msg
    assert "settings.num_results: 100 (saved) -> 50 (now)" in msg
    assert "seed" not in msg and "2 fields differ" in msg
    assert "--overwrite" in msg and str(tmp_path) in msg
    assert isinstance(e.value, ValueError)
    assert (tmp_path / "results.json").read_text() == before  # untouched
    # The same configuration resumes: earlier keys are kept.
    again = common.StudyOutput(str(tmp_path), "t", fingerprint=_fp())
    assert again.results["HMC/eps=0.25/test/adv_accuracy/pgd/expected"] == 0.5
    # Inputs (paths) are recorded but not compared.
    moved = common.fingerprint("attack_table", _fp()["fields"],
                               inputs={"path": "/moved"})
    assert common.check_fingerprint(str(tmp_path), moved) is True
    # Another study's results are refused too.
    with pytest.raises(common.ConfigMismatchError, match="'attack_table' study"):
        common.StudyOutput(str(tmp_path), "t", fingerprint=common.fingerprint(
            "gradient_study", _fp()["fields"]))


def test_overwrite_deletes_the_earlier_run_and_starts_afresh(tmp_path):
    out = common.StudyOutput(str(tmp_path), "t", fingerprint=_fp())
    out.update({"old/key": 1.0})
    out.table("table", ["a"], [[1]])
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r.json").write_text("{}")
    (tmp_path / "keep.txt").write_text("not the study's")
    new = _fp(eps=0.1)
    fresh = common.StudyOutput(str(tmp_path), "t", fingerprint=new,
                               overwrite=True,
                               owned=("table.csv", "table.md", "runs"))
    assert fresh.results == {"fingerprint": new}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == {"fingerprint": new}
    assert not (tmp_path / "table.csv").exists()
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "tensorboard").exists()
    assert (tmp_path / "keep.txt").exists() and (tmp_path / "figures").is_dir()
    with pytest.raises(ValueError, match="inside output_dir"):
        common.StudyOutput(str(tmp_path), "t", fingerprint=new, overwrite=True,
                           owned=("../elsewhere",))


def test_results_without_a_fingerprint_or_unreadable_are_refused(tmp_path):
    (tmp_path / "results.json").write_text('{"test/accuracy": 0.9}')
    with pytest.raises(common.ConfigMismatchError,
                       match="without a configuration fingerprint"):
        common.StudyOutput(str(tmp_path), "t", fingerprint=_fp())
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(common.ConfigMismatchError, match="not valid JSON"):
        common.StudyOutput(str(tmp_path), "t", fingerprint=_fp())
    out = common.StudyOutput(str(tmp_path), "t", fingerprint=_fp(),
                             overwrite=True)
    assert out.results == {"fingerprint": _fp()}


def test_fingerprints_are_canonical_and_digest_their_fields():
    a = common.fingerprint("s", {"widths": (4, 8), "eps": np.float64(0.25),
                                 "n": np.int64(3)})
    b = common.fingerprint("s", {"n": 3, "eps": 0.25, "widths": [4, 8]})
    assert a == b and len(a["sha256"]) == 64
    assert common.fingerprint("s", {"n": 4})["sha256"] != common.fingerprint(
        "s", {"n": 3})["sha256"]
    assert common.fingerprint_diff({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}}) == [
        ("a.b", 1, 2), ("c", 2, common._ABSENT)]  # pylint: disable=protected-access
    with pytest.raises(TypeError, match="JSON-able"):
        common.fingerprint("s", {"f": object()})


def test_file_sha256_follows_the_content(tmp_path):
    path = tmp_path / "p.npz"
    path.write_bytes(b"first")
    assert common.file_sha256(path) == hashlib.sha256(b"first").hexdigest()
    path.write_bytes(b"second, longer")
    os.utime(path, ns=(1, 1))
    assert common.file_sha256(path) == hashlib.sha256(
        b"second, longer").hexdigest()
    with pytest.raises(FileNotFoundError):
        common.file_sha256(tmp_path / "missing.npz")


def test_directories_that_cannot_be_created_are_named(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ValueError, match=r"--output_dir=.*a_file.* existing "
                       "file"):
        common.check_directory(str(f), "--output_dir")
    with pytest.raises(ValueError, match=r"ckpt.*lies under .*a_file"):
        common.check_directory(str(f / "ckpt"), "ckpt/")
    assert common.check_directory(str(tmp_path / "new" / "dir"), "d") == str(
        tmp_path / "new" / "dir")
    with pytest.raises(ValueError, match="output_dir=.*existing file"):
        common.StudyOutput(str(f), "t")


# --- What studies share: one attack dispatcher, model and data loader, seed
# rule. ---------------------------------------------------------------------

def test_study_seeds_is_one_rule_for_every_study():
    assert common.study_seeds(3) == common.Seeds(data=3, model=3, attack=3)
    # A sweep's models differ only in their own seed: the data stay fixed.
    assert common.study_seeds(3, sweep=True) == common.Seeds(
        data=common.SWEEP_DATA_SEED, model=3, attack=3)
    with pytest.raises(ValueError, match="seed"):
        common.study_seeds(-1)
    with pytest.raises(TypeError, match="seed"):
        common.study_seeds(1.5)


def _tiny_ensemble():
    net = Network.from_keras(models.mlp((2,), 2, (4,)))
    return PosteriorEnsemble(net, net.init_params(seed=0, num_samples=3))


def test_run_attack_dispatches_by_name_with_the_attacks_defaults():
    ens = _tiny_ensemble()
    ds = data.half_moons(50, seed=1)
    x, y = ds.test_x, ds.test_y
    cases = [
        ("random", dict(random_trials=2), attacks.random_attack,
         dict(trials=2)),
        ("fgsm", dict(gradient="predictive"), attacks.fgsm,
         dict(gradient="predictive")),
        ("pgd", dict(gradient="expected", pgd_steps=3, pgd_restarts=1),
         attacks.pgd, dict(gradient="expected", steps=3, restarts=1)),
        ("pgd", {}, attacks.pgd, {}),  # PGD's own defaults
        ("square", dict(square_queries=7), attacks.square_attack,
         dict(max_queries=7))]
    for name, options, attack, kwargs in cases:
        np.testing.assert_array_equal(
            common.run_attack(ens, x, y, name, 0.1, seed=4, **options),
            attack(ens, x, y, 0.1, seed=4, **kwargs))
    with pytest.raises(ValueError, match="attack must be one of"):
        common.run_attack(ens, x, y, "cw", 0.1, seed=0)


def test_load_data_and_load_model(tmp_path):
    moons = common.load_data("half_moons", data_dir="ignored",
                             data_source="idx", half_moons_n=100, seed=2)
    direct = data.half_moons(100, seed=2)
    np.testing.assert_array_equal(moons.train_x, direct.train_x)
    np.testing.assert_array_equal(moons.test_y, direct.test_y)
    mlp = common.load_model((2,), 2, hidden=(5, 3))
    assert [w.shape for w in mlp.weights] == [(2, 5), (5,), (5, 3), (3,),
                                              (3, 2), (2,)]
    cnn = common.load_model((28, 28, 1), 10, hidden=(0,), architecture="cnn",
                            filters=(4,))
    assert cnn.count_params() == models.cnn(
        (28, 28, 1), 10, (4,)).count_params()
    path = tmp_path / "mine.keras"
    mlp.save(path)
    loaded = common.load_model((9,), 9, hidden=(1,), keras_model=str(path))
    assert [w.shape for w in loaded.weights] == [w.shape for w in mlp.weights]
