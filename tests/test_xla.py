"""compile_fn: both compilation paths agree; auto mode is a rule, never a timing;
cached_function keeps built functions per owner, weakly and bounded."""

import gc
import weakref

import numpy as np
import pytest  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from tfp_bnn_adv import xla  # pylint: disable=wrong-import-position


def _fn(a, b):
    return tf.nn.relu(tf.matmul(a, b)) + tf.reduce_sum(a)


def _conv_in_a_loop(x, k):
    # The convolution sits in a while_loop body: a function of the graph's
    # library, not a node of the graph itself.
    def body(i, acc):
        return i + 1, acc + tf.nn.conv2d(x, k, 1, "SAME")
    return tf.while_loop(lambda i, _: i < 2, body,
                         (tf.constant(0), tf.zeros_like(x)))[1]


@pytest.mark.parametrize("avx512", [True, False])
def test_auto_path_is_a_rule_of_the_graph_and_the_cpu(monkeypatch, avx512):
    monkeypatch.setattr(xla, "tf_kernels_use_avx512", lambda: avx512)
    a = tf.random.stateless_normal([16, 8], seed=[1, 2])
    b = tf.random.stateless_normal([8, 4], seed=[3, 4])
    ref = np.maximum(a.numpy() @ b.numpy(), 0) + a.numpy().sum()
    for mode in (True, False, "auto"):
        f = xla.compile_fn(_fn, jit_compile=mode, name="t")
        np.testing.assert_allclose(f(a, b).numpy(), ref, rtol=1e-5, atol=1e-5)
    auto = xla.compile_fn(_fn, jit_compile="auto")
    auto(a, b)
    auto(a, b)
    want = (False, "avx512") if avx512 else (True, "no avx512")
    assert list(auto.paths.values()) == [want]
    assert auto.uses_xla() is (not avx512)
    auto(a[:3], b)  # a new input signature is decided on its own
    assert list(auto.paths.values()) == [want, want]
    # A convolution anywhere in the graph keeps TF's kernels on any CPU.
    x = tf.random.stateless_normal([2, 6, 6, 3], seed=[5, 6])
    k = tf.random.stateless_normal([3, 3, 3, 3], seed=[7, 8])
    conv = xla.compile_fn(_conv_in_a_loop, jit_compile="auto")
    np.testing.assert_allclose(
        conv(x, k).numpy(), 2 * tf.nn.conv2d(x, k, 1, "SAME").numpy(),
        rtol=1e-5, atol=1e-5)
    assert list(conv.paths.values()) == [(False, "convolution")]
    pinned = xla.compile_fn(_fn, jit_compile=True)
    pinned(a, b)
    assert list(pinned.paths.values()) == [(True, "pinned")]


def test_auto_path_does_not_depend_on_what_ran_before():
    a = tf.random.stateless_normal([64, 64], seed=[1, 1])
    first = xla.compile_fn(_fn, jit_compile="auto", name="same")
    out = first(a, a).numpy()
    # Both pinned paths run (and compile) the same function in between.
    for mode in (True, False):
        xla.compile_fn(_fn, jit_compile=mode, name="same")(a, a)
    second = xla.compile_fn(_fn, jit_compile="auto", name="same")
    np.testing.assert_array_equal(second(a, a).numpy(), out)
    assert first.paths == second.paths


_SPR = {"avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx2"}


@pytest.mark.parametrize("flags, env, want", [
    (_SPR, {}, True),
    ({"avx512f", "avx512_vnni"}, {}, True),
    # No feature TF turns oneDNN on for (a Skylake-X): Eigen's kernels,
    # unless oneDNN is asked for.
    ({"avx512f", "avx2"}, {}, False),
    ({"avx512f", "avx2"}, {"TF_ENABLE_ONEDNN_OPTS": "1"}, True),
    ({"avx2", "fma", "avx_vnni"}, {}, False),  # oneDNN, but no AVX-512
    ({"avx2", "fma"}, {"TF_ENABLE_ONEDNN_OPTS": "1"}, False),
    (_SPR, {"TF_ENABLE_ONEDNN_OPTS": "0"}, False),
    (_SPR, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
    (_SPR, {"DNNL_MAX_CPU_ISA": "avx2_vnni"}, False),
    (_SPR, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, True),
    (_SPR, {"ONEDNN_MAX_CPU_ISA": "ALL"}, True),
])
def test_tf_kernels_use_avx512_reads_the_cpu_and_onednn(monkeypatch, flags,
                                                         env, want):
    monkeypatch.setattr(xla, "_cpu_flags", lambda: frozenset(flags))
    for name in ("TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA",
                 "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert xla.tf_kernels_use_avx512() is want
    assert xla.auto_path(stochastic=False, convolutional=False) is (not want)
    assert xla.auto_path(stochastic=True, convolutional=False) is False
    assert xla.auto_path(stochastic=False, convolutional=True) is False
    assert xla.deterministic_jit("auto", convolutional=False) is (not want)
    assert xla.deterministic_jit("auto", convolutional=True) is False
    assert xla.deterministic_jit(True, convolutional=True) is True
    assert xla.deterministic_jit(False, convolutional=False) is False


def test_resolve_jit_modes_and_environment(monkeypatch):
    assert xla.resolve_jit(True) is True
    assert xla.resolve_jit(False) is False
    assert xla.resolve_jit("auto") == "auto"  # no accelerator on the CI machine
    monkeypatch.setenv("TFP_BNN_ADV_JIT", "default")
    assert xla.resolve_jit(None) is False
    monkeypatch.setenv("TFP_BNN_ADV_JIT", "xla")
    assert xla.resolve_jit(None) is True
    monkeypatch.setenv("TFP_BNN_ADV_JIT", "fast")
    with pytest.raises(ValueError, match="TFP_BNN_ADV_JIT='fast'"):
        xla.resolve_jit(None)
    with pytest.raises(ValueError, match="jit_compile must be"):
        xla.resolve_jit("sometimes")
    with pytest.raises(ValueError, match="jit_compile must be"):
        xla.resolve_jit(3)


def test_auto_falls_back_when_xla_cannot_compile(monkeypatch):
    monkeypatch.setattr(xla, "tf_kernels_use_avx512", lambda: False)

    def no_xla(a):
        # tf.numpy_function has no XLA kernel.
        return tf.numpy_function(lambda v: v * 2, [a], tf.float32)

    f = xla.compile_fn(no_xla, jit_compile="auto")
    out = f(tf.ones([3]))
    np.testing.assert_array_equal(out.numpy(), 2.0)
    assert list(f.paths.values()) == [(False, "XLA cannot compile")]
    np.testing.assert_array_equal(f(tf.ones([3])).numpy(), 2.0)


# --------------------------------------------------------------------------
# The cache of built functions.
# --------------------------------------------------------------------------
class _Owner:
    """A stand-in for a Network: hashable by identity, weakly referenceable."""


def test_cached_function_builds_once_per_owner_and_key():
    owner, other, built = _Owner(), _Owner(), []

    def build(proxy):
        built.append(proxy)
        return object()

    first = xla.cached_function(owner, ("a", 1), build)
    assert xla.cached_function(owner, ("a", 1), build) is first
    assert xla.cached_function(owner, ("a", 2), build) is not first
    assert xla.cached_function(other, ("a", 1), build) is not first
    assert len(built) == 3
    # build gets a weak proxy, so what it builds cannot keep the owner alive.
    assert isinstance(built[0], weakref.ProxyType)


def test_cached_function_is_weakly_keyed_and_bounded():
    owner = _Owner()
    ref = weakref.ref(owner)
    # A built value that holds the proxy (as a compiled closure would).
    for i in range(xla.CACHE_SIZE + 5):
        xla.cached_function(owner, i, lambda proxy: [proxy])
    assert len(xla._CACHES[owner]) == xla.CACHE_SIZE
    # The least recently used went first; a recalled entry moves to the end.
    assert list(xla._CACHES[owner])[0] == 5
    xla.cached_function(owner, 5, lambda proxy: None)
    assert list(xla._CACHES[owner])[-1] == 5
    assert not hasattr(owner, "_compiled") and not vars(owner)
    del owner
    gc.collect()
    assert ref() is None


def test_cached_function_without_weak_references_builds_every_call():
    calls = []
    for _ in range(2):
        xla.cached_function(3, "k", lambda owner: calls.append(owner))
    assert calls == [3, 3]
