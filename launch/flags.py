"""Flags shared by every launch script, and the helpers that read them.

All flags live here (absl refuses a flag defined twice, and the scripts share
most of theirs); each script reads the ones it needs.  Scripts stay thin:
flags -> config -> ``run_*`` -> files.
"""

from __future__ import annotations

import os
import shlex
import sys

from absl import flags
from absl import logging

from tfp_bnn_adv import data as data_lib
from tfp_bnn_adv import files
from tfp_bnn_adv.studies import common
from tfp_bnn_adv.studies.training import METHODS
from tfp_bnn_adv.studies.training import InferenceSettings

FLAGS = flags.FLAGS

# Where every run writes.
flags.DEFINE_string("output_dir", None, "Directory for results.json, tables, "
                    "figures/, checkpoints; created if missing. Required.")
flags.DEFINE_enum("preset", "quick", ["quick", "paper"],
                  "quick: minutes on a laptop. paper: the paper's scale "
                  "(full datasets, 100+ samples, ~1000 models in the sweep).")
flags.DEFINE_integer("seed", 0, "Seed of everything random (stateless).")

# Data.
flags.DEFINE_enum("dataset", "fashion_mnist", list(data_lib.DATASET_NAMES),
                  "Dataset.")
flags.DEFINE_string("data_dir", None, "Directory with the four IDX .gz files, "
                    "or a TFDS data_dir.")
flags.DEFINE_enum("data_source", "auto", ["auto", "idx", "tfds"],
                  "Where image data is read from.")
flags.DEFINE_integer("num_train", None, "Training subset size (default: all).")
flags.DEFINE_integer("num_test", None, "Test points to evaluate/attack "
                     "(default: the preset's).")
flags.DEFINE_integer("half_moons_n", 2000, "Half-moons points (80/20 split).")

# Model.
flags.DEFINE_enum("architecture", "mlp", ["mlp", "cnn"],
                  "Built-in architecture (ignored with --keras_model).")
flags.DEFINE_list("hidden", ["512"], "Hidden widths of the MLP (or of the "
                  "dense layers after the CNN's convolutions).")
flags.DEFINE_list("filters", ["32", "64"], "Conv filters of the CNN.")
flags.DEFINE_string("keras_model", None, "A .keras file with your own model "
                    "(Keras 3; supported layers only), used instead of "
                    "--architecture.")

# Inference.
flags.DEFINE_enum("method", "hmc", list(METHODS), "Inference method.")
flags.DEFINE_integer("num_chains", 4, "HMC chains.")
flags.DEFINE_integer("num_burnin_steps", 500, "HMC warm-up iterations "
                     "(step size and mass matrix adapt).")
flags.DEFINE_integer("num_results", 200, "HMC samples kept per chain.")
flags.DEFINE_integer("thinning", 1, "HMC iterations per kept sample.")
flags.DEFINE_float("step_size", 0.01, "Initial HMC step size (adapted).")
flags.DEFINE_float("trajectory_length", None, "HMC integration time; the "
                   "leapfrog count per iteration follows from it and the "
                   "adapted step size (default: HMCConfig's, 4.0, unless "
                   "--num_leapfrog_steps is given).")
flags.DEFINE_integer("num_leapfrog_steps", None, "A fixed HMC leapfrog count "
                     "instead of --trajectory_length (default: unset, use "
                     "--trajectory_length).")
flags.DEFINE_integer("max_leapfrog_steps", 100, "Cap on HMC leapfrog steps "
                     "per iteration.")
flags.DEFINE_enum("mass_matrix", "diagonal", ["diagonal", "identity"],
                  "HMC mass matrix: adapted diagonal, or identity (plain HMC).")
flags.DEFINE_enum("kernel", "hmc", ["hmc", "nuts"], "MCMC kernel.")
flags.DEFINE_enum("hmc_init", "prior", ["prior", "sgd"],
                  "HMC initial state: a prior draw or a short SGD fit.")
flags.DEFINE_float("prior_scale", 1.0, "Prior std of every weight (HMC, VI).")
flags.DEFINE_integer("epochs", 10, "VI / SGD epochs.")
flags.DEFINE_integer("batch_size", 128, "VI / SGD minibatch size.")
flags.DEFINE_float("learning_rate", 1e-3, "VI / SGD learning rate.")
flags.DEFINE_integer("vi_samples", 100, "Posterior samples drawn from VI.")
flags.DEFINE_integer("num_members", 5, "Deep-ensemble size.")

# Convergence.
flags.DEFINE_float("max_rhat", 1.1, "An HMC posterior is converged when the "
                   "median over probe points of its function-space R-hat is "
                   "at most this (>= 1).")
flags.DEFINE_bool("allow_unconverged", False, "Write a study's headline "
                  "(attack table, gradient study, robustness-accuracy "
                  "summary) even from unconverged HMC posteriors, marked "
                  "(UNCONVERGED); without it the study stops with an error.")

# Attacks.
flags.DEFINE_list("posteriors", [], "Saved posteriors to attack: "
                  "label=path or path (the label defaults to the method).")
flags.DEFINE_float("eps", 0.25, "L-inf attack radius on [0, 1] inputs.")
flags.DEFINE_list("eps_sweep", [], "Extra radii for the attack table.")
flags.DEFINE_list("attacks", ["random", "fgsm", "pgd", "square"],
                  "Attacks of the attack table.")
flags.DEFINE_list("gradients", ["expected", "predictive"],
                  "Gradient definitions for FGSM/PGD.")
flags.DEFINE_integer("pgd_steps", None, "PGD steps (default: the preset's).")
flags.DEFINE_integer("square_queries", None, "Square Attack query budget.")

# Studies.
flags.DEFINE_list("widths", [], "Hidden widths swept by the gradient study "
                  "(half-moons) and the robustness-accuracy sweep.")
flags.DEFINE_list("train_sizes", [], "Half-moons training-set sizes of the "
                  "gradient study.")
flags.DEFINE_list("sample_counts", [], "Posterior sample counts of the "
                  "gradient study.")
flags.DEFINE_list("depths", [], "Hidden-layer counts of the sweep.")
flags.DEFINE_list("training_lengths", [], "SGD/VI epochs of the sweep.")
flags.DEFINE_list("hmc_lengths", [], "HMC burn-in lengths of the sweep.")
flags.DEFINE_list("methods", [], "Methods of a study (default: the preset's).")

# Execution.
flags.DEFINE_enum("strategy", "default",
                  ["default", "mirrored", "multi_worker", "tpu"],
                  "tf.distribute strategy.")
flags.DEFINE_string("tpu", None, "TPU name/address for --strategy=tpu "
                    "('local' on a TPU VM).")
flags.DEFINE_integer("logical_cpus", None,
                     "Split the CPU into this many logical devices before "
                     "TensorFlow starts (to run --strategy=mirrored on a "
                     "CPU-only host, e.g. to test multi-device runs).",
                     lower_bound=1)
flags.DEFINE_enum("hmc_parallelism", "data", ["data", "chains"],
                  "With several replicas, HMC splits the training data "
                  "(all-reduce of log-likelihood and gradient) or the chains.")
flags.DEFINE_enum("matmul_precision", "highest", ["highest", "default"],
                  "HMC's float32 matmul precision: full float32, or the "
                  "hardware default (TF32 on Ampere GPUs, bfloat16 passes on "
                  "TPUs: faster, but HMC may diverge).")
flags.DEFINE_enum("jit", "auto", ["auto", "xla", "default"],
                  "Compile hot functions with XLA, TF's default kernels, or "
                  "whichever measures faster (auto; on CPU).")


def start(script: str, require_output_dir: bool = True) -> str:
    """Common start of every script: checks, logging, flags.txt.

    Returns:
      The output directory.

    Raises:
      IllegalFlagValueError: without ``--output_dir`` (if required).
      ValueError: for ``--max_rhat`` below 1, before anything is written.
    """
    common.check_max_rhat(FLAGS.max_rhat, "--max_rhat")
    if require_output_dir and not FLAGS.output_dir:
        raise flags.IllegalFlagValueError(
            f"{script}: --output_dir is required.")
    if FLAGS.logical_cpus:
        from tfp_bnn_adv import distribute  # pylint: disable=g-import-not-at-top
        distribute.configure_logical_cpus(FLAGS.logical_cpus)
    out = FLAGS.output_dir
    os.makedirs(out, exist_ok=True)
    os.environ["TFP_BNN_ADV_JIT"] = FLAGS.jit
    logging.set_verbosity(logging.INFO)
    command = " ".join(shlex.quote(a) for a in sys.argv)
    # Every shared flag's value, so the run can be repeated exactly even when
    # it was started programmatically.
    values = "\n".join(
        f.serialize() if f.value is not None else f"# --{f.name} (unset)"
        for f in sorted(FLAGS.get_flags_for_module(__name__),
                        key=lambda f: f.name))
    files.write_text(os.path.join(out, "flags.txt"),
                     f"# {script}\n{command}\n\n# all flags\n{values}\n")
    logging.info("%s: writing to %s", script, out)
    return out


def strategy():
    """The tf.distribute strategy named by --strategy / --tpu."""
    from tfp_bnn_adv import distribute  # pylint: disable=g-import-not-at-top
    return distribute.get_strategy(FLAGS.strategy, tpu=FLAGS.tpu)


def dataset():
    """The dataset named by --dataset, subset by --num_train."""
    if FLAGS.dataset == "half_moons":
        ds = data_lib.half_moons(FLAGS.half_moons_n, seed=FLAGS.seed)
    else:
        ds = data_lib.load_dataset(FLAGS.dataset, data_dir=FLAGS.data_dir,
                                   source=FLAGS.data_source)
    if FLAGS.num_train is not None and FLAGS.num_train < len(ds.train_x):
        ds = ds.subset(num_train=FLAGS.num_train, seed=FLAGS.seed)
    return ds


def _ints(values, name):
    try:
        return tuple(int(v) for v in values)
    except ValueError as e:
        raise flags.IllegalFlagValueError(f"--{name} must be integers, got "
                                          f"{values!r}.") from e


def model(ds):
    """The Keras model: --keras_model, else --architecture."""
    from tfp_bnn_adv import models  # pylint: disable=g-import-not-at-top
    if FLAGS.keras_model:
        import keras  # pylint: disable=g-import-not-at-top
        if not os.path.exists(FLAGS.keras_model):
            raise flags.IllegalFlagValueError(
                f"--keras_model={FLAGS.keras_model!r}: no such file.")
        return keras.saving.load_model(FLAGS.keras_model, compile=False)
    hidden = _ints(FLAGS.hidden, "hidden")
    if FLAGS.architecture == "cnn":
        return models.cnn(ds.input_shape, ds.num_classes,
                          _ints(FLAGS.filters, "filters"),
                          hidden=tuple(h for h in hidden if h))
    return models.mlp(ds.input_shape, ds.num_classes, hidden)


def inference_settings() -> InferenceSettings:
    """The inference flags as :class:`InferenceSettings`."""
    return InferenceSettings(
        method=FLAGS.method, num_chains=FLAGS.num_chains,
        num_burnin_steps=FLAGS.num_burnin_steps, num_results=FLAGS.num_results,
        thinning=FLAGS.thinning, step_size=FLAGS.step_size,
        trajectory_length=FLAGS.trajectory_length,
        num_leapfrog_steps=FLAGS.num_leapfrog_steps,
        max_leapfrog_steps=FLAGS.max_leapfrog_steps,
        mass_matrix=FLAGS.mass_matrix, kernel=FLAGS.kernel,
        hmc_init=FLAGS.hmc_init, prior_scale=FLAGS.prior_scale,
        epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate, vi_samples=FLAGS.vi_samples,
        num_members=FLAGS.num_members, seed=FLAGS.seed,
        hmc_parallelism=FLAGS.hmc_parallelism,
        matmul_precision=FLAGS.matmul_precision)


# The flags that set HMC (each the InferenceSettings field of that name).
HMC_FLAGS = ("num_chains", "num_burnin_steps", "num_results", "thinning",
             "step_size", "trajectory_length", "num_leapfrog_steps",
             "max_leapfrog_steps", "mass_matrix", "kernel", "hmc_init",
             "prior_scale", "hmc_parallelism", "matmul_precision")


def hmc_overrides() -> dict:
    """The HMC flags given explicitly, as InferenceSettings fields.

    For scripts whose presets bring their own HMC settings: an explicit
    flag overrides the preset's field.  An explicit ``--trajectory_length``
    clears the preset's ``num_leapfrog_steps`` and vice versa (the two are
    alternatives).

    Example:
      >>> preset.replace(**hmc_overrides())
    """
    out = {name: FLAGS[name].value for name in HMC_FLAGS if explicit(name)}
    if "trajectory_length" in out and "num_leapfrog_steps" not in out:
        out["num_leapfrog_steps"] = None
    if "num_leapfrog_steps" in out and "trajectory_length" not in out:
        out["trajectory_length"] = None
    return out


def convergence() -> dict:
    """--max_rhat and --allow_unconverged as study config fields."""
    return {"max_rhat": FLAGS.max_rhat,
            "allow_unconverged": FLAGS.allow_unconverged}


def posteriors() -> tuple:
    """--posteriors as ``(label, path)`` pairs."""
    pairs = []
    for item in FLAGS.posteriors:
        label, _, path = item.rpartition("=")
        pairs.append((label or None, path))
    return tuple(pairs)


def ints(values, name) -> tuple:
    """A list flag as ints, with a clear error."""
    return _ints(values, name)


def floats(values, name) -> tuple:
    try:
        return tuple(float(v) for v in values)
    except ValueError as e:
        raise flags.IllegalFlagValueError(f"--{name} must be numbers, got "
                                          f"{values!r}.") from e


def explicit(name: str) -> bool:
    """Whether flag ``name`` was given on the command line (or overridden)."""
    return FLAGS[name].present or FLAGS[name].value != FLAGS[name].default
