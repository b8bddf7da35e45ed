"""HMC's emulation of the paper's sampler: batch restarts and resampling.

Carbone et al. (2020) restarted Pyro's HMC on every batch of 5000 training
points and kept ``get_samples(100)`` of the last run.  Every expectation here
is computed independently of the sampler: the last batch's and the full
data's logistic-regression posteriors by grid quadrature in NumPy, a
direct full-data run on the last batch alone, distinct rows counted with
NumPy, and the resampled draws looked up among the unresampled ones.
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import keras
from tfp_bnn_adv import seeds
from tfp_bnn_adv.inference import hmc


def _softmax_regression():
    """A 2-class softmax over Dense(2) on one input: four weights."""
    return keras.Sequential([keras.Input((1,)), keras.layers.Dense(2)])


def _shifting_data():
    """50 points: the first 30 with logit 3x, the last 20 with 0.5 - 2.5x.

    With ``restart_batch_size=30`` the last (partial) batch is the 20 points
    whose class-1 probability falls with x, while the full data's rises.
    """
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 1)).astype(np.float32)
    logit = np.where(np.arange(50) < 30, 3.0 * x[:, 0], 0.5 - 2.5 * x[:, 0])
    y = (rng.uniform(size=50) < 1 / (1 + np.exp(-logit))).astype(np.int32)
    return x, y


def _logit_difference(ens):
    kernel, bias = (p.numpy().astype(np.float64) for p in ens.params)
    return np.stack([bias[:, 1] - bias[:, 0], kernel[:, 0, 1] - kernel[:, 0, 0]],
                    axis=1)


def _distinct_rows(ens):
    rows = np.concatenate([p.numpy().reshape(p.shape[0], -1)
                           for p in ens.params], axis=1)
    return len(np.unique(rows, axis=0))


# --------------------------------------------------------------------------
# Batch restarts condition on the last batch only.
# --------------------------------------------------------------------------
def test_restarts_condition_on_the_last_batch_only(logistic_quadrature):
    x, y = _shifting_data()
    # The likelihood depends on the four weights only through the logit
    # difference d = (b1 - b0, w1 - w0), whose prior is N(0, 2 I).
    last = logistic_quadrature(x[30:], y[30:], 2.0, half_width=8,
                               points=201)[0]
    full = logistic_quadrature(x, y, 2.0, half_width=8, points=201)[0]
    # The slopes differ clearly: about -2.4 (last batch) and +0.3 (all).
    assert last[1] < -2.0 and full[1] > 0.2
    chains, draws = 4, 500
    ens, diag = hmc.sample(_softmax_regression(), x, y, num_chains=chains,
                           num_burnin_steps=300, num_results=draws,
                           step_size=0.1, num_leapfrog_steps=5, seed=5,
                           jit_compile=False, checkpoint_every=800,
                           restart_batch_size=30)
    d = _logit_difference(ens)  # chain-major [C * R, 2]
    d = np.swapaxes(d.reshape(chains, draws, 2), 0, 1)  # [R, C, 2]
    for i in range(2):
        ess = float(tfp.mcmc.effective_sample_size(
            tf.constant(d[:, :, i]), filter_beyond_positive_pairs=True,
            cross_chain_dims=1))
        assert ess > 300, ess
        err = 4 * d[:, :, i].std() / np.sqrt(ess)
        assert abs(d[:, :, i].mean() - last[i]) < err, (i, d[:, :, i].mean(),
                                                        last[i], err)
    slope_err = 4 * d[:, :, 1].std() / np.sqrt(ess)
    assert abs(d[:, :, 1].mean() - full[1]) > 10 * slope_err
    assert diag.emulation == {
        "restart_batch_size": 30, "num_batches": 2, "num_train": 50,
        "last_batch_start": 30, "last_batch_stop": 50,
        "last_batch_points": 20, "resample_draws": None,
        "draws_before_resampling": chains * draws,
        "distinct_samples": _distinct_rows(ens),
        "wall_seconds_all_batches": diag.emulation["wall_seconds_all_batches"]}
    assert diag.emulation["wall_seconds_all_batches"] > diag.wall_seconds
    assert "conditioned on the last batch only" in diag.summary()
    assert "20 of 50" in diag.summary()
    assert ens.metadata["diagnostics"]["emulation"]["num_batches"] == 2
    assert ens.metadata["settings"]["restart_batch_size"] == 30
    assert ens.metadata["settings"]["resample_draws"] is None
    assert diag.converged  # still the last run's function-space R-hat


# 20 warm-up iterations are Stan's windows 3 (fast), 15 (slow), 2 (fast):
# segments 0, 1, 2, then the 12 kept draws in segment 3.
_TINY = dict(num_chains=2, num_burnin_steps=20, num_results=12, thinning=2,
             step_size=0.05, num_leapfrog_steps=3, seed=3, jit_compile=False,
             checkpoint_every=100)


def test_the_last_run_is_a_full_data_run_on_the_last_batch():
    # The emulation's last run is exactly what sample() gives for the last
    # batch alone with that batch's seed fold_in(seed, 1): same target,
    # same start, same chain, bit for bit.
    x, y = _shifting_data()
    model = _softmax_regression()
    emulated, diag = hmc.sample(model, x, y, restart_batch_size=30, **_TINY)
    batch_seed = [int(v) for v in seeds.fold_in(_TINY["seed"], 1).numpy()]
    direct, direct_diag = hmc.sample(model, x[30:], y[30:],
                                     **dict(_TINY, seed=batch_seed))
    for a, b in zip(emulated.params, direct.params):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert diag.acceptance_rate == direct_diag.acceptance_rate
    assert diag.step_size == direct_diag.step_size


# --------------------------------------------------------------------------
# Resampling with replacement.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("restart", [None, 30])
def test_resampled_draws_come_from_the_last_run_with_replacement(restart):
    x, y = _shifting_data()
    model = _softmax_regression()
    settings = dict(_TINY, restart_batch_size=restart)
    pooled, pooled_diag = hmc.sample(model, x, y, **settings)
    s = pooled.num_samples  # 2 chains x 12 draws
    rows = np.concatenate([p.numpy().reshape(s, -1) for p in pooled.params], 1)
    k = 60
    ens, diag = hmc.sample(model, x, y, resample_draws=k, **settings)
    assert ens.num_samples == k
    got = np.concatenate([p.numpy().reshape(k, -1) for p in ens.params], 1)
    # Every returned weight set is one of the last run's draws ...
    matches = (got[:, None, :] == rows[None, :, :]).all(axis=2)
    assert matches.any(axis=1).all()
    # ... the one at the index the metadata records.
    idx = np.asarray(ens.metadata["emulation"]["resample_indices"])
    np.testing.assert_array_equal(got, rows[idx])
    # 60 draws from 24: with replacement, so repeats are certain.
    distinct = _distinct_rows(ens)
    assert distinct <= min(k, s) and len(set(idx.tolist())) < k
    assert diag.emulation["distinct_samples"] == distinct
    assert diag.emulation["draws_before_resampling"] == s
    assert diag.emulation["resample_draws"] == k
    assert diag.emulation["num_batches"] == (1 if restart is None else 2)
    # The diagnostics are those of the chains before resampling.
    assert diag.rhat_log_likelihood == pooled_diag.rhat_log_likelihood
    assert diag.acceptance_rate == pooled_diag.acceptance_rate
    assert f"{k} draws with replacement" in diag.summary()
    assert ("conditioned on the last batch only" in diag.summary()) == (
        restart is not None)
    assert ens.metadata["settings"]["resample_draws"] == k
    assert ens.metadata["emulation"]["distinct_samples"] == distinct


def test_resample_indices_are_uniform_with_replacement():
    # 24,000 draws from 24 indices: every count near 1000 (sd about 31).
    idx = hmc.resample_indices([1, 2], 24, 24_000)
    counts = np.bincount(idx, minlength=24)
    assert counts.shape == (24,) and np.all(np.abs(counts - 1000) < 160)
    # Seeded: the same seed gives the same draws, another seed others.
    np.testing.assert_array_equal(hmc.resample_indices([1, 2], 24, 24_000),
                                  idx)
    assert not np.array_equal(hmc.resample_indices([1, 3], 24, 24_000), idx)


def test_restart_batches_cover_the_data_in_order():
    assert hmc.restart_batches(12, 5) == [(0, 5), (5, 10), (10, 12)]
    assert hmc.restart_batches(10, 5) == [(0, 5), (5, 10)]
    assert hmc.restart_batches(3, 5) == [(0, 3)]
    assert hmc.restart_batches(60_000, 5000)[-1] == (55_000, 60_000)
    assert hmc.restart_batches(7, None) is None


# --------------------------------------------------------------------------
# Resume, and checkpoints of other settings refused.
# --------------------------------------------------------------------------
class _Stop(Exception):
    pass


def test_finished_batches_are_reused_and_other_settings_refused(tmp_path):
    x, y = _shifting_data()
    model = _softmax_regression()
    settings = dict(_TINY, restart_batch_size=30, resample_draws=10)
    reference, _ = hmc.sample(model, x, y, **settings)

    def stop_in_batch_1(info):
        if info["batch"] == 1 and info["segment"] == 1:
            raise _Stop()

    with pytest.raises(_Stop):
        hmc.sample(model, x, y, checkpoint_dir=tmp_path,
                   segment_callback=stop_in_batch_1, **settings)
    assert (tmp_path / "batch_00000" / hmc.CHECKPOINT_FILE).exists()
    seen = []
    resumed, _ = hmc.sample(
        model, x, y, checkpoint_dir=tmp_path,
        segment_callback=lambda i: seen.append((i["batch"], i["segment"])),
        **settings)
    # Batch 0 came whole from its checkpoint, batch 1 after its segment 1.
    assert seen and all(b == 1 for b, _ in seen) and seen[0][1] == 2
    for a, b in zip(reference.params, resumed.params):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    seen.clear()
    again, _ = hmc.sample(model, x, y, checkpoint_dir=tmp_path,
                          segment_callback=seen.append, **settings)
    assert not seen  # nothing left to run
    for a, b in zip(reference.params, again.params):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    with pytest.raises(ValueError, match="restart_batch_size is 30 there but "
                                         "25 now"):
        hmc.sample(model, x, y, checkpoint_dir=tmp_path,
                   **dict(settings, restart_batch_size=25))
    with pytest.raises(ValueError, match="resample_draws is 10 there but 11"):
        hmc.sample(model, x, y, checkpoint_dir=tmp_path,
                   **dict(settings, resample_draws=11))
    with pytest.raises(ValueError, match="batch-restarted runs"):
        hmc.sample(model, x, y, checkpoint_dir=tmp_path,
                   **dict(settings, restart_batch_size=None))
    full_dir = tmp_path / "full"
    hmc.sample(model, x, y, checkpoint_dir=full_dir, **_TINY)
    with pytest.raises(ValueError, match="holds a full-data HMC run"):
        hmc.sample(model, x, y, checkpoint_dir=full_dir, **settings)
    with pytest.raises(ValueError, match="resample_draws is null there but 4"):
        hmc.sample(model, x, y, checkpoint_dir=full_dir,
                   **dict(_TINY, resample_draws=4))


# --------------------------------------------------------------------------
# Defaults unchanged, the authors' settings, bad input.
# --------------------------------------------------------------------------
def test_defaults_leave_the_sampler_as_it_was():
    # Without the two settings the run is the plain full-data run: the same
    # bits as a config that never mentions them, and no emulation fields.
    x, y = _shifting_data()
    model = _softmax_regression()
    plain, diag = hmc.sample(model, x, y, **_TINY)
    explicit, _ = hmc.sample(model, x, y, restart_batch_size=None,
                             resample_draws=None, **_TINY)
    for a, b in zip(plain.params, explicit.params):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert plain.num_samples == 2 * 12
    assert diag.emulation is None and "emulation" not in diag.to_dict()
    assert "emulation" not in plain.metadata
    assert "EMULATION" not in diag.summary()


def test_as_authors_settings():
    cfg = hmc.HMCConfig.as_authors()
    expected = dict(restart_batch_size=5000, resample_draws=100,
                    num_burnin_steps=50, num_leapfrog_steps=10,
                    step_size=0.005, num_chains=1, mass_matrix="identity",
                    num_results=100, prior_scale=1.0, trajectory_length=None)
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key
    # All 50 warm-up steps adapt, in Stan's (and Pyro's) shrunk windows.
    assert cfg.num_adaptation_steps == 50
    assert hmc.warmup_windows(50) == [("fast", 7), ("slow", 38), ("fast", 5)]
    assert cfg.emulates_paper and not hmc.HMCConfig().emulates_paper
    closer = hmc.HMCConfig.as_authors(mass_matrix="diagonal",
                                      trajectory_length=0.05,
                                      trajectory_jitter=0.0, seed=2)
    assert closer.num_leapfrog_steps is None
    assert closer.trajectory_length == 0.05 and closer.seed == [2, 0]
    with pytest.raises(ValueError, match="num_adaptation_steps"):
        hmc.HMCConfig.as_authors(num_adaptation_steps=51)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(restart_batch_size=0), ValueError, "restart_batch_size must be >= 1, "
                                             "got 0"),
    (dict(restart_batch_size=-5), ValueError, "restart_batch_size.*-5"),
    (dict(restart_batch_size=2.5), TypeError, "restart_batch_size.*2.5"),
    (dict(restart_batch_size="5000"), TypeError, "restart_batch_size.*'5000'"),
    (dict(resample_draws=0), ValueError, "resample_draws must be >= 1, got 0"),
    (dict(resample_draws=10.0), TypeError, "resample_draws.*10.0"),
    (dict(resample_draws=True), TypeError, "resample_draws.*True"),
])
def test_bad_emulation_settings_are_refused_before_any_work(kwargs, error,
                                                            match, tmp_path):
    with pytest.raises(error, match=match):
        hmc.HMCConfig(**kwargs)
    x, y = _shifting_data()
    calls = []
    with pytest.raises(error, match=match):
        hmc.sample(_softmax_regression(), x, y,
                   checkpoint_dir=tmp_path / "ckpt",
                   segment_callback=calls.append, **dict(_TINY, **kwargs))
    assert not calls and not (tmp_path / "ckpt").exists()
