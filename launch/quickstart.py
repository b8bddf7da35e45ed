r"""The quickstart: the paper's three studies, small, offline, in minutes.

With no arguments, on 2 CPU cores in about a quarter of an hour:

1. Fashion-MNIST (the real data, from Debian's dataset-fashion-mnist or
   --data_dir): a small HMC posterior, a VI posterior and an SGD network;
2. the attack table on them: random, FGSM, PGD and APGD-CE with both
   gradient definitions, Square Attack and the per-example worst case;
   accuracy on attacked inputs next to the paper's figures, and unchanged
   predictions; and the robustness report of the HMC and VI posteriors
   (APGD-T too, the gradient-masking checks, a verdict);
3. the gradient study: half-moons HMC over widths and training sizes, and
   the gradient size against the number of posterior samples on the three
   Fashion-MNIST models;
4. a small robustness-accuracy sweep;
5. a small paper ablation (the authors' semantics, switch by switch).

Prints the table and where the figures are.  Study flags given explicitly
(--num_train, --num_test, --hidden, --epochs, --widths, --train_sizes,
--sample_counts, --training_lengths, --hmc_lengths, --pgd_steps,
--apgd_steps, --square_queries, and every HMC flag: --num_chains, --num_burnin_steps,
--num_results, --step_size, --trajectory_length, --num_leapfrog_steps, ...)
override the quick settings; the HMC flags apply to every HMC posterior of
the quickstart.

Every HMC posterior is diagnosed (function-space R-hat on held-out test
points; ``results.json``, ``figures/traces_*.png``).  If the Fashion-MNIST
HMC posterior has not converged (R-hat median above --max_rhat), the
quickstart stops right after fitting it, with its posterior and diagnostics
saved; with --allow_unconverged it goes on and every table, legend and the
summary mark it "HMC (UNCONVERGED)".

A rerun in the same --output_dir resumes (HMC from its checkpoints, the
sweep from its finished runs) only with the same settings: any other is
refused before anything is fitted, naming what differs, unless --overwrite
deletes the earlier run.

The work is :func:`tfp_bnn_adv.studies.quickstart.run_quickstart`'s.

Example:
  python -m launch.quickstart --output_dir=quickstart_out
"""

import dataclasses

from absl import app

from launch import flags as lf
from tfp_bnn_adv.studies import quickstart as quickstart_lib
from tfp_bnn_adv.studies.attack_table import AttackTableConfig
from tfp_bnn_adv.studies.gradient_study import GradientStudyConfig
from tfp_bnn_adv.studies.paper_ablation import PaperAblationConfig
from tfp_bnn_adv.studies.quickstart import HIDDEN
from tfp_bnn_adv.studies.quickstart import LABELS
from tfp_bnn_adv.studies.quickstart import NUM_TRAIN
from tfp_bnn_adv.studies.quickstart import REPORT_LABELS
from tfp_bnn_adv.studies.quickstart import MOONS_TRAIN_SIZES
from tfp_bnn_adv.studies.quickstart import SETTINGS
from tfp_bnn_adv.studies.quickstart import SUBSTUDIES
from tfp_bnn_adv.studies.quickstart import TABLE_ATTACKS
from tfp_bnn_adv.studies.quickstart import QuickstartConfig
from tfp_bnn_adv.studies.quickstart import fingerprint
from tfp_bnn_adv.studies.quickstart import run_quickstart
from tfp_bnn_adv.studies.robustness_accuracy import RobustnessAccuracyConfig
from tfp_bnn_adv.studies.training import InferenceSettings

__all__ = ["config_from_flags", "plan_from_flags", "fingerprint", "main",
           "Plan", "DEFAULT_OUTPUT_DIR", "NUM_TRAIN", "HIDDEN", "SETTINGS",
           "LABELS", "SUBSTUDIES"]

FLAGS = lf.FLAGS
DEFAULT_OUTPUT_DIR = "quickstart_out"

SHARED = lf.use("num_train", "hidden", "allow_unconverged", "widths",
                "train_sizes", "sample_counts", "training_lengths",
                "hmc_lengths", "pgd_steps", "apgd_steps", "square_queries",
                "epochs",
                "vi_samples", "switches", *lf.HMC_FLAGS)
lf.adopt(__name__, SHARED)

# The name the quickstart's config had when it lived here.
Plan = QuickstartConfig


def _overrides(mapping) -> dict:
    """Config fields from the flags the user gave explicitly."""
    out = {}
    for flag, (field, convert) in mapping.items():
        if lf.explicit(flag):
            out[field] = convert(FLAGS[flag].value, flag)
    return out


def _value(v, _):
    return v


def _count(v, _):
    return lf.count(v)


def _settings(method: str, seed: int) -> InferenceSettings:
    if method == "hmc":
        return SETTINGS["hmc"].replace(seed=seed, **lf.hmc_overrides())
    names = {"vi": ("epochs", "vi_samples"), "sgd": ("epochs",)}[method]
    return SETTINGS[method].replace(
        seed=seed, **{n: FLAGS[n].value for n in names if lf.explicit(n)})


def config_from_flags() -> QuickstartConfig:
    """The quickstart's settings and its three studies' configs, validated."""
    seed = FLAGS.seed
    num_train = (NUM_TRAIN if FLAGS.num_train is None
                 else lf.count(FLAGS.num_train))
    hidden = lf.ints(FLAGS.hidden, "hidden") if lf.explicit("hidden") else HIDDEN
    data = dict(data_dir=FLAGS.data_dir, data_source=FLAGS.data_source,
                **lf.convergence())
    hmc_flags = lf.hmc_overrides()
    table = AttackTableConfig.quick(
        dataset="fashion_mnist", seed=seed, attacks=TABLE_ATTACKS,
        report_labels=REPORT_LABELS, **data,
        **_overrides({
            "num_test": ("num_test", _count),
            "pgd_steps": ("pgd_steps", _value),
            "apgd_steps": ("apgd_steps", _value),
            "square_queries": ("square_queries", _value)}))
    grads = GradientStudyConfig.quick(
        image_dataset="fashion_mnist", seed=seed, **data, **{
            "moons_train_sizes": MOONS_TRAIN_SIZES, **_overrides({
                "widths": ("moons_widths", lf.ints),
                "train_sizes": ("moons_train_sizes", lf.ints),
                "sample_counts": ("sample_counts", lf.ints),
                "num_test": ("num_test", _count)})})
    grads = dataclasses.replace(grads,
                                moons_hmc=grads.moons_hmc.replace(**hmc_flags))
    sweep = RobustnessAccuracyConfig.quick(
        num_train=num_train, **data, **_overrides({
            "widths": ("widths", lf.ints),
            "training_lengths": ("training_lengths", lf.ints),
            "hmc_lengths": ("hmc_lengths", lf.ints),
            "num_test": ("num_test", _count)}))
    sweep = dataclasses.replace(sweep, hmc=sweep.hmc.replace(**hmc_flags))
    settings = {m: _settings(m, seed) for m in SETTINGS}
    # The ablation scores the quickstart's own HMC and VI posteriors on the
    # attack table's test points, PGD and thinning, so its corrected row is
    # the table's predictive-gradient columns.
    ablation = PaperAblationConfig.quick(
        num_train=num_train, hidden=hidden, num_test=table.num_test,
        pgd_steps=table.pgd_steps, max_samples=table.max_samples,
        switches=tuple(FLAGS.switches),
        hmc=settings["hmc"], vi=settings["vi"],
        seed=seed, **data)
    config = QuickstartConfig(
        table=table, grads=grads, sweep=sweep, ablation=ablation,
        num_train=num_train,
        hidden=hidden, settings=settings, seed=seed, **data)
    config.validate()
    return config


# The name config_from_flags had.
plan_from_flags = config_from_flags


def main(argv):
    del argv
    if not FLAGS.output_dir:
        FLAGS.output_dir = DEFAULT_OUTPUT_DIR
    out_dir, config, _ = lf.start(
        "quickstart", config_from_flags, fingerprint,
        directories=quickstart_lib.owned_directories(SETTINGS),
        flag_list=lf.script_flags(__name__, SHARED))
    # --strategy: HMC, gradients and attacks spread over its replicas.
    try:
        with lf.strategy().scope():
            results = run_quickstart(config, out_dir,
                                     overwrite=FLAGS.overwrite)
    except quickstart_lib.FashionMnistMissingError as e:
        raise app.UsageError(str(e)) from e
    print(results["summary_markdown"])
    print(f"All results in {out_dir}/ (summary.md, */results.json, "
          "*/figures/*.png).")


if __name__ == "__main__":
    app.run(main)
