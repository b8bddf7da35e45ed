"""compile_fn: both compilation paths agree; auto mode measures and caches;
cached_function keeps built functions per owner, weakly and bounded."""

import gc
import weakref

import numpy as np
import pytest  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from tfp_bnn_adv import xla  # pylint: disable=wrong-import-position


def _fn(a, b):
    return tf.nn.relu(tf.matmul(a, b)) + tf.reduce_sum(a)


def test_both_paths_agree_and_auto_records_a_choice():
    a = tf.random.stateless_normal([16, 8], seed=[1, 2])
    b = tf.random.stateless_normal([8, 4], seed=[3, 4])
    ref = np.maximum(a.numpy() @ b.numpy(), 0) + a.numpy().sum()
    for mode in (True, False, "auto"):
        f = xla.compile_fn(_fn, jit_compile=mode, name="t")
        np.testing.assert_allclose(f(a, b).numpy(), ref, rtol=1e-5, atol=1e-5)
    auto = xla.compile_fn(_fn, jit_compile="auto")
    auto(a, b)
    auto(a, b)
    assert len(auto.choices) == 1
    use_xla, t_default, t_xla = next(iter(auto.choices.values()))
    assert use_xla == (t_xla < t_default)
    auto(a[:3], b)  # a new input signature is measured separately
    assert len(auto.choices) == 2


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


def test_auto_falls_back_when_xla_cannot_compile():
    def no_xla(a):
        # tf.numpy_function has no XLA kernel.
        return tf.numpy_function(lambda v: v * 2, [a], tf.float32)

    f = xla.compile_fn(no_xla, jit_compile="auto")
    out = f(tf.ones([3]))
    np.testing.assert_array_equal(out.numpy(), 2.0)
    assert next(iter(f.choices.values()))[0] is False


def test_auto_choice_is_remembered_across_processes(tmp_path, monkeypatch):
    cache = tmp_path / "choices.json"
    monkeypatch.setenv("TFP_BNN_ADV_JIT_CACHE", str(cache))
    a = tf.ones([8, 8])
    first = xla.compile_fn(_fn, jit_compile="auto", name="remember")
    first(a, a)
    use_xla, t_default, t_xla = next(iter(first.choices.values()))
    assert np.isfinite(t_default) and cache.exists()
    # A new function object (as in a new process) takes the stored path
    # without measuring.
    second = xla.compile_fn(_fn, jit_compile="auto", name="remember")
    second(a, a)
    again, t2, _ = next(iter(second.choices.values()))
    assert again == use_xla and np.isnan(t2)
    monkeypatch.setenv("TFP_BNN_ADV_JIT_CACHE", "none")
    third = xla.compile_fn(_fn, jit_compile="auto", name="remember")
    third(a, a)
    assert np.isfinite(next(iter(third.choices.values()))[1])


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
