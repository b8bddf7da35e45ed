r"""The robustness report of one saved posterior: battery, checks, verdict.

Loads ``--posterior`` (a file written by ``launch.train``), the first
``--num_examples`` test points of ``--dataset`` and, optionally, a
``--reference`` posterior (e.g. the SGD network) for the transfer check, and
runs :func:`tfp_bnn_adv.evaluation.robustness_report`.  Writes ``flags.txt``,
``report.md``, ``report.json`` and ``figures/accuracy_vs_eps.png`` into
``--output_dir`` and prints the verdict line.

Example:
  python -m launch.evaluate --output_dir=runs/report \
      --posterior=runs/fmnist_hmc/posterior.npz --dataset=fashion_mnist \
      --eps=0.1 --reference=runs/fmnist_sgd/posterior.npz
"""

import os

from absl import app
from absl import flags

from launch import flags as lf
from tfp_bnn_adv import evaluation
from tfp_bnn_adv.attacks import GRADIENTS
from tfp_bnn_adv.ensemble import PosteriorEnsemble
from tfp_bnn_adv.studies import common

FLAGS = lf.FLAGS

SHARED = lf.use("dataset", "half_moons_n", "eps", "square_queries")
flags.DEFINE_string("posterior", None, "The saved posterior to evaluate "
                    "(a .npz written by launch.train). Required.")
flags.DEFINE_string("reference", None, "An undefended model's saved "
                    "posterior (e.g. the SGD network) for the transfer check; "
                    "unset skips it.")
flags.DEFINE_integer("num_examples", 1000, "Test points evaluated (the "
                     "first ones; more than the test set holds means all).",
                     lower_bound=1)
flags.DEFINE_enum("gradient", "predictive", list(GRADIENTS),
                  "Gradient definition of the gradient attacks.")
flags.DEFINE_integer("steps", 100, "PGD and APGD steps (APGD-T: per "
                     "target).", lower_bound=1)
flags.DEFINE_integer("random_trials", 100, "Random draws per point.",
                     lower_bound=1)
flags.DEFINE_float("robust_fraction", 0.5, "'robust' needs a worst-case "
                   "accuracy of at least this fraction of the clean accuracy; "
                   "in (0, 1].")
lf.adopt(__name__, SHARED)


def config_from_flags() -> dict:
    """The flags as the report's arguments, checked before anything runs."""
    problems = []
    if not FLAGS.posterior:
        problems.append("--posterior is required (a saved posterior file).")
    for name in ("posterior", "reference"):
        path = FLAGS[name].value
        if path and not os.path.isfile(path):
            problems.append(f"--{name}={path!r}: no such file.")
    if lf.explicit("num_test"):
        problems.append("launch.evaluate takes --num_examples, not "
                        "--num_test.")
    if not 0.0 < FLAGS.eps <= 1.0:
        problems.append(f"--eps={FLAGS.eps:g} is outside the [0, 1] input "
                        "box: it must be in (0, 1].")
    if not 0.0 < FLAGS.robust_fraction <= 1.0:
        problems.append(f"--robust_fraction={FLAGS.robust_fraction:g} must "
                        "be in (0, 1].")
    if problems:
        raise lf.FlagError("\n".join(problems))
    options = dict(eps=FLAGS.eps, gradient=FLAGS.gradient, seed=FLAGS.seed,
                   steps=FLAGS.steps, random_trials=FLAGS.random_trials,
                   robust_fraction=FLAGS.robust_fraction,
                   max_rhat=FLAGS.max_rhat)
    if FLAGS.square_queries is not None:
        options["square_queries"] = FLAGS.square_queries
    return {"posterior": FLAGS.posterior, "reference": FLAGS.reference,
            "num_examples": FLAGS.num_examples, "options": options}


def main(argv):
    del argv
    out_dir, config, _ = lf.start("evaluate", config_from_flags,
                                  flag_list=lf.script_flags(__name__, SHARED))
    ensemble = PosteriorEnsemble.load(config["posterior"])
    reference = (PosteriorEnsemble.load(config["reference"])
                 if config["reference"] else None)
    ds = common.load_data(FLAGS.dataset, data_dir=FLAGS.data_dir,
                          data_source=FLAGS.data_source,
                          half_moons_n=FLAGS.half_moons_n,
                          seed=common.study_seeds(FLAGS.seed).data)
    n = config["num_examples"]
    with lf.strategy().scope():
        report = evaluation.robustness_report(
            ensemble, ds.test_x[:n], ds.test_y[:n], reference=reference,
            output_dir=out_dir, **config["options"])
    print(report["verdict_line"])
    print(f"Report: {report['files']['report_md']}")


if __name__ == "__main__":
    app.run(main)
