"""Same seed, same result: no draw or compile path depends on a timing.

The references are independent of the code under test: fresh Python
processes whose only difference is the state of the process (what was
compiled and run before, the environment variable), compared bit for bit; TensorFlow's own integer Philox bits for the float samplers; and
the two compile paths of one HMC run, which must draw the same momenta.
"""

import os
import subprocess
import sys

import numpy as np
import pytest  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from tfp_bnn_adv import data  # pylint: disable=wrong-import-position
from tfp_bnn_adv import files  # pylint: disable=wrong-import-position
from tfp_bnn_adv import models  # pylint: disable=wrong-import-position
from tfp_bnn_adv import seeds  # pylint: disable=wrong-import-position
from tfp_bnn_adv import xla  # pylint: disable=wrong-import-position
from tfp_bnn_adv.inference import hmc  # pylint: disable=wrong-import-position
from tfp_bnn_adv.network import Network  # pylint: disable=wrong-import-position

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One HMC call, then deterministic ensemble code (predictions, the expected
# gradient, PGD) in "auto" mode, in a fresh process.  ``WARM=1`` first runs
# all of it on the other path(s), pinned, so the process holds compiled XLA
# and TF-kernel functions and warm caches before the "auto" calls: code that
# chose its path by a timing or remembered a choice could then differ.
_SCRIPT = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
from tfp_bnn_adv import attacks, data, gradients, models
from tfp_bnn_adv.inference import hmc
from tfp_bnn_adv.network import Network

ds = data.half_moons(n=80, seed=3)
net = Network.from_keras(models.mlp((2,), 2, (8,)))
x, y = ds.train_x[:24], ds.train_y[:24]

def deterministic(ens, jit):
    return (ens.predict_proba(x, jit_compile=jit),
            gradients.expected_loss_gradient(ens, x, y, jit_compile=jit),
            attacks.pgd(ens, x, y, 0.2, steps=5, clip=None, jit_compile=jit))

def sample(jit):
    return hmc.sample(net, ds.train_x, ds.train_y, num_chains=2,
                      num_burnin_steps=40, num_results=6, step_size=0.05,
                      trajectory_length=0.5, seed=4, checkpoint_every=20,
                      jit_compile=jit)[0]

if os.environ.get("WARM"):
    warm = sample(True)
    for jit in (True, False):
        deterministic(warm, jit)
ens = sample(None)
out = deterministic(ens, None)
np.savez(sys.argv[1], *ens.params, *out,
         path=np.array(ens.metadata["settings"].get("compile_path", "?")))
"""


def _run(tmp_path, name, **env):
    out = str(tmp_path / f"{name}.npz")
    environ = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    environ.pop("TFP_BNN_ADV_JIT", None)
    environ.update(env)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, out], env=environ,
                          capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def test_same_call_same_bits_whatever_ran_before(tmp_path):
    runs = {
        "fresh process": _run(tmp_path, "a"),
        "after the same calls on both pinned paths": _run(tmp_path, "b",
                                                          WARM="1"),
        "TFP_BNN_ADV_JIT=auto": _run(tmp_path, "c", TFP_BNN_ADV_JIT="auto"),
    }
    ref_name, ref = next(iter(runs.items()))
    for name, got in runs.items():
        assert got.keys() == ref.keys()
        for key in ref:
            assert np.array_equal(got[key], ref[key]), (name, "vs", ref_name,
                                                        key)
    assert str(ref["path"]) == "default"  # "auto" on a CPU-only host


def test_pinned_default_kernels_are_recorded():
    ds = data.half_moons(n=40, seed=3)
    net = Network.from_keras(models.mlp((2,), 2, (4,)))
    for jit, path in ((False, "default"), ("auto", "default")):
        ens, diag = hmc.sample(net, ds.train_x, ds.train_y, num_chains=2,
                               num_burnin_steps=4, num_results=2,
                               num_leapfrog_steps=2, seed=0, jit_compile=jit)
        assert ens.metadata["settings"]["compile_path"] == path
        assert diag.jit == path


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_uniform_is_philox_bits_scaled_on_both_paths(dtype):
    seed = tf.constant([12, 34], tf.int32)
    # TF's own full-range int32 Philox words, run eagerly.
    words = tf.random.stateless_uniform([2, 1000], seed, minval=None,
                                        maxval=None, dtype=tf.int32,
                                        alg="philox").numpy()
    words = words.view(np.uint32).astype(np.int64)
    if dtype == tf.float32:
        got_shape = [2, 1000]
        want = ((words >> 8) * 2.0**-24).astype(np.float32)
    else:
        want = ((words[0] >> 5) * 2.0**26 + (words[1] >> 6)) * 2.0**-53
        got_shape = [1000]
    for jit in (False, True):
        got = tf.function(lambda s: seeds.uniform(got_shape, s, dtype=dtype),
                          jit_compile=jit)(seed).numpy()
        assert np.array_equal(got, want), jit
        assert got.min() >= 0.0 and got.max() < 1.0


def test_integers_and_seeds_agree_across_paths_and_are_uniform():
    def draws(s):
        return (seeds.integers([30000], s, 7), seeds.split(s, 3),
                seeds.fold_in(s, 11))
    rng = np.random.default_rng(0)
    for _ in range(5):  # seeds of both signs: auto_select differs on some
        seed = tf.constant(rng.integers(-2**31, 2**31, 2), tf.int32)
        a = tf.function(draws, jit_compile=False)(seed)
        b = tf.function(draws, jit_compile=True)(seed)
        for u, v in zip(a, b):
            assert np.array_equal(u.numpy(), v.numpy())
    counts = np.bincount(a[0].numpy(), minlength=7)
    assert counts.size == 7 and counts.min() > 0
    expected = a[0].shape[0] / 7
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 22.5  # 99.9% quantile of chi-square with 6 dof


def test_normal_agrees_across_paths_and_is_standard_normal():
    seed = tf.constant([5, 6], tf.int32)
    draws = {jit: tf.function(lambda s: seeds.normal([20000], s),
                              jit_compile=jit)(seed).numpy()
             for jit in (False, True)}
    # Same bits, same arithmetic: only log/cos rounding may differ.
    np.testing.assert_allclose(draws[True], draws[False], rtol=0, atol=1e-5)
    z = draws[False].astype(np.float64)
    # Moments within 5 standard errors of N(0, 1)'s.
    assert abs(z.mean()) < 5 / np.sqrt(z.size)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / z.size)
    assert abs(np.mean(z**3)) < 5 * np.sqrt(15 / z.size)
    # TensorFlow's own sampler differs between the paths (the hole).
    tf_draws = [tf.function(lambda s: tf.random.stateless_normal([100], s),
                            jit_compile=jit)(seed).numpy()
                for jit in (False, True)]
    assert not np.allclose(tf_draws[0], tf_draws[1])


def test_hmc_draws_the_same_momenta_on_both_paths():
    """Two compile paths, one seed: a short chain on a Gaussian agrees to
    rounding (a different momentum draw would move it by O(1))."""
    def target(x):
        return -0.5 * tf.reduce_sum(tf.square(x / [1.0, 3.0]), axis=-1)

    out = {jit: hmc.run_chains(target, [tf.ones([3, 2])], num_burnin_steps=0,
                               num_results=5, step_size=0.3,
                               num_leapfrog_steps=3, seed=9, jit_compile=jit)
           for jit in (False, True)}
    np.testing.assert_allclose(out[True].states[0], out[False].states[0],
                               rtol=1e-4, atol=1e-5)
    assert out[True].diagnostics.jit == "xla"
    assert out[False].diagnostics.jit == "default"


def test_stochastic_auto_never_times():
    calls = []

    def fn(a):
        calls.append(1)
        return a * 2.0

    f = xla.compile_fn(fn, "auto", stochastic=True)
    assert f.mode is False  # no accelerator on the test machines
    np.testing.assert_array_equal(f(tf.ones([2])).numpy(), 2.0)
    assert len(calls) == 1  # traced once
    assert list(f.paths.values()) == [(False, "stochastic")]
    assert not f.uses_xla()
    assert xla.stochastic_jit("auto") is False
    assert xla.stochastic_jit(True) is True
    assert xla.stochastic_jit(False) is False
    with pytest.raises(TypeError, match="stochastic"):
        xla.compile_fn(fn, "auto", stochastic="yes")


# --------------------------------------------------------------------------
# HMC checkpoints: fail before any work, refuse crafted files clearly.
# --------------------------------------------------------------------------
def _tiny():
    ds = data.half_moons(n=40, seed=1)
    return Network.from_keras(models.mlp((2,), 2, (4,))), ds


def test_checkpoint_dir_that_is_a_file_fails_before_sampling(tmp_path):
    net, ds = _tiny()
    path = tmp_path / "taken"
    path.write_text("not a directory")
    segments = []
    for where in (path, path / "sub"):
        with pytest.raises(ValueError, match="checkpoint_dir=.*existing file"):
            hmc.sample(net, ds.train_x, ds.train_y, num_chains=2,
                       num_burnin_steps=10, num_results=4, seed=0,
                       checkpoint_dir=str(where),
                       segment_callback=segments.append)
    assert not segments


@pytest.mark.parametrize("edit, message", [
    (lambda a, m: ({**a, "state_0": np.full_like(a["state_0"], np.nan)}, m),
     "non-finite"),
    (lambda a, m: ({k: v for k, v in a.items() if k != "state_0"}, m),
     "missing"),
    (lambda a, m: (a, {**m, "format_version": "2"}), "format_version"),
    (lambda a, m: (a, {k: v for k, v in m.items() if k != "use_xla"}),
     "use_xla"),
    (lambda a, m: (a, {**m, "segments_done": "one"}), "segments_done"),
])
def test_crafted_checkpoints_are_refused_clearly(tmp_path, edit, message):
    def target(x):
        return -0.5 * tf.reduce_sum(tf.square(x), axis=-1)
    settings = dict(num_burnin_steps=4, num_results=4, step_size=0.3,
                    num_leapfrog_steps=2, seed=1, checkpoint_every=2,
                    jit_compile=False)
    calls = []

    def stop(info):
        calls.append(info)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hmc.run_chains(target, [tf.zeros([2, 3])], checkpoint_dir=str(tmp_path),
                       segment_callback=stop, **settings)
    path = os.path.join(str(tmp_path), hmc.CHECKPOINT_FILE)
    arrays, meta = files.load_arrays(path)
    arrays, meta = edit(arrays, meta)
    files.save_arrays(path, arrays, meta)
    with pytest.raises(ValueError, match=message):
        hmc.run_chains(target, [tf.zeros([2, 3])], checkpoint_dir=str(tmp_path),
                       **settings)
