"""Smoke tests of every launch script with tiny settings: files and keys."""

import json
import os
import pathlib
import subprocess
import sys

from absl import app
from absl import flags  # pylint: disable=wrong-import-position
from absl.testing import flagsaver  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from launch import attack  # pylint: disable=wrong-import-position
from launch import evaluate  # pylint: disable=wrong-import-position
from launch import flags as lf  # pylint: disable=wrong-import-position
from launch import gradient_study  # pylint: disable=wrong-import-position
from launch import paper_ablation  # pylint: disable=wrong-import-position
from launch import quickstart  # pylint: disable=wrong-import-position
from launch import robustness_accuracy  # pylint: disable=wrong-import-position
from launch import train  # pylint: disable=wrong-import-position
from tfp_bnn_adv import models  # pylint: disable=wrong-import-position
from tfp_bnn_adv.ensemble import PosteriorEnsemble  # pylint: disable=wrong-import-position
from tfp_bnn_adv.studies import common  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def parsed_flags():
    if not FLAGS.is_parsed():
        FLAGS(["pytest"])
    yield


def _results(path):
    return json.loads((path / "results.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny deep ensemble and an HMC posterior on half-moons."""
    if not FLAGS.is_parsed():
        FLAGS(["pytest"])
    out = {}
    for method, extra in (("ensemble", dict(num_members=2, epochs=3)),
                          ("hmc", dict(num_burnin_steps=20, num_results=5,
                                       num_leapfrog_steps=3))):
        d = tmp_path_factory.mktemp(method)
        with flagsaver.flagsaver(output_dir=str(d), method=method,
                                 dataset="half_moons", half_moons_n=300,
                                 hidden=["8"], **extra):
            train.main(["train"])
        out[method] = d
    return out


def test_train_writes_a_loadable_posterior(trained):
    for method, d in trained.items():
        results = _results(d)
        assert 0.0 <= results["test/accuracy"] <= 1.0
        assert results["settings"]["method"] == method
        assert (d / "posterior.npz").exists() and (d / "flags.txt").exists()
        assert f"--method={method}" in (d / "flags.txt").read_text()
    assert (trained["hmc"] / "ckpt").is_dir()
    # The HMC posterior's diagnostics, on held-out test points (half-moons
    # 300 points: 60 test points), and its trace plot.
    results = _results(trained["hmc"])
    ens = PosteriorEnsemble.load(str(trained["hmc"] / "posterior.npz"))
    assert results["train/diagnostics"] == ens.metadata["diagnostics"]
    assert results["train/diagnostics"]["probe_source"] == "held_out"
    assert results["train/diagnostics"]["num_probe_points"] == 60
    assert results["train/convergence/converged"] == ens.metadata["converged"]
    assert (trained["hmc"] / "figures" / "traces_train.png").exists()
    assert "--max_rhat=1.1" in (trained["hmc"] / "flags.txt").read_text()


def test_attack_table_script(trained, tmp_path):
    posts = [f"HMC={trained['hmc'] / 'posterior.npz'}",
             str(trained["ensemble"] / "posterior.npz")]
    kwargs = dict(output_dir=str(tmp_path), dataset="half_moons",
                  half_moons_n=300, posteriors=posts, num_test=30, pgd_steps=2,
                  apgd_steps=2, square_queries=5, eps=0.1, verdict=False)
    # A tiny HMC run does not converge: refused without --allow_unconverged.
    assert _results(trained["hmc"])["train/convergence/converged"] is False
    with flagsaver.flagsaver(**kwargs):
        with pytest.raises(common.UnconvergedPosteriorError,
                           match="'HMC'.*--allow_unconverged"):
            attack.main(["attack"])
    assert not (tmp_path / "table.md").exists()
    assert "HMC/diagnostics" in _results(tmp_path)
    with flagsaver.flagsaver(allow_unconverged=True, **kwargs):
        attack.main(["attack"])
    results = _results(tmp_path)
    assert results["unconverged"] == ["HMC"]
    assert "| half_moons / HMC (UNCONVERGED) |" in (tmp_path / "table.md").read_text()
    for label in ("HMC", "Deep ensemble"):
        for key in ("adv_accuracy/random", "adv_accuracy/fgsm/expected",
                    "adv_robustness/pgd/predictive", "softmax_robustness/square"):
            assert f"{label}/eps=0.1/test/{key}" in results
    assert (tmp_path / "table.md").exists() and (tmp_path / "table.csv").exists()


def test_evaluate_script(trained, tmp_path, capsys):
    kwargs = dict(output_dir=str(tmp_path), dataset="half_moons",
                  half_moons_n=300,
                  posterior=str(trained["hmc"] / "posterior.npz"),
                  reference=str(trained["ensemble"] / "posterior.npz"),
                  num_examples=20, steps=2, square_queries=5, random_trials=2,
                  eps=0.1, gradient="expected", jit="default")
    with flagsaver.flagsaver(**kwargs):
        evaluate.main(["evaluate"])
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verdict"] in ("not_robust", "robust", "inconclusive")
    assert report["verdict_line"] in printed
    assert report["verdict_line"] in (tmp_path / "report.md").read_text()
    assert (tmp_path / "figures" / "accuracy_vs_eps.png").exists()
    assert len(report["per_example"]["robust"]) == 20
    assert "transfer" in report["checks"]
    assert report["settings"]["report"]["gradient"] == "expected"
    assert report["settings"]["pgd/expected"]["steps"] == 2
    # The tiny HMC run's diagnostics, flagged unconverged.
    hmc = _results(trained["hmc"])
    assert report["diagnostics"]["diagnostics"] == hmc["train/diagnostics"]
    assert "UNCONVERGED" in report["diagnostics_statement"]
    flags_txt = (tmp_path / "flags.txt").read_text()
    assert "--num_examples=20" in flags_txt and "--steps=2" in flags_txt


def test_evaluate_refuses_bad_flags_before_writing(tmp_path):
    out = tmp_path / "never"
    with flagsaver.flagsaver(output_dir=str(out), posterior=None):
        with pytest.raises(app.UsageError, match="--posterior is required"):
            evaluate.main(["evaluate"])
    with flagsaver.flagsaver(output_dir=str(out), eps=1.5,
                             posterior=str(tmp_path / "none.npz")):
        with pytest.raises(app.UsageError, match="none.npz.*\n.*--eps=1.5"):
            evaluate.main(["evaluate"])
    assert not out.exists()


def test_attack_requires_posteriors(tmp_path):
    with flagsaver.flagsaver(output_dir=str(tmp_path), posteriors=[]):
        with pytest.raises(app.UsageError, match="--posteriors"):
            attack.main(["attack"])


def test_output_dir_is_required():
    with flagsaver.flagsaver(output_dir=None):
        with pytest.raises(flags.IllegalFlagValueError, match="--output_dir"):
            train.main(["train"])


@pytest.mark.parametrize("script", [train, attack, gradient_study,
                                    robustness_accuracy, quickstart])
def test_max_rhat_below_one_is_refused_before_any_work(script, tmp_path):
    out = tmp_path / "never"
    with flagsaver.flagsaver(output_dir=str(out), max_rhat=0.9,
                             posteriors=["x.npz"]):
        with pytest.raises(ValueError, match="--max_rhat must be"):
            script.main(["script"])
    assert not out.exists()


def test_gradient_study_script(tmp_path):
    # Tiny HMC (the flags override the preset's) does not converge, hence
    # --allow_unconverged.
    with flagsaver.flagsaver(output_dir=str(tmp_path), dataset="half_moons",
                             widths=["4", "8"], train_sizes=["80"],
                             sample_counts=["1", "2"], num_test=20,
                             num_burnin_steps=10, num_results=4,
                             num_leapfrog_steps=3, allow_unconverged=True):
        gradient_study.main(["gradient_study"])
    results = _results(tmp_path)
    assert "half_moons/hmc/width=8/n_train=80/samples=2/grad_mean_abs/predictive" in results
    assert (tmp_path / "figures" / "grad_vs_width.png").exists()
    md = (tmp_path / "gradients.md").read_text()
    for width in (4, 8):
        prefix = f"half_moons/hmc/width={width}/n_train=80"
        diag = results[f"{prefix}/diagnostics"]
        assert diag["num_results"] == 4 and diag["probe_source"] == "held_out"
        rhat = diag["function_rhat_median"]
        converged = rhat is not None and rhat <= 1.1
        assert results[f"{prefix}/convergence/converged"] is converged
        assert (prefix in results["unconverged"]) is not converged
        row = f"| half_moons | hmc (UNCONVERGED) | {width} | 80 |"
        assert (row in md) is not converged
    # Four draws per chain: at least one of the two is flagged.
    assert results["unconverged"] and "**Warning:**" in md


def test_paper_ablation_script(tmp_path, capsys):
    kwargs = dict(output_dir=str(tmp_path), num_train=200, num_test=20,
                  hidden=["8"], epochs=1, vi_samples=12, pgd_steps=2,
                  ablation_methods=["vi"],
                  switches=["attack_loss", "softmax_metric", "vi_training"])
    with flagsaver.flagsaver(**kwargs):
        paper_ablation.main(["paper_ablation"])
    printed = capsys.readouterr().out
    assert "| corrected + vi_training |" in printed
    results = _results(tmp_path)
    for row in ("original (all switches on)", "corrected"):
        assert 0.0 <= results[f"{row}/vi/adv_accuracy/pgd"] <= 1.0
    assert sorted(results["effects"]) == ["attack_loss", "softmax_metric",
                                          "vi_training"]
    for name in ("summary.md", "table.md", "posteriors.md", "flags.txt",
                 "posteriors/vi.npz", "posteriors/vi_paper.npz",
                 "figures/switch_effects.png"):
        assert (tmp_path / name).exists(), name
    # The authors' VI over-weights the KL by N / B.
    authors = PosteriorEnsemble.load(tmp_path / "posteriors" / "vi_paper.npz")
    assert authors.metadata["diagnostics"]["loss_trace"]
    # A rerun reuses the saved posteriors and gives the same table.
    before = (tmp_path / "table.md").read_text()
    with flagsaver.flagsaver(**kwargs):
        paper_ablation.main(["paper_ablation"])
    assert (tmp_path / "table.md").read_text() == before


def test_robustness_accuracy_script_resumes(tmp_path):
    kwargs = dict(output_dir=str(tmp_path), dataset="half_moons",
                  half_moons_n=300, methods=["sgd"], widths=["4"],
                  training_lengths=["1"], num_test=20)
    with flagsaver.flagsaver(**kwargs):
        robustness_accuracy.main(["robustness_accuracy"])
    assert _results(tmp_path)["num_skipped"] == 0
    with flagsaver.flagsaver(**kwargs):
        robustness_accuracy.main(["robustness_accuracy"])
    assert _results(tmp_path)["num_skipped"] == 1


def test_user_keras_model_file(tmp_path):
    path = tmp_path / "mine.keras"
    models.mlp((2,), 2, (5, 3), name="mine").save(path)
    with flagsaver.flagsaver(output_dir=str(tmp_path / "out"), method="sgd",
                             dataset="half_moons", half_moons_n=200, epochs=1,
                             keras_model=str(path)):
        train.main(["train"])
    ens = PosteriorEnsemble.load(tmp_path / "out" / "posterior.npz")
    assert ens.network.param_shapes == ((2, 5), (5,), (5, 3), (3,), (3, 2), (2,))


def test_quickstart_end_to_end_tiny(tmp_path, capsys):
    with flagsaver.flagsaver(
            output_dir=str(tmp_path), num_train=300, num_test=20, hidden=["8"],
            num_burnin_steps=10, num_results=4, epochs=1, vi_samples=4,
            widths=["4"], train_sizes=["60"], sample_counts=["1", "2"],
            training_lengths=["1"], hmc_lengths=["5"], pgd_steps=2,
            apgd_steps=2, square_queries=5, allow_unconverged=True,
            # The authors' HMC is tested in test_hmc_paper_emulation.
            switches=["attack_loss", "softmax_metric", "vi_training"]):
        quickstart.main(["quickstart"])
    printed = capsys.readouterr().out
    assert "fashion_mnist / HMC" in printed and "published FGSM" in printed
    # An unconverged HMC posterior is never presented as plain "HMC".
    top = _results(tmp_path)
    converged = top["HMC/convergence/converged"]
    assert converged == (
        (top["HMC/convergence/function_rhat_median"] or 9) <= 1.1)
    assert ("| fashion_mnist / HMC (UNCONVERGED) |" in printed) is not converged
    assert ("| fashion_mnist / HMC |" in printed) is converged
    # Tiny runs (4 draws per chain) do not all converge; they are flagged.
    assert top["unconverged"] and "**Warning:**" in printed
    assert "(UNCONVERGED)" in printed
    for sub in ("attack_table", "gradient_study", "robustness_accuracy",
                "paper_ablation"):
        assert (tmp_path / sub / "results.json").exists()
    assert "Why the paper found BNNs robust" in printed
    assert (tmp_path / "summary.md").exists()
    for method in ("hmc", "vi", "sgd"):
        assert (tmp_path / f"posterior_{method}.npz").exists()
    assert top["HMC/diagnostics"]["probe_source"] == "held_out"
    assert top["HMC/diagnostics"]["num_results"] == 4  # the flags reached HMC
    assert len(top["VI/diagnostics"]["loss_trace"]) == 1
    assert (tmp_path / "figures" / "traces_HMC.png").exists()
    table = _results(tmp_path / "attack_table")
    assert table["HMC/diagnostics"] == top["HMC/diagnostics"]
    assert table["unconverged"] == ([] if converged else ["HMC"])
    grads = _results(tmp_path / "gradient_study")
    assert "half_moons/hmc/width=4/n_train=60/diagnostics" in grads
    sweep = _results(tmp_path / "robustness_accuracy")
    # The quick sweep leaves HMC out (one converged posterior per model does
    # not fit the quickstart's budget); VI reports its ELBO plateau.
    assert "vi-d1-w4-L1-s0/diagnostics" in sweep
    assert not any(k.startswith("hmc-") for k in sweep)


def test_scripts_run_with_mirrored_strategy_on_logical_cpus(tmp_path):
    """--strategy=mirrored over the two logical CPUs, train then attack."""
    hmc_dir, table_dir = tmp_path / "hmc", tmp_path / "table"
    shared = dict(dataset="half_moons", half_moons_n=300, strategy="mirrored",
                  logical_cpus=2)
    with flagsaver.flagsaver(output_dir=str(hmc_dir), method="hmc",
                             hidden=["8"], num_burnin_steps=10, num_results=4,
                             num_leapfrog_steps=3, hmc_parallelism="chains",
                             **shared):
        train.main(["train"])
    ens = PosteriorEnsemble.load(str(hmc_dir / "posterior.npz"))
    assert ens.metadata["settings"]["num_replicas"] == 2
    assert ens.metadata["settings"]["parallelism"] == "chains"
    assert "--strategy=mirrored" in (hmc_dir / "flags.txt").read_text()
    with flagsaver.flagsaver(output_dir=str(table_dir),
                             posteriors=[f"HMC={hmc_dir / 'posterior.npz'}"],
                             num_test=31, pgd_steps=2, apgd_steps=2,
                             square_queries=5, eps=0.1, verdict=False,
                             allow_unconverged=True, **shared):
        attack.main(["attack"])
    results = _results(table_dir)
    assert 0.0 <= results["HMC/eps=0.1/test/adv_accuracy/pgd/predictive"] <= 1.0


# --- Bad flags fail before anything is created, without a traceback. ------

def _script(module, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


_SGD = ["--dataset=half_moons", "--half_moons_n=100", "--method=sgd",
        "--epochs=1", "--hidden=4"]
_HMC = ["--dataset=half_moons", "--half_moons_n=100", "--method=hmc",
        "--num_burnin_steps=2", "--num_results=2", "--num_leapfrog_steps=2",
        "--hidden=4"]
# case: (extra flags, what the output dir holds first, what stderr names)
_BAD = {
    "hidden=abc": (_SGD + ["--hidden=abc"], None, ["--hidden", "'abc'"]),
    "num_test=-5": (_SGD + ["--num_test=-5"], None, ["--num_test", "'-5'"]),
    "num_test=0": (_SGD + ["--num_test=0"], None, ["--num_test", "'all'"]),
    "output_dir is a file": (_SGD, "file", ["--output_dir", "existing file"]),
    "ckpt is a file": (_HMC, "ckpt file", ["ckpt/", "existing file"]),
}


@pytest.mark.parametrize("case", list(_BAD))
def test_bad_flags_exit_cleanly_before_anything_is_written(case, tmp_path):
    args, holds, names = _BAD[case]
    out = tmp_path / "out"
    if holds == "file":
        out.write_text("a file")
    elif holds == "ckpt file":
        out.mkdir()
        (out / "ckpt").write_text("a file")
    proc = _script("launch.train", f"--output_dir={out}", *args)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for name in names:
        assert name in proc.stderr, proc.stderr[-3000:]
    if holds == "file":
        assert out.read_text() == "a file"
    elif holds == "ckpt file":
        assert sorted(p.name for p in out.iterdir()) == ["ckpt"]
    else:
        assert not out.exists()


@pytest.mark.parametrize("name, value", [
    ("hidden", ["abc"]), ("hidden", ["0"]), ("widths", ["0"]),
    ("train_sizes", ["x"]), ("filters", ["-2"]), ("depths", ["1.5"]),
    ("eps_sweep", ["nan"]), ("eps_sweep", ["-0.1"]), ("attacks", ["cw"]),
    ("gradients", ["sampled"]), ("methods", ["mcdropout"]),
    ("posteriors", ["HMC="]), ("num_test", 0), ("num_test", -5),
    ("num_train", 0), ("seed", -1), ("half_moons_n", 1), ("num_chains", 0),
    ("num_results", 0), ("num_burnin_steps", -1), ("epochs", 0),
    ("batch_size", 0), ("vi_samples", 0), ("pgd_steps", 0),
    ("square_queries", 0), ("step_size", 0.0), ("step_size", float("nan")),
    ("learning_rate", -1e-3), ("prior_scale", float("inf")),
    ("trajectory_length", 0.0), ("eps", float("nan")), ("eps", -0.25)])
def test_every_string_and_count_flag_is_validated(name, value):
    with pytest.raises(flags.IllegalFlagValueError, match=f"--{name}"):
        with flagsaver.flagsaver(**{name: value}):
            pass


def test_counts_take_all_explicitly_and_cnn_widths_may_be_zero():
    with flagsaver.as_parsed(num_test="all", num_train="12"):
        assert FLAGS.num_test == "all" and FLAGS.num_train == 12
        assert lf.count(FLAGS.num_test) is None and lf.count(12) == 12
    for bad in ("0", "-5", "many"):
        with pytest.raises(flags.IllegalFlagValueError,
                           match="positive integer or 'all'"):
            with flagsaver.as_parsed(num_test=bad):
                pass
    with flagsaver.flagsaver(architecture="cnn", hidden=["0"]):
        assert lf.ints(FLAGS.hidden, "hidden", 0) == (0,)


def test_start_reports_every_bad_path_before_creating_anything(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with flagsaver.flagsaver(output_dir=str(a_file / "out"),
                             data_dir=str(tmp_path / "nowhere"),
                             keras_model=str(tmp_path / "none.keras")):
        with pytest.raises(ValueError) as e:
            train.main(["train"])
    msg = str(e.value)
    assert "--output_dir" in msg and "existing file" in msg
    assert "--data_dir" in msg and "nowhere" in msg
    assert "--keras_model" in msg and "none.keras" in msg
    # app.run prints a UsageError without a traceback.
    assert isinstance(e.value, (app.UsageError, flags.IllegalFlagValueError))


@pytest.mark.parametrize("script, bad, match", [
    (train, dict(trajectory_length=2.0, num_leapfrog_steps=5),
     "trajectory_length or num_leapfrog_steps"),
    (gradient_study, dict(methods=["sgd"]), "image_methods"),
    (attack, dict(posteriors=["HMC=missing.npz"]), "missing.npz"),
    (robustness_accuracy, dict(methods=["sgd"], keras_model=None,
                               eps=0.1, dataset="half_moons",
                               training_lengths=["1"], widths=["4"],
                               depths=["1"], num_test="all"), None)])
def test_configs_are_validated_before_anything_is_created(script, bad, match,
                                                         tmp_path):
    out = tmp_path / "never"
    if match is None:  # a valid config: start() returns it, writing flags.txt
        with flagsaver.flagsaver(output_dir=str(out), **bad):
            _, config, fp = lf.start("s", script.config_from_flags,
                                     script.fingerprint)
        assert config.num_test is None and fp["fields"]["num_test"] is None
        assert (out / "flags.txt").exists()
        return
    with flagsaver.flagsaver(output_dir=str(out), **bad):
        with pytest.raises(ValueError, match=match) as e:
            script.main(["script"])
    assert isinstance(e.value, app.UsageError)
    assert not out.exists()


def test_train_rerun_with_other_settings_is_refused(tmp_path):
    kwargs = dict(output_dir=str(tmp_path), method="sgd", dataset="half_moons",
                  half_moons_n=200, hidden=["4"], epochs=1)
    with flagsaver.flagsaver(**kwargs):
        train.main(["train"])
    flags_txt = (tmp_path / "flags.txt").read_text()
    results = _results(tmp_path)
    assert results["fingerprint"]["fields"]["settings"]["epochs"] == 1
    assert results["fingerprint"]["fields"]["num_test"] is None
    with flagsaver.flagsaver(**dict(kwargs, epochs=2)):
        with pytest.raises(ValueError,
                           match=r"settings\.epochs: 1 \(saved\) -> 2 \(now\)"
                           ) as e:
            train.main(["train"])
    assert isinstance(e.value, app.UsageError)
    assert (tmp_path / "flags.txt").read_text() == flags_txt
    assert _results(tmp_path) == results
    # Where and how it runs is not part of the configuration.
    with flagsaver.flagsaver(**dict(kwargs, jit="default",
                                    allow_unconverged=True)):
        train.main(["train"])
    with flagsaver.flagsaver(**dict(kwargs, epochs=2, overwrite=True)):
        train.main(["train"])
    assert _results(tmp_path)["fingerprint"]["fields"]["settings"]["epochs"] == 2


def test_attack_rerun_with_other_posterior_and_eps_is_refused(trained,
                                                              tmp_path):
    hmc = f"P={trained['hmc'] / 'posterior.npz'}"
    ensemble = f"P={trained['ensemble'] / 'posterior.npz'}"
    kwargs = dict(output_dir=str(tmp_path), dataset="half_moons",
                  half_moons_n=300, num_test=10, attacks=["random"],
                  verdict=False, allow_unconverged=True)
    with flagsaver.flagsaver(posteriors=[hmc], eps=0.1, **kwargs):
        attack.main(["attack"])
    before = _results(tmp_path)
    with flagsaver.flagsaver(posteriors=[ensemble], eps=0.2, **kwargs):
        with pytest.raises(ValueError) as e:
            attack.main(["attack"])
    assert isinstance(e.value, app.UsageError)
    msg = str(e.value)
    assert "eps: 0.1 (saved) -> 0.2 (now)" in msg and "posteriors" in msg
    assert "--overwrite" in msg
    assert _results(tmp_path) == before
    with flagsaver.flagsaver(posteriors=[ensemble], eps=0.2, overwrite=True,
                             **kwargs):
        attack.main(["attack"])
    results = _results(tmp_path)
    assert "P/eps=0.2/test/adv_accuracy/random" in results
    assert not any(k.startswith("P/eps=0.1") for k in results)
    assert "P/diagnostics" not in results  # the HMC posterior's, now gone
    table = (tmp_path / "table.csv").read_text()
    assert "P" in table and "UNCONVERGED" not in table


def test_sweep_script_refuses_other_settings_and_overwrites(tmp_path):
    kwargs = dict(output_dir=str(tmp_path), dataset="half_moons",
                  half_moons_n=300, methods=["sgd"], widths=["4"],
                  training_lengths=["1"], num_test=20)
    with flagsaver.flagsaver(**kwargs):
        robustness_accuracy.main(["robustness_accuracy"])
    with flagsaver.flagsaver(**dict(kwargs, num_test=15)):
        with pytest.raises(ValueError,
                           match=r"num_test: 20 \(saved\) -> 15 \(now\)"):
            robustness_accuracy.main(["robustness_accuracy"])
    with flagsaver.flagsaver(**dict(kwargs, num_test=15, overwrite=True)):
        robustness_accuracy.main(["robustness_accuracy"])
    results = _results(tmp_path)
    assert results["num_skipped"] == 0
    assert results["fingerprint"]["fields"]["num_test"] == 15
