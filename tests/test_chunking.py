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


def test_chunk_size_validation_and_auto_size():
    assert chunking.check_chunk_size(None) is None
    assert chunking.check_chunk_size(4) == 4
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        chunking.check_chunk_size(0)
    with pytest.raises(TypeError, match="chunk_size"):
        chunking.check_chunk_size(True)

    class Net:
        def activation_size_per_example(self):
            return 1000

    # 3 (fwd + bwd + copies) x 4 bytes x 1000 floats x batch 100 = 1.2 MB/sample.
    assert chunking.auto_chunk_size(Net(), 500, 100, memory_budget=12_000_000) == 10
    assert chunking.auto_chunk_size(Net(), 5, 100, memory_budget=12_000_000) == 5
    assert chunking.auto_chunk_size(Net(), 500, 100, memory_budget=1) == 1
