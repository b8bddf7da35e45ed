r"""The attack table: random / FGSM / PGD / APGD-CE / APGD-T (both
gradients) / Square, the per-example worst case, and a verdict per posterior.

Attacks saved posteriors (``--posteriors=label=path,...``, written by
``launch.train``) and writes ``table.md`` (accuracy on attacked inputs next to
the paper's figures, and unchanged predictions), ``table.csv``,
``results.json`` (with each HMC posterior's diagnostics) and ``figures/``
(with a trace plot per HMC posterior), and with --verdict (the default) a
robustness report per posterior under ``reports/<label>/`` whose verdict
("robust", "not_robust" or "inconclusive", with the failed gradient-masking
checks named) is in the table.  An unconverged HMC posterior (its
function-space R-hat median above --max_rhat) stops the script before any
attack unless --allow_unconverged is given; then its rows are marked
(UNCONVERGED).  Rerun in the same --output_dir only with the same settings
and posterior files (their SHA-256 is in results.json): anything else is
refused, naming what differs, unless --overwrite deletes the earlier table.

Example:
  python -m launch.attack --output_dir=runs/table --dataset=fashion_mnist \
      --posteriors=HMC=runs/fmnist_hmc/posterior.npz,VI=runs/fmnist_vi/posterior.npz \
      --preset=paper
"""

from absl import app
from absl import flags

from launch import flags as lf
from tfp_bnn_adv.studies.attack_table import ATTACKS
from tfp_bnn_adv.studies.attack_table import GRADIENTS
from tfp_bnn_adv.studies.attack_table import AttackTableConfig
from tfp_bnn_adv.studies.attack_table import fingerprint
from tfp_bnn_adv.studies.attack_table import run_attack_table

FLAGS = lf.FLAGS

SHARED = lf.use("preset", "dataset", "half_moons_n", "allow_unconverged",
                "pgd_steps", "apgd_steps", "square_queries", "eps")
flags.DEFINE_list("posteriors", [], "Saved posteriors to attack: "
                  "label=path or path (the label defaults to the method).")
flags.DEFINE_list("eps_sweep", [], "Extra radii for the attack table.")
flags.DEFINE_list("attacks", list(ATTACKS), "Attacks of the attack table.")
flags.DEFINE_list("gradients", ["expected", "predictive"],
                  f"Gradient definitions for FGSM/PGD: {', '.join(GRADIENTS)}.")
flags.DEFINE_boolean("verdict", True, "Run the robustness report "
                     "(tfp_bnn_adv.evaluation) on every posterior and put its "
                     "verdict in the table.")
flags.DEFINE_integer("report_num_test", None, "Test points of each robustness "
                     "report (default: the preset's; the table's num_test).",
                     lower_bound=1)
lf.register("posteriors", lambda v: lf.check_posteriors(v, "posteriors"))
lf.register("eps_sweep", lambda v: lf.float_list(v, "eps_sweep"))
lf.register("attacks", lambda v: lf.check_choices(v, "attacks", ATTACKS))
lf.register("gradients", lambda v: lf.check_choices(v, "gradients", GRADIENTS))
lf.adopt(__name__, SHARED)


def posteriors() -> tuple:
    """--posteriors as ``(label, path)`` pairs."""
    pairs = []
    for item in FLAGS.posteriors:
        label, _, path = item.rpartition("=")
        pairs.append((label or None, path))
    return tuple(pairs)


def config_from_flags() -> AttackTableConfig:
    if not FLAGS.posteriors:
        raise lf.FlagError("--posteriors is required (label=path,...).")
    make = AttackTableConfig.paper if FLAGS.preset == "paper" else AttackTableConfig.quick
    overrides = dict(
        posteriors=posteriors(), dataset=FLAGS.dataset, eps=FLAGS.eps,
        eps_sweep=lf.floats(FLAGS.eps_sweep, "eps_sweep"),
        attacks=tuple(FLAGS.attacks), gradients=tuple(FLAGS.gradients),
        data_dir=FLAGS.data_dir, data_source=FLAGS.data_source,
        half_moons_n=FLAGS.half_moons_n, seed=FLAGS.seed,
        verdict=FLAGS.verdict, **lf.convergence())
    if FLAGS.report_num_test is not None:
        overrides["report_num_test"] = FLAGS.report_num_test
    if FLAGS.num_test is not None:
        overrides["num_test"] = lf.count(FLAGS.num_test)
    for flag in ("pgd_steps", "apgd_steps", "square_queries"):
        if FLAGS[flag].value is not None:
            overrides[flag] = FLAGS[flag].value
    config = make(**overrides)
    config.validate()
    return config


def main(argv):
    del argv
    out_dir, config, _ = lf.start("attack", config_from_flags, fingerprint,
                                  flag_list=lf.script_flags(__name__, SHARED))
    with lf.strategy().scope():
        results = run_attack_table(config, out_dir, overwrite=FLAGS.overwrite)
    print(results["table_markdown"])
    print(f"Figures: {', '.join(results['figures'])}")


if __name__ == "__main__":
    app.run(main)
