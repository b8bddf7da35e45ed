"""Compile hot functions with or without XLA.

Every hot function in the package is XLA-compilable, because GPUs and TPUs
need it.  On CPU, XLA is not always the fastest: grouped convolutions ran
several times faster with TensorFlow's default kernels on the machines we
measured, while MLPs were slightly faster under XLA.

The default mode comes from the environment variable ``TFP_BNN_ADV_JIT``
(``auto``, ``xla`` or ``default``) and is ``auto`` when unset.  What
``"auto"`` means depends on the function (:func:`compile_fn`'s
``stochastic``):

* **Stochastic code** (HMC, the random attack, the Square Attack,
  ``gradient="sample"``, anything whose result is a chaotic function of
  its inputs) never chooses by measurement: ``"auto"`` is XLA when a GPU
  or TPU is visible and TF's default kernels on a CPU-only host (where a
  short HMC run of a 2-8-2 MLP took 50 s under XLA against 14 s, nearly all
  of it compiling, and the old timing picked each path about half the time
  for a 784-16-10 chain), falling back to XLA only where
  TF lacks a CPU kernel, which is a property of the platform, not a timing.
  The path taken is a function of the arguments and the platform alone
  (:func:`path_name` names it for the run's records): the same call with
  the same seed gives the same result whatever was timed or cached before.
* **Deterministic code** (predictions, gradients, FGSM/PGD): ``"auto"``
  on a CPU-only host times both paths on the first call for each input
  signature and keeps the faster one, remembered per machine in a small
  JSON file (``TFP_BNN_ADV_JIT_CACHE``, default
  ``~/.cache/tfp_bnn_adv/jit_choices.json``; ``none`` disables it).  The
  two paths compute the same function and differ by float rounding only
  (relative 1e-6 in float32); a sign step of PGD can still flip where a
  gradient component is within rounding of zero.

Random draws do not depend on the path either: every sampler in the package
draws integer bits with Philox, identical on both, and maps them to floats
with ordinary arithmetic (:mod:`tfp_bnn_adv.seeds`).  What remains between
the two paths is rounding in that arithmetic and in the model itself, which
a long HMC chain amplifies; so a result is reproducible bit for bit on the
same path, platform and TensorFlow build, and statistically equivalent
across paths.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import platform
import threading
import time
from typing import Any, Callable
import weakref

from absl import logging
import tensorflow as tf

from tfp_bnn_adv import files

__all__ = ["compile_fn", "resolve_jit", "stochastic_jit", "path_name",
           "has_accelerator", "cached_function", "CACHE_SIZE"]

_ENV = "TFP_BNN_ADV_JIT"
_CACHE_ENV = "TFP_BNN_ADV_JIT_CACHE"
_TRACE_IDS = itertools.count()
# Errors of TF CPU kernels that XLA does not share: grouped convolutions'
# gradients are missing on some CPUs ("not supported on CPU", or a filter
# gradient that asks for the ungrouped filter size).
_NO_CPU_KERNEL = ("not supported on CPU", "Conv2DBackprop")
# "This call's output was not computed while choosing its path."
_NOT_RUN = object()
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


def stochastic_jit(jit_compile: Any = None) -> bool:
    """The compile path of stochastic code: ``True`` (XLA) or ``False``.

    ``"auto"`` (and ``None`` with ``TFP_BNN_ADV_JIT`` unset or ``auto``)
    is XLA with an accelerator and TF's default kernels without; nothing is
    timed, so the path is a function of the argument, the environment
    variable and the devices alone.
    """
    mode = resolve_jit(jit_compile)  # "auto" is already True on GPU/TPU
    return False if mode == "auto" else bool(mode)


def path_name(use_xla: bool) -> str:
    """``"xla"`` or ``"default"`` (TF's kernels), for a run's records."""
    return "xla" if use_xla else "default"


def _cache_path() -> str | None:
    path = os.environ.get(_CACHE_ENV)
    if path is None:
        path = os.path.join(os.path.expanduser("~"), ".cache", "tfp_bnn_adv",
                            "jit_choices.json")
    return None if path.lower() == "none" else path


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            models = [ln.split(":", 1)[1].strip() for ln in f
                      if ln.startswith("model name")]
        cpu = models[0] if models else cpu
    except OSError:
        pass
    return f"{cpu}|{os.cpu_count()}|tf{tf.__version__}"


def _load_choices() -> dict:
    path = _cache_path()
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return dict(json.load(f))
    except (OSError, ValueError):
        logging.warning("Ignoring unreadable XLA choice cache %s", path)
        return {}


def _store_choice(key: str, use_xla: bool) -> None:
    path = _cache_path()
    if not path:
        return
    choices = _load_choices()
    choices[key] = use_xla
    try:
        files.write_json(path, choices)
    except OSError as e:
        logging.warning("Cannot write XLA choice cache %s: %s", path, e)


# ---------------------------------------------------------------------------
# Built functions, cached per owner (a Network, a function).
# ---------------------------------------------------------------------------
# Entries kept per owner; the least recently used goes first.  A study uses a
# handful of configurations per network, far fewer than this.
CACHE_SIZE = 64
_CACHES: "weakref.WeakKeyDictionary[Any, collections.OrderedDict]" = (
    weakref.WeakKeyDictionary())
_CACHE_LOCK = threading.Lock()


def cached_function(owner, key, build: Callable[[Any], Any]):
    """``build(owner)``, built once per ``(owner, key)`` and then recalled.

    The cache belongs to this module, not to ``owner``: it is keyed weakly
    by ``owner`` (by identity for a ``Network``), so its entries go when
    ``owner`` goes, and it holds at most :data:`CACHE_SIZE` entries per
    owner, dropping the least recently used.  ``key`` must name
    everything ``build`` depends on besides ``owner`` (a hashable tuple).

    ``build`` receives a weak proxy of ``owner``: what it builds may keep
    that proxy, never ``owner`` itself, or the entry would keep its own key
    alive.  (An ``owner`` that cannot be weakly referenced or hashed is not
    cached: ``build(owner)`` runs on every call.)

    A recalled entry computes what a fresh build computes.  An evicted one
    is rebuilt (and retraced); with ``jit_compile="auto"`` a rebuilt
    deterministic function recalls its timed path from the choice file
    (module docstring), and re-times only where that file is disabled.

    Args:
      owner: the object the built value belongs to.
      key: hashable; distinguishes what is built for one owner.
      build: ``(weak proxy of owner) -> value``.

    Returns:
      The cached or newly built value.

    Example:
      >>> fn = cached_function(net, ("logits", None), lambda net: compile_fn(
      ...     lambda p, x: net.apply_stack(p, x)))
    """
    try:
        proxy = weakref.proxy(owner)
        hash(owner)
    except TypeError:  # not weakly referenceable, or not hashable
        return build(owner)
    with _CACHE_LOCK:
        entries = _CACHES.get(owner)
        if entries is None:
            entries = _CACHES[owner] = collections.OrderedDict()
        elif key in entries:
            entries.move_to_end(key)
            return entries[key]
    value = build(proxy)
    with _CACHE_LOCK:
        entries[key] = value
        entries.move_to_end(key)
        while len(entries) > CACHE_SIZE:
            entries.popitem(last=False)
    return value


def _signature(args, kwargs) -> tuple:
    def leaf(v):
        if isinstance(v, (tf.Tensor, tf.Variable)):
            return ("T", tuple(v.shape.as_list()), v.dtype.name)
        if hasattr(v, "shape") and hasattr(v, "dtype"):
            return ("A", tuple(v.shape), str(v.dtype))
        return ("P", repr(v))
    # Composite tensors (distributions, running statistics in kernel
    # results) count by their component tensors' shapes, not their reprs,
    # which print values.
    flat = tf.nest.flatten((args, sorted(kwargs.items())),
                           expand_composites=True)
    return tuple(leaf(v) for v in flat)


def _block(result) -> None:
    for t in tf.nest.flatten(result):
        if isinstance(t, tf.Tensor):
            t.numpy()


class CompiledFunction:
    """A pure function compiled with XLA, without, or the faster of the two.

    Call it like the wrapped function.  ``choices`` maps each input signature
    seen in ``"auto"`` mode to ``(use_xla, seconds_default, seconds_xla)``.
    With ``stochastic=True`` the mode is never ``"auto"``
    (:func:`stochastic_jit`).
    """

    def __init__(self, fn: Callable, jit_compile=None, name: str | None = None,
                 repeats: int = 2, *, stochastic: bool = False):
        if not isinstance(stochastic, bool):
            raise TypeError(f"stochastic must be a bool, got {stochastic!r}.")
        self.name = name or getattr(fn, "__name__", "fn")
        self.stochastic = stochastic
        self.mode = (stochastic_jit(jit_compile) if stochastic
                     else resolve_jit(jit_compile))
        self.repeats = repeats
        self._fn = fn
        # One tf.function per input signature and path: each traces once, so
        # a study that calls with many ensemble sizes never retraces.
        self._traced: dict[tuple, Any] = {}
        self.choices: dict[tuple, tuple[bool, float, float]] = {}
        # jit_compile=False: per signature, whether TF's default kernels
        # lacked an op (True: this signature runs under XLA after all).
        self._default_lacks_kernel: dict[tuple, bool] = {}

    def uses_xla(self) -> bool:
        """Whether any call so far ran under XLA (pinned, chosen, or because
        TF's kernels lacked an op)."""
        return (self.mode is True or any(self._default_lacks_kernel.values())
                or any(c[0] for c in self.choices.values()))

    def _get(self, key, use_xla: bool):
        if (key, use_xla) not in self._traced:
            # TF counts traces per code object, so a wrapper sharing one code
            # object would make our deliberate one-trace-per-shape look like
            # runaway retracing; each wrapper gets its own (and a readable
            # name in profiles).
            def traced(*args, **kwargs):
                return self._fn(*args, **kwargs)

            name = f"{self.name}_{next(_TRACE_IDS)}".replace(".", "_")
            traced.__code__ = traced.__code__.replace(co_name=name)
            traced.__name__ = name
            self._traced[(key, use_xla)] = tf.function(
                traced, jit_compile=use_xla, autograph=False)
        return self._traced[(key, use_xla)]

    def __call__(self, *args, **kwargs):
        key = _signature(args, kwargs)
        use_xla, result = self._resolve(key, args, kwargs)
        if result is _NOT_RUN:
            result = self._get(key, use_xla)(*args, **kwargs)
        return result

    def select(self, *args, **kwargs):
        """The ``tf.function`` this object runs for these arguments.

        In ``"auto"`` mode, makes (or recalls) the choice for their signature
        first, timing both paths eagerly.  Use it to run the chosen path
        where timing is impossible, e.g. on every replica of a strategy.
        """
        key = _signature(args, kwargs)
        return self._get(key, self._resolve(key, args, kwargs)[0])

    def _resolve(self, key, args, kwargs):
        """``(use_xla, result)`` for a signature; ``result`` is the call's
        output if finding the path ran it, else ``_NOT_RUN``."""
        if self.mode is True:
            return True, _NOT_RUN
        if self.mode is False:
            if key in self._default_lacks_kernel:
                return self._default_lacks_kernel[key], _NOT_RUN
            return self._probe_default(key, args, kwargs)
        if key in self.choices:
            return self.choices[key][0], _NOT_RUN
        return self._autotune(key, args, kwargs)

    def _probe_default(self, key, args, kwargs):
        """Runs TF's default kernels once; XLA if they lack an op."""
        try:
            result, use_xla = self._get(key, False)(*args, **kwargs), False
        except (tf.errors.InvalidArgumentError,
                tf.errors.UnimplementedError) as e:
            if not any(m in str(e) for m in _NO_CPU_KERNEL):
                raise
            # E.g. input gradients of grouped convolutions: TF has no CPU
            # kernel for them on some CPUs; XLA compiles them.
            logging.warning("%s: TF default kernels cannot run this (%s); "
                            "using XLA for it.", self.name,
                            str(e).splitlines()[0])
            self._traced.pop((key, False), None)
            result, use_xla = self._get(key, True)(*args, **kwargs), True
        self._default_lacks_kernel[key] = use_xla
        return use_xla, result

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
        disk_key = f"{self.name}|{key}|{_machine()}"
        remembered = _load_choices().get(disk_key)
        if remembered is not None:
            self.choices[key] = (bool(remembered), float("nan"), float("nan"))
            return bool(remembered), _NOT_RUN
        try:
            result, t_default = self._time(self._get(key, False), args, kwargs)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
                tf.errors.InternalError) as e:
            # E.g. gradients of grouped convolutions w.r.t. their input have
            # no TF CPU kernel; XLA has one.
            logging.warning("%s: TF default kernels failed (%s); using XLA.",
                            self.name, str(e).splitlines()[0])
            self._traced.pop((key, False), None)
            self.choices[key] = (True, float("inf"), float("nan"))
            _store_choice(disk_key, True)
            return True, _NOT_RUN
        try:
            result_xla, t_xla = self._time(self._get(key, True), args, kwargs)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
                tf.errors.InternalError) as e:
            logging.warning("%s: XLA compilation failed (%s); using TF default "
                            "kernels.", self.name, str(e).splitlines()[0])
            t_xla = float("inf")
        use_xla = t_xla < t_default
        self.choices[key] = (use_xla, t_default, t_xla)
        self._traced.pop((key, not use_xla), None)
        _store_choice(disk_key, use_xla)
        logging.info("%s: TF default kernels %.2f ms, XLA %.2f ms -> %s",
                     self.name, 1e3 * t_default, 1e3 * t_xla,
                     "XLA" if use_xla else "default kernels")
        # Return what the chosen path computes, so the first call agrees
        # with every later one.
        return use_xla, (result_xla if use_xla else result)


def compile_fn(fn: Callable, jit_compile=None, name: str | None = None, *,
               stochastic: bool = False) -> CompiledFunction:
    """Compiles a pure TensorFlow function with XLA or TF's kernels.

    Args:
      fn: a pure function of tensors (and hashable Python values).
      jit_compile: ``True``, ``False``, ``"auto"`` or ``None`` (environment
        default, see module docstring).
      name: a name for log messages.
      stochastic: ``True`` for code whose result must not depend on a
        timing: ``"auto"`` then resolves by :func:`stochastic_jit`, never
        by measurement.

    Returns:
      A :class:`CompiledFunction`.

    Example:
      >>> f = compile_fn(lambda a, b: tf.matmul(a, b), jit_compile="auto")
      >>> f(tf.ones([4, 4]), tf.ones([4, 4])).shape
      TensorShape([4, 4])
    """
    return CompiledFunction(fn, jit_compile, name, stochastic=stochastic)
