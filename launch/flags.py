"""The launch scripts' shared flags, and the helpers that read them.

Each script defines the flags only it reads at its own module level; the
core every script reads (:data:`CORE_FLAGS`: where it writes, the data's
location, the seed, the convergence threshold, how it runs) is defined
here.  Flags that some scripts share (the HMC settings, ``--hidden``,
``--widths``, ...) are defined here too, by :func:`use`, only when a script
asks for them: a script's ``--help`` and ``flags.txt`` list its own flags
and nothing else, and absl's refusal of a flag defined twice cannot strike
when several scripts are imported into one process (as the tests do).
Scripts stay thin: flags -> config -> ``run_*`` -> files.

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
from tfp_bnn_adv import distribute
from tfp_bnn_adv import files
from tfp_bnn_adv.studies import common
from tfp_bnn_adv.studies.paper_ablation import ABLATED
from tfp_bnn_adv.studies.training import METHODS

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
            return int_list([argument], "", 1)[0]
        except ValueError:
            raise ValueError(f"{argument!r} is not a positive integer or "
                             "'all'") from None

    def flag_type(self):
        return "int >= 1 or 'all'"


def define_count(name: str, help_text: str) -> None:
    """Defines a flag of a positive integer or ``all`` (a subset size)."""
    flags.DEFINE(_CountParser(), name, None, help_text,
                 serializer=flags.ArgumentSerializer())
    flags.register_validator(
        name, lambda v: v is None or v == "all" or (
            isinstance(v, int) and not isinstance(v, bool) and v >= 1),
        message=f"--{name} must be a positive integer or 'all' (0 and "
        "negative counts are refused; 'all' is spelled out)")


def int_list(values, name: str, minimum: int) -> tuple:
    """A list flag's items as ints ``>= minimum``, else a ValueError."""
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


def mlp_widths_ok(values) -> bool:
    """Whether ``--hidden`` has no 0 unless ``--architecture=cnn``."""
    if values["architecture"] == "cnn":
        return True
    try:
        return 0 not in int_list(values["hidden"], "hidden", 0)
    except ValueError:
        return True  # --hidden's own validator names the bad item


def float_list(values, name: str) -> tuple:
    """A list flag's items as finite floats ``>= 0``, else a ValueError."""
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


def check_choices(values, name: str, allowed: Sequence[str]) -> tuple:
    """A list flag's items if each is in ``allowed``, else a ValueError."""
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"--{name} may hold {', '.join(allowed)}; "
                         f"{', '.join(map(repr, bad))} "
                         f"{'is' if len(bad) == 1 else 'are'} not.")
    return tuple(values)


def check_posteriors(values, name: str) -> tuple:
    """``label=path`` or ``path`` items with a path, else a ValueError."""
    for v in values:
        if not v.rpartition("=")[2]:
            raise ValueError(f"--{name} items are label=path or path; {v!r} "
                             "has no path.")
    return tuple(values)


def register(name: str, check: Callable) -> None:
    """A validator that raises ``check``'s ValueError as the flag's error."""
    def validate(value):
        try:
            check(value)
        except ValueError as e:
            raise flags.ValidationError(str(e)) from e
        return True
    flags.register_validator(name, validate)


def positive_float(name: str, allow_zero: bool = False) -> None:
    """A validator: flag ``name`` is finite and ``> 0`` (``>= 0``)."""
    bound = ">= 0" if allow_zero else "> 0"
    flags.register_validator(
        name, lambda v: v is None or (math.isfinite(v) and (
            v >= 0 if allow_zero else v > 0)),
        message=f"--{name} must be a finite number {bound}")


# ------------------------------------------------------------------ the core
# What every script reads.
flags.DEFINE_string("output_dir", None, "Directory for results.json, tables, "
                    "figures/, checkpoints; created if missing. Required.")
flags.DEFINE_integer("seed", 0, "Seed of everything random (stateless).",
                     lower_bound=0)
flags.DEFINE_bool("overwrite", False, "Delete the results of an earlier run "
                  "in --output_dir (results.json, tables, figures/, "
                  "checkpoints, runs/) and start afresh. Without it a run "
                  "resumes only the configuration that wrote them (the "
                  "fingerprint in results.json) and refuses any other, "
                  "naming the settings that differ.")
flags.DEFINE_string("data_dir", None, "Directory with the four IDX .gz files, "
                    "or a TFDS data_dir.")
flags.DEFINE_enum("data_source", "auto", ["auto", "idx", "tfds"],
                  "Where image data is read from.")
define_count("num_test", "Test points to evaluate/attack, or 'all' "
              "(default: all for launch.train, the preset's for the "
              "studies).")
flags.DEFINE_float("max_rhat", 1.1, "An HMC posterior is converged when the "
                   "median over probe points of its function-space R-hat is "
                   "at most this (>= 1).")
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
flags.DEFINE_enum("jit", "auto", ["auto", "xla", "default"],
                  "Compile hot functions with XLA, TF's default kernels, or "
                  "whichever measures faster (auto; on CPU).")

CORE_FLAGS = ("output_dir", "seed", "overwrite", "data_dir", "data_source",
              "num_test", "max_rhat", "strategy", "tpu", "logical_cpus", "jit")


# ------------------------------------------------- flags some scripts share
# name -> what defines it (with its validator); :func:`use` runs it once.

# Every script takes quick and paper; cpu is launch.reproduce's alone.
PRESETS = ("quick", "cpu", "paper")
_REPRODUCE_ONLY_PRESETS = ("cpu",)


def _define_preset():
    flags.DEFINE_enum("preset", "quick", list(PRESETS),
                      "quick: minutes on a laptop. paper: the paper's scale "
                      "(full datasets, 100+ samples, ~1000 models in the "
                      "sweep). cpu (launch.reproduce only): the largest "
                      "scale that finishes in hours on 2 CPU cores.")


def _define_dataset():
    flags.DEFINE_enum("dataset", "fashion_mnist", list(data_lib.DATASET_NAMES),
                      "Dataset.")


def _define_num_train():
    define_count("num_train", "Training subset size, or 'all' (default: all "
                  "for launch.train, the preset's for the studies).")


def _define_half_moons_n():
    flags.DEFINE_integer("half_moons_n", 2000, "Half-moons points (80/20 "
                         "split).", lower_bound=2)


def _define_hidden():
    flags.DEFINE_list("hidden", ["512"], "Hidden widths of the MLP (or of the "
                      "dense layers after the CNN's convolutions).")
    register("hidden", lambda v: int_list(v, "hidden", 0))


def _define_keras_model():
    flags.DEFINE_string("keras_model", None, "A .keras file with your own "
                        "model (Keras 3; supported layers only), used instead "
                        "of the built-in architecture.")


def _define_allow_unconverged():
    flags.DEFINE_bool("allow_unconverged", False, "Write a study's headline "
                      "(attack table, gradient study, robustness-accuracy "
                      "summary) even from unconverged HMC posteriors, marked "
                      "(UNCONVERGED); without it the study stops with an "
                      "error.")


def _define_list(name: str, help_text: str):
    def define():
        flags.DEFINE_list(name, [], help_text)
        register(name, lambda v: int_list(v, name, 1))
    return define


def _define_methods():
    flags.DEFINE_list("methods", [], "Methods of a study (default: the "
                      "preset's).")
    register("methods", lambda v: check_choices(v, "methods", METHODS))


def _define_optional_int(name: str, help_text: str):
    def define():
        flags.DEFINE_integer(name, None, help_text, lower_bound=1)
    return define


def _define_positive_float(name: str, default, help_text: str):
    def define():
        flags.DEFINE_float(name, default, help_text)
        positive_float(name)
    return define


def _define_int(name: str, default: int, help_text: str, lower_bound: int):
    def define():
        flags.DEFINE_integer(name, default, help_text, lower_bound=lower_bound)
    return define


def _define_enum(name: str, default: str, values, help_text: str):
    def define():
        flags.DEFINE_enum(name, default, list(values), help_text)
    return define


def _define_eps():
    flags.DEFINE_float("eps", 0.25, "L-inf attack radius on [0, 1] inputs.")
    positive_float("eps", allow_zero=True)


def _define_switches():
    flags.DEFINE_list("switches", list(ABLATED), "The paper-semantics "
                      "switches the ablation turns on and off: "
                      f"{', '.join(ABLATED)}.")
    register("switches", lambda v: check_choices(v, "switches", ABLATED))


def _define_trajectory_length():
    flags.DEFINE_float("trajectory_length", None, "HMC integration time; the "
                       "leapfrog count per iteration follows from it and the "
                       "adapted step size (default: HMCConfig's, 4.0, unless "
                       "--num_leapfrog_steps is given).")
    positive_float("trajectory_length")


_SHARED = {
    "preset": _define_preset,
    "eps": _define_eps,
    "switches": _define_switches,
    "dataset": _define_dataset,
    "num_train": _define_num_train,
    "half_moons_n": _define_half_moons_n,
    "hidden": _define_hidden,
    "keras_model": _define_keras_model,
    "allow_unconverged": _define_allow_unconverged,
    "widths": _define_list("widths", "Hidden widths swept by the gradient "
                           "study (half-moons) and the robustness-accuracy "
                           "sweep."),
    "train_sizes": _define_list("train_sizes", "Half-moons training-set sizes "
                                "of the gradient study."),
    "sample_counts": _define_list("sample_counts", "Posterior sample counts "
                                  "of the gradient study."),
    "training_lengths": _define_list("training_lengths", "SGD/VI epochs of "
                                     "the sweep."),
    "hmc_lengths": _define_list("hmc_lengths", "HMC burn-in lengths of the "
                                "sweep."),
    "methods": _define_methods,
    "pgd_steps": _define_optional_int("pgd_steps", "PGD steps (default: the "
                                      "preset's)."),
    "apgd_steps": _define_optional_int("apgd_steps", "APGD iterations, per "
                                       "target for APGD-T (default: the "
                                       "preset's)."),
    "square_queries": _define_optional_int("square_queries", "Square Attack "
                                           "query budget (default: the "
                                           "preset's)."),
    "epochs": _define_int("epochs", 10, "VI / SGD epochs.", 1),
    "vi_samples": _define_int("vi_samples", 100, "Posterior samples drawn "
                              "from VI.", 1),
    # HMC.
    "num_chains": _define_int("num_chains", 4, "HMC chains.", 1),
    "num_burnin_steps": _define_int("num_burnin_steps", 500, "HMC warm-up "
                                    "iterations (step size and mass matrix "
                                    "adapt).", 0),
    "num_results": _define_int("num_results", 200, "HMC samples kept per "
                               "chain.", 1),
    "thinning": _define_int("thinning", 1, "HMC iterations per kept sample.",
                            1),
    "step_size": _define_positive_float("step_size", 0.01, "Initial HMC step "
                                        "size (adapted)."),
    "trajectory_length": _define_trajectory_length,
    "num_leapfrog_steps": _define_optional_int(
        "num_leapfrog_steps", "A fixed HMC leapfrog count instead of "
        "--trajectory_length (default: unset, use --trajectory_length)."),
    "max_leapfrog_steps": _define_int("max_leapfrog_steps", 100, "Cap on HMC "
                                      "leapfrog steps per iteration.", 1),
    "mass_matrix": _define_enum("mass_matrix", "diagonal",
                                ["diagonal", "identity"], "HMC mass matrix: "
                                "adapted diagonal, or identity (plain HMC)."),
    "kernel": _define_enum("kernel", "hmc", ["hmc", "nuts"], "MCMC kernel."),
    "hmc_init": _define_enum("hmc_init", "prior", ["prior", "sgd"],
                             "HMC initial state: a prior draw or a short SGD "
                             "fit."),
    "prior_scale": _define_positive_float("prior_scale", 1.0, "Prior std of "
                                          "every weight (HMC, VI)."),
    "hmc_parallelism": _define_enum(
        "hmc_parallelism", "data", ["data", "chains"], "With several "
        "replicas, HMC splits the training data (all-reduce of "
        "log-likelihood and gradient) or the chains."),
    "matmul_precision": _define_enum(
        "matmul_precision", "highest", ["highest", "default"], "HMC's float32 "
        "matmul precision: full float32, or the hardware default (TF32 on "
        "Ampere GPUs, bfloat16 passes on TPUs: faster, but HMC may "
        "diverge)."),
}

# The flags that set HMC (each the InferenceSettings field of that name).
HMC_FLAGS = ("num_chains", "num_burnin_steps", "num_results", "thinning",
             "step_size", "trajectory_length", "num_leapfrog_steps",
             "max_leapfrog_steps", "mass_matrix", "kernel", "hmc_init",
             "prior_scale", "hmc_parallelism", "matmul_precision")


def use(*names: str) -> tuple:
    """Defines the shared flags ``names`` a script reads (each only once).

    Call it at the script's module level, before ``adopt()``.

    Returns:
      ``names``, for the script's :data:`flag list <start>`.

    Raises:
      KeyError: for a name that is not a shared flag.
    """
    for name in names:
        if name not in FLAGS:
            _SHARED[name]()
    return names


def adopt(script_module: str, shared: Sequence[str]) -> None:
    """Makes the core and ``shared`` key flags of ``script_module``.

    So that ``python -m launch.<script> --help`` lists them beside the
    script's own flags (absl's ``--help`` shows a main module's key flags).

    Args:
      script_module: the script's ``__name__``.
      shared: the shared flags it reads (:func:`use`'s result).
    """
    module = sys.argv[0] if script_module == "__main__" else script_module
    for name in CORE_FLAGS + tuple(shared):
        FLAGS.register_key_flag_for_module(module, FLAGS[name])


def script_flags(script_module: str, shared: Sequence[str]) -> list:
    """Every flag a script reads: the core, ``shared`` and its own."""
    own = FLAGS.get_flags_for_module(script_module)
    names = set(CORE_FLAGS) | set(shared) | {f.name for f in own}
    return [FLAGS[name] for name in sorted(names)]


class Start(NamedTuple):
    """What :func:`start` checked: where to write, the config, its fingerprint."""
    output_dir: str
    config: Any
    fingerprint: dict | None


def start(script: str, make_config: Callable[[], Any] | None = None,
          fingerprint: Callable[[Any], dict] | None = None, *,
          directories: Sequence[str] = (),
          flag_list: Sequence[Any] | None = None) -> Start:
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
      flag_list: the flags the script reads (:func:`script_flags`), written
        to ``flags.txt``; default: the core.

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
    if "keras_model" in FLAGS and FLAGS.keras_model and not os.path.isfile(
            FLAGS.keras_model):
        problems.append(f"--keras_model={FLAGS.keras_model!r}: no such file.")
    if ("preset" in FLAGS and FLAGS.preset in _REPRODUCE_ONLY_PRESETS
            and script != "reproduce"):
        problems.append(f"--preset={FLAGS.preset} is launch.reproduce's; "
                        f"{script} takes --preset=quick or --preset=paper.")
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
        distribute.configure_logical_cpus(FLAGS.logical_cpus)
    os.makedirs(out, exist_ok=True)
    os.environ["TFP_BNN_ADV_JIT"] = FLAGS.jit
    logging.set_verbosity(logging.INFO)
    command = " ".join(shlex.quote(a) for a in sys.argv)
    # The value of every flag the script reads, so the run can be repeated
    # exactly even when it was started programmatically.
    if flag_list is None:
        flag_list = [FLAGS[name] for name in sorted(CORE_FLAGS)]
    values = "\n".join(
        f.serialize() if f.value is not None else f"# --{f.name} (unset)"
        for f in sorted(flag_list, key=lambda f: f.name))
    files.write_text(os.path.join(out, "flags.txt"),
                     f"# {script}\n{command}\n\n# all flags\n{values}\n")
    logging.info("%s: writing to %s", script, out)
    return Start(out, config, fp)


def strategy():
    """The tf.distribute strategy named by --strategy / --tpu."""
    return distribute.get_strategy(FLAGS.strategy, tpu=FLAGS.tpu)


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


def ints(values, name: str, minimum: int = 1) -> tuple:
    """A list flag as ints ``>= minimum``, else a FlagError naming it."""
    try:
        return int_list(values, name, minimum)
    except ValueError as e:
        raise FlagError(str(e)) from e


def floats(values, name: str) -> tuple:
    """A list flag as finite floats ``>= 0``, else a FlagError naming it."""
    try:
        return float_list(values, name)
    except ValueError as e:
        raise FlagError(str(e)) from e


def count(value):
    """A --num_train / --num_test value as a config field: ``all`` is None."""
    return None if value == "all" else value


def explicit(name: str) -> bool:
    """Whether flag ``name`` was given on the command line (or overridden)."""
    return FLAGS[name].present or FLAGS[name].value != FLAGS[name].default
