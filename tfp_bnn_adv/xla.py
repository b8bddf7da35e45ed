"""Compile hot functions with or without XLA.

Every hot function in the package is XLA-compilable, because GPUs and TPUs
need it.  On CPU, XLA is not always the fastest, and which path wins depends
on the function and the CPU.  The default mode comes from the environment
variable ``TFP_BNN_ADV_JIT`` (``auto``, ``xla`` or ``default``) and is
``auto`` when unset.

**Nothing is timed.**  The path ``"auto"`` takes is a function of the
function's graph, the platform and the environment alone, so the same call
with the same seed gives the same bits whatever ran before it in the process
or on the machine (no timing, no cache).  With a GPU or TPU visible,
``"auto"`` is XLA.  On a CPU-only host (:func:`auto_path`):

* **Stochastic code** (HMC, the random attack, the Square Attack,
  ``gradient="sample"``, anything whose result is a chaotic function of
  its inputs; :func:`compile_fn`'s ``stochastic``) runs on TF's default
  kernels: a short HMC run of a 2-8-2 MLP took 50 s under XLA against
  14 s, nearly all of it compiling.
* **Deterministic code** (predictions, gradients, FGSM, PGD, APGD) runs on
  TF's kernels when its graph holds a convolution or TF's kernels are
  oneDNN's with AVX-512 here (:func:`tf_kernels_use_avx512`), and under XLA
  otherwise.  Measured (``bench/`` and the
  README's performance section): on an AVX-512 Xeon TF's kernels were as
  fast as XLA or faster for every MLP, CNN and attack timed (grouped
  convolutions 3x), while with the CPU's kernels held to AVX2 (a Zen 3, or
  ``ONEDNN_MAX_CPU_ISA=AVX2``) XLA ran MLP gradients and attacks 1.2-1.9x
  faster and TF's kernels still won on convolutions.

Where TF's CPU kernels lack an op (grouped convolutions' gradients on some
CPUs), the function runs under XLA, and where XLA cannot compile it (a
``tf.numpy_function``), on TF's kernels: both are properties of the
function and the platform, not timings.  :attr:`CompiledFunction.paths`
records the path of each input signature and why; :func:`path_name` names
a path for a run's records.

Random draws do not depend on the path either: every sampler in the package
draws integer bits with Philox, identical on both, and maps them to floats
with ordinary arithmetic (:mod:`tfp_bnn_adv.seeds`).  What remains between
the two paths is rounding in that arithmetic and in the model itself (about
1e-6 relative in float32), which a long HMC chain amplifies; so a result is
reproducible bit for bit on the same path, platform and TensorFlow build,
and statistically equivalent across paths.
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
import threading
from typing import Any, Callable
import weakref

from absl import logging
import tensorflow as tf

__all__ = ["compile_fn", "resolve_jit", "stochastic_jit", "deterministic_jit",
           "auto_path",
           "path_name", "has_accelerator", "tf_kernels_are_onednn",
           "tf_kernels_use_avx512",
           "cached_function", "CACHE_SIZE"]

_ENV = "TFP_BNN_ADV_JIT"
_TRACE_IDS = itertools.count()
# Errors of TF CPU kernels that XLA does not share: grouped convolutions'
# gradients are missing on some CPUs ("not supported on CPU", or a filter
# gradient that asks for the ungrouped filter size).
_NO_CPU_KERNEL = ("not supported on CPU", "Conv2DBackprop")
# "This call's output was not computed while choosing its path."
_NOT_RUN = object()
# Op types that make a graph "convolutional" for auto_path.
_CONV_OPS = ("Conv2D", "Conv3D", "DepthwiseConv2dNative", "Conv",
             "_FusedConv2D")
_MODES = {"auto": "auto", "xla": True, "true": True, "1": True,
          "default": False, "false": False, "0": False}


def in_xla_context() -> bool:
    """Whether the graph being traced compiles with XLA (a
    ``jit_compile=True`` function, or a loop body inside one)."""
    try:
        from tensorflow.python.framework import ops  # pylint: disable=g-import-not-at-top
        from tensorflow.python.ops import control_flow_util  # pylint: disable=g-import-not-at-top
    except ImportError:  # a TensorFlow without these internals
        return True
    return bool(control_flow_util.GraphOrParentsInXlaContext(
        ops.get_default_graph()))


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
    jit_compile = _requested(jit_compile)
    if jit_compile == "auto" and has_accelerator():
        return True
    return jit_compile


def _requested(jit_compile):
    """``True``, ``False`` or ``"auto"``, before an accelerator turns
    ``"auto"`` into XLA (:func:`resolve_jit`)."""
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


def deterministic_jit(jit_compile: Any = None, *,
                      convolutional: bool) -> bool:
    """The compile path of deterministic code: ``True`` (XLA) or ``False``.

    A pinned ``jit_compile`` (or ``TFP_BNN_ADV_JIT``) as given; ``"auto"``
    by :func:`auto_path`, for a graph with (``convolutional``) or without a
    convolution.  What :class:`CompiledFunction` takes, before any fallback
    for an op one path lacks.
    """
    mode = resolve_jit(jit_compile)
    if mode == "auto":
        return auto_path(stochastic=False, convolutional=convolutional)
    return bool(mode)


def path_name(use_xla: bool) -> str:
    """``"xla"`` or ``"default"`` (TF's kernels), for a run's records."""
    return "xla" if use_xla else "default"


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# CPU features for which TensorFlow turns oneDNN on by default (x86 Linux,
# TF >= 2.9); without them its CPU kernels are Eigen's.
_ONEDNN_DEFAULT_FLAGS = frozenset({"avx512_vnni", "avx512_bf16", "avx_vnni",
                                   "amx_tile", "amx_int8", "amx_bf16"})


def tf_kernels_are_onednn() -> bool:
    """Whether TF's CPU kernels are oneDNN's on this host.

    On where ``TF_ENABLE_ONEDNN_OPTS`` says so (``1``/``0``), or, unset,
    where the CPU has a feature TensorFlow turns oneDNN on for
    (AVX512-VNNI, AVX512-BF16, AVX-VNNI, AMX).  Without oneDNN (a Zen 3, a
    Skylake-X) they are Eigen's, which lack grouped-convolution gradients.
    """
    env = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower()
    if env:
        return env in ("1", "true")
    return bool(_cpu_flags() & _ONEDNN_DEFAULT_FLAGS)


def tf_kernels_use_avx512() -> bool:
    """Whether TF's CPU kernels run oneDNN with AVX-512 on this host.

    Where they are oneDNN's (:func:`tf_kernels_are_onednn`), the CPU reports
    ``avx512f`` and ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) does
    not hold oneDNN below AVX-512.  A property of the machine and the
    environment.
    """
    if "avx512f" not in _cpu_flags() or not tf_kernels_are_onednn():
        return False
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA")
           or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").strip().upper()
    return isa in ("ALL", "DEFAULT") or "AVX512" in isa or "AMX" in isa


def auto_path(*, stochastic: bool, convolutional: bool) -> bool:
    """The path ``"auto"`` takes: ``True`` for XLA, ``False`` for TF's kernels.

    XLA with a GPU or TPU.  On a CPU-only host: TF's kernels for stochastic
    code and for graphs with a convolution; for the rest, TF's kernels where
    they use AVX-512 (:func:`tf_kernels_use_avx512`) and XLA where they do
    not (module docstring: the measurements behind the rule).
    """
    if has_accelerator():
        return True
    if stochastic or convolutional:
        return False
    return not tf_kernels_use_avx512()


def _is_convolutional(concrete) -> bool:
    """Whether a traced function's graph, or any function it calls (loop
    bodies, conditionals), holds a convolution."""
    graph_def = concrete.graph.as_graph_def()
    ops = {n.op for n in graph_def.node}
    for fdef in graph_def.library.function:
        ops.update(n.op for n in fdef.node_def)
    return any(op in _CONV_OPS or op.startswith("Conv2DBackprop")
               for op in ops)


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
    is rebuilt (and retraced), and takes the same path: nothing in the
    choice of path depends on what was built or timed before.

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


class CompiledFunction:
    """A pure function compiled with XLA or with TF's default kernels.

    Call it like the wrapped function.  ``mode`` is ``True`` (XLA),
    ``False`` (TF's kernels) or ``"auto"`` (:func:`auto_path`, decided per
    input signature from the traced graph).  ``paths`` maps each input
    signature called so far to ``(use_xla, reason)``; ``reason`` says why
    (``"pinned"``, ``"accelerator"``, ``"stochastic"``, ``"convolution"``,
    ``"avx512"``, ``"no avx512"``, ``"no TF kernel"``, ``"XLA cannot
    compile"``).
    """

    def __init__(self, fn: Callable, jit_compile=None, name: str | None = None,
                 *, stochastic: bool = False):
        if not isinstance(stochastic, bool):
            raise TypeError(f"stochastic must be a bool, got {stochastic!r}.")
        self.name = name or getattr(fn, "__name__", "fn")
        self.stochastic = stochastic
        if _requested(jit_compile) != "auto":
            self._reason = "pinned"
        else:
            self._reason = "accelerator" if has_accelerator() else "stochastic"
        self.mode = (stochastic_jit(jit_compile) if stochastic
                     else resolve_jit(jit_compile))
        self._fn = fn
        # One tf.function per input signature and path: each traces once, so
        # a study that calls with many ensemble sizes never retraces.
        self._traced: dict[tuple, Any] = {}
        self.paths: dict[tuple, tuple[bool, str]] = {}

    def uses_xla(self) -> bool:
        """Whether any call so far ran under XLA (pinned, by the rule, or
        because TF's kernels lacked an op)."""
        return (self.mode is True
                or any(use_xla for use_xla, _ in self.paths.values()))

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

        Decides (or recalls) the path for their signature first, running
        the function once if that takes a probe of TF's kernels.  Use it to
        run the same path on every replica of a strategy.
        """
        key = _signature(args, kwargs)
        return self._get(key, self._resolve(key, args, kwargs)[0])

    def _resolve(self, key, args, kwargs):
        """``(use_xla, result)`` for a signature; ``result`` is the call's
        output if finding the path ran it, else ``_NOT_RUN``."""
        if key in self.paths:
            return self.paths[key][0], _NOT_RUN
        if self.mode is True:
            self.paths[key] = (True, self._reason)
            return True, _NOT_RUN
        if self.mode is False:
            return self._run_default(key, args, kwargs, self._reason)
        # "auto" on a CPU-only host, deterministic code (resolve_jit made it
        # True with an accelerator; stochastic_jit never returns "auto").
        concrete = self._get(key, False).get_concrete_function(*args, **kwargs)
        convolutional = _is_convolutional(concrete)
        if auto_path(stochastic=False, convolutional=convolutional):
            return self._run_xla(key, args, kwargs, "no avx512")
        return self._run_default(key, args, kwargs,
                                 "convolution" if convolutional else "avx512")

    def _run_default(self, key, args, kwargs, reason):
        """Runs TF's default kernels once; XLA if they lack an op."""
        try:
            result = self._get(key, False)(*args, **kwargs)
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
            self.paths[key] = (True, "no TF kernel")
            return True, _NOT_RUN
        self.paths[key] = (False, reason)
        return False, result

    def _run_xla(self, key, args, kwargs, reason):
        """Runs XLA once; TF's kernels if XLA cannot compile the function."""
        try:
            result = self._get(key, True)(*args, **kwargs)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
                tf.errors.InternalError) as e:
            # E.g. a tf.numpy_function: no XLA kernel, on any machine.
            logging.warning("%s: XLA cannot compile this (%s); using TF "
                            "default kernels.", self.name,
                            str(e).splitlines()[0])
            self._traced.pop((key, True), None)
            return self._run_default(key, args, kwargs, "XLA cannot compile")
        self.paths[key] = (True, reason)
        return True, result


def compile_fn(fn: Callable, jit_compile=None, name: str | None = None, *,
               stochastic: bool = False) -> CompiledFunction:
    """Compiles a pure TensorFlow function with XLA or TF's kernels.

    Args:
      fn: a pure function of tensors (and hashable Python values).
      jit_compile: ``True``, ``False``, ``"auto"`` or ``None`` (environment
        default, see module docstring).
      name: a name for log messages.
      stochastic: ``True`` for code whose result is a chaotic function of
        its inputs (samplers, random attacks): ``"auto"`` then resolves by
        :func:`stochastic_jit` (TF's kernels on a CPU-only host).

    Returns:
      A :class:`CompiledFunction`.

    Example:
      >>> f = compile_fn(lambda a, b: tf.matmul(a, b), jit_compile="auto")
      >>> f(tf.ones([4, 4]), tf.ones([4, 4])).shape
      TensorShape([4, 4])
    """
    return CompiledFunction(fn, jit_compile, name, stochastic=stochastic)
