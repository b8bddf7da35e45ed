"""Compile hot functions with or without XLA, choosing by measurement on CPU.

Every hot function in the package is XLA-compilable, because GPUs and TPUs
need it.  On CPU, XLA is not always the fastest: grouped convolutions ran
several times faster with TensorFlow's default kernels on the machines we
measured, while MLPs were slightly faster under XLA.  :func:`compile_fn`
therefore wraps a pure function in two ``tf.function``s and, in ``"auto"``
mode on a CPU-only host, times both on the first call for each input
signature and keeps the faster one.

The default mode comes from the environment variable ``TFP_BNN_ADV_JIT``
(``auto``, ``xla`` or ``default``) and is ``auto`` when unset.  Both paths
compute the same numbers up to float round-off; pin ``jit_compile=True`` or
``False`` when bit-for-bit reproducibility across runs matters more than
speed.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from absl import logging
import tensorflow as tf

__all__ = ["compile_fn", "resolve_jit", "has_accelerator"]

_ENV = "TFP_BNN_ADV_JIT"
_MODES = {"auto": "auto", "xla": True, "true": True, "1": True,
          "default": False, "false": False, "0": False}


def has_accelerator() -> bool:
    """Whether a GPU or TPU is visible to TensorFlow."""
    return bool(tf.config.list_logical_devices("GPU") or
                tf.config.list_logical_devices("TPU"))


def resolve_jit(jit_compile: Any = None):
    """Normalises a ``jit_compile`` argument.

    Args:
      jit_compile: ``True`` (XLA), ``False`` (TF default kernels), ``"auto"``,
        or ``None`` for the environment default.

    Returns:
      ``True``, ``False`` or ``"auto"``; ``"auto"`` becomes ``True`` when an
      accelerator is present.

    Raises:
      ValueError: for any other value, or a bad ``TFP_BNN_ADV_JIT``.
    """
    if jit_compile is None:
        raw = os.environ.get(_ENV, "auto").strip().lower()
        if raw not in _MODES:
            raise ValueError(f"{_ENV}={raw!r}; use one of auto, xla, default.")
        jit_compile = _MODES[raw]
    if isinstance(jit_compile, str):
        if jit_compile.lower() not in _MODES:
            raise ValueError(f"jit_compile must be True, False or 'auto', got "
                             f"{jit_compile!r}.")
        jit_compile = _MODES[jit_compile.lower()]
    if jit_compile not in (True, False, "auto"):
        raise ValueError(f"jit_compile must be True, False or 'auto', got "
                         f"{jit_compile!r}.")
    if jit_compile == "auto" and has_accelerator():
        return True
    return jit_compile


def _signature(args, kwargs) -> tuple:
    def leaf(v):
        if isinstance(v, (tf.Tensor, tf.Variable)):
            return ("T", tuple(v.shape.as_list()), v.dtype.name)
        if hasattr(v, "shape") and hasattr(v, "dtype"):
            return ("A", tuple(v.shape), str(v.dtype))
        return ("P", repr(v))
    flat = tf.nest.flatten((args, sorted(kwargs.items())))
    return tuple(leaf(v) for v in flat)


def _block(result) -> None:
    for t in tf.nest.flatten(result):
        if isinstance(t, tf.Tensor):
            t.numpy()


class CompiledFunction:
    """A pure function compiled with XLA, without, or the faster of the two.

    Call it like the wrapped function.  ``choices`` maps each input signature
    seen in ``"auto"`` mode to ``(use_xla, seconds_default, seconds_xla)``.
    """

    def __init__(self, fn: Callable, jit_compile=None, name: str | None = None,
                 repeats: int = 2):
        self.name = name or getattr(fn, "__name__", "fn")
        self.mode = resolve_jit(jit_compile)
        self.repeats = repeats
        self._xla = tf.function(fn, jit_compile=True, autograph=False)
        self._default = tf.function(fn, jit_compile=False, autograph=False)
        self.choices: dict[tuple, tuple[bool, float, float]] = {}

    def __call__(self, *args, **kwargs):
        if self.mode is True:
            return self._xla(*args, **kwargs)
        if self.mode is False:
            return self._default(*args, **kwargs)
        key = _signature(args, kwargs)
        if key not in self.choices:
            return self._autotune(key, args, kwargs)
        fn = self._xla if self.choices[key][0] else self._default
        return fn(*args, **kwargs)

    def _time(self, fn, args, kwargs):
        result = fn(*args, **kwargs)  # compiles
        _block(result)
        best = float("inf")
        for _ in range(self.repeats):
            start = time.perf_counter()
            _block(fn(*args, **kwargs))
            best = min(best, time.perf_counter() - start)
        return result, best

    def _autotune(self, key, args, kwargs):
        result, t_default = self._time(self._default, args, kwargs)
        try:
            _, t_xla = self._time(self._xla, args, kwargs)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
                tf.errors.InternalError) as e:
            logging.warning("%s: XLA compilation failed (%s); using TF default "
                            "kernels.", self.name, str(e).splitlines()[0])
            t_xla = float("inf")
        use_xla = t_xla < t_default
        self.choices[key] = (use_xla, t_default, t_xla)
        logging.info("%s: TF default kernels %.2f ms, XLA %.2f ms -> %s",
                     self.name, 1e3 * t_default, 1e3 * t_xla,
                     "XLA" if use_xla else "default kernels")
        return result


def compile_fn(fn: Callable, jit_compile=None, name: str | None = None
               ) -> CompiledFunction:
    """Compiles a pure TensorFlow function, choosing XLA by measurement.

    Args:
      fn: a pure function of tensors (and hashable Python values).
      jit_compile: ``True``, ``False``, ``"auto"`` or ``None`` (environment
        default, see module docstring).
      name: a name for log messages.

    Returns:
      A :class:`CompiledFunction`.

    Example:
      >>> f = compile_fn(lambda a, b: tf.matmul(a, b), jit_compile="auto")
      >>> f(tf.ones([4, 4]), tf.ones([4, 4])).shape
      TensorShape([4, 4])
    """
    return CompiledFunction(fn, jit_compile, name)
