"""Benchmark: data-parallel HMC throughput on 1 device against R devices.

One process runs the same full-batch HMC (same network, data, seed, fixed
step size, no adaptation) three ways and reports steady-state leapfrog steps
per second (best segment after the first, so compilation is excluded):

* ``single``: one device, no strategy (the baseline);
* ``data``: ``MirroredStrategy`` over R devices, the training set split
  across replicas, log-likelihood and gradient summed by an all-reduce;
* ``chains``: the same strategy, the chains split across replicas.

On a CPU-only host the R devices are *logical* CPUs (``--devices``) sharing
the same cores, so the ideal ratio is 1.0 and the figure measures what
sharding costs (the all-reduce, the per-replica dispatch).  On a host with
GPUs the strategy spans them, and the ratio is the real scaling.

Usage: ``python -m bench.scaling [--json] [--devices 2] [--num_train 10000]``.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from bench import common
from tfp_bnn_adv import data
from tfp_bnn_adv import distribute
from tfp_bnn_adv import models
from tfp_bnn_adv.inference import hmc

flags.adopt_module_key_flags(common)  # --json in every --help


def run(model, x, y, *, strategy, parallelism, num_chains, iterations,
        segments, num_leapfrog_steps, step_size, jit_compile):
    """Steady-state leapfrog steps/s (per chain) and the samples."""
    rates = []
    start = time.perf_counter()
    ens, diag = hmc.sample(
        model, x, y, num_chains=num_chains, num_burnin_steps=0,
        num_adaptation_steps=0, num_results=iterations, step_size=step_size,
        num_leapfrog_steps=num_leapfrog_steps, seed=0, jit_compile=jit_compile,
        checkpoint_every=iterations // segments, strategy=strategy,
        parallelism=parallelism,
        segment_callback=lambda info: rates.append(info["leapfrogs_per_second"]))
    return {"leapfrogs_per_second": max(rates[1:]),
            "total_seconds": time.perf_counter() - start,
            "acceptance": float(np.mean(diag.acceptance_rate)),
            "params": ens.params}


FLAGS = flags.FLAGS
flags.DEFINE_integer("devices", 2, "logical CPU devices on a host without "
                     "GPUs")
flags.DEFINE_integer("num_train", 10000, "Fashion-MNIST training points")
flags.DEFINE_integer("hidden", 256, "hidden width of the MLP")
flags.DEFINE_integer("num_chains", 2, "HMC chains")
flags.DEFINE_integer("iterations", 8, "HMC iterations")
flags.DEFINE_integer("segments", 4, "compiled segments the iterations run in")
flags.DEFINE_integer("num_leapfrog_steps", 10, "leapfrog steps per "
                     "iteration")
flags.DEFINE_enum("jit", "default", ["xla", "default"],
                  "compiler of the single-device run and of each replica's "
                  "likelihood (fixed, so the paths compare)")


def main(argv):
    del argv
    args = FLAGS
    if not tf.config.list_physical_devices("GPU"):
        distribute.configure_logical_cpus(args.devices)
    strategy = distribute.get_strategy("mirrored")
    r = strategy.num_replicas_in_sync
    jit = args.jit == "xla"

    try:
        ds = data.fashion_mnist().subset(num_train=args.num_train, seed=0)
        x, y, source = ds.train_x, ds.train_y, "fashion_mnist"
    except (OSError, ValueError, RuntimeError) as e:
        common.log(f"Fashion-MNIST unavailable ({e}); using random data")
        rng = np.random.RandomState(0)
        x = rng.rand(args.num_train, 28, 28, 1).astype(np.float32)
        y = rng.randint(0, 10, args.num_train)
        source = "random"
    model = models.mlp(x.shape[1:], 10, hidden=(args.hidden,))
    settings = dict(num_chains=args.num_chains, iterations=args.iterations,
                    segments=args.segments, step_size=1e-4,
                    num_leapfrog_steps=args.num_leapfrog_steps,
                    jit_compile=jit)
    results = dict(common.machine_info())
    results.update(load_average_1min=os.getloadavg()[0], data=source,
                   num_train=len(x), hidden=args.hidden, replicas=r,
                   devices=[d for d in strategy.extended.worker_devices],
                   jit=args.jit, num_chains=args.num_chains)
    common.log(f"single device, {len(x)} points, hidden {args.hidden}")
    single = run(model, x, y, strategy=None, parallelism="data", **settings)
    results["single_leapfrogs_per_s"] = single["leapfrogs_per_second"]
    for mode in ("data", "chains"):
        if mode == "chains" and args.num_chains % r:
            continue
        common.log(f"{r} replicas, {mode}-parallel")
        out = run(model, x, y, strategy=strategy, parallelism=mode, **settings)
        results[f"{mode}_leapfrogs_per_s"] = out["leapfrogs_per_second"]
        results[f"{mode}_speedup_vs_single"] = (out["leapfrogs_per_second"] /
                                                single["leapfrogs_per_second"])
        # The same seed gives the same chain on 1 and R devices.
        results[f"{mode}_max_abs_diff_vs_single"] = max(
            float(np.abs(a - b).max())
            for a, b in zip(out["params"], single["params"]))
    results["load_average_1min_end"] = os.getloadavg()[0]
    common.report(results, args.json)


if __name__ == "__main__":
    app.run(main)
