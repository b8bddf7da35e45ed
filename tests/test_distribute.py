"""Multi-device code on two logical CPU devices (set up in conftest.py).

Every sharded computation is compared with an independent single-device
one: a per-chain loop for the log-likelihood, the unsharded attacks and
gradients, and an HMC run on one device with the same seed.
"""

import gc
import weakref

import numpy as np
import pytest  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from tfp_bnn_adv import Network  # pylint: disable=wrong-import-position
from tfp_bnn_adv import PosteriorEnsemble  # pylint: disable=wrong-import-position
from tfp_bnn_adv import attacks  # pylint: disable=wrong-import-position
from tfp_bnn_adv import data  # pylint: disable=wrong-import-position
from tfp_bnn_adv import distribute  # pylint: disable=wrong-import-position
from tfp_bnn_adv import gradients  # pylint: disable=wrong-import-position
from tfp_bnn_adv import models  # pylint: disable=wrong-import-position
from tfp_bnn_adv import xla  # pylint: disable=wrong-import-position
from tfp_bnn_adv.inference import hmc  # pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def mirrored():
    strategy = distribute.get_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    return strategy


@pytest.fixture(scope="module")
def moons():
    return data.half_moons(101, seed=0)


# ------------------------------------------------------------- strategies
def test_get_strategy_names_and_errors():
    assert distribute.num_replicas(distribute.get_strategy("default")) == 1
    assert distribute.num_replicas(None) == 1
    one = distribute.get_strategy("mirrored", devices=["/cpu:0"])
    assert one.num_replicas_in_sync == 1
    with pytest.raises(ValueError, match="strategy must be one of"):
        distribute.get_strategy("horovod")
    with pytest.raises(ValueError, match="needs tpu="):
        distribute.get_strategy("tpu")
    with pytest.raises(ValueError, match="only used with strategy='tpu'"):
        distribute.get_strategy("mirrored", tpu="grpc://1.2.3.4:8470")


def test_configure_logical_cpus_checks():
    assert len(distribute.configure_logical_cpus(2)) == 2  # already so: no-op
    with pytest.raises(ValueError, match="count must be >= 1, got 0"):
        distribute.configure_logical_cpus(0)
    with pytest.raises(ValueError, match="already initialised 2"):
        distribute.configure_logical_cpus(3)


def test_current_strategy_follows_scope(mirrored):
    assert distribute.current_strategy() is None
    with mirrored.scope():
        assert distribute.current_strategy() is mirrored
    with pytest.raises(TypeError, match="tf.distribute.Strategy"):
        distribute.current_strategy("mirrored")


def test_matmul_precision_sets_and_restores():
    before = tf.config.experimental.tensor_float_32_execution_enabled()
    with distribute.matmul_precision("highest"):
        assert not tf.config.experimental.tensor_float_32_execution_enabled()
    with distribute.matmul_precision("default"):
        assert tf.config.experimental.tensor_float_32_execution_enabled()
    assert tf.config.experimental.tensor_float_32_execution_enabled() == before
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        with distribute.matmul_precision("bf16"):
            pass


def test_sharded_call_keeps_order_and_checks_batch(mirrored):
    x = tf.reshape(tf.range(12.0), [6, 2])
    out = distribute.sharded_call(
        mirrored, lambda w, a, b: (a * w, tf.transpose(b)),
        [tf.constant(3.0), x, x + 1.0], [1, 2], batch_axis=[0, 1])
    np.testing.assert_array_equal(out[0].numpy(), 3.0 * x.numpy())
    np.testing.assert_array_equal(out[1].numpy(), (x + 1.0).numpy().T)
    with pytest.raises(ValueError, match="does not split across 2"):
        distribute.sharded_call(mirrored, lambda a: a, [tf.zeros([5])], [0])


def test_sharded_call_caches_runners_weakly_outside_the_function(mirrored):
    def double(a):
        return 2.0 * a

    ref = weakref.ref(double)
    for fn in (double, xla.compile_fn(double, False, "double")):
        for _ in range(2):
            out = distribute.sharded_call(mirrored, fn, [tf.range(4.0)], [0])
            np.testing.assert_array_equal(out.numpy(), [0.0, 2.0, 4.0, 6.0])
        # One runner per function, traced once, and none in its __dict__.
        (runner,) = xla._CACHES[fn].values()
        assert runner.experimental_get_tracing_count() == 1
        assert "_sharded_runners" not in vars(fn)
    del fn, double
    gc.collect()
    assert ref() is None


# -------------------------------------------------------- HMC likelihood
def _direct_log_likelihood(net, params, x, y):
    """Per chain, every point: the plain single-device reference."""
    values = []
    for c in range(params[0].shape[0]):
        logits = net.apply([p[c] for p in params], x)
        values.append(tf.reduce_sum(-tf.nn.sparse_softmax_cross_entropy_with_logits(
            y, logits)))
    return tf.stack(values)


@pytest.mark.parametrize("parallelism", ["data", "chains"])
def test_sharded_log_likelihood_and_gradient(mirrored, moons, parallelism):
    net = Network.from_keras(models.mlp((2,), 2, hidden=(16,)))
    params = net.init_params(seed=4, num_samples=4)
    x, y = moons.train_x.astype(np.float32), moons.train_y.astype(np.int32)
    fn = hmc.replicated_log_likelihood(
        net, mirrored, x, y, shard_size=17, parallelism=parallelism,
        num_chains=4)
    weights = tf.constant([1.0, -2.0, 0.5, 3.0])  # a non-trivial upstream

    @tf.function
    def sharded(*ps):
        with tf.GradientTape() as tape:
            tape.watch(ps)
            v = fn(*ps)
            total = tf.reduce_sum(weights * v)
        return v, tape.gradient(total, ps)

    with tf.GradientTape() as tape:
        tape.watch(params)
        ref = _direct_log_likelihood(net, params, tf.constant(x), tf.constant(y))
        ref_total = tf.reduce_sum(weights * ref)
    ref_grads = tape.gradient(ref_total, params)
    value, grads = sharded(*params)
    np.testing.assert_allclose(value.numpy(), ref.numpy(), rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-4, atol=1e-4)


def test_replicated_log_likelihood_checks(mirrored, moons):
    net = Network.from_keras(models.mlp((2,), 2, hidden=(4,)))
    with pytest.raises(ValueError, match="parallelism must be one of"):
        hmc.replicated_log_likelihood(net, mirrored, moons.train_x,
                                      moons.train_y, shard_size=10,
                                      parallelism="pipeline")
    with pytest.raises(ValueError, match="num_chains divisible"):
        hmc.replicated_log_likelihood(net, mirrored, moons.train_x,
                                      moons.train_y, shard_size=10,
                                      parallelism="chains", num_chains=3)


# ------------------------------------------------------------ HMC samples
_HMC = dict(num_chains=2, num_burnin_steps=10, num_results=8,
            step_size=0.05, num_leapfrog_steps=5, seed=3, shard_size=30,
            jit_compile=False)


@pytest.mark.parametrize("parallelism", ["data", "chains"])
def test_hmc_on_two_devices_matches_one(mirrored, moons, parallelism):
    model = models.mlp((2,), 2, hidden=(16,))
    one, _ = hmc.sample(model, moons.train_x, moons.train_y, **_HMC)
    two, diag = hmc.sample(model, moons.train_x, moons.train_y,
                           strategy=mirrored, parallelism=parallelism, **_HMC)
    assert two.metadata["settings"]["num_replicas"] == 2
    assert two.metadata["settings"]["parallelism"] == parallelism
    assert diag.num_divergent == 0
    # Accepted moves, so the comparison is not of a chain stuck at its start.
    assert np.abs(one.params[0][-1] - one.params[0][0]).max() > 1e-2
    for a, b in zip(one.params, two.params):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_hmc_under_scope_uses_the_strategy(mirrored, moons):
    model = models.mlp((2,), 2, hidden=(4,))
    with mirrored.scope():
        ens, _ = hmc.sample(model, moons.train_x, moons.train_y,
                            **dict(_HMC, num_results=2, num_burnin_steps=2))
    assert ens.metadata["settings"]["num_replicas"] == 2


def test_hmc_distribution_argument_errors(mirrored, moons):
    model = models.mlp((2,), 2, hidden=(4,))
    with pytest.raises(ValueError, match="num_chains divisible"):
        hmc.sample(model, moons.train_x, moons.train_y, strategy=mirrored,
                   parallelism="chains", **dict(_HMC, num_chains=3))
    with pytest.raises(ValueError, match="parallelism must be one of"):
        hmc.sample(model, moons.train_x, moons.train_y, parallelism="model",
                   **_HMC)
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        hmc.sample(model, moons.train_x, moons.train_y,
                   matmul_precision="bfloat16", **_HMC)
    with pytest.raises(TypeError, match="tf.distribute.Strategy"):
        hmc.sample(model, moons.train_x, moons.train_y, strategy="mirrored",
                   **_HMC)


# ------------------------------------------------- gradients and attacks
@pytest.fixture(scope="module")
def cnn_ensemble():
    net = Network.from_keras(models.cnn((8, 8, 1), 3, (4,), hidden=(8,)))
    ens = PosteriorEnsemble(net, net.init_params(seed=0, num_samples=3))
    rng = np.random.RandomState(0)
    x = rng.rand(7, 8, 8, 1).astype(np.float32)  # 7: padded to 8, split 4 + 4
    y = rng.randint(0, 3, size=7)
    return ens, x, y


@pytest.mark.parametrize("gradient", ["expected", "predictive"])
def test_sharded_pgd_equals_unsharded(mirrored, cnn_ensemble, gradient):
    ens, x, y = cnn_ensemble
    kw = dict(eps=0.1, steps=5, gradient=gradient, seed=5, jit_compile=False)
    plain = attacks.pgd(ens, x, y, **kw)
    sharded = attacks.pgd(ens, x, y, strategy=mirrored, **kw)
    with mirrored.scope():
        scoped = attacks.pgd(ens, x, y, **kw)
    assert np.abs(plain - x).max() > 0.05  # the attack moved
    np.testing.assert_allclose(sharded, plain, atol=1e-6)
    np.testing.assert_allclose(scoped, plain, atol=1e-6)


def test_sharded_gradients_equal_unsharded(mirrored, cnn_ensemble):
    ens, x, y = cnn_ensemble
    for fn in (gradients.expected_loss_gradient,
               gradients.predictive_loss_gradient,
               gradients.per_sample_loss_gradients):
        plain = fn(ens, x, y, jit_compile=True)
        sharded = fn(ens, x, y, jit_compile=True, strategy=mirrored)
        assert sharded.shape == plain.shape
        np.testing.assert_allclose(sharded, plain, rtol=1e-5, atol=1e-7)


def test_sharded_square_attack_equals_unsharded_shard_batches(mirrored,
                                                              cnn_ensemble):
    # Square draws one stream per batch, so a sharded batch of 8 equals an
    # unsharded run in batches of 4.
    ens, x, y = cnn_ensemble
    kw = dict(eps=0.1, max_queries=10, seed=2)
    plain = attacks.square_attack(ens, x, y, batch_size=4, **kw)
    sharded = attacks.square_attack(ens, x, y, batch_size=8, strategy=mirrored,
                                    **kw)
    np.testing.assert_array_equal(sharded, plain)


def test_sharded_apgd_equals_unsharded(mirrored, cnn_ensemble):
    # APGD's random starts are per example and a batch stops only when all
    # of its examples are broken, which leaves each example's path alone.
    ens, x, y = cnn_ensemble
    kw = dict(eps=0.1, steps=6, loss="dlr", seed=3, jit_compile=False)
    plain = attacks.apgd(ens, x, y, **kw)
    sharded = attacks.apgd(ens, x, y, strategy=mirrored, **kw)
    with mirrored.scope():
        scoped = attacks.apgd(ens, x, y, **kw)
    assert np.abs(plain - x).max() > 0.05  # the attack moved
    np.testing.assert_allclose(sharded, plain, atol=1e-6)
    np.testing.assert_allclose(scoped, plain, atol=1e-6)


def test_sharded_auto_attack_equals_unsharded(mirrored, cnn_ensemble):
    ens, x, y = cnn_ensemble
    kw = dict(eps=0.1, steps=4, version="custom", attacks=("apgd-ce", "apgd-t"),
              num_targets=2, seed=1, jit_compile=False,
              dlr_fallback=True)  # 3 classes: targeted CE for APGD-T
    plain = attacks.auto_attack(ens, x, y, **kw)
    sharded = attacks.auto_attack(ens, x, y, strategy=mirrored, **kw)
    np.testing.assert_array_equal(sharded.robust, plain.robust)
    np.testing.assert_array_equal(sharded.broken_by, plain.broken_by)
    np.testing.assert_allclose(sharded.x_adv, plain.x_adv, atol=1e-6)
