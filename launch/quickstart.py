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
(--num_train, --num_test, --hidden, --num_burnin_steps, --num_results,
--epochs, --widths, --train_sizes, --sample_counts, --training_lengths,
--hmc_lengths, --pgd_steps, --square_queries) override the quick settings.

Example:
  python -m launch.quickstart --output_dir=quickstart_out
"""

import os
import time

from absl import app
from absl import logging

from launch import flags as lf
from tfp_bnn_adv import data as data_lib
from tfp_bnn_adv import files
from tfp_bnn_adv import models
from tfp_bnn_adv.studies.attack_table import AttackTableConfig
from tfp_bnn_adv.studies.attack_table import run_attack_table
from tfp_bnn_adv.studies.gradient_study import GradientStudyConfig
from tfp_bnn_adv.studies.gradient_study import run_gradient_study
from tfp_bnn_adv.studies.robustness_accuracy import RobustnessAccuracyConfig
from tfp_bnn_adv.studies.robustness_accuracy import run_robustness_accuracy
from tfp_bnn_adv.studies.training import InferenceSettings
from tfp_bnn_adv.studies.training import fit_posterior

FLAGS = lf.FLAGS
DEFAULT_OUTPUT_DIR = "quickstart_out"
NUM_TRAIN = 5000
HIDDEN = (128,)
SETTINGS = {
    "hmc": InferenceSettings(method="hmc", num_chains=2, num_burnin_steps=150,
                             num_results=50, thinning=2, step_size=0.002,
                             num_leapfrog_steps=10),
    "vi": InferenceSettings(method="vi", epochs=8, learning_rate=1e-2,
                            vi_samples=100),
    "sgd": InferenceSettings(method="sgd", epochs=8, learning_rate=1e-3),
}
LABELS = {"hmc": "HMC", "vi": "VI", "sgd": "NN (SGD)"}


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


def _settings(method: str, seed: int) -> InferenceSettings:
    names = {"hmc": ("num_burnin_steps", "num_results", "num_chains"),
             "vi": ("epochs", "vi_samples"), "sgd": ("epochs",)}[method]
    return SETTINGS[method].replace(
        seed=seed, **{n: FLAGS[n].value for n in names if lf.explicit(n)})


def main(argv):
    del argv
    if not FLAGS.output_dir:
        FLAGS.output_dir = DEFAULT_OUTPUT_DIR
    out_dir = lf.start("quickstart")
    # --strategy: HMC, gradients and attacks spread over its replicas.
    with lf.strategy().scope():
        _run(out_dir)


def _run(out_dir: str) -> None:
    """The four stages; see the module docstring."""
    start = time.perf_counter()
    seed = FLAGS.seed
    num_train = FLAGS.num_train or NUM_TRAIN
    hidden = lf.ints(FLAGS.hidden, "hidden") if lf.explicit("hidden") else HIDDEN
    ds = _fashion(seed, num_train)
    ensembles = {}
    for method in SETTINGS:
        logging.info("[quickstart] stage 1/4: %s on Fashion-MNIST (%d points)",
                     method, len(ds.train_x))
        model = models.mlp(ds.input_shape, ds.num_classes, hidden)
        ens, _ = fit_posterior(
            model, ds.train_x, ds.train_y, _settings(method, seed),
            checkpoint_dir=os.path.join(out_dir, "ckpt", method))
        ens.metadata["dataset"] = "fashion_mnist"
        ens.save(os.path.join(out_dir, f"posterior_{method}.npz"))
        ensembles[method] = ens

    data = dict(data_dir=FLAGS.data_dir, data_source=FLAGS.data_source)
    logging.info("[quickstart] stage 2/4: attack table")
    table = run_attack_table(
        AttackTableConfig.quick(
            dataset="fashion_mnist", seed=seed, **data, **_overrides({
                "num_test": ("num_test", _value),
                "pgd_steps": ("pgd_steps", _value),
                "square_queries": ("square_queries", _value)})),
        os.path.join(out_dir, "attack_table"),
        ensembles={LABELS[m]: e for m, e in ensembles.items()})

    logging.info("[quickstart] stage 3/4: gradient study")
    grads = run_gradient_study(
        GradientStudyConfig.quick(
            image_dataset="fashion_mnist", seed=seed, **data, **_overrides({
                "widths": ("moons_widths", lf.ints),
                "train_sizes": ("moons_train_sizes", lf.ints),
                "sample_counts": ("sample_counts", lf.ints),
                "num_test": ("num_test", _value)})),
        os.path.join(out_dir, "gradient_study"), image_ensembles=ensembles)

    logging.info("[quickstart] stage 4/4: robustness-accuracy sweep")
    sweep = run_robustness_accuracy(
        RobustnessAccuracyConfig.quick(
            num_train=num_train, **data, **_overrides({
                "widths": ("widths", lf.ints),
                "training_lengths": ("training_lengths", lf.ints),
                "hmc_lengths": ("hmc_lengths", lf.ints),
                "num_test": ("num_test", _value)})),
        os.path.join(out_dir, "robustness_accuracy"))

    minutes = (time.perf_counter() - start) / 60
    figures = table["figures"] + grads["figures"] + sweep["figures"]
    summary = (f"# tfp_bnn_adv quickstart ({minutes:.1f} min)\n\n"
               + table["table_markdown"] + "\n## Figures\n\n"
               + "\n".join(f"- {f}" for f in figures) + "\n")
    files.write_text(os.path.join(out_dir, "summary.md"), summary)
    print(summary)
    print(f"All results in {out_dir}/ (summary.md, */results.json, "
          "*/figures/*.png).")


if __name__ == "__main__":
    app.run(main)
