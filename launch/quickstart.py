r"""The quickstart: the paper's three studies, small, offline, in minutes.

With no arguments, on 2 CPU cores in about a quarter of an hour:

1. Fashion-MNIST (the real data, from Debian's dataset-fashion-mnist or
   --data_dir): a small HMC posterior, a VI posterior and an SGD network;
2. the attack table on them: random, FGSM and PGD with both gradient
   definitions, Square Attack; accuracy on attacked inputs next to the
   paper's figures, and unchanged predictions;
3. the gradient study: half-moons HMC over widths and training sizes, and
   the gradient size against the number of posterior samples on the three
   Fashion-MNIST models;
4. a small robustness-accuracy sweep.

Prints the table and where the figures are.  Study flags given explicitly
(--num_train, --num_test, --hidden, --epochs, --widths, --train_sizes,
--sample_counts, --training_lengths, --hmc_lengths, --pgd_steps,
--square_queries, and every HMC flag: --num_chains, --num_burnin_steps,
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

Example:
  python -m launch.quickstart --output_dir=quickstart_out
"""

import dataclasses
import os
import time

from absl import app
from absl import logging

from launch import flags as lf
from tfp_bnn_adv import data as data_lib
from tfp_bnn_adv import files
from tfp_bnn_adv import models
from tfp_bnn_adv.studies import common
from tfp_bnn_adv.studies.attack_table import AttackTableConfig
from tfp_bnn_adv.studies.attack_table import fingerprint as table_fingerprint
from tfp_bnn_adv.studies.attack_table import run_attack_table
from tfp_bnn_adv.studies.gradient_study import GradientStudyConfig
from tfp_bnn_adv.studies.gradient_study import fingerprint as grad_fingerprint
from tfp_bnn_adv.studies.gradient_study import run_gradient_study
from tfp_bnn_adv.studies.robustness_accuracy import RobustnessAccuracyConfig
from tfp_bnn_adv.studies.robustness_accuracy import fingerprint as sweep_fingerprint
from tfp_bnn_adv.studies.robustness_accuracy import run_robustness_accuracy
from tfp_bnn_adv.studies.training import InferenceSettings
from tfp_bnn_adv.studies.training import fit_posterior

FLAGS = lf.FLAGS
DEFAULT_OUTPUT_DIR = "quickstart_out"
# The largest Fashion-MNIST HMC posterior we measured to converge within the
# quickstart's budget on 2 cores: 500 points, 784-16-10, 4 chains of 700
# warm-up and 300 kept iterations at the default trajectory length (100
# leapfrog steps per iteration) gave a function-space R-hat median of 1.023
# (100% of 300 test points < 1.1) in 219 s on a 2-core Zen 3.  1000 points
# at width 32 with 300 + 100 iterations did not (median 1.25).  VI and SGD
# use the same data and architecture so the table compares like with like.
NUM_TRAIN = 500
HIDDEN = (16,)
SETTINGS = {
    "hmc": InferenceSettings(method="hmc", num_chains=4, num_burnin_steps=700,
                             num_results=300),
    "vi": InferenceSettings(method="vi", epochs=8, learning_rate=1e-2,
                            vi_samples=100),
    "sgd": InferenceSettings(method="sgd", epochs=8, learning_rate=1e-3),
}
LABELS = {"hmc": "HMC", "vi": "VI", "sgd": "NN (SGD)"}
SUBSTUDIES = ("attack_table", "gradient_study", "robustness_accuracy")


def _fashion(seed, num_train):
    try:
        ds = data_lib.fashion_mnist(data_dir=FLAGS.data_dir,
                                    source=FLAGS.data_source)
    except FileNotFoundError as e:
        raise app.UsageError(
            "The quickstart needs Fashion-MNIST offline. Install it with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or "
            "put the four IDX .gz files in a directory and pass "
            f"--data_dir=DIR.\n{e}") from e
    return ds.subset(num_train=num_train, seed=seed)


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


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the quickstart runs, from the flags."""
    num_train: int | None
    hidden: tuple
    settings: dict
    table: AttackTableConfig
    grads: GradientStudyConfig
    sweep: RobustnessAccuracyConfig


def plan_from_flags() -> Plan:
    """The quickstart's settings and its three studies' configs, validated."""
    seed = FLAGS.seed
    num_train = (NUM_TRAIN if FLAGS.num_train is None
                 else lf.count(FLAGS.num_train))
    hidden = lf.ints(FLAGS.hidden, "hidden") if lf.explicit("hidden") else HIDDEN
    data = dict(data_dir=FLAGS.data_dir, data_source=FLAGS.data_source,
                **lf.convergence())
    hmc_flags = lf.hmc_overrides()
    table = AttackTableConfig.quick(
        dataset="fashion_mnist", seed=seed, **data, **_overrides({
            "num_test": ("num_test", _count),
            "pgd_steps": ("pgd_steps", _value),
            "square_queries": ("square_queries", _value)}))
    grads = GradientStudyConfig.quick(
        image_dataset="fashion_mnist", seed=seed, **data, **_overrides({
            "widths": ("moons_widths", lf.ints),
            "train_sizes": ("moons_train_sizes", lf.ints),
            "sample_counts": ("sample_counts", lf.ints),
            "num_test": ("num_test", _count)}))
    grads = dataclasses.replace(grads,
                                moons_hmc=grads.moons_hmc.replace(**hmc_flags))
    sweep = RobustnessAccuracyConfig.quick(
        num_train=num_train, **data, **_overrides({
            "widths": ("widths", lf.ints),
            "training_lengths": ("training_lengths", lf.ints),
            "hmc_lengths": ("hmc_lengths", lf.ints),
            "num_test": ("num_test", _count)}))
    sweep = dataclasses.replace(sweep, hmc=sweep.hmc.replace(**hmc_flags))
    for config in (table, grads, sweep):
        config.validate()
    return Plan(num_train, hidden, {m: _settings(m, seed) for m in SETTINGS},
                table, grads, sweep)


def fingerprint(plan: Plan) -> dict:
    """The quickstart's :func:`~tfp_bnn_adv.studies.common.fingerprint`.

    Fields: the Fashion-MNIST location, the subset size, the hidden widths,
    each method's settings, --max_rhat, and the fingerprint fields of the
    three studies' configs (their posteriors are the ones fitted here, so
    they are covered by the fields before).
    """
    return common.fingerprint("quickstart", {
        "data": common.data_fields("fashion_mnist", FLAGS.data_dir,
                                   FLAGS.data_source),
        "num_train": plan.num_train, "hidden": list(plan.hidden),
        "settings": {m: common.settings_fields(s)
                     for m, s in plan.settings.items()},
        "max_rhat": FLAGS.max_rhat,
        "attack_table": table_fingerprint(plan.table)["fields"],
        "gradient_study": grad_fingerprint(plan.grads)["fields"],
        "robustness_accuracy": sweep_fingerprint(plan.sweep)["fields"]})


def main(argv):
    del argv
    if not FLAGS.output_dir:
        FLAGS.output_dir = DEFAULT_OUTPUT_DIR
    out_dir, plan, fp = lf.start(
        "quickstart", plan_from_flags, fingerprint,
        directories=tuple(f"ckpt/{m}" for m in SETTINGS) + SUBSTUDIES
        + ("robustness_accuracy/runs",))
    # --strategy: HMC, gradients and attacks spread over its replicas.
    with lf.strategy().scope():
        _run(out_dir, plan, fp)


def _run(out_dir: str, plan: Plan, fp: dict) -> None:
    """The four stages; see the module docstring."""
    start = time.perf_counter()
    ds = _fashion(FLAGS.seed, plan.num_train)
    out = common.StudyOutput(
        out_dir, "quickstart", fingerprint=fp, overwrite=FLAGS.overwrite,
        owned=("ckpt", "summary.md") + SUBSTUDIES + tuple(
            f"posterior_{m}.npz" for m in SETTINGS))
    ensembles, reports = {}, {}
    for method, settings in plan.settings.items():
        logging.info("[quickstart] stage 1/4: %s on Fashion-MNIST (%d points)",
                     method, len(ds.train_x))
        model = models.mlp(ds.input_shape, ds.num_classes, plan.hidden)
        ens, _ = fit_posterior(
            model, ds.train_x, ds.train_y, settings,
            checkpoint_dir=os.path.join(out_dir, "ckpt", method),
            probe_x=ds.test_x, probe_y=ds.test_y, max_rhat=FLAGS.max_rhat)
        ens.metadata["dataset"] = "fashion_mnist"
        ens.save(os.path.join(out_dir, f"posterior_{method}.npz"))
        ensembles[method] = ens
        reports[LABELS[method]] = common.record_posterior(
            out, LABELS[method], ens, FLAGS.max_rhat)
        # Stop before anything else is fitted: nothing may be presented as
        # "HMC" from chains that have not mixed.
        common.require_converged(
            reports, allow_unconverged=FLAGS.allow_unconverged,
            what="the quickstart's comparison",
            saved_to=out.path("results.json"))

    # The attack table and the gradient study recompute everything from the
    # posteriors above, whose configuration the quickstart's fingerprint has
    # just checked; their own fingerprints hold the posteriors' SHA-256,
    # which a refit may change in the last bits, so they start afresh.
    logging.info("[quickstart] stage 2/4: attack table")
    table = run_attack_table(
        plan.table, os.path.join(out_dir, "attack_table"),
        ensembles={LABELS[m]: e for m, e in ensembles.items()},
        overwrite=True)

    logging.info("[quickstart] stage 3/4: gradient study")
    grads = run_gradient_study(
        plan.grads, os.path.join(out_dir, "gradient_study"),
        image_ensembles=ensembles, overwrite=True)

    logging.info("[quickstart] stage 4/4: robustness-accuracy sweep")
    sweep = run_robustness_accuracy(
        plan.sweep, os.path.join(out_dir, "robustness_accuracy"))

    minutes = (time.perf_counter() - start) / 60
    figures = table["figures"] + grads["figures"] + sweep["figures"]
    unconverged = [f"{study}: {label}" for study, res in (
        ("attack table", table), ("gradient study", grads),
        ("robustness-accuracy sweep", sweep)) for label in res["unconverged"]]
    warning = ("**Warning:** unconverged HMC posteriors were used because "
               "--allow_unconverged was given; they are marked (UNCONVERGED) "
               "and their numbers are not those of the posterior: "
               + "; ".join(unconverged) + ".\n\n" if unconverged else "")
    convergence = "\n".join(f"- {common.describe(label, r)}"
                            for label, r in reports.items()
                            if r["method"] in ("hmc", "vi"))
    summary = (f"# tfp_bnn_adv quickstart ({minutes:.1f} min)\n\n" + warning
               + table["table_markdown"] + "\n## Convergence\n\n"
               + convergence + "\n\n## Figures\n\n"
               + "\n".join(f"- {f}" for f in figures) + "\n")
    out.update({"unconverged": unconverged, "summary": os.path.join(
        out_dir, "summary.md")})
    files.write_text(os.path.join(out_dir, "summary.md"), summary)
    print(summary)
    print(f"All results in {out_dir}/ (summary.md, */results.json, "
          "*/figures/*.png).")


if __name__ == "__main__":
    app.run(main)
