"""PGD-40 with the expected gradient: compiled and batched vs the original loop.

The case: PGD-40 (L-inf, eps=0.1, expected loss gradient) on 1000
Fashion-MNIST test images against a 100-sample MLP ensemble 784-512-512-10.
The weights are random draws from the layers' initialisers
(``Network.init_params``): the speed of an attack does not depend on what the
weights are, only on their shapes.

Baseline, measured in the same run: the way the original code worked, one
compiled call per image, per posterior sample and per step (each call the
cross-entropy gradient of one weight set at one image), averaged and stepped
in Python.  Timing all 4 million calls would take most of an hour, so the loop
attacks a few images and its time is extrapolated linearly to 1000 images
(every image costs the same: 40 x 100 calls).

Reported: wall time of both, the speedup, and the fraction of the machine's
fp32 matmul peak the attack reaches, counting
``steps x S x N x 2 x forward FLOPs`` (a forward pass plus the input-gradient
backward pass, which costs about as much as the forward).

Usage: ``python -m bench.attack [--json] [--batch_size 125] [--sweep]``.
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
import numpy as np

from bench import common  # sets TF's log level before TF is imported
import tensorflow as tf  # pylint: disable=wrong-import-order

from tfp_bnn_adv import attacks
from tfp_bnn_adv import data
from tfp_bnn_adv import models
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.network import Network

flags.adopt_module_key_flags(common)  # --json in every --help

NUM_IMAGES = 1000
NUM_SAMPLES = 100
STEPS = 40
EPS = 0.1
HIDDEN = (512, 512)

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 125, "images per compiled attack call")
flags.DEFINE_integer("chunk_size", None, "posterior samples per chunk "
                     "(default: the ensemble's choice)")
flags.DEFINE_enum("jit", "xla", ["xla", "default", "auto"],
                  "our compiler choice")
flags.DEFINE_integer("loop_images", 2, "images the per-call loop attacks "
                     "before extrapolating")
flags.DEFINE_bool("sweep", False, "also time batch size / chunk size / XLA "
                  "choices")


def make_case(num_samples: int = NUM_SAMPLES):
    net = Network.from_keras(models.mlp((28, 28, 1), 10, hidden=HIDDEN))
    ens = PosteriorEnsemble(net, net.init_params(seed=0, num_samples=num_samples))
    ds = data.fashion_mnist()
    return ens, ds.test_x[:NUM_IMAGES], ds.test_y[:NUM_IMAGES]


def run_pgd(ens, x, y, steps, batch_size, chunk_size, jit):
    return attacks.pgd(ens, x, y, eps=EPS, steps=steps, gradient="expected",
                       batch_size=batch_size, chunk_size=chunk_size,
                       jit_compile=jit)


def time_pgd(ens, x, y, batch_size, chunk_size, jit) -> float:
    """Seconds for the full PGD-40, after compiling on one batch.

    ``steps`` is a tensor argument of the compiled function, so a 1-step call
    on one batch compiles (and, in "auto" mode, chooses XLA or not) for the
    same signature the full run uses.
    """
    run_pgd(ens, x[:batch_size], y[:batch_size], 1, batch_size, chunk_size, jit)
    return common.time_call(
        lambda: run_pgd(ens, x, y, STEPS, batch_size, chunk_size, jit),
        repeats=1, warmup=0)


def loop_pgd_seconds(ens, x, y, num_images: int) -> float:
    """The original code's loop on ``num_images`` images, in seconds."""
    net = ens.network
    samples = [[p[s] for p in ens.params] for s in range(ens.num_samples)]

    @tf.function(jit_compile=True)
    def grad_one(params, xi, yi):
        with tf.GradientTape() as tape:
            tape.watch(xi)
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
                yi, net.apply(params, xi))
        return tape.gradient(ce, xi)

    step_size = 2.5 * EPS / STEPS
    grad_one(samples[0], tf.constant(x[:1]), tf.constant(y[:1]))  # compile
    start = time.perf_counter()
    for i in range(num_images):
        x0 = x[i:i + 1]
        yi = tf.constant(y[i:i + 1])
        xa = np.clip(x0 + np.random.default_rng(i).uniform(-EPS, EPS, x0.shape),
                     0, 1).astype(np.float32)
        for _ in range(STEPS):
            xt = tf.constant(xa)
            g = np.mean([grad_one(p, xt, yi).numpy() for p in samples], axis=0)
            xa = np.clip(np.clip(xa + step_size * np.sign(g), x0 - EPS, x0 + EPS),
                         0, 1).astype(np.float32)
    return time.perf_counter() - start


def sweep(ens, x, y) -> dict:
    """GFLOP/s of PGD on 500 images for batch size, chunk size and XLA choices.

    Per configuration: best-of-2 times of a 1-step and a 4-step attack; the
    difference is three steps without the fixed costs.
    """
    out = {}
    xs, ys = x[:500], y[:500]
    flops_per_step = ens.num_samples * len(xs) * 2 * ens.network.flops_per_example()
    for jit in (True, False):
        for batch_size, chunk_size in ((125, None), (250, None), (500, None),
                                       (250, 25), (500, 25)):
            run_pgd(ens, xs[:batch_size], ys[:batch_size], 1, batch_size,
                    chunk_size, jit)
            t1, t4 = (common.time_call(lambda steps=steps: run_pgd(
                ens, xs, ys, steps, batch_size, chunk_size, jit), repeats=2,
                warmup=0) for steps in (1, 4))
            key = (f"sweep/{'xla' if jit else 'default'}/b{batch_size}/"
                   f"c{chunk_size or 'auto'}/gflops")
            out[key] = flops_per_step / max((t4 - t1) / 3, 1e-9) / 1e9
            common.log(f"{key}: {out[key]:.1f}")
    return out


def main(argv) -> None:
    del argv
    args = FLAGS
    jit = {"xla": True, "default": False, "auto": "auto"}[args.jit]

    ens, x, y = make_case()
    batch, chunk = ens.batch_and_chunk(NUM_IMAGES, args.batch_size,
                                       args.chunk_size)
    common.log(f"PGD-{STEPS} on {NUM_IMAGES} images, S={NUM_SAMPLES}, "
               f"batch {batch}, chunk {chunk}, jit={args.jit}")
    # On a shared machine the ceiling moves: measure it on both sides of the
    # attack and keep the higher, so the fraction is not flattered.
    peak_before = common.matmul_peak_gflops()["gflops"]
    seconds = time_pgd(ens, x, y, batch, args.chunk_size, jit)
    peak = max(peak_before, common.matmul_peak_gflops()["gflops"])
    flops = STEPS * NUM_SAMPLES * NUM_IMAGES * 2 * ens.network.flops_per_example()
    gflops = flops / seconds / 1e9
    common.log(f"PGD: {seconds:.1f} s, {gflops:.1f} GFLOP/s")

    common.log(f"loop baseline on {args.loop_images} images")
    loop_seconds = loop_pgd_seconds(ens, x, y, args.loop_images)
    loop_total = loop_seconds * NUM_IMAGES / args.loop_images
    common.log(f"loop: {loop_seconds:.1f} s for {args.loop_images} images -> "
               f"{loop_total:.0f} s extrapolated")

    results = {
        "case": (f"PGD-{STEPS} expected gradient, {NUM_IMAGES} Fashion-MNIST "
                 f"images, S={NUM_SAMPLES} MLP 784-512-512-10 (random weights)"),
        "pgd_seconds": seconds,
        "loop_seconds_measured": loop_seconds,
        "loop_images_measured": args.loop_images,
        "loop_seconds_extrapolated": loop_total,
        "pgd_speedup_vs_loop": loop_total / seconds,
        "pgd_gflops": gflops,
        "matmul_peak_gflops": peak,
        "pgd_fraction_of_matmul_peak": gflops / peak,
        "batch_size": batch,
        "chunk_size": chunk,
        "jit": args.jit,
        "load_average_1min": os.getloadavg()[0],
        **common.machine_info(),
    }
    if args.sweep:
        results.update(sweep(ens, x, y))
    common.report(results, args.json)


if __name__ == "__main__":
    app.run(main)
