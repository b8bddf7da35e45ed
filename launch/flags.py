"""Flags shared by every launch script, and the helpers that read them.

All flags live here (absl refuses a flag defined twice, and the scripts share
most of theirs); each script reads the ones it needs.  Scripts stay thin:
flags -> config -> ``run_*`` -> files.

Every flag is checked before anything is created: the value of each flag by
its validator while the command line is parsed (absl prints ``FATAL Flags
parsing error: flag --hidden=['abc']: ...`` and exits), and what needs
several flags, the file system or the study's config by :func:`start`,
which raises :class:`FlagError` (printed by ``app.run`` without a
traceback) before ``--output_dir`` is created or ``flags.txt`` written.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from typing import Any, Callable, NamedTuple, Sequence

from absl import app
from absl import flags
from absl import logging

from tfp_bnn_adv import data as data_lib
from tfp_bnn_adv import files
from tfp_bnn_adv.studies import common
from tfp_bnn_adv.studies.attack_table import ATTACKS
from tfp_bnn_adv.studies.attack_table import GRADIENTS
from tfp_bnn_adv.studies.training import METHODS
from tfp_bnn_adv.studies.training import InferenceSettings

FLAGS = flags.FLAGS


class FlagError(app.UsageError, flags.IllegalFlagValueError, ValueError):
    """A bad flag value, found before the run creates anything.

    An ``app.UsageError``, so ``app.run`` prints the message and exits with
    status 1 without a traceback; also an ``IllegalFlagValueError`` and a
    ``ValueError`` for callers that catch those.
    """


class _CountParser(flags.ArgumentParser):
    """A positive integer, or ``all``."""

    def parse(self, argument):
        if str(argument).strip().lower() == "all":
            return "all"
        try:
            return _int_list([argument], "", 1)[0]
        except ValueError:
            raise ValueError(f"{argument!r} is not a positive integer or "
                             "'all'") from None

    def flag_type(self):
        return "int >= 1 or 'all'"


def _define_count(name: str, help_text: str) -> None:
    flags.DEFINE(_CountParser(), name, None, help_text,
                 serializer=flags.ArgumentSerializer())
    flags.register_validator(
        name, lambda v: v is None or v == "all" or (
            isinstance(v, int) and not isinstance(v, bool) and v >= 1),
        message=f"--{name} must be a positive integer or 'all' (0 and "
        "negative counts are refused; 'all' is spelled out)")


def _int_list(values, name: str, minimum: int) -> tuple:
    out = []
    for v in values:
        try:
            n = int(v)
        except (TypeError, ValueError):
            n = None
        if n is None or isinstance(v, bool) or n < minimum:
            raise ValueError(f"--{name} must be a comma-separated list of "
                             f"integers >= {minimum}; {v!r} is not.")
        out.append(n)
    return tuple(out)


def _mlp_widths(values) -> bool:
    if values["architecture"] == "cnn":
        return True
    try:
        return 0 not in _int_list(values["hidden"], "hidden", 0)
    except ValueError:
        return True  # --hidden's own validator names the bad item


def _float_list(values, name: str) -> tuple:
    out = []
    for v in values:
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = math.nan
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"--{name} must be a comma-separated list of "
                             f"finite numbers >= 0; {v!r} is not.")
        out.append(x)
    return tuple(out)


def _choices(values, name: str, allowed: Sequence[str]) -> tuple:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"--{name} may hold {', '.join(allowed)}; "
                         f"{', '.join(map(repr, bad))} "
                         f"{'is' if len(bad) == 1 else 'are'} not.")
    return tuple(values)


def _posterior_items(values, name: str) -> tuple:
    for v in values:
        if not v.rpartition("=")[2]:
            raise ValueError(f"--{name} items are label=path or path; {v!r} "
                             "has no path.")
    return tuple(values)


def _register(name: str, check: Callable) -> None:
    """A validator that raises ``check``'s ValueError as the flag's error."""
    def validate(value):
        try:
            check(value)
        except ValueError as e:
            raise flags.ValidationError(str(e)) from e
        return True
    flags.register_validator(name, validate)


def _positive_float(name: str, allow_zero: bool = False) -> None:
    bound = ">= 0" if allow_zero else "> 0"
    flags.register_validator(
        name, lambda v: v is None or (math.isfinite(v) and (
            v >= 0 if allow_zero else v > 0)),
        message=f"--{name} must be a finite number {bound}")


# Where every run writes.
flags.DEFINE_string("output_dir", None, "Directory for results.json, tables, "
                    "figures/, checkpoints; created if missing. Required.")
flags.DEFINE_enum("preset", "quick", ["quick", "paper"],
                  "quick: minutes on a laptop. paper: the paper's scale "
                  "(full datasets, 100+ samples, ~1000 models in the sweep).")
flags.DEFINE_integer("seed", 0, "Seed of everything random (stateless).",
                     lower_bound=0)
flags.DEFINE_bool("overwrite", False, "Delete the results of an earlier run "
                  "in --output_dir (results.json, tables, figures/, "
                  "checkpoints, runs/) and start afresh. Without it a run "
                  "resumes only the configuration that wrote them (the "
                  "fingerprint in results.json) and refuses any other, "
                  "naming the settings that differ.")

# Data.
flags.DEFINE_enum("dataset", "fashion_mnist", list(data_lib.DATASET_NAMES),
                  "Dataset.")
flags.DEFINE_string("data_dir", None, "Directory with the four IDX .gz files, "
                    "or a TFDS data_dir.")
flags.DEFINE_enum("data_source", "auto", ["auto", "idx", "tfds"],
                  "Where image data is read from.")
_define_count("num_train", "Training subset size, or 'all' (default: all for "
              "launch.train, the preset's for the studies).")
_define_count("num_test", "Test points to evaluate/attack, or 'all' "
              "(default: all for launch.train, the preset's for the "
              "studies).")
flags.DEFINE_integer("half_moons_n", 2000, "Half-moons points (80/20 split).",
                     lower_bound=2)

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
flags.DEFINE_integer("num_chains", 4, "HMC chains.", lower_bound=1)
flags.DEFINE_integer("num_burnin_steps", 500, "HMC warm-up iterations "
                     "(step size and mass matrix adapt).", lower_bound=0)
flags.DEFINE_integer("num_results", 200, "HMC samples kept per chain.",
                     lower_bound=1)
flags.DEFINE_integer("thinning", 1, "HMC iterations per kept sample.",
                     lower_bound=1)
flags.DEFINE_float("step_size", 0.01, "Initial HMC step size (adapted).")
flags.DEFINE_float("trajectory_length", None, "HMC integration time; the "
                   "leapfrog count per iteration follows from it and the "
                   "adapted step size (default: HMCConfig's, 4.0, unless "
                   "--num_leapfrog_steps is given).")
flags.DEFINE_integer("num_leapfrog_steps", None, "A fixed HMC leapfrog count "
                     "instead of --trajectory_length (default: unset, use "
                     "--trajectory_length).", lower_bound=1)
flags.DEFINE_integer("max_leapfrog_steps", 100, "Cap on HMC leapfrog steps "
                     "per iteration.", lower_bound=1)
flags.DEFINE_enum("mass_matrix", "diagonal", ["diagonal", "identity"],
                  "HMC mass matrix: adapted diagonal, or identity (plain HMC).")
flags.DEFINE_enum("kernel", "hmc", ["hmc", "nuts"], "MCMC kernel.")
flags.DEFINE_enum("hmc_init", "prior", ["prior", "sgd"],
                  "HMC initial state: a prior draw or a short SGD fit.")
flags.DEFINE_float("prior_scale", 1.0, "Prior std of every weight (HMC, VI).")
flags.DEFINE_integer("epochs", 10, "VI / SGD epochs.", lower_bound=1)
flags.DEFINE_integer("batch_size", 128, "VI / SGD minibatch size.",
                     lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "VI / SGD learning rate.")
flags.DEFINE_integer("vi_samples", 100, "Posterior samples drawn from VI.",
                     lower_bound=1)
flags.DEFINE_integer("num_members", 5, "Deep-ensemble size.", lower_bound=1)

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
flags.DEFINE_list("attacks", list(ATTACKS), "Attacks of the attack table.")
flags.DEFINE_list("gradients", ["expected", "predictive"],
                  f"Gradient definitions for FGSM/PGD: {', '.join(GRADIENTS)}.")
flags.DEFINE_integer("pgd_steps", None, "PGD steps (default: the preset's).",
                     lower_bound=1)
flags.DEFINE_integer("square_queries", None, "Square Attack query budget "
                     "(default: the preset's).", lower_bound=1)

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

# Each flag's value, checked while the command line is parsed (and on
# assignment); what needs several flags or the file system is in start().
_register("hidden", lambda v: _int_list(v, "hidden", 0))
flags.register_multi_flags_validator(
    ["hidden", "architecture"], _mlp_widths,
    message="--hidden widths must be >= 1 for an MLP (0, no dense layer, "
    "is for --architecture=cnn only)")
for _name in ("filters", "widths", "train_sizes", "sample_counts", "depths",
              "training_lengths", "hmc_lengths"):
    _register(_name, lambda v, n=_name: _int_list(v, n, 1))
_register("eps_sweep", lambda v: _float_list(v, "eps_sweep"))
_register("attacks", lambda v: _choices(v, "attacks", ATTACKS))
_register("gradients", lambda v: _choices(v, "gradients", GRADIENTS))
_register("methods", lambda v: _choices(v, "methods", METHODS))
_register("posteriors", lambda v: _posterior_items(v, "posteriors"))
for _name in ("step_size", "trajectory_length", "prior_scale",
              "learning_rate"):
    _positive_float(_name)
_positive_float("eps", allow_zero=True)


class Start(NamedTuple):
    """What :func:`start` checked: where to write, the config, its fingerprint."""
    output_dir: str
    config: Any
    fingerprint: dict | None


def start(script: str, make_config: Callable[[], Any] | None = None,
          fingerprint: Callable[[Any], dict] | None = None, *,
          directories: Sequence[str] = ()) -> Start:
    """Common start of every script: every check, then logging and flags.txt.

    Nothing is created until everything has been checked, in this order:

    1. what no flag validator can check alone: ``--max_rhat``,
       ``--output_dir`` (given, and a directory or creatable, as are its
       ``figures/``, ``tensorboard/`` and ``directories``), ``--data_dir``
       (an existing directory), ``--keras_model`` (an existing file); every
       problem is reported at once;
    2. ``make_config()`` turns the flags into the script's config and
       validates it;
    3. ``fingerprint(config)`` is compared with the fingerprint of an earlier
       run in ``--output_dir`` (:func:`common.check_fingerprint`): results of
       another configuration are refused, naming every differing setting,
       unless ``--overwrite``.

    Only then are ``--logical_cpus`` applied, the directory created and
    ``flags.txt`` written.

    Args:
      script: the script's name, for messages and ``flags.txt``.
      make_config: builds and validates the config from the flags.
      fingerprint: the config's fingerprint (the study's ``fingerprint``).
      directories: sub-directories of ``--output_dir`` the script writes
        (checkpoints, sub-studies), checked like it.

    Returns:
      ``Start(output_dir, config, fingerprint)``.

    Raises:
      FlagError: for any bad flag value, a config that does not validate, or
        results of another configuration in ``--output_dir``.
    """
    problems = []
    try:
        common.check_max_rhat(FLAGS.max_rhat, "--max_rhat")
    except ValueError as e:
        problems.append(str(e))
    out = FLAGS.output_dir
    if not out:
        problems.append("--output_dir is required.")
    else:
        try:
            common.check_directory(out, "--output_dir")
            for sub in ("figures", "tensorboard") + tuple(directories):
                common.check_directory(os.path.join(out, sub), f"{sub}/")
        except ValueError as e:
            problems.append(str(e) if str(e).startswith("--output_dir") else
                            f"--output_dir={out!r}: {e}")
    if FLAGS.data_dir and "://" not in FLAGS.data_dir and not os.path.isdir(
            FLAGS.data_dir):
        problems.append(f"--data_dir={FLAGS.data_dir!r} is not a directory.")
    if FLAGS.keras_model and not os.path.isfile(FLAGS.keras_model):
        problems.append(f"--keras_model={FLAGS.keras_model!r}: no such file.")
    if problems:
        raise FlagError(f"{script}: " + "\n".join(problems))
    config = None
    if make_config is not None:
        try:
            config = make_config()
        except FlagError:
            raise
        except ValueError as e:
            raise FlagError(f"{script}: {e}") from e
    fp = None
    if fingerprint is not None:
        fp = fingerprint(config)
        try:
            common.check_fingerprint(out, fp, overwrite=FLAGS.overwrite)
        except common.ConfigMismatchError as e:
            raise FlagError(f"{script}: {e}") from e
    if FLAGS.logical_cpus:
        from tfp_bnn_adv import distribute  # pylint: disable=g-import-not-at-top
        distribute.configure_logical_cpus(FLAGS.logical_cpus)
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
    return Start(out, config, fp)


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
    num_train = count(FLAGS.num_train)
    if num_train is not None and num_train < len(ds.train_x):
        ds = ds.subset(num_train=num_train, seed=FLAGS.seed)
    return ds


def model(ds):
    """The Keras model: --keras_model, else --architecture."""
    from tfp_bnn_adv import models  # pylint: disable=g-import-not-at-top
    if FLAGS.keras_model:
        import keras  # pylint: disable=g-import-not-at-top
        return keras.saving.load_model(FLAGS.keras_model, compile=False)
    if FLAGS.architecture == "cnn":
        return models.cnn(ds.input_shape, ds.num_classes,
                          ints(FLAGS.filters, "filters"),
                          hidden=tuple(h for h in ints(FLAGS.hidden, "hidden", 0)
                                       if h))
    return models.mlp(ds.input_shape, ds.num_classes,
                      ints(FLAGS.hidden, "hidden"))


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


def ints(values, name: str, minimum: int = 1) -> tuple:
    """A list flag as ints ``>= minimum``, else a FlagError naming it."""
    try:
        return _int_list(values, name, minimum)
    except ValueError as e:
        raise FlagError(str(e)) from e


def floats(values, name: str) -> tuple:
    """A list flag as finite floats ``>= 0``, else a FlagError naming it."""
    try:
        return _float_list(values, name)
    except ValueError as e:
        raise FlagError(str(e)) from e


def count(value):
    """A --num_train / --num_test value as a config field: ``all`` is None."""
    return None if value == "all" else value


def explicit(name: str) -> bool:
    """Whether flag ``name`` was given on the command line (or overridden)."""
    return FLAGS[name].present or FLAGS[name].value != FLAGS[name].default
