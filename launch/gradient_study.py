r"""Experiment 1: the vanishing expected gradient.

Half-moons with HMC over widths and training-set sizes, and an image dataset
(--dataset) with HMC and VI, measuring the mean |component| of Theorem 1's
expected gradient and of the posterior predictive's loss gradient (Feng et
al.) on test points as the number of posterior samples grows; the
deterministic network as comparison.  Beside it, for every image posterior,
the authors' Figure 1 measure, with which alone their published numbers
compare: the L-inf norm of one selected image's double-softmax gradient for
the first 1, 10, 100 samples, on the first --figure1_images test images.
Writes ``results.json``, ``gradients.csv`` / ``.md`` and ``figures/``.  HMC
flags given explicitly (--num_results, --trajectory_length, ...) override the
preset's HMC settings of both parts; an unconverged HMC posterior stops the
study unless --allow_unconverged is given.  A rerun in the same --output_dir
with other settings is refused, naming what differs, unless --overwrite.

Example (paper scale, hours on a CPU):
  python -m launch.gradient_study --output_dir=runs/grad --preset=paper \
      --dataset=mnist --data_dir=/path/to/mnist_idx
"""

import dataclasses

from absl import app
from absl import flags

from launch import flags as lf
from tfp_bnn_adv.studies.gradient_study import GradientStudyConfig
from tfp_bnn_adv.studies.gradient_study import fingerprint
from tfp_bnn_adv.studies.gradient_study import run_gradient_study

FLAGS = lf.FLAGS

SHARED = lf.use("preset", "dataset", "num_train", "hidden", "keras_model",
                "allow_unconverged", "widths", "train_sizes", "sample_counts",
                "methods", *lf.HMC_FLAGS)
flags.DEFINE_integer("figure1_images", None, "Test images of the authors' "
                     "Figure 1 measure (default: the preset's).",
                     lower_bound=1)
lf.adopt(__name__, SHARED)


def config_from_flags() -> GradientStudyConfig:
    make = (GradientStudyConfig.paper if FLAGS.preset == "paper"
            else GradientStudyConfig.quick)
    overrides = dict(
        image_dataset=None if FLAGS.dataset == "half_moons" else FLAGS.dataset,
        keras_model=FLAGS.keras_model, data_dir=FLAGS.data_dir,
        data_source=FLAGS.data_source, seed=FLAGS.seed, **lf.convergence())
    if FLAGS.widths:
        overrides["moons_widths"] = lf.ints(FLAGS.widths, "widths")
    if FLAGS.train_sizes:
        overrides["moons_train_sizes"] = lf.ints(FLAGS.train_sizes, "train_sizes")
    if FLAGS.sample_counts:
        overrides["sample_counts"] = lf.ints(FLAGS.sample_counts, "sample_counts")
    if FLAGS.methods:
        overrides["image_methods"] = tuple(FLAGS.methods)
    if lf.explicit("hidden"):
        overrides["image_hidden"] = lf.ints(FLAGS.hidden, "hidden")
    if FLAGS.num_test is not None:
        overrides["num_test"] = lf.count(FLAGS.num_test)
    if FLAGS.num_train is not None:
        overrides["image_num_train"] = lf.count(FLAGS.num_train)
    if FLAGS.figure1_images is not None:
        overrides["figure1_images"] = FLAGS.figure1_images
    config = make(**overrides)
    hmc = lf.hmc_overrides()
    config = dataclasses.replace(config,
                                 moons_hmc=config.moons_hmc.replace(**hmc),
                                 image_hmc=config.image_hmc.replace(**hmc))
    config.validate()
    return config


def main(argv):
    del argv
    out_dir, config, _ = lf.start("gradient_study", config_from_flags,
                                  fingerprint,
                                  flag_list=lf.script_flags(__name__, SHARED))
    with lf.strategy().scope():
        results = run_gradient_study(config, out_dir,
                                     overwrite=FLAGS.overwrite)
    print(f"Gradient study done: {out_dir}/gradients.md; figures: "
          f"{', '.join(results['figures'])}")


if __name__ == "__main__":
    app.run(main)
