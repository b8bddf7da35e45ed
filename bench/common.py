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

