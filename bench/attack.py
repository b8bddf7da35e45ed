"""Attack speed: PGD-40 vs the original loop, APGD-100 vs ART.

PGD-40 with the expected gradient, compiled and batched, vs the original loop.

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

Reported: wall time of both, the speedup, ``pgd_fraction_of_gradient_throughput``
(the time of 40 expected-gradient calls on one batch over PGD-40's on the same
batch, the median of 5 rounds timing both back to back: 1.0 means the attack
costs no more than its gradients), the peak memory of PGD on one batch
(TensorFlow's allocator peak), and the fraction of the machine's
fp32 matmul peak the attack reaches, counting
``steps x S x N x 2 x forward FLOPs`` (a forward pass plus the input-gradient
backward pass, which costs about as much as the forward).

APGD-100 against ART (``--apgd``, on by default): our
``attacks.apgd(..., loss="ce", gradient="predictive")`` beside the
Adversarial Robustness Toolbox's ``AutoProjectedGradientDescent`` (ART
1.20.1, the ``bench`` extra) on the same posterior's predictive, the same
points and eps, in the same process.  The case is a trained posterior, so
robust accuracy means something: the same MLP 784-512-512-10, its mode fitted
by Adam (2 epochs on 10k Fashion-MNIST training images) and ``S`` samples
drawn around it from a Gaussian with, per weight tensor, a standard deviation
of a quarter of that tensor's RMS (accuracy as the mode's).  ART gets the
ensemble as a ``TensorFlowV2Classifier`` whose model returns the log
posterior predictive ``log (1/S) sum_s softmax f(x, w_s)`` (a log-sum-exp
over our vectorised, XLA-compiled ``apply_stack``), so its CE loss is ours
(``-log p_bar_y``) and its forward pass is as fast as ours: the comparison
measures the attack, not the ensemble.  The bench asserts that these outputs
equal ``log ensemble.predict_proba`` and prints the largest difference.
Both sides are timed after a warm-up, so compile time is excluded: ours
after a first call on one batch (its time is reported as
``apgd_first_call_seconds`` and, less the steady-state time of one batch, as
``apgd_compile_seconds``), ART after a 2-iteration run on all the points
(which compiles every batch shape ART will see).  ART attacks only the
points classified correctly at the start (its own shortcut); ours attacks
all.  Each ART iteration is a loss-gradient call (an eager tape around the
compiled model) and a second forward pass for the loss, with the step logic
in NumPy on the host; ours is one compiled ``while_loop`` per batch.  Keys:
``apgd_speedup_vs_art`` (ART seconds / ours; target >= 5) and
``apgd_robust_accuracy_minus_art`` (ours minus ART's robust accuracy on the
same points; <= 0 means we are at least as strong; target <= 0.01);
``apgd_fraction_of_gradient_throughput`` is ``steps`` calls of
``predictive_loss_gradient`` on the same batches divided by APGD's time
(1.0: the attack costs no more than its gradients).  Without ART installed
the ART keys are skipped with a message.

Usage: ``python -m bench.attack [--json] [--batch_size 125] [--sweep]
[--nopgd] [--noapgd] [--apgd_samples 100] [--apgd_batch_size 100]
[--apgd_eps 0.05] [--apgd_images 200]``.
"""

from __future__ import annotations

import math
import os
import time

from absl import app
from absl import flags
import numpy as np

from bench import common  # sets TF's log level before TF is imported
import tensorflow as tf  # pylint: disable=wrong-import-order

from tfp_bnn_adv import attacks
from tfp_bnn_adv import data
from tfp_bnn_adv import gradients
from tfp_bnn_adv import models
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.inference import sgd
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
flags.DEFINE_enum("jit", "auto", ["xla", "default", "auto"],
                  "our compiler choice (auto: what a user gets, "
                  "tfp_bnn_adv.xla.auto_path)")
flags.DEFINE_integer("loop_images", 2, "images the per-call loop attacks "
                     "before extrapolating")
flags.DEFINE_bool("sweep", False, "also time batch size / chunk size / XLA "
                  "choices")
flags.DEFINE_bool("pgd", True, "run PGD-40 against the per-call loop")
flags.DEFINE_bool("apgd", True, "run APGD against ART's "
                  "AutoProjectedGradientDescent")
flags.DEFINE_integer("apgd_samples", 100, "S: posterior samples of the APGD "
                     "case", lower_bound=1)
flags.DEFINE_integer("apgd_batch_size", 100, "B: images per compiled APGD "
                     "call, and ART's batch_size", lower_bound=1)
flags.DEFINE_float("apgd_eps", 0.05, "L-inf radius of the APGD comparison, "
                   "in (0, 1]", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("apgd_images", 200, "test images attacked by both APGDs",
                     lower_bound=1, upper_bound=10000)
flags.DEFINE_integer("apgd_steps", 100, "APGD iterations (ART's max_iter)",
                     lower_bound=1)
flags.register_validator("apgd_eps", lambda eps: eps > 0,
                         "--apgd_eps must be > 0 (ART rejects eps = 0)")

# The APGD case's posterior: a Gaussian around one Adam fit (see the module
# docstring).  Fixed, so figures from different runs are comparable.
APGD_TRAIN_IMAGES = 10000
APGD_TRAIN_EPOCHS = 2
APGD_POSTERIOR_SCALE = 0.25
ART_LOG_TOLERANCE = 1e-4


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


def make_apgd_case(num_samples: int, num_images: int, seed: int = 0):
    """A trained posterior for APGD: ``S`` Gaussian draws around an Adam fit.

    Returns:
      ``(ensemble, x, y)``: the ensemble and the first ``num_images``
      Fashion-MNIST test images (float32 ``[N, 28, 28, 1]``) and labels.
    """
    ds = data.fashion_mnist()
    mode = sgd.train_ensemble(
        models.mlp((28, 28, 1), 10, hidden=HIDDEN),
        ds.train_x[:APGD_TRAIN_IMAGES], ds.train_y[:APGD_TRAIN_IMAGES],
        num_members=1, epochs=APGD_TRAIN_EPOCHS, seed=seed, verbose=0)
    rng = np.random.default_rng(seed)
    params = []
    for p in mode.params:
        w = np.asarray(p[0])
        scale = APGD_POSTERIOR_SCALE * float(np.sqrt(np.mean(w ** 2)))
        params.append(w[None] + scale * rng.standard_normal(
            (num_samples,) + w.shape, dtype=np.float32))
    ens = PosteriorEnsemble(mode.network, params)
    return ens, ds.test_x[:num_images], ds.test_y[:num_images]


def art_classifier(ens, jit_compile):
    """``ens``'s posterior predictive as an ART ``TensorFlowV2Classifier``.

    The model returns ``log (1/S) sum_s softmax f(x, w_s)`` ``[B, C]`` as
    "logits": their softmax is the predictive itself, so ART's
    cross-entropy from logits is ``-log p_bar_y``, the loss of our
    ``gradient="predictive"``.  It is one compiled function over the whole
    stack, as fast a forward pass as ours.
    """
    import art.estimators.classification  # pylint: disable=g-import-not-at-top
    net, params = ens.network, ens.params
    log_s = math.log(ens.num_samples)

    @tf.function(jit_compile=jit_compile)
    def log_predictive(x):
        log_p = tf.nn.log_softmax(net.apply_stack(params, x))  # [S, B, C]
        return tf.reduce_logsumexp(log_p, axis=0) - log_s

    def model(x, training=False):
        del training  # no dropout in this network
        return log_predictive(x)

    return art.estimators.classification.TensorFlowV2Classifier(
        model=model, nb_classes=net.num_classes, input_shape=net.input_shape,
        loss_object=tf.keras.losses.CategoricalCrossentropy(from_logits=True),
        clip_values=(0.0, 1.0))


def check_art_outputs(ens, classifier, x) -> float:
    """Largest |ART's output - log predict_proba|; raises past the tolerance.

    Entries whose float32 probability underflows to 0 (log -inf on our side,
    finite on ART's log-sum-exp side) are left out.
    """
    ours = ens.predict_proba(x)
    theirs = classifier.predict(x)
    finite = ours > 0
    diff = float(np.max(np.abs(theirs[finite] - np.log(ours[finite]))))
    if not diff <= ART_LOG_TOLERANCE:
        raise AssertionError(
            f"ART's classifier outputs differ from log ensemble.predict_proba "
            f"by {diff:g} > {ART_LOG_TOLERANCE:g}: the two attacks would not "
            "attack the same model.")
    return diff


def art_apgd(classifier, eps, steps, batch_size):
    """ART's APGD-CE with the published settings: step 2 eps, 1 start."""
    from art.attacks.evasion import AutoProjectedGradientDescent  # pylint: disable=g-import-not-at-top
    return AutoProjectedGradientDescent(
        classifier, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=steps,
        targeted=False, nb_random_init=1, batch_size=batch_size,
        loss_type="cross_entropy", verbose=False)


def run_art_apgd(attack, x, y, steps):
    """``attack`` on ``(x, y)`` with ``steps`` iterations, seeded."""
    attack.set_params(max_iter=steps)
    np.random.seed(0)  # ART's random start draws from NumPy's global state
    return attack.generate(x, y)


def run_our_apgd(ens, x, y, eps, steps, batch_size, chunk_size, jit):
    return attacks.apgd(ens, x, y, eps, loss="ce", steps=steps,
                        gradient="predictive", seed=0, batch_size=batch_size,
                        chunk_size=chunk_size, jit_compile=jit)


def robust_accuracy(ens, x_adv, y, batch_size) -> float:
    return float(np.mean(ens.predict(x_adv, batch_size=batch_size) == y))


def apgd_comparison(args, jit) -> dict:
    """APGD against ART on one trained posterior (see the module docstring)."""
    s, b, eps, steps = (args.apgd_samples, args.apgd_batch_size,
                        args.apgd_eps, args.apgd_steps)
    ens, x, y = make_apgd_case(s, args.apgd_images)
    n = len(x)
    out = {"apgd_case": (
        f"APGD-{steps} CE on the log posterior predictive, L-inf eps={eps:g}, "
        f"{n} Fashion-MNIST test images, S={s} MLP 784-512-512-10 (Gaussian "
        f"around an Adam fit), batch {b}; both sides timed after a warm-up, "
        "compile time excluded"),
        "apgd_clean_accuracy": ens.accuracy(x, y, batch_size=b)}
    common.log(out["apgd_case"])

    try:
        import art  # pylint: disable=g-import-not-at-top
    except ImportError:
        art = None
        common.log("ART is not installed: it is a bench extra "
                   "(pip install -e '.[bench]'); skipping the ART keys.")
    if art is not None:
        # ART's model compiles as ours does (XLA unless --jit=default).
        classifier = art_classifier(ens, jit is not False)
        out["art_version"] = art.__version__
        out["art_max_abs_log_prob_difference"] = check_art_outputs(
            ens, classifier, x)
        common.log("ART: warm-up (2 iterations on every point), then "
                   f"APGD-{steps}")
        # One attack object for both runs: it wraps the classifier in its own
        # estimator, whose traced functions the warm-up must reach.
        attack = art_apgd(classifier, eps, steps, b)
        run_art_apgd(attack, x, y, 2)
        start = time.perf_counter()
        x_art = run_art_apgd(attack, x, y, steps)
        out["art_apgd_seconds"] = time.perf_counter() - start
        out["art_robust_accuracy"] = robust_accuracy(ens, x_art, y, b)
        common.log(f"ART: {out['art_apgd_seconds']:.1f} s, robust accuracy "
                   f"{out['art_robust_accuracy']:.3f}")

    if not hasattr(attacks, "apgd"):
        common.log("attacks.apgd is not in this tree: skipping our APGD keys.")
        return out
    common.log(f"ours: first call on one batch, then APGD-{steps} on all")
    start = time.perf_counter()
    run_our_apgd(ens, x[:b], y[:b], eps, steps, b, args.chunk_size, jit)
    first = time.perf_counter() - start
    start = time.perf_counter()
    x_ours = run_our_apgd(ens, x, y, eps, steps, b, args.chunk_size, jit)
    seconds = time.perf_counter() - start
    batches = math.ceil(n / b)
    out["apgd_seconds"] = seconds
    out["apgd_first_call_seconds"] = first
    out["apgd_compile_seconds"] = max(first - seconds / batches, 0.0)
    out["apgd_robust_accuracy"] = robust_accuracy(ens, x_ours, y, b)
    out["apgd_max_perturbation"] = float(np.max(np.abs(x_ours - x)))
    common.log(f"ours: {seconds:.1f} s, robust accuracy "
               f"{out['apgd_robust_accuracy']:.3f}")

    common.log(f"gradient throughput: predictive_loss_gradient, batch {b}")
    grad_seconds = common.time_call(
        lambda: gradients.predictive_loss_gradient(
            ens, x, y, batch_size=b, chunk_size=args.chunk_size,
            jit_compile=jit), repeats=3)
    out["predictive_gradient_seconds"] = grad_seconds
    out["apgd_fraction_of_gradient_throughput"] = steps * grad_seconds / seconds
    if "art_apgd_seconds" in out:
        out["apgd_speedup_vs_art"] = out["art_apgd_seconds"] / seconds
        out["apgd_robust_accuracy_minus_art"] = (
            out["apgd_robust_accuracy"] - out["art_robust_accuracy"])
    return out


def pgd_comparison(args, jit) -> dict:
    """PGD-40 against the original per-call loop (see the module docstring)."""
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

    common.log(f"gradient throughput: {STEPS} x expected_loss_gradient, "
               f"batch {batch}, paired with PGD on {batch} images per round")
    grad_seconds = common.time_call(
        lambda: gradients.expected_loss_gradient(
            ens, x, y, batch_size=batch, chunk_size=args.chunk_size,
            jit_compile=jit), repeats=3)
    xb, yb = x[:batch], y[:batch]
    throughput = common.paired_fraction(
        lambda: run_pgd(ens, xb, yb, STEPS, batch, args.chunk_size, jit),
        lambda: [gradients.expected_loss_gradient(
            ens, xb, yb, batch_size=batch, chunk_size=args.chunk_size,
            jit_compile=jit) for _ in range(STEPS)], rounds=5, repeats=1)
    memory = common.peak_memory_mb(
        lambda: run_pgd(ens, x[:batch], y[:batch], STEPS, batch,
                        args.chunk_size, jit))

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
        "expected_gradient_seconds": grad_seconds,
        "pgd_fraction_of_gradient_throughput": throughput["fraction"],
        "pgd_fraction_of_gradient_throughput_range": (
            f"{throughput['fraction_min']:.2f}-{throughput['fraction_max']:.2f}"),
        "pgd_peak_memory_mb_one_batch": memory["peak_memory_mb"],
        "memory_kind": memory["memory_kind"],
        "batch_size": batch,
        "chunk_size": chunk,
    }
    if args.sweep:
        results.update(sweep(ens, x, y))
    return results


def main(argv) -> None:
    del argv
    args = FLAGS
    jit = {"xla": True, "default": False, "auto": "auto"}[args.jit]
    results = {}
    if args.pgd:
        results.update(pgd_comparison(args, jit))
    if args.apgd:
        results.update(apgd_comparison(args, jit))
    results.update({"jit": args.jit,
                    "load_average_1min": os.getloadavg()[0],
                    **common.machine_info()})
    common.report(results, args.json)


if __name__ == "__main__":
    app.run(main)
