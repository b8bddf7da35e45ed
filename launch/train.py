r"""Train a posterior (HMC, VI, SGD or deep ensemble) and save it.

Writes ``posterior.npz`` (a PosteriorEnsemble: weights as arrays, the
architecture as Keras config, no pickle), ``results.json`` (test accuracy,
diagnostics: for HMC the function-space R-hat/ESS on the held-out test
points, ``train/convergence/...``; for VI the loss trace and its plateau),
``flags.txt``, for HMC a trace plot ``figures/traces_train.png`` and
resumable checkpoints in ``ckpt/``: run the same command again after an
interruption and it continues.  An unconverged HMC posterior is saved but
reported as UNCONVERGED (studies that use it refuse it unless
--allow_unconverged).  The work is
:func:`tfp_bnn_adv.studies.training.run_training`'s.

``results.json`` records the run's fingerprint (see
:func:`~tfp_bnn_adv.studies.training.fingerprint`); a different
configuration in the same --output_dir is refused before anything is
fitted, naming the settings that differ, unless --overwrite deletes the
earlier posterior, results and checkpoints.

Example:
  python -m launch.train --output_dir=runs/fmnist_hmc --method=hmc \
      --dataset=fashion_mnist --hidden=256 --num_burnin_steps=500 \
      --num_results=250 --num_chains=2
"""

from absl import app
from absl import flags

from launch import flags as lf
from tfp_bnn_adv.studies.training import METHODS
from tfp_bnn_adv.studies.training import InferenceSettings
from tfp_bnn_adv.studies.training import TrainingConfig
from tfp_bnn_adv.studies.training import fingerprint
from tfp_bnn_adv.studies.training import run_training

FLAGS = lf.FLAGS

SHARED = lf.use("dataset", "half_moons_n", "num_train", "hidden",
                "keras_model", "epochs", "vi_samples", *lf.HMC_FLAGS)
flags.DEFINE_enum("method", "hmc", list(METHODS), "Inference method.")
flags.DEFINE_enum("architecture", "mlp", ["mlp", "cnn"],
                  "Built-in architecture (ignored with --keras_model).")
flags.DEFINE_list("filters", ["32", "64"], "Conv filters of the CNN.")
flags.DEFINE_integer("batch_size", 128, "VI / SGD minibatch size.",
                     lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "VI / SGD learning rate.")
flags.DEFINE_integer("num_members", 5, "Deep-ensemble size.", lower_bound=1)
lf.register("filters", lambda v: lf.int_list(v, "filters", 1))
lf.positive_float("learning_rate")
flags.register_multi_flags_validator(
    ["hidden", "architecture"], lf.mlp_widths_ok,
    message="--hidden widths must be >= 1 for an MLP (0, no dense layer, "
    "is for --architecture=cnn only)")
lf.adopt(__name__, SHARED)

__all__ = ["config_from_flags", "inference_settings", "fingerprint", "main"]


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


def config_from_flags() -> TrainingConfig:
    config = TrainingConfig(
        settings=inference_settings(), dataset=FLAGS.dataset,
        num_train=lf.count(FLAGS.num_train), num_test=lf.count(FLAGS.num_test),
        architecture=FLAGS.architecture,
        hidden=lf.ints(FLAGS.hidden, "hidden", 0),
        filters=lf.ints(FLAGS.filters, "filters"),
        keras_model=FLAGS.keras_model, data_dir=FLAGS.data_dir,
        data_source=FLAGS.data_source, half_moons_n=FLAGS.half_moons_n,
        max_rhat=FLAGS.max_rhat)
    config.validate()
    return config


def main(argv):
    del argv
    out_dir, config, _ = lf.start(
        "train", config_from_flags, fingerprint, directories=("ckpt",),
        flag_list=lf.script_flags(__name__, SHARED))
    with lf.strategy().scope():
        results = run_training(config, out_dir, overwrite=FLAGS.overwrite,
                               verbose=1)
    print(results["summary"])


if __name__ == "__main__":
    app.run(main)
