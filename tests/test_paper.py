"""The authors' semantics against independent NumPy implementations of
``../shared/PAPER.md`` ("The original code, exactly")."""

import math

import keras
import numpy as np
import pytest

from tfp_bnn_adv import attacks
from tfp_bnn_adv import gradients
from tfp_bnn_adv import metrics
from tfp_bnn_adv import paper
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.network import Network

S, D, H, C = 6, 5, 8, 4


@pytest.fixture(scope="module")
def tiny():
    model = keras.Sequential([keras.Input((D,)),
                              keras.layers.Dense(H, activation="tanh"),
                              keras.layers.Dense(C)])
    net = Network.from_keras(model)
    params = net.init_params(seed=3, num_samples=S)
    # Larger weights, so the samples disagree and the losses differ.
    params = [2.0 * p for p in params]
    ens = PosteriorEnsemble(net, params)
    rng = np.random.default_rng(1)
    x = rng.uniform(0.1, 0.9, size=(7, D)).astype(np.float32)
    y = rng.integers(0, C, size=7)
    w = [p.numpy().astype(np.float64) for p in ens.params]
    return ens, x, y, w


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _forward(w, x, s):
    """Sample ``s``'s hidden activations and logits, float64."""
    w1, b1, w2, b2 = (t[s] for t in w)
    h = np.tanh(x @ w1 + b1)
    return h, h @ w2 + b2


def _paper_loss(w, x, y, n):
    """``-log softmax(p_bar)[y]``, ``p_bar`` the mean softmax of the first n."""
    p_bar = np.mean([_softmax(_forward(w, x, s)[1]) for s in range(n)], axis=0)
    return -np.log(_softmax(p_bar)[np.arange(len(y)), y])


def _fd_gradient(loss, x, h=1e-5):
    x = x.astype(np.float64)
    g = np.zeros_like(x)
    for j in range(x.shape[1]):
        e = np.zeros_like(x)
        e[:, j] = h
        g[:, j] = (loss(x + e) - loss(x - e)) / (2 * h)
    return g


def _paper_grad_backprop(w, x, y, n):
    """The same loss differentiated by hand (for the PGD loop)."""
    ps, hs = [], []
    for s in range(n):
        h, z = _forward(w, x, s)
        hs.append(h)
        ps.append(_softmax(z))
    p_bar = np.mean(ps, axis=0)
    v = _softmax(p_bar)
    v[np.arange(len(y)), y] -= 1.0            # dL/dp_bar
    g = np.zeros_like(x, dtype=np.float64)
    for s in range(n):
        p = ps[s]
        dz = (p * v - p * np.sum(p * v, axis=1, keepdims=True)) / n
        dh = dz @ w[2][s].T * (1 - hs[s] ** 2)
        g += dh @ w[0][s].T
    return g


@pytest.mark.parametrize("n", [S, 3])
def test_paper_gradient_equals_finite_differences(tiny, n):
    ens, x, y, w = tiny
    got = gradients.paper_loss_gradient(ens, x, y, num_samples=n,
                                        chunk_size=2)
    want = _fd_gradient(lambda xx: _paper_loss(w, xx, y, n), x)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-3)
    # The by-hand gradient agrees too (it drives the PGD reference below).
    np.testing.assert_allclose(_paper_grad_backprop(w, x.astype(np.float64),
                                                    y, n), want, atol=1e-7)


def test_paper_gradient_differs_from_expected_and_predictive(tiny):
    ens, x, y, _ = tiny
    g_paper = gradients.paper_loss_gradient(ens, x, y)
    for fn in (gradients.expected_loss_gradient,
               gradients.predictive_loss_gradient):
        other = fn(ens, x, y)
        assert np.abs(other - g_paper).max() > 10 * np.abs(g_paper).max() * 1e-3
    # The second softmax shrinks the gradient: |p_bar| <= 1 moves little.
    assert (np.abs(g_paper).mean() <
            np.abs(gradients.predictive_loss_gradient(ens, x, y)).mean())


def test_paper_gradient_rejects_too_many_samples(tiny):
    ens, x, y, _ = tiny
    with pytest.raises(ValueError, match="num_samples must be at most"):
        gradients.paper_loss_gradient(ens, x, y, num_samples=S + 1)


def test_paper_pgd_equals_numpy_loop(tiny):
    """PGD as the authors ran it: 40 steps of 2 / max(x), projection, no
    random start, the first n samples' double-softmax loss."""
    ens, x, y, w = tiny
    eps, n = 0.1, 3
    sem = paper.PaperSemantics.original(num_samples=n)
    opts = sem.pgd_options(x, steps=7)
    assert opts == {"steps": 40, "step_size": 2.0 / float(x.max()),
                    "random_start": False}
    got = attacks.pgd(sem.attack_ensemble(ens), x, y, eps, gradient=sem.gradient,
                      **opts)
    x0 = x.astype(np.float64)
    xt = x0.copy()
    for _ in range(40):
        g = _paper_grad_backprop(w, xt, y, n)
        xt = xt + opts["step_size"] * np.sign(g)
        xt = np.clip(np.clip(xt, x0 - eps, x0 + eps), 0.0, 1.0)
    np.testing.assert_allclose(got, xt, atol=1e-6)
    # Step 2 on [0, 1] images: every coordinate sits on a corner of the box
    # (or at the clip edge), as PAPER.md says.
    on_corner = (np.isclose(np.abs(got - x), eps, atol=1e-6) |
                 np.isclose(got, 0.0) | np.isclose(got, 1.0))
    assert on_corner.all()


def test_paper_metric_floor_and_identity():
    rng = np.random.default_rng(0)
    p = _softmax(rng.normal(size=(50, 10)) * 5)
    q = _softmax(rng.normal(size=(50, 10)) * 5)
    # An attack that changes nothing: 1 under both semantics.
    assert metrics.softmax_robustness(p, p, semantics="paper",
                                      bayesian=True) == pytest.approx(1.0)
    floor = 1 - (math.e - 1) / (math.e + 9)
    assert paper.double_softmax_floor(10) == pytest.approx(floor)
    assert paper.double_softmax_floor(10) == pytest.approx(0.853, abs=5e-4)
    worst = np.eye(10)[rng.integers(0, 10, 50)]
    other = np.eye(10)[(np.argmax(worst, axis=1) + 1) % 10]
    for a, b in ((p, q), (worst, other)):
        got = metrics.softmax_robustness(a, b, semantics="paper", bayesian=True)
        assert got >= floor - 1e-12
    # One-hot to another one-hot reaches the floor exactly.
    assert metrics.softmax_robustness(
        worst, other, semantics="paper", bayesian=True) == pytest.approx(floor)
    assert metrics.softmax_robustness(worst, other) == pytest.approx(0.0)
    # An NN's logits get one softmax: the metric equals ours.
    assert metrics.softmax_robustness(p, q, semantics="paper", bayesian=False) \
        == metrics.softmax_robustness(p, q)
    # An independent formula for the BNN case.
    want = 1 - np.mean(np.max(np.abs(_softmax(p) - _softmax(q)), axis=1))
    assert metrics.softmax_robustness(
        p, q, semantics="paper", bayesian=True) == pytest.approx(want)


def test_paper_metric_arguments_checked():
    p = np.array([[0.5, 0.5]])
    with pytest.raises(ValueError, match="semantics must be one of"):
        metrics.softmax_robustness(p, p, semantics="authors")
    with pytest.raises(TypeError, match="bayesian must be True"):
        metrics.softmax_robustness(p, p, semantics="paper")


def _double_softmax_sample_grad(w, x, y, s):
    """``grad_x CE(y, logits=softmax f(x, w_s))`` by hand, one sample."""
    h, z = _forward(w, x, s)
    p = _softmax(z)
    v = _softmax(p)
    v[np.arange(len(y)), y] -= 1.0
    dz = p * v - p * np.sum(p * v, axis=1, keepdims=True)
    return ((dz @ w[2][s].T) * (1 - h ** 2)) @ w[0][s].T


def test_figure1_norms_equal_per_sample_loop(tiny):
    ens, x, y, w = tiny
    counts = (1, 2, 6)
    got = paper.figure1_gradient_norms(ens, x, y, sample_counts=counts)
    x64 = x.astype(np.float64)
    per = [_double_softmax_sample_grad(w, x64, y, s) for s in range(S)]
    want = np.stack([np.abs(np.mean(per[:k], axis=0)).max(axis=1)
                     for k in counts], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-8)
    chosen = paper.select_figure1_images(got)
    assert all(got[i, 0] > got[i, 1] > got[i, 2] for i in chosen)
    rest = sorted(set(range(len(x))) - set(chosen))
    assert all(not (got[i, 0] > got[i, 1] > got[i, 2]) for i in rest)


def test_figure1_checks_counts(tiny):
    ens, x, y, _ = tiny
    with pytest.raises(ValueError, match="increasing"):
        paper.figure1_gradient_norms(ens, x, y, sample_counts=(2, 2))
    with pytest.raises(ValueError, match="asks for 7 samples"):
        paper.figure1_gradient_norms(ens, x, y, sample_counts=(1, 7))


def test_semantics_switches():
    orig = paper.PaperSemantics.original()
    corr = paper.PaperSemantics.corrected()
    assert orig.switches_on() == tuple(paper.SWITCHES)
    assert corr.switches_on() == ()
    assert orig.gradient == "paper" and corr.gradient == "predictive"
    assert corr.replace(corrected_gradient="expected").gradient == "expected"
    assert orig.num_samples_used(100) == 10 and orig.num_samples_used(4) == 4
    assert corr.num_samples_used(100) == 100
    assert corr.pgd_options(np.ones(3), steps=20) == {
        "steps": 20, "step_size": None, "random_start": True}
    assert corr.vi_overrides(60000, 128) == {}
    assert orig.vi_overrides(60000, 128) == {"kl_weight": 60000 / 128,
                                             "init": "paper"}
    assert corr.hmc_overrides(60000) == {}
    authors = orig.hmc_overrides(60000)
    assert authors["restart_batch_size"] == 5000
    # int(100 / (60000 // 5000)) + 1 draws per run, as the authors' code.
    assert authors["num_results"] == 9 and authors["resample_draws"] == 100


def test_semantics_validation():
    with pytest.raises(TypeError, match="attack_loss must be a bool"):
        paper.PaperSemantics(attack_loss=1)
    with pytest.raises(ValueError, match="corrected_gradient must be one of"):
        paper.PaperSemantics(corrected_gradient="paper")
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        paper.PaperSemantics(num_samples=0)
    with pytest.raises(ValueError, match="max\\(x\\) > 0"):
        paper.PaperSemantics.original().pgd_options(np.zeros(3), steps=5)
