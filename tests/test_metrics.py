"""Tests of tfp_bnn_adv.metrics against hand computations."""

import numpy as np
import pytest

from tfp_bnn_adv import attacks
from tfp_bnn_adv import gradients
from tfp_bnn_adv import metrics
from tfp_bnn_adv import models
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.network import Network

# Four points, three classes.  Clean predictions [0, 1, 2, 0]; attacked
# predictions [1, 1, 2, 2]; labels [0, 1, 0, 0].
P_CLEAN = np.array([[0.7, 0.2, 0.1],
                    [0.1, 0.6, 0.3],
                    [0.3, 0.3, 0.4],
                    [0.5, 0.4, 0.1]])
P_ADV = np.array([[0.4, 0.5, 0.1],
                  [0.1, 0.6, 0.3],
                  [0.2, 0.2, 0.6],
                  [0.1, 0.1, 0.8]])
Y = np.array([0, 1, 0, 0])


def test_hand_computed_values():
    # Correct before: points 0, 1, 3 -> 3/4.
    assert metrics.clean_accuracy(P_CLEAN, Y) == pytest.approx(0.75)
    # Correct after: only point 1 -> 1/4.
    assert metrics.adversarial_accuracy(P_ADV, Y) == pytest.approx(0.25)
    # Unchanged predictions: points 1 and 2 -> 2/4.
    assert metrics.adversarial_robustness(P_CLEAN, P_ADV) == pytest.approx(0.5)
    # Of the 3 correct points, 0 and 3 are wrong after -> 2/3.
    assert metrics.attack_success_rate(P_CLEAN, P_ADV, Y) == pytest.approx(2 / 3)
    # max_c |diff| per point: 0.3, 0.0, 0.2, 0.7 -> mean 0.3.
    assert metrics.softmax_robustness(P_CLEAN, P_ADV) == pytest.approx(0.7)
    # Classes work as well as probabilities.
    clean, adv = P_CLEAN.argmax(1), P_ADV.argmax(1)
    assert metrics.attack_success_rate(clean, adv, Y) == pytest.approx(2 / 3)
    assert metrics.adversarial_robustness(clean, P_ADV) == pytest.approx(0.5)


def test_success_rate_is_nan_without_correct_points():
    assert np.isnan(metrics.attack_success_rate(P_CLEAN, P_ADV, [2, 2, 1, 1]))


def test_gradient_norm_stats_by_hand():
    g = np.array([[[3.0, -4.0]], [[0.0, 0.0]], [[1.0, 1.0]]], np.float32)
    stats = metrics.gradient_norm_stats(g)
    np.testing.assert_allclose(stats["mean_abs_per_point"], [3.5, 0.0, 1.0])
    np.testing.assert_allclose(stats["l1_per_point"], [7.0, 0.0, 2.0])
    np.testing.assert_allclose(stats["l2_per_point"], [5.0, 0.0, np.sqrt(2)])
    assert stats["mean_abs"] == pytest.approx(4.5 / 3)
    assert stats["l1"] == pytest.approx(3.0)
    assert stats["l2"] == pytest.approx((5 + np.sqrt(2)) / 3)


@pytest.mark.parametrize("fn, args, error, match", [
    (metrics.softmax_robustness, (P_CLEAN, P_ADV[:3]), ValueError, "shape"),
    (metrics.softmax_robustness, (P_CLEAN, P_ADV.argmax(1)), ValueError, "p_adv"),
    (metrics.softmax_robustness, (P_CLEAN * 2, P_ADV), ValueError, "sum to 1"),
    (metrics.adversarial_robustness, (P_CLEAN, P_ADV[:2]), ValueError, "4 points"),
    (metrics.clean_accuracy, (P_CLEAN, Y[:3]), ValueError, "3 labels"),
    (metrics.clean_accuracy, (P_CLEAN, Y.astype(float)), TypeError, "y must"),
    (metrics.clean_accuracy, (np.array([0.5, 0.5]), Y), TypeError, "p_clean"),
    (metrics.attack_success_rate, (P_CLEAN, -P_ADV, Y), ValueError, "p_adv"),
    (metrics.gradient_norm_stats, (np.ones(3),), ValueError, "grad"),
])
def test_bad_input_raises(fn, args, error, match):
    with pytest.raises(error, match=match):
        fn(*args)


@pytest.fixture(scope="module")
def ens_data():
    net = Network.from_keras(models.mlp((5,), 3, hidden=(16,)))
    # Doubled initial weights: confident enough for an attack to flip.
    ens = PosteriorEnsemble(net, [2 * p for p in net.init_params(
        seed=0, num_samples=4)])
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (9, 5)).astype(np.float32)
    y = rng.integers(0, 3, 9).astype(np.int32)
    return ens, x, y


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_evaluate_attack_keys_and_values(ens_data):
    ens, x, y = ens_data
    x_adv = attacks.fgsm(ens, x, eps=0.3, gradient="predictive",
                         jit_compile=False)
    out = metrics.evaluate_attack(ens, x, y, x_adv, attack_name="fgsm",
                                  gradient="predictive", prefix="val",
                                  jit_compile=False)
    # The posterior predictive from per-sample logits, in numpy.
    p_clean = _softmax(ens.logits(x).astype(np.float64)).mean(0)
    p_adv = _softmax(ens.logits(x_adv).astype(np.float64)).mean(0)
    clean, adv = p_clean.argmax(1), p_adv.argmax(1)
    correct = clean == y
    expected = {
        "val/accuracy": np.mean(clean == y),
        "val/adv_accuracy/fgsm/predictive": np.mean(adv == y),
        "val/adv_robustness/fgsm/predictive": np.mean(adv == clean),
        "val/softmax_robustness/fgsm/predictive":
            1 - np.mean(np.abs(p_clean - p_adv).max(1)),
        "val/success_rate/fgsm/predictive": np.mean(adv[correct] != y[correct]),
    }
    assert set(out) == set(expected)
    for k, v in expected.items():
        assert out[k] == pytest.approx(v, abs=1e-6), k
        assert isinstance(out[k], float)
    assert out["val/adv_robustness/fgsm/predictive"] < 1.0  # the attack bit
    gradient_free = metrics.evaluate_attack(ens, x, y, x, attack_name="square")
    assert set(gradient_free) == {
        "test/accuracy", "test/adv_accuracy/square", "test/adv_robustness/square",
        "test/softmax_robustness/square", "test/success_rate/square"}
    assert gradient_free["test/adv_robustness/square"] == 1.0
    assert gradient_free["test/softmax_robustness/square"] == pytest.approx(1.0)


def test_evaluate_attack_bad_input(ens_data):
    ens, x, y = ens_data
    with pytest.raises(ValueError, match="attack_name"):
        metrics.evaluate_attack(ens, x, y, x, attack_name="pgd/expected")
    with pytest.raises(ValueError, match="gradient"):
        metrics.evaluate_attack(ens, x, y, x, attack_name="pgd", gradient="mean")
    with pytest.raises(ValueError, match="x_adv"):
        metrics.evaluate_attack(ens, x, y, x[:3], attack_name="pgd")
    with pytest.raises(TypeError, match="y is required"):
        metrics.evaluate_attack(ens, x, None, x, attack_name="pgd")


def test_gradient_metrics_against_per_sample_gradients(ens_data):
    ens, x, y = ens_data
    out = metrics.gradient_metrics(ens, x, y, jit_compile=False)
    # Both definitions from every sample's own gradient: the expected one is
    # their mean, the predictive one their p_s(y)-weighted mean.
    per_sample = gradients.per_sample_loss_gradients(ens, x, y, jit_compile=False)
    p_y = _softmax(ens.logits(x).astype(np.float64))[:, np.arange(len(y)), y]
    reference = {
        "expected": per_sample.mean(0),
        "predictive": np.einsum("sb,sbd->bd", p_y, per_sample) / p_y.sum(0)[:, None],
    }
    assert set(out) == {f"test/grad_norm/{k}/{s}" for k in reference
                        for s in metrics.GRADIENT_STATS}
    for kind, g in reference.items():
        a = np.abs(g)
        assert out[f"test/grad_norm/{kind}/mean_abs"] == pytest.approx(a.mean(), rel=1e-4)
        assert out[f"test/grad_norm/{kind}/l1"] == pytest.approx(a.sum(1).mean(), rel=1e-4)
        assert out[f"test/grad_norm/{kind}/l2"] == pytest.approx(
            np.linalg.norm(g, axis=1).mean(), rel=1e-4)
    assert out["test/grad_norm/expected/l2"] != pytest.approx(
        out["test/grad_norm/predictive/l2"], rel=1e-3)
