"""Expected-gradient throughput: vectorised ensemble call vs the original loops.

Measures, in one process, on the same weights and inputs:

(a) ours: ``expected_loss_gradient`` over the whole ensemble in one compiled
    call, timed with XLA, with TF's default kernels, and in the default
    ``auto`` mode (a fixed rule of the graph and the CPU, never a timing:
    :func:`tfp_bnn_adv.xla.auto_path`); the ratios use the auto mode, what a
    user gets; ``*_auto_path`` names the path it took and
    ``*_auto_fraction_of_best_path`` is the faster pinned path's time over
    auto's (1.0: the rule picked the faster path on this machine);
(b) the original code's way: a Python loop over test images and posterior
    samples, one compiled single-image, single-sample gradient call each.
    Only a subset of the calls is timed and the total extrapolated linearly
    (the calls are identical in cost); the output says so;
(b') a loop over posterior samples with the images batched: not a target,
    it separates the gain of batching from that of vectorising over S.
    ``*_batched_loop_s`` compiles each call with XLA, as the original code's
    unit of work; ``*_batched_loop_default_kernels_s`` runs it on TF's
    kernels, and ``*_speedup_vs_faster_batched_loop`` divides the faster of
    the two by ours;
(c) the machine's fp32 matmul throughput, and (c') the honest ceiling: the
    same work with one shared weight set (the network's forward pass and
    input gradient on ``S * B`` inputs: the same FLOPs as big matmuls and
    ordinary convolutions), best of XLA and TF's kernels, named in
    ``*_ceiling_path``; ``*_fraction_of_ceiling`` is ceiling time / ours
    (1.0: at the limit), the median over 7 rounds that time both back to
    back (the spread in ``*_fraction_of_ceiling_range``); ``*_peak_memory_mb`` is the peak memory one call of
    ours allocates, on TF's kernels (``*_memory_kind``: TensorFlow's
    allocator peak on a GPU or with oneDNN's CPU kernels, else the growth
    of the resident set: :func:`bench.common.peak_memory_mb`);
(d) the generic path (``Network.from_keras(..., path="generic")``: each
    layer's Keras ``stateless_call``, over ``S`` by ``tf.vectorized_map`` or
    ``tf.map_fn``) on the same Keras models, weights and inputs, timed as
    (a)'s auto mode; ``*_generic_fraction_of_fast`` is fast time / generic
    time (1.0: as fast), ``*_generic_vectorization`` says how ``S`` ran;
(e) a small ResNet (conv stem, two residual blocks with BatchNormalization,
    global average pooling) through whichever path ``from_keras`` takes,
    against per-sample Keras loops, as (b) and (b') for the MLP and CNN:
    ``resnet_speedup_vs_loop`` against the original code's loop, one
    compiled Keras ``stateless_call`` gradient per image and weight set (a
    subset timed, extrapolated); ``resnet_speedup_vs_batched_loop`` against
    one ``tf.function`` calling the Keras model once per weight set with the
    images batched, timed with and without XLA, the faster taken.  Before
    timing, ours is checked equal (allclose) to the batched loop under each
    compile mode, and in (d) the generic path to the fast one.

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

import keras  # pylint: disable=g-import-not-at-top,wrong-import-order
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-order
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-order

from tfp_bnn_adv import gradients  # pylint: disable=g-import-not-at-top
from tfp_bnn_adv import models
from tfp_bnn_adv import xla
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.network import Network

flags.adopt_module_key_flags(common)  # --json in every --help

CASES = {
    # name: (keras model builder, S, B)
    "mlp": (lambda: models.mlp((28, 28, 1), 10, (512, 512)), 100, 128),
    "cnn": (lambda: models.cnn((28, 28, 1), 10, (32, 64)), 20, 64),
}

RESNET_S, RESNET_B, RESNET_CHANNELS = 20, 64, 16


def resnet(input_shape=(28, 28, 1), num_classes: int = 10,
           channels: int = RESNET_CHANNELS, blocks: int = 2):
    """A small functional ResNet: conv stem, residual blocks, GAP, Dense.

    Stem ``Conv2D-BatchNormalization-ReLU``; each block
    ``Conv2D-BatchNormalization-ReLU-Conv2D-BatchNormalization``, added to
    its input, then ReLU; all convs 3x3 'same' with ``channels`` filters.

    Args:
      input_shape: ``(H, W, C)`` of one example.
      num_classes: number of logits ``C``.
      channels: filters of every conv.
      blocks: number of residual blocks.

    Returns:
      A built ``keras.Model`` mapping ``[B, H, W, C]`` to logits ``[B, C]``,
      with non-trivial BatchNormalization moving statistics (drawn from a
      fixed seed, so the constant state is exercised).
    """
    layers = keras.layers
    inputs = keras.Input(input_shape)

    def conv_bn(h):
        return layers.BatchNormalization()(
            layers.Conv2D(channels, 3, padding="same")(h))

    h = layers.ReLU()(conv_bn(inputs))
    for _ in range(blocks):
        r = conv_bn(layers.ReLU()(conv_bn(h)))
        h = layers.ReLU()(layers.Add()([h, r]))
    outputs = layers.Dense(num_classes)(layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, outputs, name="resnet")
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.1, shape).astype(np.float32))
            layer.moving_variance.assign(
                rng.uniform(0.5, 1.5, shape).astype(np.float32))
    return model


def _single_grad_fn(network: Network, jit_compile: bool = True):
    """The original code's unit of work: one image, one weight set."""

    @tf.function(jit_compile=jit_compile)
    def grad(params, x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = network.apply(params, x)
            loss = tf.reduce_sum(
                tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        return tape.gradient(loss, x)

    return grad


def _keras_single_grad_fn(keras_model):
    """(e)'s original-code unit of work: one image, one weight set, by Keras."""
    state = [tf.constant(v.numpy()) for v in keras_model.non_trainable_variables]

    @tf.function(jit_compile=True)
    def grad(params, x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits, _ = keras_model.stateless_call(params, state, x, training=False)
            loss = tf.reduce_sum(
                tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        return tape.gradient(loss, x)

    return grad


def _loop_per_image_and_sample(fn, params, x, y, max_calls):
    """(b): S x B compiled calls of ``fn``; (extrapolated seconds, timed calls)."""
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


def _loop_per_sample_batched(network, params, x, y, jit_compile: bool = True):
    """(b'): one compiled call per posterior sample, all images batched."""
    fn = _single_grad_fn(network, jit_compile)
    s = params[0].shape[0]
    per_sample = [[p[i] for p in params] for i in range(s)]

    def run():
        total = tf.zeros_like(x)
        for i in range(s):
            total += fn(per_sample[i], x, y)
        return total / s

    return common.time_call(run, repeats=3)


def _inputs(b: int):
    """Fixed images ``[b, 28, 28, 1]`` in [0, 1] and labels ``[b]``."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(size=(b, 28, 28, 1)).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, size=b).astype(np.int32))
    return x, y


def _check_same(name: str, ours, reference, what: str) -> float:
    """Max abs difference of two gradients; raises unless they agree.

    Two orders of the same float32 arithmetic agree to rounding (~1e-6 of
    the gradient's scale), except where a (leaky) ReLU pre-activation lies
    within rounding of zero: there the two can take different sides and
    change that one example's gradient by far more (seen here: 4e-3 of the
    scale on the ResNet, XLA against float64, in both the package and the
    Keras loop; on the MLP, whole-example differences in 2 of 128 examples
    between two matmul orders, each matching float64 elsewhere).  So every
    example but at most ``max(2, 5%)`` must be allclose, which a wrong
    gradient (every example differs) cannot pass.
    """
    ours, reference = np.asarray(ours), np.asarray(reference)
    scale = float(np.abs(reference).max())
    diff = float(np.abs(ours - reference).max())
    close = np.isclose(ours, reference, rtol=1e-3, atol=1e-4 * scale)
    bad = int(np.sum(~close.reshape(close.shape[0], -1).all(axis=1)))
    if bad > max(2, int(0.05 * close.shape[0])):
        raise RuntimeError(f"{name}: gradient differs from {what} in {bad} of "
                           f"{close.shape[0]} examples: max abs difference "
                           f"{diff:.3g} (gradient scale {scale:.3g}); the "
                           "timing would compare different work.")
    return diff


def _generic_case(name: str, keras_model, fast_ens, x, y, fast_seconds: float
                  ) -> dict:
    """(d): the same model, weights and inputs on the generic path."""
    network = Network.from_keras(keras_model, path="generic")
    ens = PosteriorEnsemble(network, fast_ens.params)
    mode = network.vectorization
    common.log(f"{name}: generic path ({mode}), auto")
    diff = _check_same(
        name, gradients.expected_loss_gradient(ens, x, y, jit_compile=False),
        gradients.expected_loss_gradient(fast_ens, x, y, jit_compile=False),
        "the fast path's")
    seconds = common.time_call(
        lambda: gradients.expected_loss_gradient(ens, x, y), repeats=5)
    return {f"{name}_generic_vectorization": mode,
            f"{name}_generic_s": seconds,
            f"{name}_generic_max_abs_diff": diff,
            f"{name}_generic_fraction_of_fast": fast_seconds / seconds}


def run_case(name: str, max_loop_calls: int) -> dict:
    build, s, b = CASES[name]
    keras_model = build()
    network = Network.from_keras(keras_model)
    ens = PosteriorEnsemble(network, network.init_params(seed=0, num_samples=s))
    x, y = _inputs(b)
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
    out[f"{name}_auto_path"] = xla.path_name(xla.deterministic_jit(
        None, convolutional=any(op.kind == "conv2d" for op in network.ops)))
    out[f"{name}_auto_fraction_of_best_path"] = min(
        out[f"{name}_ours_xla_s"], out[f"{name}_ours_default_kernels_s"]) / ours
    common.log(f"{name}: loop over images x samples (subset)")
    loop_s, timed, total = _loop_per_image_and_sample(
        _single_grad_fn(network), ens.params, x, y, max_loop_calls)
    out[f"{name}_loop_s_extrapolated"] = loop_s
    out[f"{name}_loop_calls_timed"] = f"{timed} of {total} (extrapolated linearly)"
    common.log(f"{name}: loop over samples, images batched")
    out[f"{name}_batched_loop_s"] = _loop_per_sample_batched(
        network, ens.params, x, y)
    out[f"{name}_batched_loop_default_kernels_s"] = _loop_per_sample_batched(
        network, ens.params, x, y, jit_compile=False)
    common.log(f"{name}: the same work with shared weights (the ceiling)")
    ceiling = common.shared_weight_ceiling(network, ens.params, x, y)
    out[f"{name}_ceiling_s"] = ceiling["seconds"]
    out[f"{name}_ceiling_path"] = ceiling["path"]
    for label, seconds in ceiling["by_path"].items():
        out[f"{name}_ceiling_{label}_s"] = seconds
    paired = common.paired_fraction(
        lambda: gradients.expected_loss_gradient(ens, x, y), ceiling["call"])
    out[f"{name}_fraction_of_ceiling"] = paired["fraction"]
    out[f"{name}_fraction_of_ceiling_range"] = (
        f"{paired['fraction_min']:.2f}-{paired['fraction_max']:.2f}")
    memory = common.peak_memory_mb(
        lambda: gradients.expected_loss_gradient(ens, x, y, jit_compile=False))
    out[f"{name}_peak_memory_mb"] = memory["peak_memory_mb"]
    out[f"{name}_memory_kind"] = memory["memory_kind"]
    out[f"{name}_gflops"] = flops / ours / 1e9
    out[f"{name}_speedup_vs_loop"] = loop_s / ours
    out[f"{name}_speedup_vs_batched_loop"] = out[f"{name}_batched_loop_s"] / ours
    out[f"{name}_speedup_vs_faster_batched_loop"] = min(
        out[f"{name}_batched_loop_s"],
        out[f"{name}_batched_loop_default_kernels_s"]) / ours
    out.update(_generic_case(name, keras_model, ens, x, y, ours))
    return out


def _keras_loop_grad_fn(keras_model, num_samples: int, jit_compile: bool):
    """The baseline of (e): a per-sample loop of the Keras model itself.

    One ``tf.function`` unrolling ``num_samples`` calls of
    ``keras_model.stateless_call`` (weight set ``s``, the model's own
    non-trainable state, inference mode), each with its own input gradient
    of the batch's summed cross-entropy, averaged over samples: the
    expected gradient, ``[B, *input_shape]``.
    """
    state = [tf.constant(v.numpy()) for v in keras_model.non_trainable_variables]

    @tf.function(jit_compile=jit_compile)
    def grad(params, x, y):
        total = tf.zeros_like(x)
        for i in range(num_samples):
            with tf.GradientTape() as tape:
                tape.watch(x)
                logits, _ = keras_model.stateless_call(
                    [p[i] for p in params], state, x, training=False)
                loss = tf.reduce_sum(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
            total += tape.gradient(loss, x)
        return total / num_samples

    return grad


def run_resnet(max_loop_calls: int) -> dict:
    """(e): the ResNet through ``from_keras``'s own path vs the Keras loop."""
    s, b = RESNET_S, RESNET_B
    keras_model = resnet()
    network = Network.from_keras(keras_model)
    params = network.init_params(seed=0, num_samples=s)
    # Keras starts BatchNormalization at gamma=1, beta=0 and biases at 0 for
    # every sample; jitter those vectors (stacked: [S, n]) so the samples
    # differ in every tensor and the check below sees each one used.
    params = [p + tf.random.stateless_normal(p.shape, seed=[7, i], stddev=0.1)
              if len(p.shape) == 2 else p for i, p in enumerate(params)]
    ens = PosteriorEnsemble(network, params)
    x, y = _inputs(b)
    out = {"resnet_path": network.path, "resnet_path_reason": network.path_reason,
           "resnet_vectorization": network.vectorization}
    loop = {}
    for label, jit in (("xla", True), ("default_kernels", False)):
        common.log(f"resnet: per-sample Keras loop, images batched ({label})")
        fn = _keras_loop_grad_fn(keras_model, s, jit)
        out[f"resnet_batched_loop_{label}_max_abs_diff"] = _check_same(
            "resnet", gradients.expected_loss_gradient(ens, x, y, jit_compile=jit),
            fn(params, x, y), f"the per-sample Keras loop ({label})")
        loop[label] = common.time_call(lambda fn=fn: fn(params, x, y), repeats=3)
        out[f"resnet_batched_loop_{label}_s"] = loop[label]
    common.log(f"resnet: ours ({network.path} path, {network.vectorization}), auto")
    ours = common.time_call(
        lambda: gradients.expected_loss_gradient(ens, x, y), repeats=5)
    out["resnet_ours_s"] = ours
    common.log("resnet: Keras loop over images x samples (subset)")
    loop_s, timed, total = _loop_per_image_and_sample(
        _keras_single_grad_fn(keras_model), params, x, y, max_loop_calls)
    out["resnet_loop_s_extrapolated"] = loop_s
    out["resnet_loop_calls_timed"] = f"{timed} of {total} (extrapolated linearly)"
    best = min(loop, key=loop.get)
    out["resnet_batched_loop_baseline"] = best
    out["resnet_batched_loop_s"] = loop[best]
    ceiling = common.shared_weight_ceiling(network, params, x, y)
    out["resnet_ceiling_s"] = ceiling["seconds"]
    out["resnet_ceiling_path"] = ceiling["path"]
    paired = common.paired_fraction(
        lambda: gradients.expected_loss_gradient(ens, x, y), ceiling["call"])
    out["resnet_fraction_of_ceiling"] = paired["fraction"]
    out["resnet_fraction_of_ceiling_range"] = (
        f"{paired['fraction_min']:.2f}-{paired['fraction_max']:.2f}")
    memory = common.peak_memory_mb(
        lambda: gradients.expected_loss_gradient(ens, x, y, jit_compile=False))
    out["resnet_peak_memory_mb"] = memory["peak_memory_mb"]
    out["resnet_memory_kind"] = memory["memory_kind"]
    out["resnet_gflops"] = 2 * network.flops_per_example() * s * b / ours / 1e9
    # As for the MLP and CNN: "loop" is the original code's per-image,
    # per-sample loop; "batched loop" batches the images, one graph.
    out["resnet_speedup_vs_loop"] = loop_s / ours
    out["resnet_speedup_vs_batched_loop"] = loop[best] / ours
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
    resnet_case = run_resnet(max_loop_calls=1000)
    resnet_case["resnet_fraction_of_matmul_peak"] = (
        resnet_case["resnet_gflops"] / peak["gflops"])
    results.update(resnet_case)
    results.update(common.machine_info())
    common.report(results, common.FLAGS.json)


if __name__ == "__main__":
    app.run(main)
