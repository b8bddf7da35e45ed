"""Tests of tfp_bnn_adv.evaluation: the checks against hand-made inputs, the
worst case against a per-example loop, and two whole reports (a masked
network and an ordinary SGD network on Fashion-MNIST) against numpy
re-computations."""

import json

import keras
import numpy as np
import pytest

from tfp_bnn_adv import attacks
from tfp_bnn_adv import data
from tfp_bnn_adv import evaluation
from tfp_bnn_adv import models
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.network import Network

# Small budgets: the battery's logic, not its strength, is under test.
FAST = dict(steps=10, square_queries=300, random_trials=20, jit_compile=False)
NUM_TEST = 200


# --------------------------------------------------------------------------
# Independent numpy references.
# --------------------------------------------------------------------------
def mlp_logits(params, x, dtype=np.float64):
    """numpy forward of a Dense/leaky-ReLU(0.2) MLP, one weight set."""
    h = x.reshape(x.shape[0], -1).astype(dtype)
    layers = list(zip(params[::2], params[1::2]))
    for i, (w, b) in enumerate(layers):
        h = h @ np.asarray(w, dtype) + np.asarray(b, dtype)
        if i < len(layers) - 1:
            h = np.where(h > 0, h, dtype(0.2) * h)
    return h


def sample_params(ens, s=0):
    return [p[s].numpy() for p in ens.params]


def robust_accuracy(ens, x, x_adv, y):
    """Clean-correct and correct after the attack, by a numpy forward pass."""
    params = sample_params(ens)
    clean = mlp_logits(params, x).argmax(1) == y
    adv = mlp_logits(params, x_adv).argmax(1) == y
    return float(np.mean(clean & adv))


# --------------------------------------------------------------------------
# Fixtures.
# --------------------------------------------------------------------------
def _train(ds, hidden, seed, epochs):
    keras.utils.set_random_seed(seed)
    model = models.mlp(ds.input_shape, 10, hidden=hidden)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    model.fit(ds.train_x, ds.train_y, epochs=epochs, batch_size=64, verbose=0)
    return PosteriorEnsemble.from_keras(model, metadata={"method": "sgd"})


@pytest.fixture(scope="module")
def fashion():
    """Two small SGD MLPs on Fashion-MNIST and NUM_TEST test points."""
    ds = data.fashion_mnist().subset(num_train=3000, num_test=NUM_TEST, seed=0)
    net = _train(ds, (64,), 0, 4)
    other = _train(ds, (32,), 1, 2)
    return net, other, ds.test_x, ds.test_y


@pytest.fixture(scope="module")
def sgd_report(fashion, tmp_path_factory):
    net, other, x, y = fashion
    out = tmp_path_factory.mktemp("sgd_report")
    report = evaluation.robustness_report(net, x, y, eps=0.25, reference=other,
                                          output_dir=str(out), **FAST)
    return report, out


@pytest.fixture(scope="module")
def masked(fashion):
    """The SGD network with its last layer scaled by 1e4: the same classifier,
    but its float32 cross-entropy gradient is exactly zero on confident
    points."""
    net, _, x, y = fashion
    params = list(net.params)
    params[-2], params[-1] = params[-2] * 1e4, params[-1] * 1e4
    ens = PosteriorEnsemble(net.network, params, metadata={"method": "sgd"})
    return ens, evaluation.robustness_report(ens, x, y, eps=0.25, **FAST)


def tiny_ensemble(input_shape=(4, 4, 1), classes=3, samples=2):
    net = Network.from_keras(models.mlp(input_shape, classes, hidden=(5,)))
    return PosteriorEnsemble(net, net.init_params(seed=0, num_samples=samples))


# --------------------------------------------------------------------------
# The two reports.
# --------------------------------------------------------------------------
def test_masked_model_is_inconclusive_with_zero_gradients_and_square_stronger(
        masked, fashion):
    ens, report = masked
    _, _, x, y = fashion
    checks = report["checks"]
    assert report["verdict"] == "inconclusive"
    assert not checks["zero_gradients"]["passed"]
    assert not checks["gradient_free_vs_gradient"]["passed"]
    reason = report["verdict_reason"]
    assert "masking suspected" in reason
    assert "6 zero_gradients" in reason and "2 gradient_free_vs_gradient" in reason
    assert f"{report['worst_case_accuracy']:.3f}" in reason
    assert "upper bound" in reason
    # Zero gradients, independently: in float32 the softmax of the scaled
    # logits is exactly one-hot at the label, so d CE / d logits = 0.
    z = mlp_logits(sample_params(ens), x, np.float32)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    one_hot = (e.sum(axis=1) == 1.0) & (z.argmax(1) == y)
    assert checks["zero_gradients"]["value"] == pytest.approx(
        np.mean(one_hot), abs=0.011)
    assert checks["zero_gradients"]["value"] > 0.5
    # Square against the best cross-entropy gradient attack, from the table.
    acc = report["robust_accuracy"]
    best_ce = min(acc[f"{a}/predictive"] for a in ("fgsm", "pgd", "apgd-ce"))
    assert checks["gradient_free_vs_gradient"]["value"] == pytest.approx(
        best_ce - acc["square"])
    assert checks["gradient_free_vs_gradient"]["value"] > 0.02
    # APGD-T's DLR loss on log-probabilities is scale-free: it still breaks
    # the points, which is why check 2 compares with the CE attacks only.
    assert acc["apgd-ce+apgd-t/predictive"] < acc["apgd-ce/predictive"] - 0.2
    assert "transfer" in report["skipped_checks"]


def test_sgd_network_is_not_robust_with_every_check_passed(sgd_report,
                                                           fashion):
    report, _ = sgd_report
    net, _, x, y = fashion
    assert sorted(report["checks"]) == sorted(evaluation.CHECKS)
    failed = {k: c["explanation"] for k, c in report["checks"].items()
              if not c["passed"]}
    assert not failed
    assert report["verdict"] == "not_robust", report["verdict_reason"]
    assert report["worst_case_accuracy"] < 0.5 * report["clean_accuracy"]
    # Clean accuracy and FGSM (deterministic) by a numpy forward pass.
    clean = mlp_logits(sample_params(net), x).argmax(1) == y
    assert report["clean_accuracy"] == pytest.approx(np.mean(clean))
    x_adv = attacks.fgsm(net, x, y, eps=0.25, gradient="predictive")
    assert report["robust_accuracy"]["fgsm/predictive"] == pytest.approx(
        robust_accuracy(net, x, x_adv, y))
    # The worst case is an AND: never above any single attack.
    assert report["worst_case_accuracy"] <= min(
        report["robust_accuracy"].values()) + 1e-12
    assert report["worst_case_accuracy"] == pytest.approx(
        np.mean(report["per_example"]["robust"]))
    counts = report["broken_by"]
    assert sum(counts.values()) == len(y)
    assert counts["clean"] == int(np.sum(~clean))
    assert report["diagnostics"] is None
    assert "no convergence diagnostics" in report["diagnostics_statement"]
    # At the box width every curve reaches chance.
    curves = report["accuracy_vs_eps"]
    assert curves["eps"] == evaluation.default_eps_grid()
    assert all(curves[a][-1] <= report["chance"] + 0.05
               for a in evaluation.CURVE_ATTACKS)


def test_report_files_hold_the_returned_report(sgd_report):
    report, out = sgd_report
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    for key in ("clean_accuracy", "robust_accuracy", "worst_case_accuracy",
                "broken_by", "accuracy_vs_eps", "checks", "verdict",
                "verdict_reason", "diagnostics", "settings"):
        assert key in saved
    for name, check in saved["checks"].items():
        assert set(check) == {"passed", "value", "threshold", "explanation"}
    for attack in ("fgsm/predictive", "pgd/predictive", "apgd-ce/predictive",
                   "apgd-ce+apgd-t/predictive", "square", "random"):
        assert attack in saved["settings"] and attack in saved["robust_accuracy"]
    assert saved["settings"]["square"]["max_queries"] == FAST["square_queries"]
    assert saved["settings"]["random"]["trials"] == FAST["random_trials"]
    md = (out / "report.md").read_text()
    assert report["verdict_line"] in md
    for name in evaluation.CHECKS:
        assert name in md
    assert f"| **worst case (per example, over all)** | " \
           f"{report['worst_case_accuracy']:.3f} |" in md
    png = (out / "figures" / "accuracy_vs_eps.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["files"]["figure"] == str(out / "figures" /
                                            "accuracy_vs_eps.png")


# --------------------------------------------------------------------------
# The worst case and the checks, on constructed inputs.
# --------------------------------------------------------------------------
def test_worst_case_is_the_per_example_and_over_attacks():
    clean = np.array([True, True, True, True, False])
    robust = {"a": np.array([False, True, True, True, False]),
              "b": np.array([True, False, True, True, True]),
              "c": np.array([False, True, False, True, True])}
    robust_all, broken_by = evaluation.worst_case(clean, robust)
    # Each attack alone leaves 2 or 3 of 5 points; together only point 3.
    expected = [clean[i] and all(r[i] for r in robust.values())
                for i in range(5)]
    np.testing.assert_array_equal(robust_all, expected)
    assert robust_all.tolist() == [False, False, False, True, False]
    assert broken_by.tolist() == ["a", "b", "c", "", "clean"]
    with pytest.raises(ValueError, match="robust\\['a'\\] has 2 points"):
        evaluation.worst_case(clean, {"a": np.array([True, False])})


def test_iterative_check():
    fgsm = np.array([True, True, False, False])
    ok = evaluation.iterative_check({"f vs p": (fgsm, np.array([True] * 4))})
    assert ok["passed"] and ok["value"] == 0.0
    bad = evaluation.iterative_check({
        "f vs p": (fgsm, np.array([True, True, True, False])),
        "f vs a": (fgsm, np.array([True, False, False, False]))})
    assert not bad["passed"] and bad["value"] == 0.25
    assert "f vs a" in bad["explanation"]


def test_gradient_free_check():
    ok = evaluation.gradient_free_check(0.30, {"pgd/p": 0.31, "fgsm/p": 0.5})
    assert ok["passed"] and ok["value"] == pytest.approx(0.01)
    bad = evaluation.gradient_free_check(0.20, {"pgd/p": 0.35, "fgsm/p": 0.5})
    assert not bad["passed"] and bad["value"] == pytest.approx(0.15)
    assert bad["threshold"] == 0.02 and "pgd/p" in bad["explanation"]


def test_random_check():
    rand = np.array([True, True, False, False])
    assert evaluation.random_check(rand, np.array([True, True, False, True])
                                   )["passed"]
    bad = evaluation.random_check(rand, np.array([True, False, False, False]))
    assert not bad["passed"] and bad["value"] == 0.25


def test_eps_curve_check():
    grid = [0.1, 0.5, 1.0]
    ok = evaluation.eps_curve_check(grid, {"a": [0.6, 0.3, 0.1],
                                           "b": [0.5, 0.2, 0.0]},
                                    chance=0.1, num_points=200)
    assert ok["passed"]
    assert ok["value"]["at_largest_eps"] == {"a": 0.1, "b": 0.0}
    assert ok["threshold"]["at_largest_eps"] == pytest.approx(0.15)
    rising = evaluation.eps_curve_check(grid, {"a": [0.6, 0.65, 0.1]},
                                        chance=0.1, num_points=200)
    assert not rising["passed"]
    assert rising["value"]["max_increase"] == pytest.approx(0.05)
    # One example out of 20 may go up (sampling noise); two may not.
    assert evaluation.eps_curve_check(grid, {"a": [0.5, 0.55, 0.1]},
                                      chance=0.1, num_points=20)["passed"]
    assert not evaluation.eps_curve_check(grid, {"a": [0.5, 0.6, 0.1]},
                                          chance=0.1, num_points=20)["passed"]
    stuck = evaluation.eps_curve_check(grid, {"a": [0.6, 0.5, 0.4]},
                                       chance=0.1, num_points=200)
    assert not stuck["passed"] and "a stay above" in stuck["explanation"]


def test_steps_check():
    assert evaluation.steps_check(0.50, 0.495)["passed"]
    bad = evaluation.steps_check(0.50, 0.49)
    assert not bad["passed"] and bad["value"] == pytest.approx(0.01)
    assert not evaluation.steps_check(0.40, 0.45)["passed"]


def test_zero_gradient_flags_and_check():
    g = np.zeros((4, 2, 2), np.float32)
    g[1, 0, 0] = 1e-30
    g[2, 1, 1] = np.nan
    g[3] = 1.0
    flags = evaluation.zero_gradient_flags(g)
    assert flags.tolist() == [True, False, True, False]
    bad = evaluation.zero_gradient_check(flags, gradient="predictive")
    assert not bad["passed"] and bad["value"] == 0.5
    ok = evaluation.zero_gradient_check(np.array([False] * 100 + [True]),
                                        gradient="expected")
    assert ok["passed"] and ok["value"] == pytest.approx(1 / 101)


def test_fixed_sample_check():
    kw = dict(sample_accuracy=0.05, sample_index=3, num_samples=10)
    bad = evaluation.fixed_sample_check(0.30, 0.60, ensemble_looks_robust=True,
                                        sample_falls=True, **kw)
    assert not bad["passed"] and bad["value"] == pytest.approx(0.30)
    assert "looks robust but a single sample falls" in bad["explanation"]
    ok = evaluation.fixed_sample_check(0.59, 0.60, ensemble_looks_robust=True,
                                       sample_falls=True, **kw)
    assert ok["passed"]
    assert "single sample falls" in ok["explanation"]
    plain = evaluation.fixed_sample_check(0.7, 0.6, ensemble_looks_robust=False,
                                          sample_falls=True, **kw)
    assert plain["passed"] and "single sample falls" not in plain["explanation"]


def test_transfer_check():
    assert evaluation.transfer_check(0.39, 0.40)["passed"]
    bad = evaluation.transfer_check(0.10, 0.40)
    assert not bad["passed"] and bad["value"] == pytest.approx(0.30)


def test_verdict_rule():
    passed = {name: {"passed": True} for name in evaluation.CHECKS}
    assert evaluation.verdict(passed, 0.45, 0.9)[0] == "robust"  # 0.45 = 0.5 * 0.9
    assert evaluation.verdict(passed, 0.44, 0.9)[0] == "not_robust"
    assert evaluation.verdict(passed, 0.44, 0.9, robust_fraction=0.4)[0] == \
        "robust"
    failed = dict(passed, zero_gradients={"passed": False},
                  iterative_vs_single_step={"passed": False})
    name, reason = evaluation.verdict(failed, 0.8, 0.9, eps=0.25)
    assert name == "inconclusive"
    assert reason.startswith("masking suspected (checks 1 "
                             "iterative_vs_single_step, 6 zero_gradients)")
    assert "0.800 at eps=0.25 is only an upper bound" in reason
    # Check 5 alone is an attack budget too small, not masking: more effort
    # can only lower the worst case, so "not robust" stands, "robust" not.
    budget = dict(passed, more_steps_and_restarts={"passed": False})
    name, reason = evaluation.verdict(budget, 0.0, 0.9)
    assert name == "not_robust" and "masking" not in reason
    assert "have not converged (check 5 more_steps_and_restarts" in reason
    name, reason = evaluation.verdict(budget, 0.6, 0.9)
    assert name == "inconclusive" and "masking" not in reason
    assert reason.startswith("the attacks have not converged (check 5 "
                             "more_steps_and_restarts")
    both = dict(budget, zero_gradients={"passed": False})
    reason = evaluation.verdict(both, 0.0, 0.9)[1]
    assert reason.startswith("masking suspected (checks 6 zero_gradients); "
                             "the attacks have not converged (check 5 ")


# --------------------------------------------------------------------------
# Bad input: refused before any attack runs.
# --------------------------------------------------------------------------
@pytest.fixture
def no_attacks(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("an attack ran before the arguments were checked")
    for name in ("fgsm", "pgd", "apgd", "auto_attack", "square_attack",
                 "random_attack"):
        monkeypatch.setattr(attacks, name, boom, raising=False)


@pytest.mark.parametrize("change, error, match", [
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps=-0.1), ValueError, "eps"),
    (dict(eps=1.5), ValueError, "outside the input box"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(eps_grid=[0.5, 0.1, 1.0]), ValueError, "strictly increasing"),
    (dict(eps_grid=[0.1, 0.5]), ValueError, "must end at the box width"),
    (dict(eps_grid=[0.1, 2.0]), ValueError, "outside the input box"),
    (dict(eps_grid=[1.0]), ValueError, "at least 2"),
    (dict(eps_grid=[0.0, 1.0]), ValueError, "eps_grid\\[0\\]"),
    (dict(eps_grid="0.1,1"), TypeError, "eps_grid"),
    (dict(robust_fraction=0.0), ValueError, "robust_fraction"),
    (dict(robust_fraction=1.5), ValueError, "robust_fraction"),
    (dict(gradient="sampled"), ValueError, "gradient"),
    (dict(gradients=["expected", "bogus"]), ValueError, "gradients\\[1\\]"),
    (dict(steps=0), ValueError, "steps"),
    (dict(square_queries=0), ValueError, "square_queries"),
    (dict(random_trials=0), ValueError, "random_trials"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(jit_compile="fast"), ValueError, "jit_compile"),
    (dict(strategy="mirrored"), TypeError, "strategy"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(sample_index=2), ValueError, "sample_index"),
    (dict(clip=(1.0, 0.0)), ValueError, "clip"),
    (dict(y=None), TypeError, "y is required"),
    (dict(y=np.array([0, 1, 3, 0])), ValueError, "label"),
    (dict(x=np.full((4, 4, 4, 1), 1.5, np.float32)), ValueError, "outside clip"),
    (dict(reference=tiny_ensemble(input_shape=(16,))), ValueError,
     "reference takes inputs of shape"),
    (dict(reference=tiny_ensemble(classes=4)), ValueError, "4 classes"),
    (dict(reference="sgd.npz"), TypeError, "reference"),
])
def test_bad_input_is_refused_before_any_attack(change, error, match,
                                                no_attacks, tmp_path):
    ens = tiny_ensemble()
    args = dict(x=np.random.default_rng(0).uniform(0, 1, (4, 4, 4, 1))
                .astype(np.float32), y=np.array([0, 1, 2, 0]), eps=0.1,
                output_dir=str(tmp_path / "never"))
    args.update(change)
    with pytest.raises(error, match=match):
        evaluation.robustness_report(ens, args.pop("x"), args.pop("y"), **args)
    assert not (tmp_path / "never").exists()


def test_sample_gradient_flags_count_every_sample_and_point(monkeypatch):
    """gradient="sample": one flag per (sample, point), computed a few points
    at a time; sample 1's scaled logits saturate the float32 softmax."""
    ens = tiny_ensemble(samples=2)
    params = [p.numpy() for p in ens.params]
    params[-2][1] *= 1e4
    params[-1][1] *= 1e4
    ens = PosteriorEnsemble(ens.network, params)
    x = np.random.default_rng(0).uniform(0, 1, (7, 4, 4, 1)).astype(np.float32)
    y = ens.predict(x).astype(np.int32)
    expected = []
    for s in range(2):
        z = mlp_logits([p[s] for p in params], x, np.float32)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        expected.append((e.sum(axis=1) == 1.0) & (z.argmax(1) == y))
    expected = np.concatenate(expected)
    assert expected[7:].sum() >= 5 and not expected[:7].any()
    monkeypatch.setattr(evaluation, "_PER_SAMPLE_FLOATS", 2 * 16 * 3)
    flags = evaluation._zero_gradient_flags(  # pylint: disable=protected-access
        ens, x, y, "sample", dict(batch_size=None, chunk_size=None,
                                  jit_compile=False, strategy=None))
    np.testing.assert_array_equal(flags, expected)


def test_same_seed_same_report_for_every_gradient_definition():
    """Three classes (APGD-T falls back to targeted cross-entropy), the
    "expected" and "sample" definitions, and reproducibility."""
    ens = tiny_ensemble(samples=3)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (12, 4, 4, 1)).astype(np.float32)
    y = ens.predict(x).astype(np.int32)
    kw = dict(eps=0.3, gradient="expected", gradients=["sample"], steps=2,
              square_queries=5, random_trials=2, eps_grid=[0.1, 1.0],
              jit_compile=False, seed=3)
    first = evaluation.robustness_report(ens, x, y, **kw)
    assert first == evaluation.robustness_report(ens, x, y, **kw)
    assert {"fgsm/sample", "apgd-ce+apgd-t/sample", "apgd-ce-2x/expected",
            "fixed-sample/apgd-ce/expected"} <= set(first["robust_accuracy"])
    assert first["settings"]["report"]["dlr_fallback"] is True
    assert first["clean_accuracy"] == 1.0  # labels are its own predictions
    index = first["fixed_sample"]["index"]
    assert 0 <= index < 3 and first["settings"]["report"]["sample_index"] == index
