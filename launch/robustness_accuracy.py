r"""Experiment 3: robustness against accuracy over a sweep of models.

Trains every (method, depth, width, training length, seed) model, attacks it
and records test accuracy and softmax robustness.  Resumable: finished models
are kept in ``runs/`` and skipped when the command runs again.  HMC flags
given explicitly override the preset's HMC settings (--num_burnin_steps is
set by --hmc_lengths).  The summary is refused while an HMC run is
unconverged unless --allow_unconverged is given (the runs stay saved).
The sweep's axes (--methods, --widths, --depths, --training_lengths,
--hmc_lengths, --seed) may change between runs in the same --output_dir
(finished runs are reused); any other setting that changes results is
refused, naming what differs, unless --overwrite deletes the earlier sweep.

Example (paper scale: ~1000 models):
  python -m launch.robustness_accuracy --output_dir=runs/sweep --preset=paper \
      --dataset=mnist --data_dir=/path/to/mnist_idx
"""

import dataclasses

from absl import app
from absl import flags

from launch import flags as lf
from tfp_bnn_adv.studies.robustness_accuracy import RobustnessAccuracyConfig
from tfp_bnn_adv.studies.robustness_accuracy import fingerprint
from tfp_bnn_adv.studies.robustness_accuracy import run_robustness_accuracy

FLAGS = lf.FLAGS

SHARED = lf.use("preset", "dataset", "half_moons_n", "num_train",
                "keras_model", "allow_unconverged", "widths",
                "training_lengths", "hmc_lengths", "methods", *lf.HMC_FLAGS)
flags.DEFINE_list("depths", [], "Hidden-layer counts of the sweep.")
lf.register("depths", lambda v: lf.int_list(v, "depths", 1))
lf.adopt(__name__, SHARED)


def config_from_flags() -> RobustnessAccuracyConfig:
    make = (RobustnessAccuracyConfig.paper if FLAGS.preset == "paper"
            else RobustnessAccuracyConfig.quick)
    overrides = dict(dataset=FLAGS.dataset, keras_model=FLAGS.keras_model,
                     data_dir=FLAGS.data_dir, data_source=FLAGS.data_source,
                     half_moons_n=FLAGS.half_moons_n, **lf.convergence())
    for flag, field in (("widths", "widths"), ("depths", "depths"),
                        ("training_lengths", "training_lengths"),
                        ("hmc_lengths", "hmc_lengths")):
        if FLAGS[flag].value:
            overrides[field] = lf.ints(FLAGS[flag].value, flag)
    if FLAGS.methods:
        overrides["methods"] = tuple(FLAGS.methods)
    if FLAGS.num_train is not None:
        overrides["num_train"] = lf.count(FLAGS.num_train)
    if FLAGS.num_test is not None:
        overrides["num_test"] = lf.count(FLAGS.num_test)
    if lf.explicit("seed"):
        overrides["seeds"] = (FLAGS.seed,)
    config = make(**overrides)
    config = dataclasses.replace(
        config, hmc=config.hmc.replace(**lf.hmc_overrides()))
    config.validate()
    return config


def main(argv):
    del argv
    out_dir, config, _ = lf.start("robustness_accuracy", config_from_flags,
                                  fingerprint, directories=("runs",),
                                  flag_list=lf.script_flags(__name__, SHARED))
    with lf.strategy().scope():
        results = run_robustness_accuracy(config, out_dir,
                                          overwrite=FLAGS.overwrite)
    print(f"{results['num_models']} models ({results['num_skipped']} resumed "
          f"from {out_dir}/runs); table {out_dir}/sweep.md; figures: "
          f"{', '.join(results['figures'])}")


if __name__ == "__main__":
    app.run(main)
