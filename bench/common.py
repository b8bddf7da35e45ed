"""Shared benchmark utilities: timing, the matmul ceiling, and the report.

Benchmarks are not tests: they run a baseline side by side with our code in
the same process and report ratios, so machine speed cancels out.

Every benchmark is an absl script, like the launch scripts: its options are
flags defined at its module level, ``main(argv)`` runs it under
``app.run``, and ``--json`` (defined here, for all of them) adds one JSON
line with the figures.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS

flags.DEFINE_bool("json", False, "print one JSON object with the figures as "
                  "the last line of output")


def block(result) -> None:
    """Waits for every tensor in ``result`` (forces async execution)."""
    for t in tf.nest.flatten(result):
        if hasattr(t, "numpy"):
            t.numpy()


def time_call(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1
              ) -> float:
    """Best-of-``repeats`` wall time of ``fn()`` in seconds, after warm-up."""
    for _ in range(warmup):
        block(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn())
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_gflops(sizes=(1024, 2048), repeats: int = 5) -> dict:
    """The machine's fp32 matmul throughput: the ceiling for dense work.

    Times square matmuls with and without XLA and returns the best, so a
    "fraction of peak" is measured against what this machine really does.

    Returns:
      dict with ``gflops`` (best) and per-configuration figures.
    """
    results = {}
    for n in sizes:
        a = tf.random.stateless_normal([n, n], seed=[1, 2])
        b = tf.random.stateless_normal([n, n], seed=[3, 4])
        for jit in (True, False):
            fn = tf.function(tf.matmul, jit_compile=jit)
            reps = max(3, int(4e10 / (2 * n ** 3)))

            def run(fn=fn, reps=reps):
                out = None
                for _ in range(reps):
                    out = fn(a, b)
                return out

            seconds = time_call(run, repeats=repeats) / reps
            results[f"n{n}_{'xla' if jit else 'default'}"] = 2 * n ** 3 / seconds / 1e9
    return {"gflops": max(results.values()), "by_config": results}


def shared_weight_ceiling(network, params, x, y, repeats: int = 5) -> dict:
    """The same work with one weight set: the honest limit of an ensemble gradient.

    An ensemble's expected input gradient over ``S`` weight sets and ``B``
    inputs costs the FLOPs of one network's forward pass and input gradient
    on ``S * B`` inputs.  With a single weight set those FLOPs are ordinary
    big matmuls and convolutions, no per-sample kernels: no ensemble
    gradient of these shapes can beat it.  Timed with XLA and with TF's
    kernels; the faster is the ceiling.

    Args:
      network: the :class:`~tfp_bnn_adv.network.Network`.
      params: the ensemble's stack ``[S, ...]`` (sample 0 is used).
      x, y: the batch ``[B, ...]`` and labels ``[B]``.

    Returns:
      dict with ``seconds`` (the ceiling), ``path`` (``"xla"`` or
      ``"default_kernels"``, which was faster), ``by_path`` and ``call``
      (runs the faster one, for :func:`paired_fraction`).
    """
    s = int(params[0].shape[0])
    one = [p[:1] for p in params]
    xs = tf.tile(tf.convert_to_tensor(x), [s] + [1] * (len(x.shape) - 1))
    ys = tf.tile(tf.convert_to_tensor(y), [s])

    def grad(w, xx, yy):
        with tf.GradientTape() as tape:
            tape.watch(xx)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                yy, network.apply_stack(w, xx)[0]))
        return tape.gradient(loss, xx)

    fns = {label: tf.function(grad, jit_compile=jit)
           for label, jit in (("xla", True), ("default_kernels", False))}
    by_path = {label: time_call(lambda fn=fn: fn(one, xs, ys), repeats=repeats)
               for label, fn in fns.items()}
    best = min(by_path, key=by_path.get)
    return {"seconds": by_path[best], "path": best, "by_path": by_path,
            "call": lambda: fns[best](one, xs, ys)}


def paired_fraction(ours: Callable[[], Any], ceiling: Callable[[], Any],
                    rounds: int = 7, repeats: int = 3) -> dict:
    """Ceiling time / our time, robust to a machine whose speed drifts.

    On a shared VM the same call's time moves by 20% from one minute to the
    next, more than the differences measured.  Each round times the ceiling
    and ours back to back (best of ``repeats`` each) and takes their ratio;
    the median over ``rounds`` is reported, with the spread.

    Returns:
      dict with ``fraction`` (median), ``fraction_min``, ``fraction_max``.
    """
    ratios = sorted(time_call(ceiling, repeats=repeats, warmup=0)
                    / time_call(ours, repeats=repeats, warmup=0)
                    for _ in range(rounds))
    return {"fraction": float(np.median(ratios)), "fraction_min": ratios[0],
            "fraction_max": ratios[-1]}


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource  # pylint: disable=g-import-not-at-top
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_mb(fn: Callable[[], Any]) -> dict:
    """Peak memory one call of ``fn`` allocates, in MB, on the device it runs on.

    TensorFlow's allocator statistics (``tf.config.experimental.
    get_memory_info``) of the first GPU, else of the CPU where its kernels
    are oneDNN's (whose allocator counts every tensor): the peak during the
    call, after a reset, minus what was allocated before it.  Buffers XLA's
    CPU runtime allocates itself are not counted there.  Where the
    statistics are unavailable or partial (TF's Eigen CPU allocator counts
    almost nothing: 0.01 MB for a call that needs 200), the process's
    resident set size is sampled every millisecond during the call instead
    (``memory_kind`` says which), which misses memory the allocator reuses
    from earlier calls.
    """
    from tfp_bnn_adv import xla  # pylint: disable=g-import-not-at-top
    gpus = tf.config.list_logical_devices("GPU")
    device = gpus[0].name if gpus else "CPU:0"
    if gpus or xla.tf_kernels_are_onednn():
        try:
            tf.config.experimental.reset_memory_stats(device)
            before = tf.config.experimental.get_memory_info(device)["current"]
            block(fn())
            peak = tf.config.experimental.get_memory_info(device)["peak"]
            return {"peak_memory_mb": (peak - before) / 2**20,
                    "memory_kind":
                        f"tf_allocator_peak_{'gpu' if gpus else 'cpu'}"}
        except (ValueError, RuntimeError):
            pass
    import threading  # pylint: disable=g-import-not-at-top
    start = _rss_bytes()
    high = [start]
    done = threading.Event()

    def sample():
        while not done.is_set():
            high[0] = max(high[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        block(fn())
    finally:
        done.set()
        thread.join()
    high[0] = max(high[0], _rss_bytes())
    return {"peak_memory_mb": (high[0] - start) / 2**20, "memory_kind": "cpu_rss"}


def cpu_model() -> str:
    """The CPU's model name (``platform.processor()`` is empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info() -> dict:
    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "processor": platform.processor(), "cpu_model": cpu_model()}


def report(results: dict, as_json: bool) -> None:
    """Prints the figures; with ``as_json`` also one JSON line at the end."""
    width = max(len(k) for k in results)
    for k, v in results.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        print(f"{k:<{width}}  {v}")
    if as_json:
        print(json.dumps(results, sort_keys=True, default=float))
    sys.stdout.flush()


def table(rows: list, header: list) -> None:
    """Prints ``rows`` (lists of values, one per ``header`` column) aligned."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row]
             for row in [header] + rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))
    sys.stdout.flush()


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)

