"""Chunked loops over the sample axis and padded batches equal direct code."""

import numpy as np
import pytest  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from tfp_bnn_adv import chunking  # pylint: disable=wrong-import-position


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 10])
@pytest.mark.parametrize("jit", [False, True])
def test_fold_and_map_equal_direct_computation(chunk, jit):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 3)).astype(np.float32)
    b = rng.normal(size=(7, 2, 2)).astype(np.float32)

    @tf.function(jit_compile=jit, autograph=False)
    def run(a, b):
        total = chunking.fold_sample_chunks(
            [a, b], chunk,
            lambda st, c: st + tf.einsum("s,sij->ij", tf.reduce_sum(c[0], 1), c[1] ** 2),
            tf.zeros([2, 2]))
        mapped = chunking.map_sample_chunks(
            [a, b], chunk, lambda c: (c[0] * 2.0, tf.reduce_sum(c[1], axis=-1)))
        return total, mapped

    total, (m0, m1) = run(tf.constant(a), tf.constant(b))
    ref_total = sum(a[s].sum() * b[s] ** 2 for s in range(7))
    np.testing.assert_allclose(total.numpy(), ref_total, rtol=1e-5)
    np.testing.assert_allclose(m0.numpy(), a * 2.0, rtol=1e-6)
    np.testing.assert_allclose(m1.numpy(), b.sum(-1), rtol=1e-6)


def test_map_keeps_a_batch_of_unknown_size():
    a = np.arange(15, dtype=np.float32).reshape(5, 3)
    x = np.arange(8, dtype=np.float32).reshape(4, 2)

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)],
                 autograph=False)
    def run(xb):
        out = chunking.map_sample_chunks(
            [tf.constant(a)], 2, lambda c: c[0][:, None, :1] * xb[None])
        assert out.shape.as_list() == [5, None, 2], out.shape
        return out

    np.testing.assert_array_equal(run(tf.constant(x)).numpy(),
                                  a[:, None, :1] * x[None])


def test_map_batches_pads_and_trims():
    calls = []

    def fn(x, y):
        calls.append(x.shape[0])
        return x * 10.0, tf.stack([y, y])  # second output has batch on axis 1

    x = np.arange(7, dtype=np.float32)
    y = np.arange(7, dtype=np.float32) + 100
    out_x, out_y = chunking.map_batches(fn, [x, y], 3, batch_axis=[0, 1])
    assert calls == [3, 3, 3]  # the last batch of 1 was padded to 3
    np.testing.assert_array_equal(out_x, x * 10)
    np.testing.assert_array_equal(out_y, np.stack([y, y]))


class Net:
    """A stand-in network: 1000 activation floats per example, no ops."""

    def activation_size_per_example(self):
        return 1000


def test_chunk_size_validation_and_auto_size():
    assert chunking.check_chunk_size(None) is None
    assert chunking.check_chunk_size(4) == 4
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        chunking.check_chunk_size(0)
    with pytest.raises(TypeError, match="chunk_size"):
        chunking.check_chunk_size(True)

    # 3 (fwd + bwd + copies) x 4 bytes x 1000 floats x batch 100 = 1.2 MB/sample.
    assert chunking.auto_chunk_size(Net(), 500, 100, memory_budget=12_000_000) == 10
    assert chunking.auto_chunk_size(Net(), 5, 100, memory_budget=12_000_000) == 5
    assert chunking.auto_chunk_size(Net(), 500, 100, memory_budget=1) == 1


@pytest.mark.parametrize("chunk", [2, 3, 4])
@pytest.mark.parametrize("jit", [False, True])
def test_fold_gradients_reach_every_sample_once(chunk, jit):
    # Chunks are sliced at a run-time offset in the loop: the gradient with
    # respect to the stack must still reach each row once, also where the
    # chunk does not divide S (a remainder chunk) -- against the closed form.
    rng = np.random.default_rng(1)
    w = tf.constant(rng.normal(size=(9, 3, 2)).astype(np.float32))
    x = tf.constant(rng.normal(size=(4, 3)).astype(np.float32))

    @tf.function(jit_compile=jit, autograph=False)
    def run(w, x):
        with tf.GradientTape() as tape:
            tape.watch([w, x])
            total = chunking.fold_sample_chunks(
                [w], chunk,
                lambda st, c: st + tf.reduce_sum(tf.einsum("bi,sij->sbj", x, c[0]) ** 2),
                tf.zeros([]))
        return tape.gradient(total, [w, x])

    gw, gx = run(w, x)
    h = np.einsum("bi,sij->sbj", x.numpy(), w.numpy())  # [S, B, 2]
    np.testing.assert_allclose(gw.numpy(), 2 * np.einsum("bi,sbj->sij", x.numpy(), h),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx.numpy(), 2 * np.einsum("sbj,sij->bi", h, w.numpy()),
                               rtol=1e-5, atol=1e-5)


def _mlp_network(hidden, input_shape=(28, 28, 1), classes=10):
    from tfp_bnn_adv import models  # pylint: disable=g-import-not-at-top
    from tfp_bnn_adv.network import Network  # pylint: disable=g-import-not-at-top
    return Network.from_keras(models.mlp(input_shape, classes, hidden))


def test_cache_bound_counts_the_weight_dependent_activations_of_dense_nets():
    net = _mlp_network((512, 512))
    # Floats after the shared Flatten: 512 + 512 + 10 = 1034 per example and
    # sample; 4 MiB / (4 bytes x 128 x 1034) = 7.9 -> at most 7 samples;
    # 100 samples need 15 chunks, balanced to ceil(100 / 15) = 7.
    assert chunking.auto_chunk_size(net, 100, 128,
                                    cache_budget=4 * 2**20) == 7
    # 2-512-2, batch 500: 514 floats; 4 MiB / (4 x 500 x 514) = 4.08 -> 4.
    small = _mlp_network((512,), input_shape=(2,), classes=2)
    assert chunking.auto_chunk_size(small, 1000, 500,
                                    cache_budget=4 * 2**20) == 4
    # Without a cache budget (a GPU, an export), the memory bound alone:
    # 512 MiB / (12 bytes x 128 x 1818 floats, the Flatten counted) = 192,
    # more than S.
    assert chunking.auto_chunk_size(net, 100, 128) == 100
    assert chunking.auto_chunk_size(net, 100, 128, cache_budget=None) == 100
    # A budget below one sample still gives chunks of one.
    assert chunking.auto_chunk_size(net, 100, 128, cache_budget=1) == 1


def test_cache_bound_leaves_convolutional_and_generic_networks_alone():
    from tfp_bnn_adv import models  # pylint: disable=g-import-not-at-top
    from tfp_bnn_adv.network import Network  # pylint: disable=g-import-not-at-top
    cnn = Network.from_keras(models.cnn((28, 28, 1), 10, (8, 16)))
    memory_only = chunking.auto_chunk_size(cnn, 100, 128)
    assert chunking.auto_chunk_size(cnn, 100, 128, cache_budget=1) == memory_only > 1
    generic = Network.from_keras(models.mlp((28, 28, 1), 10, (512, 512)),
                                 path="generic")
    assert chunking.auto_chunk_size(generic, 100, 128, cache_budget=1) == 100


def test_auto_chunks_are_balanced():
    # The memory bound allows 100 (12 bytes x 1000 floats x batch 100 =
    # 1.2 MB per sample, 120 MB): 110 samples take two chunks of 55, not
    # 100 and a remainder of 10; 250 take three of 84 (84 + 84 + 82).
    assert chunking.auto_chunk_size(Net(), 110, 100, memory_budget=120_000_000) == 55
    assert chunking.auto_chunk_size(Net(), 250, 100, memory_budget=120_000_000) == 84
    assert chunking.auto_chunk_size(Net(), 200, 100, memory_budget=120_000_000) == 100


def test_host_cache_budget_is_for_cpu_only_hosts(monkeypatch):
    from tfp_bnn_adv import xla  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(xla, "has_accelerator", lambda: False)
    assert chunking.host_cache_budget() == chunking.CPU_CACHE_BUDGET == 4 * 2**20
    monkeypatch.setattr(xla, "has_accelerator", lambda: True)
    assert chunking.host_cache_budget() is None


def test_ensembles_take_the_cache_bound_and_exports_do_not(monkeypatch):
    from tfp_bnn_adv import xla  # pylint: disable=g-import-not-at-top
    from tfp_bnn_adv.ensemble import PosteriorEnsemble  # pylint: disable=g-import-not-at-top
    net = _mlp_network((512, 512))
    ens = PosteriorEnsemble(net, net.init_params(seed=0, num_samples=100))
    monkeypatch.setattr(xla, "has_accelerator", lambda: False)
    assert ens.batch_and_chunk(128, None, None) == (128, 7)
    assert ens.batch_and_chunk(1000, 128, None) == (128, 7)
    assert ens.batch_and_chunk(128, None, 30) == (128, 30)  # asked for: kept
    # The exported model saves its chunk and may run on another device:
    # memory bound only, for the default batch of 512 (192 x 128 / 512 =
    # 48 samples at most -> 3 balanced chunks of 34).
    layer = [l for l in ens.to_keras().layers if hasattr(l, "chunk_size")][0]
    assert layer.chunk_size == 34
    monkeypatch.setattr(xla, "has_accelerator", lambda: True)
    assert ens.batch_and_chunk(128, None, None) == (128, 100)
