"""Expected-gradient throughput: vectorised ensemble call vs the original loops.

Measures, in one process, on the same weights and inputs:

(a) ours: ``expected_loss_gradient`` over the whole ensemble in one compiled
    call, timed with XLA, with TF's default kernels, and in the default
    ``auto`` mode (which measures both and keeps the faster); the ratios use
    the auto mode, what a user gets;
(b) the original code's way: a Python loop over test images and posterior
    samples, one compiled single-image, single-sample gradient call each.
    Only a subset of the calls is timed and the total extrapolated linearly
    (the calls are identical in cost); the output says so;
(b') a loop over posterior samples with the images batched: not a target,
    it separates the gain of batching from that of vectorising over S;
(c) the machine's fp32 matmul throughput, the ceiling.

FLOPs of one ensemble gradient = 2 x forward FLOPs x S x B (the forward pass
plus the backward pass to the *inputs*, which costs as much again; weight
gradients are never formed).

Run: ``python -m bench.expected_gradient [--json]``.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags

from bench import common

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-order
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-order

from tfp_bnn_adv import gradients  # pylint: disable=g-import-not-at-top
from tfp_bnn_adv import models
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.network import Network

flags.adopt_module_key_flags(common)  # --json in every --help

CASES = {
    # name: (keras model builder, S, B)
    "mlp": (lambda: models.mlp((28, 28, 1), 10, (512, 512)), 100, 128),
    "cnn": (lambda: models.cnn((28, 28, 1), 10, (32, 64)), 20, 64),
}


def _single_grad_fn(network: Network):
    """The original code's unit of work: one image, one weight set."""

    @tf.function(jit_compile=True)
    def grad(params, x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = network.apply(params, x)
            loss = tf.reduce_sum(
                tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        return tape.gradient(loss, x)

    return grad


def _loop_per_image_and_sample(network, params, x, y, max_calls):
    """(b): S x B compiled calls; returns (extrapolated seconds, timed calls)."""
    fn = _single_grad_fn(network)
    s, b = params[0].shape[0], x.shape[0]
    per_sample = [[p[i] for p in params] for i in range(s)]
    xs = [x[j:j + 1] for j in range(b)]
    ys = [y[j:j + 1] for j in range(b)]
    common.block(fn(per_sample[0], xs[0], ys[0]))  # compile
    pairs = [(i, j) for j in range(b) for i in range(s)]
    timed = pairs[:max_calls]
    start = time.perf_counter()
    acc = tf.zeros_like(xs[0])
    for i, j in timed:
        acc = fn(per_sample[i], xs[j], ys[j])
    common.block(acc)
    seconds = time.perf_counter() - start
    return seconds * len(pairs) / len(timed), len(timed), len(pairs)


def _loop_per_sample_batched(network, params, x, y):
    """(b'): one compiled call per posterior sample, all images batched."""
    fn = _single_grad_fn(network)
    s = params[0].shape[0]
    per_sample = [[p[i] for p in params] for i in range(s)]

    def run():
        total = tf.zeros_like(x)
        for i in range(s):
            total += fn(per_sample[i], x, y)
        return total / s

    return common.time_call(run, repeats=3)


def run_case(name: str, max_loop_calls: int) -> dict:
    build, s, b = CASES[name]
    network = Network.from_keras(build())
    ens = PosteriorEnsemble(network, network.init_params(seed=0, num_samples=s))
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(size=(b, 28, 28, 1)).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, size=b).astype(np.int32))
    flops = 2 * network.flops_per_example() * s * b
    out = {}
    for label, jit in (("xla", True), ("default_kernels", False), ("auto", None)):
        common.log(f"{name}: ours ({label})")
        seconds = common.time_call(lambda jit=jit: gradients.expected_loss_gradient(
            ens, x, y, jit_compile=jit), repeats=5)
        out[f"{name}_ours_{label}_s"] = seconds
    # "Ours" is what a user gets: the default (auto) mode.
    ours = out[f"{name}_ours_auto_s"]
    out[f"{name}_ours_s"] = ours
    common.log(f"{name}: loop over images x samples (subset)")
    loop_s, timed, total = _loop_per_image_and_sample(
        network, ens.params, x, y, max_loop_calls)
    out[f"{name}_loop_s_extrapolated"] = loop_s
    out[f"{name}_loop_calls_timed"] = f"{timed} of {total} (extrapolated linearly)"
    common.log(f"{name}: loop over samples, images batched")
    out[f"{name}_batched_loop_s"] = _loop_per_sample_batched(
        network, ens.params, x, y)
    out[f"{name}_gflops"] = flops / ours / 1e9
    out[f"{name}_speedup_vs_loop"] = loop_s / ours
    out[f"{name}_speedup_vs_batched_loop"] = out[f"{name}_batched_loop_s"] / ours
    return out


def main(argv) -> None:
    del argv
    common.log("matmul ceiling")
    peak = common.matmul_peak_gflops()
    results = {"matmul_peak_gflops": peak["gflops"]}
    for name in CASES:
        case = run_case(name, max_loop_calls=1000)
        case[f"{name}_fraction_of_matmul_peak"] = (
            case[f"{name}_gflops"] / peak["gflops"])
        results.update(case)
    results.update(common.machine_info())
    common.report(results, common.FLAGS.json)


if __name__ == "__main__":
    app.run(main)
